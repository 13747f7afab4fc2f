// AVX2 + FMA primitives of lut4_core.h.
//
// vpermps on ymm indexes 8 entries, so the 16 decoded values of a segment are two ymm tables
// (entries 0..7 and 8..15): both are permuted by the code and bit 3 of the code, moved to the
// sign bit, blends the two. The GEMM is lut4_gemm_avx2.h.
#pragma once

#include <immintrin.h>

#include <cstdint>


namespace lowbit {
namespace cpu {
namespace {

constexpr int64_t kGemvChunk = 16;  // 8 code bytes: two ymm of weights

// The column (within its 16-column chunk) whose weight the GEMV puts at position pos = 8 h + i:
// nibble h (0 low, 1 high) of byte i.
template <bool HF>
constexpr int64_t gemv_x_element(int64_t pos) {
  return 2 * (pos & 7) + ((pos >> 3) ^ (HF ? 1 : 0));
}

// The GEMV prefetches its weight stream this far ahead (bytes), by row length K (the AVX-512
// GEMV's distances, lut4_avx512.h).
inline int64_t gemv_prefetch_bytes(int64_t K) { return K >= 8192 ? 8192 : 4096; }

template <class T>
constexpr int gemv_max_m() {
  return 2;
}
template <int MR, class T>
constexpr int gemv_nr() {
  return MR == 1 ? 2 : 1;
}

inline void half_row_to_f32(const uint16_t* src, int64_t n, float* dst) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
  for (; k < n; ++k) dst[k] = half_to_float(src[k]);
}

struct Lut16 {
  __m256 lo, hi;  // entries 0..7, 8..15
};

inline __m256 lookup(const Lut16& t, __m256i idx) {  // uses bits 0..3 of each dword
  const __m256 a = _mm256_permutevar8x32_ps(t.lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(t.hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

inline __m256i load_codes8(const uint8_t* p) {  // 8 bytes -> 8 dwords
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

template <class F>
inline Lut16 segment_lut(const F& f, float s, float z) {
  const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
  const __m256 t0 = _mm256_loadu_ps(f.table), t1 = _mm256_loadu_ps(f.table + 8);
  if constexpr (F::kHasZero) return {_mm256_mul_ps(_mm256_sub_ps(t0, vz), vs), _mm256_mul_ps(_mm256_sub_ps(t1, vz), vs)};
  return {_mm256_mul_ps(t0, vs), _mm256_mul_ps(t1, vs)};
}

inline float hsum(__m256 v) {  // fixed order
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// res[m * NR + r] = dot(x row m, W row r of `rows`); xr[m] permuted per 16 columns (permute_x).
template <int NR, int MR, class F>
inline void gemv_block(const F& f, const GemvRow* rows, int64_t K, int64_t L, const float* const* xr, float* res) {
  __m256 acc[NR][MR][2];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
  const int64_t pf = gemv_prefetch_bytes(K);
  int64_t k = 0;
  for (int64_t g = 0; k < K; ++g) {
    Lut16 lut[NR];
    for (int r = 0; r < NR; ++r) {
      if constexpr (!F::kHasZero) lut[r] = segment_lut(f, rows[r].s[g], 0.0f);
      // The segment's bytes pf ahead (one line per 128 columns; past the row end is harmless).
      for (int64_t o = 0; o < L / 2; o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(rows[r].q + (k >> 1) + pf + o), _MM_HINT_T0);
    }
    if constexpr (F::kHasZero) {
      // int4 (table T[i] = i): the codes converted (vcvtdq2ps) and the zero subtracted give
      // q - z exactly as the reference rounds it; the scale is applied once per segment:
      // acc += s * sum (q - z) x. Two conversions and two subtractions per 16 weights instead
      // of four vpermps and two blends, which share the FMA pipes (float32 sums in another order
      // than the reference; one-hot x still reads (q - z) * s exactly).
      __m256 seg[NR][MR][2];
      for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MR; ++m) seg[r][m][0] = seg[r][m][1] = _mm256_setzero_ps();
      const __m256i m15 = _mm256_set1_epi32(15);
      for (const int64_t end = k + L; k < end; k += 16) {
        for (int r = 0; r < NR; ++r) {
          const __m256 vz = _mm256_set1_ps(rows[r].z[g]);
          const __m256i b = load_codes8(rows[r].q + (k >> 1));
          const __m256 lo = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, m15)), vz);
          const __m256 hi = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), vz);
          for (int m = 0; m < MR; ++m) {
            seg[r][m][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xr[m] + k), seg[r][m][0]);
            seg[r][m][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xr[m] + k + 8), seg[r][m][1]);
          }
        }
      }
      for (int r = 0; r < NR; ++r) {
        const __m256 vs = _mm256_set1_ps(rows[r].s[g]);
        for (int m = 0; m < MR; ++m) {
          acc[r][m][0] = _mm256_fmadd_ps(vs, seg[r][m][0], acc[r][m][0]);
          acc[r][m][1] = _mm256_fmadd_ps(vs, seg[r][m][1], acc[r][m][1]);
        }
      }
      continue;
    }
    for (const int64_t end = k + L; k < end; k += 16) {
      for (int r = 0; r < NR; ++r) {
        const __m256i b = load_codes8(rows[r].q + (k >> 1));
        const __m256 lo = lookup(lut[r], b);
        const __m256 hi = lookup(lut[r], _mm256_srli_epi32(b, 4));
        for (int m = 0; m < MR; ++m) {
          acc[r][m][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xr[m] + k), acc[r][m][0]);
          acc[r][m][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xr[m] + k + 8), acc[r][m][1]);
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) res[m * NR + r] = hsum(_mm256_add_ps(acc[r][m][0], acc[r][m][1]));
}

// dst[0, 32 * nchunks) = the weights of src[0, 16 * nchunks) in natural order.
template <bool HF>
inline void decode_run(const uint8_t* src, const float* lut16, int64_t nchunks, float* dst) {
  const Lut16 lut{_mm256_loadu_ps(lut16), _mm256_loadu_ps(lut16 + 8)};
  for (int64_t c = 0; c < 2 * nchunks; ++c) {  // 8 bytes, 16 weights at a time
    const __m256i b = load_codes8(src + 8 * c);
    const __m256 lo = lookup(lut, b), hi = lookup(lut, _mm256_srli_epi32(b, 4));
    const __m256 even = HF ? hi : lo, odd = HF ? lo : hi;
    const __m256 t0 = _mm256_unpacklo_ps(even, odd);  // e0 o0 e1 o1 | e4 o4 e5 o5
    const __m256 t1 = _mm256_unpackhi_ps(even, odd);  // e2 o2 e3 o3 | e6 o6 e7 o7
    _mm256_storeu_ps(dst + 16 * c, _mm256_permute2f128_ps(t0, t1, 0x20));
    _mm256_storeu_ps(dst + 16 * c + 8, _mm256_permute2f128_ps(t0, t1, 0x31));
  }
}

}  // namespace
}  // namespace cpu
}  // namespace lowbit
