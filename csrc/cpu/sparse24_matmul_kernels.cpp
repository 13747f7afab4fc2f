// CPU kernels for sparse24_matmul (2:4 sparse weights), compiled once per instruction set
// (see isa.h). They read the checkpoint layout directly (no repack).
//
// Two families, both threaded over N (output features) with parallel_for:
//
// 1. Gather kernels (small M, decode). A tile of kNR = 4 weight rows is walked along K against
//    up to kMR = 4 rows of x at once. For each block of columns the 2-bit in-group indices of
//    the meta bytes are turned into permutation indices with a few vector ops (broadcast the
//    meta word, per-lane variable shift, `& 3 | 4 * group`), and x is gathered from a window
//    held in two registers with one permute, then multiplied by the stored values:
//      * AVX-512, fp32 math: 32 columns (16 values, 4 meta bytes) per step,
//        `vpermt2ps` over a 32-float window, `vfmadd`;
//      * AVX512_BF16 (x and values both bf16): 64 columns (32 values, 8 meta bytes) per step,
//        `vpshufb` + `vpsrlvw` decode, `vpermt2w` over a 64-bf16 window, `vdpbf16ps` (fp32
//        accumulation of exact bf16 products);
//      * AVX2: 16 columns (8 values) per step, two `vpermps` + a fixed blend, `vfmadd`;
//      * NEON: 8 columns (4 values) per step, the 4 x values picked by index, `vfmaq_f32`;
//      * scalar: plain C++, 8 partial sums (the behaviour of record).
//    The weight stream is read once; x stays in L1/L2. At M = 1 this is memory-bound.
//    Row kernels (bf16 x and values, M = 1, or M <= 4 while x fits in 32 KiB: use_gemv): the
//    same AVX512_BF16 step for one weight row at a time, each thread walking ~4 contiguous runs
//    of rows, so that its weight reads are two sequential streams (values, meta) instead of
//    the tiles' 8; 4 accumulator chains at M = 1, 4 KiB software prefetch (run_gemv). Measured
//    cold at M = 1: 51-54 GB/s against the tiles' 36-44.
//
// 2. Outer-product kernels (larger M: kXtMinM / kXpMinM and up; AVX-512 and AVX2). Instead of
//    gathering x for each weight row, x is arranged into a small table per block of x rows
//    (MC = 4 vectors) and groups (KG), in which the x operand of any stored weight is one
//    aligned vector of x rows:
//      * bf16 (AVX512_BF16): XP[g][slot][m] = the bf16 pair (x[m, 4g + i0], x[m, 4g + i1]) of
//        the slot's nibble (the 6 legal pairs; the 10 illegal nibbles get extra slots, built only
//        for K blocks that hold one), so a stored value pair (one dword of `values`) times 16
//        rows of x is one `vdpbf16ps` of a broadcast weight dword and the slot's vector: no
//        shuffle in the inner loop, and half the multiplies of a dense GEMM;
//      * fp32: XT[c][m] = x[m, c], one broadcast value times one table vector per `vfmadd`.
//    The weights are packed per K block into [row][group] entries holding the slot's byte
//    offset and the value(s) (vectorized: nibble -> offset by vpermd tables), so the micro-tile
//    (NR weight rows x 4 vectors of x rows, accumulators in registers) only loads an offset,
//    broadcasts the weight and runs its loads and multiply-adds. Loop blocking (run_outer)
//    keeps one table in L1, the packed panel in L2 and the partial sums in a per-thread buffer.
//
// Every path computes sum_g v0 * x[4g + (nib & 3)] + v1 * x[4g + (nib >> 2)] for whatever the
// nibble holds, so illegal metadata gives a defined (meaningless) result, never an
// out-of-bounds read. fp32 activations are computed in fp32 (values widened exactly); bf16
// products (vdpbf16ps) are used only when x and values are both bf16. Results do not depend
// on the thread count.
//
// 3. Dense panels (AVX-512; sparse24_dense_kernels.cpp): the 2:4 rows decoded per K block into
//    dense bf16 / float32 panels for the int4/nf4 outer-product GEMM; it replaces family 2
//    where it measured faster (bf16 M >= 256, float32 math 16 <= M < 512; see the dispatch).
//
// Parts of this file, included inside its anonymous namespace: sparse24_gather.h (the gather
// tiles of family 1) and sparse24_table.h (the outer-product kernels of family 2).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/sparse24_matmul.h"
#include "isa.h"
#include "parallel.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 headers pass _mm512_undefined_*() as the masked-off source of many
// intrinsics and then warn about it (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define LOWBIT_S24_AVX512 1
#endif
#if defined(LOWBIT_S24_AVX512) && defined(__AVX512BF16__)
#define LOWBIT_S24_BF16 1
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(LOWBIT_S24_AVX512)
#define LOWBIT_S24_AVX2 1
#endif

