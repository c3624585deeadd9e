// Hiwin plugins: names shared by both plugins, and a helper that owns the fields returned by
// getFieldsToSerialize (their data pointers point into the plugin object itself).
#pragma once

#include "pluginUtils.h"

#include <string>
#include <vector>

namespace hiwin
{
namespace plugin
{

constexpr char const* kPLUGIN_VERSION = "1";
constexpr char const* kPLUGIN_NAMESPACE = ""; //!< the default namespace: ONNX nodes match by op type alone

//! Builds a PluginFieldCollection from fields appended with add(); pointers must outlive the collection.
class FieldList
{
public:
    void clear()
    {
        mFields.clear();
    }
    void add(char const* name, void const* data, nvinfer1::PluginFieldType type, int32_t length)
    {
        mFields.emplace_back(name, data, type, length);
    }
    nvinfer1::PluginFieldCollection const* collection() noexcept
    {
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
        return &mCollection;
    }

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{};
};

} // namespace plugin
} // namespace hiwin
