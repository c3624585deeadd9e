// Hiwin plugins: TensorRT-side helpers (logging through the ILoggerFinder given to setLoggerFinder, and
// tolerant reading of PluginField values as written by the ONNX parser, polygraphy or our own
// getFieldsToSerialize).
#pragma once

#include "hiwinCommon.h"
#include "hiwinHalf.h"

#include <NvInferRuntime.h>
#include <NvInferVersion.h>

#include <cstdint>
#include <cstring>
#include <string>

#if NV_TENSORRT_MAJOR < 10
#error "the Hiwin plugins need TensorRT >= 10 (IPluginV3)"
#endif

namespace hiwin
{
namespace plugin
{

//! Remembers the logger finder (first non-null one wins), thread-safe.
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;

//! Logs through TensorRT's logger when one is known, else to stderr (errors only).
void log(nvinfer1::ILogger::Severity severity, char const* fmt, ...) noexcept;

#define HIWIN_LOG_ERROR(...) ::hiwin::plugin::log(nvinfer1::ILogger::Severity::kERROR, __VA_ARGS__)
#define HIWIN_LOG_WARNING(...) ::hiwin::plugin::log(nvinfer1::ILogger::Severity::kWARNING, __VA_ARGS__)

inline bool fieldIs(nvinfer1::PluginField const& f, char const* name) noexcept
{
    return f.name != nullptr && std::strcmp(f.name, name) == 0;
}

//! Integer field (kINT8/16/32/64, or an integral float): false when absent data or another type.
inline bool fieldToInt(nvinfer1::PluginField const& f, int64_t& out) noexcept
{
    using nvinfer1::PluginFieldType;
    if (f.data == nullptr || f.length < 1)
    {
        return false;
    }
    switch (f.type)
    {
    case PluginFieldType::kINT8: out = *static_cast<int8_t const*>(f.data); return true;
    case PluginFieldType::kINT16: out = *static_cast<int16_t const*>(f.data); return true;
    case PluginFieldType::kINT32: out = *static_cast<int32_t const*>(f.data); return true;
    case PluginFieldType::kINT64: out = *static_cast<int64_t const*>(f.data); return true;
    case PluginFieldType::kFLOAT32:
    {
        float const v = *static_cast<float const*>(f.data);
        out = static_cast<int64_t>(v);
        return static_cast<float>(out) == v;
    }
    case PluginFieldType::kFLOAT64:
    {
        double const v = *static_cast<double const*>(f.data);
        out = static_cast<int64_t>(v);
        return static_cast<double>(out) == v;
    }
    default: return false;
    }
}

//! Float field (kFLOAT16/32/64 or an integer type).
inline bool fieldToFloat(nvinfer1::PluginField const& f, float& out) noexcept
{
    using nvinfer1::PluginFieldType;
    if (f.data == nullptr || f.length < 1)
    {
        return false;
    }
    switch (f.type)
    {
    case PluginFieldType::kFLOAT16: out = halfBitsToFloat(*static_cast<uint16_t const*>(f.data)); return true;
    case PluginFieldType::kFLOAT32: out = *static_cast<float const*>(f.data); return true;
    case PluginFieldType::kFLOAT64: out = static_cast<float>(*static_cast<double const*>(f.data)); return true;
    default:
    {
        int64_t i = 0;
        if (!fieldToInt(f, i))
        {
            return false;
        }
        out = static_cast<float>(i);
        return true;
    }
    }
}

//! String field (kCHAR; the length may or may not count a terminating NUL).
inline bool fieldToString(nvinfer1::PluginField const& f, std::string& out)
{
    if (f.type != nvinfer1::PluginFieldType::kCHAR || (f.data == nullptr && f.length > 0) || f.length < 0)
    {
        return false;
    }
    char const* s = static_cast<char const*>(f.data);
    size_t n = static_cast<size_t>(f.length);
    while (n > 0 && s[n - 1] == '\0')
    {
        --n;
    }
    out.assign(s == nullptr ? "" : s, n);
    return true;
}

inline bool isFloatType(nvinfer1::DataType t) noexcept
{
    return t == nvinfer1::DataType::kFLOAT || t == nvinfer1::DataType::kHALF;
}

inline IoType toIoType(nvinfer1::DataType t) noexcept
{
    return t == nvinfer1::DataType::kHALF ? IoType::kFLOAT16 : IoType::kFLOAT32;
}

//! Known extent of dimension i (-1 when dynamic at this point).
inline int64_t knownDim(nvinfer1::Dims const& d, int32_t i) noexcept
{
    return i < d.nbDims ? d.d[i] : -1;
}

} // namespace plugin
} // namespace hiwin
