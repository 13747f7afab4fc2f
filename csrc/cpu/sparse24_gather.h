// Gather tiles of the sparse24_matmul CPU kernel (family 1, described at the top of
// sparse24_matmul_kernels.cpp): out[i][r] = dot(weight row rows[i], x row xr[r]) over all K,
// per instruction set (portable scalar, AVX-512, AVX2, NEON, AVX512_BF16).
//
// Part of sparse24_matmul_kernels.cpp (compiled once per instruction set, see isa.h): include it
// only from there, inside its anonymous namespace, after the LOWBIT_S24_* macros, kNR / kMR,
// load_u32 / load_u64, sum8 and dot_groups. It includes nothing itself; the system and
// intrinsics headers are included by the .cpp before the namespace.
#pragma once

// ------------------------------------------------------------------------------------------
// Gather tiles: out[i][r] = dot(weight row rows[i], x row xr[r]) over all K, i < kNR, r < R.

// The portable tile (scalar build, and the NEON one's template): plain C++.
template <int R, int VD>
void gather_tile_scalar(const Sparse24MatmulArgs& a, const int64_t* rows, const float* const* xr,
                        float (*out)[kMR]) {
  for (int i = 0; i < kNR; ++i)
    for (int r = 0; r < R; ++r) out[i][r] = dot_groups<kFloat32, VD>(a, rows[i], xr[r], 0, a.K / 4);
}

#if defined(LOWBIT_S24_AVX512)
template <int VD>
inline __m512 load16_values(const void* v, int64_t i) {  // 16 values from index i, widened exactly
  if constexpr (VD == kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(v) + i);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(v) + i));
    if constexpr (VD == kBFloat16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
  }
}

// 32 columns per step: lane j (value j: group j/2, slot j&1) takes x[k + 4 * (j >> 1) + ((meta32 >> 2j) & 3)].
template <int R, int VD>
void gather_tile(const Sparse24MatmulArgs& a, const int64_t* rows, const float* const* xr, float (*out)[kMR]) {
  const int64_t K = a.K;
  const uint8_t* mp[kNR];
  int64_t voff[kNR];
  for (int i = 0; i < kNR; ++i) {
    mp[i] = a.meta + rows[i] * (K / 8);
    voff[i] = rows[i] * (K / 2);
  }
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  __m512 acc[kNR][R];
  for (int i = 0; i < kNR; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i idx[kNR];
    __m512 w[kNR];
#pragma GCC unroll 4
    for (int i = 0; i < kNR; ++i) {
      _mm_prefetch(static_cast<const char*>(a.values) + (voff[i] + k / 2) * dtype_size(VD) + kGatherPrefetchBytes,
                   _MM_HINT_T0);
      if ((k & 511) == 0) _mm_prefetch(reinterpret_cast<const char*>(mp[i] + k / 8) + 128, _MM_HINT_T0);
      const __m512i m = _mm512_set1_epi32(static_cast<int>(load_u32(mp[i] + k / 8)));
      idx[i] = _mm512_ternarylogic_epi32(_mm512_srlv_epi32(m, shifts), three, base, 0xEA);  // (m & 3) | base
      w[i] = load16_values<VD>(a.values, voff[i] + k / 2);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 xlo = _mm512_loadu_ps(xr[r] + k);
      const __m512 xhi = _mm512_loadu_ps(xr[r] + k + 16);
#pragma GCC unroll 4
      for (int i = 0; i < kNR; ++i)
        acc[i][r] = _mm512_fmadd_ps(_mm512_permutex2var_ps(xlo, idx[i], xhi), w[i], acc[i][r]);
    }
  }
  for (int i = 0; i < kNR; ++i)
    for (int r = 0; r < R; ++r) {
      float y = _mm512_reduce_add_ps(acc[i][r]);
      if (k < K) y += dot_groups<kFloat32, VD>(a, rows[i], xr[r], k / 4, K / 4);
      out[i][r] = y;
    }
}
#elif defined(LOWBIT_S24_AVX2)
template <int VD>
inline __m256 load8_values(const void* v, int64_t i) {
  if constexpr (VD == kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(v) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(v) + i));
    if constexpr (VD == kBFloat16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
  }
}

inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// 16 columns per step: lanes 0-3 (groups 0, 1) come from columns 0-7, lanes 4-7 from 8-15,
// so two in-register vpermps (index mod 8) and a fixed blend gather them.
template <int R, int VD>
void gather_tile(const Sparse24MatmulArgs& a, const int64_t* rows, const float* const* xr, float (*out)[kMR]) {
  const int64_t K = a.K;
  const uint8_t* mp[kNR];
  int64_t voff[kNR];
  for (int i = 0; i < kNR; ++i) {
    mp[i] = a.meta + rows[i] * (K / 8);
    voff[i] = rows[i] * (K / 2);
  }
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
  const __m256i three = _mm256_set1_epi32(3);
  __m256 acc[kNR][R];
  for (int i = 0; i < kNR; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256i idx[kNR];
    __m256 w[kNR];
#pragma GCC unroll 4
    for (int i = 0; i < kNR; ++i) {
      if ((k & 63) == 0) {
        _mm_prefetch(static_cast<const char*>(a.values) + (voff[i] + k / 2) * dtype_size(VD) + kGatherPrefetchBytes,
                     _MM_HINT_T0);
        if ((k & 511) == 0) _mm_prefetch(reinterpret_cast<const char*>(mp[i] + k / 8) + 128, _MM_HINT_T0);
      }
      uint16_t m16;
      std::memcpy(&m16, mp[i] + k / 8, 2);
      const __m256i m = _mm256_set1_epi32(m16);
      idx[i] = _mm256_or_si256(_mm256_and_si256(_mm256_srlv_epi32(m, shifts), three), base);
      w[i] = load8_values<VD>(a.values, voff[i] + k / 2);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 xlo = _mm256_loadu_ps(xr[r] + k);
      const __m256 xhi = _mm256_loadu_ps(xr[r] + k + 8);
#pragma GCC unroll 4
      for (int i = 0; i < kNR; ++i) {
        const __m256 g = _mm256_blend_ps(_mm256_permutevar8x32_ps(xlo, idx[i]),
                                         _mm256_permutevar8x32_ps(xhi, idx[i]), 0xF0);
        acc[i][r] = _mm256_fmadd_ps(g, w[i], acc[i][r]);
      }
    }
  }
  for (int i = 0; i < kNR; ++i)
    for (int r = 0; r < R; ++r) {
      float y = hsum8(acc[i][r]);
      if (k < K) y += dot_groups<kFloat32, VD>(a, rows[i], xr[r], k / 4, K / 4);
      out[i][r] = y;
    }
}
#elif defined(__ARM_NEON) && defined(__aarch64__)
template <int VD>
inline float32x4_t load4_values(const void* v, int64_t i) {
  if constexpr (VD == kFloat32) {
    return vld1q_f32(static_cast<const float*>(v) + i);
  } else if constexpr (VD == kBFloat16) {
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(static_cast<const uint16_t*>(v) + i), 16));
  } else {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(static_cast<const uint16_t*>(v) + i)));
  }
}

