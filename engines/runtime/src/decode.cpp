// JPEG / PNG decoding into the RGB image hiwin_runtime.image.load_image produces with Pillow.
//
// JPEG (system libjpeg / libjpeg-turbo, the library Pillow bundles): libjpeg's defaults, as
//   Pillow decodes without draft mode (JDCT_ISLOW integer IDCT, fancy up-sampling); 1 component
//   -> "L", 3 -> "RGB" (libjpeg's YCbCr->RGB), 4 -> "CMYK" decoded as Adobe-inverted CMYK like
//   Pillow's rawmode "CMYK;I". A file that ends before the image data does is an error (Pillow
//   raises "image file is truncated").
// PNG (libpng, no colour transforms; Pillow has its own PNG reader, PNG is lossless, so only the
//   mode mapping matters): 1-bit grey -> "1"; 2/4-bit grey scaled to 8 bits (x*85, x*17);
//   16-bit grey -> "I;16"; 16-bit RGB(A)/LA keep the high byte; palettes with tRNS get per-entry
//   alpha; gamma / iCCP / sBIT are ignored, as Pillow ignores them.
// Then to_rgb (alpha composited onto the background with Pillow's alpha_composite arithmetic,
// "I;16" scaled by 255/65535 with round-half-even, CMYK by Pillow's cmyk2rgb) and the EXIF
// orientation (ImageOps.exif_transpose) from a JPEG APP1 "Exif" segment or a PNG eXIf chunk.
#include <cstddef>
#include <cstdio>
#include <jpeglib.h>
#include <png.h>

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>

#include "internal.h"

namespace hiwin {
namespace {

// A decoded image in one of the Pillow modes we map to.
enum class Mode { One, L, LA, LA16, RGB, RGBA, P, CMYK, I16 };

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::One: return "1";
    case Mode::L: return "L";
    case Mode::LA: return "LA";
    case Mode::LA16: return "RGBA";  // Pillow opens 16-bit grey+alpha PNG as RGBA (rawmode LA;16B)
    case Mode::RGB: return "RGB";
    case Mode::RGBA: return "RGBA";
    case Mode::P: return "P";
    case Mode::CMYK: return "CMYK";
    case Mode::I16: return "I;16";
  }
  return "?";
}

struct Raw {
  Mode mode = Mode::RGB;
  int width = 0, height = 0;
  std::vector<uint8_t> px8;    // bands per pixel: One/L 1, LA 2, RGB 3, RGBA 4, P 1, CMYK 4
  std::vector<uint16_t> px16;  // I16
  uint8_t palette[256][4];     // P: RGBA (Pillow's default palette is a grey ramp)
  bool has_transparency = false;
  int orientation = 1;
  Raw() {
    for (int i = 0; i < 256; ++i) palette[i][0] = palette[i][1] = palette[i][2] = static_cast<uint8_t>(i), palette[i][3] = 255;
  }
};

void check_size(int64_t w, int64_t h, const std::string& name, const DecodeOptions& opt) {
  if (w < 1 || h < 1)
    throw Error(HIWIN_BAD_IMAGE, name + ": image has no pixels (" + std::to_string(w) + "x" + std::to_string(h) + ")");
  if (opt.max_pixels > 0 && w * h > opt.max_pixels)
    throw Error(HIWIN_BAD_IMAGE, name + ": " + std::to_string(w) + "x" + std::to_string(h) +
                                     " exceeds the decompression-bomb limit of " + std::to_string(opt.max_pixels) +
                                     " pixels (set max_pixels to 0 for trusted inputs)");
}

// ---------------------------------------------------------------------------------- EXIF
uint32_t rd(const uint8_t* p, bool le, int n) {
  uint32_t v = 0;
  for (int i = 0; i < n; ++i) v |= static_cast<uint32_t>(p[le ? i : n - 1 - i]) << (8 * i);
  return v;
}

