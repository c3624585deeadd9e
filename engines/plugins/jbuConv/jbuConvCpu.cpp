// HiwinJbuConv CPU launcher: per pixel, the shared maths builds the kernel once and applies it to every
// channel of hr.
#include "jbuConvCpu.h"

#include "../common/hiwinHalf.h"

namespace hiwin
{
namespace
{

inline float toFloat(float v)
{
    return v;
}
inline float toFloat(uint16_t v)
{
    return halfBitsToFloat(v);
}
inline void store(float* p, float v)
{
    *p = v;
}
inline void store(uint16_t* p, float v)
{
    *p = floatToHalfBits(v);
}

template <int32_t R, class T>
void run(T const* hr, T const* q, T const* guidance, JbuConvWeights const& wt, JbuConvParams const& p, T* out)
{
    constexpr int32_t T_ = JbuTaps<R>::kTaps;
    int32_t const H = static_cast<int32_t>(p.height);
    int32_t const W = static_cast<int32_t>(p.width);
    int64_t const plane = static_cast<int64_t>(H) * W;
    float const rangeTemp = wt.rangeTemp[0];
    float const sigma = wt.sigmaSpatial[0];
    for (int64_t b = 0; b < p.batch; ++b)
    {
        T const* qb = q + b * p.keyDim * plane;
        T const* hb = hr + b * p.channels * plane;
        T const* gb = guidance + b * kJbuGuidanceChannels * plane;
        T* ob = out + b * p.channels * plane;
        for (int32_t y = 0; y < H; ++y)
        {
            int32_t rows[2 * R + 1];
            for (int32_t i = 0; i <= 2 * R; ++i)
            {
                rows[i] = jbuReflect(y + i - R, H);
            }
            for (int32_t x = 0; x < W; ++x)
            {
                int32_t cols[2 * R + 1];
                for (int32_t j = 0; j <= 2 * R; ++j)
                {
                    cols[j] = jbuReflect(x + j - R, W);
                }
                int64_t const at = static_cast<int64_t>(y) * W + x;
                float k[T_] = {};
                for (int64_t c = 0; c < p.keyDim; ++c)
                {
                    T const* m = qb + c * plane;
                    auto nb = [m, &rows, &cols, W](int32_t i, int32_t j)
                    { return toFloat(m[static_cast<int64_t>(rows[i]) * W + cols[j]]); };
                    jbuAccumulateLogits<R>(k, nb, toFloat(m[at]));
                }
                jbuFinishKernel<R>(k, rangeTemp, sigma, toFloat(gb[at]), toFloat(gb[plane + at]),
                    toFloat(gb[2 * plane + at]), wt.w1, wt.b1, wt.w2, wt.b2);
                for (int64_t c = 0; c < p.channels; ++c)
                {
                    T const* m = hb + c * plane;
                    auto nb = [m, &rows, &cols, W](int32_t i, int32_t j)
                    { return toFloat(m[static_cast<int64_t>(rows[i]) * W + cols[j]]); };
                    store(ob + c * plane + at, jbuApply<R>(k, nb));
                }
            }
        }
    }
}

template <class T>
void dispatch(T const* hr, T const* q, T const* g, JbuConvWeights const& wt, JbuConvParams const& p, T* out)
{
    static_assert(kJbuMinRadius == 1 && kJbuMaxRadius == 4, "update the radius dispatch");
    switch (p.radius)
    {
    case 1: run<1>(hr, q, g, wt, p, out); break;
    case 2: run<2>(hr, q, g, wt, p, out); break;
    case 3: run<3>(hr, q, g, wt, p, out); break;
    default: run<4>(hr, q, g, wt, p, out); break;
    }
}

} // namespace

bool jbuConvCpu(IoType ioType, void const* hr, void const* q, void const* guidance, JbuConvWeights const& weights,
    JbuConvParams const& params, void* out, char* msg, size_t msgSize)
{
    if (!checkJbuConvParams(params, msg, msgSize))
    {
        return false;
    }
    if (ioType == IoType::kFLOAT32)
    {
        dispatch(static_cast<float const*>(hr), static_cast<float const*>(q), static_cast<float const*>(guidance),
            weights, params, static_cast<float*>(out));
    }
    else
    {
        dispatch(static_cast<uint16_t const*>(hr), static_cast<uint16_t const*>(q),
            static_cast<uint16_t const*>(guidance), weights, params, static_cast<uint16_t*>(out));
    }
    return true;
}

} // namespace hiwin
