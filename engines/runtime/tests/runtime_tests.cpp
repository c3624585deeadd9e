// Test driver for the hiwin runtime, run by tests/engines/test_runtime_cpp.py.
//
//   hiwin_runtime_tests golden GOLDEN.txt MANIFEST_DIR   compare with the Python reference's golden data
//   hiwin_runtime_tests robust ROBUST.txt               bad files / random sizes / API misuse: every call
//                                                        returns a status (run under ASan + UBSan)
//   hiwin_runtime_tests threads IMAGE...                 the same bytes for every thread count and for
//                                                        concurrent calls (run under ThreadSanitizer too)
//
// Hashes: h = n * K3 + sum_i b[i] * ((i * K1 + K2) | 1) mod 2^64 over the bytes b of an array (the
// golden writer computes the same with numpy); any single changed byte changes h.
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "hiwin/hiwin.hpp"

namespace {

const uint64_t K1 = 0x9E3779B97F4A7C15ull, K2 = 0xD1B54A32D192ED03ull, K3 = 0x94D049BB133111EBull;

uint64_t hash_bytes(const void* data, size_t n) {
  const uint8_t* b = static_cast<const uint8_t*>(data);
  uint64_t h = static_cast<uint64_t>(n) * K3;
  for (size_t i = 0; i < n; ++i) h += static_cast<uint64_t>(b[i]) * ((static_cast<uint64_t>(i) * K1 + K2) | 1ull);
  return h;
}

int failures = 0;
std::map<std::string, int> passed;

void fail(const std::string& what) {
  if (++failures <= 40) std::printf("MISMATCH %s\n", what.c_str());
}

const char* code_name(hiwin_code c) {
  switch (c) {
    case HIWIN_OK: return "ok";
    case HIWIN_BAD_IMAGE: return "image";
    case HIWIN_BAD_GEOMETRY: return "geometry";
    case HIWIN_IO_ERROR: return "io";
    default: return "other";
  }
}

std::string plan_str(const hiwin_plan& p) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "%d %d %d %d %d %d %d %d %d %d %d", p.image_width, p.image_height, p.overview_width,
                p.overview_height, p.grid_cols, p.grid_rows, p.refined_width, p.refined_height, p.slice_width,
                p.slice_height, p.num_crops);
  return buf;
}

std::string rest_of(std::istringstream& ss) {
  std::string r;
  std::getline(ss, r);
  size_t a = r.find_first_not_of(' ');
  return a == std::string::npos ? "" : r.substr(a);
}

// Test-double vision stages (the same arithmetic as runtime_golden.fake_stages, float32, same
// operation order): exact copies and single roundings, so numpy and C++ agree bit for bit.
const int kCv = 2, kHidden = 3;

int fake_vit(void*, int b, int h, int w, const float* px, float* f, char*, size_t) {
  const size_t H = 14 * static_cast<size_t>(h), W = 14 * static_cast<size_t>(w);
  for (int n = 0; n < b; ++n)
    for (int c = 0; c < kCv; ++c)
      for (int i = 0; i < h; ++i)
        for (int j = 0; j < w; ++j)
          f[((static_cast<size_t>(n) * kCv + c) * h + i) * w + j] = px[((static_cast<size_t>(n) * 3 + c) * H + 14 * i) * W + 14 * j];
  return 0;
}

int fake_jbu(void*, int b, int h, int w, const float* f, const float* px, float* f2, float* f4, char*, size_t) {
  const size_t H = 14 * static_cast<size_t>(h), W = 14 * static_cast<size_t>(w);
  for (int n = 0; n < b; ++n)
    for (int c = 0; c < kCv; ++c) {
      const float* fc = f + (static_cast<size_t>(n) * kCv + c) * h * w;
      const float p00 = px[(static_cast<size_t>(n) * 3 + c) * H * W];
      for (int y = 0; y < 2 * h; ++y)
        for (int x = 0; x < 2 * w; ++x)
          f2[((static_cast<size_t>(n) * kCv + c) * 2 * h + y) * 2 * w + x] = fc[(y / 2) * w + x / 2];
      for (int y = 0; y < 4 * h; ++y)
        for (int x = 0; x < 4 * w; ++x)
          f4[((static_cast<size_t>(n) * kCv + c) * 4 * h + y) * 4 * w + x] = fc[(y / 4) * w + x / 4] + p00;
    }
  return 0;
}

