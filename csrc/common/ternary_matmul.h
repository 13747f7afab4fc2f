// ternary_matmul: BitNet b1.58, y[M, N] = (x_q @ w_t^T) / (x_scale * weight_scale) (+ bias).
//
// Layout (the ternary checkpoint format of Hugging Face transformers, see DESIGN.md):
//   x            [M, K]            dtype x_dtype, row i starts at x + i * x_row_stride elements,
//                                  unit inner stride
//   qweight      [ceil(N/4), K]    uint8, contiguous; byte row r holds output rows r + i*ceil(N/4)
//                                  at bits 2i..2i+1 (i = 0..3) as w_t + 1 in {0, 1, 2}
//   weight_scale [1] or [N]        float32 (per tensor, or per output row)
//   bias         [N]               dtype bias_dtype, or null
//   out          [M, N]            dtype out_dtype, contiguous
//
// Activations are quantized per row exactly as lowbit.formats.ternary.quantize_activations
// does (float32: amax = max|x| with NaN propagating, x_scale = (1 / max(amax, 1e-5)) * 127,
// x_q = clamp(round_half_even(x * x_scale), -128, 127), codes 0 for a non-finite row), the
// product is an exact integer, and y = float(acc) / (x_scale * weight_scale) + bias, each
// step one float32 operation: the same bits as the reference.
//
// Buffer sizes cannot be checked here (only pointers arrive); the Python wrapper checks
// them. Everything else is checked by check_ternary_matmul_args before any kernel runs.
#pragma once

#include <cstdint>
#include <limits>

#include "check.h"
#include "dtype.h"

namespace lowbit {

// Largest K: |acc| <= 2 * 128 * K (plus the 128 * K of the offset) must fit int32.
inline constexpr int64_t kTernaryMaxK = int64_t{1} << 22;

struct TernaryMatmulArgs {
  const void* x = nullptr;
  int x_dtype = kFloat32;
  int64_t x_row_stride = 0;
  const uint8_t* qweight = nullptr;
  const float* weight_scale = nullptr;
  int64_t weight_scale_numel = 1;  // 1 (per tensor) or N (per row)
  const void* bias = nullptr;      // may be null
  int bias_dtype = kFloat32;
  void* out = nullptr;
  int out_dtype = kFloat32;
  int64_t M = 0, N = 0, K = 0;
};

// Rows of the packed weight: ceil(N / 4).
inline int64_t ternary_packed_rows(int64_t N) { return (N + 3) / 4; }

// Throws std::invalid_argument (ValueError) naming `fn`, the argument and its value.
inline void check_ternary_matmul_args(const char* fn, const TernaryMatmulArgs& a) {
  auto check_dtype = [&](const char* name, int code) {
    LOWBIT_CHECK(valid_dtype(code), fn, ": ", name, "=", code,
                 " is not a dtype code (0=float32, 1=float16, 2=bfloat16)");
  };
  auto check_ptr = [&](const char* name, const void* p, int size, const char* what, bool nullable) {
    if (p == nullptr) {
      LOWBIT_CHECK(nullable, fn, ": ", name, " is a null pointer");
      return;
    }
    LOWBIT_CHECK(reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(size) == 0, fn, ": ", name, "=0x",
                 std::hex, reinterpret_cast<uintptr_t>(p), std::dec, " is not aligned to its ", what,
                 " element size (", size, " bytes)");
  };
  check_dtype("x_dtype", a.x_dtype);
  check_dtype("bias_dtype", a.bias_dtype);
  check_dtype("out_dtype", a.out_dtype);
  LOWBIT_CHECK(a.M > 0, fn, ": M=", a.M, " must be positive");
  LOWBIT_CHECK(a.N > 0, fn, ": N=", a.N, " must be positive");
  LOWBIT_CHECK(a.K > 0, fn, ": K=", a.K, " must be positive");
  LOWBIT_CHECK(a.K <= kTernaryMaxK, fn, ": K=", a.K, " exceeds ", kTernaryMaxK,
               " (the int32 accumulator could overflow)");
  LOWBIT_CHECK(a.weight_scale_numel == 1 || a.weight_scale_numel == a.N, fn,
               ": weight_scale_numel=", a.weight_scale_numel, " must be 1 or N=", a.N);
  LOWBIT_CHECK(a.x_row_stride >= a.K, fn, ": x_row_stride=", a.x_row_stride, " must be >= K=", a.K);
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  LOWBIT_CHECK(a.M <= kMax / a.N && ternary_packed_rows(a.N) <= kMax / a.K && a.M <= kMax / a.x_row_stride,
               fn, ": sizes M=", a.M, ", N=", a.N, ", K=", a.K, ", x_row_stride=", a.x_row_stride,
               " overflow 64-bit indexing");
  check_ptr("x_ptr", a.x, dtype_size(a.x_dtype), dtype_name(a.x_dtype), false);
  LOWBIT_CHECK(a.qweight != nullptr, fn, ": qweight_ptr is a null pointer");  // bytes: any alignment
  check_ptr("weight_scale_ptr", a.weight_scale, 4, "float32", false);
  check_ptr("bias_ptr", a.bias, dtype_size(a.bias_dtype), dtype_name(a.bias_dtype), true);
  check_ptr("out_ptr", a.out, dtype_size(a.out_dtype), dtype_name(a.out_dtype), false);
}

}  // namespace lowbit
