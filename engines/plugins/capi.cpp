// Hiwin plugins: C ABI of the CPU launchers (see capi.h).
#include "capi.h"

#include "common/hiwinHalf.h"
#include "jbuConv/jbuConvCpu.h"
#include "roiAlign/roiAlignCpu.h"

#include <exception>

namespace
{

using hiwin::IoType;

template <class F>
int32_t guarded(char* message, size_t size, F&& body) noexcept
{
    try
    {
        return body();
    }
    catch (std::exception const& e)
    {
        hiwin::formatMessage(message, size, "internal error: %s", e.what());
    }
    catch (...)
    {
        hiwin::formatMessage(message, size, "internal error");
    }
    return hiwin::kSTATUS_INTERNAL_ERROR;
}

int32_t roiAlign(IoType type, void const* x, int64_t n, int64_t c, int64_t h, int64_t w, void const* rois,
    int64_t numRois, void const* batchIndices, int32_t batchIndexBytes, int32_t oh, int32_t ow, int32_t sr,
    float scale, int32_t aligned, void* out, char* message, size_t size) noexcept
{
    return guarded(message, size,
        [&]() -> int32_t
        {
            if (numRois > 0 && (x == nullptr || rois == nullptr || batchIndices == nullptr || out == nullptr))
            {
                hiwin::formatMessage(message, size, "HiwinRoiAlign: null tensor pointer");
                return hiwin::kSTATUS_INVALID_ARGUMENT;
            }
            hiwin::RoiAlignParams p;
            p.batch = n;
            p.channels = c;
            p.height = h;
            p.width = w;
            p.numRois = numRois;
            p.outputHeight = oh;
            p.outputWidth = ow;
            p.samplingRatio = sr;
            p.spatialScale = scale;
            p.aligned = aligned != 0;
            return hiwin::roiAlignCpu(type, x, rois, batchIndices, batchIndexBytes, p, out, message, size)
                ? hiwin::kSTATUS_SUCCESS
                : hiwin::kSTATUS_INVALID_ARGUMENT;
        });
}

int32_t jbuConv(IoType type, void const* hr, void const* q, void const* guidance, int64_t b, int64_t c, int64_t k,
    int64_t h, int64_t w, float const* rangeTemp, float const* sigma, float const* w1, float const* b1,
    float const* w2, float const* b2, int32_t radius, void* out, char* message, size_t size) noexcept
{
    return guarded(message, size,
        [&]() -> int32_t
        {
            if (hr == nullptr || q == nullptr || guidance == nullptr || rangeTemp == nullptr || sigma == nullptr
                || w1 == nullptr || b1 == nullptr || w2 == nullptr || b2 == nullptr || out == nullptr)
            {
                hiwin::formatMessage(message, size, "HiwinJbuConv: null tensor pointer");
                return hiwin::kSTATUS_INVALID_ARGUMENT;
            }
            hiwin::JbuConvParams p;
            p.batch = b;
            p.channels = c;
            p.keyDim = k;
            p.height = h;
            p.width = w;
            p.radius = radius;
            hiwin::JbuConvWeights const wt{rangeTemp, sigma, w1, b1, w2, b2};
            return hiwin::jbuConvCpu(type, hr, q, guidance, wt, p, out, message, size)
                ? hiwin::kSTATUS_SUCCESS
                : hiwin::kSTATUS_INVALID_ARGUMENT;
        });
}

} // namespace

extern "C" {

int32_t hiwin_capi_version(void)
{
    return HIWIN_CAPI_VERSION;
}

int32_t hiwin_roi_align_cpu_f32(float const* x, int64_t n, int64_t c, int64_t h, int64_t w, float const* rois,
    int64_t num_rois, void const* batch_indices, int32_t batch_index_bytes, int32_t output_height,
    int32_t output_width, int32_t sampling_ratio, float spatial_scale, int32_t aligned, float* out, char* message,
    size_t message_size)
{
    return roiAlign(IoType::kFLOAT32, x, n, c, h, w, rois, num_rois, batch_indices, batch_index_bytes,
        output_height, output_width, sampling_ratio, spatial_scale, aligned, out, message, message_size);
}

int32_t hiwin_roi_align_cpu_f16(uint16_t const* x, int64_t n, int64_t c, int64_t h, int64_t w, uint16_t const* rois,
    int64_t num_rois, void const* batch_indices, int32_t batch_index_bytes, int32_t output_height,
    int32_t output_width, int32_t sampling_ratio, float spatial_scale, int32_t aligned, uint16_t* out, char* message,
    size_t message_size)
{
    return roiAlign(IoType::kFLOAT16, x, n, c, h, w, rois, num_rois, batch_indices, batch_index_bytes,
        output_height, output_width, sampling_ratio, spatial_scale, aligned, out, message, message_size);
}

int32_t hiwin_jbu_conv_cpu_f32(float const* hr, float const* q, float const* guidance, int64_t b, int64_t c,
    int64_t k, int64_t h, int64_t w, float const* range_temp, float const* sigma_spatial, float const* w1,
    float const* b1, float const* w2, float const* b2, int32_t radius, float* out, char* message, size_t message_size)
{
    return jbuConv(IoType::kFLOAT32, hr, q, guidance, b, c, k, h, w, range_temp, sigma_spatial, w1, b1, w2, b2,
        radius, out, message, message_size);
}

int32_t hiwin_jbu_conv_cpu_f16(uint16_t const* hr, uint16_t const* q, uint16_t const* guidance, int64_t b,
    int64_t c, int64_t k, int64_t h, int64_t w, float const* range_temp, float const* sigma_spatial, float const* w1,
    float const* b1, float const* w2, float const* b2, int32_t radius, uint16_t* out, char* message,
    size_t message_size)
{
    return jbuConv(IoType::kFLOAT16, hr, q, guidance, b, c, k, h, w, range_temp, sigma_spatial, w1, b1, w2, b2,
        radius, out, message, message_size);
}

void hiwin_f32_to_f16(float const* src, uint16_t* dst, size_t count)
{
    for (size_t i = 0; i < count; ++i)
    {
        dst[i] = hiwin::floatToHalfBits(src[i]);
    }
}

void hiwin_f16_to_f32(uint16_t const* src, float* dst, size_t count)
{
    for (size_t i = 0; i < count; ++i)
    {
        dst[i] = hiwin::halfBitsToFloat(src[i]);
    }
}

} // extern "C"