int fake_projector(void*, int b, int h, int w, int oh, int ow, const float* f1, const float* f2, const float* f4,
                   float* t, char* msg, size_t msg_size) {
  if (oh < 2 || ow < 2) {
    std::snprintf(msg, msg_size, "bad bucket %dx%d", oh, ow);
    return 1;
  }
  const int q = 144;
  for (int n = 0; n < b; ++n)
    for (int k = 0; k < q; ++k)
      for (int c = 0; c < kHidden; ++c) {
        float a = f1[((static_cast<size_t>(n) * kCv + c % kCv) * h + (k / w) % h) * w + k % w];
        float b2 = f2[((static_cast<size_t>(n) * kCv) * 2 * h + 2 * h - 1) * 2 * w + 2 * w - 1];
        float b4 = f4[((static_cast<size_t>(n) * kCv + 1) * 4 * h) * 4 * w + 4 * w - 1];
        t[(static_cast<size_t>(n) * q + k) * kHidden + c] = a + b2 * static_cast<float>(oh) + b4 * static_cast<float>(ow);
      }
  return 0;
}

void set_fake_backend(hiwin::Context& ctx) {
  hiwin_vision_backend vb;
  vb.user = nullptr;
  vb.vision_channels = kCv;
  vb.hidden_size = kHidden;
  vb.vit = fake_vit;
  vb.jbu = fake_jbu;
  vb.projector = fake_projector;
  hiwin::check(hiwin_context_set_vision_backend(ctx.get(), &vb));
}

