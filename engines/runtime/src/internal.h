// Internal C++ core of the hiwin runtime (not installed). All of it is exception-based; api.cpp
// turns exceptions into hiwin_status objects at the C boundary.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "hiwin/hiwin.h"

namespace hiwin {

struct Error : std::runtime_error {
  hiwin_code code;
  Error(hiwin_code c, const std::string& msg) : std::runtime_error(msg), code(c) {}
};

// Packed RGB8 image (what Pillow's "RGB" mode holds, without its 4th byte).
struct Rgb8 {
  int width = 0, height = 0;
  std::vector<uint8_t> data;  // height*width*3
  std::string source_mode = "RGB";
};

// --- decoding (decode.cpp) -----------------------------------------------------------------
struct DecodeOptions {
  int64_t max_pixels = 89478485;  // Pillow's Image.MAX_IMAGE_PIXELS; 0 = off
  bool alpha_composite = true;
  uint8_t background[3] = {255, 255, 255};
};
// Receives a JPEG's RGB rows while it decodes (hiwin_prepare_* overlaps decoding and resizing).
// Both calls come from the decoding thread and must not throw.
struct RowSink {
  virtual ~RowSink() = default;
  // after the header: where the RGB rows go (width*height*3 bytes), or nullptr to decode as usual
  virtual uint8_t* begin(int width, int height, int orientation) noexcept = 0;
  virtual void rows_done(int rows) noexcept = 0;  // rows [0, rows) are final
};
// With a sink that took the rows, the returned image has its size and mode but no data (the pixels
// are in the sink's buffer).
Rgb8 decode_image(const uint8_t* data, size_t size, const std::string& name, const DecodeOptions& opt,
                  RowSink* sink = nullptr);
Rgb8 decode_file(const std::string& path, const DecodeOptions& opt);
std::vector<uint8_t> read_file_bytes(const std::string& path);  // IO errors / empty file as Error

// --- geometry (plan.cpp) -------------------------------------------------------------------
struct Plan {
  int image_w = 0, image_h = 0;
  int overview_w = 0, overview_h = 0;
  int cols = 0, rows = 0;  // 0,0: no grid
  int refined_w = 0, refined_h = 0;
  int slice_w = 0, slice_h = 0;
  int num_crops() const { return cols * rows + 1; }
};
Plan plan_slices(int w, int h, int max_slices, int s, int p);
std::pair<int, int> pre_resize_size(int w, int h, int long_side);  // {0,0}: no resize

// --- bucket rule ---------------------------------------------------------------------------
struct BucketRule {
  std::vector<std::pair<int, int>> candidates_wh = {{4, 2}, {3, 2}, {4, 3}, {3, 3}, {2, 4}, {2, 3}, {3, 4}};
  std::pair<int, int> bucket(int width, int height) const;  // -> (oh, ow)
};

// --- resampling (resample.cpp) -------------------------------------------------------------
// Pillow Image.resize(size, BICUBIC) of an RGB image, bit for bit.
Rgb8 resize_bicubic(const Rgb8& in, int out_w, int out_h, bool pillow13_order = true);
void split_planes(const uint8_t* rgb_row, int w, int32_t* const* planes);
Rgb8 crop(const Rgb8& in, int left, int top, int w, int h);

// resize_bicubic fed row by row (rows in order, as they are decoded): the horizontal pass runs per
// pushed row, the vertical pass in finish(). Only when Pillow would run the horizontal pass first.
class StreamedResize {
 public:
  StreamedResize(int in_w, int in_h, int out_w, int out_h, bool pillow13_order);
  ~StreamedResize();
  bool streamable() const { return streamable_; }
  void push_row(int y, const uint8_t* rgb_row);  // y = 0, 1, ... (rows outside the used band are skipped)
  // the same from the row already split into planar int32 channels (r, g, b: in_w values each)
  void push_planes(int y, int32_t* const* planes);
  Rgb8 finish();

 private:
  struct Impl;
  Impl* impl_ = nullptr;
  bool streamable_ = false;
};

// --- layout --------------------------------------------------------------------------------
size_t num_image_tokens(int cols, int rows, int queries);
std::vector<int64_t> layout_indices(int cols, int rows, int num_crops, int queries);

// --- minimal JSON (json.cpp) ---------------------------------------------------------------
struct Json {
  enum Type { Null, Bool, Number, String, Array, Object } type = Null;
  bool b = false;
  double num = 0;
  std::string str;
  std::vector<Json> arr;
  std::vector<std::pair<std::string, Json>> obj;
  const Json* get(const std::string& key) const;
};
Json parse_json(const std::string& text);  // throws Error(HIWIN_BAD_MANIFEST)

}  // namespace hiwin
