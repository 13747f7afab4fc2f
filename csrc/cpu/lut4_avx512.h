// AVX-512 (F/BW/DQ/VL; + BF16 on the avx512bf16 build) primitives of lut4_core.h.
//
// The 16 decoded values of a segment sit in one zmm; vpermps takes the low 4 bits of each
// dword index, so 16 code bytes spread over 16 dwords give the low-nibble weights with one
// permute and, shifted right by 4, the high-nibble weights with another. The GEMV spreads them
// with a broadcast load and a per-lane shift (no shuffle: vpermps and the FMAs share the same
// two pipes on Zen 5, measured); the bfloat16 GEMV decodes all 32 weights of 16 bytes with one
// vpermw. Panels for the GEMM (lut4_gemm_avx512.h) are decoded in natural column order.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define LOWBIT_LUT4_INLINE inline __attribute__((always_inline))
#else
#define LOWBIT_LUT4_INLINE inline
#endif
#if defined(__AVX512BF16__)
#define LOWBIT_LUT4_BF16_DOT 1
#endif

namespace lowbit {
namespace cpu {
namespace {

constexpr int64_t kGemvChunk = 32;  // 16 code bytes: two zmm of weights

// The column (within its 32-column chunk) whose weight the GEMV puts at position pos: pos =
// 16 h + 4 L + i holds nibble h (0 low, 1 high) of byte 4 i + L (see gemv_block).
template <bool HF>
constexpr int64_t gemv_x_element(int64_t pos) {
  const int64_t h = pos >> 4, L = (pos >> 2) & 3, i = pos & 3;
  return 2 * (4 * i + L) + (h ^ (HF ? 1 : 0));
}
// The GEMV prefetches its weight stream this far ahead (bytes), by row length K. Measured on
// 2 Zen 5 cores, M = 1: 1 KiB loses ~30% on long rows (K = 14336) against 4 KiB; with the
// faster bfloat16 decode, 8 KiB gains another 5-15% there, and loses ~3% on K = 4096.
inline int64_t gemv_prefetch_bytes(int64_t K) { return K >= 8192 ? 8192 : 4096; }

// The GEMV takes M <= gemv_max_m<T>() (T: float32 x, or bfloat16 pairs), decoding gemv_nr
// weight rows together for MR x rows (at most 16 zmm accumulators). One row at a time for
// M = 1: rows are contiguous, so each thread then reads a single sequential stream, which the
// hardware prefetchers follow at ~40 GB/s on 2 cores where 4 interleaved row streams reach ~30.
template <class T>
constexpr int gemv_max_m() {
  return 8;
}
template <int MR, class T>
constexpr int gemv_nr() {
  return MR == 1 ? 1 : (sizeof(T) == 2 || MR == 2) ? 2 : 1;  // bfloat16: 2 rows share the x loads
}

inline void half_row_to_f32(const uint16_t* src, int64_t n, float* dst) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    _mm512_storeu_ps(dst + k, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k))));
  for (; k < n; ++k) dst[k] = half_to_float(src[k]);
}

inline __m512i load_codes16(const uint8_t* p) {  // 16 bytes -> 16 dwords
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <class F>
inline __m512 segment_lut(__m512 table, float s, float z) {
  if constexpr (F::kHasZero) return _mm512_mul_ps(_mm512_sub_ps(table, _mm512_set1_ps(z)), _mm512_set1_ps(s));
  return _mm512_mul_ps(table, _mm512_set1_ps(s));
}

// acc[r][m][0/1] += the 32 weights of row r at columns [k, k + 32) times x row m (permuted):
// the low-nibble weights against positions 0..15 of the chunk, the high-nibble ones 16..31.
template <int NR, int MR>
LOWBIT_LUT4_INLINE void gemv_chunk(__m512 (&acc)[NR][MR][2], const float* const* xr, const uint8_t* const* q,
                                   const __m512* lut, __m512i shifts, int64_t k, int64_t pf) {
  __m512 xv[MR][2];
  for (int m = 0; m < MR; ++m) {
    xv[m][0] = _mm512_loadu_ps(xr[m] + k);
    xv[m][1] = _mm512_loadu_ps(xr[m] + k + 16);
  }
  for (int r = 0; r < NR; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(q[r] + (k >> 1) + pf), _MM_HINT_T0);
    const __m512i b = _mm512_srlv_epi32(
        _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[r] + (k >> 1)))), shifts);
    const __m512 lo = _mm512_permutexvar_ps(b, lut[r]);
    const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut[r]);
    for (int m = 0; m < MR; ++m) {
      acc[r][m][0] = _mm512_fmadd_ps(lo, xv[m][0], acc[r][m][0]);
      acc[r][m][1] = _mm512_fmadd_ps(hi, xv[m][1], acc[r][m][1]);
    }
  }
}

