// HiwinRoiAlign TensorRT plugin.
#include "hiwinRoiAlignPlugin.h"

#include "roiAlignKernel.h"

#include <cmath>
#include <exception>

using namespace nvinfer1;

namespace hiwin
{
namespace plugin
{
namespace
{

constexpr int32_t kNB_INPUTS = 3; // X, rois, batch_indices
constexpr int32_t kNB_OUTPUTS = 1;
constexpr char const* kHALF_PIXEL = "half_pixel";
constexpr char const* kOUTPUT_HALF_PIXEL = "output_half_pixel";

} // namespace

bool RoiAlignAttributes::fromFields(PluginFieldCollection const* fc, RoiAlignAttributes& out, std::string& error)
{
    out = RoiAlignAttributes{};
    if (fc == nullptr)
    {
        return true;
    }
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        int64_t v = 0;
        std::string s;
        if (fieldIs(f, "output_height") || fieldIs(f, "output_width"))
        {
            if (!fieldToInt(f, v) || v < 1 || v > INT32_MAX)
            {
                error = std::string(f.name) + " must be an integer >= 1";
                return false;
            }
            (fieldIs(f, "output_height") ? out.outputHeight : out.outputWidth) = static_cast<int32_t>(v);
        }
        else if (fieldIs(f, "sampling_ratio"))
        {
            if (!fieldToInt(f, v) || v > INT32_MAX || v < INT32_MIN)
            {
                error = "sampling_ratio must be an integer";
                return false;
            }
            out.samplingRatio = static_cast<int32_t>(v);
        }
        else if (fieldIs(f, "spatial_scale"))
        {
            if (!fieldToFloat(f, out.spatialScale) || !std::isfinite(out.spatialScale))
            {
                error = "spatial_scale must be a finite float";
                return false;
            }
        }
        else if (fieldIs(f, "mode"))
        {
            if (!fieldToString(f, s))
            {
                error = "mode must be a string";
                return false;
            }
            if (s != "avg")
            {
                error = "mode \"" + s + "\" is not supported: HiwinRoiAlign implements mode \"avg\" only";
                return false;
            }
        }
        else if (fieldIs(f, "coordinate_transformation_mode"))
        {
            if (!fieldToString(f, s) || (s != kHALF_PIXEL && s != kOUTPUT_HALF_PIXEL))
            {
                error = "coordinate_transformation_mode must be \"half_pixel\" or \"output_half_pixel\"";
                return false;
            }
            out.aligned = s == kHALF_PIXEL;
        }
        else
        {
            HIWIN_LOG_WARNING("%s: ignoring unknown field \"%s\"", kROI_ALIGN_PLUGIN_NAME, f.name ? f.name : "");
        }
    }
    return true;
}

// ------------------------------------------------------------------------------------------- plugin
HiwinRoiAlignPlugin::HiwinRoiAlignPlugin(RoiAlignAttributes const& attributes)
    : mAttrs(attributes)
{
}

HiwinRoiAlignPlugin::HiwinRoiAlignPlugin(HiwinRoiAlignPlugin const& other)
    : IPluginV3(other)
    , IPluginV3OneCore(other)
    , IPluginV3OneBuild(other)
    , IPluginV3OneRuntime(other)
    , mAttrs(other.mAttrs)
{
    // mSerialized is rebuilt on demand: its pointers must refer to this object's members
}

IPluginCapability* HiwinRoiAlignPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* HiwinRoiAlignPlugin::clone() noexcept
{
    try
    {
        return new HiwinRoiAlignPlugin(*this);
    }
    catch (std::exception const& e)
    {
        HIWIN_LOG_ERROR("%s: clone failed: %s", kROI_ALIGN_PLUGIN_NAME, e.what());
    }
    return nullptr;
}

char const* HiwinRoiAlignPlugin::getPluginName() const noexcept
{
    return kROI_ALIGN_PLUGIN_NAME;
}

char const* HiwinRoiAlignPlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* HiwinRoiAlignPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t HiwinRoiAlignPlugin::getNbOutputs() const noexcept
{
    return kNB_OUTPUTS;
}

bool HiwinRoiAlignPlugin::checkDims(Dims const& x, Dims const& rois, Dims const& indices) const noexcept
{
    if (x.nbDims != 4 || rois.nbDims != 2 || indices.nbDims != 1)
    {
        HIWIN_LOG_ERROR("%s: expected X (N, C, H, W), rois (R, 4), batch_indices (R,); got ranks %d, %d, %d",
            kROI_ALIGN_PLUGIN_NAME, x.nbDims, rois.nbDims, indices.nbDims);
        return false;
    }
    if (rois.d[1] != -1 && rois.d[1] != 4)
    {
        HIWIN_LOG_ERROR("%s: rois must be (R, 4), got second extent %lld", kROI_ALIGN_PLUGIN_NAME,
            static_cast<long long>(rois.d[1]));
        return false;
    }
    if (rois.d[0] != -1 && indices.d[0] != -1 && rois.d[0] != indices.d[0])
    {
        HIWIN_LOG_ERROR("%s: rois has %lld rows but batch_indices %lld entries", kROI_ALIGN_PLUGIN_NAME,
            static_cast<long long>(rois.d[0]), static_cast<long long>(indices.d[0]));
        return false;
    }
    return true;
}

int32_t HiwinRoiAlignPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (in == nullptr || out == nullptr || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        HIWIN_LOG_ERROR("%s: expected 3 inputs and 1 output, got %d and %d", kROI_ALIGN_PLUGIN_NAME, nbInputs,
            nbOutputs);
        return -1;
    }
    return checkDims(in[0].desc.dims, in[1].desc.dims, in[2].desc.dims) ? 0 : -1;
}

