// HiwinRoiAlign CUDA launcher: one thread per output element (RoI, channel, bin), fp32 accumulation,
// the maths of hiwinRoiAlign.h. Consecutive threads share a RoI and a channel, so their samples hit the
// same few cache lines of one feature plane.
#include "roiAlignKernel.h"

#include <cuda_fp16.h>

namespace hiwin
{
namespace
{

constexpr int32_t kThreads = 256;

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

template <class T, class I, class Index>
__global__ void __launch_bounds__(kThreads) roiAlignKernel(T const* __restrict__ x, T const* __restrict__ rois,
    I const* __restrict__ batchIndices, RoiAlignParams p, T* __restrict__ out, Index total)
{
    Index const ow = static_cast<Index>(p.outputWidth);
    Index const oh = static_cast<Index>(p.outputHeight);
    Index const C = static_cast<Index>(p.channels);
    int32_t const H = static_cast<int32_t>(p.height);
    int32_t const W = static_cast<int32_t>(p.width);
    for (Index idx = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
         idx += static_cast<Index>(gridDim.x) * kThreads)
    {
        Index t = idx / ow;
        int32_t const pw = static_cast<int32_t>(idx - t * ow);
        Index const t2 = t / oh;
        int32_t const ph = static_cast<int32_t>(t - t2 * oh);
        Index const r = t2 / C;
        Index const c = t2 - r * C;
        int64_t const n = static_cast<int64_t>(__ldg(batchIndices + r));
        if (n < 0 || n >= p.batch)
        {
            stf(out + idx, 0.F);
            continue;
        }
        T const* box = rois + 4 * r;
        RoiGeometry const g = roiAlignGeometry(ldf(box), ldf(box + 1), ldf(box + 2), ldf(box + 3), p.spatialScale,
            p.aligned, p.outputHeight, p.outputWidth, p.samplingRatio);
        T const* map = x + (n * p.channels + static_cast<int64_t>(c)) * p.height * p.width;
        auto load = [map, W](int32_t yy, int32_t xx) { return ldf(map + static_cast<int64_t>(yy) * W + xx); };
        stf(out + idx, roiAlignBin(load, g, ph, pw, H, W));
    }
}

template <class T, class I>
cudaError_t launch(void const* x, void const* rois, void const* batchIndices, RoiAlignParams const& p, void* out,
    cudaStream_t stream)
{
    int64_t const total = p.numRois * p.channels * p.outputHeight * p.outputWidth;
    if (total == 0)
    {
        return cudaGetLastError();
    }
    int64_t const blocks64 = (total + kThreads - 1) / kThreads;
    unsigned const blocks = static_cast<unsigned>(blocks64 < (1 << 22) ? blocks64 : (1 << 22));
    if (total <= INT32_MAX)
    {
        roiAlignKernel<T, I, int32_t><<<blocks, kThreads, 0, stream>>>(static_cast<T const*>(x),
            static_cast<T const*>(rois), static_cast<I const*>(batchIndices), p, static_cast<T*>(out),
            static_cast<int32_t>(total));
    }
    else
    {
        roiAlignKernel<T, I, int64_t><<<blocks, kThreads, 0, stream>>>(static_cast<T const*>(x),
            static_cast<T const*>(rois), static_cast<I const*>(batchIndices), p, static_cast<T*>(out), total);
    }
    return cudaGetLastError();
}

} // namespace

cudaError_t roiAlignCuda(IoType ioType, void const* x, void const* rois, void const* batchIndices,
    int32_t batchIndexBytes, RoiAlignParams const& params, void* out, cudaStream_t stream)
{
    bool const i64 = batchIndexBytes == 8;
    if (ioType == IoType::kFLOAT32)
    {
        return i64 ? launch<float, int64_t>(x, rois, batchIndices, params, out, stream)
                   : launch<float, int32_t>(x, rois, batchIndices, params, out, stream);
    }
    return i64 ? launch<__half, int64_t>(x, rois, batchIndices, params, out, stream)
               : launch<__half, int32_t>(x, rois, batchIndices, params, out, stream);
}

} // namespace hiwin
