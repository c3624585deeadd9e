// Pillow's BICUBIC resize (libImaging/Resample.c semantics) re-implemented for packed RGB8:
// separable; per output pixel a window of support 2 * max(scale, 1) (the filter is stretched when
// down-sampling, i.e. antialiased), float64 weights normalised to sum 1, then rounded to 22-bit
// fixed point; 8-bit samples times the weights summed in int32 with a rounding bias, the sum
// shifted back and clamped to 0..255. Integer sums are exact and associative, so any evaluation
// order (SIMD lanes, threads) gives the same bytes. The pass order follows the installed Pillow's
// rule (see Resizer::Resizer).
//
// Speed: the horizontal pass runs on batches of 5 source rows interleaved into 16-byte columns
// (rows 0..4 x RGB + one pad byte): one 16-lane multiply-add per filter tap computes the pixel of
// 5 rows at once, and one batch serves every resize of the same source. The vertical pass runs over
// 32/64 bytes of a row at a time with the accumulators in registers. Both have AVX2 and AVX-512
// versions on x86 (picked at run time) and a portable C++ version (every other CPU, e.g. aarch64).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "internal.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(HIWIN_PORTABLE_ONLY)
#define HIWIN_X86_SIMD 1
#include <immintrin.h>
#endif

namespace hiwin {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;
constexpr int32_t kBias = 1 << (kPrecisionBits - 1);
constexpr int kB = Resizer::kBatch;  // source rows per horizontal batch (5 x RGB = 15 of 16 lanes)

double bicubic(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;   // (xmin, count) per output
  std::vector<int32_t> k;    // fixed point, out_size * ksize
};

Coeffs precompute(int in_size, double in0, double in1, int out_size) {
  const double support_base = 2.0;
  double scale = (in1 - in0) / out_size;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  double support = support_base * filterscale;
  Coeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  std::vector<double> kk(static_cast<size_t>(out_size) * c.ksize, 0.0);
  c.bounds.resize(static_cast<size_t>(out_size) * 2);
  for (int xx = 0; xx < out_size; ++xx) {
    double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;
    double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double* k = &kk[static_cast<size_t>(xx) * c.ksize];
    for (int x = 0; x < xmax; ++x) {
      double w = bicubic((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; ++x)
      if (ww != 0.0) k[x] /= ww;
    c.bounds[xx * 2] = xmin;
    c.bounds[xx * 2 + 1] = xmax;
  }
  c.k.resize(kk.size());
  for (size_t i = 0; i < kk.size(); ++i) {
    double v = kk[i];
    c.k[i] = v < 0 ? static_cast<int32_t>(-0.5 + v * (1 << kPrecisionBits))
                   : static_cast<int32_t>(0.5 + v * (1 << kPrecisionBits));
  }
  return c;
}

inline uint8_t clip8(int32_t v) {
  v >>= kPrecisionBits;  // arithmetic shift, as Pillow's table lookup on in >> PRECISION_BITS
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// ------------------------------------------------------------------------------ kernels
// Interleaves source rows rows[0..5) (w RGB pixels each) into q: q[16x + 3r + c] = rows[r][3x + c],
// q[16x + 15] = 0.
void build_q(const uint8_t* const* rows, int w, uint8_t* q) {
  const int last = w - 1;
  for (int x = 0; x < last; ++x) {
    uint8_t* d = q + 16 * static_cast<size_t>(x);
    const size_t s = 3 * static_cast<size_t>(x);
    for (int r = 0; r < kB; ++r) std::memcpy(d + 3 * r, rows[r] + s, 4);  // byte 3 is rewritten by the next row
    d[15] = 0;
  }
  uint8_t* d = q + 16 * static_cast<size_t>(last);
  for (int r = 0; r < kB; ++r) std::memcpy(d + 3 * r, rows[r] + 3 * static_cast<size_t>(last), 3);
  d[15] = 0;
}

// Horizontal pass of one batch: output pixel xx of row r (when out[r]) from q's columns
// bounds[2xx] .. + bounds[2xx+1] with weights kk[xx*ksize ..].
using HKernel = void (*)(const uint8_t* q, uint8_t* const* out, const int* bounds, const int32_t* kk, int ksize,
                         int out_w);
// Vertical pass of one output row: dst[i] = clip(bias + sum_t src[t*stride + i] * k[t]), i < len.
// acc: len int32 of scratch (the portable version's accumulators).
using VKernel = void (*)(const uint8_t* src, size_t stride, int n, const int32_t* k, uint8_t* dst, size_t len,
                         int32_t* acc);

inline void store_batch(const uint8_t* v, uint8_t* const* out, int xx) {
  for (int r = 0; r < kB; ++r)
    if (out[r]) std::memcpy(out[r] + 3 * static_cast<size_t>(xx), v + 3 * r, 3);
}

// The portable kernels take the columns widened to int32 (build_q32: 64 bytes per column, after
// which the byte columns are kept), so the inner loop is a plain 16-lane int32 multiply-add that
// compilers map to NEON / SSE4.1 vectors.
void build_q32(const uint8_t* const* rows, int w, uint8_t* q) {
  const size_t n = 16 * static_cast<size_t>(w);
  uint8_t* b = q + 4 * n;
  build_q(rows, w, b);
  int32_t* d = reinterpret_cast<int32_t*>(q);
  for (size_t i = 0; i < n; ++i) d[i] = b[i];
}

#if defined(__GNUC__)
typedef int32_t v4i32 __attribute__((vector_size(16)));

void h_generic(const uint8_t* q, uint8_t* const* out, const int* bounds, const int32_t* kk, int ksize, int out_w) {
  const int32_t* q32 = reinterpret_cast<const int32_t*>(q);
  for (int xx = 0; xx < out_w; ++xx) {
    const int xmin = bounds[2 * xx], n = bounds[2 * xx + 1];
    const int32_t* k = kk + static_cast<size_t>(xx) * ksize;
    const int32_t* p = q32 + 16 * static_cast<size_t>(xmin);
    v4i32 a0 = {kBias, kBias, kBias, kBias}, a1 = a0, a2 = a0, a3 = a0;
    for (int t = 0; t < n; ++t, p += 16) {
      const v4i32 kt = {k[t], k[t], k[t], k[t]};
      v4i32 s0, s1, s2, s3;
      std::memcpy(&s0, p, 16);
      std::memcpy(&s1, p + 4, 16);
      std::memcpy(&s2, p + 8, 16);
      std::memcpy(&s3, p + 12, 16);
      a0 += s0 * kt;
      a1 += s1 * kt;
      a2 += s2 * kt;
      a3 += s3 * kt;
    }
    int32_t a[16];
    std::memcpy(a, &a0, 16);
    std::memcpy(a + 4, &a1, 16);
    std::memcpy(a + 8, &a2, 16);
    std::memcpy(a + 12, &a3, 16);
    uint8_t v[16];
    for (int i = 0; i < 16; ++i) v[i] = clip8(a[i]);
    store_batch(v, out, xx);
  }
}
#else
void h_generic(const uint8_t* q, uint8_t* const* out, const int* bounds, const int32_t* kk, int ksize, int out_w) {
  const int32_t* q32 = reinterpret_cast<const int32_t*>(q);
  for (int xx = 0; xx < out_w; ++xx) {
    const int xmin = bounds[2 * xx], n = bounds[2 * xx + 1];
    const int32_t* k = kk + static_cast<size_t>(xx) * ksize;
    const int32_t* p = q32 + 16 * static_cast<size_t>(xmin);
    int32_t a[16];
    for (int i = 0; i < 16; ++i) a[i] = kBias;
    for (int t = 0; t < n; ++t, p += 16)
      for (int i = 0; i < 16; ++i) a[i] += p[i] * k[t];
    uint8_t v[16];
    for (int i = 0; i < 16; ++i) v[i] = clip8(a[i]);
    store_batch(v, out, xx);
  }
}
#endif

void v_generic(const uint8_t* src, size_t stride, int n, const int32_t* k, uint8_t* dst, size_t len, int32_t* acc) {
  for (size_t i = 0; i < len; ++i) acc[i] = kBias;
  for (int t = 0; t < n; ++t) {
    const uint8_t* s = src + static_cast<size_t>(t) * stride;
    const int32_t kt = k[t];
    for (size_t i = 0; i < len; ++i) acc[i] += s[i] * kt;
  }
  for (size_t i = 0; i < len; ++i) dst[i] = clip8(acc[i]);
}

#ifdef HIWIN_X86_SIMD
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_* helpers
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// the last len % block bytes of a vertical row
void v_tail(const uint8_t* src, size_t stride, int n, const int32_t* k, uint8_t* dst, size_t from, size_t len) {
  for (size_t i = from; i < len; ++i) {
    int32_t a = kBias;
    for (int t = 0; t < n; ++t) a += src[static_cast<size_t>(t) * stride + i] * k[t];
    dst[i] = clip8(a);
  }
}

__attribute__((target("avx2"))) void h_avx2(const uint8_t* q, uint8_t* const* out, const int* bounds,
                                             const int32_t* kk, int ksize, int out_w) {
  const __m256i bias = _mm256_set1_epi32(kBias);
  alignas(16) uint8_t v[16];
  for (int xx = 0; xx < out_w; ++xx) {
    const int xmin = bounds[2 * xx], n = bounds[2 * xx + 1];
    const int32_t* k = kk + static_cast<size_t>(xx) * ksize;
    const uint8_t* p = q + 16 * static_cast<size_t>(xmin);
    __m256i a0 = bias, a1 = bias;
    for (int t = 0; t < n; ++t) {
      const __m256i kt = _mm256_set1_epi32(k[t]);
      const __m128i s = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * t));
      a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(s), kt));
      a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(s, 8)), kt));
    }
    a0 = _mm256_srai_epi32(a0, kPrecisionBits);
    a1 = _mm256_srai_epi32(a1, kPrecisionBits);
    // (sum >> 22) is within int16; packs keeps it, packus clamps to 0..255 like clip8
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a0, a1), 0xD8);
    _mm_store_si128(reinterpret_cast<__m128i*>(v),
                    _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
    store_batch(v, out, xx);
  }
}

