// HiwinJbuConv CUDA launcher (device pointers, asynchronous on the given stream).
#pragma once

#include "hiwinJbuConv.h"

#include <cuda_runtime_api.h>

namespace hiwin
{

//! hr (B, C, H, W), q (B, K, H, W), guidance (B, 3, H, W) and out (B, C, H, W) are float32 or __half per
//! ioType; the weights are float32 device tensors. Arguments must have passed checkJbuConvParams.
//! Returns the launch status (cudaGetLastError).
cudaError_t jbuConvCuda(IoType ioType, void const* hr, void const* q, void const* guidance,
    JbuConvWeights const& weights, JbuConvParams const& params, void* out, cudaStream_t stream);

} // namespace hiwin