// res[m * NR + r] = dot(x row m, W row r of `rows`), all rows with segments of L columns. xr[m]
// is row m of x permuted per 32 columns (permute_x). Chunks alternate between two sets of
// accumulators (4 FMA chains per dot product, so that one row at a time keeps the FMAs busy).
template <int NR, int MR, class F>
inline void gemv_block(const F& f, const GemvRow* rows, int64_t K, int64_t L, const float* const* xr, float* res) {
  const __m512 table = _mm512_loadu_ps(f.table);
  const int64_t pf = gemv_prefetch_bytes(K);
  // The 16 code bytes are broadcast to the 4 lanes of 128 bits (a plain load, no shuffle) and
  // lane block L shifted right by 8L bits: dword i of block L then holds byte 4i + L in its low
  // bits, so vpermps (low 4 bits) reads its low nibble and, after >> 4, its high nibble.
  const __m512i shifts = _mm512_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8, 16, 16, 16, 16, 24, 24, 24, 24);
  constexpr bool kTwo = NR * MR <= 4;  // else NR x MR x 2 chains are enough
  __m512 a0[NR][MR][2], a1[NR][MR][2];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) a0[r][m][0] = a0[r][m][1] = a1[r][m][0] = a1[r][m][1] = _mm512_setzero_ps();
  const uint8_t* q[NR];
  const float* sp[NR];
  const float* zp[NR];
  for (int r = 0; r < NR; ++r) {
    q[r] = rows[r].q;
    sp[r] = rows[r].s;
    zp[r] = rows[r].z;
  }
  __m512 lut[NR];
  bool odd = false;
  int64_t k = 0;
  for (int64_t g = 0; k < K; ++g) {
    for (int r = 0; r < NR; ++r) lut[r] = segment_lut<F>(table, sp[r][g], F::kHasZero ? zp[r][g] : 0.0f);
    const int64_t end = k + L;
    for (; k + 64 <= end; k += 64) {
      gemv_chunk<NR, MR>(a0, xr, q, lut, shifts, k, pf);
      gemv_chunk<NR, MR>(kTwo ? a1 : a0, xr, q, lut, shifts, k + 32, pf);
    }
    if (k < end) {
      if (kTwo && odd) {
        gemv_chunk<NR, MR>(a1, xr, q, lut, shifts, k, pf);
      } else {
        gemv_chunk<NR, MR>(a0, xr, q, lut, shifts, k, pf);
      }
      odd = !odd;
      k += 32;
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r)
      res[m * NR + r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0[r][m][0], a0[r][m][1]),
                                                           _mm512_add_ps(a1[r][m][0], a1[r][m][1])));
}

// dst[0, 32 * nchunks) = the weights of src[0, 16 * nchunks) in natural order (HF: the even
// element of a byte is its high nibble).
template <bool HF>
inline void decode_run(const uint8_t* src, const float* lut16, int64_t nchunks, float* dst) {
  const __m512 lut = _mm512_loadu_ps(lut16);
  const __m512i ia = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i ib = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t c = 0; c < nchunks; ++c) {
    const __m512i b = load_codes16(src + 16 * c);
    const __m512 lo = _mm512_permutexvar_ps(b, lut);
    const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut);
    const __m512 even = HF ? hi : lo, odd = HF ? lo : hi;
    _mm512_storeu_ps(dst + 32 * c, _mm512_permutex2var_ps(even, ia, odd));
    _mm512_storeu_ps(dst + 32 * c + 16, _mm512_permutex2var_ps(even, ib, odd));
  }
}

#if defined(LOWBIT_LUT4_BF16_DOT)
// bfloat16 GEMV (x and out bfloat16): the 16 code bytes broadcast to the 4 lanes of 128 bits
// and lane L shifted right by 4L bits: word 2i of lane L holds nibble L of dword i in its low
// bits and word 2i + 1 nibble L + 4, so one vpermw over a 32-word table (the 16 bfloat16
// values twice: bit 4 of a word index is the next nibble's, and does not matter) decodes all
// 32 weights, and one vdpbf16ps multiplies them with x: 3 vector ops per 32 weights instead of
// 6 with float32. Position 8 L + 2 i + h of a chunk holds nibble L + 4 h of dword i.
template <bool HF>
constexpr int64_t gemv_x_element_bf16(int64_t pos) {
  const int64_t L = pos >> 3, i = (pos >> 1) & 3, h = pos & 1;
  const int64_t nib = L + 4 * h;  // nibble of dword i: byte 4 i + nib / 2, nibble nib % 2
  return 2 * (4 * i + nib / 2) + ((nib & 1) ^ (HF ? 1 : 0));
}

