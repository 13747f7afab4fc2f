// CPU kernels for sparse24_matmul (2:4 sparse weights), compiled once per instruction set
// (see isa.h). They read the checkpoint layout directly (no repack).
//
// Two families, both threaded over N (output features) with parallel_for:
//
// 1. Gather kernels (small M, decode). A tile of kNR = 4 weight rows is walked along K against
//    up to kMR = 4 rows of x at once. For each block of columns the 2-bit in-group indices of
//    the meta bytes are turned into permutation indices with a few vector ops (broadcast the
//    meta word, per-lane variable shift, `& 3 | 4 * group`), and x is gathered from a window
//    held in two registers with one permute, then multiplied by the stored values:
//      * AVX-512, fp32 math: 32 columns (16 values, 4 meta bytes) per step,
//        `vpermt2ps` over a 32-float window, `vfmadd`;
//      * AVX512_BF16 (x and values both bf16): 64 columns (32 values, 8 meta bytes) per step,
//        `vpshufb` + `vpsrlvw` decode, `vpermt2w` over a 64-bf16 window, `vdpbf16ps` (fp32
//        accumulation of exact bf16 products);
//      * AVX2: 16 columns (8 values) per step, two `vpermps` + a fixed blend, `vfmadd`;
//      * NEON: 8 columns (4 values) per step, the 4 x values picked by index, `vfmaq_f32`;
//      * scalar: plain C++, 8 partial sums (the behaviour of record).
//    The weight stream is read once; x stays in L1/L2. At M = 1 this is memory-bound.
//
// 2. Outer-product kernels (larger M: kXtMinM / kXpMinM and up; AVX-512 and AVX2). Instead of
//    gathering x for each weight row, x is arranged into a small table per block of x rows
//    (MC = 4 vectors) and groups (KG), in which the x operand of any stored weight is one
//    aligned vector of x rows:
//      * bf16 (AVX512_BF16): XP[g][slot][m] = the bf16 pair (x[m, 4g + i0], x[m, 4g + i1]) of
//        the slot's nibble (the 6 legal pairs; the 10 illegal nibbles get extra slots, built only
//        for K blocks that hold one), so a stored value pair (one dword of `values`) times 16
//        rows of x is one `vdpbf16ps` of a broadcast weight dword and the slot's vector: no
//        shuffle in the inner loop, and half the multiplies of a dense GEMM;
//      * fp32: XT[c][m] = x[m, c], one broadcast value times one table vector per `vfmadd`.
//    The weights are packed per K block into [row][group] entries holding the slot's byte
//    offset and the value(s) (vectorized: nibble -> offset by vpermd tables), so the micro-tile
//    (NR weight rows x 4 vectors of x rows, accumulators in registers) only loads an offset,
//    broadcasts the weight and runs its loads and multiply-adds. Loop blocking (run_outer)
//    keeps one table in L1, the packed panel in L2 and the partial sums in a per-thread buffer.
//
// Every path computes sum_g v0 * x[4g + (nib & 3)] + v1 * x[4g + (nib >> 2)] for whatever the
// nibble holds, so illegal metadata gives a defined (meaningless) result, never an
// out-of-bounds read. fp32 activations are computed in fp32 (values widened exactly); bf16
// products (vdpbf16ps) are used only when x and values are both bf16. Results do not depend
// on the thread count.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/sparse24_matmul.h"
#include "isa.h"
#include "parallel.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 headers pass _mm512_undefined_*() as the masked-off source of many
// intrinsics and then warn about it (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define LOWBIT_S24_AVX512 1
#endif
#if defined(LOWBIT_S24_AVX512) && defined(__AVX512BF16__)
#define LOWBIT_S24_BF16 1
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(LOWBIT_S24_AVX512)
#define LOWBIT_S24_AVX2 1
#endif

