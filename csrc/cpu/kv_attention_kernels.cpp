// CPU kernel for kv_attention, compiled once per instruction set (see isa.h).
//
// Flash-decoding over the quantized cache, fp32 throughout:
//   * A task owns one (batch, kv head), a tile of up to kMaxRowTile query rows of that kv head
//     (row r = s * G + g: query position s, GQA head g, so every query head of one kv head is
//     in the same tile and each cache byte is read once per tile), and one slice of the
//     context (split-K: only when B * H_kv * tiles is too small to keep the threads busy).
//   * The slice is walked in blocks of kBlockT tokens. For each block every row of the tile
//     takes its scores (register tiles of 4 rows x 4 tokens, x 2 on AVX2: each cache vector is
//     decoded in registers once and used by 4 rows; the dot products are reduced together), updates
//     its running max / sum (online softmax, rescaling its accumulator by exp(m_old - m_new)),
//     and accumulates p @ V (register tiles of 4 rows x 4 vectors, x 2 on AVX2; V decoded in
//     registers).
//     int8: the codes are converted to fp32 and the token's scale multiplies the finished dot
//     product (K) or the probability (V). 4 bits: x = code * scale - zero * scale per group of
//     32, with the codes in a "split" order (even elements, then odd ones, per 2W elements:
//     what one widening load and a mask / shift produce), q and the accumulator kept in the
//     same order and the output written back in the natural one.
//     Decoding in registers instead of into fp32 scratch cut the time by a third (the scratch
//     stores and reloads cost more than the conversions they saved).
//   * A task without split writes out = acc / l in the output dtype; with split-K each task
//     leaves (m, l, acc) in a partial buffer and a merge pass combines the slices.
// Per-ISA pieces are small: a float vector type (AVX-512, AVX2, NEON, or a portable array of
// floats in the scalar build), exp, the code loaders (int8, 4-bit), fp16/bf16 scale conversion
// and the 4x4 dot-product reduction.
// Everything else is shared, so every path computes the same thing in the same order except
// for the vector width (and exp: std::exp in the scalar build, a Cephes polynomial, ~1 ulp,
// in the SIMD builds).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/kv_attention.h"
#include "isa.h"
#include "parallel.h"

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which -Wall reports as
// "may be used uninitialized" wherever they are inlined (GCC bug 105593): silence that here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if (LOWBIT_ISA_LEVEL == LOWBIT_ISA_AVX512 || LOWBIT_ISA_LEVEL == LOWBIT_ISA_AVX512BF16) && defined(__AVX512F__) && \
    defined(__AVX512BW__)
#define LOWBIT_KV_AVX512 1
#include <immintrin.h>
#elif LOWBIT_ISA_LEVEL == LOWBIT_ISA_AVX2 && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LOWBIT_KV_AVX2 1
#include <immintrin.h>
#elif (LOWBIT_ISA_LEVEL == LOWBIT_ISA_NEON || LOWBIT_ISA_LEVEL == LOWBIT_ISA_NEON_DOT) && defined(__ARM_NEON) && \
    defined(__aarch64__)
#define LOWBIT_KV_NEON 1
#include <arm_neon.h>
#endif

