// sparse24_matmul on AVX-512, mid-size M: the 2:4 rows decoded into dense panels and run through
// the int4/nf4 outer-product GEMM (run_gemm_outer_src of lut4_gemm_avx512.h: x transposed into
// 32-row panels, 8 or 16 weight rows x 32 x rows of accumulators in registers, ~1.95 of the 2
// vdpbf16ps a cycle). Compiled once per instruction set (isa.h) like every kernel source; only
// the AVX-512 builds have this path (sparse24_dense_gemm returns false elsewhere), and
// sparse24_matmul_kernels.cpp picks it by M (see kDense* there).
//
// The panel source (Sparse24PanelSource, below) decodes a weight row 32 columns (8 groups, 4
// meta bytes) per step into one zmm of bf16 (x and values both bf16, AVX512-BF16) or two of
// float32, with table permutes and no mask registers (S24Decode). The next K block's values
// and meta are prefetched while the current one is multiplied (spread over the micro-tiles).
// Every nibble with two different columns, illegal orders (i0 > i1) included, decodes to the
// dense row W[4g + i0] = v0, W[4g + i1] = v1 and so gives exactly v0 x[4g + i0] + v1 x[4g + i1].
// A nibble with i0 == i1 cannot be one dense row: its column gets v1, and the task adds the
// missing v0 x[m, 4g + i0] to its partial sums in scalar code at the end (finish), so the
// defined result of sparse24_matmul.h holds for any meta byte. Products are float32-exact
// (fp32 FMA of widened values; vdpbf16ps of bf16 pairs), sums in float32; results do not depend
// on the thread count.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/sparse24_matmul.h"
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13 && defined(__AVX512F__)
// GCC 12's AVX-512 headers pass _mm512_undefined_*() as the masked-off source of many
// intrinsics and then warn about it (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include "lut4_core.h"

namespace lowbit {
namespace cpu {
namespace {

#if defined(LOWBIT_LUT4_AVX512)

// Decoding 32 columns (8 groups, 4 meta bytes) into one zmm of bf16 or two of float32, with
// AVX-512 F/BW only and no mask registers in the loop: word lane c (column c) gets its group's
// meta byte (vpshufb of the broadcast dword, high byte zero), its nibble (a per-lane shift,
// 0 or 4, and a mask) and the lane's column i = c & 3 in bits 4-5; a 64-entry word table
// (vpermt2w) maps (nibble, i) to the value the column holds: 0 (v0), 1 (v1) or Z (none: an
// index into the zero register). OR-ing the group's 2g (a per-lane constant; Z, 1 and 2g
// have no bits in common) gives the vpermt2w / vpermt2ps index into the values. Bit 15 of
// the table entry marks the column of a nibble with i0 == i1 (ignored by the permutes).
template <class T>
struct S24Decode {
  static constexpr int kZ = sizeof(T) == 2 ? 32 : 16;  // first index of the zero register
  __m512i tab_lo, tab_hi;  // the 64-entry (nibble | i << 4) table
  __m512i spread;          // vpshufb: word c <- meta byte c / 8 (low byte), 0 (high byte)
  __m512i shift;           // vpsrlvw: 0 for even groups (low nibble), 4 for odd groups
  __m512i col;             // (c & 3) << 4
  __m512i group;           // word c: 2 (c / 4), the group's first value in the 32 columns

  S24Decode() {
    alignas(64) uint16_t t[64], sp[32], sh[32], cl[32], gr[32];
    for (int e = 0; e < 64; ++e) {
      const int nib = e & 15, i = e >> 4, i0 = nib & 3, i1 = nib >> 2;
      t[e] = static_cast<uint16_t>(i == i1 ? (1 | (i0 == i1 ? 0x8000 : 0)) : i == i0 ? 0 : kZ);
    }
    for (int c = 0; c < 32; ++c) {
      sp[c] = static_cast<uint16_t>(c / 8 | 0x8000);  // high byte: index 0x80 -> 0
      sh[c] = static_cast<uint16_t>((c / 4) % 2 ? 4 : 0);
      cl[c] = static_cast<uint16_t>((c & 3) << 4);
      gr[c] = static_cast<uint16_t>(2 * (c / 4));
    }
    tab_lo = _mm512_load_si512(t);
    tab_hi = _mm512_load_si512(t + 32);
    spread = _mm512_load_si512(sp);
    shift = _mm512_load_si512(sh);
    col = _mm512_load_si512(cl);
    group = _mm512_load_si512(gr);
  }

  // The permute indices of 32 columns from their 4 meta bytes (plus `add`, 0 or 16); `flags`
  // collects bit 15 (nibbles with i0 == i1).
  LOWBIT_LUT4_INLINE __m512i indices(uint32_t meta4, __m512i add, __m512i& flags) const {
    const __m512i b = _mm512_shuffle_epi8(_mm512_set1_epi32(static_cast<int>(meta4)), spread);
    const __m512i e = _mm512_ternarylogic_epi32(_mm512_srlv_epi16(b, shift), _mm512_set1_epi16(15), col, 0xEA);
    const __m512i v = _mm512_permutex2var_epi16(tab_lo, e, tab_hi);  // (A & B) | C above: 0xEA
    flags = _mm512_or_si512(flags, v);
    return _mm512_ternarylogic_epi32(v, group, add, 0xFE);  // v | group | add
  }
};

template <int VD, class T>
struct Sparse24PanelSource {
  static constexpr bool kSpreadPrefetch = true;
  const Sparse24MatmulArgs& a;
  S24Decode<T> c;