// 8 columns (one meta byte, 4 values) per step; the 4 x values are picked by index.
template <int R, int VD>
void gather_tile(const Sparse24MatmulArgs& a, const int64_t* rows, const float* const* xr, float (*out)[kMR]) {
  const int64_t K = a.K;
  float32x4_t acc[kNR][R];
  for (int i = 0; i < kNR; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = vdupq_n_f32(0.0f);
  for (int i = 0; i < kNR; ++i) {
    const uint8_t* mp = a.meta + rows[i] * (K / 8);
    const int64_t voff = rows[i] * (K / 2);
    for (int64_t k = 0; k < K; k += 8) {
      const unsigned mb = mp[k / 8];
      const int64_t c0 = k + (mb & 3u), c1 = k + ((mb >> 2) & 3u);
      const int64_t c2 = k + 4 + ((mb >> 4) & 3u), c3 = k + 4 + (mb >> 6);
      const float32x4_t w = load4_values<VD>(a.values, voff + k / 2);
      for (int r = 0; r < R; ++r) {
        const float* x = xr[r];
        const float tmp[4] = {x[c0], x[c1], x[c2], x[c3]};
        acc[i][r] = vfmaq_f32(acc[i][r], vld1q_f32(tmp), w);
      }
    }
  }
  for (int i = 0; i < kNR; ++i)
    for (int r = 0; r < R; ++r) out[i][r] = vaddvq_f32(acc[i][r]);
}
#else
template <int R, int VD>
void gather_tile(const Sparse24MatmulArgs& a, const int64_t* rows, const float* const* xr, float (*out)[kMR]) {
  gather_tile_scalar<R, VD>(a, rows, xr, out);
}
#endif

#if defined(LOWBIT_S24_BF16)
alignas(64) constexpr uint8_t kBf16MetaByte[64] = {  // byte b of the zmm -> meta byte (b / 2) / 4
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7};
alignas(64) constexpr uint16_t kBf16Shift[32] = {0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6,
                                                 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6};
alignas(64) constexpr uint16_t kBf16Base[32] = {0,  0,  4,  4,  8,  8,  12, 12, 16, 16, 20, 20, 24, 24, 28, 28,
                                                32, 32, 36, 36, 40, 40, 44, 44, 48, 48, 52, 52, 56, 56, 60, 60};

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }  // a bit cast (same-size vector types)

// x and values bf16: 64 columns (32 values, 8 meta bytes) per step; word j of the gathered
// vector is x[k + 4 * (j >> 1) + ((meta64 >> 2j) & 3)], paired with value j by vdpbf16ps.
template <int R>
void gather_tile_bf16(const Sparse24MatmulArgs& a, const int64_t* rows, const uint16_t* const* xr,
                      float (*out)[kMR]) {
  const int64_t K = a.K;
  const uint16_t* values = static_cast<const uint16_t*>(a.values);
  const uint8_t* mp[kNR];
  const uint16_t* vp[kNR];
  for (int i = 0; i < kNR; ++i) {
    mp[i] = a.meta + rows[i] * (K / 8);
    vp[i] = values + rows[i] * (K / 2);
  }
  const __m512i ctrl = _mm512_load_si512(kBf16MetaByte);
  const __m512i shifts = _mm512_load_si512(kBf16Shift);
  const __m512i base = _mm512_load_si512(kBf16Base);
  const __m512i three = _mm512_set1_epi16(3);
  __m512 acc[kNR][R];
  for (int i = 0; i < kNR; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    __m512i idx[kNR];
#pragma GCC unroll 4
    for (int i = 0; i < kNR; ++i) {
      // Four rows are four streams; help the hardware prefetcher keep enough lines in flight.
      _mm_prefetch(reinterpret_cast<const char*>(vp[i] + k / 2) + kGatherPrefetchBytes, _MM_HINT_T0);
      if ((k & 511) == 0) _mm_prefetch(reinterpret_cast<const char*>(mp[i] + k / 8) + 128, _MM_HINT_T0);
      __m512i m = _mm512_set1_epi64(static_cast<long long>(load_u64(mp[i] + k / 8)));
      m = _mm512_srlv_epi16(_mm512_shuffle_epi8(m, ctrl), shifts);
      idx[i] = _mm512_ternarylogic_epi32(m, three, base, 0xEA);  // (m & 3) | base
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      __m512i xlo = _mm512_loadu_si512(xr[r] + k);
      __m512i xhi = _mm512_loadu_si512(xr[r] + k + 32);
      // Keep the window in registers: without this GCC reloads it for every weight row (the
      // permute overwrites one source), which doubles the L1/L2 traffic.
#if defined(__GNUC__)
      __asm__("" : "+v"(xlo), "+v"(xhi));
#endif
#pragma GCC unroll 4
      for (int i = 0; i < kNR; ++i) {
        const __m512i g = _mm512_permutex2var_epi16(xlo, idx[i], xhi);
        acc[i][r] = _mm512_dpbf16_ps(acc[i][r], as_bh(g), as_bh(_mm512_loadu_si512(vp[i] + k / 2)));
      }
    }
  }
  for (int i = 0; i < kNR; ++i)
    for (int r = 0; r < R; ++r) {
      float y = _mm512_reduce_add_ps(acc[i][r]);
      if (k < K) y += dot_groups<kBFloat16, kBFloat16>(a, rows[i], xr[r], k / 4, K / 4);
      out[i][r] = y;
    }
}

