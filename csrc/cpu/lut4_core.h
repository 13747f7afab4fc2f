// The shared core of the 4-bit lookup-table matmuls (int4_matmul, nf4_matmul) on the CPU.
// Included by their kernel sources, so it is compiled once per instruction set (isa.h);
// everything here has internal linkage (anonymous namespace).
//
// Both formats are "a 4-bit code per weight, decoded through a 16-entry table, times a scale
// that is constant over a run of a row":
//   int4: w[n, k] = (q - zero) * scale        table T[i] = i,        zero per group
//   nf4:  w[n, k] = NF4[q] * absmax           table T[i] = NF4[i],   zero = 0
// A format (see int4_matmul_kernels.cpp / nf4_matmul_kernels.cpp) tells where the code of
// (n, k) lives (byte (n*K + k) / 2, low or high nibble first) and, for a column k of row n, the
// segment [k, end) over which scale and zero are constant. Per segment the kernels build the
// 16 decoded values lut[i] = (T[i] - zero) * scale, in float32, in the same order of operations
// as the reference, so every decoded weight is bit-identical to the reference's; a 4-bit code
// then decodes with one register permute (vpermps / vpermw / two vpermps + blend on AVX2 /
// tbl on NEON). Only the order of the float32 sums differs from the reference.
//
// Two algorithms, chosen by M:
//  * GEMV (M <= kGemvMaxM, the decode case): weights are decoded in registers and multiplied
//    straight away with float32 activations; a weight byte is read once per call and the
//    kernel streams the checkpoint layout at memory bandwidth. The two nibbles of 16 bytes give
//    two vectors (elements 0,2,4.. and 1,3,5..), so x is copied once, per chunk of kGemvChunk
//    columns, into that order ("permuted" x) instead of interleaving the weights.
//  * GEMM (larger M): per task (a tile of kNC weight rows x an M block), the weights of a
//    K block are decoded once into a panel (float32, or bfloat16 when x and out are bfloat16
//    and the CPU has AVX512-BF16) that stays in L2, then a register-blocked micro-kernel runs
//    every row of x against it. AVX-512 and AVX2 use outer-product tiles on x transposed into
//    row panels (lut4_gemm_avx512.h, lut4_gemm_avx2.h); NEON and scalar an inner-product tile
//    (kMR x rows x kNR weight rows, vectors along k, one horizontal sum per K block) that reads
//    x in place when it already has the compute dtype.
// "Fast" layouts (every segment and row a multiple of 32 columns) use the SIMD decoders;
// any other layout the format allows (e.g. nf4 with an odd K) decodes element by element
// into the panel and takes the GEMM path, so every shape is computed.
//
// Each output is summed by one thread in an order fixed by the shapes alone, so results do
// not depend on the thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "../common/dtype.h"
#include "isa.h"
#include "parallel.h"

// clang-format off
#if (LOWBIT_ISA_LEVEL == LOWBIT_ISA_AVX512 || LOWBIT_ISA_LEVEL == LOWBIT_ISA_AVX512BF16) && \
    defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define LOWBIT_LUT4_AVX512 1
#elif LOWBIT_ISA_LEVEL == LOWBIT_ISA_AVX2 && defined(__AVX2__) && defined(__FMA__)
#define LOWBIT_LUT4_AVX2 1
#elif (LOWBIT_ISA_LEVEL == LOWBIT_ISA_NEON || LOWBIT_ISA_LEVEL == LOWBIT_ISA_NEON_DOT) && \
    defined(__ARM_NEON) && defined(__aarch64__)
#define LOWBIT_LUT4_NEON 1
#else
#define LOWBIT_LUT4_SCALAR 1
#endif
// clang-format on

