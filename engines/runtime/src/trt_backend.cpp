// TensorRT backend of hiwin_encode_image: the vision engines of an engine set built by
// `hiwin-export engines` (engines.json + one serialized engine per graph + the plugin library),
// run the way hiwin_runtime/trt.py runs them: the engine set is checked (format, TensorRT version,
// compute capability, source graphs against manifest.json), the plugin library is loaded into
// TensorRT's registry before any engine is deserialized, and each stage call picks the smallest
// optimisation profile that contains the crop's patch grid, splits batches above the engine's
// batch range, copies float32 (or float16) inputs to the device, enqueues on one CUDA stream and
// copies the outputs back. Calls are serialised by the context (hiwin_encode_image holds its mutex).
#include <NvInfer.h>
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "backend.h"

namespace hiwin {
namespace {

constexpr int kEnginesFormat = 1;

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kERROR) {
      if (!last_.empty()) last_ += "; ";
      last_ += msg;
    }
  }
  std::string take() {
    std::string s;
    s.swap(last_);
    return s;
  }

 private:
  std::string last_;
};

void cuda_check(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess) throw Error(HIWIN_BACKEND_ERROR, what + ": " + cudaGetErrorString(e));
}

std::string read_file(const std::string& path, hiwin_code code) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(code, path + ": not found");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

const Json& at(const Json& j, const char* key, const std::string& where) {
  const Json* v = j.get(key);
  if (!v) throw Error(HIWIN_BAD_MANIFEST, where + ": missing \"" + key + "\"");
  return *v;
}

int as_int(const Json& j, const std::string& where) {
  if (j.type != Json::Number) throw Error(HIWIN_BAD_MANIFEST, where + ": not a number");
  return static_cast<int>(j.num);
}

// float <-> IEEE half (round to nearest even), for engines with float16 I/O
uint16_t to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u, mant = x & 0x7FFFFFu;
  int exp = static_cast<int>((x >> 23) & 0xFF) - 127 + 15;
  if (((x >> 23) & 0xFF) == 0xFF) return static_cast<uint16_t>(sign | 0x7C00u | (mant ? 0x200u : 0));
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7C00u);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    int shift = 14 - exp;
    uint32_t half = mant >> shift, rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = (static_cast<uint32_t>(exp) << 10) | (mant >> 13), rem = mant & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1))) ++half;
  return static_cast<uint16_t>(sign | half);
}

