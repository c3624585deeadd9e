// Internal C++ core of the hiwin runtime (not installed). All of it is exception-based; api.cpp
// turns exceptions into hiwin_status objects at the C boundary.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <new>
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

// --- memory and threads (util.cpp) --------------------------------------------------------
// Image-sized blocks: from 1 MiB on (Linux) mapped on their own with transparent huge pages
// requested, as the first touch of a 36 MB image in 4 KiB pages costs about as much as decoding it.
void* big_alloc(size_t bytes);  // throws std::bad_alloc
void big_free(void* p, size_t bytes) noexcept;  // bytes: as given to big_alloc

// std::vector allocator over big_alloc whose resize() leaves new elements uninitialised (every
// buffer that uses it is written in full before it is read).
template <class T>
struct BufAlloc {
  using value_type = T;
  BufAlloc() = default;
  template <class U>
  BufAlloc(const BufAlloc<U>&) noexcept {}
  T* allocate(size_t n) {
    if (n > static_cast<size_t>(-1) / sizeof(T)) throw std::bad_alloc();
    return static_cast<T*>(big_alloc(n * sizeof(T)));
  }
  void deallocate(T* p, size_t n) noexcept { big_free(p, n * sizeof(T)); }
  template <class U>
  void construct(U*) noexcept {}  // default-initialised: no zeroing
  template <class U, class A0, class... A>
  void construct(U* p, A0&& a0, A&&... a) {
    ::new (static_cast<void*>(p)) U(std::forward<A0>(a0), std::forward<A>(a)...);
  }
  template <class U>
  bool operator==(const BufAlloc<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const BufAlloc<U>&) const noexcept { return false; }
};
using Bytes = std::vector<uint8_t, BufAlloc<uint8_t>>;
using Floats = std::vector<float, BufAlloc<float>>;

// Worker threads for one call: `requested` (hiwin_options.num_threads) 0 -> $HIWIN_NUM_THREADS when
// set, else the CPUs this process may run on; capped at 64.
int resolve_threads(int requested);
// f(item, slot) for item in [0, n): items are claimed in increasing order by up to `threads` threads
// (the calling thread is slot 0; slots are < threads). The first exception is rethrown once all
// threads have stopped; items not yet claimed by then are skipped.
void parallel_for(int threads, int n, const std::function<void(int item, int slot)>& f);

// Packed RGB8 image (what Pillow's "RGB" mode holds, without its 4th byte).
struct Rgb8 {
  int width = 0, height = 0;
  Bytes data;  // height*width*3
  std::string source_mode = "RGB";
};

// --- decoding (decode.cpp) -----------------------------------------------------------------
struct DecodeOptions {
  int64_t max_pixels = 89478485;  // Pillow's Image.MAX_IMAGE_PIXELS; 0 = off
  bool alpha_composite = true;
  uint8_t background[3] = {255, 255, 255};
};
Rgb8 decode_image(const uint8_t* data, size_t size, const std::string& name, const DecodeOptions& opt);
// A JPEG decoded row by row into RGB (the same conversions as decode_image; EXIF orientation is
// reported, not applied). Errors are Error(HIWIN_BAD_IMAGE) with the messages of decode_image.
class JpegRows {
 public:
  JpegRows(const uint8_t* data, size_t size, const std::string& name, const DecodeOptions& opt);  // reads the header
  ~JpegRows();
  JpegRows(const JpegRows&) = delete;
  JpegRows& operator=(const JpegRows&) = delete;
  int width() const;
  int height() const;
  int orientation() const;
  const char* mode() const;  // the Pillow mode of the file ("RGB", "L", "CMYK")
  // the next n rows (n <= height - rows read so far), RGB8, into rows[0..n)
  void read(uint8_t* const* rows, int n);
  void finish();  // after the last row: the "image file is truncated" check
  Rgb8 read_all();  // before any read(): every row, finish(), then the EXIF orientation applied
  struct State;  // (decode.cpp)

 private:
  State* s_;
  std::string name_;
};
inline bool is_jpeg(const uint8_t* d, size_t n) { return n >= 3 && d[0] == 0xFF && d[1] == 0xD8 && d[2] == 0xFF; }
// ImageOps.exif_transpose of an RGB image
Rgb8 orient(Rgb8 in, int orientation);
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
// Pillow Image.resize(size, BICUBIC) of RGB images, bit for bit (see resample.cpp).
Rgb8 resize_bicubic(const Rgb8& in, int out_w, int out_h, bool pillow13_order = true, int threads = 1);
void crop_into(const Rgb8& in, int left, int top, Rgb8& out);  // out's size (and buffer) already set

// Several resizes of one source image (the slicer's refined image and overview), run together: the
// source is read once by all horizontal passes, in batches of kBatch rows that can be handed over
// while a JPEG decodes; the work is split over threads.
class Resizer {
 public:
  static constexpr int kBatch = 5;
  Resizer(int in_w, int in_h, const std::vector<std::pair<int, int>>& sizes, bool pillow13_order);
  ~Resizer();
  Resizer(const Resizer&) = delete;
  Resizer& operator=(const Resizer&) = delete;
  // whole source given: every pass, with up to `threads` threads; the results in the order of `sizes`
  std::vector<Rgb8> run(const Rgb8& src, int threads);
  // Row-fed use: true when every resize starts with a horizontal pass over the source (Pillow's order
  // for all but extreme aspect ratios) or is a copy. Then call batch() for every b in
  // [0, num_batches()) (any order, any thread; `slot` < threads picks the scratch), then finish().
  bool row_fed() const;
  int num_batches() const;
  void prepare_threads(int threads);  // scratch for slots [0, threads)
  // source rows [kBatch*b, kBatch*b + kBatch) (entries past the last row are ignored)
  void batch(int b, const uint8_t* const* rows, int slot);
  std::vector<Rgb8> finish(int threads);

 private:
  struct Impl;
  Impl* m_;
};

// Which kernels the resampler uses: "avx512", "avx2" or "generic" (portable C++). The best the CPU
// has, unless $HIWIN_SIMD names a lesser one (read once; for tests).
const char* simd_level();

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
