// The CUDA 4-bit weight kernels (int4, nf4) on the repacked layout of csrc/common/w4_matmul.h.
// Included by one .cu file per (format, activation dtype), which instantiates w4_launch and
// w4_dequant_launch for its pair (so that nvcc compiles the four in parallel).
//
// w4_mma_kernel: "swap AB" tensor-core GEMM for small and medium M. The weight is the A operand
// of mma.m16n8k16 (16 weight rows x 16 k) and the activations the B operand (16 k x 8 tokens),
// so one MMA serves up to 8 tokens and nothing is wasted on padding M to 16.
//   * A warp owns R row tiles (16R weight rows) and NT token tiles (8NT tokens); a block has
//     W warps (16RW rows) and a grid (token tiles, row blocks, K splits).
//   * Weights stream by cp.async into a per-warp ring of P k blocks in shared memory: each
//     lane's 16-byte copy is its A fragments for 4 k steps (512 contiguous bytes per warp), a
//     lane reads back only its own slots, and the copies carry an L2 evict-first policy (each
//     weight byte is read once a call).
//   * Dequantization in registers: int4 codes land in the mantissa of fp16 1024+q / bf16
//     128+q (lop3 mask-or), one exact fma removes the offset, one fma applies scale and
//     -zero*scale. nf4: each byte of codes indexes a 256-entry table of code pairs in shared
//     memory with one copy per lane (bank = lane: conflict free), then one fma by the absmax.
//   * The activations of a lane are 16 contiguous halves per k block (the layout permutes k
//     inside a block to make it so). The block copies each k block's [8NT x 64] activation
//     tile into a shared ring alongside the weights (kSmemX; one barrier a k block), and each
//     dequantized A fragment feeds all NT token tiles. kRegX instead loads a lane's own
//     activations into registers (no barrier): int4 at M <= 8 when K splits are short.
//   * Split K (small-N shapes, to fill every SM) on Hopper reduces through distributed shared
//     memory: the K splits of a tile form one thread block cluster; each block parks its fp32
//     partial tile in shared memory, and after a cluster barrier each reduces 1/S of the tile
//     over all S blocks in a fixed order (deterministic), adds the bias and stores. No
//     workspace, no atomics, no host synchronization: safe under CUDA graph capture and on any
//     stream. Before Hopper the grid has no K split.
// w4_dequant_kernel: the dense weight [N, K] in the activation dtype, with the same arithmetic,
// for large M (the Python backend then calls cuBLAS through torch).
#pragma once

#include <cooperative_groups.h>
#include <cuda.h>  // CUtensorMap (the driver function is fetched at run time: no -lcuda)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>

#include "../common/dtype.h"
#include "../common/w4_matmul.h"
#include "../common/w4_sk_plan.h"
#include "cuda_util.h"
#include "w4_launch.h"
#include "wgmma_ops.cuh"

namespace lowbit {
namespace cuda {
namespace w4 {
namespace {

// bitsandbytes' NF4 code values (lowbit.formats.nf4.NF4_CODE).
__constant__ float kNF4Code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

// (a & b) | c in one instruction (the compiler splits it in two when b and c are immediates).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <int DT>
struct Act;

template <>
struct Act<kFloat16> {
  static constexpr uint32_t kMagic = 0x64006400u;     // (1024, 1024): q lands in the mantissa
  static constexpr uint32_t kNegMagic = 0xE400E400u;  // (-1024, -1024)
  static constexpr uint32_t kOne = 0x3C003C00u;
  static constexpr uint32_t kNegZero = 0x80008000u;
  __device__ __forceinline__ static uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(lo))) |
           (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(hi))) << 16);
  }
  __device__ __forceinline__ static uint16_t from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Act<kBFloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;     // (128, 128): 7 mantissa bits hold q
  static constexpr uint32_t kNegMagic = 0xC300C300u;  // (-128, -128)
  static constexpr uint32_t kOne = 0x3F803F80u;
  static constexpr uint32_t kNegZero = 0x80008000u;
  __device__ __forceinline__ static uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
  }
  __device__ __forceinline__ static uint16_t from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Per-lane scale data of one row tile and group: int4 (scale, -zero*scale) for rows g and
// g+8; nf4 (absmax of row g, absmax of row g+8).
template <int FMT>
struct ScaleT {
  using type = uint2;
};
template <>
struct ScaleT<kW4NF4> {
  using type = uint32_t;
};

// Kernel arguments (by value, in the constant bank).
struct Params {
  const void* x;
  int64_t x_row_stride;  // elements
  const uint4* w;        // packed_w, one uint4 per (row tile, k block, lane)
  const void* s;         // packed_s
  const void* bias;
  int bias_dtype;
  void* out;
  int M, N, K, n_rt, nkb, num_groups, gshift;
  int l2_evict_first;  // stream the weights with an L2 evict-first policy (see l2_policy)
  // Stream-K (w4_ws_kernel<..., SK>): the fp32 partial tiles of the blocks, [block][element]
  // [consumer thread], and one flag a block (zero between calls).
  float* sk_partial;
  int* sk_flag;
};

// The L2 policy of the weight stream. Each weight byte is read once a call, so its lines are
// marked evict-first: the L2 recycles them instead of evicting what else lives there (the
// activations, a KV cache, or dirty lines another kernel left, which would cost a write-back
// each). Marlin streams its weights the same way.
__device__ __forceinline__ uint64_t l2_policy(bool evict_first) {
  uint64_t pol;
  if (evict_first) {
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  } else {
    asm("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(pol));
  }
  return pol;
}

// A 16-byte load that streams past L1 (each weight byte is read once).
__device__ __forceinline__ uint4 ld_stream(const uint4* p, uint64_t pol) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p), "l"(pol));
  return r;
}

// The two-element registers (scale, scale) and (zs, zs) of rows g (index 0) and g+8 (index 1).
template <int FMT>
__device__ __forceinline__ void split_scales(const typename ScaleT<FMT>::type& s, uint32_t (&sc)[2],
                                             uint32_t (&zc)[2]) {
  if constexpr (FMT == kW4Int4) {
    sc[0] = __byte_perm(s.x, 0, 0x1010);
    zc[0] = __byte_perm(s.x, 0, 0x3232);
    sc[1] = __byte_perm(s.y, 0, 0x1010);
    zc[1] = __byte_perm(s.y, 0, 0x3232);
  } else {
    sc[0] = __byte_perm(s, 0, 0x1010);
    sc[1] = __byte_perm(s, 0, 0x3232);
    zc[0] = zc[1] = 0;
  }
}

// Register i (= rh + 2h) of the A fragment held in `word`: two weights of row g + 8rh.
// The nf4 code-pair table: entry e (a byte of two codes) = (code[e & 15], code[e >> 4]) in the
// activation dtype, 32 copies (one a bank: lane l reads copy l, conflict-free). 16-byte stores,
// a quarter of the store instructions of a word-by-word fill (blocks of short K splits build it
// for only a few k blocks of work). `lut` 16-byte aligned.
template <int DT>
__device__ __forceinline__ void fill_nf4_lut(uint32_t* lut, int tid, int threads) {
  for (int i = tid; i < 256 * 8; i += threads) {
    const int e = i >> 3;
    const uint32_t v = Act<DT>::pack(kNF4Code[e & 15], kNF4Code[e >> 4]);
    reinterpret_cast<uint4*>(lut)[i] = make_uint4(v, v, v, v);
  }
}

template <int FMT, int DT>
__device__ __forceinline__ uint32_t dequant(uint32_t word, int i, const uint32_t (&sc)[2], const uint32_t (&zc)[2],
                                            const uint32_t* lut_lane) {
  using A = Act<DT>;
  if constexpr (FMT == kW4Int4 && DT == kFloat16) {
    // Registers 1 and 3 take their codes in bits 4..7 of each half: 1024 + 16q, scaled by 1/16
    // and offset by -64 exactly (Marlin's trick), which saves a shift.
    const uint32_t src = i < 2 ? word : word >> 8;
    const uint32_t v = and_or(src, (i & 1) ? 0x00f000f0u : 0x000f000fu, A::kMagic);
    const uint32_t q = (i & 1) ? A::fma2(v, 0x2C002C00u, 0xD400D400u) : A::fma2(v, A::kOne, A::kNegMagic);
    return A::fma2(q, sc[i & 1], zc[i & 1]);
  } else if constexpr (FMT == kW4Int4) {
    const uint32_t v = and_or(word >> (4 * i), 0x000f000fu, A::kMagic);  // (M + q_lo, M + q_hi)
    return A::fma2(A::fma2(v, A::kOne, A::kNegMagic), sc[i & 1], zc[i & 1]);
  } else {
    // Byte i of the word indexes the table: entry e of lane l is the word at byte offset
    // 128e + 4l (lut_lane points at lane l's column), so the offset is a shift and a mask.
    const uint32_t sh = i == 0 ? word << 7 : word >> (8 * i - 7);
    const uint32_t off = sh & 0x7f80u;
    const uint32_t v = *reinterpret_cast<const uint32_t*>(reinterpret_cast<const char*>(lut_lane) + off);
    return A::fma2(v, sc[i & 1], A::kNegZero);
  }
}

// MODE kRegX: activations in registers, mma.sync; kSmemX: activation tile in shared memory,
// mma.sync. (Tiles that fed wgmma from this kernel, with the activation tile unswizzled or
// 128-byte swizzled, the weights in registers or stored back to shared memory, and a variant
// with one barrier per two k blocks, were measured slower and removed: bench/NOTES.md, eighth
// and ninth sessions; the warp-specialized kernel below took over large M.)
enum { kRegX = 0, kSmemX = 1 };

// Shared memory of the kernel (dynamic): the nf4 code-pair table, then each warp's ring of P
// k blocks (weights, scales), then (kSmemX) the block's ring of P activation tiles; after the
// main loop the reduction tile reuses it from offset 0.
template <int FMT, int W, int R, int NT, int P, int MODE>
struct Smem {
  static constexpr bool XS = MODE != kRegX;
  using ST = typename ScaleT<FMT>::type;
  static constexpr int kLutBytes = FMT == kW4NF4 ? 256 * 32 * 4 : 0;
  static constexpr int kRingW = W * P * R * 32 * 16;
  static constexpr int kRingS = W * P * R * 32 * static_cast<int>(sizeof(ST));
  static constexpr int kStageX = XS ? 8 * NT * 128 : 0;  // [8 NT tokens][64 halves], swizzled
  static constexpr int kRingX = P * kStageX;
  static constexpr int kBN = 16 * R * W;
  static constexpr int kRedBytes = 8 * NT * (kBN + 4) * 4;
  static constexpr int kMain = kLutBytes + kRingW + kRingS + kRingX;
  static constexpr int kBytes = kMain > kRedBytes ? kMain : kRedBytes;
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, uint64_t pol) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "l"(pol)
               : "memory");
}
// 16 bytes, or 16 zero bytes when !full (src is then not read).
__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, bool full) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(full ? 16 : 0) : "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_small(void* smem, const void* gmem, uint64_t pol) {  // N = 4 or 8
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global.L2::cache_hint [%0], [%1], %2, %3;" ::"r"(s), "l"(gmem), "n"(N),
               "l"(pol)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// W warps, each owning R row tiles, and NT token tiles; P k blocks in flight. XS: the block
