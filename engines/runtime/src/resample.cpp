// Pillow's BICUBIC resize (libImaging/Resample.c semantics) re-implemented for packed RGB8:
// separable, horizontal pass first; per output pixel a window of support 2 * max(scale, 1)
// (the filter is stretched when down-sampling, i.e. antialiased), float64 weights normalised to
// sum 1, then rounded to 22-bit fixed point; 8-bit accumulation with a rounding bias, the sum
// shifted back and clamped to 0..255. Same arithmetic in the same order gives the same bytes.
// The pass order follows the installed Pillow's rule (see resize_bicubic).
#include <cmath>
#include <cstring>

#include "internal.h"

namespace hiwin {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;

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

// Dot product of `n` 8-bit samples (widened to int32) with fixed-point weights. Integer sums are
// exact and associative, so the compiler may vectorise the reduction without changing the result.
inline int32_t dot(const int32_t* x, const int32_t* k, int n) {
  int32_t s = 0;
  for (int i = 0; i < n; ++i) s += x[i] * k[i];
  return s;
}

// On x86-64 Linux (GCC) the hot loops are also compiled for AVX2 and picked at load time; the
// arithmetic is integer, so every variant gives the same bytes.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && !defined(__SANITIZE_ADDRESS__)
#define HIWIN_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define HIWIN_CLONES
#endif

// one output row of the horizontal pass from planar int32 channels
HIWIN_CLONES void hrow(int32_t* const* pl, uint8_t* dst, const int* bounds, const int32_t* kk, int ksize, int out_w) {
  const int32_t bias = 1 << (kPrecisionBits - 1);
  for (int xx = 0; xx < out_w; ++xx) {
    const int xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1];
    const int32_t* k = kk + static_cast<size_t>(xx) * ksize;
    for (int ch = 0; ch < 3; ++ch) dst[xx * 3 + ch] = clip8(bias + dot(pl[ch] + xmin, k, xmax));
  }
}

// acc[i] += src[i] * w over a row (the vertical pass)
HIWIN_CLONES void axpy(int32_t* acc, const uint8_t* src, int32_t w, size_t n) {
  for (size_t i = 0; i < n; ++i) acc[i] += src[i] * w;
}

// rows [row0, row0 + nrows) of `in` resampled horizontally into out (out_w x nrows). Each row is
// split into planar int32 channels first, so every output sample is one contiguous dot product.
void horizontal(const Rgb8& in, int row0, int nrows, int out_w, const Coeffs& c, Rgb8& out) {
  out.width = out_w;
  out.height = nrows;
  out.data.assign(static_cast<size_t>(out_w) * nrows * 3, 0);
  const size_t in_stride = static_cast<size_t>(in.width) * 3, out_stride = static_cast<size_t>(out_w) * 3;
  std::vector<int32_t> planes(static_cast<size_t>(in.width) * 3);
  int32_t* pl[3] = {planes.data(), planes.data() + in.width, planes.data() + 2 * static_cast<size_t>(in.width)};
  for (int y = 0; y < nrows; ++y) {
    const uint8_t* src = in.data.data() + static_cast<size_t>(row0 + y) * in_stride;
    for (int x = 0; x < in.width; ++x) {
      pl[0][x] = src[3 * x];
      pl[1][x] = src[3 * x + 1];
      pl[2][x] = src[3 * x + 2];
    }
    hrow(pl, out.data.data() + static_cast<size_t>(y) * out_stride, c.bounds.data(), c.k.data(), c.ksize, out_w);
  }
}

// vertical pass; bounds relative to row `offset` of `in`
void vertical(const Rgb8& in, int offset, int out_h, const Coeffs& c, Rgb8& out) {
  out.width = in.width;
  out.height = out_h;
  const size_t stride = static_cast<size_t>(in.width) * 3;
  out.data.assign(stride * out_h, 0);
  std::vector<int32_t> acc(stride);
  for (int yy = 0; yy < out_h; ++yy) {
    const int ymin = c.bounds[yy * 2] - offset, ymax = c.bounds[yy * 2 + 1];
    const int32_t* k = &c.k[static_cast<size_t>(yy) * c.ksize];
    std::fill(acc.begin(), acc.end(), 1 << (kPrecisionBits - 1));
    for (int y = 0; y < ymax; ++y) {
      const uint8_t* src = in.data.data() + static_cast<size_t>(ymin + y) * stride;
      axpy(acc.data(), src, k[y], stride);  // integer sums: order-independent
    }
    uint8_t* dst = out.data.data() + static_cast<size_t>(yy) * stride;
    for (size_t i = 0; i < stride; ++i) dst[i] = clip8(acc[i]);
  }
}

}  // namespace