namespace lowbit {
namespace cpu {
namespace {

constexpr int kNR = 4;                          // weight rows per gather tile
constexpr int kMR = 4;                          // x rows per gather pass
constexpr int64_t kMinWorkPerThread = 1 << 18;  // stored-value multiply-adds below which a thread is not worth it
constexpr int64_t kMinChunkTiles = 8;           // gather: weight tiles per work item, at least
constexpr int kGatherPrefetchBytes = 512;       // gather: prefetch distance along each weight row's values

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float sum8(const float* p) {  // fixed order
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

// sum over groups [g0, g1) of row n: v0 * x[4g + (nib & 3)] + v1 * x[4g + (nib >> 2)], with x a
// row of dtype XD and values of dtype VD (compile-time, so load_as_float's switch folds away).
template <int XD, int VD>
float dot_groups(const Sparse24MatmulArgs& a, int64_t n, const void* xrow, int64_t g0, int64_t g1) {
  const uint8_t* meta = a.meta + n * (a.K / 8);
  const int64_t voff = n * (a.K / 2);
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t g = g0; g < g1; ++g) {
    const unsigned nib = (meta[g >> 1] >> ((g & 1) * 4)) & 15u;
    const float v0 = load_as_float(a.values, voff + 2 * g, VD);
    const float v1 = load_as_float(a.values, voff + 2 * g + 1, VD);
    const float x0 = load_as_float(xrow, 4 * g + (nib & 3u), XD);
    const float x1 = load_as_float(xrow, 4 * g + (nib >> 2), XD);
    part[g & 7] += v0 * x0 + v1 * x1;
  }
  return sum8(part);
}

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
#endif

// ------------------------------------------------------------------------------------------
// Gather driver: work items are chunks of kNR-row tiles; each tile runs against x in passes
// of up to kMR rows. `xrows` are M row pointers (fp32 rows, or bf16 rows for the bf16 tile).

struct GatherPlan {
  int64_t tiles, chunk_tiles, chunks;
  int threads;
};

GatherPlan make_gather_plan(const Sparse24MatmulArgs& a, int num_threads) {
  GatherPlan p{};
  p.tiles = (a.N + kNR - 1) / kNR;
  const double work = static_cast<double>(a.M) * static_cast<double>(a.N) * static_cast<double>(a.K / 2);
  int64_t t = std::max(1, num_threads);
  t = std::min<int64_t>(t, std::max<int64_t>(1, static_cast<int64_t>(work / kMinWorkPerThread)));
  t = std::min<int64_t>(t, std::max<int64_t>(1, p.tiles / kMinChunkTiles));
  p.threads = static_cast<int>(t);
  p.chunk_tiles = t == 1 ? p.tiles : std::max<int64_t>(kMinChunkTiles, p.tiles / (8 * t));
  p.chunks = (p.tiles + p.chunk_tiles - 1) / p.chunk_tiles;
  return p;
}

inline void store_out(const Sparse24MatmulArgs& a, int64_t m, int64_t n, float y) {
  if (a.bias) y += load_as_float(a.bias, n, a.bias_dtype);
  store_from_float(a.out, m * a.N + n, a.out_dtype, y);
}

// tile(rows, xr, R, out) computes one kNR x R block.
template <class XT, class TileFn>
void run_gather(const Sparse24MatmulArgs& a, int num_threads, const XT* const* xrows, const TileFn& tile) {
  const GatherPlan p = make_gather_plan(a, num_threads);
  parallel_for(p.chunks, p.threads, [&](int64_t c, int) {
    const int64_t t_end = std::min(p.tiles, (c + 1) * p.chunk_tiles);
    for (int64_t t = c * p.chunk_tiles; t < t_end; ++t) {
      const int64_t n0 = t * kNR;
      const int64_t nr = std::min<int64_t>(kNR, a.N - n0);
      int64_t rows[kNR];
      for (int i = 0; i < kNR; ++i) rows[i] = std::min(n0 + i, a.N - 1);  // a short tile repeats its last row
      for (int64_t m0 = 0; m0 < a.M; m0 += kMR) {
        const int R = static_cast<int>(std::min<int64_t>(kMR, a.M - m0));
        float out[kNR][kMR];
        tile(rows, xrows + m0, R, out);
        for (int64_t i = 0; i < nr; ++i)
          for (int r = 0; r < R; ++r) store_out(a, m0 + r, n0 + i, out[i][r]);
      }
    }
  });
}

template <template <int, int> class F, int VD>
struct DispatchR {
  template <class... Args>
  static void run(int R, Args&&... args) {
    switch (R) {
      case 1: F<1, VD>::call(args...); break;
      case 2: F<2, VD>::call(args...); break;
      case 3: F<3, VD>::call(args...); break;
      default: F<4, VD>::call(args...); break;
    }
  }
};

template <int R, int VD>
struct GatherTileF32 {
  static void call(const Sparse24MatmulArgs& a, const int64_t* rows, const float* const* xr, float (*out)[kMR]) {
#if LOWBIT_ISA_LEVEL == LOWBIT_ISA_SCALAR
    gather_tile_scalar<R, VD>(a, rows, xr, out);
#else
    gather_tile<R, VD>(a, rows, xr, out);
#endif
  }
};

// fp32 math: x rows as fp32 (converted once, if needed), any values dtype.
template <int VD>
void run_gather_f32(const Sparse24MatmulArgs& a, int num_threads, const float* const* xrows) {
  run_gather(a, num_threads, xrows, [&](const int64_t* rows, const float* const* xr, int R, float(*out)[kMR]) {
    DispatchR<GatherTileF32, VD>::run(R, a, rows, xr, out);
  });
}

#if defined(LOWBIT_S24_BF16)
template <int R, int VD>
struct GatherTileBf16 {
  static void call(const Sparse24MatmulArgs& a, const int64_t* rows, const uint16_t* const* xr, float (*out)[kMR]) {
    gather_tile_bf16<R>(a, rows, xr, out);
  }
};
#endif

// ------------------------------------------------------------------------------------------
// Outer-product kernels (x arranged into tables; see the header comment and run_outer).

#if defined(LOWBIT_S24_AVX512) || defined(LOWBIT_S24_AVX2)

constexpr int kPackPrefetchRows = 16;  // pack: prefetch the weights of the row this far ahead

template <int Hint = _MM_HINT_T0>
inline void prefetch_row(const Sparse24MatmulArgs& a, int vbytes, int64_t n, int64_t g0, int64_t ng) {
  const char* v = static_cast<const char*>(a.values) + n * (a.K / 2) * vbytes + 2 * g0 * vbytes;
  const int64_t len = 2 * ng * vbytes;
  for (int64_t b = 0; b < len; b += 64) _mm_prefetch(v + b, static_cast<decltype(_MM_HINT_T0)>(Hint));
  _mm_prefetch(v + len - 1, static_cast<decltype(_MM_HINT_T0)>(Hint));
  const char* m = reinterpret_cast<const char*>(a.meta) + n * (a.K / 8) + g0 / 2;
  _mm_prefetch(m, static_cast<decltype(_MM_HINT_T0)>(Hint));
  _mm_prefetch(m + ng / 2 - 1, static_cast<decltype(_MM_HINT_T0)>(Hint));
}

constexpr int64_t kChunkTiles = 80;  // outer-product: weight tiles packed at a time (panel in L2)
constexpr int64_t kGroupTiles = 8;   // outer-product: tiles run back to back on one table (partial sums in L1)
constexpr int64_t kMaxMRange = 512;  // outer-product: x rows per work item, at most

struct OuterPlan {
  int64_t rows_per_part, nparts, mrange, nmranges;
  int threads;
};

OuterPlan make_outer_plan(const Sparse24MatmulArgs& a, int num_threads, int64_t nr, int64_t mc) {
  OuterPlan p{};
  const double work = static_cast<double>(a.M) * static_cast<double>(a.N) * static_cast<double>(a.K / 2);
  int64_t t = std::max(1, num_threads);
  t = std::min<int64_t>(t, std::max<int64_t>(1, static_cast<int64_t>(work / kMinWorkPerThread)));
  const int64_t ntiles = (a.N + nr - 1) / nr;
  // One row range per thread (tables are built per range); x rows are split too when there
  // are fewer tiles than threads, or more than kMaxMRange rows.
  p.rows_per_part = (ntiles + t - 1) / t * nr;
  p.nparts = (a.N + p.rows_per_part - 1) / p.rows_per_part;
  p.mrange = std::min<int64_t>((a.M + mc - 1) / mc * mc, kMaxMRange);
  if (p.nparts < t) p.mrange = std::min(p.mrange, ((a.M + t - 1) / t + mc - 1) / mc * mc);
  p.nmranges = (a.M + p.mrange - 1) / p.mrange;
  p.threads = static_cast<int>(std::min<int64_t>(t, p.nparts * p.nmranges));
  return p;
}

// out[m0 + m, n] = c[(n - n0) * ldc + m] (+ bias[n]) for m < mrows, n in [n0, n1): 16 outputs
// of a row at a time from a 16-row block of c (L1-resident), so that out is written in order.
template <int OD, int BD>
void store_transposed_t(const Sparse24MatmulArgs& a, int64_t m0, int64_t mrows, int64_t n0, int64_t n1,
                        const float* c, int64_t ldc) {
  for (int64_t nb = n0; nb < n1; nb += 16) {
    const int64_t cnt = std::min<int64_t>(16, n1 - nb);
    float bias[16] = {};
    if (a.bias)
      for (int64_t j = 0; j < cnt; ++j) bias[j] = load_as_float(a.bias, nb + j, BD);
    const float* cb = c + (nb - n0) * ldc;
    for (int64_t m = 0; m < mrows; ++m) {
      const int64_t o = (m0 + m) * a.N + nb;
      for (int64_t j = 0; j < cnt; ++j) store_from_float(a.out, o + j, OD, cb[j * ldc + m] + bias[j]);
    }
  }
}

void store_transposed(const Sparse24MatmulArgs& a, int64_t m0, int64_t mrows, int64_t n0, int64_t n1,
                      const float* c, int64_t ldc) {
  using Fn = void (*)(const Sparse24MatmulArgs&, int64_t, int64_t, int64_t, int64_t, const float*, int64_t);
  static constexpr Fn table[3][3] = {
      {store_transposed_t<kFloat32, kFloat32>, store_transposed_t<kFloat32, kFloat16>,
       store_transposed_t<kFloat32, kBFloat16>},
      {store_transposed_t<kFloat16, kFloat32>, store_transposed_t<kFloat16, kFloat16>,
       store_transposed_t<kFloat16, kBFloat16>},
      {store_transposed_t<kBFloat16, kFloat32>, store_transposed_t<kBFloat16, kFloat16>,
       store_transposed_t<kBFloat16, kBFloat16>}};
  table[a.out_dtype][a.bias ? a.bias_dtype : kFloat32](a, m0, mrows, n0, n1, c, ldc);
}

// The driver, shared by the bf16 (XP) and fp32 (XT) kernels; GotoBLAS-like blocking. A work item
// is a range of weight rows and of x rows. For each K block of KP groups:
//   * the tables of every x block of the range and every KG-group sub-block are built (each
//     table fits L1; all of them L2/L3);
//   * the rows are packed kChunkTiles tiles at a time (the panel stays in L2 and is read once
//     per x block), and for each x block, kGroupTiles tiles at a time run over the sub-block
//     tables in turn: a table is loaded into L1 once per kGroupTiles tiles, and those tiles'
//     partial sums stay in L1 across the sub-blocks.
// Partial sums live in a per-thread [x block][rows][MC] buffer, read and written once per K block.
// K provides NR, MC, W, VBYTES, KG (groups per table), KP (groups per K block, a multiple of
// KG), WORDS (32-bit words of a packed entry), table_bytes(),
//   pack_row(a, n, g0, ng, uint32_t* dst) -> bool: row n's entries for groups [g0, g0 + ng),
//     word j of group g0 + g at dst[j * KP + g], slot offsets relative to the group's table
//     (group g0 + g is at (g % KG) in it); true if a table needs its extra slots;
//   build(a, m0, mrows, g0, ng, extra, table): the table of x rows [m0, m0 + mrows) and
//     groups [g0, g0 + ng);
//   tile(mv, panel, ng, table, c, first): one tile over ng groups (its row i at panel + i * WORDS * KP).
template <class K>
void run_outer(const Sparse24MatmulArgs& a, int num_threads) {
  static_assert(K::KP % K::KG == 0, "a K block holds whole tables");
  const OuterPlan p = make_outer_plan(a, num_threads, K::NR, K::MC);
  const int64_t rows_pad = p.rows_per_part + K::NR;
  const int64_t chunk_rows = kChunkTiles * K::NR;
  const int64_t max_mblocks = p.mrange / K::MC;
  constexpr int64_t kTables = K::KP / K::KG;
  constexpr int64_t kRowWords = K::WORDS * K::KP;
  struct Scratch {
    std::vector<uint32_t> panel;
    std::vector<uint8_t> tables;
    std::vector<float> cpart;
  };
  std::vector<Scratch> scratch(static_cast<size_t>(p.threads));
  for (Scratch& s : scratch) {
    s.panel.resize(static_cast<size_t>((chunk_rows + K::NR) * kRowWords));
    s.tables.resize(static_cast<size_t>(max_mblocks * kTables * K::table_bytes() + 64));
    s.cpart.resize(static_cast<size_t>(p.mrange * rows_pad));
  }
  const int64_t G = a.K / 4;
  parallel_for(p.nparts * p.nmranges, p.threads, [&](int64_t task, int thread) {
    Scratch& s = scratch[static_cast<size_t>(thread)];
    const int64_t n_begin = (task % p.nparts) * p.rows_per_part;
    const int64_t n_end = std::min(a.N, n_begin + p.rows_per_part);
    const int64_t m_begin = (task / p.nparts) * p.mrange;
    const int64_t m_end = std::min(a.M, m_begin + p.mrange);
    const int64_t mblocks = (m_end - m_begin + K::MC - 1) / K::MC;
    const int64_t rows = n_end - n_begin;
    uint8_t* tables = s.tables.data() + ((64 - reinterpret_cast<uintptr_t>(s.tables.data()) % 64) % 64);
    auto table_at = [&](int64_t mb, int64_t tb) { return tables + (mb * kTables + tb) * K::table_bytes(); };
    for (int64_t gp = 0; gp < G; gp += K::KP) {
      const int64_t npg = std::min<int64_t>(K::KP, G - gp);
      const int64_t ntab = (npg + K::KG - 1) / K::KG;
      auto build_all = [&](bool extra) {
        for (int64_t mb = 0; mb < mblocks; ++mb) {
          const int64_t m0 = m_begin + mb * K::MC;
          for (int64_t tb = 0; tb < ntab; ++tb)
            K::build(a, m0, std::min<int64_t>(K::MC, m_end - m0), gp + tb * K::KG,
                     std::min<int64_t>(K::KG, npg - tb * K::KG), extra, table_at(mb, tb));
        }
      };
      build_all(false);
      bool tables_extra = false;
      for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
        const int64_t tiles = (std::min(chunk_rows, rows - r0) + K::NR - 1) / K::NR;
        bool extra = false;
        for (int64_t row = 0; row < tiles * K::NR; ++row) {
          if (r0 + row + kPackPrefetchRows < rows)
            prefetch_row(a, K::VBYTES, n_begin + r0 + row + kPackPrefetchRows, gp, npg);
          const int64_t n = std::min(n_begin + r0 + row, n_end - 1);  // a short last tile repeats its last row
          extra |= K::pack_row(a, n, gp, npg, s.panel.data() + row * kRowWords);
        }
        if (extra && !tables_extra) {  // illegal nibbles: fill in the extra slots of this block's tables
          build_all(true);
          tables_extra = true;
        }
        // The rows the next packing step reads: the next chunk, or the first of the next K block.
        const bool last_chunk = r0 + chunk_rows >= rows;
        const int64_t next_n = n_begin + (last_chunk ? 0 : r0 + chunk_rows);
        const int64_t next_g = last_chunk ? gp + K::KP : gp;
        const int64_t next_ng = std::min<int64_t>(K::KP, G - next_g);
        // (With one x block the tiles are too short to hide it, and the lines would crowd out
        // the panel and tables: then packing prefetches for itself.)
        const int64_t next_rows = next_g >= G || mblocks == 1 ? 0 : std::min(chunk_rows, n_end - next_n);
        for (int64_t mb = 0; mb < mblocks; ++mb) {
          const int64_t mrows = std::min<int64_t>(K::MC, m_end - m_begin - mb * K::MC);
          const int mv = static_cast<int>((mrows + K::W - 1) / K::W);
          float* c = s.cpart.data() + (mb * rows_pad + r0) * K::MC;  // [x block][row][MC]
          // While the tiles compute, bring the weights the next packing step reads into L2
          // (packing reads short runs of many rows: latency-bound unless prefetched).
          const int64_t steps = mblocks * ((tiles + kGroupTiles - 1) / kGroupTiles);
          const int64_t per_step = (next_rows + steps - 1) / steps;
          for (int64_t t0 = 0; t0 < tiles; t0 += kGroupTiles) {
            const int64_t t1 = std::min(tiles, t0 + kGroupTiles);
            const int64_t step = mb * ((tiles + kGroupTiles - 1) / kGroupTiles) + t0 / kGroupTiles;
            for (int64_t r = step * per_step; r < std::min(next_rows, (step + 1) * per_step); ++r)
              prefetch_row<_MM_HINT_T1>(a, K::VBYTES, next_n + r, next_g, next_ng);
            for (int64_t tb = 0; tb < ntab; ++tb) {
              const int64_t ng = std::min<int64_t>(K::KG, npg - tb * K::KG);
              const uint8_t* table = table_at(mb, tb);
              for (int64_t t = t0; t < t1; ++t)
                K::tile(mv, s.panel.data() + t * K::NR * kRowWords + tb * K::KG, ng, table, c + t * K::NR * K::MC,
                        gp == 0 && tb == 0);
            }
          }
        }
      }
    }
    for (int64_t mb = 0; mb < mblocks; ++mb) {
      const int64_t m0 = m_begin + mb * K::MC;
      store_transposed(a, m0, std::min<int64_t>(K::MC, m_end - m0), n_begin, n_end,
                       s.cpart.data() + mb * rows_pad * K::MC, K::MC);
    }
  });
}

#if defined(LOWBIT_S24_AVX512)
struct VecF {
  using T = __m512;
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const void* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T bcast(const float* p) { return _mm512_set1_ps(*p); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
};
#else
struct VecF {
  using T = __m256;
  static constexpr int W = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const void* p) { return _mm256_loadu_ps(static_cast<const float*>(p)); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
};
#endif

constexpr int64_t kXtMinM = 16;  // fp32 math: the gather kernel is faster below this M

// fp32 math: XT[c][m] = x[m0 + m, 4 g0 + c] (x transposed, as fp32); an entry holds the byte
// offsets of the two columns a group uses and its two values, widened to fp32.
template <int XD, int VD>
struct XtKernel {
  static constexpr int W = VecF::W;
  static constexpr int MV = 4;  // vectors of x rows per micro-tile
#if defined(LOWBIT_S24_AVX512)
  static constexpr int NR = 6;  // 6 x 4 accumulators of 32 registers
#else
  static constexpr int NR = 3;  // 3 x 4 accumulators of 16 registers
#endif
  static constexpr int64_t MC = MV * W;
  static constexpr int64_t KG = 16;   // groups per table: 64 columns x MC rows of fp32 (16 KiB with AVX-512)
  static constexpr int64_t KP = 128;  // groups per K block
  static constexpr int VBYTES = VD == kFloat32 ? 4 : 2;
  static constexpr int WORDS = 4;  // offsets of the two columns (bytes), the two values (fp32)
  static int64_t table_bytes() { return 4 * KG * MC * 4; }

