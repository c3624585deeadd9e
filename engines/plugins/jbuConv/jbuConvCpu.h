// HiwinJbuConv CPU launcher (reference-quality, single-threaded; used by tests and the C ABI).
#pragma once

#include "hiwinJbuConv.h"

namespace hiwin
{

//! hr (B, C, H, W), q (B, K, H, W), guidance (B, 3, H, W) and out (B, C, H, W) are float32 or IEEE half
//! (uint16_t words) per ioType; the weights are float32. Returns false with a message when an argument
//! is invalid (nothing is written then).
bool jbuConvCpu(IoType ioType, void const* hr, void const* q, void const* guidance, JbuConvWeights const& weights,
    JbuConvParams const& params, void* out, char* msg, size_t msgSize);

} // namespace hiwin