int32_t HiwinRoiAlignPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (outputTypes == nullptr || inputTypes == nullptr || nbOutputs != kNB_OUTPUTS || nbInputs != kNB_INPUTS)
    {
        return -1;
    }
    outputTypes[0] = inputTypes[0];
    return 0;
}

int32_t HiwinRoiAlignPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& exprBuilder) noexcept
{
    if (inputs == nullptr || outputs == nullptr || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS
        || inputs[0].nbDims != 4 || inputs[1].nbDims != 2)
    {
        HIWIN_LOG_ERROR("%s: expected X (N, C, H, W) and rois (R, 4)", kROI_ALIGN_PLUGIN_NAME);
        return -1;
    }
    outputs[0].nbDims = 4;
    outputs[0].d[0] = inputs[1].d[0]; // R
    outputs[0].d[1] = inputs[0].d[1]; // C
    outputs[0].d[2] = exprBuilder.constant(mAttrs.outputHeight);
    outputs[0].d[3] = exprBuilder.constant(mAttrs.outputWidth);
    return 0;
}

bool HiwinRoiAlignPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (inOut == nullptr || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS || pos < 0
        || pos >= kNB_INPUTS + kNB_OUTPUTS)
    {
        return false;
    }
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case 0: return isFloatType(d.type);                                  // X: fp32 or fp16
    case 2: return d.type == DataType::kINT32 || d.type == DataType::kINT64; // batch_indices
    default: return d.type == inOut[0].desc.type;                         // rois, output: X's type
    }
}

size_t HiwinRoiAlignPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return 0;
}

int32_t HiwinRoiAlignPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (in == nullptr || out == nullptr || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        return -1;
    }
    return checkDims(in[0].dims, in[1].dims, in[2].dims) ? 0 : -1;
}