  static bool pack_row(const Sparse24MatmulArgs& a, int64_t n, int64_t g0, int64_t ng, uint32_t* dst) {
    const uint8_t* mp = a.meta + n * (a.K / 8) + g0 / 2;
    const int64_t voff = n * (a.K / 2) + 2 * g0;
    float* v0 = reinterpret_cast<float*>(dst + 2 * KP);
    float* v1 = reinterpret_cast<float*>(dst + 3 * KP);
    for (int64_t g = 0; g < ng; ++g) {
      const unsigned nib = (mp[g >> 1] >> ((g & 1) * 4)) & 15u;
      const int64_t gl = g % KG;  // the group's place in its table
      dst[g] = static_cast<uint32_t>((4 * gl + (nib & 3u)) * MC * 4);
      dst[KP + g] = static_cast<uint32_t>((4 * gl + (nib >> 2)) * MC * 4);
      v0[g] = load_as_float(a.values, voff + 2 * g, VD);
      v1[g] = load_as_float(a.values, voff + 2 * g + 1, VD);
    }
    return false;
  }

  // XT[c][m] = x[m0 + m, 4 g0 + c] as fp32 (rows past M stay as they were: never stored).
  static void build(const Sparse24MatmulArgs& a, int64_t m0, int64_t mrows, int64_t g0, int64_t ng, bool,
                    uint8_t* table) {
    float* xt = reinterpret_cast<float*>(table);
    for (int64_t m = 0; m < mrows; ++m) {
      const int64_t base = (m0 + m) * a.x_row_stride + 4 * g0;
      for (int64_t c = 0; c < 4 * ng; ++c) xt[c * MC + m] = load_as_float(a.x, base + c, XD);
    }
  }