// Orientation tag (0x0112) of IFD0 of a TIFF-structured EXIF block; 1 when absent or unreadable.
int exif_orientation(const uint8_t* d, size_t n) {
  if (n >= 6 && std::memcmp(d, "Exif\0\0", 6) == 0) d += 6, n -= 6;
  if (n < 8) return 1;
  bool le;
  if (d[0] == 'I' && d[1] == 'I') le = true;
  else if (d[0] == 'M' && d[1] == 'M') le = false;
  else return 1;
  uint32_t ifd = rd(d + 4, le, 4);
  if (ifd > n || n - ifd < 2) return 1;
  uint32_t count = rd(d + ifd, le, 2);
  for (uint32_t i = 0; i < count; ++i) {
    size_t e = static_cast<size_t>(ifd) + 2 + static_cast<size_t>(i) * 12;
    if (e + 12 > n) return 1;
    if (rd(d + e, le, 2) == 0x0112) {
      uint32_t type = rd(d + e + 2, le, 2);
      uint32_t v = type == 3 ? rd(d + e + 8, le, 2) : (type == 4 ? rd(d + e + 8, le, 4) : 1);
      return (v >= 1 && v <= 8) ? static_cast<int>(v) : 1;
    }
  }
  return 1;
}

// ---------------------------------------------------------------------------------- JPEG
struct JpegErr {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void jpeg_error_exit(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegErr*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}
void jpeg_quiet(j_common_ptr, int) {}  // warnings (corrupt-but-decodable data) are ignored, as Pillow does

struct JpegSrc {
  jpeg_source_mgr pub;
  const uint8_t* data;
  size_t size;
  bool truncated;
};
const JOCTET kEoi[2] = {0xFF, JPEG_EOI};
void src_init(j_decompress_ptr) {}
boolean src_fill(j_decompress_ptr cinfo) {
  auto* s = reinterpret_cast<JpegSrc*>(cinfo->src);
  s->truncated = true;  // everything was handed out at once: more asked for means the file ended early
  s->pub.next_input_byte = kEoi;
  s->pub.bytes_in_buffer = 2;
  return TRUE;
}
void src_skip(j_decompress_ptr cinfo, long n) {
  auto* s = reinterpret_cast<JpegSrc*>(cinfo->src);
  if (n <= 0) return;
  while (static_cast<size_t>(n) > s->pub.bytes_in_buffer) {
    n -= static_cast<long>(s->pub.bytes_in_buffer);
    src_fill(cinfo);
  }
  s->pub.next_input_byte += n;
  s->pub.bytes_in_buffer -= static_cast<size_t>(n);
}
void src_term(j_decompress_ptr) {}

// one decoded JPEG row (raw mode) -> RGB, as to_rgb does for the whole image
void jpeg_row_to_rgb(Mode mode, const uint8_t* in, uint8_t* out, int w) {
  if (mode == Mode::L) {
    for (int x = 0; x < w; ++x) out[3 * x] = out[3 * x + 1] = out[3 * x + 2] = in[x];
  } else if (mode == Mode::CMYK) {
    // Adobe CMYK is stored inverted (Pillow's rawmode "CMYK;I" undoes it), then Pillow's cmyk2rgb
    for (int x = 0; x < w; ++x) {
      const uint8_t* c = in + 4 * x;
      unsigned nk = 255u - (255u - c[3]);
      for (int k = 0; k < 3; ++k) {
        unsigned v = 255u - c[k], t = v * nk + 128;
        int r = static_cast<int>(nk) - static_cast<int>(((t >> 8) + t) >> 8);
        out[3 * x + k] = static_cast<uint8_t>(r < 0 ? 0 : r);
      }
    }
  }
}

}  // namespace

// The libjpeg state of a JpegRows. The functions below that call libjpeg are plain C-style code
// between setjmp and longjmp (no object with a destructor is created there); each returns nullptr
// or the error text.
struct JpegRows::State {
  jpeg_decompress_struct cinfo;
  JpegErr err;
  JpegSrc src;
  bool created = false;
  Mode mode = Mode::RGB;
  int orientation = 1;
  std::vector<uint8_t> raw;  // L / CMYK rows before conversion
  State() = default;
  State(const State&) = delete;
  State& operator=(const State&) = delete;
  ~State() {
    if (created) jpeg_destroy_decompress(&cinfo);
  }
};

