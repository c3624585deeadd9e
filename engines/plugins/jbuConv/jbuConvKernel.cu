// HiwinJbuConv CUDA launcher. One thread block per 32x8 tile of output pixels, one thread per pixel:
//  1. the (2r+1)^2 logits are accumulated from halo tiles of q staged in shared memory, chunk of
//     channels by chunk, and the per-pixel kernel (softmax, spatial, normalisation, fixup MLP) is
//     finished in registers, once per pixel (hiwinJbuConv.h);
//  2. the channels of hr are streamed through the same shared halo buffer, and every thread applies its
//     register-resident kernel to each channel (each hr element is read from global memory ~2x per
//     block instead of (2r+1)^2 times; output rows are written coalesced).
#include "jbuConvKernel.h"

#include <cuda_fp16.h>

namespace hiwin
{
namespace
{

constexpr int32_t kTileW = 32;
constexpr int32_t kTileH = 8;
constexpr int32_t kThreads = kTileW * kTileH;
constexpr int32_t kChunk = 8; // channels staged per shared-memory round

__device__ __forceinline__ float ldf(float const* p)
{
    return __ldg(p);
}
__device__ __forceinline__ float ldf(__half const* p)
{
    return __half2float(__ldg(p));
}
__device__ __forceinline__ void stf(float* p, float v)
{
    *p = v;
}
__device__ __forceinline__ void stf(__half* p, float v)
{
    *p = __float2half_rn(v);
}

//! Reflect index for the halo; positions only needed by pixels outside the image are clamped.
__device__ __forceinline__ int32_t haloIndex(int32_t i, int32_t n)
{
    i = jbuReflect(i, n);
    return i < 0 ? 0 : (i >= n ? n - 1 : i);
}

template <int32_t R, class T>
__global__ void __launch_bounds__(kThreads, 2) jbuConvKernel(T const* __restrict__ hr, T const* __restrict__ q,
    T const* __restrict__ guidance, JbuConvWeights wt, int32_t C, int32_t K, int32_t H, int32_t W,
    T* __restrict__ out)
{
    constexpr int32_t kHaloW = kTileW + 2 * R;
    constexpr int32_t kHaloH = kTileH + 2 * R;
    constexpr int32_t kHalo = kHaloW * kHaloH;
    constexpr int32_t kPer = (kHalo + kThreads - 1) / kThreads;
    constexpr int32_t kTaps = JbuTaps<R>::kTaps;
    __shared__ float halo[kChunk][kHalo];

    int32_t const tx = static_cast<int32_t>(threadIdx.x) % kTileW;
    int32_t const ty = static_cast<int32_t>(threadIdx.x) / kTileW;
    int32_t const x0 = static_cast<int32_t>(blockIdx.x) * kTileW;
    int32_t const y0 = static_cast<int32_t>(blockIdx.y) * kTileH;
    int64_t const b = blockIdx.z;
    int32_t const x = x0 + tx;
    int32_t const y = y0 + ty;
    bool const inside = x < W && y < H;
    int64_t const plane = static_cast<int64_t>(H) * W;

    // Source offsets (within one plane) of the halo elements this thread stages; the same for every channel.
    int32_t src[kPer];
#pragma unroll
    for (int32_t e = 0; e < kPer; ++e)
    {
        int32_t const h = static_cast<int32_t>(threadIdx.x) + e * kThreads;
        int32_t const hy = h / kHaloW;
        int32_t const hx = h - hy * kHaloW;
        src[e] = h < kHalo ? haloIndex(y0 - R + hy, H) * W + haloIndex(x0 - R + hx, W) : 0;
    }
    auto stage = [&](T const* planes, int32_t n)
    {
        for (int32_t cc = 0; cc < n; ++cc)
        {
            T const* m = planes + cc * plane;
#pragma unroll
            for (int32_t e = 0; e < kPer; ++e)
            {
                int32_t const h = static_cast<int32_t>(threadIdx.x) + e * kThreads;
                if (h < kHalo)
                {
                    halo[cc][h] = ldf(m + src[e]);
                }
            }
        }
    };

    // 1. logits from q, then the finished kernel in registers
    float k[kTaps];
#pragma unroll
    for (int32_t t = 0; t < kTaps; ++t)
    {
        k[t] = 0.F;
    }
    T const* qb = q + b * K * plane;
    for (int32_t c0 = 0; c0 < K; c0 += kChunk)
    {
        int32_t const n = K - c0 < kChunk ? K - c0 : kChunk;
        stage(qb + c0 * plane, n);
        __syncthreads();
        for (int32_t cc = 0; cc < n; ++cc)
        {
            float const* s = halo[cc] + ty * kHaloW + tx;
            auto nb = [s](int32_t i, int32_t j) { return s[i * kHaloW + j]; };
            jbuAccumulateLogits<R>(k, nb, s[R * kHaloW + R]);
        }
        __syncthreads();
    }
    float g0 = 0.F;
    float g1 = 0.F;
    float g2 = 0.F;
    if (inside)
    {
        T const* g = guidance + b * kJbuGuidanceChannels * plane + static_cast<int64_t>(y) * W + x;
        g0 = ldf(g);
        g1 = ldf(g + plane);
        g2 = ldf(g + 2 * plane);
    }
    jbuFinishKernel<R>(k, __ldg(wt.rangeTemp), __ldg(wt.sigmaSpatial), g0, g1, g2, wt.w1, wt.b1, wt.w2, wt.b2);

    // 2. apply to every channel of hr
    T const* hb = hr + b * C * plane;
    T* ob = out + b * C * plane + static_cast<int64_t>(y) * W + x;
    for (int32_t c0 = 0; c0 < C; c0 += kChunk)
    {
        int32_t const n = C - c0 < kChunk ? C - c0 : kChunk;
        stage(hb + c0 * plane, n);
        __syncthreads();
        for (int32_t cc = 0; cc < n; ++cc)
        {
            float const* s = halo[cc] + ty * kHaloW + tx;
            auto nb = [s](int32_t i, int32_t j) { return s[i * kHaloW + j]; };
            float const v = jbuApply<R>(k, nb);
            if (inside)
            {
                stf(ob + (c0 + cc) * plane, v);
            }
        }
        __syncthreads();
    }
}

template <int32_t R, class T>
cudaError_t launch(void const* hr, void const* q, void const* guidance, JbuConvWeights const& wt,
    JbuConvParams const& p, void* out, cudaStream_t stream)
{
    if (p.batch == 0 || p.channels == 0)
    {
        return cudaGetLastError();
    }
    dim3 const grid(static_cast<unsigned>((p.width + kTileW - 1) / kTileW),
        static_cast<unsigned>((p.height + kTileH - 1) / kTileH), static_cast<unsigned>(p.batch));
    jbuConvKernel<R, T><<<grid, kThreads, 0, stream>>>(static_cast<T const*>(hr), static_cast<T const*>(q),
        static_cast<T const*>(guidance), wt, static_cast<int32_t>(p.channels), static_cast<int32_t>(p.keyDim),
        static_cast<int32_t>(p.height), static_cast<int32_t>(p.width), static_cast<T*>(out));
    return cudaGetLastError();
}

template <class T>
cudaError_t dispatch(void const* hr, void const* q, void const* g, JbuConvWeights const& wt, JbuConvParams const& p,
    void* out, cudaStream_t stream)
{
    static_assert(kJbuMinRadius == 1 && kJbuMaxRadius == 4, "update the radius dispatch");
    switch (p.radius)
    {
    case 1: return launch<1, T>(hr, q, g, wt, p, out, stream);
    case 2: return launch<2, T>(hr, q, g, wt, p, out, stream);
    case 3: return launch<3, T>(hr, q, g, wt, p, out, stream);
    case 4: return launch<4, T>(hr, q, g, wt, p, out, stream);
    default: return cudaErrorInvalidValue;
    }
}

} // namespace

cudaError_t jbuConvCuda(IoType ioType, void const* hr, void const* q, void const* guidance,
    JbuConvWeights const& weights, JbuConvParams const& params, void* out, cudaStream_t stream)
{
    if (params.batch > 65535)
    {
        return cudaErrorInvalidConfiguration; // grid.z limit
    }
    return ioType == IoType::kFLOAT32 ? dispatch<float>(hr, q, guidance, weights, params, out, stream)
                                      : dispatch<__half>(hr, q, guidance, weights, params, out, stream);
}

} // namespace hiwin
