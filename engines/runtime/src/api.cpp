// The C API: handles, statuses, and the preprocessing pipeline of hiwin_runtime.processor
// (load_image -> optional pre-resize -> plan -> BICUBIC resizes -> crops -> normalise).
#include <cmath>
#include <cstring>
#include <fstream>
#include <mutex>
#include <new>
#include <sstream>
#include <condition_variable>
#include <exception>
#include <system_error>
#include <thread>

#include "backend.h"
#include "internal.h"

#ifndef HIWIN_VERSION_STRING
#define HIWIN_VERSION_STRING "0.1.0"
#endif

struct hiwin_status {
  hiwin_code code;
  std::string message;
};

struct hiwin_context {
  hiwin_options opt;
  hiwin::BucketRule rule;
  std::unique_ptr<hiwin::VisionBackend> backend;
  std::mutex backend_mutex;
};

struct hiwin_image {
  hiwin::Rgb8 rgb;
};

struct hiwin_prepared {
  hiwin::Plan plan;
  std::vector<hiwin::Rgb8> crops;               // slices row-major, then the overview
  hiwin::Floats pixel_block;                    // every crop's (3, H, W) float32, one after the other
  std::vector<size_t> pixel_offset;             // where crop i starts in pixel_block
  const float* pixels(size_t i) const { return pixel_block.data() + pixel_offset[i]; }
  std::vector<std::pair<int, int>> boxes;       // left, top
  std::vector<std::pair<int, int>> buckets;     // (oh, ow)
  std::vector<int> group_of;
  std::vector<std::vector<int32_t>> groups;
};

namespace {

using hiwin::Error;

hiwin_status g_oom{HIWIN_OUT_OF_MEMORY, "out of memory (while reporting an error)"};

hiwin_status* make_status(hiwin_code code, const std::string& msg) {
  try {
    return new hiwin_status{code, msg};
  } catch (...) {
    return &g_oom;  // static: hiwin_status_free leaves it alone
  }
}

template <class F>
hiwin_status* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const Error& e) {
    return make_status(e.code, e.what());
  } catch (const std::bad_alloc&) {
    return make_status(HIWIN_OUT_OF_MEMORY, "out of memory");
  } catch (const std::exception& e) {
    return make_status(HIWIN_INTERNAL, std::string("internal error: ") + e.what());
  } catch (...) {
    return make_status(HIWIN_INTERNAL, "internal error");
  }
}

void need(const void* p, const char* what) {
  if (!p) throw Error(HIWIN_INVALID_ARGUMENT, std::string(what) + " is NULL");
}

void validate(const hiwin_options& o) {
  if (o.max_slices < 1) throw Error(HIWIN_INVALID_ARGUMENT, "max_slices must be >= 1, got " + std::to_string(o.max_slices));
  if (o.scale_resolution < 1 || o.patch_size < 1)
    throw Error(HIWIN_INVALID_ARGUMENT, "scale_resolution and patch_size must be >= 1");
  if (o.queries < 1) throw Error(HIWIN_INVALID_ARGUMENT, "queries must be >= 1");
  int g = static_cast<int>(std::lround(std::sqrt(static_cast<double>(o.queries))));
  if (g * g != o.queries) throw Error(HIWIN_INVALID_ARGUMENT, "queries must be a square number");
  if (o.max_pixels < 0) throw Error(HIWIN_INVALID_ARGUMENT, "max_pixels must be >= 0");
  if (o.resize_pass_order != HIWIN_RESIZE_PILLOW13 && o.resize_pass_order != HIWIN_RESIZE_PILLOW12)
    throw Error(HIWIN_INVALID_ARGUMENT, "resize_pass_order must be HIWIN_RESIZE_PILLOW13 or HIWIN_RESIZE_PILLOW12");
  if (o.num_threads < 0) throw Error(HIWIN_INVALID_ARGUMENT, "num_threads must be >= 0");
  if (o.pre_resize < 0) throw Error(HIWIN_INVALID_ARGUMENT, "pre_resize must be >= 0");
  for (int c = 0; c < 3; ++c)
    if (!(o.std[c] != 0.0f) || !std::isfinite(o.std[c]) || !std::isfinite(o.mean[c]))
      throw Error(HIWIN_INVALID_ARGUMENT, "mean and std must be finite and std non-zero");
}

hiwin::DecodeOptions decode_options(const hiwin_context* ctx) {
  hiwin::DecodeOptions d;
  d.max_pixels = ctx->opt.max_pixels;
  d.alpha_composite = ctx->opt.alpha_composite != 0;
  std::memcpy(d.background, ctx->opt.alpha_background, 3);
  return d;
}