namespace lowbit {
namespace cpu {
namespace {

constexpr int64_t kBlockT = 64;          // tokens decoded and scored together (a multiple of every W)
constexpr int64_t kMaxRowTile = 32;      // query rows sharing one pass over the cache
constexpr int64_t kMinChunkTokens = 128; // smallest context slice worth a split-K task
constexpr double kMinWorkPerThread = 1 << 15;  // multiply-adds (rows x tokens x D) worth a thread
constexpr int64_t kPad = 16;             // scratch rows are padded to a multiple of the widest W
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

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

// ---- loading: scales to fp32, cache codes to fp32 vectors ------------------------------------

// dst[0, n) = float(src[0, n)) of dtype `code`.
inline void to_f32(const void* src, int code, int64_t n, float* dst) {
  int64_t i = 0;
  if (code == kFloat32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src);
#if defined(LOWBIT_KV_AVX512)
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    const __m512 f = code == kFloat16 ? _mm512_cvtph_ps(h)
                                      : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    _mm512_storeu_ps(dst + i, f);
  }
#elif defined(LOWBIT_KV_AVX2)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m256 f = code == kFloat16 ? _mm256_cvtph_ps(h)
                                      : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    _mm256_storeu_ps(dst + i, f);
  }
#endif
  if (code == kFloat16) {
    for (; i < n; ++i) dst[i] = half_to_float(s[i]);
  } else {
    for (; i < n; ++i) dst[i] = bf16_to_float(s[i]);
  }
}

// W int8 codes at p as floats.
inline Vec load_i8(const int8_t* p) {
#if defined(LOWBIT_KV_AVX512)
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
#elif defined(LOWBIT_KV_AVX2)
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
#elif defined(LOWBIT_KV_NEON)
  int32_t four;
  std::memcpy(&four, p, 4);  // W = 4 bytes
  const int8x8_t b = vreinterpret_s8_s32(vdup_n_s32(four));
  return {vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(b))))};
#else
  Vec r;
  for (int i = 0; i < W; ++i) r.v[i] = static_cast<float>(p[i]);
  return r;
#endif
}

// 2W 4-bit codes (W bytes at p, element 2j in the low nibble of byte j) as two vectors in the
// "split" order: lo = the even elements 0, 2, .., 2W-2, hi = the odd ones. One widening load
// and a mask / shift give both, without interleaving the nibbles.
inline void load_u4_split(const uint8_t* p, Vec& lo, Vec& hi) {
#if defined(LOWBIT_KV_AVX512)
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo.v = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0f)));
  hi.v = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
#elif defined(LOWBIT_KV_AVX2)
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo.v = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0x0f)));
  hi.v = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
#elif defined(LOWBIT_KV_NEON)
  uint32_t four;
  std::memcpy(&four, p, 4);  // W = 4 bytes
  const uint32x4_t b = vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(four)))));
  lo.v = vcvtq_f32_u32(vandq_u32(b, vdupq_n_u32(0x0f)));
  hi.v = vcvtq_f32_u32(vshrq_n_u32(b, 4));
#else
  for (int j = 0; j < W; ++j) {
    lo.v[j] = static_cast<float>(p[j] & 0x0f);
    hi.v[j] = static_cast<float>(p[j] >> 4);
  }
#endif
}

// Position of element e of a 4-bit row in the split order (chunks of 2W elements, each stored
// as its even elements then its odd ones). The 4-bit path keeps q and the accumulator in this
// order; the output is written back in the natural one.
inline int64_t split_pos(int64_t e) {
  const int64_t i = e % (2 * W);
  return e - i + (i & 1) * W + i / 2;
}

// Token rows of one block of the int8 cache, as raw codes: the per-token scale is applied to
// the finished dot product (K) or folded into the probability (V), so x = scale * code. Reads
// W codes at a time: when D is not a multiple of W the block is first copied into a
// zero-padded buffer (pad_int8_block), so this loop never needs a tail.
struct Int8Rows {
  static constexpr int kVecs = 1;  // vectors per load
  const int8_t* base;  // row of the block's first token
  int64_t stride;      // elements between tokens
  void load(int64_t t, int64_t d, Vec (&out)[kVecs]) const { out[0] = load_i8(base + t * stride + d); }
};

// Copies nt rows of D codes (row stride `stride`) into dst [nt][Dw], zero past D.
inline Int8Rows pad_int8_block(const int8_t* src, int64_t stride, int64_t nt, int64_t D, int64_t Dw, int8_t* dst) {
  for (int64_t t = 0; t < nt; ++t) {
    std::memcpy(dst + t * Dw, src + t * stride, static_cast<size_t>(D));
    std::memset(dst + t * Dw + D, 0, static_cast<size_t>(Dw - D));
  }
  return Int8Rows{dst, Dw};
}

