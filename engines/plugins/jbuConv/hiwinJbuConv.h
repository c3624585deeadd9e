// HiwinJbuConv: the per-pixel maths of one JBU layer's adaptive convolution (kernel + fixup + apply),
// shared by the CPU launcher (jbuConvCpu.cpp) and the CUDA launcher (jbuConvKernel.cu). See README.md
// for the exact semantics. Plain C++ usable on host and device; all arithmetic is fp32.
//
// The radius is a template parameter so that the d*d per-pixel kernel lives in registers on the GPU;
// kMinRadius..kMaxRadius are instantiated.
#pragma once

#include "../common/hiwinCommon.h"
#include "../common/hiwinMacros.h"

#include <cmath>
#include <cstdint>

namespace hiwin
{

constexpr int32_t kJbuMinRadius = 1;
constexpr int32_t kJbuMaxRadius = 4;
constexpr int32_t kJbuGuidanceChannels = 3;

//! Shapes and attributes of one launch: hr (B, C, H, W), q (B, K, H, W), guidance (B, 3, H, W).
struct JbuConvParams
{
    int64_t batch{0};
    int64_t channels{0}; //!< C of hr and of the output
    int64_t keyDim{0};   //!< K of q
    int64_t height{0};
    int64_t width{0};
    int32_t radius{3};
};

//! The fp32 parameter tensors (device pointers for the CUDA launcher, host pointers for the CPU one).
struct JbuConvWeights
{
    float const* rangeTemp;    //!< (1,) raw parameter; temperature = clamp(exp(range_temp), 1e-4, 1e4)
    float const* sigmaSpatial; //!< (1,)
    float const* w1;           //!< (T, T + 3) first 1x1 conv of the fixup, T = (2r+1)^2
    float const* b1;           //!< (T,)
    float const* w2;           //!< (T, T) second 1x1 conv of the fixup
    float const* b2;           //!< (T,)
};

template <int32_t R>
struct JbuTaps
{
    static constexpr int32_t kDiameter = 2 * R + 1;
    static constexpr int32_t kTaps = kDiameter * kDiameter;
};

//! torch F.pad(mode="reflect") index map for a pad of at most n - 1: -k -> k, n - 1 + k -> n - 1 - k.
HIWIN_HD HIWIN_INLINE int32_t jbuReflect(int32_t i, int32_t n)
{
    return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i);
}

//! logits[i*d + j] += nb(i, j) * centre for one key channel; nb(i, j) is q at (y + i - r, x + j - r),
//! reflected.
template <int32_t R, class LoadNb>
HIWIN_HD HIWIN_INLINE void jbuAccumulateLogits(float (&logits)[JbuTaps<R>::kTaps], LoadNb const& nb, float centre)
{
    constexpr int32_t d = JbuTaps<R>::kDiameter;
    HIWIN_UNROLL
    for (int32_t i = 0; i < d; ++i)
    {
        HIWIN_UNROLL
        for (int32_t j = 0; j < d; ++j)
        {
            logits[i * d + j] += nb(i, j) * centre;
        }
    }
}

//! Exact (erf) GELU, as torch.nn.GELU().
HIWIN_HD HIWIN_INLINE float jbuGelu(float x)
{
    return 0.5F * x * (1.F + erff(x * 0.70710678118654752440F));
}

