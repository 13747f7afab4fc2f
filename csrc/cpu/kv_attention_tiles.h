// The register-tiled micro-kernels of the kv_attention CPU kernel: QK (kQkRows x kQkToks dot
// products at once, with the per-ISA reduction of store_dots) and p @ V (kPvRows rows x kPvVecs
// vectors of the accumulator).
//
// Part of kv_attention_kernels.cpp (compiled once per instruction set, see isa.h): include it
// only from there, inside its anonymous namespace, after kv_attention_vec.h and
// kv_attention_load.h. It includes nothing itself; the system headers are included by the .cpp
// before the namespace.
#pragma once

// Stores the NR x NT dot products of acc (lane sums) to s[r * s_stride + t].
template <int NR, int NT>
inline void store_dots(const Vec (&acc)[NR][NT], float* s, int64_t s_stride) {
#if defined(LOWBIT_KV_AVX512)
  if constexpr (NR == 4 && NT == 4) {
    // Transpose-reduce 16 vectors into one whose lane 4r + t is the sum of acc[r][t] (45
    // shuffles and adds instead of 16 full reductions). Inputs go in t-major order.
    __m512 a[8], b[4];
    for (int i = 0; i < 8; ++i) {
      const __m512 x = acc[(2 * i) % 4][(2 * i) / 4].v, y = acc[(2 * i + 1) % 4][(2 * i + 1) / 4].v;
      a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
    }
    for (int j = 0; j < 4; ++j) {
      b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x88),
                           _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xDD));
    }
    const __m512 c01 = _mm512_add_ps(_mm512_unpacklo_ps(b[0], b[1]), _mm512_unpackhi_ps(b[0], b[1]));
    const __m512 c23 = _mm512_add_ps(_mm512_unpacklo_ps(b[2], b[3]), _mm512_unpackhi_ps(b[2], b[3]));
    const __m512 sum = _mm512_add_ps(_mm512_shuffle_ps(c01, c23, 0x44), _mm512_shuffle_ps(c01, c23, 0xEE));
    _mm_storeu_ps(s, _mm512_extractf32x4_ps(sum, 0));
    _mm_storeu_ps(s + s_stride, _mm512_extractf32x4_ps(sum, 1));
    _mm_storeu_ps(s + 2 * s_stride, _mm512_extractf32x4_ps(sum, 2));
    _mm_storeu_ps(s + 3 * s_stride, _mm512_extractf32x4_ps(sum, 3));
    return;
  }
#elif defined(LOWBIT_KV_AVX2)
  if constexpr (NR == 4 && NT == 2) {
    // Lane 2r + t of the result is the sum of acc[r][t].
    const __m256 h0 = _mm256_hadd_ps(acc[0][0].v, acc[0][1].v), h1 = _mm256_hadd_ps(acc[1][0].v, acc[1][1].v);
    const __m256 h2 = _mm256_hadd_ps(acc[2][0].v, acc[2][1].v), h3 = _mm256_hadd_ps(acc[3][0].v, acc[3][1].v);
    const __m256 g0 = _mm256_hadd_ps(h0, h1), g1 = _mm256_hadd_ps(h2, h3);
    const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20), _mm256_permute2f128_ps(g0, g1, 0x31));
    alignas(32) float out[8];
    _mm256_store_ps(out, sum);
    for (int r = 0; r < 4; ++r) {
      s[r * s_stride] = out[2 * r];
      s[r * s_stride + 1] = out[2 * r + 1];
    }
    return;
  }
#endif
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) s[r * s_stride + t] = vsum(acc[r][t]);
}

// s[r * s_stride + t] = dot(q[r * Dp ...], K[t0 + t]) over [0, Dw) for r < NR, t < NT; q rows
// are zero past D.
template <int NR, int NT, class Rows>
inline void qk_tile(const Rows& k, int64_t t0, const float* q, int64_t Dp, int64_t Dw, float* s, int64_t s_stride) {
  constexpr int K = Rows::kVecs;
  Vec acc[NR][NT];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = vset1(0.0f);
  for (int64_t d = 0; d < Dw; d += K * W) {
    Vec kv[NT][K];
    for (int t = 0; t < NT; ++t) k.load(t0 + t, d, kv[t]);
    for (int j = 0; j < K; ++j) {
      for (int r = 0; r < NR; ++r) {
        const Vec qv = vload(q + r * Dp + d + j * W);
        for (int t = 0; t < NT; ++t) acc[r][t] = vfma(qv, kv[t][j], acc[r][t]);
      }
    }
  }
  store_dots<NR, NT>(acc, s, s_stride);
}

template <int NT, class Rows>
inline void qk_rows(int64_t nr, const Rows& k, int64_t t0, const float* q, int64_t Dp, int64_t Dw, float* s,
                    int64_t s_stride) {
  switch (nr) {
    case 1: qk_tile<1, NT>(k, t0, q, Dp, Dw, s, s_stride); break;
    case 2: qk_tile<2, NT>(k, t0, q, Dp, Dw, s, s_stride); break;
    case 3: qk_tile<3, NT>(k, t0, q, Dp, Dw, s, s_stride); break;
    default: qk_tile<4, NT>(k, t0, q, Dp, Dw, s, s_stride); break;
  }
}
static_assert(kQkRows == 4, "qk_rows handles up to 4 rows");

// acc[r][d0, d0 + NV*W) = alpha[r] * acc[r][...] + sum_{t < nt} p[r][t] * V[t][d0, ...) for r < NR.
template <int NR, int NV, class Rows>
inline void pv_tile(const Rows& v, int64_t nt, const float* p, int64_t p_stride, const float* alpha, int64_t d0,
                    float* acc, int64_t acc_stride) {
  constexpr int K = Rows::kVecs;
  static_assert(NV % K == 0, "a tile holds whole loads");
  Vec a[NR][NV];
  for (int r = 0; r < NR; ++r) {
    const Vec al = vset1(alpha[r]);
    for (int j = 0; j < NV; ++j) a[r][j] = vmul(vload(acc + r * acc_stride + d0 + j * W), al);
  }
  for (int64_t t = 0; t < nt; ++t) {
    Vec vv[NV / K][K];
    for (int j = 0; j < NV / K; ++j) v.load(t, d0 + j * K * W, vv[j]);
    for (int r = 0; r < NR; ++r) {
      const Vec pr = vset1(p[r * p_stride + t]);
      for (int j = 0; j < NV; ++j) a[r][j] = vfma(pr, vv[j / K][j % K], a[r][j]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NV; ++j) vstore(acc + r * acc_stride + d0 + j * W, a[r][j]);
}

template <int NV, class Rows>
inline void pv_rows(int64_t nr, const Rows& v, int64_t nt, const float* p, int64_t p_stride, const float* alpha,
                    int64_t d0, float* acc, int64_t acc_stride) {
  switch (nr) {
    case 1: pv_tile<1, NV>(v, nt, p, p_stride, alpha, d0, acc, acc_stride); break;
    case 2: pv_tile<2, NV>(v, nt, p, p_stride, alpha, d0, acc, acc_stride); break;
    case 3: pv_tile<3, NV>(v, nt, p, p_stride, alpha, d0, acc, acc_stride); break;
    default: pv_tile<4, NV>(v, nt, p, p_stride, alpha, d0, acc, acc_stride); break;
  }
}
static_assert(kPvRows == 4, "pv_rows handles up to 4 rows");