// Token rows of one block of the 4-bit cache, decoded in the split order: x = code * scale +
// (-zero * scale) with the block's scales and (-zero * scale) in fp32, one pair per group of
// 32 (D % 32 == 0, and 2W divides 32, so a load never straddles two groups).
struct Int4Rows {
  static constexpr int kVecs = 2;
  const uint8_t* base;
  int64_t stride;      // bytes between tokens
  const float* scale;  // [t][ng]
  const float* nzs;    // [t][ng]: -zero * scale
  int64_t ng;
  void load(int64_t t, int64_t d, Vec (&out)[kVecs]) const {
    const int64_t i = t * ng + d / 32;
    const Vec s = vset1(scale[i]), z = vset1(nzs[i]);
    load_u4_split(base + t * stride + d / 2, out[0], out[1]);
    out[0] = vfma(out[0], s, z);
    out[1] = vfma(out[1], s, z);
  }
};

// ---- register-tiled micro-kernels ---------------------------------------------------------------

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

// ---- plan, scratch, tasks ----------------------------------------------------------------------

struct Plan {
  int64_t G;       // query heads per kv head
  int64_t R;       // query rows per (batch, kv head): G * S_q; row r = s * G + g
  int64_t RT;      // rows per tile
  int64_t tiles;   // ceil(R / RT)
  int64_t splits;  // context slices per tile (1: no split-K, no merge)
  int64_t base;    // B * H_kv * tiles
  int64_t tasks;   // base * splits
  int64_t Dp;      // D rounded up to kPad (scratch row length)
  int64_t Dw;      // D rounded up to W (the vector loops' extent)
  int64_t ng;      // scale (and zero) entries per token row
  int threads;
};

Plan make_plan(const KvAttentionArgs& a, int num_threads) {
  Plan p{};
  p.G = a.H_q / a.H_kv;
  p.R = p.G * a.S_q;
  p.RT = std::min(p.R, kMaxRowTile);
  p.tiles = (p.R + p.RT - 1) / p.RT;
  p.base = a.B * a.H_kv * p.tiles;
  p.Dp = (a.D + kPad - 1) / kPad * kPad;
  p.Dw = (a.D + W - 1) / W * W;
  p.ng = a.groups();
  const double work = static_cast<double>(a.B) * static_cast<double>(a.H_q) * static_cast<double>(a.S_q) *
                      static_cast<double>(a.S_kv) * static_cast<double>(a.D);
  const int t = threads_for(work, kMinWorkPerThread, std::max(1, num_threads));
  // Split the context until the tasks divide evenly over the threads (or are plentiful),
  // keeping slices of at least kMinChunkTokens.
  p.splits = 1;
  const int64_t max_splits = std::max<int64_t>(1, a.S_kv / kMinChunkTokens);
  while (t > 1 && p.splits < max_splits && (p.base * p.splits) % t != 0 && p.base * p.splits < 8 * t) ++p.splits;
  p.tasks = p.base * p.splits;
  p.threads = static_cast<int>(std::min<int64_t>(t, p.tasks));
  return p;
}

// 64-byte aligned float scratch.
class FloatBuf {
 public:
  void resize(int64_t n) {
    store_.assign(static_cast<size_t>(n + 16), 0.0f);
    const uintptr_t addr = reinterpret_cast<uintptr_t>(store_.data());
    data_ = store_.data() + ((64 - addr % 64) % 64) / sizeof(float);
  }
  float* data() const { return data_; }

 private:
  std::vector<float> store_;
  float* data_ = nullptr;
};

// Parameter arrays of one block, each [kBlockT * ng] (8 bits: ng = 1, zeros unused).
enum Par { kKScale, kKNzs, kVScale, kVNzs, kNumPar };

struct Scratch {
  FloatBuf q;    // [RT][Dp] query rows of the tile (fp32, zero past D)
  FloatBuf s;    // [RT][kBlockT] scores, then probabilities
  FloatBuf acc;  // [RT][Dp] running sum of p * V
  FloatBuf ml;   // m[RT], l[RT], alpha[RT + kPad]
  FloatBuf par;  // kNumPar x [kBlockT][ng]
  std::vector<int8_t> pad;  // 2 x [kBlockT][Dw]: K and V rows of the block, zero past D (8 bits, D % W != 0)
};