  template <int V>
  static void tile_mv(const uint32_t* panel, int64_t ng, const uint8_t* xt, float* c, bool first) {
    typename VecF::T acc[NR][V];
    for (int i = 0; i < NR; ++i)
      for (int r = 0; r < V; ++r) acc[i][r] = first ? VecF::zero() : VecF::load(c + i * MC + r * W);
    for (int64_t g = 0; g < ng; ++g) {
#pragma GCC unroll 6
      for (int i = 0; i < NR; ++i) {
        const uint32_t* e = panel + i * WORDS * KP + g;
        const uint8_t* p0 = xt + e[0];
        const uint8_t* p1 = xt + e[KP];
        const typename VecF::T w0 = VecF::bcast(reinterpret_cast<const float*>(e + 2 * KP));
        const typename VecF::T w1 = VecF::bcast(reinterpret_cast<const float*>(e + 3 * KP));
#pragma GCC unroll 4
        for (int r = 0; r < V; ++r) acc[i][r] = VecF::fma(VecF::load(p0 + 4 * W * r), w0, acc[i][r]);
#pragma GCC unroll 4
        for (int r = 0; r < V; ++r) acc[i][r] = VecF::fma(VecF::load(p1 + 4 * W * r), w1, acc[i][r]);
      }
    }
    for (int i = 0; i < NR; ++i)
      for (int r = 0; r < V; ++r) VecF::store(c + i * MC + r * W, acc[i][r]);
  }