// stages each k block's activation tile in shared memory (cp.async, shared by all warps; one
// barrier a k block), so that activations arrive with the weights, P-1 blocks ahead, and no
// warp reloads another's; else (kRegX) each lane loads its own activations into registers.
// wgmma helpers (sm_90a; the kernels that use them are launched only from an sm_90a binary).
__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}
// Commits the warpgroup's wgmmas issued since the last commit, then waits until at most N
// groups are in flight.
template <int N = 0>
__device__ __forceinline__ void wgmma_commit_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
#endif
}
// Barrier `id` (1 + warpgroup) over the 128 threads of one warpgroup.
__device__ __forceinline__ void warpgroup_bar(int id) { asm volatile("bar.sync %0, 128;" ::"r"(id) : "memory"); }
// Makes this thread's shared-memory writes (cp.async included) visible to wgmma's reads.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}
// Descriptor of a K-major B operand in 128-byte-swizzled rows (one 128-byte row of 64 k per
// token, 8-row groups 1024 bytes apart; the leading offset is unused in this mode): the k16
// step j starts 32j bytes into the 1024-aligned atom, as the hardware applies the swizzle to
// the address bits.
__device__ __forceinline__ uint64_t wgmma_desc_sw128(const void* smem) {
  const uint64_t addr = static_cast<uint64_t>(__cvta_generic_to_shared(smem));
  return ((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

// The warp-specialized kernel's consumers: a lane dequantizes its word of one row tile's k block
// (word j, register q: row g + 8(q & 1), physical k 16t + 4j + 2(q >> 1)), which is 16-byte
// chunks 2t and 2t+1 of rows g and g+8, and stores them into the warp's 16 rows `rows16` of a
// 128-byte-swizzled fp16 tile, like the activation tile (lanes 0-7 hit 8 distinct chunks).
template <int FMT, int DT>
__device__ __forceinline__ void store_frags_sw128(unsigned char* rows16, uint4 w, const typename ScaleT<FMT>::type& s,
                                                  int g, int t, const uint32_t* lut_lane) {
  uint32_t sc[2], zc[2], a[4][4];
  split_scales<FMT>(s, sc, zc);
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int q = 0; q < 4; ++q) a[j][q] = dequant<FMT, DT>(words[j], q, sc, zc, lut_lane);
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    unsigned char* row = rows16 + (g + 8 * rh) * 128;
    *reinterpret_cast<uint4*>(row + (((2 * t) ^ g) << 4)) = make_uint4(a[0][rh], a[0][rh + 2], a[1][rh], a[1][rh + 2]);
    *reinterpret_cast<uint4*>(row + (((2 * t + 1) ^ g) << 4)) = make_uint4(a[2][rh], a[2][rh + 2], a[3][rh], a[3][rh + 2]);
  }
}

// Then the warpgroup's wgmmas of the k block: once its four warps stored their rows, R m64 tiles
// of the weight tile `at` (8 KB apart) against the activation tile `xs`, 4 k steps; committed,
// leaving this group in flight (the previous one is waited for).
template <int DT, int R, int NT>
__device__ __forceinline__ void wgmma_ss_kblock(float (&acc)[R][NT][4], const unsigned char* at,
                                                const unsigned char* xs, int wg) {
  fence_proxy_async();
  warpgroup_bar(1 + wg);
  wgmma_fence();
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint64_t db = wgmma_desc_sw128(xs + 32 * j);
#pragma unroll
    for (int r = 0; r < R; ++r)
      Wgmma<8 * NT, DT == kBFloat16>::mma_ss(&acc[r][0][0], wgmma_desc_sw128(at + r * 8192 + 32 * j), db);
  }
  wgmma_commit_wait<1>();
}

// The most K splits of a tile (one thread block cluster: Hopper's non-portable maximum).
constexpr int kMaxSplit = 16;

// The epilogue of the kernels: each warp's fp32 accumulators (has_acc; row tile r of warp w is
// tile rows (wR + r) * 16) -> shared memory [token][row], reduced over the K-split cluster when
// S > 1, plus bias -> out.
template <int DT, int R, int NT, int BN, int kThr>
__device__ __forceinline__ void store_tile(const Params& p, unsigned char* smem_raw, const float (&acc)[R][NT][4],
                                           bool has_acc) {
  using A = Act<DT>;
  constexpr int BM = 8 * NT, LD = BN + 4;  // reduction tile row pitch (words): conflict-free stores
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, g = (tid & 31) >> 2, t = tid & 3;
  const int tt = static_cast<int>(blockIdx.x), rb = static_cast<int>(blockIdx.y), S = static_cast<int>(gridDim.z);
  (void)S;  // (the K-split reduction exists only in sm_90+ code)
  __syncthreads();  // every warp is done with the table and its ring before the tile overwrites them
  float* red = reinterpret_cast<float*>(smem_raw);
#pragma unroll
  for (int r = 0; r < R && has_acc; ++r) {
    const int row = (warp * R + r) * 16 + g;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int tok = 8 * n + 2 * t;
      red[tok * LD + row] = acc[r][n][0];
      red[(tok + 1) * LD + row] = acc[r][n][1];
      red[tok * LD + row + 8] = acc[r][n][2];
      red[(tok + 1) * LD + row + 8] = acc[r][n][3];
    }
  }

  const int m_valid = min(BM, p.M - tt * BM);
  const int E = m_valid * BN;
  auto store = [&](int e, float v) {
    const int tok = e / BN, row = e % BN;
    const int grow = rb * BN + row;
    if (grow < p.N) {
      if (p.bias != nullptr) v += load_as_float(p.bias, grow, p.bias_dtype);
      static_cast<uint16_t*>(p.out)[static_cast<int64_t>(tt * BM + tok) * p.N + grow] = A::from_float(v);
    }
  };
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (S > 1) {  // launched as a cluster of the S K-splits of this tile
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    const int rank = static_cast<int>(cluster.block_rank());
    const int chunk = (E + S - 1) / S;
    const int e1 = min(E, (rank + 1) * chunk);
    for (int e = rank * chunk + tid; e < e1; e += kThr) {
      const int off = (e / BN) * LD + e % BN;
      // All S remote loads first, then the sum in rank order (the same bits as a running sum):
      // a loop over a run-time S kept one DSMEM round trip in flight at a time, which at M=1
      // (one element a thread, S up to 16) was most of the epilogue.
      float part[kMaxSplit];
#pragma unroll
      for (int q = 0; q < kMaxSplit; ++q) part[q] = q < S ? cluster.map_shared_rank(red, q)[off] : 0.0f;
      float v = 0.0f;
#pragma unroll
      for (int q = 0; q < kMaxSplit; ++q) {
        if (q < S) v += part[q];
      }
      store(e, v);
    }
    cluster.sync();  // keep this block's tile alive until every block has read it
    return;
  }
#endif
  __syncthreads();
  for (int e = tid; e < E; e += kThr) store(e, red[(e / BN) * LD + e % BN]);
}


template <int FMT, int DT, int W, int R, int NT, int P, int MODE, int MinBlocks>
__global__ void __launch_bounds__(32 * W, MinBlocks) w4_mma_kernel(const Params p) {
  constexpr bool XS = MODE != kRegX;
  static_assert(P % 2 == 0 && P >= 2, "the activations alternate between two register slots");
  using A = Act<DT>;
  using ST = typename ScaleT<FMT>::type;
  using SM = Smem<FMT, W, R, NT, P, MODE>;
  constexpr int kThr = 32 * W;
  constexpr int BN = 16 * R * W;  // weight rows per block
  constexpr int BM = 8 * NT;      // tokens per block
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint32_t* lut = reinterpret_cast<uint32_t*>(smem_raw);

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tt = static_cast<int>(blockIdx.x), rb = static_cast<int>(blockIdx.y);
  const int split = static_cast<int>(blockIdx.z), S = static_cast<int>(gridDim.z);
  const int kb0 = static_cast<int>(static_cast<int64_t>(split) * p.nkb / S);
  const int kb1 = static_cast<int>(static_cast<int64_t>(split + 1) * p.nkb / S);
  const int kb_last = max(kb1 - 1, kb0);  // the host never makes an empty split
  const int rt0 = (rb * W + warp) * R;

  // This lane's slots in its warp's ring: weights [P][R][32 lanes] uint4, scales likewise.
  uint4* wring = reinterpret_cast<uint4*>(smem_raw + SM::kLutBytes) + warp * P * R * 32 + lane;
  ST* sring = reinterpret_cast<ST*>(smem_raw + SM::kLutBytes + SM::kRingW) + warp * P * R * 32 + lane;
  unsigned char* xring = smem_raw + SM::kLutBytes + SM::kRingW + SM::kRingS;

  // Row tiles past the weight (in the last block) read row tile 0: never stored.
  const uint4* wp[R];
  const ST* sp[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t rt = rt0 + r < p.n_rt ? rt0 + r : 0;
    wp[r] = p.w + rt * p.nkb * 32 + lane;
    sp[r] = static_cast<const ST*>(p.s) + rt * p.num_groups * 8 + g;
  }
  // Activation rows: per token tile (registers) or per 16-byte chunk of the tile this thread
  // copies (XS). Tokens past M read row M-1 and are never stored.
  // XS: the tile's 64 NT chunks over 32 W threads (the last round partial when fewer).
  constexpr int kXC = XS ? (2 * NT + W - 1) / W : NT;
  constexpr bool kXPartial = XS && (2 * NT) % W != 0;
  const uint16_t* xrow[kXC];
  int xdst[kXC], xk[kXC];
#pragma unroll
  for (int i = 0; i < kXC; ++i) {
    // XS chunk e = row (e >> 3), 16-byte column c = e & 7, stored at column c ^ (row & 7):
    // the eight lanes of a 16-byte shared load phase then hit eight distinct bank groups.
    const int e = kXPartial ? min(tid + i * kThr, 64 * NT - 1) : tid + i * kThr;  // (idle threads: never copy)
    const int row = XS ? e >> 3 : 8 * i + g, c = e & 7;
    const int tok = min(tt * BM + row, p.M - 1);
    xrow[i] = static_cast<const uint16_t*>(p.x) + static_cast<int64_t>(tok) * p.x_row_stride;
    xdst[i] = row * 128 + ((c ^ (row & 7)) << 4);
    xk[i] = 8 * c;
  }

  // Weights and scales of k block kb (XS: and its activation tile) into ring slot `slot`:
  // asynchronous copies, one group.
  const uint64_t pol = l2_policy(p.l2_evict_first != 0);
  auto issue = [&](int slot, int kb) {
    const int gi = static_cast<int>(static_cast<unsigned>(kb * 64 + 16 * t) >> p.gshift);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      cp_async16(wring + (slot * R + r) * 32, wp[r] + static_cast<int64_t>(kb) * 32, pol);
      cp_async_small<sizeof(ST)>(sring + (slot * R + r) * 32, sp[r] + gi * 8, pol);
    }
    if constexpr (XS) {
      // Past K (K a multiple of 8) a chunk is zero-filled: the weights there are padding.
#pragma unroll
      for (int i = 0; i < kXC; ++i) {
        if (kXPartial && tid + i * kThr >= 64 * NT) break;  // warp-uniform: 64 NT is a multiple of 32
        const int k = kb * 64 + xk[i];
        const bool full = k + 8 <= p.K;
        cp_async16_zfill(xring + slot * SM::kStageX + xdst[i], xrow[i] + (full ? k : 0), full);
      }
    }
    cp_async_commit();
  };
  // Activations of k block kb (register path): this lane's 16 halves of each token tile. Past
  // K (K a multiple of 32: a lane's 16 halves are all in or all out) it reads the row's first
  // 16 halves and zeroes them: no branch around a load.
  auto load_x = [&](uint4 (&xr)[NT][2], int kb) {
    const bool xok = kb * 64 + 16 * t + 16 <= p.K;
    const int xoff = xok ? kb * 8 + 2 * t : 0;
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      const uint4* src = reinterpret_cast<const uint4*>(xrow[XS ? 0 : i]) + xoff;
      const uint4 v0 = __ldg(src), v1 = __ldg(src + 1);
      xr[i][0] = xok ? v0 : make_uint4(0u, 0u, 0u, 0u);
      xr[i][1] = xok ? v1 : make_uint4(0u, 0u, 0u, 0u);
    }
  };

  float acc[R][NT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][n][c] = 0.0f;

  const uint32_t* lut_lane = lut + lane;
  // The A fragment (4 registers) of row tile r, k step j, from its ring slot's word.
  auto frag = [&](uint32_t (&a)[4], uint32_t word, const uint32_t (&sc)[2], const uint32_t (&zc)[2]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = dequant<FMT, DT>(word, i, sc, zc, lut_lane);
  };
  auto compute = [&](int slot, const uint4 (&xr)[NT][2]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint4 w = wring[(slot * R + r) * 32];
      uint32_t sc[2], zc[2];
      split_scales<FMT>(sring[(slot * R + r) * 32], sc, zc);
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t a[4];
        frag(a, words[j], sc, zc);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          const uint4& xv = xr[n][j >> 1];
          A::mma(acc[r][n], a, (j & 1) ? xv.z : xv.x, (j & 1) ? xv.w : xv.y);
        }
      }
    }
  };
  // XS: the activations of half a k block (k steps 2jj, 2jj+1) for every token tile come from
  // the shared tile (16-byte loads, conflict free), and each A fragment serves all NT tiles.
  auto compute_xs = [&](int slot) {
    uint4 w[R];
    uint32_t sc[R][2], zc[R][2];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      w[r] = wring[(slot * R + r) * 32];
      split_scales<FMT>(sring[(slot * R + r) * 32], sc[r], zc[r]);
    }
    const unsigned char* xs = xring + slot * SM::kStageX + g * 128;
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      uint4 xv[NT];
#pragma unroll
      for (int n = 0; n < NT; ++n) xv[n] = *reinterpret_cast<const uint4*>(xs + n * 1024 + (((2 * t + jj) ^ g) << 4));
