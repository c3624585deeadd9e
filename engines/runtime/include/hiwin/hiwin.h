/*
 * hiwin.h: C API of the hiwin runtime (LLaVA-UHD v2 preprocessing, bit-exact with the Python
 * reference hiwin_runtime, and the vision engines when built with TensorRT).
 *
 * Conventions (C99; every function follows them):
 *  - Errors: every function that can fail returns a hiwin_status*. NULL means success. A non-NULL
 *    status is owned by the caller: read hiwin_status_code() / hiwin_status_message(), then release
 *    it with hiwin_status_free(). Outputs are left untouched (or set to NULL) on failure.
 *  - Handles (hiwin_context, hiwin_image, hiwin_prepared) are opaque; each has one *_free function,
 *    which accepts NULL.
 *  - Buffers: "library-owned" pointers stay valid until the handle they come from is freed and must
 *    not be written or freed by the caller; "caller-owned" buffers are passed with their capacity in
 *    elements, and the call reports the number of elements needed (pass capacity 0 to query it;
 *    a too small buffer gives HIWIN_BUFFER_TOO_SMALL and writes nothing).
 *  - Threads: a hiwin_context is immutable after creation and may be used from any number of
 *    threads at once for decoding and preparation; hiwin_encode_image serialises engine use per
 *    context internally. hiwin_prepare / hiwin_prepare_file / hiwin_prepare_memory also split their
 *    own work over up to hiwin_options.num_threads threads (started and joined within the call);
 *    the results are bit-identical for every thread count. hiwin_image and hiwin_prepared handles are read-only after creation, so
 *    concurrent reads are safe; freeing a handle must not race with other uses of it.
 */
#ifndef HIWIN_HIWIN_H
#define HIWIN_HIWIN_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  if defined(HIWIN_BUILDING_LIBRARY)
#    define HIWIN_API __declspec(dllexport)
#  else
#    define HIWIN_API __declspec(dllimport)
#  endif
#else
#  define HIWIN_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define HIWIN_API_VERSION 1

typedef enum hiwin_code {
  HIWIN_OK = 0,
  HIWIN_INVALID_ARGUMENT = 1,  /* a NULL handle, an out-of-range value */
  HIWIN_IO_ERROR = 2,          /* a file that cannot be opened or read */
  HIWIN_BAD_IMAGE = 3,         /* empty, corrupt, truncated, unsupported or too large image data */
  HIWIN_BAD_GEOMETRY = 4,      /* an aspect ratio too extreme for the model (a crop under 2 patches) */
  HIWIN_BAD_MANIFEST = 5,      /* manifest.json missing, invalid or of an unknown version / rule */
  HIWIN_BUFFER_TOO_SMALL = 6,  /* a caller-owned buffer below the reported size */
  HIWIN_UNSUPPORTED = 7,       /* a feature this build lacks (e.g. no TensorRT backend) */
  HIWIN_BACKEND_ERROR = 8,     /* the inference engine failed (message has its words) */
  HIWIN_OUT_OF_MEMORY = 9,
  HIWIN_INTERNAL = 10
} hiwin_code;

typedef struct hiwin_status hiwin_status;
typedef struct hiwin_context hiwin_context;
typedef struct hiwin_image hiwin_image;
typedef struct hiwin_prepared hiwin_prepared;

/* ------------------------------------------------------------------------------------- status */
HIWIN_API hiwin_code hiwin_status_code(const hiwin_status* status);       /* NULL -> HIWIN_OK */
HIWIN_API const char* hiwin_status_message(const hiwin_status* status);   /* library-owned; "" for NULL */
HIWIN_API void hiwin_status_free(hiwin_status* status);
HIWIN_API const char* hiwin_version(void);                                /* static string */
/* 1 when this build has the TensorRT vision backend, else 0. */
HIWIN_API int hiwin_has_tensorrt(void);
/* The resampling kernels this process uses: "avx512", "avx2" (x86-64, picked at run time) or
 * "generic" (portable C++); the best the CPU has unless the environment variable HIWIN_SIMD names a
 * lesser one (read once). All give the same bytes. Static string. */
