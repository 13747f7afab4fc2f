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
// floats in the scalar build) and exp (kv_attention_vec.h), the code loaders (int8, 4-bit) and
// fp16/bf16 scale conversion (kv_attention_load.h), and the 4x4 dot-product reduction of the
// micro-kernels (kv_attention_tiles.h). Those headers are parts of this file, included inside
// its anonymous namespace.
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

// Parts of this file, included in this namespace: the float vector and its exp, the loaders,
// the register-tiled micro-kernels.
#include "kv_attention_vec.h"
#include "kv_attention_load.h"
#include "kv_attention_tiles.h"

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
