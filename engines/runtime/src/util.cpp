// Buffers and worker threads of one call.
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#include <sys/mman.h>
#endif

#include "internal.h"

namespace hiwin {

namespace {
constexpr size_t kHuge = size_t(2) << 20;
}

#if defined(__linux__) && defined(MADV_HUGEPAGE) && !defined(__SANITIZE_ADDRESS__)
#define HIWIN_BIG_MMAP 1
#endif

// From 1 MiB on (Linux, when transparent huge pages are enabled): a mapping of its own, 2 MiB-aligned,
// with huge pages requested, unmapped on release. Its cost is predictable (the kernel clears 2 MiB
// pages on first touch) where the heap would return and re-fault 4 KiB pages. Sanitizer builds use
// malloc, so that LeakSanitizer sees every block.
constexpr size_t kBigMin = size_t(1) << 20;

#ifdef HIWIN_BIG_MMAP
// Transparent huge pages can be had ("always" or "madvise"); without them malloc's reuse of freed
// memory beats fresh mappings.
bool huge_pages_available() {
  static const bool yes = [] {
    char buf[128] = {0};
    FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (!f) return false;
    const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    buf[n] = 0;
    return std::strstr(buf, "[always]") != nullptr || std::strstr(buf, "[madvise]") != nullptr;
  }();
  return yes;
}
#endif

void* big_alloc(size_t bytes) {
  if (bytes == 0) bytes = 1;
#ifdef HIWIN_BIG_MMAP
  if (bytes >= kBigMin && huge_pages_available()) {
    const size_t len = (bytes + kHuge - 1) / kHuge * kHuge;
    if (len < bytes || len + kHuge < len) throw std::bad_alloc();
    void* m = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    const uintptr_t base = reinterpret_cast<uintptr_t>(m);
    const uintptr_t start = (base + kHuge - 1) / kHuge * kHuge;
    if (start > base) munmap(m, start - base);
    const uintptr_t end = base + len + kHuge;
    if (end > start + len) munmap(reinterpret_cast<void*>(start + len), end - (start + len));
    void* p = reinterpret_cast<void*>(start);
    madvise(p, len, MADV_HUGEPAGE);
    return p;
  }
#endif
  void* p = std::malloc(bytes);
  if (!p) throw std::bad_alloc();
  return p;
}

void big_free(void* p, size_t bytes) noexcept {
  if (!p) return;
#ifdef HIWIN_BIG_MMAP
  if (bytes == 0) bytes = 1;
  if (bytes >= kBigMin && huge_pages_available()) {
    munmap(p, (bytes + kHuge - 1) / kHuge * kHuge);
    return;
  }
#else
  (void)bytes;
#endif
  std::free(p);
}

int resolve_threads(int requested) {
  int n = requested;
  if (n <= 0) {
    const char* env = std::getenv("HIWIN_NUM_THREADS");
    if (env && *env) {
      char* end = nullptr;
      long v = std::strtol(env, &end, 10);
      if (end && *end == 0 && v >= 1) n = static_cast<int>(v > 64 ? 64 : v);
    }
  }
  if (n <= 0) {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
#endif
    if (n <= 0) n = static_cast<int>(std::thread::hardware_concurrency());
  }
  return n < 1 ? 1 : (n > 64 ? 64 : n);
}

void parallel_for(int threads, int n, const std::function<void(int, int)>& f) {
  if (n <= 0) return;
  if (threads > n) threads = n;
  if (threads <= 1) {
    for (int i = 0; i < n; ++i) f(i, 0);
    return;
  }
  std::atomic<int> next{0};
  std::atomic<bool> stop{false};
  std::exception_ptr err;
  std::mutex err_m;
  auto work = [&](int slot) {
    try {
      for (;;) {
        if (stop.load(std::memory_order_relaxed)) return;
        int i = next.fetch_add(1);
        if (i >= n) return;
        f(i, slot);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(err_m);
      if (!err) err = std::current_exception();
      stop = true;
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  try {
    for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
  } catch (...) {  // no thread could be started: the ones running (and this one) do the work
  }
  work(0);
  for (auto& t : pool) t.join();
  if (err) std::rethrow_exception(err);
}

}  // namespace hiwin