void fill_plan(const hiwin::Plan& p, hiwin_plan* out) {
  out->image_width = p.image_w;
  out->image_height = p.image_h;
  out->overview_width = p.overview_w;
  out->overview_height = p.overview_h;
  out->grid_cols = p.cols;
  out->grid_rows = p.rows;
  out->refined_width = p.refined_w;
  out->refined_height = p.refined_h;
  out->slice_width = p.slice_w;
  out->slice_height = p.slice_h;
  out->num_crops = p.num_crops();
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(HIWIN_BAD_MANIFEST, path + ": not found (not a hiwin export directory)");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

int json_int(const hiwin::Json* v, int fallback, const std::string& what) {
  if (!v || v->type == hiwin::Json::Null) return fallback;
  if (v->type != hiwin::Json::Number || v->num != std::floor(v->num) || std::fabs(v->num) > 2e9)
    throw Error(HIWIN_BAD_MANIFEST, "manifest.json: " + what + " must be an integer");
  return static_cast<int>(v->num);
}

// Options from manifest.json["config"] (the keys HiwinConfig.from_dict reads) and ["language"].
void apply_manifest(const hiwin::Json& m, hiwin_options& o, hiwin::BucketRule& rule) {
  const int version = json_int(m.get("manifest_version"), -1, "manifest_version");
  if (version != 2)
    throw Error(HIWIN_BAD_MANIFEST, "manifest.json: manifest version " + std::to_string(version) +
                                        ", this runtime reads version 2 (re-export the model with this version of hiwin)");
  const hiwin::Json* cfg = m.get("config");
  if (cfg && cfg->type == hiwin::Json::Object) {
    const hiwin::Json* vis = cfg->get("hiwin_vision_config");
    int image_size = json_int(vis ? vis->get("image_size") : nullptr, 336, "image_size");
    int patch = json_int(vis ? vis->get("patch_size") : nullptr, 14, "patch_size");
    o.scale_resolution = json_int(cfg->get("hiwin_scale_resolution"), image_size, "hiwin_scale_resolution");
    o.patch_size = json_int(cfg->get("hiwin_slice_patch_size"), patch, "hiwin_slice_patch_size");
    o.max_slices = json_int(cfg->get("hiwin_max_slices"), o.max_slices, "hiwin_max_slices");
    o.queries = json_int(cfg->get("hiwin_projector_queries"), 144, "hiwin_projector_queries");
  }
  const hiwin::Json* lang = m.get("language");
  if (lang && lang->type == hiwin::Json::Object)
    o.vocab_size = json_int(lang->get("vocab_size"), static_cast<int>(o.vocab_size), "language.vocab_size");
  const hiwin::Json* buckets = m.get("buckets");
  const hiwin::Json* r = buckets ? buckets->get("rule") : nullptr;
  if (!r || r->type != hiwin::Json::Object) throw Error(HIWIN_BAD_MANIFEST, "manifest.json: no buckets.rule");
  const hiwin::Json* kind = r->get("kind");
  if (!kind || kind->type != hiwin::Json::String || kind->str != "argmin_abs_log_aspect")
    throw Error(HIWIN_BAD_MANIFEST, "manifest.json: unknown bucket rule '" + (kind ? kind->str : std::string()) +
                                        "' (this runtime knows 'argmin_abs_log_aspect')");
  const hiwin::Json* cands = r->get("candidates_wh");
  if (!cands || cands->type != hiwin::Json::Array || cands->arr.empty())
    throw Error(HIWIN_BAD_MANIFEST, "manifest.json: bucket rule has no candidates");
  rule.candidates_wh.clear();
  for (const auto& c : cands->arr) {
    if (c.type != hiwin::Json::Array || c.arr.size() != 2)
      throw Error(HIWIN_BAD_MANIFEST, "manifest.json: a bucket candidate is not a [w, h] pair");
    int w = json_int(&c.arr[0], 0, "bucket candidate"), h = json_int(&c.arr[1], 0, "bucket candidate");
    if (w < 1 || h < 1) throw Error(HIWIN_BAD_MANIFEST, "manifest.json: bucket candidates must be positive");
    rule.candidates_wh.emplace_back(w, h);
  }
}

void normalize(const hiwin::Rgb8& img, const hiwin_options& o, float* out) {
  const size_t hw = static_cast<size_t>(img.width) * img.height;
  const float inv255 = static_cast<float>(1.0 / 255.0);  // np.float32(1 / 255)
  float lut[3][256];  // the same float32 expression per value, evaluated once
  for (int c = 0; c < 3; ++c)
    for (int v = 0; v < 256; ++v) {
      float a = static_cast<float>(v) * inv255;
      lut[c][v] = (a - o.mean[c]) / o.std[c];
    }
  const uint8_t* p = img.data.data();
  float* r = out;
  float* g = r + hw;
  float* b = g + hw;
  for (size_t i = 0; i < hw; ++i) {
    r[i] = lut[0][p[3 * i]];
    g[i] = lut[1][p[3 * i + 1]];
    b[i] = lut[2][p[3 * i + 2]];
  }
}

void copy_out(const std::vector<int64_t>& v, int64_t* out, size_t capacity, size_t* count) {
  if (count) *count = v.size();
  if (capacity == 0 && !out) return;  // size query
  if (capacity < v.size())
    throw Error(HIWIN_BUFFER_TOO_SMALL,
                "buffer of " + std::to_string(capacity) + " elements, " + std::to_string(v.size()) + " needed");
  need(out, "output buffer");
  std::memcpy(out, v.data(), v.size() * sizeof(int64_t));
}

// hiwin_vision_backend callbacks as a VisionBackend
class CallbackBackend : public hiwin::VisionBackend {
 public:
  CallbackBackend(const hiwin_vision_backend& cb, int patch, int queries) : cb_(cb), p_(patch), q_(queries) {}
  int hidden_size() const override { return cb_.hidden_size; }
  hiwin::Tensor vit(const hiwin::Tensor& px) override {
    int b, h, w;
    grid(px, b, h, w);
    hiwin::Tensor f{{b, cb_.vision_channels, h, w}, {}};
    f.data.resize(static_cast<size_t>(b) * cb_.vision_channels * h * w);
    check(cb_.vit(cb_.user, b, h, w, px.data.data(), f.data.data(), msg_, sizeof msg_), "vit");
    return f;
  }
  std::pair<hiwin::Tensor, hiwin::Tensor> jbu(const hiwin::Tensor& f, const hiwin::Tensor& px) override {
    int b, h, w;
    grid(px, b, h, w);
    const size_t c = static_cast<size_t>(cb_.vision_channels);
    hiwin::Tensor f2{{b, cb_.vision_channels, 2 * h, 2 * w}, std::vector<float>(b * c * 4 * h * w)};
    hiwin::Tensor f4{{b, cb_.vision_channels, 4 * h, 4 * w}, std::vector<float>(b * c * 16 * h * w)};
    check(cb_.jbu(cb_.user, b, h, w, f.data.data(), px.data.data(), f2.data.data(), f4.data.data(), msg_, sizeof msg_),
          "jbu");
    return {std::move(f2), std::move(f4)};
  }
  hiwin::Tensor projector(std::pair<int, int> bucket, const hiwin::Tensor& f1, const hiwin::Tensor& f2,
                          const hiwin::Tensor& f4) override {
    const int b = static_cast<int>(f1.shape[0]), h = static_cast<int>(f1.shape[2]), w = static_cast<int>(f1.shape[3]);
    hiwin::Tensor t{{b, q_, cb_.hidden_size}, std::vector<float>(static_cast<size_t>(b) * q_ * cb_.hidden_size)};
    check(cb_.projector(cb_.user, b, h, w, bucket.first, bucket.second, f1.data.data(), f2.data.data(), f4.data.data(),
                        t.data.data(), msg_, sizeof msg_),
          "projector");
    return t;
  }

 private:
  void grid(const hiwin::Tensor& px, int& b, int& h, int& w) const {
    b = static_cast<int>(px.shape[0]);
    h = static_cast<int>(px.shape[2] / p_);
    w = static_cast<int>(px.shape[3] / p_);
  }
  void check(int rc, const char* stage) {
    if (rc != 0) {
      msg_[sizeof msg_ - 1] = 0;
      throw Error(HIWIN_BACKEND_ERROR, std::string(stage) + " callback failed: " + (msg_[0] ? msg_ : "(no message)"));
    }
  }
  hiwin_vision_backend cb_;
  int p_, q_;
  char msg_[1024] = {0};
};


// crops (slices row-major, then the overview), normalised tensors, buckets and shape groups
std::unique_ptr<hiwin_prepared> finish_prepared(const hiwin_context* ctx, const hiwin::Plan& plan,
                                                std::vector<hiwin::Rgb8> resized, int threads) {
  const auto& o = ctx->opt;
  std::unique_ptr<hiwin_prepared> p(new hiwin_prepared());
  p->plan = plan;
  hiwin::Rgb8 overview = std::move(resized.back());
  const int n = plan.num_crops();
  if (plan.cols)
    for (int r = 0; r < plan.rows; ++r)
      for (int c = 0; c < plan.cols; ++c) p->boxes.emplace_back(c * plan.slice_w, r * plan.slice_h);
  p->boxes.emplace_back(0, 0);
  // every buffer is allocated here, on the calling thread; the threads fill them
  p->crops.resize(static_cast<size_t>(n));
  size_t floats = 0;
  for (int i = 0; i < n; ++i) {
    auto& crop = p->crops[static_cast<size_t>(i)];
    if (i + 1 == n) {
      crop = std::move(overview);
    } else {
      crop.width = plan.slice_w;
      crop.height = plan.slice_h;
      crop.data.resize(static_cast<size_t>(plan.slice_w) * plan.slice_h * 3);
    }
    p->pixel_offset.push_back(floats);
    floats += static_cast<size_t>(crop.width) * crop.height * 3;
  }
  p->pixel_block.resize(floats);
  hiwin::parallel_for(threads, n, [&](int i, int) {
    auto& crop = p->crops[static_cast<size_t>(i)];
    if (i + 1 < n) hiwin::crop_into(resized[0], p->boxes[static_cast<size_t>(i)].first, p->boxes[static_cast<size_t>(i)].second, crop);
    normalize(crop, o, p->pixel_block.data() + p->pixel_offset[static_cast<size_t>(i)]);
  });
  for (int i = 0; i < n; ++i) {
    const auto& c = p->crops[static_cast<size_t>(i)];
    p->buckets.push_back(ctx->rule.bucket(c.width / o.patch_size, c.height / o.patch_size));
    int g = -1;
    for (size_t k = 0; k < p->groups.size(); ++k) {
      const auto& first = p->crops[static_cast<size_t>(p->groups[k][0])];
      if (first.width == c.width && first.height == c.height) g = static_cast<int>(k);
    }
    if (g < 0) {
      g = static_cast<int>(p->groups.size());
      p->groups.emplace_back();
    }
    p->groups[static_cast<size_t>(g)].push_back(static_cast<int32_t>(i));
    p->group_of.push_back(g);
  }
  return p;
}

// the resizes of a plan: the refined image (when there is a grid), then the overview
std::vector<std::pair<int, int>> plan_sizes(const hiwin::Plan& plan) {
  std::vector<std::pair<int, int>> s;
  if (plan.cols) s.emplace_back(plan.refined_w, plan.refined_h);
  s.emplace_back(plan.overview_w, plan.overview_h);
  return s;
}

hiwin::Plan make_plan(const hiwin_context* ctx, int w, int h, int max_slices) {
  const auto& o = ctx->opt;
  return hiwin::plan_slices(w, h, max_slices > 0 ? max_slices : o.max_slices, o.scale_resolution, o.patch_size);
}

// load_image's result -> prepared crops (hiwin_runtime.processor.HiwinProcessor.prepare_image)
std::unique_ptr<hiwin_prepared> prepare_rgb(const hiwin_context* ctx, const hiwin::Rgb8& image, int max_slices,
                                            int threads) {
  const auto& o = ctx->opt;
  const bool order13 = o.resize_pass_order == HIWIN_RESIZE_PILLOW13;
  const hiwin::Rgb8* src = &image;
  hiwin::Rgb8 pre;
  if (o.pre_resize > 0) {
    auto sz = hiwin::pre_resize_size(src->width, src->height, o.pre_resize);
    if (sz.first > 0) {
      pre = hiwin::resize_bicubic(*src, sz.first, sz.second, order13, threads);
      src = &pre;
    }
  }
  hiwin::Plan plan = make_plan(ctx, src->width, src->height, max_slices);
  hiwin::Resizer rz(src->width, src->height, plan_sizes(plan), order13);
  return finish_prepared(ctx, plan, rz.run(*src, threads), threads);
}

// A JPEG's rows go from the decoding thread to the horizontal passes through a ring of row batches;
// the other threads (the caller's included) run the passes on batches as they are decoded, and the
// decoding thread joins them when it is done.
struct RowRing {
  std::mutex m;
  std::condition_variable cv;
  int decoded = 0;  // batches decoded
  int retired = 0;  // batches [0, retired) processed: their ring slots may be reused
  int next = 0;     // next batch to claim
  bool failed = false;
  std::vector<char> done;
  std::exception_ptr error;  // the first error of a thread
  void fail(std::exception_ptr e) {
    {
      std::lock_guard<std::mutex> lock(m);
      if (!error) error = e;
      failed = true;
    }
    cv.notify_all();
  }
};

std::vector<hiwin::Rgb8> stream_jpeg(hiwin::JpegRows& jr, hiwin::Resizer& rz, int threads) {
  const int kB = hiwin::Resizer::kBatch;
  const int h = jr.height(), nb = rz.num_batches();
  const size_t stride = static_cast<size_t>(jr.width()) * 3;
  // about 4 MiB of rows, and at least two batches per thread (one thread: one batch)
  const int slots = threads == 1 ? 1 : std::min(nb, std::max(2 * threads + 2, static_cast<int>((size_t(4) << 20) / (kB * stride))));
  hiwin::Bytes ring(static_cast<size_t>(slots) * kB * stride);
  rz.prepare_threads(threads);
  if (threads == 1) {  // decode a batch, resize it, and so on: no full-size image in memory either
    uint8_t* rows[kB];
    for (int r = 0; r < kB; ++r) rows[r] = ring.data() + static_cast<size_t>(r) * stride;
    for (int b = 0; b < nb; ++b) {
      jr.read(rows, std::min(kB, h - b * kB));
      rz.batch(b, rows, 0);
    }
    jr.finish();
    return rz.finish(1);
  }
  RowRing st;
  st.done.assign(static_cast<size_t>(nb), 0);
  auto rows_of = [&](int b, uint8_t** rows) {
    uint8_t* base = ring.data() + static_cast<size_t>(b % slots) * kB * stride;
    for (int r = 0; r < kB; ++r) rows[r] = base + static_cast<size_t>(r) * stride;
  };
  auto work = [&](int slot) {
    try {
      for (;;) {
        int b;
        {
          std::unique_lock<std::mutex> lock(st.m);
          if (st.failed || st.next >= nb) return;
          b = st.next++;
          st.cv.wait(lock, [&] { return st.decoded > b || st.failed; });
          if (st.failed) return;
        }
        uint8_t* rows[kB];
        rows_of(b, rows);
        rz.batch(b, rows, slot);
        {
          std::lock_guard<std::mutex> lock(st.m);
          st.done[static_cast<size_t>(b)] = 1;
          while (st.retired < nb && st.done[static_cast<size_t>(st.retired)]) ++st.retired;
        }
        st.cv.notify_all();
      }
    } catch (...) {
      st.fail(std::current_exception());
    }
  };
  auto decode = [&] {
    try {
      for (int b = 0; b < nb; ++b) {
        {
          std::unique_lock<std::mutex> lock(st.m);
          st.cv.wait(lock, [&] { return b - st.retired < slots || st.failed; });
          if (st.failed) return;
        }
        uint8_t* rows[kB];
        rows_of(b, rows);
        jr.read(rows, std::min(kB, h - b * kB));
        {
          std::lock_guard<std::mutex> lock(st.m);
          st.decoded = b + 1;
        }
        st.cv.notify_all();
      }
      jr.finish();
    } catch (...) {
      st.fail(std::current_exception());
      return;
    }
    work(1);
  };
  std::vector<std::thread> pool;
  struct Joiner {
    std::vector<std::thread>& p;
    ~Joiner() {
      for (auto& t : p)
        if (t.joinable()) t.join();
    }
  } joiner{pool};
  try {
    pool.emplace_back(decode);
  } catch (const std::system_error&) {
    return {};  // no thread could be started (nothing was read yet): the caller decodes first
  }
  for (int t = 2; t < threads; ++t) {
    try {
      pool.emplace_back(work, t);
    } catch (...) {
      break;  // fewer helpers
    }
  }
  work(0);
  for (auto& t : pool) t.join();
  if (st.error) std::rethrow_exception(st.error);
  return rz.finish(threads);
}

// decode + prepare. A JPEG with upright EXIF orientation (or none) is resized while it decodes
// (stream_jpeg: on other threads, or batch after batch on one); the same arithmetic on the same rows
// gives the same bytes as decode + prepare.
std::unique_ptr<hiwin_prepared> prepare_bytes(const hiwin_context* ctx, const uint8_t* data, size_t size,
                                              const std::string& name, int max_slices) {
  const auto& o = ctx->opt;
  const int threads = hiwin::resolve_threads(o.num_threads);
  const hiwin::DecodeOptions dopt = decode_options(ctx);
  if (!data || !hiwin::is_jpeg(data, size) || o.pre_resize > 0)
    return prepare_rgb(ctx, hiwin::decode_image(data, size, name, dopt), max_slices, threads);
  hiwin::JpegRows jr(data, size, name, dopt);  // header errors here, as decode_image reports them
  if (jr.orientation() != 1) return prepare_rgb(ctx, jr.read_all(), max_slices, threads);
  hiwin::Plan plan;
  try {
    plan = make_plan(ctx, jr.width(), jr.height(), max_slices);
  } catch (...) {
    jr.read_all();  // a decoding error is reported first, as load_image comes before the plan
    throw;
  }
  const bool order13 = o.resize_pass_order == HIWIN_RESIZE_PILLOW13;
  hiwin::Resizer rz(jr.width(), jr.height(), plan_sizes(plan), order13);
  std::vector<hiwin::Rgb8> resized;
  if (rz.row_fed()) resized = stream_jpeg(jr, rz, threads);
  if (resized.empty()) resized = rz.run(jr.read_all(), threads);
  return finish_prepared(ctx, plan, std::move(resized), threads);
}

}  // namespace