inline const char* elem_ptr(const KvView& t, int64_t offset, int elem_size) {
  return static_cast<const char*>(t.ptr) + offset * elem_size;
}

// Scales or zeros of tokens [t0, t0 + nt) of (b, h) as fp32: dst[t * ng + j].
inline void load_params(const KvView& t, int64_t b, int64_t h, int64_t t0, int64_t nt, int64_t ng, float* dst) {
  const int size = dtype_size(t.dtype);
  const int64_t base = b * t.stride_b + h * t.stride_h + t0 * t.stride_s;
  if (t.stride_s == ng || nt == 1) {
    to_f32(elem_ptr(t, base, size), t.dtype, nt * ng, dst);
    return;
  }
  for (int64_t i = 0; i < nt; ++i) to_f32(elem_ptr(t, base + i * t.stride_s, size), t.dtype, ng, dst + i * ng);
}

// 4 bits: scale[i] and nzs[i] = -zero[i] * scale[i] of the block (zeros first loaded into nzs).
inline void load_scale_zero(const KvView& scale, const KvView& zero, int64_t b, int64_t h, int64_t t0, int64_t nt,
                            int64_t ng, float* s, float* nzs) {
  load_params(scale, b, h, t0, nt, ng, s);
  load_params(zero, b, h, t0, nt, ng, nzs);
  for (int64_t i = 0; i < nt * ng; ++i) nzs[i] = -(nzs[i] * s[i]);
}

struct TaskInfo {
  int64_t b, h;    // batch, kv head
  int64_t r0, nr;  // rows [r0, r0 + nr) of the (b, h) unit
  int64_t c0, c1;  // context slice [c0, c1)
};

// Tokens rows of the tile may see: [0, end). Causal: the last row's limit + 1.
inline int64_t tile_end(const KvAttentionArgs& a, const Plan& p, int64_t r_last) {
  return a.causal ? (r_last / p.G) + a.S_kv - a.S_q + 1 : a.S_kv;
}

TaskInfo task_info(const KvAttentionArgs& a, const Plan& p, int64_t task) {
  TaskInfo ti{};
  const int64_t c = task % p.splits;
  const int64_t ut = task / p.splits;
  const int64_t unit = ut / p.tiles;
  const int64_t tile = p.tiles - 1 - ut % p.tiles;  // causal: the longest tiles first
  ti.b = unit / a.H_kv;
  ti.h = unit % a.H_kv;
  ti.r0 = tile * p.RT;
  ti.nr = std::min(p.RT, p.R - ti.r0);
  const int64_t end = tile_end(a, p, ti.r0 + ti.nr - 1);
  const int64_t per = ((end + p.splits - 1) / p.splits + kBlockT - 1) / kBlockT * kBlockT;
  ti.c0 = std::min(end, c * per);
  ti.c1 = std::min(end, ti.c0 + per);
  return ti;
}

// Output row of unit row r: (b, h * G + g, s) with r = s * G + g.
inline int64_t out_row(const KvAttentionArgs& a, const Plan& p, int64_t b, int64_t h, int64_t r) {
  const int64_t s = r / p.G, g = r % p.G;
  return (b * a.H_q + h * p.G + g) * a.S_q + s;
}

