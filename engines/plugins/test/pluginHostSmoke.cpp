// Host-side smoke test of libhiwin_plugins (no GPU, no TensorRT runtime needed): loads the library with
// dlopen like TensorRT does, and drives the creators and the IPluginV3 capability interfaces through the
// calls that do not need TensorRT objects: field parsing, serialisation round trip, clone, format
// support, output types, shape checks and error reporting. getOutputShapes (needs TensorRT's
// IExprBuilder) and enqueue (needs a GPU) are exercised by TensorRT itself.
//
// Usage: pluginHostSmoke /path/to/libhiwin_plugins.so   (prints OK and exits 0 on success)
#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

int gFailures = 0;

#define EXPECT(cond)                                                                                                 \
    do                                                                                                               \
    {                                                                                                                \
        if (!(cond))                                                                                                 \
        {                                                                                                            \
            std::fprintf(stderr, "FAILED line %d: %s\n", __LINE__, #cond);                                           \
            ++gFailures;                                                                                             \
        }                                                                                                            \
    } while (0)

class RecordingLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            last = msg;
        }
    }
    std::string last;
};

class Finder : public ILoggerFinder
{
public:
    ILogger* findLogger() override
    {
        return &logger;
    }
    RecordingLogger logger;
};

struct Field
{
    std::string name;
    PluginFieldType type;
    std::vector<char> data;
};

//! A PluginFieldCollection owning its data.
class Fields
{
public:
    Fields& i32(char const* name, int32_t v)
    {
        return add(name, PluginFieldType::kINT32, &v, sizeof v, 1);
    }
    Fields& i64(char const* name, int64_t v)
    {
        return add(name, PluginFieldType::kINT64, &v, sizeof v, 1);
    }
    Fields& f32(char const* name, float v)
    {
        return add(name, PluginFieldType::kFLOAT32, &v, sizeof v, 1);
    }
    Fields& str(char const* name, char const* v)
    {
        return add(name, PluginFieldType::kCHAR, v, std::strlen(v), static_cast<int32_t>(std::strlen(v)));
    }
    PluginFieldCollection const* get()
    {
        mFields.clear();
        for (size_t i = 0; i < mData.size(); ++i)
        {
            mFields.emplace_back(mData[i].name.c_str(), mData[i].data.data(), mData[i].type, mLengths[i]);
        }
        mFc.nbFields = static_cast<int32_t>(mFields.size());
        mFc.fields = mFields.data();
        return &mFc;
    }

private:
    Fields& add(char const* name, PluginFieldType t, void const* p, size_t bytes, int32_t length)
    {
        Field f{name, t, std::vector<char>(static_cast<char const*>(p), static_cast<char const*>(p) + bytes)};
        mData.push_back(f);
        mLengths.push_back(length);
        return *this;
    }
    std::vector<Field> mData;
    std::vector<int32_t> mLengths;
    std::vector<PluginField> mFields;
    PluginFieldCollection mFc{};
};

PluginField const* find(PluginFieldCollection const* fc, char const* name)
{
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
    {
        if (std::strcmp(fc->fields[i].name, name) == 0)
        {
            return &fc->fields[i];
        }
    }
    return nullptr;
}

int32_t intField(PluginFieldCollection const* fc, char const* name)
{
    PluginField const* f = find(fc, name);
    return f && f->type == PluginFieldType::kINT32 ? *static_cast<int32_t const*>(f->data) : -12345;
}

std::string strField(PluginFieldCollection const* fc, char const* name)
{
    PluginField const* f = find(fc, name);
    return f && f->type == PluginFieldType::kCHAR ? std::string(static_cast<char const*>(f->data), f->length) : "?";
}

Dims dims(std::initializer_list<int64_t> v)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(v.size());
    int32_t i = 0;
    for (int64_t x : v)
    {
        d.d[i++] = x;
    }
    return d;
}

DynamicPluginTensorDesc desc(Dims d, DataType t, TensorFormat f = TensorFormat::kLINEAR)
{
    DynamicPluginTensorDesc x{};
    x.desc.dims = d;
    x.desc.type = t;
    x.desc.format = f;
    x.min = d;
    x.max = d;
    x.opt = d;
    return x;
}

struct Caps
{
    IPluginV3OneCore* core;
    IPluginV3OneBuild* build;
    IPluginV3OneRuntime* runtime;
};