__attribute__((target("avx2"))) void v_avx2(const uint8_t* src, size_t stride, int n, const int32_t* k, uint8_t* dst,
                                            size_t len, int32_t*) {
  const __m256i bias = _mm256_set1_epi32(kBias);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  size_t i = 0;
  for (; i + 32 <= len; i += 32) {
    __m256i a0 = bias, a1 = bias, a2 = bias, a3 = bias;
    const uint8_t* s = src + i;
    for (int t = 0; t < n; ++t, s += stride) {
      const __m256i kt = _mm256_set1_epi32(k[t]);
      const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
      const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16));
      a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(lo), kt));
      a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), kt));
      a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(hi), kt));
      a3 = _mm256_add_epi32(a3, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), kt));
    }
    const __m256i p01 = _mm256_packs_epi32(_mm256_srai_epi32(a0, kPrecisionBits), _mm256_srai_epi32(a1, kPrecisionBits));
    const __m256i p23 = _mm256_packs_epi32(_mm256_srai_epi32(a2, kPrecisionBits), _mm256_srai_epi32(a3, kPrecisionBits));
    const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p01, p23), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), b);
  }
  v_tail(src, stride, n, k, dst, i, len);
}

__attribute__((target("avx512f,avx512bw"))) void h_avx512(const uint8_t* q, uint8_t* const* out, const int* bounds,
                                                           const int32_t* kk, int ksize, int out_w) {
  const __m512i bias = _mm512_set1_epi32(kBias);
  const __m512i zero = _mm512_setzero_si512(), top = _mm512_set1_epi32(255);
  alignas(16) uint8_t v[16];
  for (int xx = 0; xx < out_w; ++xx) {
    const int xmin = bounds[2 * xx], n = bounds[2 * xx + 1];
    const int32_t* k = kk + static_cast<size_t>(xx) * ksize;
    const uint8_t* p = q + 16 * static_cast<size_t>(xmin);
    __m512i a = bias;
    for (int t = 0; t < n; ++t) {
      const __m128i s = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * t));
      a = _mm512_add_epi32(a, _mm512_mullo_epi32(_mm512_cvtepu8_epi32(s), _mm512_set1_epi32(k[t])));
    }
    a = _mm512_min_epi32(_mm512_max_epi32(_mm512_srai_epi32(a, kPrecisionBits), zero), top);
    _mm_store_si128(reinterpret_cast<__m128i*>(v), _mm512_cvtepi32_epi8(a));
    store_batch(v, out, xx);
  }
}

