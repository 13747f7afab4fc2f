// w4_matmul / w4_dequant: the CUDA 4-bit weight kernels (int4 and nf4) on the repacked layout.
//
// The layout (python/lowbit/backends/w4_layout.py documents it in full and makes it):
//   packed_w  int32 [N_pad/16, K_pad/64, 32, 4]: per 16-row tile and 64-wide k block, each lane's
//             four words are its mma.m16n8k16 A fragments for the block's four k steps
//   packed_s  activation dtype; int4 [N_pad/16, num_groups, 8, 2, 2] = (scale, -zero*scale),
//             nf4 [N_pad/16, num_groups, 8, 2] = absmax
//   N_pad = roundup(N, 16), K_pad = roundup(K, 64), K a multiple of 32; groups of group_size
//   along K (a power of two >= 32, num_groups = K_pad / group_size), or one group per row
//   (group_size = K, num_groups = 1).
//
// w4_matmul: out[M, N] = x[M, K] @ W^T (+ bias), x fp16/bf16 (rows 16-byte aligned: row i at
// x + i * x_row_stride elements), out contiguous in x's dtype, fp32 accumulation.
// w4_dequant: out[N, K] = W in the activation dtype (x, bias and M unused).
#pragma once

#include <cstdint>

#include "check.h"
#include "dtype.h"
#include "int4_matmul.h"  // detail::mul_fits_int64

namespace lowbit {

enum W4Format : int { kW4Int4 = 0, kW4NF4 = 1 };

struct W4Args {
  const void* x = nullptr;
  int act_dtype = kFloat16;  // x, out and packed_s dtype: float16 or bfloat16
  int64_t x_row_stride = 0;
  int fmt = kW4Int4;
  const void* packed_w = nullptr;
  const void* packed_s = nullptr;
  const void* bias = nullptr;  // may be null
  int bias_dtype = kFloat32;
  void* out = nullptr;
  int64_t M = 0, N = 0, K = 0, n_pad = 0, k_pad = 0, group_size = 0, num_groups = 0;
};

// Throws std::invalid_argument (ValueError) naming `fn`, the argument and its value.
inline void check_w4_args(const char* fn, const W4Args& a, bool dequant) {
  LOWBIT_CHECK(a.act_dtype == kFloat16 || a.act_dtype == kBFloat16, fn, ": act_dtype=", a.act_dtype,
               " must be 1 (float16) or 2 (bfloat16)");
  LOWBIT_CHECK(a.fmt == kW4Int4 || a.fmt == kW4NF4, fn, ": fmt=", a.fmt, " must be 0 (int4) or 1 (nf4)");
  constexpr int64_t kMax = (int64_t{1} << 31) - 1;
  LOWBIT_CHECK(a.N > 0 && a.N <= kMax, fn, ": N=", a.N, " must be in [1, 2^31)");
  LOWBIT_CHECK(a.K > 0 && a.K % 32 == 0 && a.K < (int64_t{1} << 30), fn, ": K=", a.K,
               " must be a positive multiple of 32 below 2^30");
  LOWBIT_CHECK(a.n_pad == (a.N + 15) / 16 * 16, fn, ": n_pad=", a.n_pad, " must be N=", a.N, " rounded up to 16");
  LOWBIT_CHECK(a.k_pad == (a.K + 63) / 64 * 64, fn, ": k_pad=", a.k_pad, " must be K=", a.K, " rounded up to 64");
  LOWBIT_CHECK(a.n_pad / 16 <= int64_t{65535} * 32, fn, ": N=", a.N, " is too large");
  LOWBIT_CHECK(detail::mul_fits_int64(a.n_pad, a.k_pad), fn, ": N*K overflows");
  const int64_t g = a.group_size;
  const bool pow2 = g >= 32 && (g & (g - 1)) == 0;
  if (pow2 && a.K % g == 0) {
    LOWBIT_CHECK(a.num_groups == a.k_pad / g, fn, ": num_groups=", a.num_groups, " must be k_pad/group_size=",
                 a.k_pad / g);
  } else {
    LOWBIT_CHECK(g == a.K && a.num_groups == 1, fn, ": group_size=", g,
                 " must be a power of two >= 32 dividing K, or K itself (with num_groups=1); got num_groups=",
                 a.num_groups);
  }
  auto aligned = [](const void* p, uintptr_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; };
  LOWBIT_CHECK(a.packed_w != nullptr && aligned(a.packed_w, 16), fn, ": packed_w_ptr must be a 16-byte aligned pointer");
  LOWBIT_CHECK(a.packed_s != nullptr && aligned(a.packed_s, a.fmt == kW4Int4 ? 8 : 4), fn,
               ": packed_s_ptr must be a non-null pointer aligned to ", a.fmt == kW4Int4 ? 8 : 4, " bytes");
  LOWBIT_CHECK(a.out != nullptr && aligned(a.out, dequant ? 16 : 2), fn, ": out_ptr must be a non-null pointer aligned to ",
               dequant ? 16 : 2, " bytes");
  if (dequant) return;
  LOWBIT_CHECK(a.M > 0 && a.M <= kMax, fn, ": M=", a.M, " must be in [1, 2^31)");
  LOWBIT_CHECK(detail::mul_fits_int64(a.M, a.N), fn, ": M*N overflows");
  LOWBIT_CHECK(a.x != nullptr && aligned(a.x, 16), fn, ": x_ptr must be a 16-byte aligned pointer");
  LOWBIT_CHECK(a.x_row_stride >= a.K && a.x_row_stride % 8 == 0, fn, ": x_row_stride=", a.x_row_stride,
               " must be >= K and a multiple of 8 (16-byte aligned rows)");
  LOWBIT_CHECK(detail::mul_fits_int64(a.M, a.x_row_stride), fn, ": M*x_row_stride overflows");
  LOWBIT_CHECK(valid_dtype(a.bias_dtype), fn, ": bias_dtype=", a.bias_dtype, " is not a dtype code");
  LOWBIT_CHECK(aligned(a.bias, dtype_size(a.bias_dtype)), fn, ": bias_ptr is not aligned to its element size");
}

}  // namespace lowbit