extern "C" {

hiwin_code hiwin_status_code(const hiwin_status* s) { return s ? s->code : HIWIN_OK; }
const char* hiwin_status_message(const hiwin_status* s) { return s ? s->message.c_str() : ""; }
void hiwin_status_free(hiwin_status* s) {
  if (s && s != &g_oom) delete s;
}
const char* hiwin_version(void) { return HIWIN_VERSION_STRING; }
const char* hiwin_simd_level(void) { return hiwin::simd_level(); }
int hiwin_has_tensorrt(void) {
#ifdef HIWIN_WITH_TENSORRT
  return 1;
#else
  return 0;
#endif
}

void hiwin_options_default(hiwin_options* o) {
  if (!o) return;
  std::memset(o, 0, sizeof *o);
  o->max_slices = 9;
  o->scale_resolution = 336;
  o->patch_size = 14;
  const float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f}, stdv[3] = {0.26862954f, 0.26130258f, 0.27577711f};
  std::memcpy(o->mean, mean, sizeof mean);
  std::memcpy(o->std, stdv, sizeof stdv);
  o->max_pixels = 89478485;
  o->alpha_composite = 1;
  o->alpha_background[0] = o->alpha_background[1] = o->alpha_background[2] = 255;
  o->pre_resize = 0;
  o->queries = 144;
  o->vocab_size = 32000;
  o->resize_pass_order = HIWIN_RESIZE_PILLOW13;
  o->num_threads = 0;
}