  static void tile(int mv, const uint32_t* e, int64_t ng, const uint8_t* xt, float* c, bool first) {
    switch (mv) {
      case 1: tile_mv<1>(e, ng, xt, c, first); break;
      case 2: tile_mv<2>(e, ng, xt, c, first); break;
      case 3: tile_mv<3>(e, ng, xt, c, first); break;
      default: tile_mv<4>(e, ng, xt, c, first); break;
    }
  }
};
#endif  // outer-product fp32

#if defined(LOWBIT_S24_BF16)
constexpr int64_t kXpMinM = 32;  // bf16 math: the gather kernel is faster below this M

// Nibble -> slot of the XP table: the six legal pairs first (i0 < i1, in the format's order
// 4, 8, 12, 9, 13, 14), then the ten illegal nibbles, built only when a block holds one.
constexpr uint8_t kXpSlotOfNibble[16] = {6, 7, 8, 9, 0, 10, 11, 12, 1, 3, 13, 14, 2, 4, 5, 15};
constexpr uint8_t kXpNibbleOfSlot[16] = {4, 8, 12, 9, 13, 14, 0, 1, 2, 3, 5, 6, 7, 10, 11, 15};
constexpr int kXpLegalSlots = 6;

// vpermt2w indices over a 64-word table of 16 rows' quads (row m at words 4m..4m+3): dword m of
// slot s = words (4m + (nib & 3), 4m + (nib >> 2)) of the slot's nibble.
struct XpPick {
  alignas(64) uint16_t w[16][32];
};
constexpr XpPick make_xp_pick() {
  XpPick p{};
  for (int s = 0; s < 16; ++s) {
    const int nib = kXpNibbleOfSlot[s];
    for (int m = 0; m < 16; ++m) {
      p.w[s][2 * m] = static_cast<uint16_t>(4 * m + (nib & 3));
      p.w[s][2 * m + 1] = static_cast<uint16_t>(4 * m + (nib >> 2));
    }
  }
  return p;
}
alignas(64) constexpr XpPick kPick = make_xp_pick();

// pack_row's tables, by nibble: the slot's byte offset in a table's group 0 (legal slots in
// [KG][6], illegal ones in [KG][10] after them), and all-ones for an illegal nibble.
struct XpPackTables {
  alignas(64) uint32_t base[16];
  alignas(64) uint32_t illegal[16];
};
constexpr XpPackTables make_xp_pack_tables(int64_t slot_bytes, int64_t extra_base) {
  XpPackTables t{};
  for (int nib = 0; nib < 16; ++nib) {
    const int s = kXpSlotOfNibble[nib];
    const bool legal = s < kXpLegalSlots;
    t.base[nib] = static_cast<uint32_t>(legal ? s * slot_bytes : extra_base + (s - kXpLegalSlots) * slot_bytes);
    t.illegal[nib] = legal ? 0u : ~0u;
  }
  return t;
}

// bf16 math: XP[g][slot][m] (dword) = the bf16 pair (x[m0 + m, 4(g0 + g) + (nib & 3)],
// x[.., 4(g0 + g) + (nib >> 2)]) of the slot's nibble; legal slots [KG][6][MC] first, the
// illegal ones [KG][10][MC] after. An entry holds the slot's byte offset and the value pair
// (one dword of `values`): a stored pair times 16 x rows is one vdpbf16ps.
struct XpKernel {
  static constexpr int W = 16;
  static constexpr int MV = 4;   // zmm of 16 x rows per micro-tile
  static constexpr int NR = 6;   // weight rows per micro-tile: 6 x 4 accumulators
  static constexpr int64_t MC = MV * W;
  static constexpr int64_t KG = 16;   // groups per table: 24 KiB of legal slots, L1-resident
  static constexpr int64_t KP = 128;  // groups per K block
  static constexpr int VBYTES = 2;
  static constexpr int64_t SLOT = MC * 4;
  static constexpr int64_t EXTRA_BASE = KG * kXpLegalSlots * SLOT;
  static constexpr XpPackTables kXpPack = make_xp_pack_tables(SLOT, EXTRA_BASE);
  static constexpr int WORDS = 2;  // byte offset of the slot, the value pair
  static int64_t table_bytes() { return KG * 16 * SLOT; }