Caps caps(IPluginV3* p)
{
    return {static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE)),
        static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD)),
        static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME))};
}

bool supports(IPluginV3OneBuild* b, std::vector<DynamicPluginTensorDesc> const& io, int32_t nbInputs)
{
    for (int32_t pos = 0; pos < static_cast<int32_t>(io.size()); ++pos)
    {
        if (!b->supportsFormatCombination(pos, io.data(), nbInputs, static_cast<int32_t>(io.size()) - nbInputs))
        {
            return false;
        }
    }
    return true;
}

void testRoiAlign(IPluginCreatorV3One* creator, Finder& finder)
{
    EXPECT(std::strcmp(creator->getPluginName(), "HiwinRoiAlign") == 0);
    EXPECT(std::strcmp(creator->getPluginVersion(), "1") == 0);
    EXPECT(std::strcmp(creator->getPluginNamespace(), "") == 0);
    PluginFieldCollection const* names = creator->getFieldNames();
    EXPECT(names != nullptr && names->nbFields == 6);
    for (char const* n : {"output_height", "output_width", "sampling_ratio", "spatial_scale", "mode",
             "coordinate_transformation_mode"})
    {
        EXPECT(find(names, n) != nullptr);
    }

    Fields f;
    f.i64("output_height", 3).i32("output_width", 2).i32("sampling_ratio", -1).f32("spatial_scale", 0.25F);
    f.str("mode", "avg").str("coordinate_transformation_mode", "output_half_pixel");
    std::unique_ptr<IPluginV3> p(creator->createPlugin("roi", f.get(), TensorRTPhase::kBUILD));
    EXPECT(p != nullptr);
    if (!p)
    {
        return;
    }
    Caps c = caps(p.get());
    EXPECT(c.core && c.build && c.runtime);
    EXPECT(std::strcmp(c.core->getPluginName(), "HiwinRoiAlign") == 0);
    EXPECT(c.build->getNbOutputs() == 1);

    // serialisation round trip, through the runtime phase, and clone
    PluginFieldCollection const* ser = c.runtime->getFieldsToSerialize();
    EXPECT(intField(ser, "output_height") == 3 && intField(ser, "output_width") == 2);
    EXPECT(intField(ser, "sampling_ratio") == -1);
    EXPECT(find(ser, "spatial_scale") && *static_cast<float const*>(find(ser, "spatial_scale")->data) == 0.25F);
    EXPECT(strField(ser, "mode") == "avg");
    EXPECT(strField(ser, "coordinate_transformation_mode") == "output_half_pixel");
    std::unique_ptr<IPluginV3> p2(creator->createPlugin("roi", ser, TensorRTPhase::kRUNTIME));
    EXPECT(p2 != nullptr);
    std::unique_ptr<IPluginV3> p3(p->clone());
    EXPECT(p3 != nullptr);
    for (IPluginV3* q : {p2.get(), p3.get()})
    {
        if (q)
        {
            PluginFieldCollection const* s = caps(q).runtime->getFieldsToSerialize();
            EXPECT(intField(s, "output_height") == 3 && strField(s, "coordinate_transformation_mode") == "output_half_pixel");
        }
    }
    // defaults: ONNX RoiAlign's (half_pixel)
    Fields empty;
    std::unique_ptr<IPluginV3> d(creator->createPlugin("roi", empty.get(), TensorRTPhase::kBUILD));
    EXPECT(d && strField(caps(d.get()).runtime->getFieldsToSerialize(), "coordinate_transformation_mode") == "half_pixel");

    // formats: X fp32|fp16, rois and output X's type, batch_indices int32|int64, linear only
    Dims x = dims({2, 8, 16, 16});
    Dims r = dims({-1, 4});
    Dims i = dims({-1});
    Dims o = dims({-1, 8, 3, 2});
    EXPECT(supports(c.build, {desc(x, DataType::kFLOAT), desc(r, DataType::kFLOAT), desc(i, DataType::kINT64),
                                 desc(o, DataType::kFLOAT)}, 3));
    EXPECT(supports(c.build, {desc(x, DataType::kHALF), desc(r, DataType::kHALF), desc(i, DataType::kINT32),
                                 desc(o, DataType::kHALF)}, 3));
    EXPECT(!supports(c.build, {desc(x, DataType::kFLOAT), desc(r, DataType::kHALF), desc(i, DataType::kINT64),
                                  desc(o, DataType::kFLOAT)}, 3));
    EXPECT(!supports(c.build, {desc(x, DataType::kINT32), desc(r, DataType::kINT32), desc(i, DataType::kINT64),
                                  desc(o, DataType::kINT32)}, 3));
    EXPECT(!supports(c.build, {desc(x, DataType::kFLOAT), desc(r, DataType::kFLOAT), desc(i, DataType::kFLOAT),
                                  desc(o, DataType::kFLOAT)}, 3));
    EXPECT(!supports(c.build, {desc(x, DataType::kHALF, TensorFormat::kHWC8), desc(r, DataType::kHALF),
                                  desc(i, DataType::kINT32), desc(o, DataType::kHALF)}, 3));

    DataType in[3] = {DataType::kHALF, DataType::kHALF, DataType::kINT64};
    DataType out[1] = {DataType::kFLOAT};
    EXPECT(c.build->getOutputDataTypes(out, 1, in, 3) == 0 && out[0] == DataType::kHALF);

    std::vector<DynamicPluginTensorDesc> io{desc(x, DataType::kFLOAT), desc(r, DataType::kFLOAT),
        desc(i, DataType::kINT64), desc(o, DataType::kFLOAT)};
    EXPECT(c.build->configurePlugin(io.data(), 3, io.data() + 3, 1) == 0);
    EXPECT(c.build->getWorkspaceSize(io.data(), 3, io.data() + 3, 1) == 0);
    io[1] = desc(dims({5, 5}), DataType::kFLOAT);
    finder.logger.last.clear();
    EXPECT(c.build->configurePlugin(io.data(), 3, io.data() + 3, 1) != 0);
    EXPECT(finder.logger.last.find("rois must be (R, 4)") != std::string::npos);
    PluginTensorDesc rt[4] = {io[0].desc, io[1].desc, io[2].desc, io[3].desc};
    rt[1].dims = dims({7, 4});
    rt[2].dims = dims({6});
    EXPECT(c.runtime->onShapeChange(rt, 3, rt + 3, 1) != 0); // 7 rois, 6 batch indices
    rt[2].dims = dims({7});
    EXPECT(c.runtime->onShapeChange(rt, 3, rt + 3, 1) == 0);

    // errors: mode "max", unknown coordinate mode, bad output size
    Fields bad;
    bad.str("mode", "max");
    finder.logger.last.clear();
    EXPECT(creator->createPlugin("roi", bad.get(), TensorRTPhase::kBUILD) == nullptr);
    EXPECT(finder.logger.last.find("mode \"max\" is not supported") != std::string::npos);
    Fields bad2;
    bad2.str("coordinate_transformation_mode", "asymmetric");
    EXPECT(creator->createPlugin("roi", bad2.get(), TensorRTPhase::kBUILD) == nullptr);
    Fields bad3;
    bad3.i32("output_height", 0);
    EXPECT(creator->createPlugin("roi", bad3.get(), TensorRTPhase::kBUILD) == nullptr);
}