namespace lowbit {
namespace cpu {
namespace {

// The activations, bias and output of one call (shared by both formats).
struct Lut4Io {
  const void* x = nullptr;
  int x_dtype = kFloat32;
  int64_t x_row_stride = 0;
  const void* bias = nullptr;
  int bias_dtype = kFloat32;
  void* out = nullptr;
  int out_dtype = kFloat32;
  int64_t M = 0, N = 0, K = 0;
};

// The Lut4Io of an op's argument struct (every matmul's Args has these fields).
template <class Args>
Lut4Io lut4_io(const Args& a) {
  Lut4Io io;
  io.x = a.x;
  io.x_dtype = a.x_dtype;
  io.x_row_stride = a.x_row_stride;
  io.bias = a.bias;
  io.bias_dtype = a.bias_dtype;
  io.out = a.out;
  io.out_dtype = a.out_dtype;
  io.M = a.M;
  io.N = a.N;
  io.K = a.K;
  return io;
}

// One weight row for the GEMV: its codes and its per-segment scales and zeros as float32
// (Format::row_scales), segments of Format::seg_len() columns.
struct GemvRow {
  const uint8_t* q;
  const float* s;
  const float* z;
};

// dst[0, n) = elements [off, off + n) of an array of dtype `code`, as float32.
inline void load_f32(const void* p, int code, int64_t off, int64_t n, float* dst) {
  if (code == kFloat32) {
    std::memcpy(dst, static_cast<const float*>(p) + off, static_cast<size_t>(n) * sizeof(float));
  } else if (code == kBFloat16) {
    const uint16_t* src = static_cast<const uint16_t*>(p) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = bits_float(static_cast<uint32_t>(src[i]) << 16);
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(p) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
  }
}

// lut[i] = (T[i] - z) * s (or T[i] * s for formats without a zero), float32 as the reference.
template <class F>
inline void build_lut(const F& f, float s, float z, float* lut) {
  for (int i = 0; i < 16; ++i) lut[i] = F::kHasZero ? (f.table[i] - z) * s : f.table[i] * s;
}

// A decoded weight as a panel element: float32, or bfloat16 bits (round to nearest even).
template <class T>
inline T to_panel(float v) {
  if constexpr (sizeof(T) == 4) {
    return v;
  } else {
    return float_to_bf16(v);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace lowbit

#if defined(LOWBIT_LUT4_AVX512)
#include "lut4_avx512.h"
#elif defined(LOWBIT_LUT4_AVX2)
#include "lut4_avx2.h"
#elif defined(LOWBIT_LUT4_NEON)
#include "lut4_neon.h"
#else
#include "lut4_scalar.h"
#endif

namespace lowbit {
namespace cpu {
namespace {

constexpr int64_t kNC = 64;                     // weight rows per GEMM task
constexpr int64_t kMC = 256;                    // x rows per GEMM task
constexpr int64_t kKCBytes = 512 << 10;         // GEMM panel (kNC x KC decoded weights) budget
constexpr int64_t kMinWorkPerThread = 1 << 18;  // multiply-adds below which a thread is not worth it

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

inline void store_out(const Lut4Io& io, int64_t m, int64_t n, float acc) {
  if (io.bias) acc += load_as_float(io.bias, n, io.bias_dtype);
  store_from_float(io.out, m * io.N + n, io.out_dtype, acc);
}

// Row m of x as float32 into dst[0, K), zero-padded to dst[0, Kp).
inline void x_row_to_f32(const Lut4Io& io, int64_t m, int64_t Kp, float* dst) {
  const int64_t K = io.K;
  const int64_t base = m * io.x_row_stride;
  if (io.x_dtype == kFloat32) {
    std::memcpy(dst, static_cast<const float*>(io.x) + base, static_cast<size_t>(K) * sizeof(float));
  } else if (io.x_dtype == kBFloat16) {
    const uint16_t* src = static_cast<const uint16_t*>(io.x) + base;
    for (int64_t k = 0; k < K; ++k) dst[k] = bits_float(static_cast<uint32_t>(src[k]) << 16);
  } else {
    half_row_to_f32(static_cast<const uint16_t*>(io.x) + base, K, dst);
  }
  std::fill(dst + K, dst + Kp, 0.0f);
}

// n elements of scratch (uninitialized) that stay allocated on the calling thread for its next
// calls, one buffer per Slot and T: a multi-megabyte buffer allocated afresh on each call is
// mmapped and page-faulted (and zero-filled) again every time, measured ~5% of an M = 512
// GEMM. Requests above kKeepScratchBytes get a buffer of their own (in temp), freed with it.
constexpr size_t kKeepScratchBytes = size_t{64} << 20;
template <int Slot, class T>
T* reused_scratch(size_t n, std::unique_ptr<T[]>& temp) {
  if (n * sizeof(T) > kKeepScratchBytes) {
    temp.reset(new T[n]);
    return temp.get();
  }
  thread_local std::unique_ptr<T[]> keep;
  thread_local size_t capacity = 0;
  if (capacity < n) {
    keep.reset();
    keep.reset(new T[n]);
    capacity = n;
  }
  return keep.get();
}

// ---- GEMV -----------------------------------------------------------------------------------

// x rows [0, M) permuted per chunk of kGemvChunk columns into the order in which the ISA's
// GEMV decodes the weights (gemv_x_element), or in natural order (chunk 0): float32, or
// bfloat16 bits for the bfloat16 GEMV (x is bfloat16 then).
template <class F, class T>
void permute_x(const F& f, const Lut4Io& io, std::vector<T>& xp) {
  (void)f;
  const int64_t K = io.K;
  int64_t C = kGemvChunk;
  int64_t perm[128];
  if constexpr (sizeof(T) == 4) {
    for (int64_t p = 0; p < C; ++p) perm[p] = gemv_x_element<F::kHighFirst>(p);
  } else {
#if defined(LOWBIT_LUT4_BF16_DOT)
    const bool quad = gemv_quad_bf16(f.seg_len());
    C = quad ? 128 : 32;
    for (int64_t p = 0; p < C; ++p)
      perm[p] = quad ? gemv_x_element_quad<F::kHighFirst>(p) : gemv_x_element_bf16<F::kHighFirst>(p);
#endif
  }
  std::vector<float> row(static_cast<size_t>(K));
  for (int64_t m = 0; m < io.M; ++m) {
    T* dst = xp.data() + m * K;
    if constexpr (sizeof(T) == 2) {
      const uint16_t* src = static_cast<const uint16_t*>(io.x) + m * io.x_row_stride;
      for (int64_t c = 0; c < K; c += C)
        for (int64_t p = 0; p < C; ++p) dst[c + p] = src[c + perm[p]];
    } else if (C == 0) {
      x_row_to_f32(io, m, K, dst);
    } else {
      x_row_to_f32(io, m, K, row.data());
      for (int64_t c = 0; c < K; c += C)
        for (int64_t p = 0; p < C; ++p) dst[c + p] = row[c + perm[p]];
    }
  }
}

template <int MR, class F, class T>
void gemv_rows(const F& f, const Lut4Io& io, const T* xp, int64_t r0, int64_t r1, float* params) {
  constexpr int NR = gemv_nr<MR, T>();
  const int64_t K = io.K, L = f.seg_len(), nseg = K / L;
  const T* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = xp + m * K;
  GemvRow rows[NR];
  for (int r = 0; r < NR; ++r) rows[r] = GemvRow{nullptr, params + 2 * r * nseg, params + (2 * r + 1) * nseg};
  float res[MR * NR];
  auto block = [&](auto nr, int64_t n) {
    constexpr int R = decltype(nr)::value;
    for (int r = 0; r < R; ++r) {
      rows[r].q = f.q + (((n + r) * K) >> 1);
      f.row_scales(n + r, const_cast<float*>(rows[r].s), const_cast<float*>(rows[r].z));
    }
    if constexpr (sizeof(T) == 4) {
      gemv_block<R, MR>(f, rows, K, L, xr, res);
    } else {
#if defined(LOWBIT_LUT4_BF16_DOT)
      gemv_block_bf16<R, MR>(f, rows, K, L, xr, res);
#endif
    }
  };
#if defined(LOWBIT_LUT4_AVX512) || defined(LOWBIT_LUT4_AVX2)
  // The loop prefetches gemv_prefetch_bytes ahead: fetch the start of this run of rows too.
  const char* q0 = reinterpret_cast<const char*>(f.q + ((r0 * K) >> 1));
  const int64_t pro = std::min(gemv_prefetch_bytes(K), ((r1 - r0) * K) >> 1);
  for (int64_t o = 0; o < pro; o += 64) _mm_prefetch(q0 + o, _MM_HINT_T0);
#endif
  int64_t n = r0;
  for (; n + NR <= r1; n += NR) {
    block(std::integral_constant<int, NR>(), n);
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) store_out(io, m, n + r, res[m * NR + r]);
  }
  for (; n < r1; ++n) {
    block(std::integral_constant<int, 1>(), n);
    for (int m = 0; m < MR; ++m) store_out(io, m, n, res[m]);
  }
}

template <class F, class T, int MR>
void gemv_dispatch(const F& f, const Lut4Io& io, const T* xp, int64_t r0, int64_t r1, float* params) {
  if (io.M == MR) {
    gemv_rows<MR>(f, io, xp, r0, r1, params);
  } else if constexpr (MR < gemv_max_m<T>()) {
    gemv_dispatch<F, T, MR + 1>(f, io, xp, r0, r1, params);
  }
}

template <class F, class T>
void run_gemv_typed(const F& f, const Lut4Io& io, int num_threads) {
  std::vector<T> xp(static_cast<size_t>(io.M * io.K));
  permute_x(f, io, xp);
  const double work = static_cast<double>(io.M) * static_cast<double>(io.N) * static_cast<double>(io.K);
  const int threads = threads_for(work, kMinWorkPerThread, num_threads);
  // Per thread: scales and zeros of up to 4 rows (GemvRow).
  const int64_t nseg = io.K / f.seg_len();
  std::vector<float> params(static_cast<size_t>(threads * 8 * nseg));
  // Chunks of 32 rows (a multiple of every NR), ~4 per thread: each is one sequential stream;
  // 8 or more per thread measured 1-5% slower at M = 1 (each new stream starts cold).
  const int64_t rows = std::max<int64_t>(32, round_up(io.N / (4 * threads), 32));
  const int64_t tasks = (io.N + rows - 1) / rows;
  parallel_for(tasks, threads, [&](int64_t t, int thread) {
    const int64_t r0 = t * rows, r1 = std::min(io.N, r0 + rows);
    float* pp = params.data() + thread * 8 * nseg;
    gemv_dispatch<F, T, 1>(f, io, xp.data(), r0, r1, pp);
  });
}

// ---- GEMM -----------------------------------------------------------------------------------

// Decodes rows [n0, n0 + nr), columns [kb, kb + kc) (kb + kc <= K) of W into panel[nr][kcp]
// in natural column order, zero-padded to kcp columns. T is float or uint16_t (bf16 bits).
template <class F, class T>
void decode_panel(const F& f, bool fast, int64_t n0, int64_t nr, int64_t kb, int64_t kc, int64_t kcp, T* panel) {
  const int64_t K = f.K;
  alignas(64) float lut[16];
  for (int64_t j = 0; j < nr; ++j) {
    const int64_t n = n0 + j;
    T* dst = panel + j * kcp - kb;  // dst[k] for k in [kb, kb + kc)
    int64_t k = kb;
    while (k < kb + kc) {
      float s, z;
      const int64_t end = std::min(f.segment(n, k, s, z), kb + kc);
      build_lut(f, s, z, lut);
      if (fast) {  // k, end multiples of 32, n*K even
        decode_run<F::kHighFirst>(f.q + ((n * K + k) >> 1), lut, (end - k) / 32, dst + k);
        k = end;
        continue;
      }
      for (; k < end; ++k) {  // any layout: element by element
        const int64_t e = n * K + k;
        const uint8_t b = f.q[e >> 1];
        const int nib = ((e & 1) != 0) != F::kHighFirst ? (b >> 4) : (b & 15);
        dst[k] = to_panel<T>(lut[nib]);
      }
    }
    std::fill(panel + j * kcp + kc, panel + (j + 1) * kcp, to_panel<T>(0.0f));
  }
}

#if !defined(LOWBIT_LUT4_AVX512) && !defined(LOWBIT_LUT4_AVX2)  // own GEMMs: lut4_gemm_avx512.h, lut4_gemm_avx2.h
template <class T>
struct GemmX {      // the x operand of the GEMM micro-kernel: rows of T with a stride, kp columns
  const T* data;
  int64_t stride;
};

template <class T>
void micro_dispatch(int mr, int nr, const T* const* xr, const T* w, int64_t ws, int64_t kc, float* c, int64_t cs) {
  // kMR, kNR <= 4 on every ISA: one switch over the 16 shapes.
#define LOWBIT_LUT4_MICRO(a, b)                             \
  case (a - 1) * 4 + (b - 1):                               \
    if constexpr (a <= kMR && b <= kNR) micro<a, b>(xr, w, ws, kc, c, cs); \
    return;
  switch ((mr - 1) * 4 + (nr - 1)) {
    LOWBIT_LUT4_MICRO(1, 1) LOWBIT_LUT4_MICRO(1, 2) LOWBIT_LUT4_MICRO(1, 3) LOWBIT_LUT4_MICRO(1, 4)
    LOWBIT_LUT4_MICRO(2, 1) LOWBIT_LUT4_MICRO(2, 2) LOWBIT_LUT4_MICRO(2, 3) LOWBIT_LUT4_MICRO(2, 4)
    LOWBIT_LUT4_MICRO(3, 1) LOWBIT_LUT4_MICRO(3, 2) LOWBIT_LUT4_MICRO(3, 3) LOWBIT_LUT4_MICRO(3, 4)
    LOWBIT_LUT4_MICRO(4, 1) LOWBIT_LUT4_MICRO(4, 2) LOWBIT_LUT4_MICRO(4, 3) LOWBIT_LUT4_MICRO(4, 4)
    default: return;
  }
#undef LOWBIT_LUT4_MICRO
}

template <class T>
struct GemmScratch {
  std::vector<T> panel;     // [kNC][KC]
  std::vector<float> ctile;  // [kMC][kNC]
};

template <class F, class T>
void run_gemm_typed(const F& f, const Lut4Io& io, bool fast, int num_threads) {
  const int64_t M = io.M, N = io.N, K = io.K;
  const int64_t Kp = round_up(K, 32);
  const double work = static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
  const int threads = threads_for(work, kMinWorkPerThread, num_threads);

  // x in the compute dtype, Kp columns (zero-padded): in place when it already is.
  constexpr int want_dtype = sizeof(T) == 4 ? kFloat32 : kBFloat16;
  GemmX<T> x{static_cast<const T*>(io.x), io.x_row_stride};
  std::unique_ptr<T[]> xbuf_temp;
  if (io.x_dtype != want_dtype || K != Kp) {
    T* const xbuf = reused_scratch<0>(static_cast<size_t>(M * Kp), xbuf_temp);
    const int64_t rows = std::max<int64_t>(1, (1 << 16) / Kp);
    parallel_for((M + rows - 1) / rows, threads, [&](int64_t t, int) {
      for (int64_t m = t * rows; m < std::min(M, (t + 1) * rows); ++m) {
        T* dst = xbuf + m * Kp;
        if constexpr (sizeof(T) == 4) {
          x_row_to_f32(io, m, Kp, dst);
        } else {  // bf16 x, only K % 32 != 0 brings us here
          std::memcpy(dst, static_cast<const T*>(io.x) + m * io.x_row_stride, static_cast<size_t>(K) * sizeof(T));
          std::fill(dst + K, dst + Kp, T(0));
        }
      }
    });
    x = GemmX<T>{xbuf, Kp};
  }

  const int64_t KC = std::min(Kp, std::max<int64_t>(32, kKCBytes / (kNC * static_cast<int64_t>(sizeof(T))) / 32 * 32));
  const int64_t ntiles = (N + kNC - 1) / kNC, mblocks = (M + kMC - 1) / kMC;
  const int64_t mc_max = std::min(M, kMC);
  std::vector<GemmScratch<T>> scratch(static_cast<size_t>(threads));
  for (auto& s : scratch) {
    s.panel.resize(static_cast<size_t>(kNC * KC));
    s.ctile.resize(static_cast<size_t>(mc_max * kNC));
  }
  parallel_for(ntiles * mblocks, threads, [&](int64_t t, int thread) {
    GemmScratch<T>& s = scratch[static_cast<size_t>(thread)];
    const int64_t n0 = (t / mblocks) * kNC, nc = std::min(kNC, N - n0);
    const int64_t m0 = (t % mblocks) * kMC, mc = std::min(kMC, M - m0);
    std::fill(s.ctile.begin(), s.ctile.begin() + mc * kNC, 0.0f);
    for (int64_t kb = 0; kb < Kp; kb += KC) {
      const int64_t kcp = std::min(KC, Kp - kb);
      decode_panel(f, fast, n0, nc, kb, std::min(kcp, K - kb), kcp, s.panel.data());
      for (int64_t i = 0; i < mc; i += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, mc - i));
        const T* xr[kMR];
        for (int r = 0; r < mr; ++r) xr[r] = x.data + (m0 + i + r) * x.stride + kb;
        for (int64_t j = 0; j < nc; j += kNR) {
          const int nr = static_cast<int>(std::min<int64_t>(kNR, nc - j));
          micro_dispatch<T>(mr, nr, xr, s.panel.data() + j * kcp, kcp, kcp, s.ctile.data() + i * kNC + j, kNC);
        }
      }
    }
    for (int64_t i = 0; i < mc; ++i)
      for (int64_t j = 0; j < nc; ++j) store_out(io, m0 + i, n0 + j, s.ctile[static_cast<size_t>(i * kNC + j)]);
  });
}
#endif

}  // namespace
}  // namespace cpu
}  // namespace lowbit

#if defined(LOWBIT_LUT4_AVX512)
#include "lut4_gemm_avx512.h"
#elif defined(LOWBIT_LUT4_AVX2)
#include "lut4_gemm_avx2.h"
#endif

namespace lowbit {
namespace cpu {
namespace {

template <class F>
void run_lut4(const F& f, const Lut4Io& io, int num_threads) {
  const bool fast = f.fast();
#if defined(LOWBIT_LUT4_BF16_DOT)
  // bfloat16 products (weights rounded to bfloat16) only when x and the result are bfloat16.
  if (io.x_dtype == kBFloat16 && io.out_dtype == kBFloat16) {
    if (fast && io.M <= gemv_max_m<uint16_t>()) {
      run_gemv_typed<F, uint16_t>(f, io, num_threads);
    } else {
      run_gemm_outer<F, uint16_t>(f, io, fast, num_threads);
    }
    return;
  }
#endif
  if (fast && io.M <= gemv_max_m<float>()) {
    run_gemv_typed<F, float>(f, io, num_threads);
    return;
  }
#if defined(LOWBIT_LUT4_AVX512) || defined(LOWBIT_LUT4_AVX2)
  run_gemm_outer<F, float>(f, io, fast, num_threads);
#else
  run_gemm_typed<F, float>(f, io, fast, num_threads);
#endif
}

}  // namespace
}  // namespace cpu
}  // namespace lowbit
