// Vector traits of the ternary_matmul CPU kernel, one struct Vec per instruction set (AVX-512,
// AVX2, NEON; the scalar build has none and uses dot_rows_portable). W = code vector (unsigned
// bytes), X = activation vector (signed bytes), A = int32 accumulator. dot(acc, w, x) adds, per
// int32 lane, the products of its 4 bytes.
//
// Part of ternary_matmul_kernels.cpp (compiled once per instruction set, see isa.h): include it
// only from there, inside its anonymous namespace, after the LOWBIT_TM_* macros. It includes
// nothing itself; the intrinsics headers are included by the .cpp before the namespace.
#pragma once

#if defined(LOWBIT_TM_AVX512)
struct Vec {
  using W = __m512i;
  using X = __m512i;
  using A = __m512i;
  static constexpr int kBytes = 64;
  static constexpr int kLanes = 16;  // int32 lanes
#if defined(__AVX512VNNI__)
  static constexpr int kGemmMR = 6;  // 24 accumulators
#else
  static constexpr int kGemmMR = 5;  // maddubs needs temporaries
#endif
  static A zero() { return _mm512_setzero_si512(); }
  static W load_w(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static W load_w_part(const uint8_t* p, int64_t n) {
    return _mm512_maskz_loadu_epi8(n >= 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1, p);
  }
  static X load_x(const int8_t* p) { return _mm512_loadu_si512(p); }
  static X bcast_x(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  template <int i>
  static W plane(W w) {
    const __m512i m3 = _mm512_set1_epi8(3);
    if constexpr (i == 0) return _mm512_and_si512(w, m3);
    else return _mm512_and_si512(_mm512_srli_epi16(w, 2 * i), m3);
  }
  static A dot(A acc, W w, X x) {
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, w, x);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1)));
#endif
  }
  static int32_t sum(A v) { return _mm512_reduce_add_epi32(v); }
  static A load_acc(const int32_t* p) { return _mm512_loadu_si512(p); }
  static void store_acc(int32_t* p, A v) { _mm512_storeu_si512(p, v); }
  static void store_w(uint8_t* p, W v) { _mm512_store_si512(p, v); }

  // t[g] (g < 16): lane j = dword g of rows[j] (a 16 x 16 dword transpose).
  static void transpose(const W* r, W* t) {
    __m512i u[16];
    for (int a = 0; a < 4; ++a) {
      const __m512i t0 = _mm512_unpacklo_epi32(r[4 * a], r[4 * a + 1]);
      const __m512i t1 = _mm512_unpackhi_epi32(r[4 * a], r[4 * a + 1]);
      const __m512i t2 = _mm512_unpacklo_epi32(r[4 * a + 2], r[4 * a + 3]);
      const __m512i t3 = _mm512_unpackhi_epi32(r[4 * a + 2], r[4 * a + 3]);
      // 128-bit lane l of u[4a + c]: rows 4a..4a+3, dword 4l + c
      u[4 * a + 0] = _mm512_unpacklo_epi64(t0, t2);
      u[4 * a + 1] = _mm512_unpackhi_epi64(t0, t2);
      u[4 * a + 2] = _mm512_unpacklo_epi64(t1, t3);
      u[4 * a + 3] = _mm512_unpackhi_epi64(t1, t3);
    }
    for (int c = 0; c < 4; ++c) {  // 4 x 4 transpose of 128-bit lanes
      const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
      const __m512i v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xee);
      const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
      const __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xee);
      t[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
      t[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
      t[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
      t[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
    }
  }
};
#elif defined(LOWBIT_TM_AVX2)
struct Vec {
  using W = __m256i;
  using X = __m256i;
  using A = __m256i;
  static constexpr int kBytes = 32;
  static constexpr int kLanes = 8;
  static constexpr int kGemmMR = 2;  // 16 registers: 8 accumulators, 4 planes, temporaries
  static A zero() { return _mm256_setzero_si256(); }
  static W load_w(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static W load_w_part(const uint8_t* p, int64_t n) {
    alignas(32) uint8_t buf[32] = {};
    std::memcpy(buf, p, static_cast<size_t>(std::min<int64_t>(n, 32)));
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
  }
  static X load_x(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static X bcast_x(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
  }
  template <int i>
  static W plane(W w) {
    const __m256i m3 = _mm256_set1_epi8(3);
    if constexpr (i == 0) return _mm256_and_si256(w, m3);
    else return _mm256_and_si256(_mm256_srli_epi16(w, 2 * i), m3);
  }
  static A dot(A acc, W w, X x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
  }
  static int32_t sum(A v) {
    const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xb1)));
  }
  static A load_acc(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static void store_acc(int32_t* p, A v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static void store_w(uint8_t* p, W v) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), v); }

  // t[g] (g < 8): lane j = dword g of rows[j] (an 8 x 8 dword transpose).
  static void transpose(const W* r, W* t) {
    __m256i u[8];
    for (int a = 0; a < 2; ++a) {
      const __m256i t0 = _mm256_unpacklo_epi32(r[4 * a], r[4 * a + 1]);
      const __m256i t1 = _mm256_unpackhi_epi32(r[4 * a], r[4 * a + 1]);
      const __m256i t2 = _mm256_unpacklo_epi32(r[4 * a + 2], r[4 * a + 3]);
      const __m256i t3 = _mm256_unpackhi_epi32(r[4 * a + 2], r[4 * a + 3]);
      u[4 * a + 0] = _mm256_unpacklo_epi64(t0, t2);
      u[4 * a + 1] = _mm256_unpackhi_epi64(t0, t2);
      u[4 * a + 2] = _mm256_unpacklo_epi64(t1, t3);
      u[4 * a + 3] = _mm256_unpackhi_epi64(t1, t3);
    }
    for (int c = 0; c < 4; ++c) {
      t[c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x20);
      t[4 + c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x31);
    }
  }
};
#elif defined(LOWBIT_TM_NEON)
struct Vec {
  using W = uint8x16_t;
  using X = int8x16_t;
  using A = int32x4_t;
  static constexpr int kBytes = 16;
  static A zero() { return vdupq_n_s32(0); }
  static W load_w(const uint8_t* p) { return vld1q_u8(p); }
  static W load_w_part(const uint8_t* p, int64_t n) {
    uint8_t buf[16] = {};
    std::memcpy(buf, p, static_cast<size_t>(std::min<int64_t>(n, 16)));
    return vld1q_u8(buf);
  }
  static X load_x(const int8_t* p) { return vld1q_s8(p); }
  template <int i>
  static W plane(W w) {
    if constexpr (i == 0) return vandq_u8(w, vdupq_n_u8(3));
    else return vandq_u8(vshrq_n_u8(w, 2 * i), vdupq_n_u8(3));
  }
  static A dot(A acc, W w, X x) {
    const int8x16_t c = vreinterpretq_s8_u8(w);  // codes 0..2 are valid signed bytes
#if LOWBIT_ISA_LEVEL == LOWBIT_ISA_NEON_DOT
    return vdotq_s32(acc, c, x);
#else
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(c), vget_low_s8(x)));
    return vpadalq_s16(acc, vmull_s8(vget_high_s8(c), vget_high_s8(x)));
#endif
  }
  static int32_t sum(A v) { return vaddvq_s32(v); }
};
#endif