int32_t HiwinRoiAlignPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    if (inputDesc == nullptr || inputs == nullptr || outputs == nullptr)
    {
        return -1;
    }
    Dims const& x = inputDesc[0].dims;
    RoiAlignParams p;
    p.batch = x.d[0];
    p.channels = x.d[1];
    p.height = x.d[2];
    p.width = x.d[3];
    p.numRois = inputDesc[1].dims.d[0];
    p.outputHeight = mAttrs.outputHeight;
    p.outputWidth = mAttrs.outputWidth;
    p.samplingRatio = mAttrs.samplingRatio;
    p.spatialScale = mAttrs.spatialScale;
    p.aligned = mAttrs.aligned;
    int32_t const indexBytes = inputDesc[2].type == DataType::kINT64 ? 8 : 4;
    char message[512];
    if (!checkRoiAlignParams(p, indexBytes, message, sizeof message))
    {
        HIWIN_LOG_ERROR("%s", message);
        return -1;
    }
    cudaError_t const e = roiAlignCuda(
        toIoType(inputDesc[0].type), inputs[0], inputs[1], inputs[2], indexBytes, p, outputs[0], stream);
    if (e != cudaSuccess)
    {
        HIWIN_LOG_ERROR("%s: kernel launch failed: %s", kROI_ALIGN_PLUGIN_NAME, cudaGetErrorString(e));
        return -1;
    }
    return 0;
}

IPluginV3* HiwinRoiAlignPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* HiwinRoiAlignPlugin::getFieldsToSerialize() noexcept
{
    try
    {
        mCoordinateMode = mAttrs.aligned ? kHALF_PIXEL : kOUTPUT_HALF_PIXEL;
        mSerialized.clear();
        mSerialized.add("output_height", &mAttrs.outputHeight, PluginFieldType::kINT32, 1);
        mSerialized.add("output_width", &mAttrs.outputWidth, PluginFieldType::kINT32, 1);
        mSerialized.add("sampling_ratio", &mAttrs.samplingRatio, PluginFieldType::kINT32, 1);
        mSerialized.add("spatial_scale", &mAttrs.spatialScale, PluginFieldType::kFLOAT32, 1);
        mSerialized.add("mode", mMode.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(mMode.size()));
        mSerialized.add("coordinate_transformation_mode", mCoordinateMode.c_str(), PluginFieldType::kCHAR,
            static_cast<int32_t>(mCoordinateMode.size()));
        return mSerialized.collection();
    }
    catch (std::exception const& e)
    {
        HIWIN_LOG_ERROR("%s: getFieldsToSerialize failed: %s", kROI_ALIGN_PLUGIN_NAME, e.what());
    }
    return nullptr;
}

// ------------------------------------------------------------------------------------------- creator
HiwinRoiAlignPluginCreator::HiwinRoiAlignPluginCreator()
{
    mFieldNames.add("output_height", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.add("output_width", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.add("sampling_ratio", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.add("spatial_scale", nullptr, PluginFieldType::kFLOAT32, 1);
    mFieldNames.add("mode", nullptr, PluginFieldType::kCHAR, 0);
    mFieldNames.add("coordinate_transformation_mode", nullptr, PluginFieldType::kCHAR, 0);
}

char const* HiwinRoiAlignPluginCreator::getPluginName() const noexcept
{
    return kROI_ALIGN_PLUGIN_NAME;
}

char const* HiwinRoiAlignPluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* HiwinRoiAlignPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* HiwinRoiAlignPluginCreator::getFieldNames() noexcept
{
    return mFieldNames.collection();
}

IPluginV3* HiwinRoiAlignPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        RoiAlignAttributes attrs;
        std::string error;
        if (!RoiAlignAttributes::fromFields(fc, attrs, error))
        {
            HIWIN_LOG_ERROR("%s (layer \"%s\"): %s", kROI_ALIGN_PLUGIN_NAME, name ? name : "", error.c_str());
            return nullptr;
        }
        return new HiwinRoiAlignPlugin(attrs);
    }
    catch (std::exception const& e)
    {
        HIWIN_LOG_ERROR("%s: createPlugin failed: %s", kROI_ALIGN_PLUGIN_NAME, e.what());
    }
    return nullptr;
}

} // namespace plugin
} // namespace hiwin