// Scores -> probabilities for one block: per row, scale and mask the scores, update the
// running max m and sum l, leave p = exp(score - m) (times the token's V scale for 8 bits)
// in s and the accumulator's rescale factor exp(m_old - m_new) in alpha (computed for all
// rows at once: `alpha` has room for a whole vector past the tile's rows).
void softmax_block(const KvAttentionArgs& a, const Plan& p, const TaskInfo& ti, int64_t t0, int64_t nt,
                   const float* kmul, const float* vmul_, float* s, float* m, float* l, float* alpha) {
  bool masked[kMaxRowTile];
  for (int64_t r = 0; r < ti.nr; ++r) {  // scale, mask, block max
    float* sr = s + r * kBlockT;
    const int64_t lim = a.causal ? (ti.r0 + r) / p.G + a.S_kv - a.S_q : a.S_kv - 1;
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(nt, lim + 1 - t0));
    masked[r] = valid == 0;
    if (valid == 0) {  // every token of the block is masked for this row: p = 0, alpha = 1
      std::fill(sr, sr + kBlockT, 0.0f);
      alpha[r] = 0.0f;  // exp(0)
      continue;
    }
    for (int64_t t = 0; t < kBlockT; t += W) vstore(sr + t, vmul(vload(sr + t), vload(kmul + t)));
    std::fill(sr + valid, sr + kBlockT, kNegInf);
    Vec mx = vload(sr);
    for (int64_t t = W; t < kBlockT; t += W) mx = vmax(mx, vload(sr + t));
    const float m_new = std::max(m[r], vhmax(mx));
    alpha[r] = m[r] - m_new;  // -inf on the first block: exp gives 0
    m[r] = m_new;
  }
  for (int64_t r = 0; r < ti.nr; r += W) vstore(alpha + r, vexp(vload(alpha + r)));
  for (int64_t r = 0; r < ti.nr; ++r) {  // probabilities and sums
    float* sr = s + r * kBlockT;
    if (masked[r]) continue;  // p already 0
    const Vec mn = vset1(m[r]);
    Vec sum = vset1(0.0f);
    for (int64_t t = 0; t < kBlockT; t += W) {
      const Vec e = vexp(vsub(vload(sr + t), mn));
      sum = vadd(sum, e);
      vstore(sr + t, vmul_ ? vmul(e, vload(vmul_ + t)) : e);
    }
    l[r] = l[r] * alpha[r] + vsum(sum);
  }
}

// Scores, softmax and p @ V of one block of nt tokens for the rows of the task.
template <class Rows>
void block(const KvAttentionArgs& a, const Plan& p, const TaskInfo& ti, int64_t t0, int64_t nt, const Rows& k,
           const Rows& v, const float* kmul, const float* vmul_, Scratch& sc) {
  const int64_t Dp = p.Dp, nr = ti.nr;
  const float* q = sc.q.data();
  float* s = sc.s.data();
  float* acc = sc.acc.data();
  float* m = sc.ml.data();
  for (int64_t r = 0; r < nr; r += kQkRows) {
    const int64_t rr = std::min<int64_t>(kQkRows, nr - r);
    int64_t t = 0;
    for (; t + kQkToks <= nt; t += kQkToks) {
      qk_rows<kQkToks>(rr, k, t, q + r * Dp, Dp, p.Dw, s + r * kBlockT + t, kBlockT);
    }
    for (; t < nt; ++t) qk_rows<1>(rr, k, t, q + r * Dp, Dp, p.Dw, s + r * kBlockT + t, kBlockT);
  }
  softmax_block(a, p, ti, t0, nt, kmul, vmul_, s, m, m + p.RT, m + 2 * p.RT);
  const float* alpha = m + 2 * p.RT;
  for (int64_t r = 0; r < nr; r += kPvRows) {
    const int64_t rr = std::min<int64_t>(kPvRows, nr - r);
    int64_t d = 0;
    for (; d + kPvVecs * W <= p.Dw; d += kPvVecs * W) {
      pv_rows<kPvVecs>(rr, v, nt, s + r * kBlockT, kBlockT, alpha + r, d, acc + r * Dp, Dp);
    }
    for (; d < p.Dw; d += Rows::kVecs * W) {
      pv_rows<Rows::kVecs>(rr, v, nt, s + r * kBlockT, kBlockT, alpha + r, d, acc + r * Dp, Dp);
    }
  }
}

