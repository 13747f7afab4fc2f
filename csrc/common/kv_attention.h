// kv_attention: out = softmax(q K^T * scale [+ causal mask]) V over a quantized KV cache,
// fp32 accumulation.
//
// Layout (the KV-cache format of python/lowbit/formats/kv.py, see DESIGN.md). Every tensor is
// a strided view [B, H, S, width] with a unit inner stride; stride_b/h/s are in elements and
// may be anything >= 0 (lowbit.QuantizedKVCache passes prefix views of [B, H, capacity, ...]
// storage, whose head and batch strides span the capacity):
//   q        [B, H_q, S_q, D]     dtype q.dtype
//   k, v     bits 8: int8 [B, H_kv, S_kv, D]; bits 4: uint8 [B, H_kv, S_kv, D/2] (element 2j
//            in the low nibble, 2j+1 in the high nibble)
//   k_scale, v_scale  bits 8: [B, H_kv, S_kv] (width 1); bits 4: [B, H_kv, S_kv, D/32]
//   k_zero, v_zero    bits 4 only: like the scales; null for bits 8
//   out      [B, H_q, S_q, D]     dtype out_dtype, contiguous
//   bits 8: x = scale * data;  bits 4: x = scale * (code - zero), groups of 32 along D
// Query head h reads kv head h / (H_q / H_kv) (GQA). causal masks bottom-right aligned: query
// i sees keys j <= i + S_kv - S_q (so S_q <= S_kv is required).
//
// Buffer sizes cannot be checked here (only pointers arrive); the Python wrapper checks them.
// Everything else is checked by check_kv_attention_args before any kernel runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>

#include "check.h"
#include "dtype.h"

namespace lowbit {

// One [B, H, S, width] operand: base pointer, float dtype code (ignored for k/v data) and
// element strides of the three outer dimensions (the inner stride is 1).
struct KvView {
  const void* ptr = nullptr;
  int dtype = kFloat32;
  int64_t stride_b = 0, stride_h = 0, stride_s = 0;
};

struct KvAttentionArgs {
  KvView q;
  KvView k, k_scale, k_zero;  // k_zero.ptr null for bits 8
  KvView v, v_scale, v_zero;
  void* out = nullptr;
  int out_dtype = kFloat32;
  int64_t B = 0, H_q = 0, H_kv = 0, S_q = 0, S_kv = 0, D = 0;
  int bits = 8;
  bool causal = false;
  float scale = 0.0f;  // softmax scale (the caller resolves the default D^-0.5)