int run_golden(const std::string& golden, const std::string& manifest_dir) {
  std::printf("KERNELS %s\n", hiwin_simd_level());  // $HIWIN_SIMD / $HIWIN_NUM_THREADS pick kernels and threads
  std::ifstream f(golden);
  if (!f) {
    std::printf("cannot open %s\n", golden.c_str());
    return 2;
  }
  // first line: "PILLOW <major>" (the reference's Pillow; its BICUBIC pass order changed in 13)
  std::string first;
  std::getline(f, first);
  int pillow_major = 0;
  if (std::sscanf(first.c_str(), "PILLOW %d", &pillow_major) != 1) {
    std::printf("golden data must start with PILLOW <major>\n");
    return 2;
  }
  hiwin_options opt0;
  hiwin_options_default(&opt0);
  opt0.resize_pass_order = pillow_major >= 13 ? HIWIN_RESIZE_PILLOW13 : HIWIN_RESIZE_PILLOW12;
  hiwin::Context base = hiwin::Context::from_export(manifest_dir, "", "", &opt0);
  set_fake_backend(base);
  std::map<int, hiwin::Context*> by_pre;  // contexts with pre_resize
  std::vector<std::unique_ptr<hiwin::Context>> owned;
  auto ctx_for = [&](int pre) -> hiwin::Context& {
    if (pre == 0) return base;
    auto it = by_pre.find(pre);
    if (it != by_pre.end()) return *it->second;
    hiwin_options o = base.options();
    o.pre_resize = pre;
    owned.emplace_back(new hiwin::Context(hiwin::Context::from_export(manifest_dir, "", "", &o)));
    set_fake_backend(*owned.back());
    by_pre[pre] = owned.back().get();
    return *owned.back();
  };
  std::string line;
  // state of the current image case
  std::string file;
  std::unique_ptr<hiwin::Image> img;
  std::unique_ptr<hiwin::Prepared> prep;
  std::string decode_err, prepare_err;
  hiwin::Context* cur = &base;
  while (std::getline(f, line)) {
    std::istringstream ss(line);
    std::string tag;
    ss >> tag;
    if (tag == "CASE") {
      int ms = 0, pre = 0;
      ss >> ms >> pre;
      file = rest_of(ss);
      img.reset();
      prep.reset();
      decode_err.clear();
      prepare_err.clear();
      hiwin::Context& ctx = ctx_for(pre);
      cur = &ctx;
      try {
        img.reset(new hiwin::Image(ctx.decode_file(file)));
      } catch (const hiwin::Exception& e) {
        decode_err = code_name(e.code());
        if (!*e.what()) fail(file + ": empty error message");
      }
      if (img) try {
          prep.reset(new hiwin::Prepared(ctx.prepare(*img, ms)));
        } catch (const hiwin::Exception& e) {
          prepare_err = code_name(e.code());
          if (!*e.what()) fail(file + ": empty error message");
        }
      // the one-call path (decoding overlapped with the resizes for JPEG) must give the same crops
      std::string one_err;
      std::unique_ptr<hiwin::Prepared> one;
      try {
        one.reset(new hiwin::Prepared(ctx.prepare_file(file, ms)));
      } catch (const hiwin::Exception& e) {
        one_err = code_name(e.code());
      }
      const std::string two_err = !decode_err.empty() ? decode_err : prepare_err;
      if (one_err != two_err) {
        fail(file + ": hiwin_prepare_file status '" + one_err + "', two-step '" + two_err + "'");
      } else if (one) {
        bool same = plan_str(one->plan()) == plan_str(prep->plan());
        for (int i = 0; same && i < prep->plan().num_crops; ++i) {
          hiwin_crop a = prep->crop(i), b = one->crop(i);
          const size_t n = static_cast<size_t>(a.width) * a.height * 3;
          same = a.width == b.width && a.height == b.height && std::memcmp(a.rgb, b.rgb, n) == 0 &&
                 std::memcmp(a.pixels, b.pixels, n * 4) == 0;
        }
        if (!same) fail(file + ": hiwin_prepare_file differs from decode + prepare");
        else passed["one-call prepares"]++;
      } else {
        passed["one-call prepares"]++;
      }
    } else if (tag == "DECODED") {
      std::string mode;
      int w, h;
      uint64_t hv;
      ss >> mode >> w >> h >> hv;
      if (!img) {
        fail(file + ": decode failed (" + decode_err + "), the reference decodes it");
        continue;
      }
      if (img->source_mode() != mode || img->width() != w || img->height() != h)
        fail(file + ": decoded " + img->source_mode() + " " + std::to_string(img->width()) + "x" +
             std::to_string(img->height()) + ", reference " + mode + " " + std::to_string(w) + "x" + std::to_string(h));
      else if (hash_bytes(img->rgb(), static_cast<size_t>(w) * h * 3) != hv)
        fail(file + ": decoded RGB pixels differ from Pillow's");
      else
        passed["decoded"]++;
    } else if (tag == "ERR") {
      std::string kind;
      ss >> kind;
      std::string got = !decode_err.empty() ? decode_err : prepare_err;
      if (got != kind) fail(file + ": reference error '" + kind + "', got '" + (got.empty() ? "ok" : got) + "'");
      else passed["errors"]++;
    } else if (tag == "PLAN") {
      std::string want = rest_of(ss);
      if (!prep) {
        fail(file + ": prepare failed (" + prepare_err + ")");
        continue;
      }
      std::string got = plan_str(prep->plan());
      if (got != want) fail(file + ": plan " + got + ", reference " + want);
      else passed["image plans"]++;
    } else if (tag == "CROP") {
      int i, w, h, left, top, oh, ow, group;
      uint64_t hr, hn;
      ss >> i >> w >> h >> left >> top >> oh >> ow >> group >> hr >> hn;
      if (!prep) continue;
      hiwin_crop c;
      try {
        c = prep->crop(i);
      } catch (const hiwin::Exception& e) {
        fail(file + ": crop " + std::to_string(i) + ": " + e.what());
        continue;
      }
      std::string where = file + ": crop " + std::to_string(i);
      if (c.width != w || c.height != h || c.left != left || c.top != top) fail(where + ": box differs");
      else if (c.bucket_oh != oh || c.bucket_ow != ow) fail(where + ": bucket differs");
      else if (c.group != group) fail(where + ": shape group differs");
      else if (hash_bytes(c.rgb, static_cast<size_t>(w) * h * 3) != hr) fail(where + ": RGB pixels differ (resize)");
      else if (hash_bytes(c.pixels, static_cast<size_t>(w) * h * 3 * 4) != hn) fail(where + ": normalised tensor differs");
      else passed["crops"]++;
    } else if (tag == "LAYOUT") {  // layout of the current image's grid
      size_t n;
      uint64_t hv;
      ss >> n >> hv;
      if (!prep) continue;
      hiwin_plan p = prep->plan();
      auto v = hiwin::layout_indices(p.grid_cols, p.grid_rows, p.num_crops, base.options().queries);
      if (v.size() != n || hash_bytes(v.data(), v.size() * 8) != hv) fail(file + ": layout indices differ");
      else passed["image layouts"]++;
    } else if (tag == "ENC") {  // visual tokens through the test-double stages (crop chain + layout)
      size_t n;
      uint64_t hv;
      ss >> n >> hv;
      if (!prep) continue;
      const float newline[kHidden] = {1.5f, -2.25f, 3.0f}, comma[kHidden] = {-0.5f, 0.75f, -1.0f};
      std::vector<float> tok;
      try {
        tok = cur->encode(*prep, newline, comma);
      } catch (const hiwin::Exception& e) {
        fail(file + ": encode: " + e.what());
        continue;
      }
      if (tok.size() != n || hash_bytes(tok.data(), tok.size() * 4) != hv) fail(file + ": visual tokens differ from CropChain's");
      else passed["visual tokens"]++;
    } else if (tag == "P") {  // plan of a size: w h max_slices (plan... | ERR kind)
      int w, h, ms;
      ss >> w >> h >> ms;
      std::string want = rest_of(ss), got;
      try {
        got = plan_str(base.plan(w, h, ms));
      } catch (const hiwin::Exception& e) {
        got = std::string("ERR ") + code_name(e.code());
      }
      if (got != want) fail("plan of " + std::to_string(w) + "x" + std::to_string(h) + " max_slices " +
                            std::to_string(ms) + ": " + got + ", reference " + want);
      else passed["size plans"]++;
    } else if (tag == "L") {  // cols rows ncrops queries n hash | ERR
      int cols, rows, nc, q;
      ss >> cols >> rows >> nc >> q;
      std::string want = rest_of(ss), got;
      try {
        auto v = hiwin::layout_indices(cols, rows, nc, q);
        got = std::to_string(v.size()) + " " + std::to_string(hash_bytes(v.data(), v.size() * 8));
      } catch (const hiwin::Exception& e) {
        got = "ERR";
      }
      if (got != want) fail("layout " + std::to_string(cols) + "x" + std::to_string(rows) + " q" + std::to_string(q) + ": " + got + " vs " + want);
      else passed["layouts"]++;
    } else if (tag == "T") {  // vocab npre pre... nvis npost post... -> n hash
      int64_t vocab;
      size_t npre, nvis, npost, n;
      uint64_t hv;
      ss >> vocab >> npre;
      std::vector<int64_t> pre(npre), post;
      for (auto& x : pre) ss >> x;
      ss >> nvis >> npost;
      post.resize(npost);
      for (auto& x : post) ss >> x;
      ss >> n >> hv;
      auto v = hiwin::prompt_table_ids(pre, nvis, post, vocab);
      if (v.size() != n || hash_bytes(v.data(), v.size() * 8) != hv) fail("prompt table ids differ");
      else passed["prompt tables"]++;
    } else if (tag == "B") {
      int w, h, oh, ow;
      ss >> w >> h >> oh >> ow;
      auto b = base.bucket(w, h);
      if (b.first != oh || b.second != ow) fail("bucket of " + std::to_string(w) + "x" + std::to_string(h));
      else passed["buckets"]++;
    }
  }
  for (const auto& kv : passed) std::printf("PASSED %s %d\n", kv.first.c_str(), kv.second);
  std::printf("FAILURES %d\n", failures);
  return failures ? 1 : 0;
}