HIWIN_API const char* hiwin_simd_level(void);

/* ------------------------------------------------------------------------------------ options */
typedef struct hiwin_options {
  int max_slices;          /* slice budget (default 9); a request may lower it */
  int scale_resolution;    /* S (default 336) */
  int patch_size;          /* p (default 14) */
  float mean[3];           /* CLIP normalisation (defaults: the CLIP values) */
  float std[3];
  int64_t max_pixels;      /* decompression-bomb limit on width*height (default 89478485, Pillow's);
                              0 disables the check for trusted inputs */
  int alpha_composite;     /* 1 (default): composite alpha onto alpha_background; 0: drop alpha */
  uint8_t alpha_background[3]; /* default white */
  int pre_resize;          /* optional upscale-only long side (0 = off, the default) */
  int queries;             /* visual tokens per crop (default 144) */
  int64_t vocab_size;      /* LLM vocabulary (for prompt-table ids; from manifest.json when known) */
  int resize_pass_order;   /* which Pillow's BICUBIC to reproduce: HIWIN_RESIZE_PILLOW13 (default;
                              Pillow >= 13 runs the vertical pass first when the height shrinks by
                              more than twice as many pixels as the width) or HIWIN_RESIZE_PILLOW12
                              (Pillow <= 12: always horizontal first). Match the reference's Pillow. */
  int num_threads;         /* threads per hiwin_prepare / _file / _memory call, the caller's included:
                              0 (default) = the environment variable HIWIN_NUM_THREADS when set, else
                              the CPUs this process may run on; 1 = the calling thread only. With 2 or
                              more, a JPEG's rows are resized on other threads while it decodes. */
} hiwin_options;

#define HIWIN_RESIZE_PILLOW13 0
#define HIWIN_RESIZE_PILLOW12 1

/* Fills *options with the defaults above (vocab_size 32000). */
HIWIN_API void hiwin_options_default(hiwin_options* options);

/* ------------------------------------------------------------------------------------ context */
/* A context without an export: preprocessing with the reference bucket rule. options may be NULL. */
HIWIN_API hiwin_status* hiwin_context_create(const hiwin_options* options, hiwin_context** out);
/* A context from an export directory of `hiwin-export` (reads manifest.json: version, patch size,
 * bucket rule, vocabulary). engines_dir (may be NULL) is an engine set of `hiwin-export engines`;
 * plugin_library (may be NULL: the one named in engines.json, or none) is libhiwin_plugins.so. With
 * engines_dir the build must have the TensorRT backend (HIWIN_UNSUPPORTED otherwise). */
HIWIN_API hiwin_status* hiwin_context_create_from_export(const char* export_dir, const char* engines_dir,
                                                         const char* plugin_library,
                                                         const hiwin_options* options, hiwin_context** out);
HIWIN_API void hiwin_context_free(hiwin_context* ctx);
/* The options in effect (after manifest.json). */
HIWIN_API hiwin_status* hiwin_context_options(const hiwin_context* ctx, hiwin_options* out);

/* ------------------------------------------------------------------------------------- images */
/* Decode a JPEG or PNG file / buffer into an upright RGB image exactly as hiwin_runtime.image.load_image
 * does with Pillow: EXIF orientation applied, alpha composited, 16-bit grey scaled by full range,
 * CMYK converted like Pillow. The data buffer is only read during the call (caller-owned). */
HIWIN_API hiwin_status* hiwin_image_decode_file(const hiwin_context* ctx, const char* path, hiwin_image** out);
HIWIN_API hiwin_status* hiwin_image_decode_memory(const hiwin_context* ctx, const void* data, size_t size,
                                                  hiwin_image** out);
