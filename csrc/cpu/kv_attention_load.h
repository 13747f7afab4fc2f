// Loading for the kv_attention CPU kernel: fp16 / bf16 to fp32 (scales, zeros, queries), and the
// int8 and 4-bit cache codes as fp32 vectors (Int8Rows, Int4Rows: the `Rows` of the micro-kernels).
//
// Part of kv_attention_kernels.cpp (compiled once per instruction set, see isa.h): include it
// only from there, inside its anonymous namespace, after kv_attention_vec.h. It includes
// nothing itself; the system headers are included by the .cpp before the namespace.
#pragma once

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