namespace lowbit {
namespace cpu {
namespace {

constexpr int kNR = 4;                          // weight rows per gather tile
constexpr int kMR = 4;                          // x rows per gather pass
constexpr int64_t kMinWorkPerThread = 1 << 18;  // stored-value multiply-adds below which a thread is not worth it
constexpr int64_t kMinChunkTiles = 8;           // gather: weight tiles per work item, at least
constexpr int kGatherPrefetchBytes = 512;       // gather: prefetch distance along each weight row's values
constexpr int kGemvMaxM = 4;                    // row kernels (run_gemv): M up to this, and
constexpr int64_t kGemvMaxXBytes = 32 << 10;    // row kernels: M x rows up to this size (L1)
// Row kernels: prefetch distance along the values stream (measured cold, M = 1: 2 KiB -8%,
// 6-8 KiB within noise of 4 KiB), and contiguous runs of rows per thread (2-16: within noise).
constexpr int64_t kGemvPrefetchBytes = 4096;
constexpr int64_t kGemvRunsPerThread = 4;

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float sum8(const float* p) {  // fixed order
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

// sum over groups [g0, g1) of row n: v0 * x[4g + (nib & 3)] + v1 * x[4g + (nib >> 2)], with x a
// row of dtype XD and values of dtype VD (compile-time, so load_as_float's switch folds away).
template <int XD, int VD>
float dot_groups(const Sparse24MatmulArgs& a, int64_t n, const void* xrow, int64_t g0, int64_t g1) {
  const uint8_t* meta = a.meta + n * (a.K / 8);
  const int64_t voff = n * (a.K / 2);
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t g = g0; g < g1; ++g) {
    const unsigned nib = (meta[g >> 1] >> ((g & 1) * 4)) & 15u;
    const float v0 = load_as_float(a.values, voff + 2 * g, VD);
    const float v1 = load_as_float(a.values, voff + 2 * g + 1, VD);
    const float x0 = load_as_float(xrow, 4 * g + (nib & 3u), XD);
    const float x1 = load_as_float(xrow, 4 * g + (nib >> 2), XD);
    part[g & 7] += v0 * x0 + v1 * x1;
  }
  return sum8(part);
}

#include "sparse24_gather.h"

// ------------------------------------------------------------------------------------------
// Gather driver: work items are chunks of kNR-row tiles; each tile runs against x in passes
// of up to kMR rows. `xrows` are M row pointers (fp32 rows, or bf16 rows for the bf16 tile).

struct GatherPlan {
  int64_t tiles, chunk_tiles, chunks;
  int threads;
};

GatherPlan make_gather_plan(const Sparse24MatmulArgs& a, int num_threads) {
  GatherPlan p{};
  p.tiles = (a.N + kNR - 1) / kNR;
  const double work = static_cast<double>(a.M) * static_cast<double>(a.N) * static_cast<double>(a.K / 2);
  int64_t t = std::max(1, num_threads);
  t = std::min<int64_t>(t, std::max<int64_t>(1, static_cast<int64_t>(work / kMinWorkPerThread)));
  t = std::min<int64_t>(t, std::max<int64_t>(1, p.tiles / kMinChunkTiles));
  p.threads = static_cast<int>(t);
  p.chunk_tiles = t == 1 ? p.tiles : std::max<int64_t>(kMinChunkTiles, p.tiles / (8 * t));
  p.chunks = (p.tiles + p.chunk_tiles - 1) / p.chunk_tiles;
  return p;
}

inline void store_out(const Sparse24MatmulArgs& a, int64_t m, int64_t n, float y) {
  if (a.bias) y += load_as_float(a.bias, n, a.bias_dtype);
  store_from_float(a.out, m * a.N + n, a.out_dtype, y);
}

// The row kernels (run_gemv) beat the gather tiles while the x rows (as the kernel reads them,
// x_bytes an element) stay in L1: measured cold, M = 1 always; M = 2-4 at K = 4096 (1.2x), not at
// K = 14336 (x from L2 for every weight row: 1.3-1.8x slower than the tiles, which share x
// between 4 rows); M = 8 on neither (compute-bound, the tiles amortize the x loads).
inline bool use_gemv(const Sparse24MatmulArgs& a, int64_t x_bytes) {
  return a.M == 1 || (a.M <= kGemvMaxM && a.M * a.K * x_bytes <= kGemvMaxXBytes);
}

// tile(rows, xr, R, out) computes one kNR x R block.
template <class XT, class TileFn>
void run_gather(const Sparse24MatmulArgs& a, int num_threads, const XT* const* xrows, const TileFn& tile) {
  const GatherPlan p = make_gather_plan(a, num_threads);
  parallel_for(p.chunks, p.threads, [&](int64_t c, int) {
    const int64_t t_end = std::min(p.tiles, (c + 1) * p.chunk_tiles);
    for (int64_t t = c * p.chunk_tiles; t < t_end; ++t) {
      const int64_t n0 = t * kNR;
      const int64_t nr = std::min<int64_t>(kNR, a.N - n0);
      int64_t rows[kNR];
      for (int i = 0; i < kNR; ++i) rows[i] = std::min(n0 + i, a.N - 1);  // a short tile repeats its last row
      for (int64_t m0 = 0; m0 < a.M; m0 += kMR) {
        const int R = static_cast<int>(std::min<int64_t>(kMR, a.M - m0));
        float out[kNR][kMR];
        tile(rows, xrows + m0, R, out);
        for (int64_t i = 0; i < nr; ++i)
          for (int r = 0; r < R; ++r) store_out(a, m0 + r, n0 + i, out[i][r]);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// Row driver (small M): each thread walks ~kGemvRunsPerThread contiguous runs of weight rows,
// one row at a time, so that its weight reads are one sequential stream per array (values,
// meta), which the hardware prefetchers follow; the first lines of a run are prefetched when
// it starts, and the row kernel prefetches kGemvPrefetchBytes ahead (into the next rows).
// row(n, xr, R, out): out[r] = dot(weight row n, x row xr[r]) for r < R = M <= kGemvMaxM.
template <class XT, class RowFn>
void run_gemv(const Sparse24MatmulArgs& a, int num_threads, const XT* const* xrows, int64_t value_bytes,
              const RowFn& row) {
  const int64_t K = a.K;
  const double work = static_cast<double>(a.M) * static_cast<double>(a.N) * static_cast<double>(K / 2);
  int64_t t = std::max(1, num_threads);
  t = std::min<int64_t>(t, std::max<int64_t>(1, static_cast<int64_t>(work / kMinWorkPerThread)));
  const int64_t run_rows = std::max<int64_t>(1, (a.N + kGemvRunsPerThread * t - 1) / (kGemvRunsPerThread * t));
  const int64_t runs = (a.N + run_rows - 1) / run_rows;
  const int64_t row_bytes = (K / 2) * value_bytes;
  parallel_for(runs, static_cast<int>(t), [&](int64_t run, int) {
    const int64_t r0 = run * run_rows, r1 = std::min(a.N, r0 + run_rows);
#if defined(LOWBIT_S24_AVX512) || defined(LOWBIT_S24_AVX2)
    const char* v0 = static_cast<const char*>(a.values) + r0 * row_bytes;
    const char* m0 = reinterpret_cast<const char*>(a.meta + r0 * (K / 8));
    const int64_t vb = std::min(kGemvPrefetchBytes, (r1 - r0) * row_bytes);
    const int64_t mb = std::min(kGemvPrefetchBytes / (4 * value_bytes), (r1 - r0) * (K / 8));  // meta: 1/8 byte a column
    for (int64_t o = 0; o < vb; o += 64) _mm_prefetch(v0 + o, _MM_HINT_T0);
    for (int64_t o = 0; o < mb; o += 64) _mm_prefetch(m0 + o, _MM_HINT_T0);
#endif
    for (int64_t n = r0; n < r1; ++n) {
      float out[kGemvMaxM];
      row(n, xrows, static_cast<int>(a.M), out);
      for (int64_t m = 0; m < a.M; ++m) store_out(a, m, n, out[m]);
    }
  });
}

template <template <int, int> class F, int VD>
struct DispatchR {
  template <class... Args>
  static void run(int R, Args&&... args) {
    switch (R) {
      case 1: F<1, VD>::call(args...); break;
      case 2: F<2, VD>::call(args...); break;
      case 3: F<3, VD>::call(args...); break;
      default: F<4, VD>::call(args...); break;
    }
  }
};

template <int R, int VD>
struct GatherTileF32 {
  static void call(const Sparse24MatmulArgs& a, const int64_t* rows, const float* const* xr, float (*out)[kMR]) {
#if LOWBIT_ISA_LEVEL == LOWBIT_ISA_SCALAR
    gather_tile_scalar<R, VD>(a, rows, xr, out);
#else
    gather_tile<R, VD>(a, rows, xr, out);
#endif
  }
};

// fp32 math: x rows as fp32 (converted once, if needed), any values dtype.
template <int VD>
void run_gather_f32(const Sparse24MatmulArgs& a, int num_threads, const float* const* xrows) {
  run_gather(a, num_threads, xrows, [&](const int64_t* rows, const float* const* xr, int R, float(*out)[kMR]) {
    DispatchR<GatherTileF32, VD>::run(R, a, rows, xr, out);
  });
}

#if defined(LOWBIT_S24_BF16)
template <int R>
struct GemvRowBf16 {
  static void call(const Sparse24MatmulArgs& a, int64_t n, const uint16_t* const* xr, float* out) {
    gemv_row_bf16<R>(a, n, xr, out);
  }
};

template <template <int> class F, class... Args>
void dispatch_gemv_r(int R, Args&&... args) {
  static_assert(kGemvMaxM == 4, "one case per R");
  switch (R) {
    case 1: F<1>::call(args...); break;
    case 2: F<2>::call(args...); break;
    case 3: F<3>::call(args...); break;
    default: F<4>::call(args...); break;
  }
}

template <int R, int VD>
struct GatherTileBf16 {
  static void call(const Sparse24MatmulArgs& a, const int64_t* rows, const uint16_t* const* xr, float (*out)[kMR]) {
    gather_tile_bf16<R>(a, rows, xr, out);
  }
};
#endif

#include "sparse24_table.h"

// ------------------------------------------------------------------------------------------

// x rows as fp32 row pointers: x itself if fp32, else a converted copy in `buf`.
std::vector<const float*> fp32_rows(const Sparse24MatmulArgs& a, std::vector<float>& buf) {
  std::vector<const float*> rows(static_cast<size_t>(a.M));
  if (a.x_dtype == kFloat32) {
    for (int64_t m = 0; m < a.M; ++m) rows[m] = static_cast<const float*>(a.x) + m * a.x_row_stride;
    return rows;
  }
  buf.resize(static_cast<size_t>(a.M * a.K));
  for (int64_t m = 0; m < a.M; ++m) {
    float* dst = buf.data() + m * a.K;
    const uint16_t* src = static_cast<const uint16_t*>(a.x) + m * a.x_row_stride;
    if (a.x_dtype == kFloat16) {
      for (int64_t k = 0; k < a.K; ++k) dst[k] = half_to_float(src[k]);
    } else {
      for (int64_t k = 0; k < a.K; ++k) dst[k] = bf16_to_float(src[k]);
    }
    rows[m] = dst;
  }
  return rows;
}

template <int VD>
void run_f32_math(const Sparse24MatmulArgs& a, int num_threads) {
#if defined(LOWBIT_S24_AVX512) || defined(LOWBIT_S24_AVX2)
  if (a.M >= kXtMinM) {
    switch (a.x_dtype) {
      case kFloat32: run_outer<XtKernel<kFloat32, VD>>(a, num_threads); return;
      case kFloat16: run_outer<XtKernel<kFloat16, VD>>(a, num_threads); return;
      default: run_outer<XtKernel<kBFloat16, VD>>(a, num_threads); return;
    }
  }
#endif
  std::vector<float> buf;
  const std::vector<const float*> rows = fp32_rows(a, buf);
  run_gather_f32<VD>(a, num_threads, rows.data());
}

}  // namespace

// sparse24_dense_kernels.cpp: dense panels + the int4/nf4 outer-product GEMM (AVX-512 builds;
// returns false, doing nothing, on the others). Measured in lowbit.bench (Zen 5, 2 threads,
// 4096x14336, 14336x4096, 4096x4096; weights cold): bf16 M = 64 dense 0.71-0.72x F.linear bf16
// against 0.89-1.02x for the XP kernel (the decode waits on memory), M = 256 0.84-0.87x against
// 0.79-0.90x, M = 512 0.85-0.89x; float32 math 1.1-1.5x the XT kernel at M = 16 and 64.
bool LOWBIT_ISA_FN(sparse24_dense_gemm)(const Sparse24MatmulArgs& a, int num_threads);
constexpr int64_t kDenseMinMBf16 = 256;  // bf16 x and values: the XP kernel below, the gather kernel below 32
constexpr int64_t kDenseMinMF32 = 16;
constexpr int64_t kDenseMaxMF32 = 512;

void LOWBIT_ISA_FN(sparse24_matmul_kernel)(const Sparse24MatmulArgs& a, int num_threads) {
  // All allocation happens here and in the run_* set-up, on the calling thread (a bad_alloc
  // becomes MemoryError); the tasks only compute and cannot throw.
  // Dense panels (AVX-512) from kDenseMinM* x rows; with float32 math only below kDenseMaxMF32
  // (the XT outer-product kernel measured as fast or faster from there).
  {
#if defined(LOWBIT_S24_BF16)
    const bool bf16 = a.x_dtype == kBFloat16 && a.values_dtype == kBFloat16;  // bf16 products
#else
    const bool bf16 = false;
#endif
    if (a.M >= (bf16 ? kDenseMinMBf16 : kDenseMinMF32) && (bf16 || a.M < kDenseMaxMF32) &&
        LOWBIT_ISA_FN(sparse24_dense_gemm)(a, num_threads))
      return;
  }
#if defined(LOWBIT_S24_BF16)
  if (a.x_dtype == kBFloat16 && a.values_dtype == kBFloat16) {
    if (a.M >= kXpMinM) {
      run_outer<XpKernel>(a, num_threads);
      return;
    }
    std::vector<const uint16_t*> rows(static_cast<size_t>(a.M));
    for (int64_t m = 0; m < a.M; ++m) rows[m] = static_cast<const uint16_t*>(a.x) + m * a.x_row_stride;
    if (use_gemv(a, 2)) {
      run_gemv(a, num_threads, rows.data(), 2, [&](int64_t n, const uint16_t* const* xr, int R, float* out) {
        dispatch_gemv_r<GemvRowBf16>(R, a, n, xr, out);
      });
      return;
    }
    run_gather(a, num_threads, rows.data(),
               [&](const int64_t* r, const uint16_t* const* xr, int R, float(*out)[kMR]) {
                 DispatchR<GatherTileBf16, kBFloat16>::run(R, a, r, xr, out);
               });
    return;
  }
#endif
  switch (a.values_dtype) {
    case kFloat32: run_f32_math<kFloat32>(a, num_threads); break;
    case kFloat16: run_f32_math<kFloat16>(a, num_threads); break;
    default: run_f32_math<kBFloat16>(a, num_threads); break;
  }
}

}  // namespace cpu
}  // namespace lowbit