__attribute__((target("avx512f,avx512bw"))) inline __m128i narrow512(__m512i a, __m512i zero, __m512i top) {
  return _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(_mm512_srai_epi32(a, kPrecisionBits), zero), top));
}

__attribute__((target("avx512f,avx512bw"))) void v_avx512(const uint8_t* src, size_t stride, int n, const int32_t* k,
                                                           uint8_t* dst, size_t len, int32_t*) {
  const __m512i bias = _mm512_set1_epi32(kBias);
  const __m512i zero = _mm512_setzero_si512(), top = _mm512_set1_epi32(255);
  size_t i = 0;
  for (; i + 64 <= len; i += 64) {
    __m512i a0 = bias, a1 = bias, a2 = bias, a3 = bias;
    const uint8_t* s = src + i;
    for (int t = 0; t < n; ++t, s += stride) {
      const __m512i kt = _mm512_set1_epi32(k[t]);
      a0 = _mm512_add_epi32(a0, _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s))), kt));
      a1 = _mm512_add_epi32(a1, _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16))), kt));
      a2 = _mm512_add_epi32(a2, _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 32))), kt));
      a3 = _mm512_add_epi32(a3, _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 48))), kt));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), narrow512(a0, zero, top));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i + 16), narrow512(a1, zero, top));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i + 32), narrow512(a2, zero, top));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i + 48), narrow512(a3, zero, top));
  }
  v_tail(src, stride, n, k, dst, i, len);
}
#pragma GCC diagnostic pop
#endif