hiwin_status* hiwin_context_create(const hiwin_options* options, hiwin_context** out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    std::unique_ptr<hiwin_context> ctx(new hiwin_context());
    if (options) ctx->opt = *options;
    else hiwin_options_default(&ctx->opt);
    validate(ctx->opt);
    *out = ctx.release();
  });
}

hiwin_status* hiwin_context_create_from_export(const char* export_dir, const char* engines_dir,
                                               const char* plugin_library, const hiwin_options* options,
                                               hiwin_context** out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    need(export_dir, "export_dir");
    std::unique_ptr<hiwin_context> ctx(new hiwin_context());
    if (options) ctx->opt = *options;
    else hiwin_options_default(&ctx->opt);
    const std::string dir(export_dir), mf = dir + "/manifest.json";
    hiwin::Json m;
    try {
      m = hiwin::parse_json(read_text(mf));
    } catch (const Error& e) {
      throw Error(HIWIN_BAD_MANIFEST, std::string(e.what()).find(mf) == 0 ? e.what() : mf + ": " + e.what());
    }
    apply_manifest(m, ctx->opt, ctx->rule);
    validate(ctx->opt);
    if (engines_dir) ctx->backend = hiwin::make_trt_backend(dir, m, engines_dir, plugin_library ? plugin_library : "");
    *out = ctx.release();
  });
}