  int64_t groups() const { return bits == 4 ? D / 32 : 1; }  // scale/zero entries per token row
  int64_t data_width() const { return bits == 4 ? D / 2 : D; }  // bytes per token row of k/v
};

namespace detail {

// (n0-1)*s0 + (n1-1)*s1 + (n2-1)*s2 + width fits in int64 (all >= 0, n >= 1, width >= 1).
inline bool kv_extent_fits(int64_t n0, int64_t s0, int64_t n1, int64_t s1, int64_t n2, int64_t s2,
                           int64_t width) {
  const int64_t kMax = std::numeric_limits<int64_t>::max();
  int64_t total = width;
  const int64_t n[3] = {n0, n1, n2};
  const int64_t s[3] = {s0, s1, s2};
  for (int i = 0; i < 3; ++i) {
    const int64_t m = n[i] - 1;
    if (m == 0 || s[i] == 0) continue;
    if (m > kMax / s[i]) return false;
    const int64_t term = m * s[i];
    if (term > kMax - total) return false;
    total += term;
  }
  return true;
}

inline void check_kv_view(const char* fn, const char* name, const KvView& t, bool float_dtype, int64_t n_b,
                          int64_t n_h, int64_t n_s, int64_t width) {
  LOWBIT_CHECK(t.ptr != nullptr, fn, ": ", name, "_ptr is a null pointer");
  if (float_dtype) {
    LOWBIT_CHECK(valid_dtype(t.dtype), fn, ": ", name, "_dtype=", t.dtype,
                 " is not a dtype code (0=float32, 1=float16, 2=bfloat16)");
    const int size = dtype_size(t.dtype);
    LOWBIT_CHECK(reinterpret_cast<uintptr_t>(t.ptr) % static_cast<uintptr_t>(size) == 0, fn, ": ", name,
                 "_ptr=0x", std::hex, reinterpret_cast<uintptr_t>(t.ptr), std::dec, " is not aligned to its ",
                 dtype_name(t.dtype), " element size (", size, " bytes)");
  }
  LOWBIT_CHECK(t.stride_b >= 0 && t.stride_h >= 0 && t.stride_s >= 0, fn, ": ", name, "_strides=(", t.stride_b,
               ", ", t.stride_h, ", ", t.stride_s, ") must be >= 0");
  LOWBIT_CHECK(kv_extent_fits(n_b, t.stride_b, n_h, t.stride_h, n_s, t.stride_s, width), fn, ": ", name,
               "_strides=(", t.stride_b, ", ", t.stride_h, ", ", t.stride_s, ") overflow 64-bit indexing");
}

}  // namespace detail

// Throws std::invalid_argument (ValueError) naming `fn`, the argument and its value.
inline void check_kv_attention_args(const char* fn, const KvAttentionArgs& a) {
  using detail::check_kv_view;
  LOWBIT_CHECK(a.bits == 8 || a.bits == 4, fn, ": bits=", a.bits, " must be 8 or 4");
  LOWBIT_CHECK(a.B > 0, fn, ": B=", a.B, " must be positive");
  LOWBIT_CHECK(a.H_q > 0, fn, ": H_q=", a.H_q, " must be positive");
  LOWBIT_CHECK(a.H_kv > 0, fn, ": H_kv=", a.H_kv, " must be positive");
  LOWBIT_CHECK(a.S_q > 0, fn, ": S_q=", a.S_q, " must be positive");
  LOWBIT_CHECK(a.S_kv > 0, fn, ": S_kv=", a.S_kv, " must be positive");
  LOWBIT_CHECK(a.D > 0, fn, ": D=", a.D, " must be positive");
  LOWBIT_CHECK(a.H_q % a.H_kv == 0, fn, ": H_q=", a.H_q, " must be a multiple of H_kv=", a.H_kv);
  LOWBIT_CHECK(a.bits == 8 || a.D % 32 == 0, fn, ": D=", a.D, " must be divisible by 32 for a 4-bit cache");
  LOWBIT_CHECK(!a.causal || a.S_q <= a.S_kv, fn, ": causal attention needs S_q <= S_kv, got S_q=", a.S_q,
               ", S_kv=", a.S_kv);
  LOWBIT_CHECK(std::isfinite(a.scale), fn, ": scale=", a.scale, " must be finite");
  LOWBIT_CHECK(valid_dtype(a.out_dtype), fn, ": out_dtype=", a.out_dtype,
               " is not a dtype code (0=float32, 1=float16, 2=bfloat16)");
  LOWBIT_CHECK(a.out != nullptr, fn, ": out_ptr is a null pointer");
  LOWBIT_CHECK(reinterpret_cast<uintptr_t>(a.out) % static_cast<uintptr_t>(dtype_size(a.out_dtype)) == 0, fn,
               ": out_ptr=0x", std::hex, reinterpret_cast<uintptr_t>(a.out), std::dec, " is not aligned to its ",
               dtype_name(a.out_dtype), " element size (", dtype_size(a.out_dtype), " bytes)");
  {
    const int64_t kMax = std::numeric_limits<int64_t>::max();
    bool fits = true;
    int64_t n = a.B;
    for (int64_t f : {a.H_q, a.S_q, a.D}) {
      fits = fits && n <= kMax / f;
      if (fits) n *= f;
    }
    LOWBIT_CHECK(fits, fn, ": output sizes B=", a.B, ", H_q=", a.H_q, ", S_q=", a.S_q, ", D=", a.D,
                 " overflow 64-bit indexing");
  }
  check_kv_view(fn, "q", a.q, true, a.B, a.H_q, a.S_q, a.D);
  const int64_t w = a.data_width(), g = a.groups();
  check_kv_view(fn, "k", a.k, false, a.B, a.H_kv, a.S_kv, w);
  check_kv_view(fn, "v", a.v, false, a.B, a.H_kv, a.S_kv, w);
  check_kv_view(fn, "k_scale", a.k_scale, true, a.B, a.H_kv, a.S_kv, g);
  check_kv_view(fn, "v_scale", a.v_scale, true, a.B, a.H_kv, a.S_kv, g);
  if (a.bits == 4) {
    check_kv_view(fn, "k_zero", a.k_zero, true, a.B, a.H_kv, a.S_kv, g);
    check_kv_view(fn, "v_zero", a.v_zero, true, a.B, a.H_kv, a.S_kv, g);
  } else {
    LOWBIT_CHECK(a.k_zero.ptr == nullptr, fn, ": k_zero_ptr must be 0 for an 8-bit cache (symmetric)");
    LOWBIT_CHECK(a.v_zero.ptr == nullptr, fn, ": v_zero_ptr must be 0 for an 8-bit cache (symmetric)");
  }
}

}  // namespace lowbit
