// Arm NEON (AArch64 Advanced SIMD) primitives of lut4_core.h.
//
// The 16 decoded float32 values of a segment are split into 4 byte planes (vld4q_u8: plane j
// holds byte j of every value); a vector of 16 codes looks each plane up with one vqtbl1q_u8
// and two rounds of zips put the bytes back together as 16 float32s, in code order. So a
// lookup returns exactly the table's bits, the same as the other builds.
#pragma once

#include <arm_neon.h>

#include <cstdint>


namespace lowbit {
namespace cpu {
namespace {

constexpr int64_t kGemvChunk = 0;  // natural column order

template <bool HF>
constexpr int64_t gemv_x_element(int64_t pos) {
  return pos;
}
constexpr int kMR = 4, kNR = 4;    // 16 q-register accumulators of 32

template <class T>
constexpr int gemv_max_m() {
  return 1;
}
template <int MR, class T>
constexpr int gemv_nr() {
  return 2;
}

inline void half_row_to_f32(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t k = 0; k < n; ++k) dst[k] = half_to_float(src[k]);
}

// out[0..3] = lut[idx[0..15]] as 4 x float32x4.
inline void lookup(const uint8x16x4_t& planes, uint8x16_t idx, float32x4_t* out) {
  const uint8x16_t b0 = vqtbl1q_u8(planes.val[0], idx), b1 = vqtbl1q_u8(planes.val[1], idx);
  const uint8x16_t b2 = vqtbl1q_u8(planes.val[2], idx), b3 = vqtbl1q_u8(planes.val[3], idx);
  const uint16x8_t l01 = vreinterpretq_u16_u8(vzip1q_u8(b0, b1)), h01 = vreinterpretq_u16_u8(vzip2q_u8(b0, b1));
  const uint16x8_t l23 = vreinterpretq_u16_u8(vzip1q_u8(b2, b3)), h23 = vreinterpretq_u16_u8(vzip2q_u8(b2, b3));
  out[0] = vreinterpretq_f32_u16(vzip1q_u16(l01, l23));
  out[1] = vreinterpretq_f32_u16(vzip2q_u16(l01, l23));
  out[2] = vreinterpretq_f32_u16(vzip1q_u16(h01, h23));
  out[3] = vreinterpretq_f32_u16(vzip2q_u16(h01, h23));
}

// The codes of the 32 elements of 16 bytes, in natural order: elements 0..15 and 16..31.
template <bool HF>
inline void codes32(const uint8_t* p, uint8x16_t& first, uint8x16_t& second) {
  const uint8x16_t b = vld1q_u8(p);
  const uint8x16_t lo = vandq_u8(b, vdupq_n_u8(15)), hi = vshrq_n_u8(b, 4);
  const uint8x16_t even = HF ? hi : lo, odd = HF ? lo : hi;
  first = vzip1q_u8(even, odd);
  second = vzip2q_u8(even, odd);
}

inline uint8x16x4_t planes_of(const float* lut16) { return vld4q_u8(reinterpret_cast<const uint8_t*>(lut16)); }

// res[r] = dot(x row 0, W row r of `rows`), x in natural order.
template <int NR, int MR, class F>
inline void gemv_block(const F& f, const GemvRow* rows, int64_t K, int64_t L, const float* const* xr, float* res) {
  static_assert(MR == 1, "the NEON GEMV takes one row of x");
  const float* x = xr[0];
  float32x4_t acc[NR][4];
  for (int r = 0; r < NR; ++r)
    for (int l = 0; l < 4; ++l) acc[r][l] = vdupq_n_f32(0.0f);
  alignas(16) float lut[16];
  int64_t k = 0;
  for (int64_t g = 0; k < K; ++g) {
    uint8x16x4_t planes[NR];
    for (int r = 0; r < NR; ++r) {
      build_lut(f, rows[r].s[g], F::kHasZero ? rows[r].z[g] : 0.0f, lut);
      planes[r] = planes_of(lut);
    }
    for (const int64_t end = k + L; k < end; k += 32) {
      for (int r = 0; r < NR; ++r) {
        uint8x16_t c0, c1;
        codes32<F::kHighFirst>(rows[r].q + (k >> 1), c0, c1);
        float32x4_t w[4];
        lookup(planes[r], c0, w);
        for (int l = 0; l < 4; ++l) acc[r][l] = vfmaq_f32(acc[r][l], w[l], vld1q_f32(x + k + 4 * l));
        lookup(planes[r], c1, w);
        for (int l = 0; l < 4; ++l) acc[r][l] = vfmaq_f32(acc[r][l], w[l], vld1q_f32(x + k + 16 + 4 * l));
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    res[r] = vaddvq_f32(vaddq_f32(vaddq_f32(acc[r][0], acc[r][1]), vaddq_f32(acc[r][2], acc[r][3])));
}

// dst[0, 32 * nchunks) = the weights of src[0, 16 * nchunks) in natural order.
template <bool HF>
inline void decode_run(const uint8_t* src, const float* lut16, int64_t nchunks, float* dst) {
  const uint8x16x4_t planes = planes_of(lut16);
  for (int64_t c = 0; c < nchunks; ++c) {
    uint8x16_t c0, c1;
    codes32<HF>(src + 16 * c, c0, c1);
    float32x4_t w[4];
    lookup(planes, c0, w);
    for (int l = 0; l < 4; ++l) vst1q_f32(dst + 32 * c + 4 * l, w[l]);
    lookup(planes, c1, w);
    for (int l = 0; l < 4; ++l) vst1q_f32(dst + 32 * c + 16 + 4 * l, w[l]);
  }
}

// c[i * cs + j] += dot(x[i][0, kc), w[j * ws + (0, kc)]), kc a multiple of 32.
template <int MR, int NR>
inline void micro(const float* const* x, const float* w, int64_t ws, int64_t kc, float* c, int64_t cs) {
  float32x4_t acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = vdupq_n_f32(0.0f);
  for (int64_t k = 0; k < kc; k += 4) {
    float32x4_t wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = vld1q_f32(w + j * ws + k);
    for (int i = 0; i < MR; ++i) {
      const float32x4_t xv = vld1q_f32(x[i] + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = vfmaq_f32(acc[i][j], xv, wv[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) c[i * cs + j] += vaddvq_f32(acc[i][j]);
}

}  // namespace
}  // namespace cpu
}  // namespace lowbit
