// CPU kernel for ternary_matmul (BitNet b1.58), compiled once per instruction set (isa.h).
//
// 1. Activations: each row of x is quantized to int8 as the reference does it (see
//    common/ternary_matmul.h), into a zero-padded scratch copy x_q [M][ld] (ld a multiple of
//    64) with its row sum Σ x_q and its scale. Fused here, so the call reads x once.
// 2. Integer products, reading the checkpoint layout directly (no repack): a byte of qweight
//    holds the codes c = w_t + 1 in {0, 1, 2} of 4 output rows (r + i*R, R = ceil(N/4)) at
//    one k, so acc = Σ_k x_q[k] * c[k] - Σ_k x_q[k]: unsigned codes times signed int8 is
//    exactly what VNNI `vpdpbusd` (and `vpmaddubsw` + `vpmaddwd` before it) multiplies, and
//    the +1 offset is undone with the row sum at the end. All integer: bit-exact on every path.
//    - "dot" path (decode and small batches; the only path of the scalar and Arm builds):
//      one vector load of a byte row along K gives the codes of 4 output rows (2 bits each:
//      shift + and) against the same x_q vector; per-lane int32 sums are reduced once at the
//      end of K. Up to 4 byte rows x 1 row of x, or 2 x 2, or 1 x 4 (16 accumulators) per
//      pass. Weights stream from memory once per call (software prefetch 1 KiB ahead in each
//      row); x_q is re-read from L1/L2 for every byte row, so this path is taken while x_q
//      fits in L2 (M * ld <= 1 MiB).
//    - "gemm" path (x86, larger M * K): a tile of L byte rows (L = 16 with AVX-512, 8 with
//      AVX2) and kKc columns is transposed to dword-of-4-k per lane and split into its 4 code
//      planes once (a "panel", in L1), then reused by every row of x: each panel vector times
//      a broadcast dword of x_q accumulates 4 k's of L outputs (`vpdpbusd`), 6 x rows and 4
//      planes at a time in registers (broadcast-A GEMM, no horizontal sums); partial sums of
//      a tile live in a small int32 buffer across the kKc blocks. Output lane j of plane i is
//      row r0 + j + i*R, so each plane stores a contiguous run of outputs.
// 3. Epilogue: y = float(acc) / (x_scale * weight_scale) (+ bias), rounded to out_dtype.
//
// Threads split the byte rows (= groups of 4 output rows) in chunks; results do not depend on
// the thread count or the path (integer sums are exact). The x_q scratch is kept per calling
// thread between calls (no page faults for it at every call).
//
// Parts of this file, included inside its anonymous namespace: ternary_vec.h (the vector traits
// of each instruction set) and ternary_gemm.h (the gemm path).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/ternary_matmul.h"
#include "isa.h"
#include "parallel.h"

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 intrinsics pass an "undefined" self-initialized operand that
// -Wmaybe-uninitialized flags once inlined (GCC bug 105593, fixed in 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#if LOWBIT_ISA_LEVEL == LOWBIT_ISA_AVX512 || LOWBIT_ISA_LEVEL == LOWBIT_ISA_AVX512BF16
#define LOWBIT_TM_AVX512 1
#include <immintrin.h>
#elif LOWBIT_ISA_LEVEL == LOWBIT_ISA_AVX2
#define LOWBIT_TM_AVX2 1
#include <immintrin.h>
#elif LOWBIT_ISA_LEVEL == LOWBIT_ISA_NEON || LOWBIT_ISA_LEVEL == LOWBIT_ISA_NEON_DOT
#define LOWBIT_TM_NEON 1
#include <arm_neon.h>
#endif

#if defined(LOWBIT_TM_AVX512) || defined(LOWBIT_TM_AVX2)
#define LOWBIT_TM_GEMM 1
#endif

