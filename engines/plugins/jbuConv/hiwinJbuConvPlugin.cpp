// HiwinJbuConv TensorRT plugin.
#include "hiwinJbuConvPlugin.h"

#include "jbuConvKernel.h"

#include <exception>

using namespace nvinfer1;

namespace hiwin
{
namespace plugin
{
namespace
{

constexpr int32_t kNB_OUTPUTS = 1;
constexpr int32_t kNB_INPUTS = HiwinJbuConvPlugin::kNB_INPUTS;

bool known(int64_t v) noexcept
{
    return v >= 0;
}

bool sameOrUnknown(int64_t a, int64_t b) noexcept
{
    return !known(a) || !known(b) || a == b;
}

//! d is `want` (a 1-D/2-D shape) possibly followed by unit dimensions (1x1 conv weights), extents may be -1.
bool matches(Dims const& d, int32_t rank, int64_t const* want) noexcept
{
    if (d.nbDims < rank)
    {
        return false;
    }
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        int64_t const w = i < rank ? want[i] : 1;
        if (!sameOrUnknown(d.d[i], w))
        {
            return false;
        }
    }
    return true;
}

//! A single-element tensor: rank 0, or every extent 1 (or unknown).
bool isScalar(Dims const& d) noexcept
{
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        if (!sameOrUnknown(d.d[i], 1))
        {
            return false;
        }
    }
    return true;
}

} // namespace

HiwinJbuConvPlugin::HiwinJbuConvPlugin(int32_t radius)
    : mRadius(radius)
{
}

HiwinJbuConvPlugin::HiwinJbuConvPlugin(HiwinJbuConvPlugin const& other)
    : IPluginV3(other)
    , IPluginV3OneCore(other)
    , IPluginV3OneBuild(other)
    , IPluginV3OneRuntime(other)
    , mRadius(other.mRadius)
{
}

IPluginCapability* HiwinJbuConvPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* HiwinJbuConvPlugin::clone() noexcept
{
    try
    {
        return new HiwinJbuConvPlugin(*this);
    }
    catch (std::exception const& e)
    {
        HIWIN_LOG_ERROR("%s: clone failed: %s", kJBU_CONV_PLUGIN_NAME, e.what());
    }
    return nullptr;
}

char const* HiwinJbuConvPlugin::getPluginName() const noexcept
{
    return kJBU_CONV_PLUGIN_NAME;
}

char const* HiwinJbuConvPlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* HiwinJbuConvPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t HiwinJbuConvPlugin::getNbOutputs() const noexcept
{
    return kNB_OUTPUTS;
}

bool HiwinJbuConvPlugin::checkDims(Dims const* const* dims) const noexcept
{
    Dims const& hr = *dims[kHR];
    Dims const& q = *dims[kQ];
    Dims const& g = *dims[kGUIDANCE];
    if (hr.nbDims != 4 || q.nbDims != 4 || g.nbDims != 4)
    {
        HIWIN_LOG_ERROR("%s: hr, q and guidance must be 4-D (B, *, H, W); got ranks %d, %d, %d",
            kJBU_CONV_PLUGIN_NAME, hr.nbDims, q.nbDims, g.nbDims);
        return false;
    }
    for (int32_t i : {0, 2, 3})
    {
        if (!sameOrUnknown(hr.d[i], q.d[i]) || !sameOrUnknown(hr.d[i], g.d[i]))
        {
            HIWIN_LOG_ERROR("%s: hr, q and guidance must share B, H, W (dimension %d: %lld, %lld, %lld)",
                kJBU_CONV_PLUGIN_NAME, i, static_cast<long long>(hr.d[i]), static_cast<long long>(q.d[i]),
                static_cast<long long>(g.d[i]));
            return false;
        }
    }
    if (!sameOrUnknown(g.d[1], kJbuGuidanceChannels))
    {
        HIWIN_LOG_ERROR("%s: guidance must have 3 channels, got %lld", kJBU_CONV_PLUGIN_NAME,
            static_cast<long long>(g.d[1]));
        return false;
    }
    for (int32_t i : {2, 3})
    {
        if (known(hr.d[i]) && hr.d[i] <= mRadius)
        {
            HIWIN_LOG_ERROR("%s: H and W must be > radius %d for reflect padding (got %lld x %lld)",
                kJBU_CONV_PLUGIN_NAME, mRadius, static_cast<long long>(hr.d[2]), static_cast<long long>(hr.d[3]));
            return false;
        }
    }
    int64_t const T = (2 * mRadius + 1) * (2 * mRadius + 1);
    int64_t const w1[2] = {T, T + kJbuGuidanceChannels};
    int64_t const w2[2] = {T, T};
    bool const ok = isScalar(*dims[kRANGE_TEMP]) && isScalar(*dims[kSIGMA]) && matches(*dims[kW1], 2, w1)
        && matches(*dims[kB1], 1, &T) && matches(*dims[kW2], 2, w2) && matches(*dims[kB2], 1, &T);
    if (!ok)
    {
        HIWIN_LOG_ERROR("%s: with radius %d the parameters must be range_temp (1,), sigma_spatial (1,), w1 (%lld, "
                        "%lld), b1 (%lld,), w2 (%lld, %lld), b2 (%lld,)",
            kJBU_CONV_PLUGIN_NAME, mRadius, static_cast<long long>(T), static_cast<long long>(T + 3),
            static_cast<long long>(T), static_cast<long long>(T), static_cast<long long>(T),
            static_cast<long long>(T));
        return false;
    }
    return true;
}