// The "quad" bfloat16 GEMV (segments a multiple of 128 columns, e.g. int4 g128): 64 code
// bytes = 32 words, each holding 4 nibbles; vpermw reads the low 4 bits of a word (bit 4 picks
// the repeated half of the 32-word table, so it does not matter), so the raw words and the
// words >> 4, >> 8, >> 12 decode the 4 nibble planes: one load and 3 shifts for 128 weights
// instead of a broadcast and a shift per 32. Position 32 p + i of a 128-column chunk holds
// nibble p of word i: element 4 i + p (4 i + (p ^ 1) when the even element is the high nibble).
inline bool gemv_quad_bf16(int64_t seg_len) { return seg_len % 128 == 0; }
template <bool HF>
constexpr int64_t gemv_x_element_quad(int64_t pos) {
  return 4 * (pos & 31) + ((pos >> 5) ^ (HF ? 1 : 0));
}

inline __m512bh as_bh(__m512i v) {
  __m512bh r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}

template <class F>
inline __m512i segment_lut_bf16(__m512 table, float s, float z) {
  const __m256bh h = _mm512_cvtneps_pbh(segment_lut<F>(table, s, z));  // round to nearest even
  __m256i w;
  std::memcpy(&w, &h, sizeof w);
  return _mm512_broadcast_i64x4(w);
}

// acc[r][m] += the 32 weights of rows r at columns [k, k + 32) times x row m.
template <int NR, int MR>
LOWBIT_LUT4_INLINE void gemv_chunk_bf16(__m512 (&acc)[NR][MR], const uint16_t* const* xr, const uint8_t* const* q,
                                        const __m512i* lut, __m512i shifts, int64_t k, int64_t pf) {
  __m512bh xv[MR];
  for (int m = 0; m < MR; ++m) xv[m] = as_bh(_mm512_loadu_si512(xr[m] + k));
  for (int r = 0; r < NR; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(q[r] + (k >> 1) + pf), _MM_HINT_T0);
    const __m512i b = _mm512_srlv_epi32(
        _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[r] + (k >> 1)))), shifts);
    const __m512bh w = as_bh(_mm512_permutexvar_epi16(b, lut[r]));
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv[m], w);
  }
}

// acc[p][r][m] += plane p of the 128 weights of row r at columns [k, k + 128) times x row m
// (the x vectors of a plane loaded once for all NR rows).
template <int NR, int MR, int C>
LOWBIT_LUT4_INLINE void gemv_quad_bf16(__m512 (&acc)[4][NR][MR], const uint16_t* const* xr, const uint8_t* const* q,
                                       const __m512i* lut, int64_t k, int64_t pf) {
  __m512i b[NR];
  for (int r = 0; r < NR; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(q[r] + (k >> 1) + pf), _MM_HINT_T0);
    b[r] = _mm512_loadu_si512(q[r] + (k >> 1));
  }
  for (int p = 0; p < 4; ++p) {
    __m512bh xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = as_bh(_mm512_loadu_si512(xr[m] + k + 32 * p));
    for (int r = 0; r < NR; ++r) {
      const __m512i idx = p == 0 ? b[r] : _mm512_srli_epi16(b[r], 4 * p);
      const __m512bh w = as_bh(_mm512_permutexvar_epi16(idx, lut[r]));
      for (int m = 0; m < MR; ++m) acc[p % C][r][m] = _mm512_dpbf16_ps(acc[p % C][r][m], xv[m], w);
    }
  }
}

