// The float vector of the kv_attention CPU kernel for each instruction set (AVX-512, AVX2, NEON,
// or a portable array of floats in the scalar build), its exp (a Cephes polynomial in the SIMD
// builds, std::exp in the scalar one), and the register-tile sizes of the micro-kernels.
//
// Part of kv_attention_kernels.cpp (compiled once per instruction set, see isa.h): include it
// only from there, inside its anonymous namespace, after the LOWBIT_KV_* macros, kBlockT and
// kPad. It includes nothing itself; the system headers are included by the .cpp before the
// namespace.
#pragma once

// Cephes expf: exp(x) = 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2; about 1 ulp.
constexpr float kExpLo = -87.33654f;  // below: the result is 0 (subnormals flushed; -inf -> 0)
constexpr float kExpHi = 88.3762626647949f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpP0 = 1.9875691500E-4f, kExpP1 = 1.3981999507E-3f, kExpP2 = 8.3334519073E-3f,
                kExpP3 = 4.1665795894E-2f, kExpP4 = 1.6666665459E-1f, kExpP5 = 5.0000001201E-1f;

// ---- the float vector of each instruction set ------------------------------------------------

#if defined(LOWBIT_KV_AVX512)

struct Vec {
  static constexpr int W = 16;
  __m512 v;
};
inline Vec vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void vstore(float* p, Vec a) { _mm512_storeu_ps(p, a.v); }
inline Vec vset1(float x) { return {_mm512_set1_ps(x)}; }
inline Vec vadd(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec vsub(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec vmul(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vec vfma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec vmax(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
inline float vsum(Vec a) { return _mm512_reduce_add_ps(a.v); }
inline float vhmax(Vec a) { return _mm512_reduce_max_ps(a.v); }
inline Vec vexp(Vec x) {
  const __m512 lo = _mm512_set1_ps(kExpLo);
  const __mmask16 keep = _mm512_cmp_ps_mask(x.v, lo, _CMP_NLT_UQ);  // false below lo (and -inf); NaN kept
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(kExpHi), _mm512_max_ps(lo, x.v));  // NaN passes through
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpP0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP5));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return {_mm512_maskz_mov_ps(keep, _mm512_scalef_ps(y, n))};
}

#elif defined(LOWBIT_KV_AVX2)

struct Vec {
  static constexpr int W = 8;
  __m256 v;
};
inline Vec vload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void vstore(float* p, Vec a) { _mm256_storeu_ps(p, a.v); }
inline Vec vset1(float x) { return {_mm256_set1_ps(x)}; }
inline Vec vadd(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec vsub(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec vmul(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec vfma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec vmax(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
inline float vsum(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float vhmax(Vec a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline Vec vexp(Vec x) {
  const __m256 lo = _mm256_set1_ps(kExpLo);
  const __m256 under = _mm256_cmp_ps(x.v, lo, _CMP_LT_OQ);  // true below lo (and -inf); NaN false
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(kExpHi), _mm256_max_ps(lo, x.v));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpP0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP5));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  // n in [-126, 128]: 2^n as a float by placing n + 127 in the exponent field (n = 128 only
  // for x near kExpHi, never reached by softmax arguments <= 0).
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return {_mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)))};
}

#elif defined(LOWBIT_KV_NEON)

struct Vec {
  static constexpr int W = 4;
  float32x4_t v;
};
inline Vec vload(const float* p) { return {vld1q_f32(p)}; }
inline void vstore(float* p, Vec a) { vst1q_f32(p, a.v); }
inline Vec vset1(float x) { return {vdupq_n_f32(x)}; }
inline Vec vadd(Vec a, Vec b) { return {vaddq_f32(a.v, b.v)}; }
inline Vec vsub(Vec a, Vec b) { return {vsubq_f32(a.v, b.v)}; }
inline Vec vmul(Vec a, Vec b) { return {vmulq_f32(a.v, b.v)}; }
inline Vec vfma(Vec a, Vec b, Vec c) { return {vfmaq_f32(c.v, a.v, b.v)}; }
inline Vec vmax(Vec a, Vec b) { return {vmaxq_f32(a.v, b.v)}; }
inline float vsum(Vec a) { return vaddvq_f32(a.v); }
inline float vhmax(Vec a) { return vmaxvq_f32(a.v); }
inline Vec vexp(Vec x) {
  const float32x4_t lo = vdupq_n_f32(kExpLo);
  const uint32x4_t under = vcltq_f32(x.v, lo);  // NaN: false
  const float32x4_t xc = vminq_f32(vdupq_n_f32(kExpHi), vmaxq_f32(lo, x.v));  // NaN propagates
  const float32x4_t n = vrndnq_f32(vmulq_f32(xc, vdupq_n_f32(kLog2e)));
  float32x4_t r = vfmsq_f32(xc, n, vdupq_n_f32(kLn2Hi));
  r = vfmsq_f32(r, n, vdupq_n_f32(kLn2Lo));
  float32x4_t p = vdupq_n_f32(kExpP0);
  p = vfmaq_f32(vdupq_n_f32(kExpP1), p, r);
  p = vfmaq_f32(vdupq_n_f32(kExpP2), p, r);
  p = vfmaq_f32(vdupq_n_f32(kExpP3), p, r);
  p = vfmaq_f32(vdupq_n_f32(kExpP4), p, r);
  p = vfmaq_f32(vdupq_n_f32(kExpP5), p, r);
  const float32x4_t y = vaddq_f32(vfmaq_f32(r, vmulq_f32(p, r), r), vdupq_n_f32(1.0f));
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
  const float32x4_t out = vmulq_f32(y, vreinterpretq_f32_s32(e));
  return {vbslq_f32(under, vdupq_n_f32(0.0f), out)};
}

#else  // the portable build: plain C++ on arrays, vectorized by the compiler where it can

struct Vec {
  static constexpr int W = 8;
  float v[8];
};
inline Vec vload(const float* p) {
  Vec r;
  std::memcpy(r.v, p, sizeof r.v);
  return r;
}
inline void vstore(float* p, Vec a) { std::memcpy(p, a.v, sizeof a.v); }
inline Vec vset1(float x) {
  Vec r;
  for (float& e : r.v) e = x;
  return r;
}
#define LOWBIT_KV_LANEWISE(name, expr)          \
  inline Vec name(Vec a, Vec b) {               \
    Vec r;                                      \
    for (int i = 0; i < 8; ++i) r.v[i] = (expr); \
    return r;                                   \
  }
LOWBIT_KV_LANEWISE(vadd, a.v[i] + b.v[i])
LOWBIT_KV_LANEWISE(vsub, a.v[i] - b.v[i])
LOWBIT_KV_LANEWISE(vmul, a.v[i] * b.v[i])
LOWBIT_KV_LANEWISE(vmax, a.v[i] < b.v[i] ? b.v[i] : a.v[i])
#undef LOWBIT_KV_LANEWISE
inline Vec vfma(Vec a, Vec b, Vec c) {
  Vec r;
  for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
  return r;
}
inline float vsum(Vec a) {  // fixed order
  return ((a.v[0] + a.v[1]) + (a.v[2] + a.v[3])) + ((a.v[4] + a.v[5]) + (a.v[6] + a.v[7]));
}
inline float vhmax(Vec a) {
  float m = a.v[0];
  for (int i = 1; i < 8; ++i) m = m < a.v[i] ? a.v[i] : m;
  return m;
}
inline Vec vexp(Vec x) {
  Vec r;
  for (int i = 0; i < 8; ++i) r.v[i] = std::exp(x.v[i]);
  return r;
}

#endif

constexpr int W = Vec::W;
static_assert(kPad % W == 0 && kBlockT % W == 0, "scratch padding must be a multiple of the vector width");

// Register tiles: QK computes kQkRows x kQkToks dot products at once, PV updates kPvRows rows
// x kPvVecs vectors of the accumulator. AVX2 has 16 vector registers, the others 32.
#if defined(LOWBIT_KV_AVX2)
constexpr int kQkRows = 4, kQkToks = 2, kPvRows = 4, kPvVecs = 2;
#else
constexpr int kQkRows = 4, kQkToks = 4, kPvRows = 4, kPvVecs = 4;
#endif