int32_t HiwinJbuConvPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (in == nullptr || out == nullptr || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        HIWIN_LOG_ERROR("%s: expected %d inputs and 1 output, got %d and %d", kJBU_CONV_PLUGIN_NAME, kNB_INPUTS,
            nbInputs, nbOutputs);
        return -1;
    }
    Dims const* dims[kNB_INPUTS];
    for (int32_t i = 0; i < kNB_INPUTS; ++i)
    {
        dims[i] = &in[i].desc.dims;
    }
    return checkDims(dims) ? 0 : -1;
}

int32_t HiwinJbuConvPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (outputTypes == nullptr || inputTypes == nullptr || nbOutputs != kNB_OUTPUTS || nbInputs != kNB_INPUTS)
    {
        return -1;
    }
    outputTypes[0] = inputTypes[kHR];
    return 0;
}

int32_t HiwinJbuConvPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& /*exprBuilder*/) noexcept
{
    if (inputs == nullptr || outputs == nullptr || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS
        || inputs[kHR].nbDims != 4)
    {
        HIWIN_LOG_ERROR("%s: expected %d inputs with hr (B, C, H, W)", kJBU_CONV_PLUGIN_NAME, kNB_INPUTS);
        return -1;
    }
    outputs[0] = inputs[kHR];
    return 0;
}

bool HiwinJbuConvPlugin::supportsFormatCombination(
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
    if (pos == kHR)
    {
        return isFloatType(d.type);
    }
    if (pos == kQ || pos == kGUIDANCE || pos == kNB_INPUTS) // q, guidance and the output: hr's type
    {
        return d.type == inOut[kHR].desc.type;
    }
    return d.type == DataType::kFLOAT; // the parameters are always fp32
}

size_t HiwinJbuConvPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return 0;
}

int32_t HiwinJbuConvPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (in == nullptr || out == nullptr || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        return -1;
    }
    Dims const* dims[kNB_INPUTS];
    for (int32_t i = 0; i < kNB_INPUTS; ++i)
    {
        dims[i] = &in[i].dims;
    }
    return checkDims(dims) ? 0 : -1;
}

int32_t HiwinJbuConvPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    if (inputDesc == nullptr || inputs == nullptr || outputs == nullptr)
    {
        return -1;
    }
    Dims const& hr = inputDesc[kHR].dims;
    JbuConvParams p;
    p.batch = hr.d[0];
    p.channels = hr.d[1];
    p.keyDim = inputDesc[kQ].dims.d[1];
    p.height = hr.d[2];
    p.width = hr.d[3];
    p.radius = mRadius;
    char message[512];
    if (!checkJbuConvParams(p, message, sizeof message))
    {
        HIWIN_LOG_ERROR("%s", message);
        return -1;
    }
    JbuConvWeights const wt{static_cast<float const*>(inputs[kRANGE_TEMP]), static_cast<float const*>(inputs[kSIGMA]),
        static_cast<float const*>(inputs[kW1]), static_cast<float const*>(inputs[kB1]),
        static_cast<float const*>(inputs[kW2]), static_cast<float const*>(inputs[kB2])};
    cudaError_t const e = jbuConvCuda(
        toIoType(inputDesc[kHR].type), inputs[kHR], inputs[kQ], inputs[kGUIDANCE], wt, p, outputs[0], stream);
    if (e != cudaSuccess)
    {
        HIWIN_LOG_ERROR("%s: kernel launch failed: %s", kJBU_CONV_PLUGIN_NAME, cudaGetErrorString(e));
        return -1;
    }
    return 0;
}

IPluginV3* HiwinJbuConvPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* HiwinJbuConvPlugin::getFieldsToSerialize() noexcept
{
    try
    {
        mSerialized.clear();
        mSerialized.add("radius", &mRadius, PluginFieldType::kINT32, 1);
        return mSerialized.collection();
    }
    catch (std::exception const& e)
    {
        HIWIN_LOG_ERROR("%s: getFieldsToSerialize failed: %s", kJBU_CONV_PLUGIN_NAME, e.what());
    }
    return nullptr;
}

// ------------------------------------------------------------------------------------------- creator
HiwinJbuConvPluginCreator::HiwinJbuConvPluginCreator()
{
    mFieldNames.add("radius", nullptr, PluginFieldType::kINT32, 1);
}

char const* HiwinJbuConvPluginCreator::getPluginName() const noexcept
{
    return kJBU_CONV_PLUGIN_NAME;
}

char const* HiwinJbuConvPluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* HiwinJbuConvPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* HiwinJbuConvPluginCreator::getFieldNames() noexcept
{
    return mFieldNames.collection();
}

IPluginV3* HiwinJbuConvPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        int64_t radius = 3;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            if (fieldIs(f, "radius"))
            {
                if (!fieldToInt(f, radius) || radius < kJbuMinRadius || radius > kJbuMaxRadius)
                {
                    HIWIN_LOG_ERROR("%s (layer \"%s\"): radius must be an integer in [%d, %d]", kJBU_CONV_PLUGIN_NAME,
                        name ? name : "", kJbuMinRadius, kJbuMaxRadius);
                    return nullptr;
                }
            }
            else
            {
                HIWIN_LOG_WARNING("%s: ignoring unknown field \"%s\"", kJBU_CONV_PLUGIN_NAME, f.name ? f.name : "");
            }
        }
        return new HiwinJbuConvPlugin(static_cast<int32_t>(radius));
    }
    catch (std::exception const& e)
    {
        HIWIN_LOG_ERROR("%s: createPlugin failed: %s", kJBU_CONV_PLUGIN_NAME, e.what());
    }
    return nullptr;
}

} // namespace plugin
} // namespace hiwin
