// Hiwin plugins: portable IEEE-754 binary16 <-> binary32 conversion on the host.
//
// Device code uses cuda_fp16.h instead; these functions are for the CPU launchers, which store fp16
// tensors as raw 16-bit words. float -> half rounds to nearest, ties to even (like numpy's astype and
// CUDA's __float2half_rn), overflows to +-inf, keeps NaN a (quiet) NaN and produces subnormals.
#pragma once

#include <cstdint>
#include <cstring>

namespace hiwin
{

inline float halfBitsToFloat(uint16_t h) noexcept
{
    uint32_t const sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t const exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0)
    {
        if (mantissa == 0)
        {
            bits = sign; // +-0
        }
        else
        {
            // Subnormal half: normalise into a float (every half subnormal is a normal float).
            int32_t e = -14;
            while ((mantissa & 0x400u) == 0)
            {
                mantissa <<= 1;
                --e;
            }
            mantissa &= 0x3ffu;
            bits = sign | (static_cast<uint32_t>(e + 127) << 23) | (mantissa << 13);
        }
    }
    else if (exponent == 0x1f)
    {
        bits = sign | 0x7f800000u | (mantissa << 13); // inf or NaN (payload kept)
    }
    else
    {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13); // 112 = 127 - 15
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline uint16_t floatToHalfBits(float f) noexcept
{
    uint32_t x;
    std::memcpy(&x, &f, sizeof x);
    uint16_t const sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    uint32_t const ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) // NaN: quiet, top payload bits kept
    {
        return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    }
    if (ax >= 0x477ff000u) // >= 65520 rounds to infinity (65504 is the largest half)
    {
        return static_cast<uint16_t>(sign | 0x7c00u);
    }
    if (ax < 0x38800000u) // below 2^-14: half subnormal or zero
    {
        if (ax <= 0x33000000u) // <= 2^-25: rounds to zero (the tie goes to the even 0)
        {
            return sign;
        }
        uint32_t const e = ax >> 23;                      // 102 .. 112
        uint32_t const m = (ax & 0x7fffffu) | 0x800000u;  // 24-bit significand
        uint32_t const shift = 126u - e;                  // value / 2^-24 = m >> shift
        uint32_t n = m >> shift;
        uint32_t const rem = m & ((1u << shift) - 1u);
        uint32_t const halfway = 1u << (shift - 1u);
        if (rem > halfway || (rem == halfway && (n & 1u)))
        {
            ++n; // may carry into the smallest normal, which is the right encoding
        }
        return static_cast<uint16_t>(sign | n);
    }
    uint32_t base = (ax - 0x38000000u) >> 13; // rebias exponent (127 -> 15), drop 13 mantissa bits
    uint32_t const rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (base & 1u)))
    {
        ++base; // mantissa overflow carries into the exponent
    }
    return static_cast<uint16_t>(sign | base);
}

} // namespace hiwin