Rgb8 resize_bicubic(const Rgb8& in, int out_w, int out_h, bool pillow13_order) {
  if (out_w < 1 || out_h < 1) throw Error(HIWIN_INVALID_ARGUMENT, "resize to an empty size");
  if (in.width == out_w && in.height == out_h) return in;  // Image.resize returns a copy
  const bool need_h = out_w != in.width, need_v = out_h != in.height;
  Coeffs ch = precompute(in.width, 0.0, in.width, out_w);
  Coeffs cv = precompute(in.height, 0.0, in.height, out_h);
  const int ybox_first = cv.bounds[0];
  const int ybox_last = cv.bounds[out_h * 2 - 2] + cv.bounds[out_h * 2 - 1];
  Rgb8 tmp, out;
  // Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice as many
  // pixels as the width does (python-pillow/Pillow#9549); the rounding of the 8-bit intermediate
  // depends on the order, so it must be the same order.
  const bool vertical_first = pillow13_order && need_h && need_v && out_h < in.height &&
                              static_cast<int64_t>(in.height) - out_h > 2 * (static_cast<int64_t>(in.width) - out_w);
  if (vertical_first) {
    vertical(in, 0, out_h, cv, tmp);
    horizontal(tmp, 0, out_h, out_w, ch, out);
  } else if (need_h) {
    if (need_v) {
      horizontal(in, ybox_first, ybox_last - ybox_first, out_w, ch, tmp);
      vertical(tmp, ybox_first, out_h, cv, out);
    } else {
      horizontal(in, 0, in.height, out_w, ch, out);
    }
  } else {
    vertical(in, 0, out_h, cv, out);
  }
  return out;
}

struct StreamedResize::Impl {
  Coeffs ch, cv;
  int in_w = 0, out_w = 0, out_h = 0, first = 0, last = 0;
  bool need_v = false;
  Rgb8 tmp;
  std::vector<int32_t> planes;
};

StreamedResize::StreamedResize(int in_w, int in_h, int out_w, int out_h, bool pillow13_order) {
  if (out_w < 1 || out_h < 1 || in_w < 1 || in_h < 1) return;
  const bool need_h = out_w != in_w, need_v = out_h != in_h;
  const bool vertical_first = pillow13_order && need_h && need_v && out_h < in_h &&
                              static_cast<int64_t>(in_h) - out_h > 2 * (static_cast<int64_t>(in_w) - out_w);
  if (!need_h || vertical_first) return;  // resize_bicubic on the whole image instead
  impl_ = new Impl();
  impl_->ch = precompute(in_w, 0.0, in_w, out_w);
  impl_->cv = precompute(in_h, 0.0, in_h, out_h);
  impl_->in_w = in_w;
  impl_->out_w = out_w;
  impl_->out_h = out_h;
  impl_->need_v = need_v;
  impl_->first = need_v ? impl_->cv.bounds[0] : 0;
  impl_->last = need_v ? impl_->cv.bounds[out_h * 2 - 2] + impl_->cv.bounds[out_h * 2 - 1] : in_h;
  impl_->tmp.width = out_w;
  impl_->tmp.height = impl_->last - impl_->first;
  impl_->tmp.data.assign(static_cast<size_t>(out_w) * impl_->tmp.height * 3, 0);
  impl_->planes.resize(static_cast<size_t>(in_w) * 3);
  streamable_ = true;
}

StreamedResize::~StreamedResize() { delete impl_; }

void split_planes(const uint8_t* src, int w, int32_t* const* pl) {
  for (int x = 0; x < w; ++x) {
    pl[0][x] = src[3 * x];
    pl[1][x] = src[3 * x + 1];
    pl[2][x] = src[3 * x + 2];
  }
}

void StreamedResize::push_row(int y, const uint8_t* src) {
  Impl& m = *impl_;
  if (y < m.first || y >= m.last) return;
  int32_t* pl[3] = {m.planes.data(), m.planes.data() + m.in_w, m.planes.data() + 2 * static_cast<size_t>(m.in_w)};
  split_planes(src, m.in_w, pl);
  push_planes(y, pl);
}

void StreamedResize::push_planes(int y, int32_t* const* pl) {
  Impl& m = *impl_;
  if (y < m.first || y >= m.last) return;
  hrow(pl, m.tmp.data.data() + static_cast<size_t>(y - m.first) * m.out_w * 3, m.ch.bounds.data(), m.ch.k.data(),
       m.ch.ksize, m.out_w);
}

Rgb8 StreamedResize::finish() {
  Impl& m = *impl_;
  if (!m.need_v) return std::move(m.tmp);
  Rgb8 out;
  vertical(m.tmp, m.first, m.out_h, m.cv, out);
  return out;
}

Rgb8 crop(const Rgb8& in, int left, int top, int w, int h) {
  if (left < 0 || top < 0 || left + w > in.width || top + h > in.height)
    throw Error(HIWIN_INTERNAL, "crop box outside the image");
  Rgb8 out;
  out.width = w;
  out.height = h;
  out.data.resize(static_cast<size_t>(w) * h * 3);
  for (int y = 0; y < h; ++y)
    std::memcpy(out.data.data() + static_cast<size_t>(y) * w * 3,
                in.data.data() + (static_cast<size_t>(top + y) * in.width + left) * 3, static_cast<size_t>(w) * 3);
  return out;
}

}  // namespace hiwin