void hiwin_context_free(hiwin_context* ctx) { delete ctx; }

hiwin_status* hiwin_context_options(const hiwin_context* ctx, hiwin_options* out) {
  return guarded([&] {
    need(ctx, "ctx");
    need(out, "out");
    *out = ctx->opt;
  });
}

hiwin_status* hiwin_context_set_vision_backend(hiwin_context* ctx, const hiwin_vision_backend* backend) {
  return guarded([&] {
    need(ctx, "ctx");
    need(backend, "backend");
    if (!backend->vit || !backend->jbu || !backend->projector)
      throw Error(HIWIN_INVALID_ARGUMENT, "the vision backend needs vit, jbu and projector callbacks");
    if (backend->vision_channels < 1 || backend->hidden_size < 1)
      throw Error(HIWIN_INVALID_ARGUMENT, "vision_channels and hidden_size must be >= 1");
    std::lock_guard<std::mutex> lock(ctx->backend_mutex);
    ctx->backend.reset(new CallbackBackend(*backend, ctx->opt.patch_size, ctx->opt.queries));
  });
}

int hiwin_context_hidden_size(const hiwin_context* ctx) {
  return ctx && ctx->backend ? ctx->backend->hidden_size() : 0;
}

hiwin_status* hiwin_image_decode_file(const hiwin_context* ctx, const char* path, hiwin_image** out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    need(ctx, "ctx");
    need(path, "path");
    std::unique_ptr<hiwin_image> img(new hiwin_image{hiwin::decode_file(path, decode_options(ctx))});
    *out = img.release();
  });
}