  struct Tile {
    bool dup = false;  // a decoded block of the task's rows held a nibble with i0 == i1
  };
  Tile tile_scratch() const { return Tile{}; }
  void begin(Tile& t, int64_t, int64_t) const { t.dup = false; }

  // float32 values v0 .. v0 + 15 (columns 32 j .. 32 j + 31), the first `nv` of them (rest 0).
  LOWBIT_LUT4_INLINE __m512 values_f32(int64_t v0, int64_t nv) const {
    const __mmask16 m = static_cast<__mmask16>(nv >= 16 ? 0xFFFF : (1u << nv) - 1);
    if constexpr (VD == kFloat32) {
      const float* p = static_cast<const float*>(a.values) + v0;
      return nv >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
    } else {
      const uint16_t* p = static_cast<const uint16_t*>(a.values) + v0;
      const __m256i h = nv >= 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(m, p);
      if constexpr (VD == kBFloat16) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      } else {
        return _mm512_cvtph_ps(h);
      }
    }
  }

  // Columns [k, k + w) of row n (w = 32, or 64 for bf16) into dst[k..], `valid` of them
  // holding weights (the rest, past K, zero).
  template <bool Full>
  LOWBIT_LUT4_INLINE void chunk(int64_t n, int64_t k, int64_t valid, T* dst, __m512i& flags) const {
    const uint8_t* mrow = a.meta + n * (a.K / 8) + k / 8;
    const int64_t v0 = n * (a.K / 2) + k / 2;
    if constexpr (sizeof(T) == 2) {  // 64 columns: the 32 values are one zmm
      const uint16_t* vp = static_cast<const uint16_t*>(a.values) + v0;
      uint32_t m0, m1;
      __m512i v;
      if constexpr (Full) {
        std::memcpy(&m0, mrow, 4);
        std::memcpy(&m1, mrow + 4, 4);
        v = _mm512_loadu_si512(vp);
      } else {  // valid < 64 (a multiple of 8), or only 32 panel columns
        uint64_t m = 0;
        std::memcpy(&m, mrow, static_cast<size_t>(valid / 8));
        m0 = static_cast<uint32_t>(m);
        m1 = static_cast<uint32_t>(m >> 32);
        v = _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t{1} << (valid / 2)) - 1), vp);
      }
      __m512i f0 = _mm512_setzero_si512(), f1 = _mm512_setzero_si512();
      const __m512i zero = _mm512_setzero_si512();
      const __m512i i0 = c.indices(m0, zero, f0);
      const __m512i i1 = c.indices(m1, _mm512_set1_epi16(16), f1);
      if constexpr (!Full) {  // padding columns decode as nibble 0 (i0 == i1): not a flag
        const uint64_t lanes = valid >= 64 ? ~0ull : (uint64_t{1} << valid) - 1;
        f0 = _mm512_maskz_mov_epi16(static_cast<__mmask32>(lanes), f0);
        f1 = _mm512_maskz_mov_epi16(static_cast<__mmask32>(lanes >> 32), f1);
      }
      flags = _mm512_ternarylogic_epi32(flags, f0, f1, 0xFE);
      _mm512_storeu_si512(dst + k, _mm512_permutex2var_epi16(v, i0, zero));
      _mm512_storeu_si512(dst + k + 32, _mm512_permutex2var_epi16(v, i1, zero));
    } else {  // 32 columns: 16 float32 values
      uint32_t m = 0;
      std::memcpy(&m, mrow, Full ? 4 : static_cast<size_t>(valid / 8));
      const __m512 v = values_f32(v0, Full ? 16 : valid / 2);
      __m512i f = _mm512_setzero_si512();
      const __m512i idx = c.indices(m, _mm512_setzero_si512(), f);
      if constexpr (!Full) f = _mm512_maskz_mov_epi16(static_cast<__mmask32>((uint64_t{1} << valid) - 1), f);
      flags = _mm512_or_si512(flags, f);
      const __m512 zero = _mm512_setzero_ps();
      _mm512_storeu_ps(dst + k, _mm512_permutex2var_ps(v, _mm512_cvtepu16_epi32(_mm512_castsi512_si256(idx)), zero));
      _mm512_storeu_ps(dst + k + 16,
                       _mm512_permutex2var_ps(v, _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(idx, 1)), zero));
    }
  }

  void decode(Tile& t, int64_t n0, int64_t nc, int64_t kb, int64_t kcp, T* panel) const {
    constexpr int64_t W = sizeof(T) == 2 ? 64 : 32;  // columns per chunk
    const int64_t kend = std::min(kb + kcp, a.K);
    const int64_t kfull = kb + (kend - kb) / W * W;  // full chunks below this
    __m512i flags = _mm512_setzero_si512();
    for (int64_t j = 0; j < nc; ++j) {
      const int64_t n = n0 + j;
      T* dst = panel + j * kcp - kb;
      int64_t k = kb;
      for (; k < kfull; k += W) chunk<true>(n, k, W, dst, flags);
      for (; k < kb + kcp; k += W) {  // the K tail and zero padding up to kcp (a multiple of 32)
        const int64_t valid = std::max<int64_t>(0, kend - k);
        if (sizeof(T) == 2 && kb + kcp - k == 32) {  // 32 panel columns left: no room for 64
          alignas(64) T tmp[64];
          chunk<false>(n, k, std::min<int64_t>(valid, 32), tmp - k, flags);
          std::memcpy(dst + k, tmp, 32 * sizeof(T));
        } else {
          chunk<false>(n, k, std::min(valid, W), dst, flags);
        }
      }
    }
    if (_mm512_test_epi16_mask(flags, _mm512_set1_epi16(static_cast<short>(0x8000))) != 0) t.dup = true;
  }

  // The next K block into L1/L2 (T0) and the one after it towards L2 (T1): one block ahead
  // alone left the decode waiting on memory (measured 4096x14336 M=64: decode 15 -> 8 Mcycles).
  void prefetch(int64_t n0, int64_t nc, int64_t kb, int64_t kc) const {
    const int64_t kb2 = kb + kc, kc2 = std::min(kc, a.K - kb2);
    for (int64_t j = 0; j < nc; ++j) prefetch_row<_MM_HINT_T0>(n0 + j, kb, kc);
    if (kc2 > 0)
      for (int64_t j = 0; j < nc; ++j) prefetch_row<_MM_HINT_T1>(n0 + j, kb2, kc2);
  }
  template <int Hint>
  LOWBIT_LUT4_INLINE void prefetch_row(int64_t n, int64_t kb, int64_t kc) const {
    constexpr int vbytes = VD == kFloat32 ? 4 : 2;
    const char* v = static_cast<const char*>(a.values) + (n * (a.K / 2) + kb / 2) * vbytes;
    for (int64_t o = 0; o < kc / 2 * vbytes; o += 64) _mm_prefetch(v + o, static_cast<decltype(_MM_HINT_T0)>(Hint));
    _mm_prefetch(reinterpret_cast<const char*>(a.meta + n * (a.K / 8) + kb / 8), static_cast<decltype(_MM_HINT_T0)>(Hint));
  }

  // The v0 x[m, 4g + i0] terms of the nibbles with i0 == i1 (their column holds v1).
  void finish(Tile& t, int64_t n0, int64_t nc, int64_t m0, int64_t mc, float* ct, int64_t cs) const {
    if (!t.dup) return;
    const int64_t G = a.K / 4;
    for (int64_t j = 0; j < nc; ++j) {
      const int64_t n = n0 + j;
      for (int64_t g = 0; g < G; ++g) {
        const unsigned nib = (a.meta[n * (a.K / 8) + g / 2] >> ((g & 1) * 4)) & 15u;
        if ((nib & 3u) != (nib >> 2)) continue;
        const float v = load_as_float(a.values, n * (a.K / 2) + 2 * g, VD);
        for (int64_t i = 0; i < mc; ++i)
          ct[j * cs + i] += v * load_as_float(a.x, (m0 + i) * a.x_row_stride + 4 * g + (nib & 3u), a.x_dtype);
      }
    }
  }
};

