// HiwinJbuConv TensorRT plugin (IPluginV3 / IPluginV3OneCore / IPluginV3OneBuild / IPluginV3OneRuntime):
// one JBU layer's adaptive convolution, fused (kernel from q, guidance and the fixup weights, reflect
// padding, and the per-pixel (2r+1)^2 convolution of hr). See README.md.
#pragma once

#include "../common/pluginBase.h"
#include "hiwinJbuConv.h"

namespace hiwin
{
namespace plugin
{

constexpr char const* kJBU_CONV_PLUGIN_NAME = "HiwinJbuConv";

class HiwinJbuConvPlugin final : public nvinfer1::IPluginV3,
                                 public nvinfer1::IPluginV3OneCore,
                                 public nvinfer1::IPluginV3OneBuild,
                                 public nvinfer1::IPluginV3OneRuntime
{
public:
    //! Inputs, in order.
    enum Input : int32_t
    {
        kHR = 0,       //!< (B, C, H, W) fp32|fp16, the bicubic-up-sampled source (not padded)
        kQ,            //!< (B, K, H, W) same type, range_proj(guidance)
        kGUIDANCE,     //!< (B, 3, H, W) same type
        kRANGE_TEMP,   //!< (1,) fp32
        kSIGMA,        //!< (1,) fp32
        kW1,           //!< (T, T+3) or (T, T+3, 1, 1) fp32
        kB1,           //!< (T,) fp32
        kW2,           //!< (T, T) or (T, T, 1, 1) fp32
        kB2,           //!< (T,) fp32
        kNB_INPUTS
    };

    explicit HiwinJbuConvPlugin(int32_t radius);
    HiwinJbuConvPlugin(HiwinJbuConvPlugin const& other);
    HiwinJbuConvPlugin& operator=(HiwinJbuConvPlugin const&) = delete;
    ~HiwinJbuConvPlugin() override = default;

    int32_t radius() const noexcept
    {
        return mRadius;
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
    //! Checks ranks and known extents (-1 = dynamic) of the 9 inputs; dims[i] is input i's shape.
    bool checkDims(nvinfer1::Dims const* const* dims) const noexcept;

    int32_t mRadius;
    FieldList mSerialized;
};

class HiwinJbuConvPluginCreator final : public nvinfer1::IPluginCreatorV3One
{
public:
    HiwinJbuConvPluginCreator();
    ~HiwinJbuConvPluginCreator() override = default;

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
