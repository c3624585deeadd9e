// Hiwin plugins: macros shared by host (g++) and device (nvcc) code.
#pragma once

#if defined(__CUDACC__)
#define HIWIN_HD __host__ __device__
#define HIWIN_INLINE __forceinline__
#else
#define HIWIN_HD
#define HIWIN_INLINE inline
#endif

// Unrolling hint for loops whose trip count is a compile-time constant. __CUDA_ARCH__ (not __CUDACC__)
// selects the device pass of nvcc.
#if defined(__CUDA_ARCH__)
#define HIWIN_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__) // nvcc host pass: the host copies of these functions are unused
#define HIWIN_UNROLL
#elif defined(__clang__)
#define HIWIN_UNROLL _Pragma("clang loop unroll(full)")
#elif defined(__GNUC__)
#define HIWIN_UNROLL _Pragma("GCC unroll 16")
#else
#define HIWIN_UNROLL
#endif

// Keep a loop rolled (compact code where the body is already large).
#if defined(__CUDA_ARCH__)
#define HIWIN_NO_UNROLL _Pragma("unroll 1")
#elif defined(__CUDACC__)
#define HIWIN_NO_UNROLL
#elif defined(__clang__)
#define HIWIN_NO_UNROLL _Pragma("clang loop unroll(disable)")
#elif defined(__GNUC__)
#define HIWIN_NO_UNROLL _Pragma("GCC unroll 1")
#else
#define HIWIN_NO_UNROLL
#endif
