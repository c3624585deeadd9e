/* Hiwin plugins: C ABI of the CPU launchers (libhiwin_plugins_cpu.so), for ctypes and tests.
 *
 * Every launcher returns 0 on success or a non-zero status (1 invalid argument, 2 unsupported,
 * 4 internal error) and then writes a NUL-terminated message into `message` (message_size bytes;
 * may be NULL). Tensors are dense, row-major (NCHW), host memory. fp16 tensors are IEEE binary16
 * words (uint16_t). Weights of the JBU layer are float32 in both variants. */
#ifndef HIWIN_PLUGINS_CAPI_H
#define HIWIN_PLUGINS_CAPI_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define HIWIN_API __declspec(dllexport)
#else
#define HIWIN_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define HIWIN_CAPI_VERSION 1

HIWIN_API int32_t hiwin_capi_version(void);

/* RoI-align (torchvision / ONNX RoiAlign "avg"). x (n, c, h, w); rois (num_rois, 4) as (x1, y1, x2, y2);
 * batch_indices (num_rois,) int32 or int64 (batch_index_bytes 4 or 8); out (num_rois, c, oh, ow).
 * aligned != 0: coordinate_transformation_mode "half_pixel"; 0: "output_half_pixel". */
HIWIN_API int32_t hiwin_roi_align_cpu_f32(float const* x, int64_t n, int64_t c, int64_t h, int64_t w,
    float const* rois, int64_t num_rois, void const* batch_indices, int32_t batch_index_bytes, int32_t output_height,
    int32_t output_width, int32_t sampling_ratio, float spatial_scale, int32_t aligned, float* out, char* message,
    size_t message_size);
HIWIN_API int32_t hiwin_roi_align_cpu_f16(uint16_t const* x, int64_t n, int64_t c, int64_t h, int64_t w,
    uint16_t const* rois, int64_t num_rois, void const* batch_indices, int32_t batch_index_bytes,
    int32_t output_height, int32_t output_width, int32_t sampling_ratio, float spatial_scale, int32_t aligned,
    uint16_t* out, char* message, size_t message_size);

/* One JBU layer's fused adaptive convolution. hr (b, c, h, w) un-padded; q (b, k, h, w); guidance
 * (b, 3, h, w); range_temp (1,), sigma_spatial (1,), w1 (T, T+3), b1 (T,), w2 (T, T), b2 (T,) float32 with
 * T = (2 radius + 1)^2; out (b, c, h, w). */
HIWIN_API int32_t hiwin_jbu_conv_cpu_f32(float const* hr, float const* q, float const* guidance, int64_t b,
    int64_t c, int64_t k, int64_t h, int64_t w, float const* range_temp, float const* sigma_spatial, float const* w1,
    float const* b1, float const* w2, float const* b2, int32_t radius, float* out, char* message,
    size_t message_size);
HIWIN_API int32_t hiwin_jbu_conv_cpu_f16(uint16_t const* hr, uint16_t const* q, uint16_t const* guidance,
    int64_t b, int64_t c, int64_t k, int64_t h, int64_t w, float const* range_temp, float const* sigma_spatial,
    float const* w1, float const* b1, float const* w2, float const* b2, int32_t radius, uint16_t* out,
    char* message, size_t message_size);

/* The host half conversions the fp16 launchers use (round to nearest even), exposed for tests. */
HIWIN_API void hiwin_f32_to_f16(float const* src, uint16_t* dst, size_t count);
HIWIN_API void hiwin_f16_to_f32(uint16_t const* src, float* dst, size_t count);

#ifdef __cplusplus
}
#endif

#endif /* HIWIN_PLUGINS_CAPI_H */
