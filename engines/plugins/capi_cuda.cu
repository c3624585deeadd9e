// Hiwin plugins: C ABI of the CUDA launchers (see capi_cuda.h).
#include "capi_cuda.h"

#include "jbuConv/jbuConvKernel.h"
#include "roiAlign/roiAlignKernel.h"

namespace
{

bool ioType(int32_t dtype, hiwin::IoType& out, char* message, size_t size)
{
    if (dtype != 0 && dtype != 1)
    {
        hiwin::formatMessage(message, size, "dtype must be 0 (float32) or 1 (float16), got %d", dtype);
        return false;
    }
    out = dtype == 0 ? hiwin::IoType::kFLOAT32 : hiwin::IoType::kFLOAT16;
    return true;
}

int32_t cudaStatus(cudaError_t e, char const* what, char* message, size_t size)
{
    if (e == cudaSuccess)
    {
        return hiwin::kSTATUS_SUCCESS;
    }
    hiwin::formatMessage(message, size, "%s: CUDA error %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
    return hiwin::kSTATUS_CUDA_ERROR;
}

} // namespace

extern "C" {

int32_t hiwin_roi_align_cuda(int32_t dtype, void const* x, int64_t n, int64_t c, int64_t h, int64_t w,
    void const* rois, int64_t num_rois, void const* batch_indices, int32_t batch_index_bytes, int32_t output_height,
    int32_t output_width, int32_t sampling_ratio, float spatial_scale, int32_t aligned, void* out, void* stream,
    char* message, size_t message_size)
{
    hiwin::IoType type;
    if (!ioType(dtype, type, message, message_size))
    {
        return hiwin::kSTATUS_INVALID_ARGUMENT;
    }
    hiwin::RoiAlignParams p;
    p.batch = n;
    p.channels = c;
    p.height = h;
    p.width = w;
    p.numRois = num_rois;
    p.outputHeight = output_height;
    p.outputWidth = output_width;
    p.samplingRatio = sampling_ratio;
    p.spatialScale = spatial_scale;
    p.aligned = aligned != 0;
    if (!hiwin::checkRoiAlignParams(p, batch_index_bytes, message, message_size))
    {
        return hiwin::kSTATUS_INVALID_ARGUMENT;
    }
    return cudaStatus(hiwin::roiAlignCuda(type, x, rois, batch_indices, batch_index_bytes, p, out,
                          static_cast<cudaStream_t>(stream)),
        "HiwinRoiAlign", message, message_size);
}

int32_t hiwin_jbu_conv_cuda(int32_t dtype, void const* hr, void const* q, void const* guidance, int64_t b, int64_t c,
    int64_t k, int64_t h, int64_t w, float const* range_temp, float const* sigma_spatial, float const* w1,
    float const* b1, float const* w2, float const* b2, int32_t radius, void* out, void* stream, char* message,
    size_t message_size)
{
    hiwin::IoType type;
    if (!ioType(dtype, type, message, message_size))
    {
        return hiwin::kSTATUS_INVALID_ARGUMENT;
    }
    hiwin::JbuConvParams p;
    p.batch = b;
    p.channels = c;
    p.keyDim = k;
    p.height = h;
    p.width = w;
    p.radius = radius;
    if (!hiwin::checkJbuConvParams(p, message, message_size))
    {
        return hiwin::kSTATUS_INVALID_ARGUMENT;
    }
    hiwin::JbuConvWeights const wt{range_temp, sigma_spatial, w1, b1, w2, b2};
    return cudaStatus(hiwin::jbuConvCuda(type, hr, q, guidance, wt, p, out, static_cast<cudaStream_t>(stream)),
        "HiwinJbuConv", message, message_size);
}

} // extern "C"