hiwin_status* hiwin_image_decode_memory(const hiwin_context* ctx, const void* data, size_t size, hiwin_image** out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    need(ctx, "ctx");
    if (size && !data) throw Error(HIWIN_INVALID_ARGUMENT, "data is NULL");
    std::unique_ptr<hiwin_image> img(new hiwin_image{hiwin::decode_image(
        static_cast<const uint8_t*>(data), size, "<" + std::to_string(size) + " bytes>", decode_options(ctx))});
    *out = img.release();
  });
}

hiwin_status* hiwin_image_from_rgb8(const uint8_t* pixels, int width, int height, size_t stride, hiwin_image** out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    need(pixels, "pixels");
    if (width < 1 || height < 1)
      throw Error(HIWIN_BAD_IMAGE, "image has no pixels (" + std::to_string(width) + "x" + std::to_string(height) + ")");
    if (stride < static_cast<size_t>(width) * 3) throw Error(HIWIN_INVALID_ARGUMENT, "stride is below 3*width");
    std::unique_ptr<hiwin_image> img(new hiwin_image());
    img->rgb.width = width;
    img->rgb.height = height;
    img->rgb.data.resize(static_cast<size_t>(width) * height * 3);
    for (int y = 0; y < height; ++y)
      std::memcpy(&img->rgb.data[static_cast<size_t>(y) * width * 3], pixels + stride * y, static_cast<size_t>(width) * 3);
    *out = img.release();
  });
}

void hiwin_image_free(hiwin_image* image) { delete image; }