  // Vectorized, 16 groups per step, no mask registers (slow on AMD): the nibbles of 8 meta
  // bytes widened to dwords index 16-entry tables (vpermd) of the slot offset and of whether
  // the nibble is illegal; offset = base[nib] + g * 6 * SLOT (+ g * 4 * SLOT if illegal).
  static bool pack_row(const Sparse24MatmulArgs& a, int64_t n, int64_t g0, int64_t ng, uint32_t* dst) {
    static_assert(KG % 16 == 0 && (KG & (KG - 1)) == 0 && KP % 16 == 0, "pack_row works in steps of 16 groups");
    const uint8_t* mp = a.meta + n * (a.K / 8) + g0 / 2;
    const uint8_t* vp = static_cast<const uint8_t*>(a.values) + n * a.K + 4 * g0;  // K/2 bf16 = K bytes a row
    const __m512i base = _mm512_load_si512(kXpPack.base);
    const __m512i illegal = _mm512_load_si512(kXpPack.illegal);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i legal_step = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(kXpLegalSlots * SLOT)));
    const __m512i extra_step = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>((16 - 2 * kXpLegalSlots) * SLOT)));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m512i any = _mm512_setzero_si512();
    for (int64_t g = 0; g < ng; g += 16) {
      const int64_t cnt = std::min<int64_t>(16, ng - g);  // even
      __m128i mb;
      __m512i pairs;
      if (cnt == 16) {
        mb = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mp + g / 2));
        pairs = _mm512_loadu_si512(vp + 4 * g);
      } else {  // the row's last groups: read no further than the row
        mb = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << (cnt / 2)) - 1u), mp + g / 2);
        pairs = _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << cnt) - 1u), vp + 4 * g);
      }
      const __m128i nib8 = _mm_unpacklo_epi8(_mm_and_si128(mb, low4), _mm_and_si128(_mm_srli_epi16(mb, 4), low4));
      const __m512i nib = _mm512_cvtepu8_epi32(nib8);  // groups g..g+15, in order (0 past cnt)
      __m512i bad = _mm512_permutexvar_epi32(nib, illegal);
      // (g % KG) is 0 here: KG is a multiple of 16, so lane l is group l of its table.
      __m512i off = _mm512_add_epi32(_mm512_permutexvar_epi32(nib, base), legal_step);
      off = _mm512_add_epi32(off, _mm512_and_si512(bad, extra_step));
      if (cnt < 16) bad = _mm512_maskz_mov_epi32(static_cast<__mmask16>((1u << cnt) - 1u), bad);
      any = _mm512_or_si512(any, bad);
      // Full-width stores (a panel row has room for KP groups; entries past ng are never read).
      _mm512_storeu_si512(dst + g, off);
      _mm512_storeu_si512(dst + KP + g, pairs);
    }
    return _mm512_test_epi32_mask(any, any) != 0;
  }

  // For each 16-row block of x: the 4 x values of a group for the 16 rows are gathered as 16
  // qwords (two zmm = a 64-word table, row m at words 4m..4m+3), then one vpermt2w per slot
  // pairs them up.
  static void build(const Sparse24MatmulArgs& a, int64_t m0, int64_t mrows, int64_t g0, int64_t ng, bool extra,
                    uint8_t* table) {
    const char* x = static_cast<const char*>(a.x);
    const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i row_bytes = _mm512_set1_epi64(a.x_row_stride * 2);
    for (int64_t mm = 0; mm < mrows; mm += 16) {
      const int64_t valid = std::min<int64_t>(16, mrows - mm);
      const __mmask8 mlo = static_cast<__mmask8>(valid >= 8 ? 0xFF : (1u << valid) - 1u);
      const __mmask8 mhi = static_cast<__mmask8>(valid <= 8 ? 0 : (1u << (valid - 8)) - 1u);
      // Masked-off lanes may hold row offsets past M: those addresses are never touched.
      const __m512i off_lo = _mm512_mullo_epi64(_mm512_add_epi64(lane, _mm512_set1_epi64(m0 + mm)), row_bytes);
      const __m512i off_hi = _mm512_mullo_epi64(_mm512_add_epi64(lane, _mm512_set1_epi64(m0 + mm + 8)), row_bytes);
      for (int64_t g = 0; g < ng; ++g) {
        const char* col = x + 8 * (g0 + g);
        const __m512i tlo = _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), mlo, off_lo, col, 1);
        const __m512i thi = _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), mhi, off_hi, col, 1);
        uint8_t* dst = table + g * kXpLegalSlots * SLOT + mm * 4;
