// int4_matmul: y[M, N] = x[M, K] @ dequant(W)^T (+ bias), fp32 accumulation.
//
// Layout (the int4 checkpoint format, see DESIGN.md):
//   x        [M, K]   dtype x_dtype, row i starts at x + i * x_row_stride elements, unit inner stride
//   qweight  [N, K/2] uint8, contiguous; element 2j in the low nibble, 2j+1 in the high nibble
//   scales   [N, K/G] dtype scales_dtype, contiguous
//   zeros    [N, K/G] dtype zeros_dtype, contiguous, or null (symmetric: zero = 8)
//   bias     [N]      dtype bias_dtype, or null
//   out      [M, N]   dtype out_dtype, contiguous
//   w[n, k] = scale[n, k/G] * (q[n, k] - zero[n, k/G])
//
// Buffer sizes cannot be checked here (only pointers arrive); the Python wrapper checks
// them. Everything else is checked by check_int4_matmul_args before any kernel runs.
#pragma once

#include <cstdint>
#include <limits>

#include "check.h"
#include "dtype.h"

namespace lowbit {

struct Int4MatmulArgs {
  const void* x = nullptr;
  int x_dtype = kFloat32;
  int64_t x_row_stride = 0;
  const uint8_t* qweight = nullptr;
  const void* scales = nullptr;
  int scales_dtype = kFloat32;
  const void* zeros = nullptr;  // may be null
  int zeros_dtype = kFloat32;
  const void* bias = nullptr;  // may be null
  int bias_dtype = kFloat32;
  void* out = nullptr;
  int out_dtype = kFloat32;
  int64_t M = 0, N = 0, K = 0, group_size = 0;
};

namespace detail {

inline bool mul_fits_int64(int64_t a, int64_t b) {  // a, b > 0
  return a <= std::numeric_limits<int64_t>::max() / b;
}

inline void check_ptr(const char* fn, const char* name, const void* p, int dtype, bool nullable) {
  if (p == nullptr) {
    LOWBIT_CHECK(nullable, fn, ": ", name, " is a null pointer");
    return;
  }
  const int size = dtype_size(dtype);
  LOWBIT_CHECK(reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(size) == 0, fn, ": ", name,
               "=0x", std::hex, reinterpret_cast<uintptr_t>(p), std::dec, " is not aligned to its ",
               dtype_name(dtype), " element size (", size, " bytes)");
}

inline void check_dtype(const char* fn, const char* name, int code) {
  LOWBIT_CHECK(valid_dtype(code), fn, ": ", name, "=", code,
               " is not a dtype code (0=float32, 1=float16, 2=bfloat16)");
}

}  // namespace detail

// Throws std::invalid_argument (ValueError) naming `fn`, the argument and its value.
inline void check_int4_matmul_args(const char* fn, const Int4MatmulArgs& a) {
  using detail::check_dtype;
  using detail::check_ptr;
  check_dtype(fn, "x_dtype", a.x_dtype);
  check_dtype(fn, "scales_dtype", a.scales_dtype);
  check_dtype(fn, "zeros_dtype", a.zeros_dtype);
  check_dtype(fn, "bias_dtype", a.bias_dtype);
  check_dtype(fn, "out_dtype", a.out_dtype);
  LOWBIT_CHECK(a.M > 0, fn, ": M=", a.M, " must be positive");
  LOWBIT_CHECK(a.N > 0, fn, ": N=", a.N, " must be positive");
  LOWBIT_CHECK(a.K > 0, fn, ": K=", a.K, " must be positive");
  LOWBIT_CHECK(a.group_size > 0, fn, ": group_size=", a.group_size, " must be positive");
  LOWBIT_CHECK(a.group_size % 2 == 0, fn, ": group_size=", a.group_size, " must be even");
  LOWBIT_CHECK(a.K % a.group_size == 0, fn, ": group_size=", a.group_size, " does not divide K=", a.K);
  LOWBIT_CHECK(a.x_row_stride >= a.K, fn, ": x_row_stride=", a.x_row_stride, " must be >= K=", a.K);
  LOWBIT_CHECK(detail::mul_fits_int64(a.M, a.N) && detail::mul_fits_int64(a.N, a.K) &&
                   detail::mul_fits_int64(a.M, a.x_row_stride),
               fn, ": sizes M=", a.M, ", N=", a.N, ", K=", a.K, ", x_row_stride=", a.x_row_stride,
               " overflow 64-bit indexing");
  check_ptr(fn, "x_ptr", a.x, a.x_dtype, false);
  LOWBIT_CHECK(a.qweight != nullptr, fn, ": qweight_ptr is a null pointer");  // bytes: any alignment
  check_ptr(fn, "scales_ptr", a.scales, a.scales_dtype, false);
  check_ptr(fn, "zeros_ptr", a.zeros, a.zeros_dtype, true);
  check_ptr(fn, "bias_ptr", a.bias, a.bias_dtype, true);
  check_ptr(fn, "out_ptr", a.out, a.out_dtype, false);
}

}  // namespace lowbit