namespace {

const char* jpeg_open_c(JpegRows::State* s, const uint8_t* data, size_t size) {
  s->cinfo.err = jpeg_std_error(&s->err.mgr);
  s->err.mgr.error_exit = jpeg_error_exit;
  s->err.mgr.emit_message = jpeg_quiet;
  s->err.message[0] = 0;
  if (setjmp(s->err.jump)) return s->err.message[0] ? s->err.message : "libjpeg error";
  s->created = true;
  jpeg_create_decompress(&s->cinfo);
  JpegSrc& src = s->src;
  src.pub.init_source = src_init;
  src.pub.fill_input_buffer = src_fill;
  src.pub.skip_input_data = src_skip;
  src.pub.resync_to_restart = jpeg_resync_to_restart;
  src.pub.term_source = src_term;
  src.pub.next_input_byte = data;
  src.pub.bytes_in_buffer = size;
  src.data = data;
  src.size = size;
  src.truncated = false;
  s->cinfo.src = &src.pub;
  jpeg_save_markers(&s->cinfo, JPEG_APP0 + 1, 0xFFFF);
  jpeg_read_header(&s->cinfo, TRUE);
  if (src.truncated) return "image file is truncated (the headers end early)";
  for (jpeg_saved_marker_ptr m = s->cinfo.marker_list; m; m = m->next)
    if (m->marker == JPEG_APP0 + 1 && m->data_length >= 6 && std::memcmp(m->data, "Exif\0\0", 6) == 0) {
      s->orientation = exif_orientation(m->data, m->data_length);
      break;
    }
  const int comps = s->cinfo.num_components;
  if (comps == 1) s->mode = Mode::L, s->cinfo.out_color_space = JCS_GRAYSCALE;
  else if (comps == 3) s->mode = Mode::RGB, s->cinfo.out_color_space = JCS_RGB;
  else if (comps == 4) s->mode = Mode::CMYK, s->cinfo.out_color_space = JCS_CMYK;
  else return "unsupported";
  return nullptr;
}

// libjpeg defaults, as Pillow (no draft): JDCT_ISLOW, fancy up-sampling, no block smoothing change
const char* jpeg_start_c(JpegRows::State* s) {
  if (setjmp(s->err.jump)) return s->err.message[0] ? s->err.message : "libjpeg error";
  jpeg_start_decompress(&s->cinfo);
  return nullptr;
}

const char* jpeg_read_c(JpegRows::State* s, JSAMPROW* rows, int n) {
  if (setjmp(s->err.jump)) return s->err.message[0] ? s->err.message : "libjpeg error";
  int done = 0;
  while (done < n) {
    JDIMENSION got = jpeg_read_scanlines(&s->cinfo, rows + done, static_cast<JDIMENSION>(n - done));
    if (got == 0) return "no more rows";
    done += static_cast<int>(got);
  }
  return nullptr;
}

const char* jpeg_finish_c(JpegRows::State* s) {
  if (setjmp(s->err.jump)) return s->err.message[0] ? s->err.message : "libjpeg error";
  if (s->src.truncated) return "image file is truncated";
  jpeg_finish_decompress(&s->cinfo);
  if (s->src.truncated) return "image file is truncated";
  return nullptr;
}

}  // namespace

JpegRows::JpegRows(const uint8_t* data, size_t size, const std::string& name, const DecodeOptions& opt)
    : s_(new State()), name_(name) {
  std::unique_ptr<State> guard(s_);
  const char* e = jpeg_open_c(s_, data, size);
  if (e && std::strcmp(e, "unsupported") == 0)
    throw Error(HIWIN_BAD_IMAGE, name + ": corrupt or truncated image (unsupported JPEG with " +
                                     std::to_string(s_->cinfo.num_components) + " components)");
  if (e) throw Error(HIWIN_BAD_IMAGE, name + ": corrupt or truncated image (" + e + ")");
  check_size(s_->cinfo.image_width, s_->cinfo.image_height, name, opt);
  e = jpeg_start_c(s_);
  if (e) throw Error(HIWIN_BAD_IMAGE, name + ": corrupt or truncated image (" + e + ")");
  if (s_->mode != Mode::RGB) s_->raw.resize(static_cast<size_t>(s_->cinfo.output_width) * s_->cinfo.output_components);
  guard.release();
}

JpegRows::~JpegRows() { delete s_; }