#pragma unroll
      for (int jh = 0; jh < 2; ++jh) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t word = jj == 0 ? (jh == 0 ? w[r].x : w[r].y) : (jh == 0 ? w[r].z : w[r].w);
          uint32_t a[4];
          frag(a, word, sc[r], zc[r]);
#pragma unroll
          for (int n = 0; n < NT; ++n) A::mma(acc[r][n], a, jh ? xv[n].z : xv[n].x, jh ? xv[n].w : xv[n].y);
        }
      }
    }
  };

  // Prologue: P-1 k blocks in flight (indices clamped to the split), the first activations,
  // then (nf4) the code-pair table.
#pragma unroll
  for (int s = 0; s < P - 1; ++s) issue(s, min(kb0 + s, kb_last));
  if constexpr (FMT == kW4NF4) {
    fill_nf4_lut<DT>(lut, tid, kThr);
    __syncthreads();
  }

  int kb = kb0;
  if constexpr (XS) {
    // Block kb is in ring slot (kb - kb0) % P. Each step waits for its copies, then a barrier
    // (everyone's copies landed; everyone is done with the slot consumed one step before),
    // refills that slot P-1 blocks ahead and computes.
#pragma unroll 1
    for (; kb + P <= kb1; kb += P) {
#pragma unroll
      for (int s = 0; s < P; ++s) {
        cp_async_wait<P - 2>();
        __syncthreads();
        issue((s + P - 1) % P, min(kb + s + P - 1, kb_last));
        compute_xs(s);
      }
    }
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int s = 0; s < P - 1; ++s) {
      if (kb + s < kb1) compute_xs(s);
    }
  } else {
    // Block kb is in ring slot (kb - kb0) % P and its activations in xr[(kb - kb0) % 2]. Each
    // step first refills the slot consumed one step before, P-1 blocks ahead, and loads the
    // next activations; the wait leaves the P-1 newest copy groups in flight. A lane reads
    // only its own ring slots, so no barrier is needed.
    uint4 xr[2][NT][2];
    load_x(xr[0], kb0);
#pragma unroll 1
    for (; kb + P <= kb1; kb += P) {
#pragma unroll
      for (int s = 0; s < P; ++s) {
        issue((s + P - 1) % P, min(kb + s + P - 1, kb_last));
        load_x(xr[(s + 1) & 1], min(kb + s + 1, kb_last));
        cp_async_wait<P - 1>();
        compute(s, xr[s & 1]);
      }
    }
    // The last kb1 - kb < P blocks are in slots 0 .. kb1-kb-1.
    cp_async_wait<0>();
#pragma unroll
    for (int s = 0; s < P - 1; ++s) {
      if (kb + s < kb1) {
        if (s > 0) load_x(xr[s & 1], kb + s);
        compute(s, xr[s & 1]);
      }
    }
  }

  store_tile<DT, R, NT, BN, kThr>(p, smem_raw, acc, true);
}

// ---- w4_ws_kernel: warp-specialized wgmma GEMM for large M (sm_90a) ----------------------
// ncu on wgmma tiles of w4_mma_kernel (M=1024; since removed): tensor pipe 55% busy, nothing saturated,
// issue 30%: every warp walks the same serial chain each k block (wait for copies, barrier,
// issue the next copies, dequantize, store, wgmma), and that chain was longer than the block's
// wgmmas. Here one producer warp feeds a ring of P stages with the Tensor Memory Accelerator
// (the activation tile, 128-byte swizzled, zero-filled past M and K) and bulk copies (weights,
// scales), on mbarriers; two consumer warpgroups only dequantize into a swizzled fp16 weight
// tile (two buffers) and issue wgmmas from shared memory, which stay in flight while the next
// k block is dequantized. Block: 128R weight rows x 8NT tokens; warp w (of 8 consumers) owns
// row tiles wR .. wR+R-1, its warpgroup's m64 tile r takes row tile r of its four warps.
__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
// The spin loop and the one-lane predicate live inside the asm: ptxas serializes wgmmas whose
// pipeline spans a divergent branch of the C++ code (C7520).
__device__ __forceinline__ void mbar_arrive_if(uint64_t* bar, bool pred) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.u32 p, %1, 0;\n @p mbarrier.arrive.shared::cta.b64 _, [%0];\n}" ::"r"(smem_u32(bar)),
      "r"(static_cast<uint32_t>(pred))
      : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred p;\n WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra WAIT;\n}" ::"r"(
          smem_u32(bar)),
      "r"(parity)
      : "memory");
}

// A TMA copy of one box of a 2-D tensor map into shared memory, completing `bar` by its bytes
// (with an L2 policy when `hint`).
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar,
                                            uint64_t pol, bool hint) {
  if (hint) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, "
        "{%2, %3}], [%4], %5;" ::"r"(smem_u32(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_u32(bar)), "l"(pol)
        : "memory");
  } else {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
        "[%4];" ::"r"(smem_u32(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_u32(bar))
        : "memory");
  }
}

// The same for a 3-D tensor map (RS: the weights, read in 128-byte swizzled rows).
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, uint64_t* bar,
                                            uint64_t pol) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, "
      "{%2, %3, %4}], [%5], %6;" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar)), "l"(pol)
      : "memory");
}

// RS consumers: lane (g, t) builds the wgmma A fragments of row tile `rt` (512 bytes of the
// weight ring: four 128-byte rows, 16-byte slot (g', t') in row g' >> 1 at chunk 4(g' & 1) + t',
// 128-byte swizzled) for the four k16 steps j of a k block. Slot (g, j) word (t >> 1) + 2H holds
// physical k 16j + 2t + 8H (+1) in its registers rh + 2(t & 1): exactly the k of wgmma's register
// H of lane t, so the activation tile keeps the natural k order. `row7` = rt's first row mod 8.
template <int FMT, int DT>
__device__ __forceinline__ void frags_rs(uint32_t (&a)[4][4], const unsigned char* rt, int row7,
                                         const typename ScaleT<FMT>::type* sc_g, int sgroups, int g, int t,
                                         const uint32_t* lut_lane) {
  const int r = (row7 + (g >> 1)) & 7;
  const unsigned char* row = rt + (g >> 1) * 128;
  // One byte permute picks word (t >> 1) of a pair and shifts it right by 8(t & 1) bytes' worth
  // (nf4: 16): the dequantization reads bytes 0 and 2 (int4) or 0 and 1 (nf4) only.
  const uint32_t b0 = 4 * (t >> 1) + (FMT == kW4NF4 ? 2 : 1) * (t & 1);
  const uint32_t sel = b0 | ((b0 + 1) & 7) << 4 | ((b0 + 2) & 7) << 8 | ((b0 + 3) & 7) << 12;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint4 w = *reinterpret_cast<const uint4*>(row + (((4 * (g & 1) + j) ^ r) << 4));
    uint32_t sc[2], zc[2];
    split_scales<FMT>(sc_g[sgroups == 2 ? (j >> 1) * 8 : 0], sc, zc);
    const uint32_t lo = __byte_perm(w.x, w.y, sel), hi = __byte_perm(w.z, w.w, sel);
    a[j][0] = dequant<FMT, DT>(lo, 0, sc, zc, lut_lane);
    a[j][1] = dequant<FMT, DT>(lo, 1, sc, zc, lut_lane);
    a[j][2] = dequant<FMT, DT>(hi, 0, sc, zc, lut_lane);
    a[j][3] = dequant<FMT, DT>(hi, 1, sc, zc, lut_lane);
  }
}

