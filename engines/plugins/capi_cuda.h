/* Hiwin plugins: C ABI of the CUDA launchers (libhiwin_plugins_cuda.so), for ctypes (gpu_check.py).
 *
 * Same arguments as capi.h, but every tensor is a device pointer, dtype selects the float I/O type
 * (0 float32, 1 float16 = __half; the JBU weights are float32 either way) and the work is enqueued on
 * `stream` (a cudaStream_t; NULL = legacy default stream) without synchronising. Returns 0, or a non-zero
 * status (1 invalid argument, 3 CUDA launch error) with a message. */
#ifndef HIWIN_PLUGINS_CAPI_CUDA_H
#define HIWIN_PLUGINS_CAPI_CUDA_H

#include "capi.h"

#ifdef __cplusplus
extern "C" {
#endif

HIWIN_API int32_t hiwin_roi_align_cuda(int32_t dtype, void const* x, int64_t n, int64_t c, int64_t h, int64_t w,
    void const* rois, int64_t num_rois, void const* batch_indices, int32_t batch_index_bytes, int32_t output_height,
    int32_t output_width, int32_t sampling_ratio, float spatial_scale, int32_t aligned, void* out, void* stream,
    char* message, size_t message_size);

HIWIN_API int32_t hiwin_jbu_conv_cuda(int32_t dtype, void const* hr, void const* q, void const* guidance, int64_t b,
    int64_t c, int64_t k, int64_t h, int64_t w, float const* range_temp, float const* sigma_spatial, float const* w1,
    float const* b1, float const* w2, float const* b2, int32_t radius, void* out, void* stream, char* message,
    size_t message_size);

#ifdef __cplusplus
}
#endif

#endif /* HIWIN_PLUGINS_CAPI_CUDA_H */
