// The vision engines behind hiwin_encode_image: three stage runners on host float32 arrays, as
// hiwin_runtime.crop_chain.Stages (vit, jbu, projector per bucket).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "internal.h"

namespace hiwin {

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

class VisionBackend {
 public:
  virtual ~VisionBackend() = default;
  virtual int hidden_size() const = 0;
  // pixels (B, 3, 14h, 14w) -> features (B, Cv, h, w)
  virtual Tensor vit(const Tensor& pixels) = 0;
  // (features, pixels) -> (feat2x, feat4x)
  virtual std::pair<Tensor, Tensor> jbu(const Tensor& features, const Tensor& pixels) = 0;
  // bucket (oh, ow), feat1x, feat2x, feat4x -> tokens (B, Q, C)
  virtual Tensor projector(std::pair<int, int> bucket, const Tensor& f1, const Tensor& f2, const Tensor& f4) = 0;
};

// Defined in trt_backend.cpp when built with TensorRT; otherwise throws HIWIN_UNSUPPORTED.
std::unique_ptr<VisionBackend> make_trt_backend(const std::string& export_dir, const Json& manifest,
                                                const std::string& engines_dir, const std::string& plugin_library);

}  // namespace hiwin