// SK end of a block's piece of a tile (iterations i0 .. i1-1 of the block, the tile's k blocks
// kb0 .. kb1), by the CW consumer warps (named barrier 1): a piece without the tile's first k
// block (only ever a block's first split piece) parks its fp32 accumulators in the block's
// partial slot and raises its flag; the piece with it waits for the flags of the lower blocks
// holding the rest of the tile, adds their partials, clears their flags, adds the bias and
// stores. The accumulators are zeroed for the next piece.
template <int DT, int R, int NT, int CW>
__device__ __forceinline__ void sk_tile_end(const Params& p, const SkPlan& sk, float (&acc)[R][NT][4], int i1, int kb0,
                                            int kb1, int tt, int rb, int warp, int g, int t) {
  // (The accumulators are only read inside the branches: a write there would make ptxas put a
  // warpgroup arrive on a divergent path and serialize every wgmma of the kernel.)
  constexpr int kThrC = CW * 32, kF = R * NT;  // float4 fragments a thread
  const int tid = warp * 32 + g * 4 + t;
  // Block q's slot: [fragment][thread] float4s (a warp's access is 512 contiguous bytes).
  auto slot = [&](int q, int f) {
    return reinterpret_cast<float4*>(p.sk_partial) + (static_cast<int64_t>(q) * kF + f) * kThrC + tid;
  };
  if (kb0 != 0) {
#pragma unroll
    for (int f = 0; f < kF; ++f) {
      const float* a = &acc[f / NT][f % NT][0];
      *slot(sk.b, f) = make_float4(a[0], a[1], a[2], a[3]);
    }
    __threadfence();
    asm volatile("bar.sync 1, %0;" ::"r"(kThrC) : "memory");
    if (tid == 0) asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p.sk_flag + sk.b), "r"(1) : "memory");
  } else {
    // The tile's later k blocks: blocks b-1, b-2, ... whose runs start at or before its last
    // iteration (a block with an empty run holds nothing).
    int q1 = sk.b;  // blocks q1 .. b-1 hold the rest
    if (kb1 != sk.nkb - 1) {
      const int64_t last = sk.tile_last(i1, kb1);
      for (int q = sk.b - 1; q >= 0 && sk.start(q) <= last; --q) {
        q1 = q;
        if (!sk.holds(q)) continue;
        uint32_t f = 0;
        do {
          asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(f) : "l"(p.sk_flag + q) : "memory");
        } while (f == 0);
      }
    }
    using A = Act<DT>;
    const int m_valid = min(8 * NT, p.M - tt * 8 * NT);
    // Eight fragments at a time, every partial's loads of them in flight together.
    constexpr int kC = kF % 8 == 0 ? 8 : kF;
#pragma unroll
    for (int f0 = 0; f0 < kF; f0 += kC) {
      float4 v[kC];
#pragma unroll
      for (int f = 0; f < kC; ++f) {
        const float* a = &acc[(f0 + f) / NT][(f0 + f) % NT][0];
        v[f] = make_float4(a[0], a[1], a[2], a[3]);
      }
      for (int q = q1; q < sk.b; ++q) {
        if (!sk.holds(q)) continue;
        float4 u[kC];
#pragma unroll
        for (int f = 0; f < kC; ++f) u[f] = __ldcg(slot(q, f0 + f));
#pragma unroll
        for (int f = 0; f < kC; ++f) {
          v[f].x += u[f].x;
          v[f].y += u[f].y;
          v[f].z += u[f].z;
          v[f].w += u[f].w;
        }
      }
#pragma unroll
      for (int f = 0; f < kC; ++f) {
        const int r = (f0 + f) / NT, n = (f0 + f) % NT, row = rb * (16 * R * CW) + (warp * R + r) * 16 + g;
        const float vv[4] = {v[f].x, v[f].y, v[f].z, v[f].w};
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int tok = 8 * n + 2 * t + (c & 1), grow = row + 8 * (c >> 1);
          if (tok < m_valid && grow < p.N) {
            float o = vv[c];
            if (p.bias != nullptr) o += load_as_float(p.bias, grow, p.bias_dtype);
            static_cast<uint16_t*>(p.out)[static_cast<int64_t>(tt * 8 * NT + tok) * p.N + grow] = A::from_float(o);
          }
        }
      }
    }
    if (q1 < sk.b) {
      asm volatile("bar.sync 1, %0;" ::"r"(kThrC) : "memory");  // every partial read: clear the flags
      if (tid == 0) {
        for (int q = q1; q < sk.b; ++q) p.sk_flag[q] = 0;
      }
    }
  }
#pragma unroll
  for (int e = 0; e < R * NT * 4; ++e) acc[e / (NT * 4)][(e / 4) % NT][e % 4] = 0.0f;
}

// RS: the A operand from registers (see w4_ws_kernel); no weight tile buffers, and the rings
// start at a 1024-byte boundary (activations, then weights, then scales).
template <int FMT, int R, int NT, int P, bool RS = false, int CW = 8, bool SK = false, bool Move = false>
struct WsSmem {
  using ST = typename ScaleT<FMT>::type;
  static constexpr int kRT = CW * R;  // row tiles a block (CW consumer warps)
  static constexpr int kLutBytes = FMT == kW4NF4 ? 256 * 32 * 4 : 0;
  static constexpr int kBars = 256;                                  // full[P], empty[P]
  static constexpr int kRingW = P * kRT * 512;                       // weights: [P][row tile][32 lanes] uint4
  static constexpr int kRingS = P * kRT * 16 * sizeof(ST);           // scales: [P][row tile][1 or 2 groups][8]
  static constexpr int kStageX = 8 * NT * 128;                       // [8NT tokens][64 k], 128-byte swizzle
  static constexpr int kABuf = RS ? 0 : 2 * kRT * 16 * 128;          // two [128R rows][64 k] fp16 tiles
  // RS blocks whose accumulators and two fragment sets exceed 128 registers (or 96 with the
  // stream-K epilogue; or any, with Move) take a whole producer warpgroup (384 threads) so that
  // registers move to the consumers (setmaxnreg: 232 each, 40 for the producer's warpgroup);
  // else CW consumer warps + 1. (Stream-K 256 x 64 blocks: 81.7 us with the move, 97.6 without,
  // on 28672x8192 M=64.)
  static constexpr bool kRegMove = RS && (Move || R * NT * 4 + 2 * R * 16 > (SK ? 96 : 128));
  static constexpr int kThreads = kRegMove ? 384 : 32 * (CW + 1);
  static_assert(CW == 8 || (RS && CW == 16 && !kRegMove), "16 consumer warps: RS blocks only");
  static_assert(!RS || R * NT * 4 + 2 * R * 16 <= 192, "RS: accumulators + two fragment sets in 232 registers");
  static constexpr int kMain = kLutBytes + kBars + kRingW + kRingS + 1024 + P * kStageX + kABuf;
  static constexpr int kRedBytes = 8 * NT * (kRT * 16 + 4) * 4;
  static constexpr int kBytes = kMain > kRedBytes ? kMain : kRedBytes;
  static_assert(2 * P * 8 <= kBars, "barriers");
};

#if defined(LOWBIT_CUDA_SM90A)
// (Pairs of row blocks sharing the activation tile by TMA multicast in 2-block clusters were
// measured 1.5-2.5x slower and removed: bench/NOTES.md, tenth session.)
//
// RS (most of w4_launch's choices): the consumers feed wgmma's A operand from registers instead
// (each lane dequantizes the fragments of frags_rs from the weight ring), so nothing is stored
// back to shared memory and no warpgroup barrier is needed; two register sets alternate between
// k blocks, one in flight while the other is filled. At 64 tokens the SS loop moves ~112 KB of
// shared memory a k block (256 rows) against ~56 KB here, while wgmma needs ~512 cycles.
// SK (tuning candidates, RS only): stream-K. One block an SM, each over an equal run of the
// (tile, k block) iterations, tile-major; a tile split between blocks is finished by the block
// holding its first k blocks, which waits for the later blocks' flags (their pieces are at the
// start of their runs, and every block is resident: no cycle), adds their partials in block
// order and clears the flags. The epilogue goes from registers (the rings stay in use).
template <int FMT, int DT, int R, int NT, int P, int MinBlocks = 1, bool RS = false, int CW = 8, bool SK = false,
          bool Move = false>