// Small-M row kernel (run_gemv): out[r] = dot(weight row n, x row xr[r]) for R <= kGemvMaxM
// bf16 x rows: the 64-column step of gather_tile_bf16 for one weight row, so that a thread's
// weight reads are sequential runs (see run_gemv). With few x rows the dot products rotate over
// C accumulator chains (vdpbf16ps latency).
template <int R>
void gemv_row_bf16(const Sparse24MatmulArgs& a, int64_t n, const uint16_t* const* xr, float* out) {
  constexpr int C = R == 1 ? 4 : R == 2 ? 2 : 1;
  const int64_t K = a.K;
  const uint8_t* mp = a.meta + n * (K / 8);
  const uint16_t* vp = static_cast<const uint16_t*>(a.values) + n * (K / 2);
  const __m512i ctrl = _mm512_load_si512(kBf16MetaByte);
  const __m512i shifts = _mm512_load_si512(kBf16Shift);
  const __m512i base = _mm512_load_si512(kBf16Base);
  const __m512i three = _mm512_set1_epi16(3);
  __m512 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
  auto step = [&](__m512(&ac)[R], int64_t k) {
    __m512i m = _mm512_set1_epi64(static_cast<long long>(load_u64(mp + k / 8)));
    m = _mm512_srlv_epi16(_mm512_shuffle_epi8(m, ctrl), shifts);
    const __m512i idx = _mm512_ternarylogic_epi32(m, three, base, 0xEA);  // (m & 3) | base
    const __m512bh w = as_bh(_mm512_loadu_si512(vp + k / 2));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i g = _mm512_permutex2var_epi16(_mm512_loadu_si512(xr[r] + k), idx,
                                                  _mm512_loadu_si512(xr[r] + k + 32));
      ac[r] = _mm512_dpbf16_ps(ac[r], as_bh(g), w);
    }
  };
  int64_t k = 0;
  for (; k + 256 <= K; k += 256) {  // 256 value bytes (4 lines), 32 meta bytes; prefetch into the next rows
    const char* pv = reinterpret_cast<const char*>(vp + k / 2) + kGemvPrefetchBytes;
    for (int l = 0; l < 256; l += 64) _mm_prefetch(pv + l, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(mp + k / 8) + kGemvPrefetchBytes / 8, _MM_HINT_T0);
    step(acc[0], k);
    step(acc[1 % C], k + 64);
    step(acc[2 % C], k + 128);
    step(acc[3 % C], k + 192);
  }
  for (; k + 64 <= K; k += 64) step(acc[0], k);
  for (int r = 0; r < R; ++r) {
    __m512 s = acc[0][r];
    if constexpr (C == 2) s = _mm512_add_ps(s, acc[1][r]);
    if constexpr (C == 4) s = _mm512_add_ps(_mm512_add_ps(s, acc[1][r]), _mm512_add_ps(acc[2][r], acc[3][r]));
    float y = _mm512_reduce_add_ps(s);
    if (k < K) y += dot_groups<kBFloat16, kBFloat16>(a, n, xr[r], k / 4, K / 4);
    out[r] = y;
  }
}
#endif
