// HiwinRoiAlign TensorRT plugin (IPluginV3 / IPluginV3OneCore / IPluginV3OneBuild / IPluginV3OneRuntime).
// Replaces an ONNX RoiAlign node one for one (mode "avg"); see README.md.
#pragma once

#include "../common/pluginBase.h"
#include "hiwinRoiAlign.h"

#include <string>

namespace hiwin
{
namespace plugin
{

constexpr char const* kROI_ALIGN_PLUGIN_NAME = "HiwinRoiAlign";

//! The plugin's attributes (ONNX RoiAlign's, mode restricted to "avg").
struct RoiAlignAttributes
{
    int32_t outputHeight{1};
    int32_t outputWidth{1};
    int32_t samplingRatio{0};
    float spatialScale{1.F};
    bool aligned{true}; //!< coordinate_transformation_mode: "half_pixel" (true) or "output_half_pixel"

    //! Parses fields (missing ones keep the ONNX defaults); false with a message on a bad value.
    static bool fromFields(nvinfer1::PluginFieldCollection const* fc, RoiAlignAttributes& out, std::string& error);
};

class HiwinRoiAlignPlugin final : public nvinfer1::IPluginV3,
                                  public nvinfer1::IPluginV3OneCore,
                                  public nvinfer1::IPluginV3OneBuild,
                                  public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit HiwinRoiAlignPlugin(RoiAlignAttributes const& attributes);
    HiwinRoiAlignPlugin(HiwinRoiAlignPlugin const& other);
    HiwinRoiAlignPlugin& operator=(HiwinRoiAlignPlugin const&) = delete;
    ~HiwinRoiAlignPlugin() override = default;

    RoiAlignAttributes const& attributes() const noexcept
    {
        return mAttrs;
    }

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    //! Checks ranks and the known extents (-1 = dynamic) of X, rois, batch_indices.
    bool checkDims(nvinfer1::Dims const& x, nvinfer1::Dims const& rois, nvinfer1::Dims const& indices) const noexcept;

    RoiAlignAttributes mAttrs;
    // serialisation storage (getFieldsToSerialize points into these)
    std::string mMode{"avg"};
    std::string mCoordinateMode;
    FieldList mSerialized;
};

class HiwinRoiAlignPluginCreator final : public nvinfer1::IPluginCreatorV3One
{
public:
    HiwinRoiAlignPluginCreator();
    ~HiwinRoiAlignPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    FieldList mFieldNames;
};

} // namespace plugin
} // namespace hiwin