template <int VD, class T>
void run_dense(const Sparse24MatmulArgs& a, int num_threads) {
  const Lut4Io io = lut4_io(a);
  run_gemm_outer_src<T>(Sparse24PanelSource<VD, T>{a, S24Decode<T>()}, io, num_threads);
}

#endif  // LOWBIT_LUT4_AVX512

}  // namespace

// Runs sparse24_matmul with dense panels and returns true, or returns false (nothing done)
// where this build has no such path. bf16 products when x and values are both bf16 and the
// build has AVX512-BF16, float32 products otherwise.
bool LOWBIT_ISA_FN(sparse24_dense_gemm)(const Sparse24MatmulArgs& a, int num_threads) {
#if defined(LOWBIT_LUT4_AVX512)
#if defined(LOWBIT_LUT4_BF16_DOT)
  if (a.x_dtype == kBFloat16 && a.values_dtype == kBFloat16) {
    run_dense<kBFloat16, uint16_t>(a, num_threads);
    return true;
  }
#endif
  switch (a.values_dtype) {
    case kFloat32: run_dense<kFloat32, float>(a, num_threads); break;
    case kFloat16: run_dense<kFloat16, float>(a, num_threads); break;
    default: run_dense<kBFloat16, float>(a, num_threads); break;
  }
  return true;
#else
  (void)a;
  (void)num_threads;
  return false;
#endif
}

}  // namespace cpu
}  // namespace lowbit