#pragma GCC unroll 6
        for (int s = 0; s < kXpLegalSlots; ++s)
          _mm512_storeu_si512(dst + s * SLOT, _mm512_permutex2var_epi16(tlo, _mm512_load_si512(kPick.w[s]), thi));
        if (extra) {
          uint8_t* ex = table + EXTRA_BASE + g * (16 - kXpLegalSlots) * SLOT + mm * 4;
          for (int s = kXpLegalSlots; s < 16; ++s)
            _mm512_storeu_si512(ex + (s - kXpLegalSlots) * SLOT,
                                _mm512_permutex2var_epi16(tlo, _mm512_load_si512(kPick.w[s]), thi));
        }
      }
    }
  }

  template <int V>
  static void tile_mv(const uint32_t* panel, int64_t ng, const uint8_t* xp, float* c, bool first) {
    __m512 acc[NR][V];
    for (int i = 0; i < NR; ++i)
      for (int r = 0; r < V; ++r) acc[i][r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * MC + 16 * r);
    for (int64_t g = 0; g < ng; ++g) {
#pragma GCC unroll 6
      for (int i = 0; i < NR; ++i) {
        const uint32_t* e = panel + i * WORDS * KP + g;
        const uint8_t* p = xp + e[0];
        const __m512i w = _mm512_set1_epi32(static_cast<int>(e[KP]));
#pragma GCC unroll 4
        for (int r = 0; r < V; ++r)
          acc[i][r] = _mm512_dpbf16_ps(acc[i][r], as_bh(_mm512_loadu_si512(p + 64 * r)), as_bh(w));
      }
    }
    for (int i = 0; i < NR; ++i)
      for (int r = 0; r < V; ++r) _mm512_storeu_ps(c + i * MC + 16 * r, acc[i][r]);
  }

  static void tile(int mv, const uint32_t* e, int64_t ng, const uint8_t* xp, float* c, bool first) {
    switch (mv) {
      case 1: tile_mv<1>(e, ng, xp, c, first); break;
      case 2: tile_mv<2>(e, ng, xp, c, first); break;
      case 3: tile_mv<3>(e, ng, xp, c, first); break;
      default: tile_mv<4>(e, ng, xp, c, first); break;
    }
  }
};
#endif  // LOWBIT_S24_BF16