// Every line: "BAD path" (must fail with a message), "GOOD path" (decode + prepare, any status),
// "SIZE w h seed" (random pixels, from_rgb8 + prepare: OK or BAD_GEOMETRY).
int run_robust(const std::string& list) {
  std::ifstream f(list);
  if (!f) return 2;
  hiwin::Context ctx;
  int n_bad = 0, n_sizes = 0, n_good = 0;
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream ss(line);
    std::string tag;
    ss >> tag;
    if (tag == "BAD") {
      std::string path = rest_of(ss);
      hiwin_image* img = nullptr;
      hiwin_status* st = hiwin_image_decode_file(ctx.get(), path.c_str(), &img);
      if (!st) {
        fail(path + ": a bad file decoded without an error");
        hiwin_image_free(img);
      } else {
        if (img || !*hiwin_status_message(st)) fail(path + ": error without a message or with an output");
        std::printf("BAD %s -> %s\n", path.substr(path.find_last_of('/') + 1).c_str(), hiwin_status_message(st));
        hiwin_status_free(st);
        n_bad++;
      }
      hiwin_prepared* pp = nullptr;  // the one-call path (second decoding thread for JPEG) too
      hiwin_status* st2 = hiwin_prepare_file(ctx.get(), path.c_str(), 0, &pp);
      if (!st2 || pp || !*hiwin_status_message(st2)) fail(path + ": hiwin_prepare_file accepted a bad file");
      hiwin_prepared_free(pp);
      hiwin_status_free(st2);
    } else if (tag == "GOOD") {
      std::string path = rest_of(ss);
      try {
        hiwin::Image img = ctx.decode_file(path);
        hiwin::Prepared p = ctx.prepare(img);
        hiwin::Prepared q = ctx.prepare_file(path);
        n_good++;
      } catch (const hiwin::Exception& e) {
        if (!*e.what()) fail(path + ": empty message");
      }
    } else if (tag == "SIZE") {
      int w, h;
      unsigned seed;
      ss >> w >> h >> seed;
      std::vector<uint8_t> px(static_cast<size_t>(w) * h * 3);
      std::mt19937 rng(seed);
      for (auto& v : px) v = static_cast<uint8_t>(rng());
      hiwin::Image img = hiwin::Image::from_rgb8(px.data(), w, h);
      try {
        hiwin::Prepared p = ctx.prepare(img);
        hiwin_plan pl = p.plan();
        for (int i = 0; i < pl.num_crops; ++i) {
          hiwin_crop c = p.crop(i);
          volatile float s = 0;
          for (size_t k = 0; k < static_cast<size_t>(c.width) * c.height * 3; k += 97) s = s + c.pixels[k];
        }
        auto lay = hiwin::layout_indices(pl.grid_cols, pl.grid_rows, pl.num_crops, 144);
        (void)lay;
        n_sizes++;
      } catch (const hiwin::Exception& e) {
        if (e.code() != HIWIN_BAD_GEOMETRY || !*e.what()) fail("size " + std::to_string(w) + "x" + std::to_string(h) + ": " + e.what());
        else n_sizes++;
      }
    }
  }
  // API misuse: NULL handles, bad arguments and small buffers give statuses, never crashes
  struct Expect {
    const char* what;
    hiwin_status* st;
    hiwin_code code;
  };
  hiwin_plan plan;
  int64_t small[4];
  size_t cnt = 0;
  hiwin_options bad;
  hiwin_options_default(&bad);
  bad.max_slices = 0;
  hiwin_context* c2 = nullptr;
  hiwin_prepared* pp = nullptr;
  hiwin_image* im = nullptr;
  uint8_t px[3] = {1, 2, 3};
  const Expect ex[] = {
      {"plan NULL ctx", hiwin_plan_slices(nullptr, 10, 10, 9, &plan), HIWIN_INVALID_ARGUMENT},
      {"plan 0x5", hiwin_plan_slices(ctx.get(), 0, 5, 9, &plan), HIWIN_BAD_IMAGE},
      {"plan huge", hiwin_plan_slices(ctx.get(), 2000000000, 2000000000, 9, &plan), HIWIN_OK},
      {"options max_slices 0", hiwin_context_create(&bad, &c2), HIWIN_INVALID_ARGUMENT},
      {"layout small buffer", hiwin_layout_indices(0, 0, 1, 144, small, 4, &cnt), HIWIN_BUFFER_TOO_SMALL},
      {"layout bad grid", hiwin_layout_indices(2, 2, 3, 144, nullptr, 0, &cnt), HIWIN_INVALID_ARGUMENT},
      {"layout non-square queries", hiwin_layout_indices(0, 0, 1, 10, nullptr, 0, &cnt), HIWIN_INVALID_ARGUMENT},
      {"prepare NULL image", hiwin_prepare(ctx.get(), nullptr, 0, &pp), HIWIN_INVALID_ARGUMENT},
      {"decode missing file", hiwin_image_decode_file(ctx.get(), "/nonexistent/x.jpg", &im), HIWIN_IO_ERROR},
      {"decode NULL data", hiwin_image_decode_memory(ctx.get(), nullptr, 10, &im), HIWIN_INVALID_ARGUMENT},
      {"decode empty", hiwin_image_decode_memory(ctx.get(), px, 0, &im), HIWIN_BAD_IMAGE},
      {"from_rgb8 stride", hiwin_image_from_rgb8(px, 1, 1, 2, &im), HIWIN_INVALID_ARGUMENT},
      {"encode without engines", hiwin_encode_image(ctx.get(), nullptr, nullptr, nullptr, nullptr, 0, &cnt), HIWIN_INVALID_ARGUMENT},
      {"manifest missing", hiwin_context_create_from_export("/nonexistent", nullptr, nullptr, nullptr, &c2), HIWIN_BAD_MANIFEST},
      {"bucket 0 patches", hiwin_bucket_for(ctx.get(), 0, 3, nullptr, nullptr), HIWIN_INVALID_ARGUMENT},
  };
  int n_api = 0;
  for (const auto& e : ex) {
    if (hiwin_status_code(e.st) != e.code || (e.st && !*hiwin_status_message(e.st)))
      fail(std::string("API misuse '") + e.what + "': got " + std::to_string(hiwin_status_code(e.st)) + " " +
           hiwin_status_message(e.st));
    else n_api++;
    hiwin_status_free(e.st);
  }
  if (c2 || pp || im) fail("an output was set on failure");
  {  // encode without a backend
    hiwin::Image img = hiwin::Image::from_rgb8(px, 1, 1);
    (void)img;
    std::vector<uint8_t> big(400 * 300 * 3, 7);
    hiwin::Image im2 = hiwin::Image::from_rgb8(big.data(), 400, 300);
    hiwin::Prepared p = ctx.prepare(im2);
    float sep[4] = {0, 0, 0, 0};
    hiwin_status* st = hiwin_encode_image(ctx.get(), p.get(), sep, sep, nullptr, 0, &cnt);
    if (hiwin_status_code(st) != HIWIN_UNSUPPORTED) fail("encode without engines is not HIWIN_UNSUPPORTED");
    else n_api++;
    hiwin_status_free(st);
  }
  std::printf("PASSED bad files %d\nPASSED random sizes %d\nPASSED good files %d\nPASSED api misuse %d\nFAILURES %d\n",
              n_bad, n_sizes, n_good, n_api, failures);
  return failures ? 1 : 0;
}