/* Wrap RGB8 pixels the caller decoded (copied; stride in bytes, >= 3*width). */
HIWIN_API hiwin_status* hiwin_image_from_rgb8(const uint8_t* pixels, int width, int height, size_t stride,
                                              hiwin_image** out);
HIWIN_API void hiwin_image_free(hiwin_image* image);
/* Size and library-owned packed RGB8 pixels (height*width*3 bytes); source_mode is the Pillow mode
 * of the decoded file ("RGB", "L", "P", "RGBA", "LA", "CMYK", "1", "I;16"), library-owned. Any out
 * pointer may be NULL. */
HIWIN_API hiwin_status* hiwin_image_info(const hiwin_image* image, int* width, int* height,
                                         const uint8_t** rgb, const char** source_mode);

/* ------------------------------------------------------------------------------------ slicing */
typedef struct hiwin_plan {
  int image_width, image_height;      /* after the optional pre-resize */
  int overview_width, overview_height;
  int grid_cols, grid_rows;           /* 0, 0 when the overview is the only crop */
  int refined_width, refined_height;  /* 0, 0 without a grid */
  int slice_width, slice_height;      /* every slice box: (c*sw, r*sh, (c+1)*sw, (r+1)*sh), row-major */
  int num_crops;                      /* cols*rows slices, then the overview */
} hiwin_plan;

/* The slicing plan of a width x height image (pure arithmetic; max_slices <= 0: the context's).
 * HIWIN_BAD_GEOMETRY for an aspect ratio that yields a crop under 2 patches per side. */
HIWIN_API hiwin_status* hiwin_plan_slices(const hiwin_context* ctx, int width, int height, int max_slices,
                                          hiwin_plan* out);

/* Slice, resize (Pillow BICUBIC, bit-exact), crop and normalise an image (max_slices <= 0: the
 * context's). */
HIWIN_API hiwin_status* hiwin_prepare(const hiwin_context* ctx, const hiwin_image* image, int max_slices,
                                      hiwin_prepared** out);
/* Decode + prepare in one call (the same result as hiwin_image_decode_* then hiwin_prepare, faster:
 * with num_threads != 1 a JPEG's rows are resized on other threads while it decodes). */
HIWIN_API hiwin_status* hiwin_prepare_file(const hiwin_context* ctx, const char* path, int max_slices,
                                           hiwin_prepared** out);
HIWIN_API hiwin_status* hiwin_prepare_memory(const hiwin_context* ctx, const void* data, size_t size, int max_slices,
                                             hiwin_prepared** out);
HIWIN_API void hiwin_prepared_free(hiwin_prepared* prepared);
HIWIN_API hiwin_status* hiwin_prepared_plan(const hiwin_prepared* prepared, hiwin_plan* out);

typedef struct hiwin_crop {
  int width, height;          /* pixels (multiples of the patch size) */
  int left, top;              /* box in the refined image (slices) or 0, 0 (overview) */
  int bucket_oh, bucket_ow;   /* projector bucket of this crop (the manifest's rule) */
  int group;                  /* index of its shape group (crops of one (H, W), first-appearance order) */
  const uint8_t* rgb;         /* library-owned, height*width*3 bytes, packed RGB8 */
  const float* pixels;        /* library-owned, (3, height, width) float32, normalised */
} hiwin_crop;

/* Crop i (0 .. num_crops-1: slices row-major, then the overview). */
HIWIN_API hiwin_status* hiwin_prepared_crop(const hiwin_prepared* prepared, int index, hiwin_crop* out);
/* Shape groups: *num_groups, and for group g the crop indices (caller-owned buffer of capacity
 * elements, *count = needed). */
HIWIN_API hiwin_status* hiwin_prepared_num_groups(const hiwin_prepared* prepared, int* num_groups);
HIWIN_API hiwin_status* hiwin_prepared_group(const hiwin_prepared* prepared, int group, int32_t* indices,
                                             size_t capacity, size_t* count);