template <int NR, int MR, class F>
inline void gemv_block_bf16(const F& f, const GemvRow* rows, int64_t K, int64_t L, const uint16_t* const* xr,
                            float* res) {
  const __m512 table = _mm512_loadu_ps(f.table);
  const int64_t pf = gemv_prefetch_bytes(K);
  const __m512i shifts = _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
  // Four chains per dot product for one row of x and W (vdpbf16ps: ~6 cycles latency, 2 a
  // cycle), two up to NR x MR = 8, else NR x MR are enough. Chunk c of a 4-chunk group goes to
  // chain c; a segment of fewer chunks (nf4 blocks of 64, chunks of 32) fills the group with the
  // next segments; whatever does not form a whole group (tails, odd segment lengths) goes to
  // chains 0, 1, 0, 1, ... from the start of its segment.
  constexpr int C = NR * MR == 1 ? 4 : NR * MR <= 8 ? 2 : 1;
  __m512 a[4][NR][MR];
  for (int c = 0; c < 4; ++c)
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MR; ++m) a[c][r][m] = _mm512_setzero_ps();
  const uint8_t* q[NR];
  const float* sp[NR];
  const float* zp[NR];
  for (int r = 0; r < NR; ++r) {
    q[r] = rows[r].q;
    sp[r] = rows[r].s;
    zp[r] = rows[r].z;
  }
  __m512i lut[NR];
  auto seg_lut = [&](__m512i* l, int64_t g) {
    for (int r = 0; r < NR; ++r) l[r] = segment_lut_bf16<F>(table, sp[r][g], F::kHasZero ? zp[r][g] : 0.0f);
  };
  int64_t k = 0, g = 0;
  if (gemv_quad_bf16(L)) {  // x permuted per 128 columns (permute_x)
    for (; k < K; ++g) {
      seg_lut(lut, g);
      for (const int64_t end = k + L; k < end; k += 128) gemv_quad_bf16<NR, MR, C>(a, xr, q, lut, k, pf);
    }
  } else if (C == 4 && (L == 32 || L == 64)) {  // 4 / (L / 32) segments a group
    const int64_t spg = 128 / L;
    for (; k + 128 <= K; k += 128, g += spg) {
      __m512i l2[NR];
      seg_lut(lut, g);
      seg_lut(l2, g + spg - 1);
      if (L == 64) {
        gemv_chunk_bf16<NR, MR>(a[0], xr, q, lut, shifts, k, pf);
        gemv_chunk_bf16<NR, MR>(a[1], xr, q, lut, shifts, k + 32, pf);
        gemv_chunk_bf16<NR, MR>(a[2], xr, q, l2, shifts, k + 64, pf);
        gemv_chunk_bf16<NR, MR>(a[3], xr, q, l2, shifts, k + 96, pf);
      } else {
        __m512i l1[NR], l3[NR];  // segments g + 1, g + 2 (l2: g + 3)
        seg_lut(l1, g + 1);
        seg_lut(l3, g + 2);
        gemv_chunk_bf16<NR, MR>(a[0], xr, q, lut, shifts, k, pf);
        gemv_chunk_bf16<NR, MR>(a[1], xr, q, l1, shifts, k + 32, pf);
        gemv_chunk_bf16<NR, MR>(a[2], xr, q, l3, shifts, k + 64, pf);
        gemv_chunk_bf16<NR, MR>(a[3], xr, q, l2, shifts, k + 96, pf);
      }
    }
  }
  for (; k < K; ++g) {
    seg_lut(lut, g);
    const int64_t end = k + L;
    if (C == 4)
      for (; k + 128 <= end; k += 128) {
        gemv_chunk_bf16<NR, MR>(a[0], xr, q, lut, shifts, k, pf);
        gemv_chunk_bf16<NR, MR>(a[1], xr, q, lut, shifts, k + 32, pf);
        gemv_chunk_bf16<NR, MR>(a[2], xr, q, lut, shifts, k + 64, pf);
        gemv_chunk_bf16<NR, MR>(a[3], xr, q, lut, shifts, k + 96, pf);
      }
    for (; k + 64 <= end; k += 64) {
      gemv_chunk_bf16<NR, MR>(a[0], xr, q, lut, shifts, k, pf);
      gemv_chunk_bf16<NR, MR>(a[C > 1 ? 1 : 0], xr, q, lut, shifts, k + 32, pf);
    }
    if (k < end) {
      gemv_chunk_bf16<NR, MR>(a[0], xr, q, lut, shifts, k, pf);
      k += 32;
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r)
      res[m * NR + r] = _mm512_reduce_add_ps(
          _mm512_add_ps(_mm512_add_ps(a[0][r][m], a[1][r][m]), _mm512_add_ps(a[2][r][m], a[3][r][m])));
}

template <bool HF>
inline void decode_run(const uint8_t* src, const float* lut16, int64_t nchunks, uint16_t* dst) {
  const __m256bh lut_bh = _mm512_cvtneps_pbh(_mm512_loadu_ps(lut16));  // round to nearest even
  __m256i lut_w;
  std::memcpy(&lut_w, &lut_bh, sizeof lut_w);
  const __m512i lut = _mm512_broadcast_i64x4(lut_w);  // words 16..31 repeat 0..15
  for (int64_t c = 0; c < nchunks; ++c) {
    const __m512i b = load_codes16(src + 16 * c);
    const __m512i lo = _mm512_and_si512(b, _mm512_set1_epi32(15));
    const __m512i hi = _mm512_srli_epi32(b, 4);
    // dword i = (word index of element 2i) | (word index of element 2i + 1) << 16
    const __m512i idx = HF ? _mm512_or_si512(hi, _mm512_slli_epi32(lo, 16))
                           : _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
    _mm512_storeu_si512(dst + 32 * c, _mm512_permutexvar_epi16(idx, lut));
  }
}

#endif

}  // namespace
}  // namespace cpu
}  // namespace lowbit