__global__ void __launch_bounds__(WsSmem<FMT, R, NT, P, RS, CW, SK, Move>::kThreads, MinBlocks) w4_ws_kernel(const Params p, const __grid_constant__ CUtensorMap xmap,
                                                      const __grid_constant__ CUtensorMap wmap,
                                                      const __grid_constant__ CUtensorMap smap) {
  using ST = typename ScaleT<FMT>::type;
  using SM = WsSmem<FMT, R, NT, P, RS, CW, SK, Move>;
  float acc[R][NT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][n][c] = 0.0f;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31;
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);  // warp-uniform to the compiler
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using A = Act<DT>;
  constexpr int RT = SM::kRT, BM = 8 * NT;
  uint32_t* lut = reinterpret_cast<uint32_t*>(smem_raw);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem_raw + SM::kLutBytes);
  uint64_t* empty = full + P;
  uint4* wring = reinterpret_cast<uint4*>(smem_raw + SM::kLutBytes + SM::kBars);
  ST* sring = reinterpret_cast<ST*>(smem_raw + SM::kLutBytes + SM::kBars + SM::kRingW);
  unsigned char* xring = smem_raw + SM::kLutBytes + SM::kBars + SM::kRingW + SM::kRingS;
  if constexpr (RS) xring = smem_raw + SM::kLutBytes + SM::kBars;
  xring += (1024u - (smem_u32(xring) & 1023u)) & 1023u;  // the swizzle repeats every 1024 bytes
  unsigned char* abuf = xring + P * SM::kStageX;
  if constexpr (RS) {
    wring = reinterpret_cast<uint4*>(abuf);  // (1024-aligned: its rows are swizzled too)
    sring = reinterpret_cast<ST*>(abuf + SM::kRingW);
  }
  const int g = lane >> 2, t = lane & 3;
  static_assert(!SK || RS, "stream-K: RS blocks only");
  // Without SK a block is one tile's K split (grid: token tiles, row blocks, splits); with SK
  // its iterations are those of SkPlan.
  SkPlan sk;
  int kb0 = 0, nk;
  if constexpr (SK) {
    sk = SkPlan((p.M + BM - 1) / BM, (p.n_rt + RT - 1) / RT, p.nkb, static_cast<int>(gridDim.x),
                static_cast<int>(blockIdx.x));
    nk = sk.nk;
  } else {
    const int split = static_cast<int>(blockIdx.z), S = static_cast<int>(gridDim.z);
    kb0 = static_cast<int>(static_cast<int64_t>(split) * p.nkb / S);
    nk = static_cast<int>(static_cast<int64_t>(split + 1) * p.nkb / S) - kb0;
  }
  const int tt = SK ? 0 : static_cast<int>(blockIdx.x), rb = SK ? 0 : static_cast<int>(blockIdx.y);
  // The k block, token tile and row block of iteration i.
  auto coords = [&](int i, int& kb, int& tt_i, int& rb_i) {
    if constexpr (SK) {
      sk.coords(i, kb, tt_i, rb_i);
    } else {
      kb = kb0 + i;
      tt_i = tt;
      rb_i = rb;
    }
  };
  // Scale groups a k block spans: 2 when groups are 32 wide, else 1.
  const int sgroups = p.gshift == 5 ? 2 : 1;
  if (tid == 0) {
    for (int s = 0; s < P; ++s) {
      mbar_init(full + s, 1);
      mbar_init(empty + s, CW);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if constexpr (FMT == kW4NF4) {
    fill_nf4_lut<DT>(lut, tid, SM::kThreads);
  }
  __syncthreads();

  if (warp >= CW) {
    // Producer: stage s = i % P is refilled once the consumers released it (empty), by three
    // TMA copies (activations; the block's RT row tiles of weights, each k block's 512 bytes;
    // their scales) that complete `full` by their byte count. Past N the boxes are zero-filled.
    // (With kRegMove, warps 9-11 only lend their registers; every warp is back at 168 for the
    // epilogue.)
    if constexpr (SM::kRegMove) asm volatile("setmaxnreg.dec.sync.aligned.u32 40;" ::: "memory");
    if (warp == CW) {
    const uint64_t pol = l2_policy(p.l2_evict_first != 0);
    const uint32_t bytes = BM * 128 + RT * (512 + sgroups * 8 * sizeof(ST));
    constexpr int kSWords = 8 * sizeof(ST) / 4;  // 32-bit words of one group's scales of a row tile
    for (int i = 0; i < nk; ++i) {
      const int s = i % P;
      int kb, tt_i, rb_i;
      coords(i, kb, tt_i, rb_i);
      if (i >= P) mbar_wait(empty + s, ((i / P) - 1) & 1);
      if (lane == 0) {
        const int gi0 = static_cast<int>(static_cast<unsigned>(kb * 64) >> p.gshift);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(full + s)), "r"(bytes)
                     : "memory");
        tma_load_2d(xring + s * SM::kStageX, &xmap, kb * 64, tt_i * BM, full + s, pol, false);
        if constexpr (RS) {
          tma_load_3d(wring + s * RT * 32, &wmap, 0, kb * 4, rb_i * RT, full + s, pol);
        } else {
          tma_load_2d(wring + s * RT * 32, &wmap, kb * 128, rb_i * RT, full + s, pol, true);
        }
        tma_load_2d(sring + s * RT * 16, &smap, gi0 * kSWords, rb_i * RT, full + s, pol, true);
      }
    }
    }
    if constexpr (SM::kRegMove) asm volatile("setmaxnreg.inc.sync.aligned.u32 168;" ::: "memory");
  } else if constexpr (RS) {
    // Consumers: each k block's A fragments into one of two register sets (frags_rs), then the
    // warpgroup's wgmmas from them; the set of block i-1 is free once block i's are issued and
    // i-1's are done (wgmma_commit_wait<1>), which also releases i-1's stage.
    if constexpr (SM::kRegMove) asm volatile("setmaxnreg.inc.sync.aligned.u32 232;" ::: "memory");
    const uint32_t* lut_lane = lut + lane;
    uint32_t afr[2][R][4][4];
    auto step = [&](uint32_t(&a)[R][4][4], int i) {
      const int s = i % P;
      mbar_wait(full + s, (i / P) & 1);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int rtl = warp * R + r;
        frags_rs<FMT, DT>(a[r], reinterpret_cast<const unsigned char*>(wring + (s * RT + rtl) * 32), (rtl & 1) * 4,
                          sring + s * RT * 16 + rtl * 8 * sgroups + g, sgroups, g, t, lut_lane);
      }
      const unsigned char* xs = xring + s * SM::kStageX;
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint64_t db = wgmma_desc_sw128(xs + 32 * j);
#pragma unroll
        for (int r = 0; r < R; ++r) Wgmma<8 * NT, DT == kBFloat16>::mma(&acc[r][0][0], a[r][j], db);
      }
      wgmma_commit_wait<1>();
      mbar_arrive_if(empty + (i + P - 1) % P, i > 0 && lane == 0);
    };
    // Iterations i0 .. i1-1, the register sets alternating.
    auto run = [&](int i0, int i1) {
      int i = i0;
#pragma unroll 1
      for (; i + 2 <= i1; i += 2) {
        step(afr[0], i);
        step(afr[1], i + 1);
      }
      if (i < i1) step(afr[0], i);
    };
    if constexpr (SK) {
      // One piece of a tile per pass; its wgmmas are all done before the accumulators are
      // read (a read inside the pipelined loop would serialize every wgmma).
      for (int i = 0; i < nk;) {
        int kb, tt_i, rb_i;
        coords(i, kb, tt_i, rb_i);
        const int i1 = sk.piece_end(i, kb);
        run(i, i1);
        wgmma_commit_wait<0>();
        sk_tile_end<DT, R, NT, CW>(p, sk, acc, i1, kb, kb + (i1 - 1 - i), tt_i, rb_i, warp, g, t);
        i = i1;
      }
    } else {
      run(0, nk);
    }
    wgmma_commit_wait<0>();
    if constexpr (SM::kRegMove) asm volatile("setmaxnreg.dec.sync.aligned.u32 168;" ::: "memory");
  } else {
    // Consumers: dequantize each k block into the warpgroup's swizzled weight tile, then its
    // wgmmas (store_frags_sw128, wgmma_ss_kblock).
    const int wg = warp >> 2, wl = warp & 3;
    const uint32_t* lut_lane = lut + lane;
    for (int i = 0; i < nk; ++i) {
      const int s = i % P, kb = kb0 + i;
      mbar_wait(full + s, (i / P) & 1);
      const int gl = static_cast<int>(static_cast<unsigned>(kb * 64 + 16 * t) >> p.gshift) -
                     static_cast<int>(static_cast<unsigned>(kb * 64) >> p.gshift);
      unsigned char* at = abuf + ((i & 1) * 2 + wg) * R * 8192;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int rtl = warp * R + r;
        store_frags_sw128<FMT, DT>(at + r * 8192 + 16 * wl * 128, wring[(s * RT + rtl) * 32 + lane],
                                   sring[s * RT * 16 + rtl * 8 * sgroups + gl * 8 + g], g, t, lut_lane);
      }
      wgmma_ss_kblock<DT, R, NT>(acc, at, xring + s * SM::kStageX, wg);  // block i-1's are done: release it
      mbar_arrive_if(empty + (i + P - 1) % P, i > 0 && lane == 0);
    }
    wgmma_commit_wait<0>();
  }
#else
  (void)lane;
  __trap();
#endif
  if constexpr (!SK) store_tile<DT, R, NT, 16 * SM::kRT, SM::kThreads>(p, smem_raw, acc, warp < CW);
}
#endif  // LOWBIT_CUDA_SM90A

template <int FMT, int DT>
__global__ void __launch_bounds__(256) w4_dequant_kernel(const Params p) {
  using ST = typename ScaleT<FMT>::type;
  __shared__ __align__(16) uint32_t lut[FMT == kW4NF4 ? 256 * 32 : 4];
  if constexpr (FMT == kW4NF4) {
    fill_nf4_lut<DT>(lut, threadIdx.x, 256);
    __syncthreads();
  }
  const int64_t total = static_cast<int64_t>(p.n_rt) * p.nkb * 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const uint64_t pol = l2_policy(p.l2_evict_first != 0);
  // Two items per thread per step, both loads issued first (two 16-byte loads in flight).
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; base < total; base += 2 * stride) {
    int64_t idx[2] = {base, base + stride < total ? base + stride : base};
    uint4 wv[2];
    ST sv[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int lane = static_cast<int>(idx[u] & 31);
      const int64_t tile = idx[u] >> 5;
      const int kb = static_cast<int>(tile % p.nkb);
      const int64_t rt = tile / p.nkb;
      const int gi = static_cast<int>(static_cast<unsigned>(kb * 64 + 16 * (lane & 3)) >> p.gshift);
      wv[u] = ld_stream(p.w + idx[u], pol);
      sv[u] = static_cast<const ST*>(p.s)[(rt * p.num_groups + gi) * 8 + (lane >> 2)];
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (u == 1 && idx[1] == idx[0]) break;
      const int lane = static_cast<int>(idx[u] & 31);
      const int g = lane >> 2, t = lane & 3;
      const int64_t tile = idx[u] >> 5;
      const int kb = static_cast<int>(tile % p.nkb);
      const int64_t rt = tile / p.nkb;
      uint32_t sc[2], zc[2];
      split_scales<FMT>(sv[u], sc, zc);
      const uint32_t words[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
      uint32_t rows[2][8];  // rows g, g+8: k = 16t + 0..15 as 8 pairs
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          rows[i & 1][2 * j + (i >> 1)] = dequant<FMT, DT>(words[j], i, sc, zc, lut + lane);
      const int64_t k = static_cast<int64_t>(kb) * 64 + 16 * t;
      if (k + 16 > p.K) continue;
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) {
        const int64_t row = rt * 16 + g + 8 * rh;
        if (row >= p.N) continue;
        uint4* dst = reinterpret_cast<uint4*>(static_cast<uint16_t*>(p.out) + row * p.K + k);
        dst[0] = make_uint4(rows[rh][0], rows[rh][1], rows[rh][2], rows[rh][3]);
        dst[1] = make_uint4(rows[rh][4], rows[rh][5], rows[rh][6], rows[rh][7]);
      }
    }
  }
}

// ---- host side --------------------------------------------------------------------------

struct KernelInfo {
  int sms = 1;
  int blocks_per_sm = 1;
  bool clusters = false;  // the device and the loaded binary (sm_90+) run thread block clusters
  int max_cluster = 1;    // the largest cluster (K split) this kernel can be launched with
  bool sm90a = false;     // an sm_90 GPU runs this build's sm_90 binary (sm_90a where the build has it)
  // Clusters of 2^i blocks that can run at once (cudaOccupancyMaxActiveClusters; 0: not known).
  // A cluster's blocks share one GPC, so this can be below sms * blocks_per_sm / 2^i.
  int active_clusters[5] = {};
};

template <typename Kernel>
KernelInfo kernel_info(Kernel kernel, int device, int threads, int smem_bytes) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, KernelInfo> cache;
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  constexpr const char* fn = "w4_matmul_cuda";
  KernelInfo info;
  check_cuda(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device), fn, "cudaDeviceGetAttribute");
  int major = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), fn, "cudaDeviceGetAttribute");
  if (smem_bytes > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes), fn,
               "cudaFuncSetAttribute");
  }
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&info.blocks_per_sm, kernel, threads, smem_bytes), fn,
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  cudaFuncAttributes attr{};
  check_cuda(cudaFuncGetAttributes(&attr, kernel), fn, "cudaFuncGetAttributes");
  // Clusters need code compiled for sm_90+ (the K-split reduction exists only there): not a
  // newer GPU running this build's compute_80 PTX.
  info.clusters = major >= 9 && attr.binaryVersion >= 90 && attr.ptxVersion >= 90;
  info.sm90a = major == 9 && attr.binaryVersion == 90 && attr.ptxVersion == 90;
  info.blocks_per_sm = info.blocks_per_sm < 1 ? 1 : info.blocks_per_sm;
  if (info.clusters) {
    // 8 blocks is the portable cluster size; Hopper allows 16 when asked (small-N shapes want
    // more K splits), if the occupancy calculator says a cluster of 16 fits.
    info.max_cluster = 8;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess) {
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(1, 1, kMaxSplit);
      cfg.blockDim = dim3(threads, 1, 1);
      cfg.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
      int largest = 0;
      if (cudaOccupancyMaxPotentialClusterSize(&largest, kernel, &cfg) == cudaSuccess && largest >= kMaxSplit) {
        info.max_cluster = kMaxSplit;
      }
    }
    cudaGetLastError();  // a refused non-portable size is not an error of ours
    for (int i = 1; i < 5 && (1 << i) <= info.max_cluster; ++i) {
      cudaLaunchConfig_t cfg = {};
      cudaLaunchAttribute attr[1];
      cfg.gridDim = dim3(1, 1, 1u << i);
      cfg.blockDim = dim3(threads, 1, 1);
      cfg.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = 1;
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1u << i;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      int n = 0;
      if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) == cudaSuccess) info.active_clusters[i] = n;
      cudaGetLastError();
    }
  }
  cache.emplace(key, info);
  return info;
}

