// HiwinRoiAlign CUDA launcher (device pointers, asynchronous on the given stream).
#pragma once

#include "hiwinRoiAlign.h"

#include <cuda_runtime_api.h>

namespace hiwin
{

//! x (N, C, H, W), rois (R, 4) and out (R, C, oh, ow) are float32 or __half per ioType; batchIndices (R,)
//! are int32 or int64 per batchIndexBytes. A RoI whose batch index is outside [0, N) yields zeros.
//! Arguments must have passed checkRoiAlignParams. Returns the launch status (cudaGetLastError).
cudaError_t roiAlignCuda(IoType ioType, void const* x, void const* rois, void const* batchIndices,
    int32_t batchIndexBytes, RoiAlignParams const& params, void* out, cudaStream_t stream);

} // namespace hiwin
