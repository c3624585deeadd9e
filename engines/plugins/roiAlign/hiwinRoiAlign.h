// HiwinRoiAlign: the per-element maths, shared by the CPU launcher (roiAlignCpu.cpp) and the CUDA
// launcher (roiAlignKernel.cu). Semantics are torchvision.ops.roi_align's (= ONNX RoiAlign, mode "avg"),
// see README.md. Everything here is plain C++ usable on host and device; all arithmetic is fp32.
#pragma once

#include "../common/hiwinCommon.h"
#include "../common/hiwinMacros.h"

#include <cmath>
#include <cstdint>

namespace hiwin
{

//! Shapes and attributes of one RoI-align launch.
struct RoiAlignParams
{
    int64_t batch{0};    //!< N of X
    int64_t channels{0}; //!< C of X
    int64_t height{0};   //!< H of X
    int64_t width{0};    //!< W of X
    int64_t numRois{0};  //!< R (rows of rois, length of batch_indices)
    int32_t outputHeight{1};
    int32_t outputWidth{1};
    int32_t samplingRatio{0}; //!< <= 0: adaptive, ceil(roi extent / output extent) per RoI and axis
    float spatialScale{1.F};
    bool aligned{true}; //!< true: "half_pixel" (0.5 offset); false: "output_half_pixel" (extent >= 1)
};

//! Sampling geometry of one RoI (independent of channel and bin).
struct RoiGeometry
{
    float startY;
    float startX;
    float binH;
    float binW;
    int32_t gridH; //!< samples per bin along y (>= 0)
    int32_t gridW; //!< samples per bin along x (>= 0)
    float count;   //!< divisor: max(gridH * gridW, 1)
};

HIWIN_HD HIWIN_INLINE RoiGeometry roiAlignGeometry(float x1, float y1, float x2, float y2, float spatialScale,
    bool aligned, int32_t outputHeight, int32_t outputWidth, int32_t samplingRatio)
{
    float const offset = aligned ? 0.5F : 0.F;
    RoiGeometry g;
    g.startX = x1 * spatialScale - offset;
    g.startY = y1 * spatialScale - offset;
    float roiW = x2 * spatialScale - offset - g.startX;
    float roiH = y2 * spatialScale - offset - g.startY;
    if (!aligned)
    {
        roiW = roiW > 1.F ? roiW : 1.F;
        roiH = roiH > 1.F ? roiH : 1.F;
    }
    g.binH = roiH / static_cast<float>(outputHeight);
    g.binW = roiW / static_cast<float>(outputWidth);
    if (samplingRatio > 0)
    {
        g.gridH = samplingRatio;
        g.gridW = samplingRatio;
    }
    else
    {
        float const gh = ceilf(roiH / static_cast<float>(outputHeight));
        float const gw = ceilf(roiW / static_cast<float>(outputWidth));
        // Negative or NaN extents (aligned boxes with x2 < x1) sample nothing.
        g.gridH = gh > 0.F ? static_cast<int32_t>(gh) : 0;
        g.gridW = gw > 0.F ? static_cast<int32_t>(gw) : 0;
    }
    int32_t const n = g.gridH * g.gridW;
    g.count = static_cast<float>(n > 1 ? n : 1);
    return g;
}

//! torchvision's bilinear_interpolate: 0 outside [-1, H] x [-1, W], else clamped bilinear.
//! load(y, x) returns the map value at integer (y, x) as float.
template <class Load>
HIWIN_HD HIWIN_INLINE float roiAlignBilinear(Load const& load, float y, float x, int32_t height, int32_t width)
{
    if (!(y >= -1.F && y <= static_cast<float>(height) && x >= -1.F && x <= static_cast<float>(width)))
    {
        return 0.F; // also catches NaN coordinates
    }
    y = y > 0.F ? y : 0.F;
    x = x > 0.F ? x : 0.F;
    int32_t yLow = static_cast<int32_t>(y);
    int32_t xLow = static_cast<int32_t>(x);
    int32_t yHigh;
    int32_t xHigh;
    if (yLow >= height - 1)
    {
        yLow = yHigh = height - 1;
        y = static_cast<float>(yLow);
    }
    else
    {
        yHigh = yLow + 1;
    }
    if (xLow >= width - 1)
    {
        xLow = xHigh = width - 1;
        x = static_cast<float>(xLow);
    }
    else
    {
        xHigh = xLow + 1;
    }
    float const ly = y - static_cast<float>(yLow);
    float const lx = x - static_cast<float>(xLow);
    float const hy = 1.F - ly;
    float const hx = 1.F - lx;
    return hy * hx * load(yLow, xLow) + hy * lx * load(yLow, xHigh) + ly * hx * load(yHigh, xLow)
        + ly * lx * load(yHigh, xHigh);
}

//! One output element: the average of the gridH x gridW samples of bin (ph, pw).
template <class Load>
HIWIN_HD HIWIN_INLINE float roiAlignBin(
    Load const& load, RoiGeometry const& g, int32_t ph, int32_t pw, int32_t height, int32_t width)
{
    float sum = 0.F;
    float const gh = static_cast<float>(g.gridH);
    float const gw = static_cast<float>(g.gridW);
    for (int32_t iy = 0; iy < g.gridH; ++iy)
    {
        float const y = g.startY + static_cast<float>(ph) * g.binH + (static_cast<float>(iy) + 0.5F) * g.binH / gh;
        for (int32_t ix = 0; ix < g.gridW; ++ix)
        {
            float const x
                = g.startX + static_cast<float>(pw) * g.binW + (static_cast<float>(ix) + 0.5F) * g.binW / gw;
            sum += roiAlignBilinear(load, y, x, height, width);
        }
    }
    return sum / g.count;
}

//! Host-side argument checks shared by every entry point (message written on failure).
inline bool checkRoiAlignParams(RoiAlignParams const& p, int32_t batchIndexBytes, char* msg, size_t size)
{
    HIWIN_CHECK_ARG(p.batch >= 0 && p.channels >= 0 && p.numRois >= 0, msg, size,
        "HiwinRoiAlign: negative size (N=%lld, C=%lld, R=%lld)", static_cast<long long>(p.batch),
        static_cast<long long>(p.channels), static_cast<long long>(p.numRois));
    HIWIN_CHECK_ARG(p.height >= 1 && p.width >= 1 && p.height <= INT32_MAX && p.width <= INT32_MAX, msg, size,
        "HiwinRoiAlign: X height and width must be >= 1 (got H=%lld, W=%lld)", static_cast<long long>(p.height),
        static_cast<long long>(p.width));
    HIWIN_CHECK_ARG(p.numRois == 0 || p.batch >= 1, msg, size, "HiwinRoiAlign: %lld RoIs but X has batch 0",
        static_cast<long long>(p.numRois));
    HIWIN_CHECK_ARG(p.outputHeight >= 1 && p.outputWidth >= 1, msg, size,
        "HiwinRoiAlign: output_height and output_width must be >= 1 (got %d, %d)", p.outputHeight, p.outputWidth);
    HIWIN_CHECK_ARG(std::isfinite(p.spatialScale), msg, size, "HiwinRoiAlign: spatial_scale must be finite");
    HIWIN_CHECK_ARG(batchIndexBytes == 4 || batchIndexBytes == 8, msg, size,
        "HiwinRoiAlign: batch_indices must be int32 or int64 (got an element size of %d bytes)", batchIndexBytes);
    return true;
}

} // namespace hiwin