namespace lowbit {
namespace cpu {
namespace {

constexpr int64_t kAlign = 64;           // x_q row stride and scratch alignment
constexpr int64_t kChunkRows = 16;       // byte rows per task of the dot path (64 outputs)
constexpr int64_t kKc = 512;             // k per gemm panel (panel = kKc * vector bytes, in L1)
constexpr double kMinWorkPerThread = 1 << 20;  // multiply-adds below which a thread is not worth it

#if defined(__GNUC__) || defined(__clang__)
#define LOWBIT_TM_PREFETCH(p) __builtin_prefetch((p), 0, 3)
#else
#define LOWBIT_TM_PREFETCH(p) ((void)0)
#endif
constexpr int64_t kPrefetch = 1024;     // bytes ahead that the dot path prefetches in each weight row

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------
// Activation quantization (bit-exact with lowbit.formats.ternary.quantize_activations).

// max |x| of a row; NaN if the row holds a NaN (an unsigned max of the magnitude bits:
// NaN bits are above inf's, so they win like torch.amax's NaN propagation).
float row_absmax(const void* row, int64_t K, int dtype) {
  if (dtype == kFloat32) {
    const uint32_t* p = static_cast<const uint32_t*>(row);
    uint32_t m = 0;
    for (int64_t k = 0; k < K; ++k) m = std::max(m, p[k] & 0x7fffffffu);
    return bits_float(m);
  }
  const uint16_t* p = static_cast<const uint16_t*>(row);
  uint16_t m = 0;
  for (int64_t k = 0; k < K; ++k) m = std::max<uint16_t>(m, p[k] & 0x7fffu);
  return dtype == kFloat16 ? half_to_float(m) : bf16_to_float(m);
}

// q[k] = clamp(round_half_even(x[k] * s), -128, 127) for k < K; returns Σ q.
int32_t quantize_codes(const void* row, int64_t K, int dtype, float s, int8_t* q) {
  int64_t k = 0;
  int32_t total = 0;
#if defined(LOWBIT_TM_AVX512)
  const __m512 vs = _mm512_set1_ps(s);
  const __m512i lo = _mm512_set1_epi32(-128), hi = _mm512_set1_epi32(127);
  __m512i sum = _mm512_setzero_si512();
  for (; k < K; k += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, K - k));
    const __mmask16 mask = static_cast<__mmask16>(n == 16 ? 0xffffu : (1u << n) - 1u);
    __m512 v;
    if (dtype == kFloat32) {
      v = _mm512_maskz_loadu_ps(mask, static_cast<const float*>(row) + k);
    } else {
      const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(row) + k);
      v = dtype == kFloat16 ? _mm512_cvtph_ps(h)
                            : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    __m512i i = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    i = _mm512_min_epi32(_mm512_max_epi32(i, lo), hi);
    sum = _mm512_add_epi32(sum, i);
    _mm_mask_storeu_epi8(q + k, mask, _mm512_cvtepi32_epi8(i));
  }
  total = _mm512_reduce_add_epi32(sum);
#elif defined(LOWBIT_TM_AVX2)
  const __m256 vs = _mm256_set1_ps(s);
  const __m256i lo = _mm256_set1_epi32(-128), hi = _mm256_set1_epi32(127);
  __m256i sum = _mm256_setzero_si256();
  for (; k + 8 <= K; k += 8) {
    __m256 v;
    if (dtype == kFloat32) {
      v = _mm256_loadu_ps(static_cast<const float*>(row) + k);
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + k));
      v = dtype == kFloat16 ? _mm256_cvtph_ps(h)
                            : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256i i = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(r), lo), hi);
    sum = _mm256_add_epi32(sum, i);
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i, i), _mm256_setzero_si256());
    const int32_t w0 = _mm_cvtsi128_si32(_mm256_castsi256_si128(b));
    const int32_t w1 = _mm_cvtsi128_si32(_mm256_extracti128_si256(b, 1));
    std::memcpy(q + k, &w0, 4);
    std::memcpy(q + k + 4, &w1, 4);
  }
  {
    const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    total = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xb1)));
  }
#endif
  for (; k < K; ++k) {  // the portable code (and the tails of the AVX2 loop)
    float r = std::nearbyint(load_as_float(row, k, dtype) * s);
    r = std::min(127.0f, std::max(-128.0f, r));
    q[k] = static_cast<int8_t>(r);
    total += q[k];
  }
  return total;
}

struct Activations {
  int8_t* q = nullptr;  // [M][ld], zero beyond K
  int64_t ld = 0;
  int32_t* rowsum = nullptr;
  float* scale = nullptr;
};