inline int env_int(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? 0 : std::atoi(v);
}

inline Params make_params(const W4Args& a) {
  Params p{};
  p.x = a.x;
  p.x_row_stride = a.x_row_stride;
  p.w = static_cast<const uint4*>(a.packed_w);
  p.s = a.packed_s;
  p.bias = a.bias;
  p.bias_dtype = a.bias_dtype;
  p.out = a.out;
  p.M = static_cast<int>(a.M);
  p.N = static_cast<int>(a.N);
  p.K = static_cast<int>(a.K);
  p.n_rt = static_cast<int>(a.n_pad / 16);
  p.nkb = static_cast<int>(a.k_pad / 64);
  p.num_groups = static_cast<int>(a.num_groups);
  int shift = 31;
  if (a.num_groups > 1) {
    shift = 0;
    while ((int64_t{1} << shift) < a.group_size) ++shift;
  }
  p.gshift = shift;
  // LOWBIT_CUDA_W4_NO_L2_HINT=1 streams the weights with the default L2 policy (for A/B runs).
  p.l2_evict_first = env_int("LOWBIT_CUDA_W4_NO_L2_HINT") ? 0 : 1;
  return p;
}

// Splits of K (up to the cluster size limit, 16 on Hopper) so that one wave of blocks
// covers the GPU; LOWBIT_CUDA_W4_SPLIT=S forces S (for tuning).
inline int choose_split(const KernelInfo& info, int64_t tiles, int nkb) {
  if (!info.clusters) return 1;
  int forced = env_int("LOWBIT_CUDA_W4_SPLIT");
  if (forced > 0) return std::max(1, std::min({forced, info.max_cluster, nkb}));
  // About 4 blocks an SM (fewer if fewer fit): measured on an H100, more concurrent blocks
  // (up to the 6 that fit) streamed the weights slower, fewer left bandwidth unused. The
  // largest power of two not above that, at most the cluster limit, each split >= 2 k blocks.
  const int64_t target = std::min<int64_t>(static_cast<int64_t>(info.sms) * info.blocks_per_sm,
                                           static_cast<int64_t>(info.sms) * 4);
  const int64_t cap = std::min<int64_t>({target / (tiles > 0 ? tiles : 1), info.max_cluster, nkb / 2});
  int s = 1;
  while (s * 2 <= cap) s *= 2;
  // (clusters share a GPC: see split_for_waves; LOWBIT_CUDA_W4_NO_WAVES=1 skips it, for A/B runs)
  return env_int("LOWBIT_CUDA_W4_NO_WAVES") ? s : split_for_waves(s, tiles, info.active_clusters);
}

// Launches `kernel(args...)` over (token tiles of BM, row blocks of BN, K splits) on `stream`,
// the K splits of a tile (choose_split) one thread block cluster.
template <typename Kernel, typename... Args>
void launch_grid(Kernel kernel, const KernelInfo& info, const Params& p, int BM, int BN, int threads, int smem,
                 cudaStream_t stream, const Args&... args) {
  const int64_t tblocks = (p.M + BM - 1) / BM;
  const int64_t rblocks = (p.n_rt * 16 + BN - 1) / BN;
  LOWBIT_CHECK(tblocks <= 0x7fffffff && rblocks <= 65535, "w4_matmul_cuda: grid too large (M=", p.M, ", N=", p.N, ")");
  const int S = choose_split(info, tblocks * rblocks, p.nkb);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(tblocks), static_cast<unsigned>(rblocks), static_cast<unsigned>(S));
  cfg.blockDim = dim3(static_cast<unsigned>(threads), 1, 1);
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  cfg.attrs = attr;
  cfg.numAttrs = 0;
  if (S > 1) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 1;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = static_cast<unsigned>(S);
    cfg.numAttrs = 1;
  }
  check_cuda(cudaLaunchKernelEx(&cfg, kernel, args...), "w4_matmul_cuda", "kernel launch");
}

template <int FMT, int DT, int W, int R, int NT, int P, int MODE, int MinBlocks = 0>
void launch_mma(const Params& p, cudaStream_t stream) {
  auto kernel = w4_mma_kernel<FMT, DT, W, R, NT, P, MODE, MinBlocks>;
  constexpr int BN = 16 * R * W, BM = 8 * NT;
  int device = 0;
  check_cuda(cudaGetDevice(&device), "w4_matmul_cuda", "cudaGetDevice");
  constexpr int smem = Smem<FMT, W, R, NT, P, MODE>::kBytes;
  const KernelInfo info = kernel_info(kernel, device, 32 * W, smem);
  launch_grid(kernel, info, p, BM, BN, 32 * W, smem, stream, p);
}

#if defined(LOWBIT_CUDA_SM90A)
// A tensor map of rank 2 or 3 over elements of `elem_bytes` (1, 2 or 4): dims[0] contiguous
// elements, dims[d] (d > 0) `strides[d - 1]` bytes apart, boxes of box[0..rank), zero-filled past
// the edges, 128-byte swizzled if asked. False where TMA cannot take it (a base or stride not a
// multiple of 16 bytes, or no driver entry point).
inline bool make_map(CUtensorMap* map, const void* base, int elem_bytes, int rank, const int64_t* dims,
                     const int64_t* strides, const int* box, bool swizzle128) {
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static const Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<Encode>(fn);
  }();
  if (encode == nullptr || reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  const CUtensorMapDataType dt = elem_bytes == 1   ? CU_TENSOR_MAP_DATA_TYPE_UINT8
                                 : elem_bytes == 2 ? CU_TENSOR_MAP_DATA_TYPE_UINT16
                                                   : CU_TENSOR_MAP_DATA_TYPE_UINT32;
  cuuint64_t d[3], st[2];
  cuuint32_t b[3], elem_strides[3] = {1, 1, 1};
  for (int i = 0; i < rank; ++i) {
    d[i] = static_cast<cuuint64_t>(dims[i]);
    b[i] = static_cast<cuuint32_t>(box[i]);
    if (i > 0) {
      if (strides[i - 1] % 16 != 0) return false;
      st[i - 1] = static_cast<cuuint64_t>(strides[i - 1]);
    }
  }
  return encode(map, dt, static_cast<cuuint32_t>(rank), const_cast<void*>(base), d, st, b, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The 2-D case: `rows` rows of `inner` elements, `stride` bytes apart, boxes of box_rows x box_inner.
inline bool make_map_2d(CUtensorMap* map, const void* base, int elem_bytes, int64_t inner, int64_t rows,
                        int64_t stride, int box_inner, int box_rows, bool swizzle128) {
  const int64_t dims[2] = {inner, rows};
  const int box[2] = {box_inner, box_rows};
  return make_map(map, base, elem_bytes, 2, dims, &stride, box, swizzle128);
}

// The stream-K workspace of `stream` on `device` (the fp32 partial slots and the flags, zero
// between calls: each call leaves them so): one a stream, as cuBLAS keeps its workspace, so that
// calls on different streams never share one. Made on first use, also inside a CUDA graph
// capture (the allocation in relaxed capture mode, the flags zeroed on a private stream, neither
// captured), and never freed: a captured graph keeps using the one it was captured with (so two
// graphs captured on one stream must not be replayed concurrently). The first is made for the
// largest default block (`sms` slots of 128 KB: 32 fragments x 256 threads x 16 bytes, ~17 MB on
// an H100) so that it does not grow; a larger request (a tuning candidate) replaces a stream's
// workspace and keeps the old one alive. A stream handle can be reused by a new stream once the
// old one is destroyed, while the old stream's last kernels may still use the workspace: outside
// a capture the entry remembers the stream's unique id, and the caller records the returned event
// after its launch; a new id under a known handle first waits for that event. (cudaStreamGetId is
// refused on a capturing stream: a capture uses the entry as it is and records nothing.)
inline cudaEvent_t sk_workspace(int device, cudaStream_t stream, int sms, size_t partial_bytes, int flags,
                                float** partial, int** flag) {
  struct Ws {
    float* partial = nullptr;
    int* flag = nullptr;
    size_t bytes = 0;
    int flags = 0;
    unsigned long long id = 0;  // the stream's unique id (0: not known yet)
    cudaEvent_t done = nullptr;  // recorded after the last launch outside a capture
  };
  static std::mutex mu;
  static std::map<std::pair<int, cudaStream_t>, Ws> cache;
  constexpr const char* fn = "w4_matmul_cuda";
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  unsigned long long id = 0;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess) {
    cudaGetLastError();  // (the legacy stream beside a global-mode capture: the launch reports it)
    capture = cudaStreamCaptureStatusActive;
  }
  if (capture == cudaStreamCaptureStatusNone) check_cuda(cudaStreamGetId(stream, &id), fn, "cudaStreamGetId");
  std::lock_guard<std::mutex> lock(mu);
  Ws& w = cache[{device, stream}];
  if (id != 0) {
    if (w.id != 0 && w.id != id && w.done != nullptr) {
      check_cuda(cudaEventSynchronize(w.done), fn, "cudaEventSynchronize");  // the old stream's last use
    }
    w.id = id;
    if (w.done == nullptr) check_cuda(cudaEventCreateWithFlags(&w.done, cudaEventDisableTiming), fn, "cudaEventCreate");
  }
  if (w.bytes < partial_bytes || w.flags < flags) {
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    check_cuda(cudaThreadExchangeStreamCaptureMode(&mode), fn, "cudaThreadExchangeStreamCaptureMode");
    Ws n = w;
    n.bytes = std::max({partial_bytes, w.bytes, static_cast<size_t>(sms) * (128 << 10)});
    n.flags = std::max({flags, w.flags, sms});
    cudaStream_t init = nullptr;
    cudaError_t e = cudaMalloc(&n.partial, n.bytes);
    if (e == cudaSuccess) e = cudaMalloc(&n.flag, sizeof(int) * n.flags);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&init, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaMemsetAsync(n.flag, 0, sizeof(int) * n.flags, init);
    if (e == cudaSuccess) e = cudaStreamSynchronize(init);
    if (init != nullptr) cudaStreamDestroy(init);
    cudaThreadExchangeStreamCaptureMode(&mode);
    check_cuda(e, fn, "stream-K workspace");
    w = n;  // (the previous one stays allocated: graphs may hold it)
  }
  *partial = w.partial;
  *flag = w.flag;
  return id != 0 ? w.done : nullptr;
}

// Launches w4_ws_kernel; false (nothing launched) where it cannot run: no sm_90a binary for this
// GPU, or activations TMA cannot read (the caller then takes another kernel).
template <int FMT, int DT, int R, int NT, int P, int MinBlocks = 1, bool RS = false, int CW = 8, bool SK = false,
          bool Move = false>
bool launch_ws(const Params& p, cudaStream_t stream) {
  auto kernel = w4_ws_kernel<FMT, DT, R, NT, P, MinBlocks, RS, CW, SK, Move>;
  using SM = WsSmem<FMT, R, NT, P, RS, CW, SK, Move>;
  constexpr int BN = 16 * SM::kRT, BM = 8 * NT;
  int device = 0;
  check_cuda(cudaGetDevice(&device), "w4_matmul_cuda", "cudaGetDevice");
  if constexpr (SM::kBytes > 227 * 1024) {
    return false;  // (nf4's table leaves no room for this many stages)
  } else {
  const KernelInfo info = kernel_info(kernel, device, SM::kThreads, SM::kBytes);
  if (!info.sm90a) return false;
  // Activations [M][K] (boxes of BM tokens x 64 k, swizzled); weights as [row tiles][nkb x 512
  // bytes] (32-bit words; boxes of RT row tiles x one k block; RS: as [row tiles][nkb x 4 rows]
  // [128 bytes], swizzled, so that frags_rs reads other lanes' slots without bank conflicts);
  // scales as [row tiles][groups x 8 entries] (boxes of the 1 or 2 groups of a k block).
  using ST = typename ScaleT<FMT>::type;
  const int sw = 8 * static_cast<int>(sizeof(ST)) / 4, sg = p.gshift == 5 ? 2 : 1;
  CUtensorMap xmap, wmap, smap;
  const int64_t wdims[3] = {32, int64_t{p.nkb} * 4, p.n_rt}, wstrides[2] = {128, int64_t{p.nkb} * 512};
  const int wbox[3] = {32, 4, SM::kRT};
  if (!make_map_2d(&xmap, p.x, 2, p.K, p.M, p.x_row_stride * 2, 64, BM, true) ||
      !(RS ? make_map(&wmap, p.w, 4, 3, wdims, wstrides, wbox, true)
           : make_map_2d(&wmap, p.w, 4, int64_t{p.nkb} * 128, p.n_rt, int64_t{p.nkb} * 512, 128, SM::kRT, false)) ||
      !make_map_2d(&smap, p.s, 4, int64_t{p.num_groups} * sw, p.n_rt, int64_t{p.num_groups} * sw * 4, sg * sw,
                   SM::kRT, false)) {
    return false;
  }
  if constexpr (SK) {
    // One block an SM (or as many as there are iterations), no clusters.
    const int64_t total = (p.M + BM - 1) / BM * ((p.n_rt * 16 + BN - 1) / BN) * int64_t{p.nkb};
    const int G = static_cast<int>(std::min<int64_t>(int64_t{info.sms} * info.blocks_per_sm, total));
    Params q = p;
    const cudaEvent_t done = sk_workspace(device, stream, info.sms, sizeof(float) * G * (CW * 32) * (R * NT * 4), G,
                                          &q.sk_partial, &q.sk_flag);
    kernel<<<G, SM::kThreads, SM::kBytes, stream>>>(q, xmap, wmap, smap);
    check_cuda(cudaGetLastError(), "w4_matmul_cuda", "kernel launch");
    if (done != nullptr) check_cuda(cudaEventRecord(done, stream), "w4_matmul_cuda", "cudaEventRecord");
  } else {
    launch_grid(kernel, info, p, BM, BN, SM::kThreads, SM::kBytes, stream, p, xmap, wmap, smap);
  }
  return true;
  }
}
#endif

}  // namespace

