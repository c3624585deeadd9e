// HiwinRoiAlign CPU launcher: loops over (RoI, channel, bin) and calls the shared per-element maths.
#include "roiAlignCpu.h"

#include "../common/hiwinHalf.h"

#include <cstring>

namespace hiwin
{
namespace
{

inline float toFloat(float v)
{
    return v;
}
inline float toFloat(uint16_t v)
{
    return halfBitsToFloat(v);
}
inline void store(float* p, float v)
{
    *p = v;
}
inline void store(uint16_t* p, float v)
{
    *p = floatToHalfBits(v);
}

int64_t readIndex(void const* indices, int32_t bytes, int64_t k)
{
    if (bytes == 8)
    {
        int64_t v;
        std::memcpy(&v, static_cast<char const*>(indices) + 8 * k, 8);
        return v;
    }
    int32_t v;
    std::memcpy(&v, static_cast<char const*>(indices) + 4 * k, 4);
    return v;
}

template <class T>
void run(T const* x, T const* rois, void const* batchIndices, int32_t batchIndexBytes, RoiAlignParams const& p,
    T* out)
{
    int32_t const H = static_cast<int32_t>(p.height);
    int32_t const W = static_cast<int32_t>(p.width);
    int64_t const plane = static_cast<int64_t>(H) * W;
    for (int64_t r = 0; r < p.numRois; ++r)
    {
        T const* box = rois + 4 * r;
        RoiGeometry const g = roiAlignGeometry(toFloat(box[0]), toFloat(box[1]), toFloat(box[2]), toFloat(box[3]),
            p.spatialScale, p.aligned, p.outputHeight, p.outputWidth, p.samplingRatio);
        int64_t const n = readIndex(batchIndices, batchIndexBytes, r);
        for (int64_t c = 0; c < p.channels; ++c)
        {
            T const* map = x + (n * p.channels + c) * plane;
            auto load = [map, W](int32_t yy, int32_t xx) { return toFloat(map[static_cast<int64_t>(yy) * W + xx]); };
            T* o = out + (r * p.channels + c) * p.outputHeight * p.outputWidth;
            for (int32_t ph = 0; ph < p.outputHeight; ++ph)
            {
                for (int32_t pw = 0; pw < p.outputWidth; ++pw)
                {
                    store(o + ph * p.outputWidth + pw, roiAlignBin(load, g, ph, pw, H, W));
                }
            }
        }
    }
}

} // namespace

bool roiAlignCpu(IoType ioType, void const* x, void const* rois, void const* batchIndices, int32_t batchIndexBytes,
    RoiAlignParams const& params, void* out, char* msg, size_t msgSize)
{
    if (!checkRoiAlignParams(params, batchIndexBytes, msg, msgSize))
    {
        return false;
    }
    for (int64_t r = 0; r < params.numRois; ++r)
    {
        int64_t const n = readIndex(batchIndices, batchIndexBytes, r);
        HIWIN_CHECK_ARG(n >= 0 && n < params.batch, msg, msgSize,
            "HiwinRoiAlign: batch_indices[%lld] = %lld is out of range [0, %lld)", static_cast<long long>(r),
            static_cast<long long>(n), static_cast<long long>(params.batch));
    }
    if (ioType == IoType::kFLOAT32)
    {
        run(static_cast<float const*>(x), static_cast<float const*>(rois), batchIndices, batchIndexBytes, params,
            static_cast<float*>(out));
    }
    else
    {
        run(static_cast<uint16_t const*>(x), static_cast<uint16_t const*>(rois), batchIndices, batchIndexBytes,
            params, static_cast<uint16_t*>(out));
    }
    return true;
}

} // namespace hiwin