void quantize_row(const TernaryMatmulArgs& a, const Activations& act, int64_t m) {
  const char* row = static_cast<const char*>(a.x) + m * a.x_row_stride * dtype_size(a.x_dtype);
  int8_t* q = act.q + m * act.ld;
  const float amax = row_absmax(row, a.K, a.x_dtype);
  const float c = amax < 1e-5f ? 1e-5f : amax;  // clamp(min=1e-5); NaN stays NaN
  const float s = (1.0f / c) * 127.0f;          // torch's `127.0 / t` is t.reciprocal() * 127
  act.scale[m] = s;
  if (!(amax <= 3.4028234663852886e38f)) {  // inf or NaN: codes 0 (then y = 0 / 0 or 0 / NaN = NaN)
    std::memset(q, 0, static_cast<size_t>(act.ld));
    act.rowsum[m] = 0;
    return;
  }
  act.rowsum[m] = quantize_codes(row, a.K, a.x_dtype, s, q);
  std::memset(q + a.K, 0, static_cast<size_t>(act.ld - a.K));
}

// ---------------------------------------------------------------------------------------
// Epilogue: out[m, n0 + j] = float(acc[j] - rowsum) / (x_scale * weight_scale[n]) (+ bias).

void store_run(const TernaryMatmulArgs& a, const Activations& act, int64_t m, int64_t n0, int64_t count,
               const int32_t* acc, float* tmp) {
  const int32_t rs = act.rowsum[m];
  const float xs = act.scale[m];
  if (a.weight_scale_numel == 1) {
    const float d = xs * a.weight_scale[0];
    for (int64_t j = 0; j < count; ++j) tmp[j] = static_cast<float>(acc[j] - rs) / d;
  } else {
    const float* ws = a.weight_scale + n0;
    for (int64_t j = 0; j < count; ++j) tmp[j] = static_cast<float>(acc[j] - rs) / (xs * ws[j]);
  }
  if (a.bias != nullptr) {
    switch (a.bias_dtype) {
      case kFloat16: {
        const uint16_t* b = static_cast<const uint16_t*>(a.bias) + n0;
        for (int64_t j = 0; j < count; ++j) tmp[j] += half_to_float(b[j]);
        break;
      }
      case kBFloat16: {
        const uint16_t* b = static_cast<const uint16_t*>(a.bias) + n0;
        for (int64_t j = 0; j < count; ++j) tmp[j] += bf16_to_float(b[j]);
        break;
      }
      default: {
        const float* b = static_cast<const float*>(a.bias) + n0;
        for (int64_t j = 0; j < count; ++j) tmp[j] += b[j];
        break;
      }
    }
  }
  const int64_t base = m * a.N + n0;
  switch (a.out_dtype) {
    case kFloat16: {
      uint16_t* o = static_cast<uint16_t*>(a.out) + base;
      for (int64_t j = 0; j < count; ++j) o[j] = float_to_half(tmp[j]);
      break;
    }
    case kBFloat16: {
      uint16_t* o = static_cast<uint16_t*>(a.out) + base;
      for (int64_t j = 0; j < count; ++j) o[j] = float_to_bf16(tmp[j]);
      break;
    }
    default: std::memcpy(static_cast<float*>(a.out) + base, tmp, static_cast<size_t>(count) * sizeof(float));
  }
}

// Outputs of plane i for byte rows [r0, r0 + rows): n in [r0 + i*R, ...) below N. Count (may be <= 0).
inline int64_t plane_count(const TernaryMatmulArgs& a, int64_t R, int64_t r0, int64_t rows, int i) {
  return std::min(rows, a.N - (r0 + i * R));
}

// Vector traits (struct Vec) of the SIMD builds.
#include "ternary_vec.h"

// ---------------------------------------------------------------------------------------
// Dot path: MR rows of x against RR byte rows (4 * RR outputs each), over all of K.

