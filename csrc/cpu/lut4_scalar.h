// Portable primitives of lut4_core.h (the `scalar` build: plain C++, no intrinsics; the
// behaviour of record). Dot products keep kLanes independent partial sums so that the
// compiler can vectorize them without reassociating, summed in a fixed tree at the end.
#pragma once

#include <cstdint>


namespace lowbit {
namespace cpu {
namespace {

constexpr int64_t kGemvChunk = 0;  // natural column order

template <bool HF>
constexpr int64_t gemv_x_element(int64_t pos) {
  return pos;
}
constexpr int kMR = 2, kNR = 4;
constexpr int kLanes = 8;

template <class T>
constexpr int gemv_max_m() {
  return 1;
}
template <int MR, class T>
constexpr int gemv_nr() {
  return 1;
}

inline void half_row_to_f32(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t k = 0; k < n; ++k) dst[k] = half_to_float(src[k]);
}

inline float sum_lanes(const float* p) {  // fixed order
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

template <bool HF>
inline void decode_run(const uint8_t* src, const float* lut, int64_t nchunks, float* dst) {
  for (int64_t i = 0; i < 16 * nchunks; ++i) {
    const uint8_t b = src[i];
    dst[2 * i] = lut[HF ? (b >> 4) : (b & 15)];
    dst[2 * i + 1] = lut[HF ? (b & 15) : (b >> 4)];
  }
}

// res[0] = dot(x row 0, W row 0 of `rows`), x in natural order (fast layouts only).
template <int NR, int MR, class F>
inline void gemv_block(const F& f, const GemvRow* rows, int64_t K, int64_t L, const float* const* xr, float* res) {
  static_assert(NR == 1 && MR == 1, "the portable GEMV takes one row of x and of W");
  const float* x = xr[0];
  alignas(64) float lut[16];
  float w[32];
  float lanes[kLanes] = {};
  int64_t k = 0;
  for (int64_t g = 0; k < K; ++g) {
    build_lut(f, rows[0].s[g], F::kHasZero ? rows[0].z[g] : 0.0f, lut);
    for (const int64_t end = k + L; k < end; k += 32) {
      decode_run<F::kHighFirst>(rows[0].q + (k >> 1), lut, 1, w);
      for (int i = 0; i < 32; i += kLanes)
        for (int l = 0; l < kLanes; ++l) lanes[l] += w[i + l] * x[k + i + l];
    }
  }
  res[0] = sum_lanes(lanes);
}

// c[i * cs + j] += dot(x[i][0, kc), w[j * ws + (0, kc)]), kc a multiple of 32.
template <int MR, int NR>
inline void micro(const float* const* x, const float* w, int64_t ws, int64_t kc, float* c, int64_t cs) {
  float p[MR][NR][kLanes] = {};
  for (int64_t k = 0; k < kc; k += kLanes) {
    for (int i = 0; i < MR; ++i) {
      const float* xi = x[i] + k;
      for (int j = 0; j < NR; ++j) {
        const float* wj = w + j * ws + k;
        for (int l = 0; l < kLanes; ++l) p[i][j][l] += xi[l] * wj[l];
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) c[i * cs + j] += sum_lanes(p[i][j]);
}

}  // namespace
}  // namespace cpu
}  // namespace lowbit