//! Turns the accumulated logits into the final per-pixel kernel, in place:
//! softmax(temp * logits) * spatial, normalised by max(sum, 1e-7), plus 0.1 * fixup MLP of
//! (kernel, guidance). w1/b1/w2/b2 are read with uniform indices (every thread the same address).
template <int32_t R>
HIWIN_HD HIWIN_INLINE void jbuFinishKernel(float (&k)[JbuTaps<R>::kTaps], float rangeTemp, float sigmaSpatial,
    float g0, float g1, float g2, float const* __restrict__ w1, float const* __restrict__ b1,
    float const* __restrict__ w2, float const* __restrict__ b2)
{
    constexpr int32_t d = JbuTaps<R>::kDiameter;
    constexpr int32_t T = JbuTaps<R>::kTaps;
    constexpr int32_t in1 = T + kJbuGuidanceChannels;

    float temp = expf(rangeTemp);
    temp = temp < 1e-4F ? 1e-4F : (temp > 1e4F ? 1e4F : temp);

    // range kernel: softmax over taps of temp * logits
    float m = -INFINITY;
    HIWIN_UNROLL
    for (int32_t t = 0; t < T; ++t)
    {
        k[t] = temp * k[t];
        m = k[t] > m ? k[t] : m;
    }
    float sumExp = 0.F;
    HIWIN_UNROLL
    for (int32_t t = 0; t < T; ++t)
    {
        k[t] = expf(k[t] - m);
        sumExp += k[t];
    }

    // times the spatial Gaussian over linspace(-1, 1, d)^2, then normalised
    float const denom = 2.F * (sigmaSpatial * sigmaSpatial);
    float sum = 0.F;
    HIWIN_UNROLL
    for (int32_t i = 0; i < d; ++i)
    {
        float const ri = static_cast<float>(2 * i - (d - 1)) / static_cast<float>(d - 1);
        HIWIN_UNROLL
        for (int32_t j = 0; j < d; ++j)
        {
            float const rj = static_cast<float>(2 * j - (d - 1)) / static_cast<float>(d - 1);
            float const spatial = expf(-(ri * ri + rj * rj) / denom);
            float const v = (k[i * d + j] / sumExp) * spatial;
            k[i * d + j] = v;
            sum += v;
        }
    }
    float const norm = sum > 1e-7F ? sum : 1e-7F;
    HIWIN_UNROLL
    for (int32_t t = 0; t < T; ++t)
    {
        k[t] = k[t] / norm;
    }

    // fixup: kernel += 0.1 * (w2 @ gelu(w1 @ [kernel; guidance] + b1) + b2). Each hidden unit is folded
    // into the output accumulators as soon as it is known, so the hidden layer needs no array (and the
    // loop over hidden units stays rolled: compact code, registers only for k and fix).
    float fix[T];
    HIWIN_UNROLL
    for (int32_t t = 0; t < T; ++t)
    {
        fix[t] = b2[t];
    }
    HIWIN_NO_UNROLL
    for (int32_t o = 0; o < T; ++o)
    {
        float const* row = w1 + o * in1;
        float acc = b1[o];
        HIWIN_UNROLL
        for (int32_t t = 0; t < T; ++t)
        {
            acc += row[t] * k[t];
        }
        acc += row[T] * g0 + row[T + 1] * g1 + row[T + 2] * g2;
        float const hidden = jbuGelu(acc);
        HIWIN_UNROLL
        for (int32_t t = 0; t < T; ++t)
        {
            fix[t] += w2[t * T + o] * hidden;
        }
    }
    HIWIN_UNROLL
    for (int32_t t = 0; t < T; ++t)
    {
        k[t] += 0.1F * fix[t];
    }
}

//! sum_t k[t] * nb(i, j) with t = i*d + j; nb(i, j) is hr at (y + i - r, x + j - r), reflected.
template <int32_t R, class LoadNb>
HIWIN_HD HIWIN_INLINE float jbuApply(float const (&k)[JbuTaps<R>::kTaps], LoadNb const& nb)
{
    constexpr int32_t d = JbuTaps<R>::kDiameter;
    float acc = 0.F;
    HIWIN_UNROLL
    for (int32_t i = 0; i < d; ++i)
    {
        HIWIN_UNROLL
        for (int32_t j = 0; j < d; ++j)
        {
            acc += k[i * d + j] * nb(i, j);
        }
    }
    return acc;
}

//! Host-side argument checks shared by every entry point (message written on failure).
inline bool checkJbuConvParams(JbuConvParams const& p, char* msg, size_t size)
{
    HIWIN_CHECK_ARG(p.radius >= kJbuMinRadius && p.radius <= kJbuMaxRadius, msg, size,
        "HiwinJbuConv: radius must be in [%d, %d] (got %d)", kJbuMinRadius, kJbuMaxRadius, p.radius);
    HIWIN_CHECK_ARG(p.batch >= 0 && p.channels >= 0, msg, size, "HiwinJbuConv: negative size (B=%lld, C=%lld)",
        static_cast<long long>(p.batch), static_cast<long long>(p.channels));
    HIWIN_CHECK_ARG(p.keyDim >= 1, msg, size, "HiwinJbuConv: q needs at least one channel (got K=%lld)",
        static_cast<long long>(p.keyDim));
    HIWIN_CHECK_ARG(p.height > p.radius && p.width > p.radius && p.height <= INT32_MAX && p.width <= INT32_MAX,
        msg, size, "HiwinJbuConv: H and W must be > radius %d for reflect padding (got H=%lld, W=%lld)", p.radius,
        static_cast<long long>(p.height), static_cast<long long>(p.width));
    return true;
}

} // namespace hiwin
