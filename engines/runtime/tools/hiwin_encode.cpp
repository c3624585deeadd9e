// hiwin-encode: an image -> its slicing plan, crops and normalised tensors (.npy), and with a
// TensorRT build and engines, the visual tokens and the prompt table.
//
//   hiwin-encode IMAGE [--export DIR] [--engines DIR] [--plugin LIB] [--max-slices N] [--out DIR]
//                [--embeddings SEP.npy] [--pre-ids 1,2,3 --post-ids 4,5] [--threads N] [--bench N]
//
// --out writes plan.json, crop_<i>.npy ((3, H, W) float32) and, with engines, tokens.npy (T, C)
// and prompt_ids.npy (int64; the prompt-table form). --embeddings is a (2, C) float32 .npy with the
// LLM's "\n" and "," embeddings. --threads N sets hiwin_options.num_threads (0: all CPUs). --bench N
// times decode + preprocessing N times and prints the best times as JSON.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "hiwin/hiwin.hpp"

namespace {

void write_npy(const std::string& path, const char* descr, const std::vector<size_t>& shape, const void* data,
               size_t nbytes) {
  std::string dict = std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < shape.size(); ++i) dict += (i ? ", " : "") + std::to_string(shape[i]);
  if (shape.size() == 1) dict += ",";
  dict += "), }";
  size_t total = 10 + dict.size() + 1;
  dict.append((64 - total % 64) % 64, ' ');
  dict += '\n';
  std::string tmp = path + ".tmp";
  std::ofstream f(tmp, std::ios::binary);
  f.write("\x93NUMPY\x01\x00", 8);
  uint16_t hl = static_cast<uint16_t>(dict.size());
  char hb[2] = {static_cast<char>(hl & 0xFF), static_cast<char>(hl >> 8)};
  f.write(hb, 2);
  f.write(dict.data(), static_cast<std::streamsize>(dict.size()));
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(nbytes));
  f.close();
  if (!f || std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot write " + path);
}

// (2, C) float32 little-endian .npy
std::vector<float> read_npy_f32(const std::string& path, size_t& rows, size_t& cols) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open");
  char magic[10];
  f.read(magic, 10);
  if (!f || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + ": not a .npy file");
  size_t hl = static_cast<unsigned char>(magic[8]) | (static_cast<unsigned char>(magic[9]) << 8);
  std::string header(hl, ' ');
  f.read(&header[0], static_cast<std::streamsize>(hl));
  if (header.find("'<f4'") == std::string::npos || header.find("'fortran_order': False") == std::string::npos)
    throw std::runtime_error(path + ": need a C-order float32 array");
  size_t a = header.find("'shape': ("), b = header.find(')', a);
  std::string dims = header.substr(a + 10, b - a - 10);
  if (std::sscanf(dims.c_str(), "%zu, %zu", &rows, &cols) != 2) throw std::runtime_error(path + ": need a 2-D array");
  std::vector<float> v(rows * cols);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(v.size() * 4));
  if (!f) throw std::runtime_error(path + ": truncated");
  return v;
}

std::vector<int64_t> parse_ids(const std::string& s) {
  std::vector<int64_t> v;
  std::stringstream ss(s);
  std::string t;
  while (std::getline(ss, t, ','))
    if (!t.empty()) v.push_back(std::stoll(t));
  return v;
}

