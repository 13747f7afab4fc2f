// sparse24_matmul: y[M, N] = x[M, K] @ W^T (+ bias) for a 2:4 semi-structured sparse W,
// fp32 accumulation.
//
// Layout (the sparse24 checkpoint format, see DESIGN.md and python/lowbit/formats/sparse24.py):
//   x       [M, K]   dtype x_dtype, row i starts at x + i * x_row_stride elements, unit inner stride
//   values  [N, K/2] dtype values_dtype, contiguous: the two stored values of each group of 4
//                    columns, in ascending column order
//   meta    [N, K/8] uint8, contiguous: group 2j's nibble in the low 4 bits of meta[n, j], group
//                    2j+1's in the high 4 bits; nibble = i0 | (i1 << 2), i0 < i1 the in-group columns
//   bias    [N]      dtype bias_dtype, or null
//   out     [M, N]   dtype out_dtype, contiguous
//   W[n, 4g + i0] = values[n, 2g], W[n, 4g + i1] = values[n, 2g + 1], the other two columns 0.
//
// Every kernel computes, for any nibble (legal or not, so that bad metadata can never index
// outside its group): y[m, n] = sum_g values[n, 2g] * x[m, 4g + (nib & 3)]
//                                     + values[n, 2g + 1] * x[m, 4g + (nib >> 2)].
// K must be a positive multiple of 8 (a meta byte covers 8 columns).
//
// Buffer sizes cannot be checked here (only pointers arrive); the Python wrapper checks
// them. Everything else is checked by check_sparse24_matmul_args before any kernel runs.
#pragma once

#include <cstdint>

#include "check.h"
#include "dtype.h"
#include "int4_matmul.h"  // detail::check_ptr, check_dtype, mul_fits_int64

namespace lowbit {

struct Sparse24MatmulArgs {
  const void* x = nullptr;
  int x_dtype = kFloat32;
  int64_t x_row_stride = 0;
  const void* values = nullptr;
  int values_dtype = kFloat32;
  const uint8_t* meta = nullptr;
  const void* bias = nullptr;  // may be null
  int bias_dtype = kFloat32;
  void* out = nullptr;
  int out_dtype = kFloat32;
  int64_t M = 0, N = 0, K = 0;
};

// Throws std::invalid_argument (ValueError) naming `fn`, the argument and its value.
inline void check_sparse24_matmul_args(const char* fn, const Sparse24MatmulArgs& a) {
  using detail::check_dtype;
  using detail::check_ptr;
  check_dtype(fn, "x_dtype", a.x_dtype);
  check_dtype(fn, "values_dtype", a.values_dtype);
  check_dtype(fn, "bias_dtype", a.bias_dtype);
  check_dtype(fn, "out_dtype", a.out_dtype);
  LOWBIT_CHECK(a.M > 0, fn, ": M=", a.M, " must be positive");
  LOWBIT_CHECK(a.N > 0, fn, ": N=", a.N, " must be positive");
  LOWBIT_CHECK(a.K > 0, fn, ": K=", a.K, " must be positive");
  LOWBIT_CHECK(a.K % 8 == 0, fn, ": K=", a.K, " must be a multiple of 8 (one meta byte covers 8 columns)");
  LOWBIT_CHECK(a.x_row_stride >= a.K, fn, ": x_row_stride=", a.x_row_stride, " must be >= K=", a.K);
  LOWBIT_CHECK(detail::mul_fits_int64(a.M, a.N) && detail::mul_fits_int64(a.N, a.K) &&
                   detail::mul_fits_int64(a.M, a.x_row_stride),
               fn, ": sizes M=", a.M, ", N=", a.N, ", K=", a.K, ", x_row_stride=", a.x_row_stride,
               " overflow 64-bit indexing");
  check_ptr(fn, "x_ptr", a.x, a.x_dtype, false);
  check_ptr(fn, "values_ptr", a.values, a.values_dtype, false);
  LOWBIT_CHECK(a.meta != nullptr, fn, ": meta_ptr is a null pointer");  // bytes: any alignment
  check_ptr(fn, "bias_ptr", a.bias, a.bias_dtype, true);
  check_ptr(fn, "out_ptr", a.out, a.out_dtype, false);
}

}  // namespace lowbit
