// hiwin-prompt-table: an image and a tokenized prompt -> generated token ids, with the vision half on
// hiwin's TensorRT engines and the language half on TensorRT-LLM's executor (C++ API), which takes
// the visual tokens as a prompt table: the prompt's ids are  pre..., vocab .. vocab+T-1, post...
// (hiwin_prompt_table_ids) and row t of the table is visual token t.
//
//   hiwin-prompt-table --export DIR --engines DIR --llm-engine DIR --embeddings SEP.npy
//                      --pre-ids 1,319,... --post-ids 29901,... IMAGE [--max-new-tokens 128] [--fp32-table]
//
// SEP.npy: (2, C) float32, the LLM's embeddings of "\n" and "," (hiwin-export writes them with the
// export; or take rows newline/comma of the LLM's embedding matrix). Token ids come from the model's
// tokenizer (not part of this sample): e.g. `hiwin-run --print-ids`. The LLM engine must be built with
// max_prompt_embedding_table_size >= the number of visual tokens (hiwin_num_image_tokens) and the
// table must have the engine's dtype (fp16 by default here). Built only when TensorRT-LLM is found
// (CMake TENSORRT_LLM_ROOT).
#include <tensorrt_llm/executor/executor.h>
#include <tensorrt_llm/plugins/api/tllmPlugin.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "hiwin/hiwin.hpp"

namespace tle = tensorrt_llm::executor;

namespace {

std::vector<int64_t> parse_ids(const std::string& s) {
  std::vector<int64_t> v;
  std::stringstream ss(s);
  std::string t;
  while (std::getline(ss, t, ','))
    if (!t.empty()) v.push_back(std::stoll(t));
  return v;
}

std::vector<float> read_sep(const std::string& path, size_t& cols) {
  std::ifstream f(path, std::ios::binary);
  char magic[10];
  if (!f.read(magic, 10) || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + ": not a .npy file");
  size_t hl = static_cast<unsigned char>(magic[8]) | (static_cast<unsigned char>(magic[9]) << 8);
  std::string header(hl, ' ');
  f.read(&header[0], static_cast<std::streamsize>(hl));
  size_t rows = 0;
  size_t a = header.find("'shape': (");
  if (header.find("'<f4'") == std::string::npos || a == std::string::npos ||
      std::sscanf(header.c_str() + a + 10, "%zu, %zu", &rows, &cols) != 2 || rows != 2)
    throw std::runtime_error(path + ": need a (2, C) float32 array");
  std::vector<float> v(2 * cols);
  if (!f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(v.size() * 4)))
    throw std::runtime_error(path + ": truncated");
  return v;
}

uint16_t to_half(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u, mant = x & 0x7FFFFFu;
  int exp = static_cast<int>((x >> 23) & 0xFF) - 112;
  if (((x >> 23) & 0xFF) == 0xFF) return static_cast<uint16_t>(sign | 0x7C00u | (mant ? 0x200u : 0));
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7C00u);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    int shift = 14 - exp;
    uint32_t h = mant >> shift, rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (h & 1))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (static_cast<uint32_t>(exp) << 10) | (mant >> 13), rem = mant & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}

}  // namespace

int main(int argc, char** argv) {
  std::string export_dir, engines, llm, emb, pre_s, post_s, image, plugin;
  int max_new = 128;
  bool fp32_table = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--export") export_dir = next();
    else if (a == "--engines") engines = next();
    else if (a == "--plugin") plugin = next();
    else if (a == "--llm-engine") llm = next();
    else if (a == "--embeddings") emb = next();
    else if (a == "--pre-ids") pre_s = next();
    else if (a == "--post-ids") post_s = next();
    else if (a == "--max-new-tokens") max_new = std::stoi(next());
    else if (a == "--fp32-table") fp32_table = true;
    else image = a;
  }
  if (export_dir.empty() || engines.empty() || llm.empty() || emb.empty() || image.empty()) {
    std::fprintf(stderr, "usage: hiwin-prompt-table --export DIR --engines DIR --llm-engine DIR --embeddings SEP.npy "
                         "--pre-ids IDS --post-ids IDS IMAGE [--max-new-tokens N] [--fp32-table]\n");
    return 2;
  }
  try {
    hiwin::Context ctx = hiwin::Context::from_export(export_dir, engines, plugin);
    size_t hidden = 0;
    std::vector<float> sep = read_sep(emb, hidden);
    hiwin::Image img = ctx.decode_file(image);
    hiwin::Prepared prepared = ctx.prepare(img);
    std::vector<float> visual = ctx.encode(prepared, sep.data(), sep.data() + hidden);
    const size_t t = visual.size() / hidden;
    std::vector<int64_t> ids = hiwin::prompt_table_ids(parse_ids(pre_s), t, parse_ids(post_s), ctx.options().vocab_size);

    initTrtLlmPlugins();
    tle::Executor executor(llm, tle::ModelType::kDECODER_ONLY, tle::ExecutorConfig());
    tle::Tensor table = tle::Tensor::cpu(fp32_table ? tle::DataType::kFP32 : tle::DataType::kFP16,
                                         tle::Shape{static_cast<tle::SizeType32>(t), static_cast<tle::SizeType32>(hidden)});
    if (fp32_table) {
      std::memcpy(table.getData(), visual.data(), visual.size() * sizeof(float));
    } else {
      auto* h = static_cast<uint16_t*>(table.getData());
      for (size_t i = 0; i < visual.size(); ++i) h[i] = to_half(visual[i]);
    }
    tle::VecTokens tokens(ids.begin(), ids.end());
    // only the generated ids back (excludeInputFromOutput), greedy by default
    tle::Request request(tokens, max_new, false, tle::SamplingConfig(), tle::OutputConfig(false, false, false, true));
    request.setPromptTuningConfig(tle::PromptTuningConfig(table));
    tle::IdType id = executor.enqueueRequest(request);
    bool done = false;
    std::vector<tle::TokenIdType> out;
    while (!done) {
      for (const auto& r : executor.awaitResponses(id)) {
        if (r.hasError()) throw std::runtime_error("TensorRT-LLM: " + r.getErrorMsg());
        const tle::Result& res = r.getResult();
        out = res.outputTokenIds.at(0);
        done = res.isFinal;
      }
    }
    std::printf("visual tokens: %zu, prompt ids: %zu\noutput ids:", t, ids.size());
    for (auto v : out) std::printf(" %d", static_cast<int>(v));
    std::printf("\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hiwin-prompt-table: %s\n", e.what());
    return 1;
  }
  return 0;
}