using QBuilder = void (*)(const uint8_t* const* rows, int w, uint8_t* q);

struct Kernels {
  const char* name;
  QBuilder q;     // the columns' layout this h kernel reads
  size_t q_bytes;  // per source pixel
  HKernel h;
  VKernel v;
};

Kernels pick_kernels() {
  Kernels g{"generic", build_q32, 80, h_generic, v_generic};
#ifdef HIWIN_X86_SIMD
  const char* env = std::getenv("HIWIN_SIMD");
  const std::string want = env ? env : "";
  if (want == "generic") return g;
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  if (avx512 && want != "avx2") return {"avx512", build_q, 16, h_avx512, v_avx512};
  if (avx2) return {"avx2", build_q, 16, h_avx2, v_avx2};
#endif
  return g;
}

const Kernels& kernels() {
  static const Kernels k = pick_kernels();
  return k;
}

// ------------------------------------------------------------------------------ passes
inline uint8_t* row_of(Rgb8& img, int y) { return img.data.data() + static_cast<size_t>(y) * img.width * 3; }
inline const uint8_t* row_of(const Rgb8& img, int y) {
  return img.data.data() + static_cast<size_t>(y) * img.width * 3;
}

Rgb8 blank(int w, int h) {
  Rgb8 r;
  r.width = w;
  r.height = h;
  r.data.resize(static_cast<size_t>(w) * h * 3);
  return r;
}

