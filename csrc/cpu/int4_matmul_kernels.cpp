// CPU kernel for int4_matmul, compiled once per instruction set (see isa.h); portable C++
// that the compiler vectorizes for each set.
//
// Work is split over N in chunks of whole 8-row tiles, handed out by the thread pool. For each chunk a thread walks x in blocks
// of up to kMaxRows rows (converted to fp32 once per block). For each tile of 8 weight rows
// it decodes one group at a time into fp32 rows (each group decoded once per row block,
// with a loop the compiler vectorizes) and takes dot products with up to 4 x rows at once.
// Each dot product keeps kLanes partial sums (lane l takes the k with k % kLanes == l inside
// each group): independent fp32 chains that vectorize without reassociation, summed in a fixed
// tree at the end, so results do not depend on the thread count. Then bias is added and the
// result rounded to out_dtype.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/int4_matmul.h"
#include "isa.h"
#include "parallel.h"

namespace lowbit {
namespace cpu {
namespace {

constexpr int64_t kNR = 8;                      // weight rows per tile
constexpr int64_t kMR = 4;                      // x rows per dot-product call
constexpr int kLanes = 8;                       // partial sums per dot product
constexpr int64_t kMaxRows = 64;                // x rows per block (bounded by kXBlockBytes too)
constexpr int64_t kXBlockBytes = 1 << 20;       // fp32 x block budget per thread
constexpr int64_t kMinWorkPerThread = 1 << 19;  // multiply-adds below which a thread is not worth it
constexpr int64_t kMinChunkTiles = 4;           // 32 weight rows: keeps x conversion cost small

struct Scratch {
  std::vector<float> xblock;       // [rows_per_block][K] fp32 copy of x (unused if x is fp32)
  std::vector<float> wrows;        // [kNR][G] decoded weights of one group of one tile
  std::vector<float> part;         // [kNR][rows_per_block][kLanes] partial sums
  std::vector<const float*> rows;  // row pointers of the current block
};

// part[i][l] += sum over k in [0, G) with k % kLanes == l of xr[i][k] * w[k], for i < R.
template <int R>
inline void dot_rows(const float* const* xr, const float* w, int64_t G, float* part) {
  float p[R][kLanes];
  for (int i = 0; i < R; ++i)
    for (int l = 0; l < kLanes; ++l) p[i][l] = part[i * kLanes + l];
  int64_t k = 0;
  for (; k + kLanes <= G; k += kLanes) {
    for (int i = 0; i < R; ++i) {
      const float* x = xr[i] + k;
      for (int l = 0; l < kLanes; ++l) p[i][l] += x[l] * w[k + l];
    }
  }
  const int rest = static_cast<int>(G - k);  // G is even but need not be a multiple of kLanes
  for (int i = 0; i < R; ++i)
    for (int l = 0; l < rest; ++l) p[i][l] += xr[i][k + l] * w[k + l];
  for (int i = 0; i < R; ++i)
    for (int l = 0; l < kLanes; ++l) part[i * kLanes + l] = p[i][l];
}

inline float sum_lanes(const float* p) {  // fixed order
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}
static_assert(kLanes == 8, "sum_lanes adds 8 lanes");

// wrows[j][k] = w[n0 + j, g*G + k] = scale * (q - zero) for j < nr.
void decode_group(const Int4MatmulArgs& a, int64_t n0, int64_t nr, int64_t g, float* wrows) {
  const int64_t G = a.group_size;
  const int64_t ngroups = a.K / G;
  for (int64_t j = 0; j < nr; ++j) {
    const int64_t n = n0 + j;
    const float s = load_as_float(a.scales, n * ngroups + g, a.scales_dtype);
    const float z = a.zeros ? load_as_float(a.zeros, n * ngroups + g, a.zeros_dtype) : 8.0f;
    const uint8_t* src = a.qweight + n * (a.K / 2) + g * (G / 2);
    float* dst = wrows + j * G;
    for (int64_t b = 0; b < G / 2; ++b) {
      const uint8_t v = src[b];
      dst[2 * b] = s * (static_cast<float>(v & 0x0f) - z);
      dst[2 * b + 1] = s * (static_cast<float>(v >> 4) - z);
    }
  }
}

// Rows [m0, m0 + mb) of x as fp32 row pointers (converted into s.xblock unless x is fp32).
void load_x_block(const Int4MatmulArgs& a, int64_t m0, int64_t mb, Scratch& s) {
  for (int64_t i = 0; i < mb; ++i) {
    const int64_t base = (m0 + i) * a.x_row_stride;
    if (a.x_dtype == kFloat32) {
      s.rows[i] = static_cast<const float*>(a.x) + base;
      continue;
    }
    float* dst = s.xblock.data() + i * a.K;
    if (a.x_dtype == kFloat16) {
      const uint16_t* src = static_cast<const uint16_t*>(a.x) + base;
      for (int64_t k = 0; k < a.K; ++k) dst[k] = half_to_float(src[k]);
    } else {
      const uint16_t* src = static_cast<const uint16_t*>(a.x) + base;
      for (int64_t k = 0; k < a.K; ++k) dst[k] = bf16_to_float(src[k]);
    }
    s.rows[i] = dst;
  }
}

// One tile: weight rows [n0, n0 + nr) against the current x block of mb rows.
void run_tile(const Int4MatmulArgs& a, int64_t m0, int64_t mb, int64_t n0, int64_t nr, Scratch& s) {
  const int64_t G = a.group_size;
  std::fill(s.part.begin(), s.part.begin() + nr * mb * kLanes, 0.0f);
  for (int64_t g = 0; g < a.K / G; ++g) {
    decode_group(a, n0, nr, g, s.wrows.data());
    for (int64_t j = 0; j < nr; ++j) {
      const float* w = s.wrows.data() + j * G;
      for (int64_t i = 0; i < mb; i += kMR) {
        const float* xr[kMR];
        const int64_t rows = std::min(kMR, mb - i);
        for (int64_t r = 0; r < rows; ++r) xr[r] = s.rows[i + r] + g * G;
        float* part = s.part.data() + (j * mb + i) * kLanes;
        switch (rows) {
          case 1: dot_rows<1>(xr, w, G, part); break;
          case 2: dot_rows<2>(xr, w, G, part); break;
          case 3: dot_rows<3>(xr, w, G, part); break;
          default: dot_rows<4>(xr, w, G, part); break;
        }
      }
    }
  }
  for (int64_t i = 0; i < mb; ++i) {
    for (int64_t j = 0; j < nr; ++j) {
      const int64_t n = n0 + j;
      float y = sum_lanes(s.part.data() + (j * mb + i) * kLanes);
      if (a.bias) y += load_as_float(a.bias, n, a.bias_dtype);
      store_from_float(a.out, (m0 + i) * a.N + n, a.out_dtype, y);
    }
  }
}

struct Plan {
  int64_t tiles;        // ceil(N / 8)
  int64_t chunk_tiles;  // tiles per work item
  int64_t chunks;
  int64_t rows_per_block;
  int threads;
};

Plan make_plan(const Int4MatmulArgs& a, int num_threads) {
  Plan p{};
  p.tiles = (a.N + kNR - 1) / kNR;
  const int64_t by_budget = kXBlockBytes / (a.K * static_cast<int64_t>(sizeof(float)));
  p.rows_per_block = std::max<int64_t>(kMR, std::min<int64_t>(kMaxRows, by_budget / kMR * kMR));
  p.rows_per_block = std::min<int64_t>(p.rows_per_block, a.M);
  // Threads: no more than asked, than useful for the amount of work, than chunks of >= 4 tiles.
  const double work = static_cast<double>(a.M) * static_cast<double>(a.N) * static_cast<double>(a.K);
  int64_t t = std::max<int64_t>(1, num_threads);
  t = std::min<int64_t>(t, std::max<int64_t>(1, static_cast<int64_t>(work / kMinWorkPerThread)));
  t = std::min<int64_t>(t, std::max<int64_t>(1, p.tiles / kMinChunkTiles));
  p.threads = static_cast<int>(t);
  // About 4 chunks per thread for load balance, each of at least kMinChunkTiles tiles.
  p.chunk_tiles = t == 1 ? p.tiles : std::max<int64_t>(kMinChunkTiles, p.tiles / (4 * t));
  p.chunks = (p.tiles + p.chunk_tiles - 1) / p.chunk_tiles;
  return p;
}

void run_chunk(const Int4MatmulArgs& a, const Plan& p, int64_t c, Scratch& s) {
  const int64_t t_begin = c * p.chunk_tiles;
  const int64_t t_end = std::min(p.tiles, t_begin + p.chunk_tiles);
  for (int64_t m0 = 0; m0 < a.M; m0 += p.rows_per_block) {
    const int64_t mb = std::min(p.rows_per_block, a.M - m0);
    load_x_block(a, m0, mb, s);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t n0 = t * kNR;
      run_tile(a, m0, mb, n0, std::min(kNR, a.N - n0), s);
    }
  }
}

}  // namespace

void LOWBIT_ISA_FN(int4_matmul_kernel)(const Int4MatmulArgs& a, int num_threads) {
  const Plan p = make_plan(a, num_threads);
  // All allocation happens here, on the calling thread (a bad_alloc becomes MemoryError);
  // the tasks only compute and cannot throw.
  std::vector<Scratch> scratch(static_cast<size_t>(p.threads));
  for (Scratch& s : scratch) {
    if (a.x_dtype != kFloat32) s.xblock.resize(static_cast<size_t>(p.rows_per_block * a.K));
    s.wrows.resize(static_cast<size_t>(kNR * a.group_size));
    s.part.resize(static_cast<size_t>(kNR * p.rows_per_block * kLanes));
    s.rows.resize(static_cast<size_t>(p.rows_per_block));
  }
  parallel_for(p.chunks, p.threads, [&](int64_t c, int thread) { run_chunk(a, p, c, scratch[thread]); });
}

}  // namespace cpu
}  // namespace lowbit
