// nf4_matmul: y[M, N] = x[M, K] @ dequant(W)^T (+ bias), fp32 accumulation.
//
// Layout (the nf4 checkpoint format = bitsandbytes' quantize_4bit, see DESIGN.md):
//   x         [M, K]  dtype x_dtype, row i starts at x + i * x_row_stride elements, unit inner stride
//   qweight   [ceil(N*K/2)] uint8: W flattened row-major (element e = n*K + k), element e in the
//             HIGH nibble of byte e/2 when e is even, in the low nibble when e is odd
//   absmax    [nblocks] per block of `blocksize` consecutive flattened elements
//             (nblocks = ceil(N*K / blocksize); blocks may straddle rows), either
//               float32 (absmax_scale == null), or
//               uint8 codes, double-quantized: absmax[b] = absmax_code[q[b]] * absmax_scale[b / 256]
//               + absmax_offset (float32 multiply, then float32 add, as bitsandbytes does)
//   absmax_scale [ceil(nblocks / 256)] float32, or null;  absmax_code [256] float32 (with absmax_scale)
//   bias      [N] dtype bias_dtype, or null;  out [M, N] dtype out_dtype, contiguous
//   w[n, k] = NF4_CODE[code(e)] * absmax[e / blocksize]   (float32)
//
// Buffer sizes cannot be checked here (only pointers arrive); the Python wrapper checks
// them. Everything else is checked by check_nf4_matmul_args before any kernel runs.
#pragma once

#include <cmath>
#include <cstdint>

#include "check.h"
#include "dtype.h"
#include "int4_matmul.h"  // detail::check_ptr, check_dtype, mul_fits_int64

namespace lowbit {

// The 16 NormalFloat values (bitsandbytes' table; exact float32 values).
inline constexpr float kNf4Code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

inline constexpr int64_t kNf4NestedBlocksize = 256;

struct Nf4MatmulArgs {
  const void* x = nullptr;
  int x_dtype = kFloat32;
  int64_t x_row_stride = 0;
  const uint8_t* qweight = nullptr;
  const void* absmax = nullptr;        // float32, or uint8 when absmax_scale is set
  const float* absmax_scale = nullptr;  // may be null (no double quantization)
  const float* absmax_code = nullptr;   // null iff absmax_scale is null
  float absmax_offset = 0.0f;
  const void* bias = nullptr;  // may be null
  int bias_dtype = kFloat32;
  void* out = nullptr;
  int out_dtype = kFloat32;
  int64_t M = 0, N = 0, K = 0, blocksize = 0;

  bool double_quant() const { return absmax_scale != nullptr; }
};

// Throws std::invalid_argument (ValueError) naming `fn`, the argument and its value.
inline void check_nf4_matmul_args(const char* fn, const Nf4MatmulArgs& a) {
  using detail::check_dtype;
  using detail::check_ptr;
  check_dtype(fn, "x_dtype", a.x_dtype);
  check_dtype(fn, "bias_dtype", a.bias_dtype);
  check_dtype(fn, "out_dtype", a.out_dtype);
  LOWBIT_CHECK(a.M > 0, fn, ": M=", a.M, " must be positive");
  LOWBIT_CHECK(a.N > 0, fn, ": N=", a.N, " must be positive");
  LOWBIT_CHECK(a.K > 0, fn, ": K=", a.K, " must be positive");
  LOWBIT_CHECK(a.blocksize >= 32 && a.blocksize <= 4096 && (a.blocksize & (a.blocksize - 1)) == 0, fn,
               ": blocksize=", a.blocksize, " must be a power of two in 32..4096");
  LOWBIT_CHECK(a.x_row_stride >= a.K, fn, ": x_row_stride=", a.x_row_stride, " must be >= K=", a.K);
  LOWBIT_CHECK(detail::mul_fits_int64(a.M, a.N) && detail::mul_fits_int64(a.N, a.K) &&
                   detail::mul_fits_int64(a.M, a.x_row_stride),
               fn, ": sizes M=", a.M, ", N=", a.N, ", K=", a.K, ", x_row_stride=", a.x_row_stride,
               " overflow 64-bit indexing");
  LOWBIT_CHECK(std::isfinite(a.absmax_offset), fn, ": absmax_offset=", a.absmax_offset, " must be finite");
  LOWBIT_CHECK((a.absmax_scale == nullptr) == (a.absmax_code == nullptr), fn,
               ": absmax_scale_ptr and absmax_code_ptr must both be given (double quantization) or both be 0");
  LOWBIT_CHECK(a.double_quant() || a.absmax_offset == 0.0f, fn, ": absmax_offset=", a.absmax_offset,
               " must be 0 without double quantization");
  check_ptr(fn, "x_ptr", a.x, a.x_dtype, false);
  LOWBIT_CHECK(a.qweight != nullptr, fn, ": qweight_ptr is a null pointer");  // bytes: any alignment
  if (a.double_quant()) {
    LOWBIT_CHECK(a.absmax != nullptr, fn, ": absmax_ptr is a null pointer");  // uint8 codes
    check_ptr(fn, "absmax_scale_ptr", a.absmax_scale, kFloat32, false);
    check_ptr(fn, "absmax_code_ptr", a.absmax_code, kFloat32, false);
  } else {
    check_ptr(fn, "absmax_ptr", a.absmax, kFloat32, false);
  }
  check_ptr(fn, "bias_ptr", a.bias, a.bias_dtype, true);
  check_ptr(fn, "out_ptr", a.out, a.out_dtype, false);
}

}  // namespace lowbit
