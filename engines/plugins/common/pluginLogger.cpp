// Hiwin plugins: logging through TensorRT's logger (see pluginUtils.h).
#include "hiwinCommon.h"
#include "pluginUtils.h"

#include <cstdarg>
#include <cstdio>
#include <mutex>

namespace hiwin
{
namespace plugin
{
namespace
{

std::mutex gMutex;
nvinfer1::ILoggerFinder* gFinder{nullptr};

} // namespace

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept
{
    std::lock_guard<std::mutex> lock(gMutex);
    if (gFinder == nullptr && finder != nullptr)
    {
        gFinder = finder;
    }
}

void log(nvinfer1::ILogger::Severity severity, char const* fmt, ...) noexcept
{
    char buffer[1024];
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(buffer, sizeof buffer, fmt, args);
    va_end(args);
    nvinfer1::ILogger* logger = nullptr;
    {
        std::lock_guard<std::mutex> lock(gMutex);
        if (gFinder != nullptr)
        {
            try
            {
                logger = gFinder->findLogger();
            }
            catch (...)
            {
                logger = nullptr;
            }
        }
    }
    if (logger != nullptr)
    {
        logger->log(severity, buffer);
    }
    else if (severity <= nvinfer1::ILogger::Severity::kWARNING)
    {
        std::fprintf(stderr, "[hiwin plugins] %s\n", buffer);
    }
}

} // namespace plugin
} // namespace hiwin
