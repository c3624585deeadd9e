// The slicing plan of LLaVA-UHD v2 (docs/model.md section 1), the same float64 expressions as
// hiwin_runtime/slicing.py in the same order, so every truncation lands where Python's does.
// Built with -ffp-contract=off: no fused multiply-add may change a rounding.
#include <cmath>
#include <limits>
#include <string>

#include "internal.h"

namespace hiwin {
namespace {

constexpr int kMinCropPatches = 2;

// ensure_divide(length, p) = max(floor(length / p) * p, p)
int64_t ensure_divide(double length, int p) {
  double q = std::floor(length / static_cast<double>(p));
  int64_t v = static_cast<int64_t>(q) * p;
  return v > p ? v : p;
}

// best_resize with integer (w, h): Python compares the int product exactly.
std::pair<int64_t, int64_t> best_resize_int(int64_t w, int64_t h, int s, int p, bool allow_upscale) {
  if (w * h > static_cast<int64_t>(s) * s || allow_upscale) {
    double r = static_cast<double>(w) / static_cast<double>(h);
    int64_t nh = static_cast<int64_t>(static_cast<double>(s) / std::sqrt(r));
    int64_t nw = static_cast<int64_t>(static_cast<double>(nh) * r);
    return {ensure_divide(static_cast<double>(nw), p), ensure_divide(static_cast<double>(nh), p)};
  }
  return {ensure_divide(static_cast<double>(w), p), ensure_divide(static_cast<double>(h), p)};
}

// best_resize with float (w, h) (refine_size passes rw / gx, rh / gy), always allow_upscale.
std::pair<int64_t, int64_t> best_resize_float(double w, double h, int s, int p) {
  double r = w / h;
  int64_t nh = static_cast<int64_t>(static_cast<double>(s) / std::sqrt(r));
  int64_t nw = static_cast<int64_t>(static_cast<double>(nh) * r);
  return {ensure_divide(static_cast<double>(nw), p), ensure_divide(static_cast<double>(nh), p)};
}

bool choose_grid(int64_t w, int64_t h, int s, int max_slices, int& cols, int& rows) {
  double log_ratio = std::log(static_cast<double>(w) / static_cast<double>(h));
  double ratio = static_cast<double>(w * h) / static_cast<double>(static_cast<int64_t>(s) * s);
  double c = std::ceil(ratio);
  int64_t multiple = c > static_cast<double>(max_slices) ? max_slices : static_cast<int64_t>(c);
  if (multiple <= 1) return false;
  int best_m = 1, best_n = 1;
  double best_err = std::numeric_limits<double>::infinity();
  for (int64_t n = multiple - 1; n <= multiple + 1; ++n) {
    if (n == 1 || n > max_slices) continue;
    for (int64_t m = 1; m <= n; ++m) {
      if (n % m) continue;
      double err = std::fabs(log_ratio - std::log(static_cast<double>(m) / static_cast<double>(n / m)));
      if (err < best_err) {
        best_m = static_cast<int>(m);
        best_n = static_cast<int>(n / m);
        best_err = err;
      }
    }
  }
  cols = best_m;
  rows = best_n;
  return true;
}

int checked_int(int64_t v, const char* what) {
  if (v > std::numeric_limits<int>::max() || v < 0)
    throw Error(HIWIN_BAD_GEOMETRY, std::string(what) + " is out of range (" + std::to_string(v) + ")");
  return static_cast<int>(v);
}

}  // namespace

Plan plan_slices(int w, int h, int max_slices, int s, int p) {
  if (w < 1 || h < 1)
    throw Error(HIWIN_BAD_IMAGE, "image has no pixels (" + std::to_string(w) + "x" + std::to_string(h) + ")");
  if (max_slices < 1)
    throw Error(HIWIN_INVALID_ARGUMENT, "max_slices must be >= 1, got " + std::to_string(max_slices));
  if (s < 1 || p < 1)
    throw Error(HIWIN_INVALID_ARGUMENT, "scale_resolution and patch_size must be >= 1");
  Plan plan;
  plan.image_w = w;
  plan.image_h = h;
  int cols = 0, rows = 0;
  if (!choose_grid(w, h, s, max_slices, cols, rows)) {
    auto ov = best_resize_int(w, h, s, p, true);
    plan.overview_w = checked_int(ov.first, "overview width");
    plan.overview_h = checked_int(ov.second, "overview height");
  } else {
    auto ov = best_resize_int(w, h, s, p, false);
    plan.overview_w = checked_int(ov.first, "overview width");
    plan.overview_h = checked_int(ov.second, "overview height");
    // refine_size
    int64_t rw = ensure_divide(static_cast<double>(w), cols), rh = ensure_divide(static_cast<double>(h), rows);
    auto b = best_resize_float(static_cast<double>(rw) / cols, static_cast<double>(rh) / rows, s, p);
    int64_t refined_w = b.first * cols, refined_h = b.second * rows;
    plan.cols = cols;
    plan.rows = rows;
    plan.refined_w = checked_int(refined_w, "refined width");
    plan.refined_h = checked_int(refined_h, "refined height");
    plan.slice_w = checked_int(static_cast<int64_t>(static_cast<double>(refined_w) / cols), "slice width");
    plan.slice_h = checked_int(static_cast<int64_t>(static_cast<double>(refined_h) / rows), "slice height");
  }
  // _check_crops: slices first, then the overview (the first offender is named, as in Python)
  auto check = [&](int cw, int ch) {
    if ((cw < ch ? cw : ch) < kMinCropPatches * p)
      throw Error(HIWIN_BAD_GEOMETRY,
                  "image of " + std::to_string(w) + "x" + std::to_string(h) +
                      " has an aspect ratio too extreme for LLaVA-UHD v2: it yields a " + std::to_string(cw) +
                      "x" + std::to_string(ch) + " px crop, and the JBU up-sampler needs at least " +
                      std::to_string(kMinCropPatches * p) + " px per side. Crop or pad the image first.");
  };
  if (plan.cols) check(plan.slice_w, plan.slice_h);
  check(plan.overview_w, plan.overview_h);
  return plan;
}

std::pair<int, int> pre_resize_size(int w, int h, int long_side) {
  int nw, nh;
  if (w > h) {
    nw = long_side;
    nh = static_cast<int>((static_cast<double>(long_side) / w) * h);
  } else {
    nh = long_side;
    nw = static_cast<int>((static_cast<double>(long_side) / h) * w);
  }
  if (nw > w) return {nw, nh};
  return {0, 0};
}

std::pair<int, int> BucketRule::bucket(int width, int height) const {
  if (width < 1 || height < 1)
    throw Error(HIWIN_INVALID_ARGUMENT, "bucket of a feature map with no patches (" + std::to_string(width) + "x" +
                                            std::to_string(height) + ")");
  double log_r = std::log(static_cast<double>(width) / static_cast<double>(height));
  double best_err = std::numeric_limits<double>::infinity();
  std::pair<int, int> best{-1, -1};
  for (const auto& c : candidates_wh) {
    double err = std::fabs(log_r - std::log(static_cast<double>(c.first) / static_cast<double>(c.second)));
    if (err < best_err) {
      best = {c.second, c.first};
      best_err = err;
    }
  }
  if (best.first < 0) throw Error(HIWIN_BAD_MANIFEST, "bucket rule has no candidates");
  return best;
}

size_t num_image_tokens(int cols, int rows, int queries) {
  if (cols == 0 && rows == 0) return static_cast<size_t>(queries);
  int g = static_cast<int>(std::lround(std::sqrt(static_cast<double>(queries))));
  return static_cast<size_t>(rows) * g * (static_cast<size_t>(cols) * g + 1) + 1 + queries;
}

std::vector<int64_t> layout_indices(int cols, int rows, int num_crops, int queries) {
  if (queries < 1) throw Error(HIWIN_INVALID_ARGUMENT, "queries must be >= 1");
  int g = static_cast<int>(std::lround(std::sqrt(static_cast<double>(queries))));
  if (g * g != queries)
    throw Error(HIWIN_INVALID_ARGUMENT, "crops carry " + std::to_string(queries) + " tokens each, not a square grid");
  std::vector<int64_t> out;
  if (cols == 0 && rows == 0) {
    if (num_crops != 1)
      throw Error(HIWIN_INVALID_ARGUMENT,
                  "no slice grid but " + std::to_string(num_crops) + " crops (expected the overview alone)");
    for (int i = 0; i < queries; ++i) out.push_back(i);
    return out;
  }
  if (cols < 1 || rows < 1)
    throw Error(HIWIN_INVALID_ARGUMENT, "grid must be cols, rows >= 1 (or 0, 0 for no grid)");
  if (num_crops != cols * rows + 1)
    throw Error(HIWIN_INVALID_ARGUMENT, "grid " + std::to_string(cols) + "x" + std::to_string(rows) + " needs " +
                                            std::to_string(cols * rows + 1) + " crops, got " +
                                            std::to_string(num_crops));
  const int64_t newline = static_cast<int64_t>(num_crops) * queries, comma = newline + 1;
  out.reserve(num_image_tokens(cols, rows, queries));
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < g; ++i) {
      for (int c = 0; c < cols; ++c)
        for (int j = 0; j < g; ++j) out.push_back(static_cast<int64_t>(r * cols + c) * queries + i * g + j);
      out.push_back(newline);
    }
  out.push_back(cols > 1 ? comma : newline);
  for (int64_t k = static_cast<int64_t>(num_crops - 1) * queries; k < static_cast<int64_t>(num_crops) * queries; ++k)
    out.push_back(k);
  return out;
}

}  // namespace hiwin