// output rows [y0, y1) of a vertical pass over src (coefficient rows relative to src row `offset`)
void vertical_rows(const Rgb8& src, int offset, const Coeffs& c, Rgb8& out, int y0, int y1, int32_t* acc) {
  const size_t stride = static_cast<size_t>(src.width) * 3;
  const VKernel vk = kernels().v;
  for (int yy = y0; yy < y1; ++yy) {
    const int ymin = c.bounds[2 * yy] - offset, n = c.bounds[2 * yy + 1];
    vk(src.data.data() + static_cast<size_t>(ymin) * stride, stride, n, &c.k[static_cast<size_t>(yy) * c.ksize],
       row_of(out, yy), stride, acc);
  }
}

}  // namespace

// ------------------------------------------------------------------------------ Resizer
struct Resizer::Impl {
  enum class Kind { Copy, HFirst, VFirst, VOnly };
  struct One {
    Kind kind = Kind::Copy;
    int out_w = 0, out_h = 0;
    bool need_v = false;
    Coeffs ch, cv;
    int first = 0, last = 0;  // HFirst: the source rows its horizontal pass covers
    Rgb8 tmp;                 // HFirst + vertical: out_w x (last - first); VFirst: in_w x out_h
    Rgb8 out;
  };
  int in_w = 0, in_h = 0;
  std::vector<One> ones;
  std::vector<int> hsrc;                // the resizes that start with a horizontal pass over the source
  std::vector<Bytes> q;                 // per slot: the kernels' columns of a batch
  std::vector<std::vector<int32_t>> acc;  // per slot: the widest vertical row (portable kernel)
  size_t widest = 0;

  // the horizontal passes (of `which`) of one batch of rows of a source `w` pixels wide
  void hbatch(const std::vector<int>& which, int y0, int h, int w, const uint8_t* const* rows, int slot,
              bool from_tmp) {
    const int valid = h - y0 < kB ? h - y0 : kB;
    const uint8_t* r5[kB];
    for (int r = 0; r < kB; ++r) r5[r] = rows[r < valid ? r : valid - 1];
    bool built = false;
    for (int i : which) {
      One& o = ones[static_cast<size_t>(i)];
      if (o.kind == Kind::Copy) {
        for (int r = 0; r < valid; ++r) std::memcpy(row_of(o.out, y0 + r), r5[r], static_cast<size_t>(w) * 3);
        continue;
      }
      uint8_t* dst[kB];
      bool any = false;
      for (int r = 0; r < kB; ++r) {
        const int y = y0 + r;
        dst[r] = nullptr;
        if (r >= valid) continue;
        if (from_tmp) dst[r] = row_of(o.out, y);
        else if (y >= o.first && y < o.last) dst[r] = o.need_v ? row_of(o.tmp, y - o.first) : row_of(o.out, y);
        any = any || dst[r];
      }
      if (!any) continue;
      if (!built) {
        kernels().q(r5, w, q[static_cast<size_t>(slot)].data());
        built = true;
      }
      kernels().h(q[static_cast<size_t>(slot)].data(), dst, o.ch.bounds.data(), o.ch.k.data(), o.ch.ksize, o.out_w);
    }
  }
};

