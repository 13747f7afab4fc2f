// Dtype codes shared by the Python wrappers and every kernel, and exact scalar
// conversions between float32 and float16 / bfloat16 that work on host and device.
//
// Codes (python/lowbit/backends/native_args.py holds the same table):
//   0 = float32, 1 = float16, 2 = bfloat16
//
// The conversions are plain bit manipulation (no <cuda_fp16.h>, no F16C), so host and
// device produce identical bits: widening is exact, narrowing rounds to nearest, ties to
// even, overflows to +-inf, keeps NaN a (quiet) NaN, and produces subnormals.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LOWBIT_HD __host__ __device__ __forceinline__
#else
#define LOWBIT_HD inline
#endif

namespace lowbit {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline constexpr int kNumDTypes = 3;

inline bool valid_dtype(int code) { return code >= 0 && code < kNumDTypes; }

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "invalid";
  }
}

// Size in bytes of one element of a dtype code (0 for an invalid code).
inline int dtype_size(int code) {
  switch (code) {
    case kFloat32: return 4;
    case kFloat16: return 2;
    case kBFloat16: return 2;
    default: return 0;
  }
}

LOWBIT_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

LOWBIT_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// IEEE binary16 bits -> float (exact).
LOWBIT_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    // zero or subnormal: mant * 2^-24, exact in float (the product is a normal float)
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return bits_float(sign | float_bits(mag));
  }
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// float -> IEEE binary16 bits, round to nearest even.
LOWBIT_HD uint16_t float_to_half(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) {  // nan: keep the top payload bits, force quiet
    return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
  }
  if (ax >= 0x47800000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 2^16 (or inf) -> inf
  if (ax >= 0x38800000u) {
    // normal half range [2^-14, 2^16): rebias the exponent, round the low 13 bits.
    // A carry out of the mantissa bumps the exponent (up to inf), which is right.
    uint32_t h = (ax - 0x38000000u) >> 13;
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  if (ax < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25 -> +-0 (2^-25 ties to 0 below)
  // subnormal half: value / 2^-24 = m * 2^(e-126) with m the 24-bit significand.
  const uint32_t e = ax >> 23;          // 102 .. 112
  const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;      // 14 .. 24
  uint32_t h = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  if (rem > halfway || (rem == halfway && (h & 1u))) ++h;  // may reach 0x400 = smallest normal
  return static_cast<uint16_t>(sign | h);
}

// bfloat16 bits -> float (exact).
LOWBIT_HD float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// float -> bfloat16 bits, round to nearest even; NaN stays a quiet NaN.
LOWBIT_HD uint16_t float_to_bf16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);
  const uint32_t rounded = x + 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(rounded >> 16);
}

// Element i of an array of dtype `code`, as float.
LOWBIT_HD float load_as_float(const void* p, int64_t i, int code) {
  switch (code) {
    case kFloat16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Store v into element i of an array of dtype `code`.
LOWBIT_HD void store_from_float(void* p, int64_t i, int code, float v) {
  switch (code) {
    case kFloat16: static_cast<uint16_t*>(p)[i] = float_to_half(v); break;
    case kBFloat16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

}  // namespace lowbit