// ------------------------------------------------------------------------------------------

// x rows as fp32 row pointers: x itself if fp32, else a converted copy in `buf`.
std::vector<const float*> fp32_rows(const Sparse24MatmulArgs& a, std::vector<float>& buf) {
  std::vector<const float*> rows(static_cast<size_t>(a.M));
  if (a.x_dtype == kFloat32) {
    for (int64_t m = 0; m < a.M; ++m) rows[m] = static_cast<const float*>(a.x) + m * a.x_row_stride;
    return rows;
  }
  buf.resize(static_cast<size_t>(a.M * a.K));
  for (int64_t m = 0; m < a.M; ++m) {
    float* dst = buf.data() + m * a.K;
    const uint16_t* src = static_cast<const uint16_t*>(a.x) + m * a.x_row_stride;
    if (a.x_dtype == kFloat16) {
      for (int64_t k = 0; k < a.K; ++k) dst[k] = half_to_float(src[k]);
    } else {
      for (int64_t k = 0; k < a.K; ++k) dst[k] = bf16_to_float(src[k]);
    }
    rows[m] = dst;
  }
  return rows;
}

template <int VD>
void run_f32_math(const Sparse24MatmulArgs& a, int num_threads) {
#if defined(LOWBIT_S24_AVX512) || defined(LOWBIT_S24_AVX2)
  if (a.M >= kXtMinM) {
    switch (a.x_dtype) {
      case kFloat32: run_outer<XtKernel<kFloat32, VD>>(a, num_threads); return;
      case kFloat16: run_outer<XtKernel<kFloat16, VD>>(a, num_threads); return;
      default: run_outer<XtKernel<kBFloat16, VD>>(a, num_threads); return;
    }
  }
#endif
  std::vector<float> buf;
  const std::vector<const float*> rows = fp32_rows(a, buf);
  run_gather_f32<VD>(a, num_threads, rows.data());
}

}  // namespace

void LOWBIT_ISA_FN(sparse24_matmul_kernel)(const Sparse24MatmulArgs& a, int num_threads) {
  // All allocation happens here and in the run_* set-up, on the calling thread (a bad_alloc
  // becomes MemoryError); the tasks only compute and cannot throw.
#if defined(LOWBIT_S24_BF16)
  if (a.x_dtype == kBFloat16 && a.values_dtype == kBFloat16) {
    if (a.M >= kXpMinM) {
      run_outer<XpKernel>(a, num_threads);
      return;
    }
    std::vector<const uint16_t*> rows(static_cast<size_t>(a.M));
    for (int64_t m = 0; m < a.M; ++m) rows[m] = static_cast<const uint16_t*>(a.x) + m * a.x_row_stride;
    run_gather(a, num_threads, rows.data(),
               [&](const int64_t* r, const uint16_t* const* xr, int R, float(*out)[kMR]) {
                 DispatchR<GatherTileBf16, kBFloat16>::run(R, a, r, xr, out);
               });
    return;
  }
#endif
  switch (a.values_dtype) {
    case kFloat32: run_f32_math<kFloat32>(a, num_threads); break;
    case kFloat16: run_f32_math<kFloat16>(a, num_threads); break;
    default: run_f32_math<kBFloat16>(a, num_threads); break;
  }
}

}  // namespace cpu
}  // namespace lowbit
