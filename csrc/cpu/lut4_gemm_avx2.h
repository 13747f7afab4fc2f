// The AVX2 + FMA GEMM of lut4_core.h (M above the GEMV sizes): an outer-product micro-kernel,
// float32 products for every activation dtype (AVX2 has no bfloat16 dot product).
//
//   C^T[n, m] += sum_k W[n, k] x[m, k]  for a tile of 6 weight rows x 16 x rows:
//   per k, two ymm of x (16 rows) are loaded from a transposed x panel, each of the 6 weights is
//   broadcast from the decoded rows (vbroadcastss, a load), and 12 FMAs update 12 ymm
//   accumulators that stay in registers for the whole K block (the classic 6 x 16 sgemm tile:
//   12 accumulators + 2 x vectors + 1 broadcast = 15 of the 16 ymm). A last x block of <= 8
//   rows uses one ymm of x against 12 weight rows (still 12 accumulators).
//
// The weights are decoded in their natural row order (no transpose) into a float32 panel of
// kAvx2NC rows x KC columns (96 KiB, L2); x, M x K and read once per call, is transposed into
// panels of 16 rows: xpanel[block][k][0..15] = x[16 block + 0..15][k]. A task is a tile of
// kAvx2NC weight rows x up to kMC x rows; per K block it decodes its rows once and runs every
// 16-row x block against them (the x slice, 16 KiB, stays in L1 across the 16 weight tiles).
// Same structure as the AVX-512 GEMM (lut4_gemm_avx512.h).
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

constexpr int64_t kAvx2MB = 16;  // x rows per panel block (two ymm; a last block of <= 8 rows uses one)
constexpr int64_t kAvx2NC = 96;  // weight rows per task: a multiple of both tiles' 6 and 12

// 8 x 8 transpose of floats: r[i] holds row i on entry, column i on exit.
inline void transpose8(__m256 (&r)[8]) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// dst[d * 16 + j] = src row j (j < rows, else 0), element d, for d in [d0, d0 + 8); src rows
// start every `stride` floats.
inline void avx2_xpanel_block(const float* src, int64_t stride, int64_t rows, int64_t d0, float* dst) {
  for (int half = 0; half < 2; ++half) {
    __m256 r[8];
    for (int j = 0; j < 8; ++j) {
      const int64_t row = 8 * half + j;
      r[j] = row < rows ? _mm256_loadu_ps(src + row * stride + d0) : _mm256_setzero_ps();
    }
    transpose8(r);
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (d0 + i) * kAvx2MB + 8 * half, r[i]);
  }
}

// Weight rows per micro-tile for MW ymm (8 MW rows) of x: 12 accumulators.
template <int MW>
constexpr int avx2_outer_nr() {
  return MW == 2 ? 6 : 12;
}

// c[i * cs + 8 h + l] += sum_d w[i * ws + d] * x[d * 16 + 8 h + l]  for i < avx2_outer_nr<MW>.
template <int MW>
inline void avx2_outer_micro(const float* x, const float* w, int64_t ws, int64_t nd, float* c, int64_t cs) {
  constexpr int NR = avx2_outer_nr<MW>();
  __m256 acc[NR][MW];
  for (int i = 0; i < NR; ++i)
    for (int h = 0; h < MW; ++h) acc[i][h] = _mm256_setzero_ps();
  for (int64_t d = 0; d < nd; ++d) {
    __m256 xv[MW];
    for (int h = 0; h < MW; ++h) xv[h] = _mm256_loadu_ps(x + d * kAvx2MB + 8 * h);
    for (int i = 0; i < NR; ++i) {
      const __m256 wv = _mm256_broadcast_ss(w + i * ws + d);
      for (int h = 0; h < MW; ++h) acc[i][h] = _mm256_fmadd_ps(wv, xv[h], acc[i][h]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int h = 0; h < MW; ++h)
      _mm256_storeu_ps(c + i * cs + 8 * h, _mm256_add_ps(_mm256_loadu_ps(c + i * cs + 8 * h), acc[i][h]));
}

// Decodes rows [0, nr) (row j = weight row n0 + j), columns [kb, kb + kc) of a fast layout into
// panel[j * kc + (k - kb)], natural order, from the rows' float32 segment scales and zeros
// (S, Z: [nr][nseg], Format::row_scales).
template <class F>
void avx2_decode_rows_fast(const F& f, const float* S, const float* Z, int64_t nseg, int64_t L, int64_t n0,
                           int64_t nr, int64_t kb, int64_t kc, float* panel) {
  alignas(32) float lut[16];
  for (int64_t j = 0; j < nr; ++j) {
    const uint8_t* q = f.q + (((n0 + j) * f.K) >> 1);
    const float* s = S + j * nseg;
    const float* z = Z + j * nseg;
    float* dst = panel + j * kc - kb;
    for (int64_t k = kb, g = kb / L; k < kb + kc; ++g) {
      const int64_t end = std::min((g + 1) * L, kb + kc);
      const Lut16 t = segment_lut(f, s[g], F::kHasZero ? z[g] : 0.0f);
      _mm256_store_ps(lut, t.lo);
      _mm256_store_ps(lut + 8, t.hi);
      decode_run<F::kHighFirst>(q + (k >> 1), lut, (end - k) / 32, dst + k);
      k = end;
    }
  }
}

// float32 -> bfloat16 bits in the low 128 bits, round to nearest even, NaN kept a quiet NaN
// (as float_to_bf16).
inline __m128i avx2_cvt_bf16(__m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40));
  r = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(qnan), _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m256i p = _mm256_packus_epi32(r, r);  // r0..3 r0..3 | r4..7 r4..7
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(p, 0x08));
}