#if defined(LOWBIT_TM_AVX512) || defined(LOWBIT_TM_AVX2) || defined(LOWBIT_TM_NEON)
// acc[m][i][rr] = Σ_k x_q[m][k] * code_i(w[rr][k]) (the +1 offset not removed yet).
// Accumulators are named variables, not arrays: GCC keeps arrays of vectors in memory
// (or shuffles them between registers) once register pressure is high. Slot t = m * RR + r
// holds the 4 planes of x row m against byte row r; identical loads are merged by the compiler.
#define LOWBIT_TM_DOT_SLOT(t, LOAD_W)                                                \
  if constexpr (MR * RR > t) {                                                       \
    const typename Vec::W wv = LOAD_W(w[t % RR]);                                    \
    const typename Vec::X xv = Vec::load_x(x[t / RR] + k); /* zero-padded past K */ \
    s##t##0 = Vec::dot(s##t##0, Vec::template plane<0>(wv), xv);                     \
    s##t##1 = Vec::dot(s##t##1, Vec::template plane<1>(wv), xv);                     \
    s##t##2 = Vec::dot(s##t##2, Vec::template plane<2>(wv), xv);                     \
    s##t##3 = Vec::dot(s##t##3, Vec::template plane<3>(wv), xv);                     \
  }
#define LOWBIT_TM_DOT_OUT(t)                                                         \
  if constexpr (MR * RR > t) {                                                       \
    int32_t* o = out + (t / RR) * out_ld_m + (t % RR) * out_ld_r;                     \
    o[0] = Vec::sum(s##t##0);                                                        \
    o[out_ld_i] = Vec::sum(s##t##1);                                                 \
    o[2 * out_ld_i] = Vec::sum(s##t##2);                                             \
    o[3 * out_ld_i] = Vec::sum(s##t##3);                                             \
  }

// out[m * out_ld_m + i * out_ld_i + r * out_ld_r] = Σ_k x_q[m][k] * code_i(w[r][k]) (the +1
// offset not removed yet), for MR rows of x and RR byte rows, MR * RR <= 4 (16 accumulators).
// Each row is prefetched kPrefetch bytes ahead, past its end into the next row in memory.
template <int MR, int RR>
void dot_tile(const uint8_t* const* w, int64_t K, const int8_t* const* x, int32_t* out, int64_t out_ld_m,
              int64_t out_ld_i, int64_t out_ld_r) {
  static_assert(MR * RR <= 4, "16 accumulators at most");
  using A = typename Vec::A;
  A s00 = Vec::zero(), s01 = s00, s02 = s00, s03 = s00, s10 = s00, s11 = s00, s12 = s00, s13 = s00;
  A s20 = s00, s21 = s00, s22 = s00, s23 = s00, s30 = s00, s31 = s00, s32 = s00, s33 = s00;
  // The partial vector (K % kBytes bytes) comes first, at k = 0, with the weight bytes past
  // it read as 0 (they would multiply real x_q values); then whole vectors. A tail after the
  // loop instead makes GCC shuffle the accumulators between registers in the loop.
  int64_t k = 0;
  if (const int64_t head = K % Vec::kBytes; head != 0) {
#define LOWBIT_TM_LOAD_PART(p) Vec::load_w_part(p, head)
    LOWBIT_TM_DOT_SLOT(0, LOWBIT_TM_LOAD_PART)
    LOWBIT_TM_DOT_SLOT(1, LOWBIT_TM_LOAD_PART)
    LOWBIT_TM_DOT_SLOT(2, LOWBIT_TM_LOAD_PART)
    LOWBIT_TM_DOT_SLOT(3, LOWBIT_TM_LOAD_PART)
#undef LOWBIT_TM_LOAD_PART
    k = head;
  }
  for (; k < K; k += Vec::kBytes) {
    if constexpr (kPrefetch > 0) {
      LOWBIT_TM_PREFETCH(w[0] + k + kPrefetch);
      if constexpr (RR > 1) LOWBIT_TM_PREFETCH(w[1] + k + kPrefetch);
      if constexpr (RR > 2) LOWBIT_TM_PREFETCH(w[2] + k + kPrefetch);
      if constexpr (RR > 3) LOWBIT_TM_PREFETCH(w[3] + k + kPrefetch);
    }
#define LOWBIT_TM_LOAD_FULL(p) Vec::load_w((p) + k)
    LOWBIT_TM_DOT_SLOT(0, LOWBIT_TM_LOAD_FULL)
    LOWBIT_TM_DOT_SLOT(1, LOWBIT_TM_LOAD_FULL)
    LOWBIT_TM_DOT_SLOT(2, LOWBIT_TM_LOAD_FULL)
    LOWBIT_TM_DOT_SLOT(3, LOWBIT_TM_LOAD_FULL)
#undef LOWBIT_TM_LOAD_FULL
  }
  LOWBIT_TM_DOT_OUT(0)
  LOWBIT_TM_DOT_OUT(1)
  LOWBIT_TM_DOT_OUT(2)
  LOWBIT_TM_DOT_OUT(3)
}
#undef LOWBIT_TM_DOT_SLOT
#undef LOWBIT_TM_DOT_OUT

// Byte rows per dot_tile call for MR rows of x (MR * RR * 4 accumulators), and the most rows
// of x per call: 16 accumulators with 32 vector registers, 8 with AVX2's 16.
#if defined(LOWBIT_TM_AVX2)
constexpr int kDotMR = 2;
template <int MR>
constexpr int dot_rr() { return MR == 1 ? 2 : 1; }
#else
constexpr int kDotMR = 4;
template <int MR>
constexpr int dot_rr() { return MR == 1 ? 4 : (MR == 2 ? 2 : 1); }
#endif

// Byte rows [r0, r0 + rows) against x rows [m0, m0 + MR): acc[m][i][r - r0].
// With RR > 1 the RR rows of one dot_tile call are `stride` rows apart, so that the prefetch
// running past the end of each row lands on the start of the row the next call reads.
template <int MR>
void dot_rows(const TernaryMatmulArgs& a, const Activations& act, int64_t m0, int64_t r0, int64_t rows,
              int32_t* acc) {
  constexpr int RR = dot_rr<MR>();
  const int8_t* x[MR];
  for (int m = 0; m < MR; ++m) x[m] = act.q + (m0 + m) * act.ld;
  const int64_t stride = rows / RR;  // calls of RR rows; rows [stride * RR, rows) one by one
  for (int64_t j = 0; j < stride; ++j) {
    const uint8_t* w[RR];
    for (int r = 0; r < RR; ++r) w[r] = a.qweight + (r0 + j + r * stride) * a.K;
    dot_tile<MR, RR>(w, a.K, x, acc + j, 4 * kChunkRows, kChunkRows, stride);
  }
  for (int64_t r = stride * RR; r < rows; ++r) {
    const uint8_t* w[1] = {a.qweight + (r0 + r) * a.K};
    dot_tile<MR, 1>(w, a.K, x, acc + r, 4 * kChunkRows, kChunkRows, 1);
  }
}
#else
constexpr int kDotMR = 1;

// Portable: acc[0][i][r] = Σ_k x_q[m0][k] * code_i(w[r0 + r][k]).
void dot_rows_portable(const TernaryMatmulArgs& a, const Activations& act, int64_t m0, int64_t r0, int64_t rows,
                       int32_t* acc) {
  const int8_t* x = act.q + m0 * act.ld;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* w = a.qweight + (r0 + r) * a.K;
    int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t k = 0; k < a.K; ++k) {
      const int32_t b = w[k], v = x[k];
      s0 += (b & 3) * v;
      s1 += ((b >> 2) & 3) * v;
      s2 += ((b >> 4) & 3) * v;
      s3 += (b >> 6) * v;
    }
    acc[r] = s0;
    acc[kChunkRows + r] = s1;
    acc[2 * kChunkRows + r] = s2;
    acc[3 * kChunkRows + r] = s3;
  }
}
#endif

struct Scratch {
  std::vector<int32_t> acc;   // dot: [kDotMR][4][kChunkRows]; gemm: [M][4][kLanes]
  std::vector<float> tmp;     // epilogue run
  std::vector<uint8_t> panel; // gemm: [kKc / 4][4][kBytes], aligned
};

// Task c of the dot path: byte rows [c * kChunkRows, ...) against all rows of x.
void dot_chunk(const TernaryMatmulArgs& a, const Activations& act, int64_t c, Scratch& s) {
  const int64_t R = ternary_packed_rows(a.N);
  const int64_t r0 = c * kChunkRows;
  const int64_t rows = std::min(kChunkRows, R - r0);
  int32_t* acc = s.acc.data();
  for (int64_t m0 = 0; m0 < a.M; m0 += kDotMR) {
    const int64_t mr = std::min<int64_t>(kDotMR, a.M - m0);
#if defined(LOWBIT_TM_AVX512) || defined(LOWBIT_TM_AVX2) || defined(LOWBIT_TM_NEON)
    switch (mr) {
      case 1: dot_rows<1>(a, act, m0, r0, rows, acc); break;
      case 2: dot_rows<2>(a, act, m0, r0, rows, acc); break;
#if !defined(LOWBIT_TM_AVX2)
      case 3: dot_rows<3>(a, act, m0, r0, rows, acc); break;
      case 4: dot_rows<4>(a, act, m0, r0, rows, acc); break;
#endif
      default: break;
    }
#else
    dot_rows_portable(a, act, m0, r0, rows, acc);
#endif
    for (int64_t m = 0; m < mr; ++m)
      for (int i = 0; i < 4; ++i) {
        const int64_t count = plane_count(a, R, r0, rows, i);
        if (count > 0)
          store_run(a, act, m0 + m, r0 + i * R, count, acc + (m * 4 + i) * kChunkRows, s.tmp.data());
      }
  }
}

// Gemm path (x86): pack_panel, gemm_micro, gemm_tile, kDotMaxXBytes.
#include "ternary_gemm.h"

// Scratch kept between calls of one calling thread (no page faults for the big x_q copy
// at every call).
template <class T>
T* grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

template <class T>
T* aligned(T* p) {
  const uintptr_t u = reinterpret_cast<uintptr_t>(p);
  return reinterpret_cast<T*>((u + kAlign - 1) / kAlign * kAlign);
}

}  // namespace

void LOWBIT_ISA_FN(ternary_matmul_kernel)(const TernaryMatmulArgs& a, int num_threads) {
  const int64_t R = ternary_packed_rows(a.N);
  // All allocation happens here, on the calling thread (a bad_alloc becomes MemoryError);
  // the tasks only compute and cannot throw.
  thread_local std::vector<int8_t> xq_buf;
  thread_local std::vector<int32_t> rowsum_buf;
  thread_local std::vector<float> scale_buf;
  Activations act;
  act.ld = round_up(a.K, kAlign);
  act.q = aligned(grow(xq_buf, static_cast<size_t>(a.M * act.ld + kAlign)));
  act.rowsum = grow(rowsum_buf, static_cast<size_t>(a.M));
  act.scale = grow(scale_buf, static_cast<size_t>(a.M));

  const double work = static_cast<double>(a.M) * static_cast<double>(a.N) * static_cast<double>(a.K);
  const int threads = threads_for(work, kMinWorkPerThread, num_threads);

  // 1. Quantize the activations (rows split over threads when there are many).
  const int64_t rows_per_task = std::max<int64_t>(1, (int64_t{1} << 16) / a.K);
  const int64_t qtasks = (a.M + rows_per_task - 1) / rows_per_task;
  parallel_for(qtasks, static_cast<int>(std::min<int64_t>(threads, qtasks)), [&](int64_t t, int) {
    const int64_t end = std::min(a.M, (t + 1) * rows_per_task);
    for (int64_t m = t * rows_per_task; m < end; ++m) quantize_row(a, act, m);
  });

  // 2 + 3. Products and epilogue, tasks over byte rows.
#if defined(LOWBIT_TM_GEMM)
  if (a.M * act.ld > kDotMaxXBytes) {
    const int64_t tiles = (R + kL - 1) / kL;
    const int t = static_cast<int>(std::min<int64_t>(threads, tiles));
    std::vector<Scratch> scratch(static_cast<size_t>(t));
    for (Scratch& s : scratch) {
      s.acc.resize(static_cast<size_t>(a.M * 4 * kL));
      s.tmp.resize(static_cast<size_t>(kL));
      s.panel.resize(static_cast<size_t>(kKc * Vec::kBytes + kAlign));
    }
    parallel_for(tiles, t, [&](int64_t tile, int thread) { gemm_tile(a, act, tile, scratch[thread]); });
    return;
  }
#endif
  const int64_t chunks = (R + kChunkRows - 1) / kChunkRows;
  const int t = static_cast<int>(std::min<int64_t>(threads, chunks));
  std::vector<Scratch> scratch(static_cast<size_t>(t));
  for (Scratch& s : scratch) {
    s.acc.resize(static_cast<size_t>(kDotMR * 4 * kChunkRows));
    s.tmp.resize(static_cast<size_t>(kChunkRows));
  }
  parallel_for(chunks, t, [&](int64_t c, int thread) { dot_chunk(a, act, c, scratch[thread]); });
}

}  // namespace cpu
}  // namespace lowbit
