// Hiwin plugins library entry points (libhiwin_plugins.so): the two exported C functions TensorRT looks
// for when it loads a plugin library dynamically (trtexec --dynamicPlugins, polygraphy --plugins,
// IPluginRegistry::loadLibrary, the ONNX parser's plugin fallback after loading).
#include "common/pluginUtils.h"
#include "jbuConv/hiwinJbuConvPlugin.h"
#include "roiAlign/hiwinRoiAlignPlugin.h"

#if defined(_WIN32)
#define HIWIN_PLUGIN_API __declspec(dllexport)
#else
#define HIWIN_PLUGIN_API __attribute__((visibility("default")))
#endif

extern "C" HIWIN_PLUGIN_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static hiwin::plugin::HiwinRoiAlignPluginCreator roiAlignCreator;
    static hiwin::plugin::HiwinJbuConvPluginCreator jbuConvCreator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&roiAlignCreator, &jbuConvCreator};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}

extern "C" HIWIN_PLUGIN_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    hiwin::plugin::setLoggerFinder(finder);
}
