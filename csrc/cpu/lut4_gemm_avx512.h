// The AVX-512 GEMM of lut4_core.h (M above the GEMV sizes): an outer-product micro-kernel.
//
//   C^T[n, m] += sum_k W[n, k] x[m, k]  for a tile of 8 weight rows x 32 x rows:
//   per k (float32) or k pair (bfloat16), two zmm of x (32 rows) are loaded from a transposed
//   x panel, each of the 8 weights (pairs) is broadcast from the decoded rows (a load, no
//   shuffle), and 16 FMAs / vdpbf16ps update 16 zmm accumulators that live in registers for the
//   whole K block. This runs at ~1.95 of the 2 vdpbf16ps a cycle (measured on L1 data), where
//   a dot-product tile (vectors along k, a horizontal sum per output) reaches ~1.4.
//
// The weights are decoded in their natural row order (decode_panel, no transpose); it is x,
// M x K and read once per call, that is transposed into panels of 32 rows:
// xpanel[block][d][0..31] = element d of rows 32 block + 0..31, where an element is one
// float32, or one bfloat16 pair (k = 2d, 2d + 1) as a 32-bit word. A task is a tile of kNC
// weight rows x up to kMC x rows; per K block of KC columns it decodes its kNC rows once
// (L2: 64 KiB) and runs every 32-row x block against them (the x panel slice, 32 KiB, stays
// in L1 across the 8 weight-row tiles).
//
// The driver (run_gemm_outer_src) takes its weight panels from a "panel source" policy: the
// lut4 formats (Lut4PanelSource, below) and 2:4 sparse rows (sparse24_dense_kernels.cpp).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace lowbit {
namespace cpu {
namespace {

constexpr int64_t kOuterMB = 32;  // x rows per panel block (two zmm; a last block of <= 16 rows uses one)

// 16 x 16 transpose of 32-bit elements: r[i] holds row i on entry, column i on exit.
inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit blocks: (0 4 8 12), (1 5 9 13), ...
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// dst[d * 32 + j] = src row j (j < rows, else 0), element d, for d in [d0, d0 + 16); 32-bit
// elements; src rows start every `stride` elements.
inline void xpanel_block(const uint32_t* src, int64_t stride, int64_t rows, int64_t d0, uint32_t* dst) {
  for (int half = 0; half < 2; ++half) {
    __m512i r[16];
    for (int j = 0; j < 16; ++j) {
      const int64_t row = 16 * half + j;
      r[j] = row < rows ? _mm512_loadu_si512(src + row * stride + d0) : _mm512_setzero_si512();
    }
    transpose16(r);
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (d0 + i) * kOuterMB + 16 * half, r[i]);
  }
}

// Weight rows per micro-tile for MW zmm (16 MW rows) of x: 16 accumulators.
template <int MW>
constexpr int outer_nr() {
  return MW == 2 ? 8 : 16;
}

// c[i * cs + j] += sum_d w[i * ws + d] * x[d * 32 + j]  for i < outer_nr<MW>, j < 16 MW (float32).
template <int MW>
inline void outer_micro(const float* x, const float* w, int64_t ws, int64_t nd, float* c, int64_t cs) {
  constexpr int NR = outer_nr<MW>();
  __m512 acc[NR][MW];
  for (int i = 0; i < NR; ++i)
    for (int h = 0; h < MW; ++h) acc[i][h] = _mm512_setzero_ps();
  for (int64_t d = 0; d < nd; ++d) {
    __m512 xv[MW];
    for (int h = 0; h < MW; ++h) xv[h] = _mm512_loadu_ps(x + d * kOuterMB + 16 * h);
    for (int i = 0; i < NR; ++i) {
      const __m512 wv = _mm512_set1_ps(w[i * ws + d]);
      for (int h = 0; h < MW; ++h) acc[i][h] = _mm512_fmadd_ps(wv, xv[h], acc[i][h]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int h = 0; h < MW; ++h)
      _mm512_storeu_ps(c + i * cs + 16 * h, _mm512_add_ps(_mm512_loadu_ps(c + i * cs + 16 * h), acc[i][h]));
}

#if defined(LOWBIT_LUT4_BF16_DOT)
// The same with bfloat16 pairs: w and x hold 2 * nd bfloat16 values (nd 32-bit words) per row.
template <int MW>
inline void outer_micro(const uint16_t* x, const uint16_t* w, int64_t ws, int64_t nd, float* c, int64_t cs) {
  constexpr int NR = outer_nr<MW>();
  __m512 acc[NR][MW];
  for (int i = 0; i < NR; ++i)
    for (int h = 0; h < MW; ++h) acc[i][h] = _mm512_setzero_ps();
  for (int64_t d = 0; d < nd; ++d) {
    __m512bh xv[MW];
    for (int h = 0; h < MW; ++h) xv[h] = as_bh(_mm512_loadu_si512(x + 2 * d * kOuterMB + 32 * h));
    for (int i = 0; i < NR; ++i) {
      int32_t pair;
      std::memcpy(&pair, w + i * ws + 2 * d, sizeof pair);
      const __m512bh wv = as_bh(_mm512_set1_epi32(pair));
      for (int h = 0; h < MW; ++h) acc[i][h] = _mm512_dpbf16_ps(acc[i][h], wv, xv[h]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int h = 0; h < MW; ++h)
      _mm512_storeu_ps(c + i * cs + 16 * h, _mm512_add_ps(_mm512_loadu_ps(c + i * cs + 16 * h), acc[i][h]));
}
#endif

// Decodes rows [0, nr) (row j = weight row n0 + j), columns [kb, kb + kc) of a fast layout into
// panel[j * kc + (k - kb)], natural order, from the rows' float32 segment scales and zeros
// (S, Z: [nr][nseg], Format::row_scales): no per-segment scalar work but two vector ops.
template <class F, class T>
void decode_rows_fast(const F& f, const float* S, const float* Z, int64_t nseg, int64_t L, int64_t n0, int64_t nr,
                      int64_t kb, int64_t kc, T* panel) {
  const __m512 table = _mm512_loadu_ps(f.table);
  alignas(64) float lut[16];
  for (int64_t j = 0; j < nr; ++j) {
    const uint8_t* q = f.q + (((n0 + j) * f.K) >> 1);
    const float* s = S + j * nseg;
    const float* z = Z + j * nseg;
    T* dst = panel + j * kc - kb;
    for (int64_t k = kb, g = kb / L; k < kb + kc; ++g) {
      const int64_t end = std::min((g + 1) * L, kb + kc);
      _mm512_store_ps(lut, segment_lut<F>(table, s[g], F::kHasZero ? z[g] : 0.0f));
      decode_run<F::kHighFirst>(q + (k >> 1), lut, (end - k) / 32, dst + k);
      k = end;
    }
  }
}

// float32 -> bfloat16 bits, round to nearest even, NaN kept a quiet NaN (as float_to_bf16).
inline __m256i cvt_bf16(__m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

// out[m0 + i, n0 + j] = ct[j * cs + i] + bias[j] for i < mc, j < nc (ct is C^T), in the output
// dtype: 16 x 16 blocks transposed in registers, edges one element at a time.
inline void store_ctile(const Lut4Io& io, const float* ct, int64_t cs, const float* bias, int64_t m0, int64_t mc,
                        int64_t n0, int64_t nc) {
  const int64_t mv = mc / 16 * 16, nv = nc / 16 * 16;
  for (int64_t i = 0; i < mv; i += 16) {
    for (int64_t j = 0; j < nv; j += 16) {
      __m512i r[16];
      for (int t = 0; t < 16; ++t) r[t] = _mm512_castps_si512(_mm512_loadu_ps(ct + (j + t) * cs + i));
      transpose16(r);  // r[t] = row m0 + i + t, columns n0 + j .. + 15
      const __m512 b = _mm512_loadu_ps(bias + j);
      for (int t = 0; t < 16; ++t) {
        const __m512 y = _mm512_add_ps(_mm512_castsi512_ps(r[t]), b);
        const int64_t o = (m0 + i + t) * io.N + n0 + j;
        if (io.out_dtype == kFloat32) {
          _mm512_storeu_ps(static_cast<float*>(io.out) + o, y);
        } else if (io.out_dtype == kBFloat16) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(io.out) + o), cvt_bf16(y));
        } else {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(io.out) + o),
                              _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
      }
    }
  }
  for (int64_t i = 0; i < mc; ++i)
    for (int64_t j = (i < mv ? nv : 0); j < nc; ++j)
      store_from_float(io.out, (m0 + i) * io.N + n0 + j, io.out_dtype, ct[j * cs + i] + bias[j]);
}

template <class T>
struct OuterScratch {
  std::vector<T> panel;      // [kNC][KC] decoded weights (rows past N zero)
  std::vector<float> ctile;  // [kNC][kMC] C^T
  std::vector<float> bias;   // [kNC]
};

// The GEMM driver, over a "panel source" Src that turns weight rows into dense panels of T
// (the lut4 formats below; sparse24_dense_kernels.cpp for 2:4 weights). Src provides
//   Tile: per-thread state, made on the calling thread by src.tile_scratch();
//   begin(Tile&, n0, nc): a task starts on weight rows [n0, n0 + nc) (nc <= kNC);
//   decode(Tile&, n0, nc, kb, kcp, T* panel): panel[j * kcp + (k - kb)] = W[n0 + j, k] for
//     k in [kb, kb + kcp), j < nc, zero for k >= K;
//   prefetch(n0, nc, kb, kc): bring columns [kb, kb + kc) of those rows towards L2 (called
//     while the block before is multiplied);
//   finish(Tile&, n0, nc, m0, mc, ct, cs): last changes to C^T (ct[j * cs + i] for x row
//     m0 + i) before it is stored.
// T: float (float32 products) or uint16_t (bfloat16 pairs; x must be bfloat16 then).
template <class T, class Src>
void run_gemm_outer_src(const Src& src, const Lut4Io& io, int num_threads) {
  constexpr int64_t E = 4 / sizeof(T);  // k values per 32-bit element
  const int64_t M = io.M, N = io.N, K = io.K;
  const int64_t Kp = round_up(K, 32), D = Kp / E;  // 32-bit elements per x row
  const double work = static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
  const int threads = threads_for(work, kMinWorkPerThread, num_threads);

  // x in the compute dtype with Kp columns (in place when it already is), then transposed.
  constexpr int want_dtype = sizeof(T) == 4 ? kFloat32 : kBFloat16;
  const T* xsrc = static_cast<const T*>(io.x);
  int64_t xstride = io.x_row_stride;
  std::unique_ptr<T[]> xbuf_temp;
  if (io.x_dtype != want_dtype || K != Kp || (xstride % E) != 0) {
    T* xbuf = reused_scratch<0>(static_cast<size_t>(M * Kp), xbuf_temp);
    const int64_t rows = std::max<int64_t>(1, (1 << 16) / Kp);
    parallel_for((M + rows - 1) / rows, threads, [&](int64_t t, int) {
      for (int64_t m = t * rows; m < std::min(M, (t + 1) * rows); ++m) {
        T* dst = xbuf + m * Kp;
        if constexpr (sizeof(T) == 4) {
          x_row_to_f32(io, m, Kp, dst);
        } else {
          std::memcpy(dst, static_cast<const T*>(io.x) + m * io.x_row_stride, static_cast<size_t>(K) * sizeof(T));
          std::fill(dst + K, dst + Kp, T(0));
        }
      }
    });
    xsrc = xbuf;
    xstride = Kp;
  }
  const int64_t mblocks = (M + kOuterMB - 1) / kOuterMB;
  std::unique_ptr<uint32_t[]> xpanel_temp;  // every element is written below
  uint32_t* const xpanel = reused_scratch<1>(static_cast<size_t>(mblocks * D * kOuterMB), xpanel_temp);
  {
    const int64_t dblocks = D / 16;  // Kp is a multiple of 32, so D of 16
    parallel_for(mblocks, threads, [&](int64_t b, int) {
      const uint32_t* src_rows = reinterpret_cast<const uint32_t*>(xsrc + b * kOuterMB * xstride);
      uint32_t* dst = xpanel + b * D * kOuterMB;
      const int64_t rows = std::min(kOuterMB, M - b * kOuterMB);
      for (int64_t db = 0; db < dblocks; ++db) xpanel_block(src_rows, xstride / E, rows, 16 * db, dst);
    });
  }

  // Measured at M = 512 (bf16): KC 1024, kMC 512 or 128 weight rows a task are within 3%
  // (noise) of these; KC 256 is ~5% slower.
  const int64_t KC = std::min(Kp, sizeof(T) == 4 ? int64_t{256} : int64_t{512});  // x slice 32 KiB
  const int64_t MC = round_up(std::min(M, kMC), kOuterMB);
  const int64_t ntiles = (N + kNC - 1) / kNC, mtiles = (M + MC - 1) / MC;
  std::vector<OuterScratch<T>> scratch(static_cast<size_t>(threads));
  std::vector<typename Src::Tile> tiles;
  tiles.reserve(static_cast<size_t>(threads));
  for (auto& s : scratch) {
    s.panel.assign(static_cast<size_t>(kNC * KC), T(0));
    s.ctile.resize(static_cast<size_t>(kNC * MC));
    s.bias.resize(static_cast<size_t>(kNC));
    tiles.push_back(src.tile_scratch());
  }
  parallel_for(ntiles * mtiles, threads, [&](int64_t t, int thread) {
    OuterScratch<T>& s = scratch[static_cast<size_t>(thread)];
    typename Src::Tile& st = tiles[static_cast<size_t>(thread)];
    const int64_t n0 = (t / mtiles) * kNC, nc = std::min(kNC, N - n0);
    const int64_t ncp = round_up(nc, 16);
    const int64_t m0 = (t % mtiles) * MC, mc = std::min(MC, M - m0);
    const int64_t mcp = round_up(mc, kOuterMB);
    std::fill(s.ctile.begin(), s.ctile.begin() + ncp * MC, 0.0f);
    src.begin(st, n0, nc);
    for (int64_t kb = 0; kb < Kp; kb += KC) {
      const int64_t kcp = std::min(KC, Kp - kb);
      src.decode(st, n0, nc, kb, kcp, s.panel.data());
      std::fill(s.panel.begin() + nc * kcp, s.panel.begin() + ncp * kcp, T(0));
      // A K block touches kNC rows x a short run of each: too many short streams for the
      // hardware prefetchers, so fetch the next block's weights while this one is multiplied.
      // (Src::kSpreadPrefetch: a few rows before each micro-tile of the first x block instead
      // of all at once, so that the misses do not queue up behind each other.)
      const bool pf = kb + KC < K;
      const int64_t pf_kc = pf ? std::min(KC, K - kb - KC) : 0;
      if (pf && !Src::kSpreadPrefetch) src.prefetch(n0, nc, kb + KC, pf_kc);
      for (int64_t i = 0; i < mcp; i += kOuterMB) {
        const T* xp = reinterpret_cast<const T*>(xpanel + ((m0 + i) / kOuterMB * D + kb / E) * kOuterMB);
        const bool pf_here = pf && Src::kSpreadPrefetch && i == 0;
        if (mc - i > 16) {
          for (int64_t j = 0; j < ncp; j += outer_nr<2>()) {
            if (pf_here && j < nc) src.prefetch(n0 + j, std::min<int64_t>(outer_nr<2>(), nc - j), kb + KC, pf_kc);
            outer_micro<2>(xp, s.panel.data() + j * kcp, kcp, kcp / E, s.ctile.data() + j * MC + i, MC);
          }
        } else {
          for (int64_t j = 0; j < ncp; j += outer_nr<1>()) {
            if (pf_here && j < nc) src.prefetch(n0 + j, std::min<int64_t>(outer_nr<1>(), nc - j), kb + KC, pf_kc);
            outer_micro<1>(xp, s.panel.data() + j * kcp, kcp, kcp / E, s.ctile.data() + j * MC + i, MC);
          }
        }
      }
    }
    src.finish(st, n0, nc, m0, mc, s.ctile.data(), MC);
    for (int64_t j = 0; j < nc; ++j) s.bias[j] = io.bias ? load_as_float(io.bias, n0 + j, io.bias_dtype) : 0.0f;
    store_ctile(io, s.ctile.data(), MC, s.bias.data(), m0, mc, n0, nc);
  });
}

// The lut4 formats as a panel source: fast layouts decode from the rows' segment scales
// (loaded once per task), any other layout element by element.
template <class F, class T>
struct Lut4PanelSource {
  static constexpr bool kSpreadPrefetch = false;
  const F& f;
  bool fast;
  int64_t L, nseg;

  struct Tile {
    std::vector<float> scales;  // [kNC][nseg] segment scales, then [kNC][nseg] zeros (fast layouts)
  };
  Tile tile_scratch() const {
    Tile t;
    t.scales.resize(static_cast<size_t>(fast ? 2 * kNC * nseg : 0));
    return t;
  }
  void begin(Tile& t, int64_t n0, int64_t nc) const {
    if (!fast) return;
    float* S = t.scales.data();
    float* Z = S + kNC * nseg;
    for (int64_t j = 0; j < nc; ++j) f.row_scales(n0 + j, S + j * nseg, Z + j * nseg);
  }
  void decode(Tile& t, int64_t n0, int64_t nc, int64_t kb, int64_t kcp, T* panel) const {
    if (fast) {
      const float* S = t.scales.data();
      decode_rows_fast(f, S, S + kNC * nseg, nseg, L, n0, nc, kb, kcp, panel);
    } else {
      decode_panel(f, false, n0, nc, kb, std::min(kcp, f.K - kb), kcp, panel);
    }
  }
  void prefetch(int64_t n0, int64_t nc, int64_t kb, int64_t kc) const {
    const int64_t bytes = (kc + 1) / 2;
    for (int64_t j = 0; j < nc; ++j) {
      const char* row = reinterpret_cast<const char*>(f.q + (((n0 + j) * f.K + kb) >> 1));
      for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(row + o, _MM_HINT_T1);
    }
  }
  void finish(Tile&, int64_t, int64_t, int64_t, int64_t, float*, int64_t) const {}
};

template <class F, class T>
void run_gemm_outer(const F& f, const Lut4Io& io, bool fast, int num_threads) {
  const int64_t L = fast ? f.seg_len() : io.K;
  run_gemm_outer_src<T>(Lut4PanelSource<F, T>{f, fast, L, io.K / L}, io, num_threads);
}

}  // namespace
}  // namespace cpu
}  // namespace lowbit