int JpegRows::width() const { return static_cast<int>(s_->cinfo.image_width); }
int JpegRows::height() const { return static_cast<int>(s_->cinfo.image_height); }
int JpegRows::orientation() const { return s_->orientation; }
const char* JpegRows::mode() const { return mode_name(s_->mode); }

void JpegRows::read(uint8_t* const* rows, int n) {
  if (n <= 0) return;
  if (static_cast<JDIMENSION>(n) > s_->cinfo.output_height - s_->cinfo.output_scanline)
    throw Error(HIWIN_INTERNAL, "JpegRows::read past the last row");
  if (s_->mode == Mode::RGB) {
    const char* e = jpeg_read_c(s_, const_cast<JSAMPROW*>(reinterpret_cast<JSAMPROW const*>(rows)), n);
    if (e) throw Error(HIWIN_BAD_IMAGE, name_ + ": corrupt or truncated image (" + e + ")");
    return;
  }
  for (int i = 0; i < n; ++i) {
    JSAMPROW r = s_->raw.data();
    const char* e = jpeg_read_c(s_, &r, 1);
    if (e) throw Error(HIWIN_BAD_IMAGE, name_ + ": corrupt or truncated image (" + e + ")");
    jpeg_row_to_rgb(s_->mode, r, rows[i], width());
  }
}

void JpegRows::finish() {
  const char* e = jpeg_finish_c(s_);
  if (e) throw Error(HIWIN_BAD_IMAGE, name_ + ": corrupt or truncated image (" + e + ")");
}

Rgb8 JpegRows::read_all() {
  Rgb8 out;
  out.width = width();
  out.height = height();
  out.source_mode = mode();
  out.data.resize(static_cast<size_t>(out.width) * out.height * 3);
  const size_t stride = static_cast<size_t>(out.width) * 3;
  uint8_t* rows[16];
  for (int y = 0; y < out.height; y += 16) {
    const int n = std::min(16, out.height - y);
    for (int i = 0; i < n; ++i) rows[i] = out.data.data() + stride * static_cast<size_t>(y + i);
    read(rows, n);
  }
  finish();
  return orient(std::move(out), orientation());
}

namespace {

// ---------------------------------------------------------------------------------- PNG
struct PngIo {
  const uint8_t* data;
  size_t size, pos;
  char message[256];
};
void png_read_fn(png_structp png, png_bytep out, png_size_t n) {
  auto* io = static_cast<PngIo*>(png_get_io_ptr(png));
  if (n > io->size - io->pos) png_error(png, "image file is truncated");
  std::memcpy(out, io->data + io->pos, n);
  io->pos += n;
}
void png_err_fn(png_structp png, png_const_charp msg) {
  auto* io = static_cast<PngIo*>(png_get_error_ptr(png));
  std::snprintf(io->message, sizeof io->message, "%s", msg);
  png_longjmp(png, 1);
}
void png_warn_fn(png_structp, png_const_charp) {}

struct PngHeader {
  png_uint_32 w = 0, h = 0;
  int depth = 0, color = 0, interlace = 0;
};

// raw rows (unpacked later); returns "" on success
std::string png_decode_c(const uint8_t* data, size_t size, std::vector<uint8_t>& rows, std::vector<png_bytep>& ptrs,
                         PngHeader& hd, Raw& raw, const std::string& name, const DecodeOptions& opt,
                         std::string& size_error) {
  PngIo io{data, size, 0, {0}};
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &io, png_err_fn, png_warn_fn);
  if (!png) return "out of memory";
  png_infop info = png_create_info_struct(png);
  png_infop end = png_create_info_struct(png);
  if (!info || !end) {
    png_destroy_read_struct(&png, &info, &end);
    return "out of memory";
  }
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, &end);
    return io.message[0] ? io.message : "libpng error";
  }
  png_set_read_fn(png, &io, png_read_fn);
  png_set_user_limits(png, 0x7fffffff, 0x7fffffff);  // our own max_pixels check decides
  png_read_info(png, info);
  png_get_IHDR(png, info, &hd.w, &hd.h, &hd.depth, &hd.color, &hd.interlace, nullptr, nullptr);
  raw.width = static_cast<int>(hd.w);
  raw.height = static_cast<int>(hd.h);
  if (hd.w > 0x7fffffffu || hd.h > 0x7fffffffu) {
    png_destroy_read_struct(&png, &info, &end);
    return "dimensions out of range";
  }
  try {
    check_size(hd.w, hd.h, name, opt);
  } catch (const Error& e) {
    png_destroy_read_struct(&png, &info, &end);
    size_error = e.what();
    return "size";
  }
  if (hd.color == PNG_COLOR_TYPE_PALETTE) {
    png_colorp pal = nullptr;
    int npal = 0;
    if (png_get_PLTE(png, info, &pal, &npal))
      for (int i = 0; i < npal && i < 256; ++i)
        raw.palette[i][0] = pal[i].red, raw.palette[i][1] = pal[i].green, raw.palette[i][2] = pal[i].blue;
    png_bytep trans = nullptr;
    int ntrans = 0;
    if (png_get_tRNS(png, info, &trans, &ntrans, nullptr) && trans) {
      raw.has_transparency = true;
      for (int i = 0; i < ntrans && i < 256; ++i) raw.palette[i][3] = trans[i];
    }
  }
  if (hd.interlace != PNG_INTERLACE_NONE) png_set_interlace_handling(png);
  png_read_update_info(png, info);
  size_t rowbytes = png_get_rowbytes(png, info);
  rows.resize(rowbytes * hd.h);
  ptrs.resize(hd.h);
  for (png_uint_32 y = 0; y < hd.h; ++y) ptrs[y] = rows.data() + rowbytes * y;
  png_read_image(png, ptrs.data());
  // trailing chunks (an eXIf after IDAT, which Pillow reads too)
  png_read_end(png, end);
  png_bytep exif = nullptr;
  png_uint_32 nexif = 0;
  if (png_get_eXIf_1(png, info, &nexif, &exif) && exif) raw.orientation = exif_orientation(exif, nexif);
  else if (png_get_eXIf_1(png, end, &nexif, &exif) && exif) raw.orientation = exif_orientation(exif, nexif);
  png_destroy_read_struct(&png, &info, &end);
  return "";
}