hiwin_status* hiwin_image_info(const hiwin_image* image, int* width, int* height, const uint8_t** rgb,
                               const char** source_mode) {
  return guarded([&] {
    need(image, "image");
    if (width) *width = image->rgb.width;
    if (height) *height = image->rgb.height;
    if (rgb) *rgb = image->rgb.data.data();
    if (source_mode) *source_mode = image->rgb.source_mode.c_str();
  });
}

hiwin_status* hiwin_plan_slices(const hiwin_context* ctx, int width, int height, int max_slices, hiwin_plan* out) {
  return guarded([&] {
    need(ctx, "ctx");
    need(out, "out");
    const auto& o = ctx->opt;
    fill_plan(hiwin::plan_slices(width, height, max_slices > 0 ? max_slices : o.max_slices, o.scale_resolution,
                                 o.patch_size),
              out);
  });
}

hiwin_status* hiwin_prepare(const hiwin_context* ctx, const hiwin_image* image, int max_slices, hiwin_prepared** out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    need(ctx, "ctx");
    need(image, "image");
    *out = prepare_rgb(ctx, image->rgb, max_slices, hiwin::resolve_threads(ctx->opt.num_threads)).release();
  });
}

hiwin_status* hiwin_prepare_memory(const hiwin_context* ctx, const void* data, size_t size, int max_slices,
                                   hiwin_prepared** out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    need(ctx, "ctx");
    if (size && !data) throw Error(HIWIN_INVALID_ARGUMENT, "data is NULL");
    *out = prepare_bytes(ctx, static_cast<const uint8_t*>(data), size, "<" + std::to_string(size) + " bytes>",
                         max_slices).release();
  });
}

hiwin_status* hiwin_prepare_file(const hiwin_context* ctx, const char* path, int max_slices, hiwin_prepared** out) {
  return guarded([&] {
    need(out, "out");
    *out = nullptr;
    need(ctx, "ctx");
    need(path, "path");
    std::vector<uint8_t> buf = hiwin::read_file_bytes(path);
    *out = prepare_bytes(ctx, buf.data(), buf.size(), path, max_slices).release();
  });
}

void hiwin_prepared_free(hiwin_prepared* prepared) { delete prepared; }

hiwin_status* hiwin_prepared_plan(const hiwin_prepared* prepared, hiwin_plan* out) {
  return guarded([&] {
    need(prepared, "prepared");
    need(out, "out");
    fill_plan(prepared->plan, out);
  });
}

hiwin_status* hiwin_prepared_crop(const hiwin_prepared* p, int index, hiwin_crop* out) {
  return guarded([&] {
    need(p, "prepared");
    need(out, "out");
    if (index < 0 || static_cast<size_t>(index) >= p->crops.size())
      throw Error(HIWIN_INVALID_ARGUMENT, "crop index " + std::to_string(index) + " outside [0, " +
                                              std::to_string(p->crops.size()) + ")");
    const size_t i = static_cast<size_t>(index);
    out->width = p->crops[i].width;
    out->height = p->crops[i].height;
    out->left = p->boxes[i].first;
    out->top = p->boxes[i].second;
    out->bucket_oh = p->buckets[i].first;
    out->bucket_ow = p->buckets[i].second;
    out->group = p->group_of[i];
    out->rgb = p->crops[i].data.data();
    out->pixels = p->pixels(static_cast<size_t>(i));
  });
}

hiwin_status* hiwin_prepared_num_groups(const hiwin_prepared* p, int* num_groups) {
  return guarded([&] {
    need(p, "prepared");
    need(num_groups, "num_groups");
    *num_groups = static_cast<int>(p->groups.size());
  });
}

hiwin_status* hiwin_prepared_group(const hiwin_prepared* p, int group, int32_t* indices, size_t capacity,
                                   size_t* count) {
  return guarded([&] {
    need(p, "prepared");
    if (group < 0 || static_cast<size_t>(group) >= p->groups.size())
      throw Error(HIWIN_INVALID_ARGUMENT, "group " + std::to_string(group) + " outside [0, " +
                                              std::to_string(p->groups.size()) + ")");
    const auto& g = p->groups[static_cast<size_t>(group)];
    if (count) *count = g.size();
    if (capacity == 0 && !indices) return;
    if (capacity < g.size())
      throw Error(HIWIN_BUFFER_TOO_SMALL, "buffer of " + std::to_string(capacity) + " elements, " +
                                              std::to_string(g.size()) + " needed");
    need(indices, "indices");
    std::memcpy(indices, g.data(), g.size() * sizeof(int32_t));
  });
}

hiwin_status* hiwin_bucket_for(const hiwin_context* ctx, int width_patches, int height_patches, int* oh, int* ow) {
  return guarded([&] {
    need(ctx, "ctx");
    need(oh, "oh");
    need(ow, "ow");
    auto b = ctx->rule.bucket(width_patches, height_patches);
    *oh = b.first;
    *ow = b.second;
  });
}

hiwin_status* hiwin_num_image_tokens(int grid_cols, int grid_rows, int queries, size_t* count) {
  return guarded([&] {
    need(count, "count");
    *count = hiwin::layout_indices(grid_cols, grid_rows, grid_cols * grid_rows + 1, queries).size();
  });
}