// Runs one task: leaves m[r], l[r] and acc[r][0, Dp) (unnormalized) in the scratch.
void attend(const KvAttentionArgs& a, const Plan& p, const TaskInfo& ti, Scratch& sc) {
  const int64_t Dp = p.Dp;
  float* q = sc.q.data();
  float* acc = sc.acc.data();
  float* m = sc.ml.data();
  float* l = m + p.RT;
  const int qsize = dtype_size(a.q.dtype);
  for (int64_t r = 0; r < ti.nr; ++r) {
    const int64_t row = ti.r0 + r, s = row / p.G, hq = ti.h * p.G + row % p.G;
    const int64_t off = ti.b * a.q.stride_b + hq * a.q.stride_h + s * a.q.stride_s;
    to_f32(elem_ptr(a.q, off, qsize), a.q.dtype, a.D, q + r * Dp);
    std::fill(q + r * Dp + a.D, q + (r + 1) * Dp, 0.0f);
    if (a.bits == 4) {  // the split order of the 4-bit rows
      float* tmp = sc.acc.data() + r * Dp;
      std::copy(q + r * Dp, q + r * Dp + a.D, tmp);
      for (int64_t e = 0; e < a.D; ++e) q[r * Dp + split_pos(e)] = tmp[e];
    }
    std::fill(acc + r * Dp, acc + (r + 1) * Dp, 0.0f);
    m[r] = kNegInf;
    l[r] = 0.0f;
  }
  const int64_t pn = kBlockT * p.ng;
  float* par[kNumPar];
  for (int i = 0; i < kNumPar; ++i) par[i] = sc.par.data() + i * pn;
  const int64_t kb = ti.b * a.k.stride_b + ti.h * a.k.stride_h, vb = ti.b * a.v.stride_b + ti.h * a.v.stride_h;
  for (int64_t t0 = ti.c0; t0 < ti.c1; t0 += kBlockT) {
    const int64_t nt = std::min(kBlockT, ti.c1 - t0);
    if (a.bits == 8) {
      // kmul = softmax scale * K scale per token; p is multiplied by the V scale.
      load_params(a.k_scale, ti.b, ti.h, t0, nt, 1, par[kKScale]);
      load_params(a.v_scale, ti.b, ti.h, t0, nt, 1, par[kVScale]);
      for (int64_t t = 0; t < nt; ++t) par[kKScale][t] *= a.scale;
      Int8Rows k{static_cast<const int8_t*>(a.k.ptr) + kb + t0 * a.k.stride_s, a.k.stride_s};
      Int8Rows v{static_cast<const int8_t*>(a.v.ptr) + vb + t0 * a.v.stride_s, a.v.stride_s};
      if (p.Dw != a.D) {
        k = pad_int8_block(k.base, k.stride, nt, a.D, p.Dw, sc.pad.data());
        v = pad_int8_block(v.base, v.stride, nt, a.D, p.Dw, sc.pad.data() + kBlockT * p.Dw);
      }
      block(a, p, ti, t0, nt, k, v, par[kKScale], par[kVScale], sc);
    } else {
      load_scale_zero(a.k_scale, a.k_zero, ti.b, ti.h, t0, nt, p.ng, par[kKScale], par[kKNzs]);
      load_scale_zero(a.v_scale, a.v_zero, ti.b, ti.h, t0, nt, p.ng, par[kVScale], par[kVNzs]);
      const Int4Rows k{static_cast<const uint8_t*>(a.k.ptr) + kb + t0 * a.k.stride_s, a.k.stride_s, par[kKScale],
                       par[kKNzs], p.ng};
      const Int4Rows v{static_cast<const uint8_t*>(a.v.ptr) + vb + t0 * a.v.stride_s, a.v.stride_s, par[kVScale],
                       par[kVNzs], p.ng};
      // kmul: the softmax scale for every token (the K scales are inside the decoded rows).
      float* kmul = sc.s.data() + p.RT * kBlockT;
      block(a, p, ti, t0, nt, k, v, kmul, nullptr, sc);
    }
  }
}

// Writes acc * inv_l as output row `orow` (4 bits: acc is in the split order).
void store_row(const KvAttentionArgs& a, int64_t orow, const float* acc, float inv_l) {
  const int64_t base = orow * a.D;
  if (a.bits == 4) {
    for (int64_t d = 0; d < a.D; ++d) store_from_float(a.out, base + d, a.out_dtype, acc[split_pos(d)] * inv_l);
    return;
  }
  if (a.out_dtype == kFloat32) {
    float* o = static_cast<float*>(a.out) + base;
    for (int64_t d = 0; d < a.D; ++d) o[d] = acc[d] * inv_l;
    return;
  }
  for (int64_t d = 0; d < a.D; ++d) store_from_float(a.out, base + d, a.out_dtype, acc[d] * inv_l);
}

