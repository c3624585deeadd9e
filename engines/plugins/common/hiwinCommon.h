// Hiwin plugins: small host-side helpers shared by the CPU launchers, the C ABI and the plugins.
#pragma once

#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>

namespace hiwin
{

//! Element type of the floating-point tensors of a launch (all float I/O of one launch share it).
enum class IoType : int32_t
{
    kFLOAT32 = 0,
    kFLOAT16 = 1,
};

//! Status codes of the C ABI (capi.h) and the launchers.
enum Status : int32_t
{
    kSTATUS_SUCCESS = 0,
    kSTATUS_INVALID_ARGUMENT = 1,
    kSTATUS_UNSUPPORTED = 2,
    kSTATUS_CUDA_ERROR = 3,
    kSTATUS_INTERNAL_ERROR = 4,
};

//! printf-style message into a caller buffer (always NUL-terminated when size > 0; null buffer is ok).
inline void formatMessage(char* buffer, size_t size, char const* fmt, ...) noexcept
{
    if (buffer == nullptr || size == 0)
    {
        return;
    }
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(buffer, size, fmt, args);
    va_end(args);
}

//! A checked launch argument: returns false (with the message written) when the condition fails.
#define HIWIN_CHECK_ARG(cond, msg, size, ...)                                                                        \
    do                                                                                                               \
    {                                                                                                                \
        if (!(cond))                                                                                                 \
        {                                                                                                            \
            ::hiwin::formatMessage((msg), (size), __VA_ARGS__);                                                      \
            return false;                                                                                            \
        }                                                                                                            \
    } while (0)

} // namespace hiwin
