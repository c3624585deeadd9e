// hiwin.hpp: a thin RAII C++17 layer over the C API (hiwin.h). Failed calls throw hiwin::Exception
// (code + message); handles free themselves. Same thread-safety as the C API.
#pragma once

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "hiwin/hiwin.h"

namespace hiwin {

class Exception : public std::runtime_error {
 public:
  Exception(hiwin_code code, const std::string& msg) : std::runtime_error(msg), code_(code) {}
  hiwin_code code() const noexcept { return code_; }

 private:
  hiwin_code code_;
};

inline void check(hiwin_status* st) {
  if (!st) return;
  hiwin_code code = hiwin_status_code(st);
  std::string msg = hiwin_status_message(st);
  hiwin_status_free(st);
  throw Exception(code, msg);
}

namespace detail {
struct CtxDel { void operator()(hiwin_context* p) const noexcept { hiwin_context_free(p); } };
struct ImgDel { void operator()(hiwin_image* p) const noexcept { hiwin_image_free(p); } };
struct PrepDel { void operator()(hiwin_prepared* p) const noexcept { hiwin_prepared_free(p); } };
}  // namespace detail

class Image {
 public:
  explicit Image(hiwin_image* p) : p_(p) {}
  static Image from_rgb8(const uint8_t* pixels, int width, int height, size_t stride = 0) {
    hiwin_image* p = nullptr;
    check(hiwin_image_from_rgb8(pixels, width, height, stride ? stride : static_cast<size_t>(width) * 3, &p));
    return Image(p);
  }
  int width() const { int w = 0; check(hiwin_image_info(p_.get(), &w, nullptr, nullptr, nullptr)); return w; }
  int height() const { int h = 0; check(hiwin_image_info(p_.get(), nullptr, &h, nullptr, nullptr)); return h; }
  const uint8_t* rgb() const { const uint8_t* d = nullptr; check(hiwin_image_info(p_.get(), nullptr, nullptr, &d, nullptr)); return d; }
  std::string source_mode() const { const char* m = nullptr; check(hiwin_image_info(p_.get(), nullptr, nullptr, nullptr, &m)); return m; }
  const hiwin_image* get() const { return p_.get(); }

 private:
  std::unique_ptr<hiwin_image, detail::ImgDel> p_;
};

class Prepared {
 public:
  explicit Prepared(hiwin_prepared* p) : p_(p) {}
  hiwin_plan plan() const { hiwin_plan pl; check(hiwin_prepared_plan(p_.get(), &pl)); return pl; }
  int num_crops() const { return plan().num_crops; }
  hiwin_crop crop(int i) const { hiwin_crop c; check(hiwin_prepared_crop(p_.get(), i, &c)); return c; }
  std::vector<std::vector<int32_t>> groups() const {
    int n = 0;
    check(hiwin_prepared_num_groups(p_.get(), &n));
    std::vector<std::vector<int32_t>> out(static_cast<size_t>(n));
    for (int g = 0; g < n; ++g) {
      size_t cnt = 0;
      check(hiwin_prepared_group(p_.get(), g, nullptr, 0, &cnt));
      out[static_cast<size_t>(g)].resize(cnt);
      check(hiwin_prepared_group(p_.get(), g, out[static_cast<size_t>(g)].data(), cnt, &cnt));
    }
    return out;
  }
  const hiwin_prepared* get() const { return p_.get(); }

 private:
  std::unique_ptr<hiwin_prepared, detail::PrepDel> p_;
};

class Context {
 public:
  Context() { hiwin_context* c = nullptr; check(hiwin_context_create(nullptr, &c)); p_.reset(c); }
  explicit Context(const hiwin_options& o) { hiwin_context* c = nullptr; check(hiwin_context_create(&o, &c)); p_.reset(c); }
  static Context from_export(const std::string& export_dir, const std::string& engines_dir = "",
                             const std::string& plugin_library = "", const hiwin_options* o = nullptr) {
    hiwin_context* c = nullptr;
    check(hiwin_context_create_from_export(export_dir.c_str(), engines_dir.empty() ? nullptr : engines_dir.c_str(),
                                           plugin_library.empty() ? nullptr : plugin_library.c_str(), o, &c));
    return Context(c);
  }
  hiwin_options options() const { hiwin_options o; check(hiwin_context_options(p_.get(), &o)); return o; }
  Image decode_file(const std::string& path) const {
    hiwin_image* i = nullptr;
    check(hiwin_image_decode_file(p_.get(), path.c_str(), &i));
    return Image(i);
  }
  Image decode(const void* data, size_t size) const {
    hiwin_image* i = nullptr;
    check(hiwin_image_decode_memory(p_.get(), data, size, &i));
    return Image(i);
  }
  hiwin_plan plan(int width, int height, int max_slices = 0) const {
    hiwin_plan pl;
    check(hiwin_plan_slices(p_.get(), width, height, max_slices, &pl));
    return pl;
  }
  Prepared prepare(const Image& img, int max_slices = 0) const {
    hiwin_prepared* p = nullptr;
    check(hiwin_prepare(p_.get(), img.get(), max_slices, &p));
    return Prepared(p);
  }
  // decode + prepare in one call (a JPEG's rows resized on other threads while it decodes unless num_threads == 1)
  Prepared prepare_file(const std::string& path, int max_slices = 0) const {
    hiwin_prepared* p = nullptr;
    check(hiwin_prepare_file(p_.get(), path.c_str(), max_slices, &p));
    return Prepared(p);
  }
  Prepared prepare_memory(const void* data, size_t size, int max_slices = 0) const {
    hiwin_prepared* p = nullptr;
    check(hiwin_prepare_memory(p_.get(), data, size, max_slices, &p));
    return Prepared(p);
  }
  std::pair<int, int> bucket(int width_patches, int height_patches) const {
    int oh = 0, ow = 0;
    check(hiwin_bucket_for(p_.get(), width_patches, height_patches, &oh, &ow));
    return {oh, ow};
  }
  // (T, hidden) visual tokens, row-major
  std::vector<float> encode(const Prepared& p, const float* newline, const float* comma) {
    size_t n = 0;
    check(hiwin_encode_image(p_.get(), p.get(), newline, comma, nullptr, 0, &n));
    std::vector<float> out(n);
    check(hiwin_encode_image(p_.get(), p.get(), newline, comma, out.data(), n, &n));
    return out;
  }
  int hidden_size() const { return hiwin_context_hidden_size(p_.get()); }
  hiwin_context* get() const { return p_.get(); }

 private:
  explicit Context(hiwin_context* c) : p_(c) {}
  std::unique_ptr<hiwin_context, detail::CtxDel> p_;
};

inline std::vector<int64_t> layout_indices(int cols, int rows, int num_crops, int queries = 144) {
  size_t n = 0;
  check(hiwin_layout_indices(cols, rows, num_crops, queries, nullptr, 0, &n));
  std::vector<int64_t> v(n);
  check(hiwin_layout_indices(cols, rows, num_crops, queries, v.data(), n, &n));
  return v;
}

inline std::vector<int64_t> prompt_table_ids(const std::vector<int64_t>& pre, size_t num_visual,
                                             const std::vector<int64_t>& post, int64_t vocab_size) {
  size_t n = 0;
  check(hiwin_prompt_table_ids(pre.data(), pre.size(), num_visual, post.data(), post.size(), vocab_size, nullptr, 0, &n));
  std::vector<int64_t> v(n);
  check(hiwin_prompt_table_ids(pre.data(), pre.size(), num_visual, post.data(), post.size(), vocab_size, v.data(), n, &n));
  return v;
}

}  // namespace hiwin