void run_task(const KvAttentionArgs& a, const Plan& p, int64_t task, Scratch& sc, float* partial) {
  const TaskInfo ti = task_info(a, p, task);
  attend(a, p, ti, sc);
  const float* m = sc.ml.data();
  const float* l = m + p.RT;
  const float* acc = sc.acc.data();
  if (p.splits == 1) {
    for (int64_t r = 0; r < ti.nr; ++r) store_row(a, out_row(a, p, ti.b, ti.h, ti.r0 + r), acc + r * p.Dp, 1.0f / l[r]);
    return;
  }
  // Partial of this slice: m[RT], l[RT], acc[RT][Dp].
  float* dst = partial + task * p.RT * (p.Dp + 2);
  std::copy(m, m + 2 * p.RT, dst);
  std::copy(acc, acc + p.RT * p.Dp, dst + 2 * p.RT);
}

// Combines the slices of (unit, tile) `ut`: out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c.
void merge(const KvAttentionArgs& a, const Plan& p, int64_t ut, const float* partial, float* row) {
  const TaskInfo ti = task_info(a, p, ut * p.splits);
  const int64_t stride = p.RT * (p.Dp + 2);
  const float* first = partial + ut * p.splits * stride;
  for (int64_t r = 0; r < ti.nr; ++r) {
    float M = kNegInf;
    for (int64_t c = 0; c < p.splits; ++c) M = std::max(M, first[c * stride + r]);
    std::fill(row, row + p.Dp, 0.0f);
    float L = 0.0f;
    for (int64_t c = 0; c < p.splits; ++c) {
      const float* part = first + c * stride;
      const float mc = part[r];
      if (mc == kNegInf) continue;  // the slice had no visible token for this row
      const float w = std::exp(mc - M);
      L += w * part[p.RT + r];
      const float* accc = part + 2 * p.RT + r * p.Dp;
      for (int64_t d = 0; d < p.Dp; ++d) row[d] += w * accc[d];
    }
    store_row(a, out_row(a, p, ti.b, ti.h, ti.r0 + r), row, 1.0f / L);
  }
}

}  // namespace

void LOWBIT_ISA_FN(kv_attention_kernel)(const KvAttentionArgs& a, int num_threads) {
  const Plan p = make_plan(a, num_threads);
  // All allocation happens here, on the calling thread (a bad_alloc becomes MemoryError);
  // the tasks only compute and cannot throw.
  std::vector<Scratch> scratch(static_cast<size_t>(p.threads));
  for (Scratch& s : scratch) {
    s.q.resize(p.RT * p.Dp);
    s.s.resize((p.RT + 1) * kBlockT);  // the last row: the 4-bit path's kmul (all a.scale)
    std::fill(s.s.data() + p.RT * kBlockT, s.s.data() + (p.RT + 1) * kBlockT, a.scale);
    s.acc.resize(p.RT * p.Dp);
    s.ml.resize(3 * p.RT + kPad);  // m, l, alpha (+ room for one vector past the rows)
    s.par.resize(kNumPar * kBlockT * p.ng);
    if (a.bits == 8 && p.Dw != a.D) s.pad.resize(static_cast<size_t>(2 * kBlockT * p.Dw));
  }
  std::vector<float> partial;
  if (p.splits > 1) partial.resize(static_cast<size_t>(p.tasks * p.RT * (p.Dp + 2)));
  parallel_for(p.tasks, p.threads,
               [&](int64_t task, int thread) { run_task(a, p, task, scratch[thread], partial.data()); });
  if (p.splits > 1) {
    parallel_for(p.base, p.threads, [&](int64_t ut, int thread) {
      merge(a, p, ut, partial.data(), scratch[thread].acc.data());
    });
  }
}

}  // namespace cpu
}  // namespace lowbit