void decode_png(const uint8_t* data, size_t size, Raw& raw, const std::string& name, const DecodeOptions& opt) {
  std::vector<uint8_t> rows;
  std::vector<png_bytep> ptrs;
  PngHeader hd;
  std::string size_error;
  std::string e = png_decode_c(data, size, rows, ptrs, hd, raw, name, opt, size_error);
  if (!size_error.empty()) throw Error(HIWIN_BAD_IMAGE, size_error);
  if (!e.empty()) throw Error(HIWIN_BAD_IMAGE, name + ": corrupt or truncated image (" + e + ")");
  const size_t w = hd.w, h = hd.h, n = w * h;
  const int depth = hd.depth;
  auto sample = [&](const uint8_t* row, size_t i) -> unsigned {  // sub-byte samples, MSB first
    size_t bit = i * depth;
    return (row[bit >> 3] >> (8 - depth - (bit & 7))) & ((1u << depth) - 1);
  };
  switch (hd.color) {
    case PNG_COLOR_TYPE_GRAY:
      if (depth == 16) {
        raw.mode = Mode::I16;
        raw.px16.resize(n);
        for (size_t y = 0; y < h; ++y)
          for (size_t x = 0; x < w; ++x) raw.px16[y * w + x] = static_cast<uint16_t>((ptrs[y][2 * x] << 8) | ptrs[y][2 * x + 1]);
      } else {
        raw.mode = depth == 1 ? Mode::One : Mode::L;
        raw.px8.resize(n);
        const unsigned scale = depth == 1 ? 255 : depth == 2 ? 85 : depth == 4 ? 17 : 1;
        for (size_t y = 0; y < h; ++y)
          for (size_t x = 0; x < w; ++x)
            raw.px8[y * w + x] = static_cast<uint8_t>(depth == 8 ? ptrs[y][x] : sample(ptrs[y], x) * scale);
      }
      break;
    case PNG_COLOR_TYPE_PALETTE:
      raw.mode = Mode::P;
      raw.px8.resize(n);
      for (size_t y = 0; y < h; ++y)
        for (size_t x = 0; x < w; ++x) raw.px8[y * w + x] = static_cast<uint8_t>(depth == 8 ? ptrs[y][x] : sample(ptrs[y], x));
      break;
    case PNG_COLOR_TYPE_RGB:
    case PNG_COLOR_TYPE_RGB_ALPHA:
    case PNG_COLOR_TYPE_GRAY_ALPHA: {
      const int bands = hd.color == PNG_COLOR_TYPE_RGB ? 3 : hd.color == PNG_COLOR_TYPE_RGB_ALPHA ? 4 : 2;
      raw.mode = bands == 3 ? Mode::RGB : bands == 4 ? Mode::RGBA : (depth == 16 ? Mode::LA16 : Mode::LA);
      const int bps = depth / 8;  // 1 or 2 bytes per sample; 16-bit keeps the high byte
      raw.px8.resize(n * bands);
      for (size_t y = 0; y < h; ++y)
        for (size_t i = 0; i < w * bands; ++i) raw.px8[y * w * bands + i] = ptrs[y][i * bps];
      break;
    }
    default:
      throw Error(HIWIN_BAD_IMAGE, name + ": unsupported PNG colour type " + std::to_string(hd.color));
  }
}