// Every image file given: hiwin_prepare_file with 2, 3, 5 and 8 threads, two calls at once on one
// context, and decode + hiwin_prepare, must give the bytes of hiwin_prepare_file on one thread
// (run under ThreadSanitizer too).
int run_threads(int argc, char** argv) {
  int runs = 0;
  std::mutex count_m;  // runs / failures are counted from two threads
  for (int a = 0; a < argc; ++a) {
    const std::string file = argv[a];
    hiwin_options o;
    hiwin_options_default(&o);
    o.num_threads = 1;
    hiwin::Context one(o);
    std::unique_ptr<hiwin::Prepared> ref;
    int ref_code = HIWIN_OK;  // the reference refuses some aspect ratios: then every run must refuse
    try {
      ref.reset(new hiwin::Prepared(one.prepare_file(file)));
    } catch (const hiwin::Exception& e) {
      ref_code = e.code();
    }
    // calls f() (which prepares) and compares its result or its error code with one thread's
    auto check = [&](const std::string& how, const std::function<hiwin::Prepared()>& f) {
      std::unique_ptr<hiwin::Prepared> p;
      int code = HIWIN_OK;
      try {
        p.reset(new hiwin::Prepared(f()));
      } catch (const hiwin::Exception& e) {
        code = e.code();
      }
      bool ok = code == ref_code;
      if (ok && p) {
        hiwin_plan x = p->plan(), y = ref->plan();
        ok = plan_str(x) == plan_str(y);
        for (int i = 0; ok && i < x.num_crops; ++i) {
          hiwin_crop c = p->crop(i), d = ref->crop(i);
          const size_t n = static_cast<size_t>(c.width) * c.height * 3;
          ok = c.width == d.width && c.height == d.height && std::memcmp(c.rgb, d.rgb, n) == 0 &&
               std::memcmp(c.pixels, d.pixels, n * sizeof(float)) == 0;
        }
      }
      std::lock_guard<std::mutex> lock(count_m);
      if (!ok) fail(file + ": " + how + " differs from one thread");
      else runs++;
    };
    for (int n : {2, 3, 5, 8}) {
      o.num_threads = n;
      hiwin::Context ctx(o);
      const std::string how = std::to_string(n) + " threads";
      std::thread t([&] { check(how + ", concurrent call", [&] { return ctx.prepare_file(file); }); });
      check(how, [&] { return ctx.prepare_file(file); });
      t.join();
      check(how + ", decode + prepare", [&] {
        hiwin::Image img = ctx.decode_file(file);
        return ctx.prepare(img);
      });
    }
  }
  std::printf("PASSED thread runs %d\nFAILURES %d\n", runs, failures);
  return failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "golden") return run_golden(argv[2], argv[3]);
  if (argc == 3 && std::string(argv[1]) == "robust") return run_robust(argv[2]);
  if (argc >= 3 && std::string(argv[1]) == "threads") return run_threads(argc - 2, argv + 2);
  std::fprintf(stderr, "usage: hiwin_runtime_tests golden GOLDEN.txt MANIFEST_DIR | robust LIST.txt | threads IMAGE...\n");
  return 2;
}