template <int FMT, int DT>
bool w4_ws_ready() {
#if defined(LOWBIT_CUDA_SM90A)
  int device = 0;
  check_cuda(cudaGetDevice(&device), "w4_matmul_cuda", "cudaGetDevice");
  using SM = WsSmem<FMT, 1, 16, 6>;
  return kernel_info(w4_ws_kernel<FMT, DT, 1, 16, 6>, device, 288, SM::kBytes).sm90a;
#else
  return false;
#endif
}

// True if the one-token register kernel's K split leaves each block at most 4 k blocks.
template <int FMT, int DT, int P>
bool short_splits(const Params& p) {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "w4_matmul_cuda", "cudaGetDevice");
  const KernelInfo info = kernel_info(w4_mma_kernel<FMT, DT, 4, 2, 1, P, kRegX, 0>, device, 128,
                                      Smem<FMT, 4, 2, 1, P, kRegX>::kBytes);
  return p.nkb / choose_split(info, (p.n_rt * 16 + 127) / 128, p.nkb) <= 4;
}

// True if a grid of bm x bn tiles (one block an SM) fills at least one wave and leaves over 10%
// of its SM-waves idle in the last one: there stream-K (whole tiles first, the rest split by k
// block) keeps every SM busy to the end.
inline bool last_wave_idle(const Params& p, int bm, int bn) {
  static std::atomic<int> sms[64] = {};
  int device = 0;
  check_cuda(cudaGetDevice(&device), "w4_matmul_cuda", "cudaGetDevice");
  int n = sms[device & 63].load(std::memory_order_relaxed);
  if (n == 0) {
    check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "w4_matmul_cuda",
               "cudaDeviceGetAttribute");
    sms[device & 63].store(n, std::memory_order_relaxed);
  }
  const int64_t tiles = int64_t{(p.M + bm - 1) / bm} * ((p.N + bn - 1) / bn), waves = (tiles + n - 1) / n;
  return tiles >= n && tiles * 10 < waves * n * 9;
}