// ---------------------------------------------------------------------------------- to RGB
inline uint32_t shiftfordiv255(uint32_t a) { return ((a >> 8) + a) >> 8; }

// Image.alpha_composite(opaque background, rgba pixel), Pillow's integer arithmetic
inline void composite(const uint8_t bg[3], uint8_t r, uint8_t g, uint8_t b, uint8_t a, uint8_t* out) {
  if (a == 0) {
    out[0] = bg[0], out[1] = bg[1], out[2] = bg[2];
    return;
  }
  const uint32_t kBits = 7;
  uint32_t blend = 255u * (255u - a);
  uint32_t outa255 = a * 255u + blend;
  uint32_t coef1 = a * 255u * 255u * (1u << kBits) / outa255;
  uint32_t coef2 = 255u * (1u << kBits) - coef1;
  const uint8_t src[3] = {r, g, b};
  for (int c = 0; c < 3; ++c) {
    uint32_t t = src[c] * coef1 + bg[c] * coef2;
    out[c] = static_cast<uint8_t>(shiftfordiv255(t + (0x80u << kBits)) >> kBits);
  }
}

inline uint8_t muldiv255(unsigned a, unsigned b) {
  unsigned t = a * b + 128;
  return static_cast<uint8_t>(((t >> 8) + t) >> 8);
}

Rgb8 to_rgb(const Raw& raw, const DecodeOptions& opt) {
  Rgb8 out;
  out.width = raw.width;
  out.height = raw.height;
  out.source_mode = mode_name(raw.mode);
  const size_t n = static_cast<size_t>(raw.width) * raw.height;
  out.data.resize(n * 3);
  uint8_t* o = out.data.data();
  const uint8_t* p = raw.px8.data();
  const uint8_t* bg = opt.background;
  switch (raw.mode) {
    case Mode::RGB:
      std::memcpy(o, p, n * 3);
      break;
    case Mode::One:
    case Mode::L:
      for (size_t i = 0; i < n; ++i) o[3 * i] = o[3 * i + 1] = o[3 * i + 2] = p[i];
      break;
    case Mode::I16: {
      const double k = 255.0 / 65535.0;
      for (size_t i = 0; i < n; ++i) {
        double v = std::nearbyint(static_cast<double>(raw.px16[i]) * k);
        uint8_t g = static_cast<uint8_t>(v < 0 ? 0 : v > 255 ? 255 : v);
        o[3 * i] = o[3 * i + 1] = o[3 * i + 2] = g;
      }
      break;
    }
    case Mode::CMYK:
      for (size_t i = 0; i < n; ++i) {
        const uint8_t* c = p + 4 * i;
        unsigned nk = 255u - c[3];
        for (int k = 0; k < 3; ++k) {
          int v = static_cast<int>(nk) - muldiv255(c[k], nk);
          o[3 * i + k] = static_cast<uint8_t>(v < 0 ? 0 : v);
        }
      }
      break;
    case Mode::P:
      for (size_t i = 0; i < n; ++i) {
        const uint8_t* e = raw.palette[p[i]];
        if (raw.has_transparency && opt.alpha_composite) composite(bg, e[0], e[1], e[2], e[3], o + 3 * i);
        else o[3 * i] = e[0], o[3 * i + 1] = e[1], o[3 * i + 2] = e[2];
      }
      break;
    case Mode::LA:
    case Mode::LA16:
      for (size_t i = 0; i < n; ++i) {
        uint8_t l = p[2 * i], a = p[2 * i + 1];
        if (opt.alpha_composite) composite(bg, l, l, l, a, o + 3 * i);
        else o[3 * i] = o[3 * i + 1] = o[3 * i + 2] = l;
      }
      break;
    case Mode::RGBA:
      for (size_t i = 0; i < n; ++i) {
        const uint8_t* c = p + 4 * i;
        if (opt.alpha_composite) composite(bg, c[0], c[1], c[2], c[3], o + 3 * i);
        else o[3 * i] = c[0], o[3 * i + 1] = c[1], o[3 * i + 2] = c[2];
      }
      break;
  }
  return out;
}

}  // namespace