Resizer::Resizer(int in_w, int in_h, const std::vector<std::pair<int, int>>& sizes, bool pillow13_order)
    : m_(new Impl()) {
  std::unique_ptr<Impl> guard(m_);
  if (in_w < 1 || in_h < 1) throw Error(HIWIN_INVALID_ARGUMENT, "resize of an empty image");
  m_->in_w = in_w;
  m_->in_h = in_h;
  m_->widest = static_cast<size_t>(in_w) * 3;
  for (const auto& s : sizes) {
    const int out_w = s.first, out_h = s.second;
    if (out_w < 1 || out_h < 1) throw Error(HIWIN_INVALID_ARGUMENT, "resize to an empty size");
    Impl::One o;
    o.out_w = out_w;
    o.out_h = out_h;
    const bool need_h = out_w != in_w, need_v = out_h != in_h;
    // Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice as many
    // pixels as the width does (python-pillow/Pillow#9549); the rounding of the 8-bit intermediate
    // depends on the order, so it must be the same order.
    const bool vertical_first = pillow13_order && need_h && need_v && out_h < in_h &&
                                static_cast<int64_t>(in_h) - out_h > 2 * (static_cast<int64_t>(in_w) - out_w);
    if (need_h) o.ch = precompute(in_w, 0.0, in_w, out_w);
    if (need_v) o.cv = precompute(in_h, 0.0, in_h, out_h);
    o.need_v = need_v;
    if (!need_h && !need_v) {
      o.kind = Impl::Kind::Copy;  // Image.resize returns a copy
    } else if (!need_h) {
      o.kind = Impl::Kind::VOnly;
    } else if (vertical_first) {
      o.kind = Impl::Kind::VFirst;
      o.tmp = blank(in_w, out_h);
    } else {
      o.kind = Impl::Kind::HFirst;
      o.first = need_v ? o.cv.bounds[0] : 0;
      o.last = need_v ? o.cv.bounds[out_h * 2 - 2] + o.cv.bounds[out_h * 2 - 1] : in_h;
      if (need_v) o.tmp = blank(out_w, o.last - o.first);
      if (need_v && static_cast<size_t>(out_w) * 3 > m_->widest) m_->widest = static_cast<size_t>(out_w) * 3;
    }
    o.out = blank(out_w, out_h);
    if (o.kind == Impl::Kind::HFirst || o.kind == Impl::Kind::Copy) m_->hsrc.push_back(static_cast<int>(m_->ones.size()));
    m_->ones.push_back(std::move(o));
  }
  guard.release();
}

Resizer::~Resizer() { delete m_; }

bool Resizer::row_fed() const {
  for (const auto& o : m_->ones)
    if (o.kind != Impl::Kind::Copy && o.kind != Impl::Kind::HFirst) return false;
  return true;
}

int Resizer::num_batches() const { return (m_->in_h + kB - 1) / kB; }

void Resizer::prepare_threads(int threads) {
  const size_t n = static_cast<size_t>(threads < 1 ? 1 : threads);
  while (m_->q.size() < n) m_->q.emplace_back(static_cast<size_t>(m_->in_w) * kernels().q_bytes);
  if (std::strcmp(kernels().name, "generic") == 0)
    while (m_->acc.size() < n) m_->acc.emplace_back(m_->widest);
  while (m_->acc.size() < n) m_->acc.emplace_back();
}

void Resizer::batch(int b, const uint8_t* const* rows, int slot) {
  m_->hbatch(m_->hsrc, b * kB, m_->in_h, m_->in_w, rows, slot, false);
}

namespace {
constexpr int kRowsPerTask = 8;  // vertical-pass output rows per work item
}

std::vector<Rgb8> Resizer::finish(int threads) {
  // the vertical passes of the horizontal-first resizes, in chunks of output rows
  std::vector<std::pair<int, int>> tasks;  // (resize, first output row)
  for (size_t i = 0; i < m_->ones.size(); ++i) {
    const auto& o = m_->ones[i];
    if (o.kind == Impl::Kind::HFirst && o.need_v)
      for (int y = 0; y < o.out_h; y += kRowsPerTask) tasks.emplace_back(static_cast<int>(i), y);
  }
  prepare_threads(threads);
  parallel_for(threads, static_cast<int>(tasks.size()), [&](int t, int slot) {
    auto& o = m_->ones[static_cast<size_t>(tasks[t].first)];
    const int y0 = tasks[t].second, y1 = std::min(y0 + kRowsPerTask, o.out_h);
    vertical_rows(o.tmp, o.first, o.cv, o.out, y0, y1, m_->acc[static_cast<size_t>(slot)].data());
  });
  std::vector<Rgb8> out;
  for (auto& o : m_->ones) {
    o.tmp = Rgb8();
    out.push_back(std::move(o.out));
  }
  return out;
}

