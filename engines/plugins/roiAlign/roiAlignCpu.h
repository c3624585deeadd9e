// HiwinRoiAlign CPU launcher (reference-quality, single-threaded; used by tests and the C ABI).
#pragma once

#include "hiwinRoiAlign.h"

namespace hiwin
{

//! x (N, C, H, W), rois (R, 4) and out (R, C, oh, ow) are float32 or IEEE half (uint16_t words) per
//! ioType; batchIndices (R,) are int32 or int64 per batchIndexBytes (4 or 8). Returns false with a
//! message when an argument is invalid (nothing is written then).
bool roiAlignCpu(IoType ioType, void const* x, void const* rois, void const* batchIndices, int32_t batchIndexBytes,
    RoiAlignParams const& params, void* out, char* msg, size_t msgSize);

} // namespace hiwin