// ImageOps.exif_transpose on the RGB result (every conversion above is per pixel, so the order
// of conversion and transposition does not matter).
Rgb8 orient(Rgb8 in, int orientation) {
  if (orientation <= 1 || orientation > 8) return in;
  const int W = in.width, H = in.height;
  const bool swap = orientation >= 5;
  Rgb8 out;
  out.source_mode = in.source_mode;
  out.width = swap ? H : W;
  out.height = swap ? W : H;
  out.data.resize(in.data.size());
  for (int yo = 0; yo < out.height; ++yo)
    for (int xo = 0; xo < out.width; ++xo) {
      int xi = 0, yi = 0;
      switch (orientation) {
        case 2: xi = W - 1 - xo, yi = yo; break;          // FLIP_LEFT_RIGHT
        case 3: xi = W - 1 - xo, yi = H - 1 - yo; break;  // ROTATE_180
        case 4: xi = xo, yi = H - 1 - yo; break;          // FLIP_TOP_BOTTOM
        case 5: xi = yo, yi = xo; break;                  // TRANSPOSE
        case 6: xi = yo, yi = H - 1 - xo; break;          // ROTATE_270 (clockwise)
        case 7: xi = W - 1 - yo, yi = H - 1 - xo; break;  // TRANSVERSE
        case 8: xi = W - 1 - yo, yi = xo; break;          // ROTATE_90 (counter-clockwise)
      }
      std::memcpy(&out.data[(static_cast<size_t>(yo) * out.width + xo) * 3],
                  &in.data[(static_cast<size_t>(yi) * W + xi) * 3], 3);
    }
  return out;
}

Rgb8 decode_image(const uint8_t* data, size_t size, const std::string& name, const DecodeOptions& opt) {
  if (!data || size == 0) throw Error(HIWIN_BAD_IMAGE, name + ": the file is empty");
  static const uint8_t kPng[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  if (is_jpeg(data, size)) return JpegRows(data, size, name, opt).read_all();
  if (size >= 8 && std::memcmp(data, kPng, 8) == 0) {
    Raw raw;
    decode_png(data, size, raw, name, opt);
    return orient(to_rgb(raw, opt), raw.orientation);
  }
  throw Error(HIWIN_BAD_IMAGE, name + ": not a recognised image file (this library decodes JPEG and PNG; "
                                      "decode other formats yourself and use hiwin_image_from_rgb8)");
}

std::vector<uint8_t> read_file_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw Error(HIWIN_IO_ERROR, path + ": no such file (or it cannot be opened)");
  std::streamoff n = f.tellg();
  if (n < 0) throw Error(HIWIN_IO_ERROR, path + ": cannot read the file");
  if (n == 0) throw Error(HIWIN_BAD_IMAGE, path + ": the file is empty");
  std::vector<uint8_t> buf(static_cast<size_t>(n));
  f.seekg(0);
  if (!f.read(reinterpret_cast<char*>(buf.data()), n)) throw Error(HIWIN_IO_ERROR, path + ": cannot read the file");
  return buf;
}

Rgb8 decode_file(const std::string& path, const DecodeOptions& opt) {
  std::vector<uint8_t> buf = read_file_bytes(path);
  return decode_image(buf.data(), buf.size(), path, opt);
}

}  // namespace hiwin