std::vector<Rgb8> Resizer::run(const Rgb8& src, int threads) {
  if (src.width != m_->in_w || src.height != m_->in_h) throw Error(HIWIN_INTERNAL, "Resizer: source size mismatch");
  prepare_threads(threads);
  // phase 1: horizontal batches of the source (horizontal-first resizes, copies) and vertical passes
  // of the source (vertical-first and vertical-only resizes); phase 2: the rest
  const std::vector<int>& hsrc = m_->hsrc;
  struct Task {
    int kind;  // 0: source batch, 1: vertical rows of the source, 2: horizontal batch of a VFirst tmp
    int one, y;
  };
  std::vector<Task> p1, p2;
  if (!hsrc.empty())
    for (int b = 0; b < num_batches(); ++b) p1.push_back({0, -1, b});
  for (size_t i = 0; i < m_->ones.size(); ++i) {
    const auto& o = m_->ones[i];
    if (o.kind == Impl::Kind::VFirst || o.kind == Impl::Kind::VOnly)
      for (int y = 0; y < o.out_h; y += kRowsPerTask) p1.push_back({1, static_cast<int>(i), y});
    if (o.kind == Impl::Kind::VFirst)
      for (int y = 0; y < o.out_h; y += kB) p2.push_back({2, static_cast<int>(i), y});
  }
  parallel_for(threads, static_cast<int>(p1.size()), [&](int t, int slot) {
    const Task& k = p1[static_cast<size_t>(t)];
    if (k.kind == 0) {
      const uint8_t* rows[kB];
      for (int r = 0; r < kB; ++r) rows[r] = row_of(src, std::min(k.y * kB + r, m_->in_h - 1));
      m_->hbatch(hsrc, k.y * kB, m_->in_h, m_->in_w, rows, slot, false);
    } else {
      auto& o = m_->ones[static_cast<size_t>(k.one)];
      Rgb8& dst = o.kind == Impl::Kind::VFirst ? o.tmp : o.out;
      vertical_rows(src, 0, o.cv, dst, k.y, std::min(k.y + kRowsPerTask, o.out_h), m_->acc[static_cast<size_t>(slot)].data());
    }
  });
  parallel_for(threads, static_cast<int>(p2.size()), [&](int t, int slot) {
    const Task& k = p2[static_cast<size_t>(t)];
    auto& o = m_->ones[static_cast<size_t>(k.one)];
    const uint8_t* rows[kB];
    for (int r = 0; r < kB; ++r) rows[r] = row_of(o.tmp, std::min(k.y + r, o.out_h - 1));
    m_->hbatch({k.one}, k.y, o.out_h, m_->in_w, rows, slot, true);
  });
  return finish(threads);
}

Rgb8 resize_bicubic(const Rgb8& in, int out_w, int out_h, bool pillow13_order, int threads) {
  if (out_w < 1 || out_h < 1) throw Error(HIWIN_INVALID_ARGUMENT, "resize to an empty size");
  Resizer r(in.width, in.height, {{out_w, out_h}}, pillow13_order);
  Rgb8 out = std::move(r.run(in, threads)[0]);
  out.source_mode = in.source_mode;
  return out;
}

const char* simd_level() { return kernels().name; }

void crop_into(const Rgb8& in, int left, int top, Rgb8& out) {
  const int w = out.width, h = out.height;
  if (left < 0 || top < 0 || left + w > in.width || top + h > in.height || out.data.size() != static_cast<size_t>(w) * h * 3)
    throw Error(HIWIN_INTERNAL, "crop box outside the image");
  for (int y = 0; y < h; ++y)
    std::memcpy(out.data.data() + static_cast<size_t>(y) * w * 3,
                in.data.data() + (static_cast<size_t>(top + y) * in.width + left) * 3, static_cast<size_t>(w) * 3);
}

}  // namespace hiwin