void testJbuConv(IPluginCreatorV3One* creator, Finder& finder)
{
    EXPECT(std::strcmp(creator->getPluginName(), "HiwinJbuConv") == 0);
    EXPECT(std::strcmp(creator->getPluginVersion(), "1") == 0);
    EXPECT(find(creator->getFieldNames(), "radius") != nullptr);
    Fields f;
    f.i32("radius", 3);
    std::unique_ptr<IPluginV3> p(creator->createPlugin("jbu", f.get(), TensorRTPhase::kBUILD));
    EXPECT(p != nullptr);
    if (!p)
    {
        return;
    }
    Caps c = caps(p.get());
    EXPECT(c.core && c.build && c.runtime && c.build->getNbOutputs() == 1);
    PluginFieldCollection const* ser = c.runtime->getFieldsToSerialize();
    EXPECT(intField(ser, "radius") == 3);
    std::unique_ptr<IPluginV3> p2(creator->createPlugin("jbu", ser, TensorRTPhase::kRUNTIME));
    EXPECT(p2 && intField(caps(p2.get()).runtime->getFieldsToSerialize(), "radius") == 3);
    std::unique_ptr<IPluginV3> p3(caps(p.get()).runtime->attachToContext(nullptr));
    EXPECT(p3 && intField(caps(p3.get()).runtime->getFieldsToSerialize(), "radius") == 3);

    auto io = [](DataType t, int64_t H, Dims w1)
    {
        return std::vector<DynamicPluginTensorDesc>{desc(dims({2, 16, H, 8}), t), desc(dims({2, 4, H, 8}), t),
            desc(dims({2, 3, H, 8}), t), desc(dims({1}), DataType::kFLOAT), desc(dims({1}), DataType::kFLOAT),
            desc(w1, DataType::kFLOAT), desc(dims({49}), DataType::kFLOAT), desc(dims({49, 49, 1, 1}), DataType::kFLOAT),
            desc(dims({49}), DataType::kFLOAT), desc(dims({2, 16, H, 8}), t)};
    };
    for (DataType t : {DataType::kFLOAT, DataType::kHALF})
    {
        auto v = io(t, 8, dims({49, 52}));
        EXPECT(supports(c.build, v, 9));
        EXPECT(c.build->configurePlugin(v.data(), 9, v.data() + 9, 1) == 0);
        DataType in[9];
        for (int32_t i = 0; i < 9; ++i)
        {
            in[i] = v[i].desc.type;
        }
        DataType out[1] = {DataType::kINT32};
        EXPECT(c.build->getOutputDataTypes(out, 1, in, 9) == 0 && out[0] == t);
    }
    auto v = io(DataType::kHALF, 8, dims({49, 52}));
    v[3].desc.type = DataType::kHALF; // parameters are fp32 only
    EXPECT(!supports(c.build, v, 9));
    v = io(DataType::kHALF, 8, dims({49, 52}));
    v[1].desc.type = DataType::kFLOAT; // q must have hr's type
    EXPECT(!supports(c.build, v, 9));
    v = io(DataType::kFLOAT, 3, dims({49, 52})); // H = 3 <= radius
    finder.logger.last.clear();
    EXPECT(c.build->configurePlugin(v.data(), 9, v.data() + 9, 1) != 0);
    EXPECT(finder.logger.last.find("must be > radius 3") != std::string::npos);
    v = io(DataType::kFLOAT, 8, dims({49, 49}));
    EXPECT(c.build->configurePlugin(v.data(), 9, v.data() + 9, 1) != 0);
    v = io(DataType::kFLOAT, 8, dims({49, 52}));
    v[2].desc.dims = dims({2, 4, 8, 8}); // 4 guidance channels
    EXPECT(c.build->configurePlugin(v.data(), 9, v.data() + 9, 1) != 0);

    Fields bad;
    bad.i32("radius", 9);
    EXPECT(creator->createPlugin("jbu", bad.get(), TensorRTPhase::kBUILD) == nullptr);
    Fields dflt;
    std::unique_ptr<IPluginV3> d(creator->createPlugin("jbu", dflt.get(), TensorRTPhase::kBUILD));
    EXPECT(d && intField(caps(d.get()).runtime->getFieldsToSerialize(), "radius") == 3);
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s libhiwin_plugins.so\n", argv[0]);
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr)
    {
        std::fprintf(stderr, "dlopen failed: %s\n", dlerror());
        return 2;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
    EXPECT(getCreators != nullptr && setLoggerFinder != nullptr);
    if (!getCreators || !setLoggerFinder)
    {
        return 1;
    }
    static Finder finder;
    setLoggerFinder(&finder);
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    EXPECT(n == 2 && creators != nullptr);
    for (int32_t i = 0; i < n; ++i)
    {
        InterfaceInfo const info = creators[i]->getInterfaceInfo();
        EXPECT(std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0 && info.major == 1);
        auto* creator = static_cast<IPluginCreatorV3One*>(creators[i]);
        if (std::strcmp(creator->getPluginName(), "HiwinRoiAlign") == 0)
        {
            testRoiAlign(creator, finder);
        }
        else
        {
            testJbuConv(creator, finder);
        }
    }
    if (gFailures != 0)
    {
        std::fprintf(stderr, "%d check(s) failed\n", gFailures);
        return 1;
    }
    std::printf("OK\n");
    return 0;
}