int usage() {
  std::fprintf(stderr,
               "usage: hiwin-encode IMAGE [--export DIR] [--engines DIR] [--plugin LIB] [--max-slices N]\n"
               "                    [--out DIR] [--embeddings SEP.npy] [--pre-ids IDS] [--post-ids IDS] [--threads N]\n"
               "                    [--bench N]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string image, export_dir, engines, plugin, out, emb, pre_s, post_s;
  int max_slices = 0, bench = 0, threads = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      return argv[++i];
    };
    try {
      if (a == "--export") export_dir = next();
      else if (a == "--engines") engines = next();
      else if (a == "--plugin") plugin = next();
      else if (a == "--max-slices") max_slices = std::stoi(next());
      else if (a == "--out") out = next();
      else if (a == "--embeddings") emb = next();
      else if (a == "--pre-ids") pre_s = next();
      else if (a == "--post-ids") post_s = next();
      else if (a == "--bench") bench = std::stoi(next());
      else if (a == "--threads") threads = std::stoi(next());
      else if (a == "-h" || a == "--help") return usage(), 0;
      else if (!a.empty() && a[0] == '-') return usage();
      else image = a;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "hiwin-encode: %s\n", e.what());
      return 2;
    }
  }
  if (image.empty()) return usage();
  if (!engines.empty() && export_dir.empty()) {
    std::fprintf(stderr, "hiwin-encode: --engines needs --export (the export directory the engines were built from)\n");
    return 2;
  }
  try {
    hiwin_options opt;
    hiwin_options_default(&opt);
    opt.num_threads = threads;
    hiwin::Context ctx = export_dir.empty() ? hiwin::Context(opt) : hiwin::Context::from_export(export_dir, engines, plugin, &opt);
    if (bench > 0) {
      std::ifstream f(image, std::ios::binary);
      std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
      hiwin_options one = ctx.options();
      one.num_threads = 1;
      hiwin::Context ctx1(one);  // the same settings on the calling thread only
      // two steps (decode, then prepare), the one-call path (hiwin_prepare_memory: JPEG rows resized
      // on other threads while it decodes), and the one-call path on one thread
      double dec = 1e30, prep = 1e30, one_call = 1e30, one_call_1t = 1e30;
      auto secs = [](std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
        return std::chrono::duration<double>(b - a).count();
      };
      for (int r = 0; r < bench; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        hiwin::Image img = ctx.decode(bytes.data(), bytes.size());
        auto t1 = std::chrono::steady_clock::now();
        hiwin::Prepared p = ctx.prepare(img, max_slices);
        auto t2 = std::chrono::steady_clock::now();
        hiwin::Prepared q = ctx.prepare_memory(bytes.data(), bytes.size(), max_slices);
        auto t3 = std::chrono::steady_clock::now();
        hiwin::Prepared q1 = ctx1.prepare_memory(bytes.data(), bytes.size(), max_slices);
        auto t4 = std::chrono::steady_clock::now();
        dec = std::min(dec, secs(t0, t1));
        prep = std::min(prep, secs(t1, t2));
        one_call = std::min(one_call, secs(t2, t3));
        one_call_1t = std::min(one_call_1t, secs(t3, t4));
      }
      std::printf("{\"decode_s\": %.6f, \"prepare_s\": %.6f, \"total_s\": %.6f, \"one_call_s\": %.6f, "
                  "\"one_call_1t_s\": %.6f, \"repeats\": %d, \"threads\": %d, \"simd\": \"%s\"}\n",
                  dec, prep, dec + prep, one_call, one_call_1t, bench, threads, hiwin_simd_level());
      return 0;
    }
    hiwin::Image img = ctx.decode_file(image);
    hiwin::Prepared p = ctx.prepare(img, max_slices);
    hiwin_plan pl = p.plan();
    std::ostringstream js;
    js << "{\"image_size\": [" << pl.image_width << ", " << pl.image_height << "], \"overview_size\": ["
       << pl.overview_width << ", " << pl.overview_height << "], \"grid\": ";
    if (pl.grid_cols) js << "[" << pl.grid_cols << ", " << pl.grid_rows << "]";
    else js << "null";
    js << ", \"refined_size\": ";
    if (pl.grid_cols) js << "[" << pl.refined_width << ", " << pl.refined_height << "]";
    else js << "null";
    js << ", \"boxes\": [";
    for (int i = 0; i + 1 < pl.num_crops; ++i) {
      hiwin_crop c = p.crop(i);
      js << (i ? ", " : "") << "[" << c.left << ", " << c.top << ", " << c.left + c.width << ", " << c.top + c.height << "]";
    }
    js << "], \"source_mode\": \"" << img.source_mode() << "\"}";
    std::printf("%s\n", js.str().c_str());
    if (!out.empty()) {
      std::ofstream(out + "/plan.json") << js.str() << "\n";
      for (int i = 0; i < pl.num_crops; ++i) {
        hiwin_crop c = p.crop(i);
        write_npy(out + "/crop_" + std::to_string(i) + ".npy", "<f4",
                  {3, static_cast<size_t>(c.height), static_cast<size_t>(c.width)}, c.pixels,
                  sizeof(float) * 3 * c.width * c.height);
      }
    }
    if (!engines.empty()) {
      if (emb.empty()) throw std::runtime_error("--engines needs --embeddings (the LLM's \\n and , rows, (2, C) float32)");
      size_t rows = 0, cols = 0;
      std::vector<float> sep = read_npy_f32(emb, rows, cols);
      if (rows != 2) throw std::runtime_error(emb + ": need 2 rows (newline, comma)");
      std::vector<float> tok = ctx.encode(p, sep.data(), sep.data() + cols);
      const size_t t = tok.size() / cols;
      std::vector<int64_t> ids = hiwin::prompt_table_ids(parse_ids(pre_s), t, parse_ids(post_s), ctx.options().vocab_size);
      if (!out.empty()) {
        write_npy(out + "/tokens.npy", "<f4", {t, cols}, tok.data(), tok.size() * sizeof(float));
        write_npy(out + "/prompt_ids.npy", "<i8", {ids.size()}, ids.data(), ids.size() * sizeof(int64_t));
      }
      std::printf("visual tokens: %zu x %zu, prompt ids: %zu\n", t, cols, ids.size());
    }
  } catch (const hiwin::Exception& e) {
    std::fprintf(stderr, "hiwin-encode: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hiwin-encode: %s\n", e.what());
    return 1;
  }
  return 0;
}