/* ------------------------------------------------------------------ layout and prompt tables */
/* Projector bucket (oh, ow) of a crop of width x height patches, by the context's rule. */
HIWIN_API hiwin_status* hiwin_bucket_for(const hiwin_context* ctx, int width_patches, int height_patches,
                                         int* oh, int* ow);
/* Number of visual tokens for a grid (cols = rows = 0: no grid) and `queries` tokens per crop. */
HIWIN_API hiwin_status* hiwin_num_image_tokens(int grid_cols, int grid_rows, int queries, size_t* count);
/* Layout indices: row t of the visual tokens is row indices[t] of the table
 * [crop tokens (num_crops*queries rows: slices row-major, then the overview), newline, comma].
 * Caller-owned buffer. */
HIWIN_API hiwin_status* hiwin_layout_indices(int grid_cols, int grid_rows, int num_crops, int queries,
                                             int64_t* indices, size_t capacity, size_t* count);
/* Prompt-table ids: pre..., vocab_size .. vocab_size+num_visual-1, post... (caller-owned buffer). */
HIWIN_API hiwin_status* hiwin_prompt_table_ids(const int64_t* pre, size_t num_pre, size_t num_visual,
                                               const int64_t* post, size_t num_post, int64_t vocab_size,
                                               int64_t* ids, size_t capacity, size_t* count);

/* ---------------------------------------------------------------------------- vision engines */
/* Visual tokens (T, hidden) float32 of a prepared image in the released layout, through the context's
 * vision engines (TensorRT, or a hiwin_vision_backend): one ViT / JBU / projector batch per shape
 * group, tokens laid out with hiwin_layout_indices and the LLM's separator embeddings newline and
 * comma (hidden floats each, caller-owned). tokens is caller-owned, capacity in floats; *count =
 * T*hidden. HIWIN_UNSUPPORTED when the context has no vision engines. */
HIWIN_API hiwin_status* hiwin_encode_image(hiwin_context* ctx, const hiwin_prepared* prepared,
                                           const float* newline, const float* comma, float* tokens,
                                           size_t capacity, size_t* count);
/* Your own vision engines (ONNX Runtime, a custom TensorRT wrapper, a test double) behind
 * hiwin_encode_image: three callbacks with the stage contracts of the exported graphs. The library
 * allocates every output (sizes from vision_channels / hidden_size / queries); a callback fills it and
 * returns 0, or returns non-zero with a message in msg (msg_size bytes). Pixels are (batch, 3, 14h, 14w)
 * float32 for crops of h x w patches (one shape group at a time). The struct is copied; `user` must
 * outlive the context. Set it before sharing the context between threads; calls are serialised. */
typedef struct hiwin_vision_backend {
  void* user;
  int vision_channels; /* Cv: ViT feature channels */
  int hidden_size;     /* C: token width (the LLM's hidden size) */
  /* pixels -> features (batch, Cv, h, w) */
  int (*vit)(void* user, int batch, int h, int w, const float* pixels, float* features, char* msg, size_t msg_size);
  /* (features, pixels) -> feat2x (batch, Cv, 2h, 2w), feat4x (batch, Cv, 4h, 4w) */
  int (*jbu)(void* user, int batch, int h, int w, const float* features, const float* pixels, float* feat2x,
             float* feat4x, char* msg, size_t msg_size);
  /* projector of bucket (oh, ow): (feat1x, feat2x, feat4x) -> tokens (batch, queries, C) */
  int (*projector)(void* user, int batch, int h, int w, int oh, int ow, const float* feat1x, const float* feat2x,
                   const float* feat4x, float* tokens, char* msg, size_t msg_size);
} hiwin_vision_backend;

HIWIN_API hiwin_status* hiwin_context_set_vision_backend(hiwin_context* ctx, const hiwin_vision_backend* backend);

/* Hidden size of the engines' tokens (0 without engines). */
HIWIN_API int hiwin_context_hidden_size(const hiwin_context* ctx);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* HIWIN_HIWIN_H */