hiwin_status* hiwin_layout_indices(int grid_cols, int grid_rows, int num_crops, int queries, int64_t* indices,
                                   size_t capacity, size_t* count) {
  return guarded([&] {
    copy_out(hiwin::layout_indices(grid_cols, grid_rows, num_crops, queries), indices, capacity, count);
  });
}

hiwin_status* hiwin_prompt_table_ids(const int64_t* pre, size_t num_pre, size_t num_visual, const int64_t* post,
                                     size_t num_post, int64_t vocab_size, int64_t* ids, size_t capacity,
                                     size_t* count) {
  return guarded([&] {
    if (num_pre) need(pre, "pre");
    if (num_post) need(post, "post");
    if (vocab_size < 1) throw Error(HIWIN_INVALID_ARGUMENT, "vocab_size must be >= 1");
    std::vector<int64_t> v;
    v.reserve(num_pre + num_visual + num_post);
    v.insert(v.end(), pre, pre + num_pre);
    for (size_t t = 0; t < num_visual; ++t) v.push_back(vocab_size + static_cast<int64_t>(t));
    v.insert(v.end(), post, post + num_post);
    copy_out(v, ids, capacity, count);
  });
}

hiwin_status* hiwin_encode_image(hiwin_context* ctx, const hiwin_prepared* p, const float* newline,
                                 const float* comma, float* tokens, size_t capacity, size_t* count) {
  return guarded([&] {
    need(ctx, "ctx");
    need(p, "prepared");
    if (!ctx->backend)
      throw Error(HIWIN_UNSUPPORTED, hiwin_has_tensorrt()
                                         ? "this context has no vision engines (create it with an engines_dir, or set "
                                           "a hiwin_vision_backend)"
                                         : "this context has no vision engines: this build of hiwin has no TensorRT "
                                           "backend (rebuild with TensorRT found), or set a hiwin_vision_backend");
    need(newline, "newline");
    need(comma, "comma");
    const int q = ctx->opt.queries;
    const size_t hidden = static_cast<size_t>(ctx->backend->hidden_size());
    auto idx = hiwin::layout_indices(p->plan.cols, p->plan.rows, p->plan.num_crops(), q);
    const size_t total = idx.size() * hidden;
    if (count) *count = total;
    if (capacity == 0 && !tokens) return;
    if (capacity < total)
      throw Error(HIWIN_BUFFER_TOO_SMALL, "buffer of " + std::to_string(capacity) + " floats, " +
                                              std::to_string(total) + " needed");
    need(tokens, "tokens");
    // crop chain: one batch per shape group (vit -> jbu -> projector of the group's bucket)
    std::vector<float> table((p->crops.size() * q + 2) * hidden);
    std::lock_guard<std::mutex> lock(ctx->backend_mutex);
    for (const auto& g : p->groups) {
      const auto& first = p->crops[static_cast<size_t>(g[0])];
      hiwin::Tensor px;
      px.shape = {static_cast<int64_t>(g.size()), 3, first.height, first.width};
      for (int32_t i : g) {
        const auto& c = p->crops[static_cast<size_t>(i)];
        const float* f = p->pixels(static_cast<size_t>(i));
        px.data.insert(px.data.end(), f, f + static_cast<size_t>(c.width) * c.height * 3);
      }
      hiwin::Tensor f1 = ctx->backend->vit(px);
      auto f24 = ctx->backend->jbu(f1, px);
      hiwin::Tensor tok = ctx->backend->projector(p->buckets[static_cast<size_t>(g[0])], f1, f24.first, f24.second);
      if (tok.data.size() != g.size() * q * hidden)
        throw Error(HIWIN_BACKEND_ERROR, "the projector returned " + std::to_string(tok.data.size()) +
                                             " values, expected " + std::to_string(g.size() * q * hidden));
      for (size_t j = 0; j < g.size(); ++j)
        std::memcpy(&table[static_cast<size_t>(g[j]) * q * hidden], &tok.data[j * q * hidden], q * hidden * sizeof(float));
    }
    std::memcpy(&table[p->crops.size() * q * hidden], newline, hidden * sizeof(float));
    std::memcpy(&table[(p->crops.size() * q + 1) * hidden], comma, hidden * sizeof(float));
    for (size_t t = 0; t < idx.size(); ++t)
      std::memcpy(tokens + t * hidden, &table[static_cast<size_t>(idx[t]) * hidden], hidden * sizeof(float));
  });
}

}  // extern "C"

#ifndef HIWIN_WITH_TENSORRT
std::unique_ptr<hiwin::VisionBackend> hiwin::make_trt_backend(const std::string&, const Json&, const std::string&,
                                                             const std::string&) {
  throw Error(HIWIN_UNSUPPORTED,
              "this build of hiwin has no TensorRT backend (TensorRT was not found when it was built); "
              "create the context without engines_dir for preprocessing only");
}
#endif