// out[m0 + i, n0 + j] = ct[j * cs + i] + bias[j] for i < mc, j < nc (ct is C^T), in the output
// dtype: 8 x 8 blocks transposed in registers, edges one element at a time.
inline void avx2_store_ctile(const Lut4Io& io, const float* ct, int64_t cs, const float* bias, int64_t m0,
                             int64_t mc, int64_t n0, int64_t nc) {
  const int64_t mv = mc / 8 * 8, nv = nc / 8 * 8;
  for (int64_t i = 0; i < mv; i += 8) {
    for (int64_t j = 0; j < nv; j += 8) {
      __m256 r[8];
      for (int t = 0; t < 8; ++t) r[t] = _mm256_loadu_ps(ct + (j + t) * cs + i);
      transpose8(r);  // r[t] = row m0 + i + t, columns n0 + j .. + 7
      const __m256 b = _mm256_loadu_ps(bias + j);
      for (int t = 0; t < 8; ++t) {
        const __m256 y = _mm256_add_ps(r[t], b);
        const int64_t o = (m0 + i + t) * io.N + n0 + j;
        if (io.out_dtype == kFloat32) {
          _mm256_storeu_ps(static_cast<float*>(io.out) + o, y);
        } else if (io.out_dtype == kBFloat16) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(io.out) + o), avx2_cvt_bf16(y));
        } else {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(io.out) + o),
                           _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
      }
    }
  }
  for (int64_t i = 0; i < mc; ++i)
    for (int64_t j = (i < mv ? nv : 0); j < nc; ++j)
      store_from_float(io.out, (m0 + i) * io.N + n0 + j, io.out_dtype, ct[j * cs + i] + bias[j]);
}

struct Avx2OuterScratch {
  std::vector<float> panel;   // [kAvx2NC][KC] decoded weights (rows past N zero)
  std::vector<float> ctile;   // [kAvx2NC][MC] C^T
  std::vector<float> scales;  // [kAvx2NC][nseg] segment scales, then [kAvx2NC][nseg] zeros (fast layouts)
  std::vector<float> bias;    // [kAvx2NC]
};