float from_half(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FFu, x;
  if (exp == 0) {
    if (!mant) x = sign;
    else {
      int e = -1;
      do { mant <<= 1; ++e; } while (!(mant & 0x400u));
      x = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3FFu) << 13);
    }
  } else if (exp == 31) {
    x = sign | 0x7F800000u | (mant << 13);
  } else {
    x = sign | ((exp - 15 + 127) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

struct Profile {
  int h0, h1, w0, w1;
};

struct Axis {  // the patch-grid axis of an input: axis index and pixels per patch
  int axis = -1, mult = 1;
};

class Engine {
 public:
  Engine(nvinfer1::IRuntime& runtime, Logger& logger, const std::string& dir, const std::string& name, const Json& e)
      : name_(name) {
    const std::string where = "engines.json: engine " + name;
    file_ = dir + "/" + at(e, "file", where).str;
    std::string blob = read_file(file_, HIWIN_BAD_MANIFEST);
    engine_.reset(runtime.deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine_)
      throw Error(HIWIN_BACKEND_ERROR, file_ + ": TensorRT could not deserialize the engine (" + logger.take() +
                                           "; a plugin library that is not loaded?)");
    for (const auto& p : at(e, "profiles", where).arr) {
      const Json& h = at(p, "h", where);
      const Json& w = at(p, "w", where);
      if (h.arr.size() != 3 || w.arr.size() != 3) throw Error(HIWIN_BAD_MANIFEST, where + ": bad profile");
      profiles_.push_back({as_int(h.arr[0], where), as_int(h.arr[2], where), as_int(w.arr[0], where),
                           as_int(w.arr[2], where)});
    }
    if (engine_->getNbOptimizationProfiles() != static_cast<int>(profiles_.size()))
      throw Error(HIWIN_BAD_MANIFEST, file_ + ": the engine has " + std::to_string(engine_->getNbOptimizationProfiles()) +
                                          " optimisation profiles, engines.json lists " + std::to_string(profiles_.size()));
    const Json& batch = at(e, "batch", where);
    max_batch_ = batch.arr.size() == 3 ? as_int(batch.arr[2], where) : 1;
    for (const auto& in : at(e, "inputs", where).arr) {
      std::string n = at(in, "name", where).str;
      Axis hx, wx;
      for (const auto& kv : at(in, "dynamic_axes", where).obj) {
        const std::string& sym = kv.second.str;
        if (sym.empty() || sym == "batch") continue;
        char c = sym.back();
        int mult = sym.size() > 1 ? std::stoi(sym.substr(0, sym.size() - 1)) : 1;
        if (c == 'h') hx = {std::stoi(kv.first), mult};
        if (c == 'w') wx = {std::stoi(kv.first), mult};
      }
      inputs_.push_back(n);
      grid_axes_[n] = {hx, wx};
    }
    for (int i = 0; i < engine_->getNbIOTensors(); ++i) {
      const char* t = engine_->getIOTensorName(i);
      if (engine_->getTensorIOMode(t) != nvinfer1::TensorIOMode::kINPUT) outputs_.push_back(t);
      auto dt = engine_->getTensorDataType(t);
      if (dt != nvinfer1::DataType::kFLOAT && dt != nvinfer1::DataType::kHALF)
        throw Error(HIWIN_BACKEND_ERROR, file_ + ": tensor " + t + " is neither float32 nor float16");
      half_[t] = dt == nvinfer1::DataType::kHALF;
    }
    context_.reset(engine_->createExecutionContext());
    if (!context_) throw Error(HIWIN_BACKEND_ERROR, file_ + ": no execution context (out of GPU memory?)");
  }

  ~Engine() {
    for (auto& kv : buffers_) cudaFree(kv.second.first);
  }

  // named inputs (same batch) -> named outputs
  std::map<std::string, Tensor> run(const std::map<std::string, const Tensor*>& feeds, cudaStream_t stream,
                                    Logger& logger) {
    int h = -1, w = -1;
    for (const auto& n : inputs_) {
      auto ax = grid_axes_[n];
      auto it = feeds.find(n);
      if (it == feeds.end()) throw Error(HIWIN_INTERNAL, name_ + ": no feed for input " + n);
      if (ax.first.axis >= 0 && ax.second.axis >= 0) {
        h = static_cast<int>(it->second->shape[ax.first.axis] / ax.first.mult);
        w = static_cast<int>(it->second->shape[ax.second.axis] / ax.second.mult);
        break;
      }
    }
    int best = -1;
    long best_area = 0;
    for (size_t i = 0; i < profiles_.size(); ++i) {
      const Profile& p = profiles_[i];
      if (p.h0 <= h && h <= p.h1 && p.w0 <= w && w <= p.w1) {
        long area = static_cast<long>(p.h1 - p.h0 + 1) * (p.w1 - p.w0 + 1);
        if (best < 0 || area < best_area) best = static_cast<int>(i), best_area = area;
      }
    }
    if (best < 0)
      throw Error(HIWIN_BACKEND_ERROR, name_ + ": no optimisation profile covers a crop of " + std::to_string(h) + "x" +
                                           std::to_string(w) + " patches");
    const int64_t batch = feeds.begin()->second->shape[0];
    if (batch <= max_batch_) return run_once(best, feeds, 0, batch, stream, logger);
    std::map<std::string, Tensor> all;
    for (int64_t b0 = 0; b0 < batch; b0 += max_batch_) {
      auto part = run_once(best, feeds, b0, std::min<int64_t>(batch, b0 + max_batch_), stream, logger);
      for (auto& kv : part) {
        Tensor& t = all[kv.first];
        if (t.shape.empty()) t.shape = kv.second.shape, t.shape[0] = 0;
        t.shape[0] += kv.second.shape[0];
        t.data.insert(t.data.end(), kv.second.data.begin(), kv.second.data.end());
      }
    }
    return all;
  }

 private:
  void* buffer(const std::string& n, size_t bytes) {
    auto& b = buffers_[n];
    if (bytes > b.second) {
      if (b.first) cudaFree(b.first);
      b = {nullptr, 0};
      cuda_check(cudaMalloc(&b.first, bytes), name_ + ": cudaMalloc");
      b.second = bytes;
    }
    return b.first;
  }

  std::map<std::string, Tensor> run_once(int profile, const std::map<std::string, const Tensor*>& feeds, int64_t b0,
                                         int64_t b1, cudaStream_t stream, Logger& logger) {
    if (active_ != profile) {
      if (!context_->setOptimizationProfileAsync(profile, stream))
        throw Error(HIWIN_BACKEND_ERROR, name_ + ": TensorRT refused optimisation profile " + std::to_string(profile));
      active_ = profile;
    }
    std::vector<std::vector<uint8_t>> staging;  // host data alive until the stream is synchronised
    for (const auto& n : inputs_) {
      const Tensor& t = *feeds.at(n);
      nvinfer1::Dims d;
      d.nbDims = static_cast<int32_t>(t.shape.size());
      size_t per = 1;
      for (size_t k = 0; k < t.shape.size(); ++k) {
        d.d[k] = k == 0 ? (b1 - b0) : t.shape[k];
        if (k) per *= static_cast<size_t>(t.shape[k]);
      }
      if (!context_->setInputShape(n.c_str(), d))
        throw Error(HIWIN_BACKEND_ERROR, name_ + ": input " + n + " is outside optimisation profile " +
                                             std::to_string(profile) + " (" + logger.take() + ")");
      const float* src = t.data.data() + static_cast<size_t>(b0) * per;
      const size_t count = static_cast<size_t>(b1 - b0) * per;
      staging.emplace_back();
      auto& host = staging.back();
      if (half_[n]) {
        host.resize(count * 2);
        for (size_t i = 0; i < count; ++i) {
          uint16_t v = to_half(src[i]);
          std::memcpy(&host[i * 2], &v, 2);
        }
      } else {
        host.resize(count * 4);
        std::memcpy(host.data(), src, count * 4);
      }
      void* dev = buffer(n, host.size() ? host.size() : 1);
      cuda_check(cudaMemcpyAsync(dev, host.data(), host.size(), cudaMemcpyHostToDevice, stream), name_ + ": copy in");
      context_->setTensorAddress(n.c_str(), dev);
    }
    std::map<std::string, Tensor> outs;
    std::map<std::string, std::vector<uint8_t>> raw;
    for (const auto& n : outputs_) {
      nvinfer1::Dims d = context_->getTensorShape(n.c_str());
      Tensor& t = outs[n];
      size_t count = 1;
      for (int k = 0; k < d.nbDims; ++k) {
        if (d.d[k] < 0) throw Error(HIWIN_BACKEND_ERROR, name_ + ": output " + n + " has an unresolved shape");
        t.shape.push_back(d.d[k]);
        count *= static_cast<size_t>(d.d[k]);
      }
      raw[n].resize(count * (half_[n] ? 2 : 4));
      context_->setTensorAddress(n.c_str(), buffer(n, raw[n].size() ? raw[n].size() : 1));
    }
    if (!context_->enqueueV3(stream))
      throw Error(HIWIN_BACKEND_ERROR, name_ + ": enqueueV3 failed (" + logger.take() + ")");
    for (auto& kv : raw)
      cuda_check(cudaMemcpyAsync(kv.second.data(), buffers_[kv.first].first, kv.second.size(), cudaMemcpyDeviceToHost,
                                 stream),
                 name_ + ": copy out");
    cuda_check(cudaStreamSynchronize(stream), name_ + ": stream");
    for (auto& kv : raw) {
      Tensor& t = outs[kv.first];
      if (half_[kv.first]) {
        t.data.resize(kv.second.size() / 2);
        for (size_t i = 0; i < t.data.size(); ++i) {
          uint16_t v;
          std::memcpy(&v, &kv.second[i * 2], 2);
          t.data[i] = from_half(v);
        }
      } else {
        t.data.resize(kv.second.size() / 4);
        std::memcpy(t.data.data(), kv.second.data(), kv.second.size());
      }
    }
    return outs;
  }

  std::string name_, file_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  std::vector<Profile> profiles_;
  int max_batch_ = 1;
  int active_ = -1;
  std::vector<std::string> inputs_, outputs_;
  std::map<std::string, std::pair<Axis, Axis>> grid_axes_;
  std::map<std::string, bool> half_;
  std::map<std::string, std::pair<void*, size_t>> buffers_;
};

class TrtBackend : public VisionBackend {
 public:
  TrtBackend(const std::string& export_dir, const Json& manifest, const std::string& dir, const std::string& plugin) {
    const std::string ej = dir + "/engines.json";
    Json info = parse_json(read_file(ej, HIWIN_BAD_MANIFEST));
    if (as_int(at(info, "format", ej), ej) != kEnginesFormat)
      throw Error(HIWIN_BAD_MANIFEST, ej + ": engine set format " + std::to_string(as_int(at(info, "format", ej), ej)) +
                                          ", this runtime reads format " + std::to_string(kEnginesFormat));
    // TensorRT version: an engine loads only in the version that built it
    const std::string built = at(at(info, "tensorrt", ej), "version", ej).str;
    const std::string here = std::to_string(getInferLibMajorVersion()) + "." + std::to_string(getInferLibMinorVersion()) +
                             "." + std::to_string(getInferLibPatchVersion());
    if (built.compare(0, here.size(), here) != 0 || (built.size() > here.size() && built[here.size()] != '.'))
      throw Error(HIWIN_BACKEND_ERROR, ej + ": the engines were built with TensorRT " + built + ", this process has " +
                                           here + "; rebuild them here (`hiwin-export engines`)");
    int dev = 0;
    cuda_check(cudaGetDevice(&dev), "cudaGetDevice");
    cudaDeviceProp prop;
    cuda_check(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
    const Json& cc = at(at(info, "gpu", ej), "compute_capability", ej);
    if (cc.arr.size() != 2 || as_int(cc.arr[0], ej) != prop.major || as_int(cc.arr[1], ej) != prop.minor)
      throw Error(HIWIN_BACKEND_ERROR, ej + ": the engines were built for another compute capability than this GPU's (sm_" +
                                           std::to_string(prop.major) + std::to_string(prop.minor) + "); rebuild them on this GPU");
    precision_ = at(info, "precision", ej).str;
    // every engine from the graph this export holds
    const Json* graphs = manifest.get("graphs");
    for (const auto& kv : at(info, "engines", ej).obj) {
      const Json& src = at(kv.second, "source", ej);
      const std::string g = at(src, "graph", ej).str;
      const Json* entry = graphs ? graphs->get(g) : nullptr;
      if (!entry) throw Error(HIWIN_BAD_MANIFEST, ej + ": engine " + kv.first + " was built from " + g + ", which " +
                                                      export_dir + " does not have");
      const Json* sha = entry->get("sha256");
      if (!sha || sha->str != at(src, "sha256", ej).str)
        throw Error(HIWIN_BAD_MANIFEST, ej + ": engine " + kv.first + " was built from another " + g + " than " +
                                            export_dir + " holds (sha256 differs): rebuild the engines for this export");
    }
    // the plugin library before any engine is deserialized
    const Json* plug = info.get("plugins");
    bool required = plug && plug->get("required") && plug->get("required")->b;
    bool serialized = plug && plug->get("serialized") && plug->get("serialized")->b;
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) throw Error(HIWIN_BACKEND_ERROR, "TensorRT: createInferRuntime failed (" + logger_.take() + ")");
    if (required && !serialized) {
      std::string path = !plugin.empty() ? plugin : dir + "/" + at(*plug, "bundled", ej).str;
      std::ifstream probe(path);
      if (!probe) throw Error(HIWIN_BAD_MANIFEST, dir + ": the engines need the plugin library " + path + ", which does not exist");
      if (!runtime_->getPluginRegistry().loadLibrary(path.c_str()))
        throw Error(HIWIN_BACKEND_ERROR, path + ": TensorRT could not load the plugin library (" + logger_.take() + ")");
    }
    if (serialized) runtime_->setEngineHostCodeAllowed(true);
    cuda_check(cudaStreamCreate(&stream_), "cudaStreamCreate");
    for (const auto& kv : at(info, "engines", ej).obj)
      engines_[kv.first].reset(new Engine(*runtime_, logger_, dir, kv.first, kv.second));
    const Json* lang = manifest.get("language");
    const Json* cfg = manifest.get("config");
    const Json* hs = lang ? lang->get("hidden_size") : (cfg ? cfg->get("hidden_size") : nullptr);
    hidden_ = hs ? as_int(*hs, "manifest.json hidden_size") : 0;
    if (hidden_ <= 0) throw Error(HIWIN_BAD_MANIFEST, "manifest.json: no hidden_size");
  }

  ~TrtBackend() override {
    engines_.clear();
    if (stream_) cudaStreamDestroy(stream_);
  }

  int hidden_size() const override { return hidden_; }

  Tensor vit(const Tensor& pixels) override {
    auto out = engine("vit").run({{"pixel_values", &pixels}}, stream_, logger_);
    return take(out, "features");
  }
  std::pair<Tensor, Tensor> jbu(const Tensor& f, const Tensor& pixels) override {
    auto out = engine("jbu").run({{"features", &f}, {"pixel_values", &pixels}}, stream_, logger_);
    return {take(out, "feat2x"), take(out, "feat4x")};
  }
  Tensor projector(std::pair<int, int> b, const Tensor& f1, const Tensor& f2, const Tensor& f4) override {
    std::string any = graph("hiwin");
    std::string name = engines_.count(any) ? "hiwin"
                                           : "hiwin_" + std::to_string(b.first) + "x" + std::to_string(b.second);
    auto out = engine(name).run({{"feat1x", &f1}, {"feat2x", &f2}, {"feat4x", &f4}}, stream_, logger_);
    return take(out, "tokens");
  }

 private:
  std::string graph(const std::string& base) const { return precision_ == "fp32" ? base : base + "." + precision_; }
  Engine& engine(const std::string& base) {
    auto it = engines_.find(graph(base));
    if (it == engines_.end()) throw Error(HIWIN_BACKEND_ERROR, "the engine set has no engine for graph " + graph(base));
    return *it->second;
  }
  static Tensor take(std::map<std::string, Tensor>& m, const char* n) {
    auto it = m.find(n);
    if (it == m.end()) throw Error(HIWIN_BACKEND_ERROR, std::string("the engine has no output ") + n);
    return std::move(it->second);
  }

  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::map<std::string, std::unique_ptr<Engine>> engines_;
  cudaStream_t stream_ = nullptr;
  std::string precision_;
  int hidden_ = 0;
};

}  // namespace

std::unique_ptr<VisionBackend> make_trt_backend(const std::string& export_dir, const Json& manifest,
                                                const std::string& engines_dir, const std::string& plugin_library) {
  return std::unique_ptr<VisionBackend>(new TrtBackend(export_dir, manifest, engines_dir, plugin_library));
}

}  // namespace hiwin