// Tile configurations, by the number of tokens and rows: the only ones compiled (a build with
// -DLOWBIT_W4_TUNING adds the candidates that LOWBIT_CUDA_W4_TILE=1.. picks for M > 16, the
// wgmma kernels among them; bench/cuda_w4_tiles.sh times them all).
template <int FMT, int DT>
void w4_launch(const W4Args& a, cudaStream_t stream) {
  const Params p = make_params(a);
  // Ring depth P: int4 6 k blocks (36 KB of shared memory a block: 6 blocks an SM); nf4 4,
  // next to its 32 KB table (52 KB: 4 blocks an SM).
  constexpr int P1 = FMT == kW4NF4 ? 4 : 6;
  if (p.M <= 16) {
    // The activation tile through shared memory here too (measured on an H100: int4 M=16
    // 28672x8192 67.3 -> 60.3 us, nf4 8192x28672 M=1 96.3 -> 71.0; each lane's own activation
    // loads were the warps' main stall), except int4 at M <= 8 when the K split leaves each
    // block <= 4 k blocks (4096^2: 12.3 us in registers, 13.3 through shared memory).
    bool regs = false;
    if constexpr (FMT == kW4Int4) regs = p.M <= 8 && short_splits<FMT, DT, P1>(p);
    // nf4 on N <= 4096: 64-row blocks, activations in registers (tile 62): twice the row blocks,
    // so half the K splits, each block filling its 32 KB code table for twice the k blocks
    // (fourteenth session, H100, M=1: 4096^2 17.0 -> 13.3 us, 4096x14336 25.8 -> 23.6;
    // 14336x4096 stays on the 128-row tile, 22.3 vs 23.1)
    bool rows64 = FMT == kW4NF4 && p.M <= 8 && p.N <= 4096;
#ifdef LOWBIT_W4_TUNING
    constexpr bool kAnyRegs = true;
    const int tile = env_int("LOWBIT_CUDA_W4_TILE");  // 1: the register path, 14: the shared tile
    regs = tile == 1 || (tile != 14 && regs);
    rows64 = rows64 && tile != 1 && tile != 14;
    switch (tile) {  // deeper rings, or 8 warps (256 rows) a block
      case 19: return p.M <= 8 ? launch_mma<FMT, DT, 4, 2, 1, 6, kSmemX>(p, stream) : launch_mma<FMT, DT, 4, 2, 2, 6, kSmemX>(p, stream);
      case 20: return p.M <= 8 ? launch_mma<FMT, DT, 4, 2, 1, 8, kSmemX>(p, stream) : launch_mma<FMT, DT, 4, 2, 2, 8, kSmemX>(p, stream);
      case 21: return p.M <= 8 ? launch_mma<FMT, DT, 8, 2, 1, 4, kSmemX>(p, stream) : launch_mma<FMT, DT, 8, 2, 2, 4, kSmemX>(p, stream);
      // M=1 on N = 4096 (thirteenth session): 64-row blocks (twice the row blocks, so half the K
      // splits: longer runs, clusters of 8), through shared memory or (62) registers; 256-row
      // blocks with a 6-deep ring (nf4's code table filled once for twice the rows)
      case 61: return p.M <= 8 ? launch_mma<FMT, DT, 4, 1, 1, 6, kSmemX>(p, stream) : launch_mma<FMT, DT, 4, 1, 2, 6, kSmemX>(p, stream);
      case 62: return p.M <= 8 ? launch_mma<FMT, DT, 4, 1, 1, P1, kRegX>(p, stream) : launch_mma<FMT, DT, 4, 1, 2, P1, kRegX>(p, stream);
      case 63: return p.M <= 8 ? launch_mma<FMT, DT, 8, 2, 1, 6, kSmemX>(p, stream) : launch_mma<FMT, DT, 8, 2, 2, 6, kSmemX>(p, stream);
#ifdef LOWBIT_CUDA_SM90A
      // the warp-specialized kernel streaming the weights by TMA (wgmma n8 / n16): 8 stages and two
      // blocks an SM, or 12 stages
      case 37: if (p.M <= 8 ? launch_ws<FMT, DT, 1, 1, 8, 2>(p, stream) : launch_ws<FMT, DT, 1, 2, 8, 2>(p, stream)) return; break;
      case 38: if (p.M <= 8 ? launch_ws<FMT, DT, 1, 1, 12>(p, stream) : launch_ws<FMT, DT, 1, 2, 12>(p, stream)) return; break;
#endif
      default: break;
    }
#else
    constexpr bool kAnyRegs = false;  // compile the register kernels only where they can run
#endif
    if (p.M <= 8) {
      if constexpr (FMT == kW4Int4 || kAnyRegs) {
        if (regs) return launch_mma<FMT, DT, 4, 2, 1, P1, kRegX>(p, stream);
      }
      if constexpr (FMT == kW4NF4) {
        if (rows64) return launch_mma<FMT, DT, 4, 1, 1, P1, kRegX>(p, stream);
      }
      return launch_mma<FMT, DT, 4, 2, 1, 4, kSmemX>(p, stream);
    }
    if constexpr (kAnyRegs) {
      if (regs) return launch_mma<FMT, DT, 4, 2, 2, P1, kRegX>(p, stream);
    }
    return launch_mma<FMT, DT, 4, 2, 2, 4, kSmemX>(p, stream);
  }
#ifdef LOWBIT_W4_TUNING
  switch (env_int("LOWBIT_CUDA_W4_TILE")) {
    case 11: launch_mma<FMT, DT, 16, 1, 8, 4, kSmemX>(p, stream); return;  // 16 warps x 1 row tile
    case 12: launch_mma<FMT, DT, 8, 1, 8, 4, kSmemX>(p, stream); return;
    case 13: launch_mma<FMT, DT, 8, 1, 4, 4, kSmemX>(p, stream); return;
    case 1: launch_mma<FMT, DT, 4, 2, 4, 4, kRegX>(p, stream); return;  // the register path of M <= 16
    case 2: launch_mma<FMT, DT, 4, 2, 8, 4, kSmemX>(p, stream); return;
    case 3: launch_mma<FMT, DT, 8, 2, 8, 6, kSmemX>(p, stream); return;
    case 4: launch_mma<FMT, DT, 4, 2, 4, 4, kSmemX>(p, stream); return;
    case 5: launch_mma<FMT, DT, 4, 4, 4, 4, kSmemX>(p, stream); return;
    case 9: launch_mma<FMT, DT, 8, 2, 4, 4, kSmemX>(p, stream); return;
    case 10: launch_mma<FMT, DT, 8, 2, 8, 4, kSmemX>(p, stream); return;
#ifdef LOWBIT_CUDA_SM90A
    // the warp-specialized kernel (TMA, mbarriers): 128R rows x 8NT tokens, P stages
    case 30: if (launch_ws<FMT, DT, 1, 32, 4>(p, stream)) return; break;
    case 31: if (launch_ws<FMT, DT, 2, 16, 4>(p, stream)) return; break;
    case 32: if (launch_ws<FMT, DT, 1, 16, 6>(p, stream)) return; break;
    case 33: if (launch_ws<FMT, DT, 2, 8, 6>(p, stream)) return; break;
    case 34: if (launch_ws<FMT, DT, 1, 8, 8>(p, stream)) return; break;
    case 35: if (launch_ws<FMT, DT, 1, 32, 5>(p, stream)) return; break;  // int4 only (shared memory)
    case 36: if (launch_ws<FMT, DT, 1, 16, 4, 2>(p, stream)) return; break;  // two blocks an SM
    // 64-token blocks of 128 rows, two blocks an SM (two consumer chains an SM at M 33-64)
    case 41: if (launch_ws<FMT, DT, 1, 8, 6, 2>(p, stream)) return; break;
    case 42: if (launch_ws<FMT, DT, 1, 8, 4, 2>(p, stream)) return; break;
    // RS: wgmma's A operand from registers (M 33-64 and 65-128; deeper rings where the freed
    // weight tile buffers leave room)
    case 43: if (launch_ws<FMT, DT, 2, 8, 6, 1, true>(p, stream)) return; break;
    case 44: if (launch_ws<FMT, DT, 2, 8, 8, 1, true>(p, stream)) return; break;
    case 45: if (launch_ws<FMT, DT, 1, 8, 8, 1, true>(p, stream)) return; break;
    case 46: if (launch_ws<FMT, DT, 1, 8, 4, 2, true>(p, stream)) return; break;
    case 47: if (launch_ws<FMT, DT, 1, 16, 6, 1, true>(p, stream)) return; break;
    case 48: if (launch_ws<FMT, DT, 1, 16, 8, 1, true>(p, stream)) return; break;
    // RS with registers moved to the consumers (384 threads): 256-token blocks, and 128-token
    // blocks of 256 rows
    case 49: if (launch_ws<FMT, DT, 1, 32, FMT == kW4NF4 ? 4 : 5, 1, true>(p, stream)) return; break;
    case 50: if (launch_ws<FMT, DT, 1, 32, FMT == kW4NF4 ? 5 : 6, 1, true>(p, stream)) return; break;
    case 51: if (launch_ws<FMT, DT, 2, 16, 4, 1, true>(p, stream)) return; break;
    // RS with 16 consumer warps (one row tile each), 256 rows x 32 tokens: 9% ahead of the
    // mma.sync tile at M=32 on 28672x8192, behind it on N = 4096 and 8192 (eleventh session;
    // 256 x 64 with 16 warps, once 52/53, lost to 43 and was removed)
    case 54: if (launch_ws<FMT, DT, 1, 4, 8, 1, true, 16>(p, stream)) return; break;
    // RS stream-K (one block an SM over equal runs of (tile, k block) iterations): 64 tokens x
    // 256 / 128 rows, 256 tokens x 128 rows
    case 55: if (launch_ws<FMT, DT, 2, 8, 6, 1, true, 8, true>(p, stream)) return; break;
    case 56: if (launch_ws<FMT, DT, 1, 8, 8, 1, true, 8, true>(p, stream)) return; break;
    case 57: if (launch_ws<FMT, DT, 1, 32, FMT == kW4NF4 ? 4 : 5, 1, true, 8, true>(p, stream)) return; break;
    // 43, 45 and 48 with registers moved to the consumers (as the stream-K 55 has)
    case 58: if (launch_ws<FMT, DT, 2, 8, 6, 1, true, 8, false, true>(p, stream)) return; break;
    case 59: if (launch_ws<FMT, DT, 1, 8, 8, 1, true, 8, false, true>(p, stream)) return; break;
    case 60: if (launch_ws<FMT, DT, 1, 16, 8, 1, true, 8, false, true>(p, stream)) return; break;
#endif
    default: break;
  }
#endif
#if defined(LOWBIT_CUDA_SM90A)
  // Hopper: the warp-specialized wgmma kernel where it wins (measured on an H100; not taken,
  // false, where TMA cannot read the activations). RS = A from registers; "move" = registers
  // moved from the producer warpgroup (232 a consumer), which the twelfth session measured
  // faster for the 128-row blocks of 64 and 128 tokens (tile 59: int4 M=64 14336x4096 30.3 ->
  // 28.2 us, M=128 4096x14336 57.9 -> 45.6 and 4096^2 25.2 -> 20.7, nf4 alike but smaller;
  // tile 60: M=256 4096^2 27.9 -> 26.3, 4096x14336 59.3 -> 57.8 / nf4 67.9 -> 65.9) but not
  // for the 256-row ones (tile 58 = 43). Eleventh session, us int4 / nf4 before -> after:
  //   * 33-64 tokens, 64-token blocks: 256 rows, RS, on N >= 16384 (28672x8192 97.5 -> 76.9 /
  //     112.9 -> 89.0); 128 rows, RS, on 8192 <= N < 16384 (14336x4096 35.0 -> 30.9 / 38.4 ->
  //     32.5), but stream-K blocks of 256 rows on the long K >= 16384 there (twelfth session:
  //     8192x28672 int4 105.5 -> 83.9 us, the 32 row blocks split by k block over every SM);
  //     128 rows, RS, two blocks an SM, on N < 8192 (4096x14336 45.7 -> 38.3 / 50.3 ->
  //     41.6; 4096^2 21.5 -> 21.2 / 26.8 -> 23.2; was the mma.sync tile);
  //   * 65-128 tokens: 128-token blocks of 128 rows, RS, on N >= 8192 (8192x28672 129.7 ->
  //     115.2 / 136.9 -> 124.2; 28672x8192 128.1 -> 127.1 / 134.2 -> 137.6, was 256 rows); on
  //     N < 8192 64-token blocks (4096x14336 72.3 -> 56.1 int4 shared-memory tile, 77.2 -> 52.4
  //     nf4 RS; both RS with the move since the twelfth session);
  //   * beyond (against the 64-token mma.sync tiles: M=256 400 -> 200 us, M=1024 1405 -> 694
  //     us): 128-token blocks up to 256 on short weights (N < 8192), where 256-token blocks
  //     leave SMs idle; else 256-token blocks (5 stages for int4; nf4's table leaves room for
  //     4), stream-K where the last wave would leave SMs idle and K <= 8192 (twelfth session,
  //     int4: 14336x4096 M=1024 202.8 -> 190.3 us, 28672x8192 M=256 186.0 -> 176.7; on long K the
  //     blocks' scattered k positions lose the activations' L2 reuse: 8192x28672 M=1024 603 ->
  //     829). (RS blocks of 256 tokens get registers moved from the producer warpgroup.)
  if (p.M > 32 && p.M <= 64) {
    if (p.N >= 16384) {
      if (launch_ws<FMT, DT, 2, 8, 6, 1, true>(p, stream)) return;
    } else if (p.N >= 8192) {
      if (p.K >= 16384) {
        if (launch_ws<FMT, DT, 2, 8, 6, 1, true, 8, true>(p, stream)) return;
      } else if (launch_ws<FMT, DT, 1, 8, 8, 1, true, 8, false, true>(p, stream)) {
        return;
      }
    } else if (launch_ws<FMT, DT, 1, 8, 4, 2, true>(p, stream)) {
      return;
    }
  } else if (p.M > 64 && p.M <= 128) {
    if (p.N >= 16384) {
      if (launch_ws<FMT, DT, 2, 16, 4, 1, true>(p, stream)) return;
    } else if (p.N >= 8192) {
      if (launch_ws<FMT, DT, 1, 16, 8, 1, true, 8, false, true>(p, stream)) return;
    } else if (launch_ws<FMT, DT, 1, 8, 8, 1, true, 8, false, true>(p, stream)) {
      return;
    }
  } else if (p.M > 128) {
    if (p.M <= 256 && p.N < 8192) {
      if (launch_ws<FMT, DT, 1, 16, 8, 1, true, 8, false, true>(p, stream)) return;
    } else if (p.K <= 8192 && last_wave_idle(p, 256, 128)) {
      if (launch_ws<FMT, DT, 1, 32, FMT == kW4NF4 ? 4 : 5, 1, true, 8, true>(p, stream)) return;
    } else if (launch_ws<FMT, DT, 1, 32, FMT == kW4NF4 ? 4 : 5, 1, true>(p, stream)) {
      return;
    }
  }
#endif
  // Beyond 16 tokens the activation tile goes through shared memory (measured on an H100, M=32:
  // 28672x8192 114 -> 77 us). From 33 tokens a block takes 64, with 256 rows on tall weights
  // (the activations are read once per 256 rows) and 128 rows otherwise (twice the blocks, for
  // the SMs on short ones): M=64 28672x8192 205 -> 105 us, 4096x14336 57 -> 46 us.
  if (p.M <= 32) {
    launch_mma<FMT, DT, 4, 2, 4, 4, kSmemX>(p, stream);
  } else if (p.N >= 12288) {
    launch_mma<FMT, DT, 8, 2, 8, 4, kSmemX>(p, stream);
  } else {
    launch_mma<FMT, DT, 4, 2, 8, 4, kSmemX>(p, stream);
  }
}

template <int FMT, int DT>
void w4_dequant_launch(const W4Args& a, cudaStream_t stream) {
  const Params p = make_params(a);
  constexpr const char* fn = "w4_dequant_cuda";
  int device = 0, sms = 1;
  check_cuda(cudaGetDevice(&device), fn, "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), fn, "cudaDeviceGetAttribute");
  const int64_t total = static_cast<int64_t>(p.n_rt) * p.nkb * 32;
  const int64_t blocks = std::min<int64_t>((total + 511) / 512, static_cast<int64_t>(sms) * 8);
  w4_dequant_kernel<FMT, DT><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), fn, "kernel launch");
}

}  // namespace w4
}  // namespace cuda
}  // namespace lowbit