// float32 products for every activation dtype; T must be float.
template <class F, class T>
void run_gemm_outer(const F& f, const Lut4Io& io, bool fast, int num_threads) {
  static_assert(sizeof(T) == 4, "the AVX2 GEMM computes in float32");
  const int64_t M = io.M, N = io.N, K = io.K;
  const int64_t Kp = round_up(K, 32);
  const double work = static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
  const int threads = threads_for(work, kMinWorkPerThread, num_threads);

  // x as float32 with Kp columns (in place when it already is), then transposed.
  const float* xsrc = static_cast<const float*>(io.x);
  int64_t xstride = io.x_row_stride;
  std::unique_ptr<float[]> xbuf_temp;
  if (io.x_dtype != kFloat32 || K != Kp) {
    float* xbuf = reused_scratch<0>(static_cast<size_t>(M * Kp), xbuf_temp);
    const int64_t rows = std::max<int64_t>(1, (1 << 16) / Kp);
    parallel_for((M + rows - 1) / rows, threads, [&](int64_t t, int) {
      for (int64_t m = t * rows; m < std::min(M, (t + 1) * rows); ++m) x_row_to_f32(io, m, Kp, xbuf + m * Kp);
    });
    xsrc = xbuf;
    xstride = Kp;
  }
  const int64_t mblocks = (M + kAvx2MB - 1) / kAvx2MB;
  std::unique_ptr<float[]> xpanel_temp;  // every element is written below
  float* const xpanel = reused_scratch<1>(static_cast<size_t>(mblocks * Kp * kAvx2MB), xpanel_temp);
  parallel_for(mblocks, threads, [&](int64_t b, int) {
    const float* src = xsrc + b * kAvx2MB * xstride;
    float* dst = xpanel + b * Kp * kAvx2MB;
    const int64_t rows = std::min(kAvx2MB, M - b * kAvx2MB);
    for (int64_t d = 0; d < Kp; d += 8) avx2_xpanel_block(src, xstride, rows, d, dst);
  });

  const int64_t KC = std::min<int64_t>(Kp, 256);  // x slice 16 KiB, panel 96 KiB
  const int64_t MC = round_up(std::min(M, kMC), kAvx2MB);
  const int64_t ntiles = (N + kAvx2NC - 1) / kAvx2NC, mtiles = (M + MC - 1) / MC;
  std::vector<Avx2OuterScratch> scratch(static_cast<size_t>(threads));
  const int64_t L = fast ? f.seg_len() : K, nseg = K / L;
  for (auto& s : scratch) {
    s.panel.assign(static_cast<size_t>(kAvx2NC * KC), 0.0f);
    s.ctile.resize(static_cast<size_t>(kAvx2NC * MC));
    s.scales.resize(static_cast<size_t>(fast ? 2 * kAvx2NC * nseg : 0));
    s.bias.resize(static_cast<size_t>(kAvx2NC));
  }
  parallel_for(ntiles * mtiles, threads, [&](int64_t t, int thread) {
    Avx2OuterScratch& s = scratch[static_cast<size_t>(thread)];
    const int64_t n0 = (t / mtiles) * kAvx2NC, nc = std::min(kAvx2NC, N - n0);
    const int64_t ncp = round_up(nc, 12);
    const int64_t m0 = (t % mtiles) * MC, mc = std::min(MC, M - m0);
    const int64_t mcp = round_up(mc, kAvx2MB);
    std::fill(s.ctile.begin(), s.ctile.begin() + ncp * MC, 0.0f);
    float* S = s.scales.data();
    float* Z = S + kAvx2NC * nseg;
    if (fast)
      for (int64_t j = 0; j < nc; ++j) f.row_scales(n0 + j, S + j * nseg, Z + j * nseg);
    for (int64_t kb = 0; kb < Kp; kb += KC) {
      const int64_t kcp = std::min(KC, Kp - kb);
      if (fast) {
        avx2_decode_rows_fast(f, S, Z, nseg, L, n0, nc, kb, kcp, s.panel.data());
      } else {
        decode_panel(f, false, n0, nc, kb, std::min(kcp, K - kb), kcp, s.panel.data());
      }
      std::fill(s.panel.begin() + nc * kcp, s.panel.begin() + ncp * kcp, 0.0f);
      // Fetch the next K block's codes (kAvx2NC short streams) while this one is multiplied.
      if (kb + KC < K) {
        const int64_t bytes = (std::min(KC, K - kb - KC) + 1) / 2;
        for (int64_t j = 0; j < nc; ++j) {
          const char* row = reinterpret_cast<const char*>(f.q + (((n0 + j) * K + kb + KC) >> 1));
          for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(row + o, _MM_HINT_T1);
        }
      }
      for (int64_t i = 0; i < mcp; i += kAvx2MB) {
        const float* xp = xpanel + ((m0 + i) / kAvx2MB * Kp + kb) * kAvx2MB;
        if (mc - i > 8) {
          for (int64_t j = 0; j < ncp; j += avx2_outer_nr<2>())
            avx2_outer_micro<2>(xp, s.panel.data() + j * kcp, kcp, kcp, s.ctile.data() + j * MC + i, MC);
        } else {
          for (int64_t j = 0; j < ncp; j += avx2_outer_nr<1>())
            avx2_outer_micro<1>(xp, s.panel.data() + j * kcp, kcp, kcp, s.ctile.data() + j * MC + i, MC);
        }
      }
    }
    for (int64_t j = 0; j < nc; ++j) s.bias[j] = io.bias ? load_as_float(io.bias, n0 + j, io.bias_dtype) : 0.0f;
    avx2_store_ctile(io, s.ctile.data(), MC, s.bias.data(), m0, mc, n0, nc);
  });
}

}  // namespace
}  // namespace cpu
}  // namespace lowbit
