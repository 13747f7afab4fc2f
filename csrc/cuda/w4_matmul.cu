// Host entry points of the 4-bit CUDA kernels: pointer/device checks, then the launch of the
// instantiation for the format and activation dtype (csrc/cuda/w4_<fmt>_<dtype>.cu).
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "../common/w4_matmul.h"
#include "cuda_kernels.h"
#include "cuda_util.h"
#include "w4_launch.h"
#include "w4_sk_plan.h"

namespace lowbit {
namespace cuda {
namespace {

struct NamedPtr {
  const void* p;
  const char* name;
};

// The GPU of every non-null pointer in `ptrs` (they must share one); `device` >= 0 is the one
// they must be on, named `where` in the error.
int common_device(std::initializer_list<NamedPtr> ptrs, const char* fn, int device = -1, const char* where = nullptr) {
  for (const auto& q : ptrs) {
    if (q.p == nullptr) continue;
    const int d = pointer_device(q.p, fn, q.name);
    if (device < 0) {
      device = d;
      where = q.name;
    }
    LOWBIT_CHECK(d == device, fn, ": ", q.name, " is on cuda:", d, " but ", where, " is on cuda:", device);
  }
  return device;
}

int common_device(const W4Args& a, const char* fn, bool dequant) {
  return common_device({{a.packed_w, "packed_w_ptr"}, {a.packed_s, "packed_s_ptr"}, {a.out, "out_ptr"},
                        {dequant ? nullptr : a.x, "x_ptr"}, {dequant ? nullptr : a.bias, "bias_ptr"}},
                       fn);
}

template <bool Dequant>
void dispatch(const W4Args& a, cudaStream_t s) {
  using namespace w4;
  const int key = a.fmt * 4 + a.act_dtype;
  switch (key) {
    case kW4Int4 * 4 + kFloat16: Dequant ? w4_dequant_launch<kW4Int4, kFloat16>(a, s) : w4_launch<kW4Int4, kFloat16>(a, s); break;
    case kW4Int4 * 4 + kBFloat16: Dequant ? w4_dequant_launch<kW4Int4, kBFloat16>(a, s) : w4_launch<kW4Int4, kBFloat16>(a, s); break;
    case kW4NF4 * 4 + kFloat16: Dequant ? w4_dequant_launch<kW4NF4, kFloat16>(a, s) : w4_launch<kW4NF4, kFloat16>(a, s); break;
    default: Dequant ? w4_dequant_launch<kW4NF4, kBFloat16>(a, s) : w4_launch<kW4NF4, kBFloat16>(a, s); break;
  }
}

}  // namespace

void w4_matmul(const W4Args& a, uintptr_t stream) {
  constexpr const char* fn = "w4_matmul_cuda";
  DeviceGuard guard(common_device(a, fn, false), fn);
  dispatch<false>(a, reinterpret_cast<cudaStream_t>(stream));
}

void w4_dequant(const W4Args& a, uintptr_t stream) {
  constexpr const char* fn = "w4_dequant_cuda";
  DeviceGuard guard(common_device(a, fn, true), fn);
  dispatch<true>(a, reinterpret_cast<cudaStream_t>(stream));
}

W4Plan::W4Plan(const W4Args& weights) : args_(weights) {
  device_ = common_device({{args_.packed_w, "packed_w_ptr"}, {args_.packed_s, "packed_s_ptr"}, {args_.bias, "bias_ptr"}},
                          "W4Plan");
}

void W4Plan::operator()(uintptr_t x_ptr, int64_t x_row_stride, int64_t M, uintptr_t out_ptr, uintptr_t stream) const {
  constexpr const char* fn = "W4Plan";
  W4Args a = args_;
  a.x = reinterpret_cast<const void*>(x_ptr);
  a.x_row_stride = x_row_stride;
  a.M = M;
  a.out = reinterpret_cast<void*>(out_ptr);
  check_w4_args(fn, a, false);
  common_device({{a.x, "x_ptr"}, {a.out, "out_ptr"}}, fn, device_, "the weight");
  DeviceGuard guard(device_, fn);
  dispatch<false>(a, reinterpret_cast<cudaStream_t>(stream));
}

bool w4_fused_large_m(int device) {
  constexpr const char* fn = "w4_fused_large_m_cuda";
  DeviceGuard guard(device, fn);
  return w4::w4_ws_ready<kW4Int4, kFloat16>();
}

std::string w4_sk_plan_check(int tblocks, int nrb, int nkb, int G) {
  if (tblocks < 1 || nrb < 1 || nkb < 1 || G < 1) return "every count must be >= 1";
  const int64_t tiles = int64_t{tblocks} * nrb;
  if (G > tiles * nkb || tiles * nkb > (int64_t{1} << 24)) return "G above the iterations (the launcher caps it), or too large to check";
  auto at = [&](const char* what, int b, int tile) {
    return std::string(what) + " (block " + std::to_string(b) + ", tile " + std::to_string(tile) + ")";
  };
  std::vector<int> cover(static_cast<size_t>(tiles * nkb), 0);
  struct Park {
    int tile = -1, k0 = 0, k1 = 0;
    bool used = false;
  };
  std::vector<Park> park(static_cast<size_t>(G));
  std::vector<char> owned(static_cast<size_t>(tiles), 0);
  // Blocks in order: a tile's parked pieces (in lower blocks) are known when its owner is met.
  for (int b = 0; b < G; ++b) {
    const w4::SkPlan sk(tblocks, nrb, nkb, G, b);
    for (int i = 0; i < sk.nk;) {  // the pieces, as w4_ws_kernel's consumers walk them
      int kb, tt, rb;
      sk.coords(i, kb, tt, rb);
      const int tile = rb * tblocks + tt, i1 = sk.piece_end(i, kb), kb1 = kb + (i1 - 1 - i);
      if (tt < 0 || tt >= tblocks || rb < 0 || rb >= nrb) return at("tile out of range", b, tile);
      for (int ii = i; ii < i1; ++ii) {
        int k2, t2, r2;
        sk.coords(ii, k2, t2, r2);
        if (t2 != tt || r2 != rb || k2 != kb + (ii - i)) return at("a piece leaves its tile", b, tile);
        ++cover[static_cast<size_t>(int64_t{tile} * nkb + k2)];
      }
      if (kb != 0) {  // sk_tile_end parks it: only ever the block's first split piece
        if (i != sk.dp_n) return at("a piece without its tile's first k block is not the first split piece", b, tile);
        park[static_cast<size_t>(b)] = Park{tile, kb, kb1, false};
      } else {  // the owner: the lower blocks it waits for, as sk_tile_end finds them
        if (owned[static_cast<size_t>(tile)]++) return at("two owners", b, tile);
        int cov = kb1;
        if (kb1 != nkb - 1) {
          const int64_t last = sk.tile_last(i1, kb1);
          for (int q = b - 1; q >= 0 && sk.start(q) <= last; --q) {
            if (!sk.holds(q)) continue;
            Park& pq = park[static_cast<size_t>(q)];
            if (pq.tile != tile || pq.k0 != cov + 1 || pq.used) return at("a waited-for block holds no next piece", b, tile);
            pq.used = true;
            cov = pq.k1;
          }
        }
        if (cov != nkb - 1) return at("the owner's pieces do not reach the last k block", b, tile);
      }
      i = i1;
    }
  }
  for (size_t e = 0; e < cover.size(); ++e) {
    if (cover[e] != 1) return "iteration " + std::to_string(e) + " covered " + std::to_string(cover[e]) + " times";
  }
  for (int b = 0; b < G; ++b) {
    if (park[static_cast<size_t>(b)].tile >= 0 && !park[static_cast<size_t>(b)].used) return at("a parked piece nobody adds", b, park[static_cast<size_t>(b)].tile);
  }
  return std::string();
}

}  // namespace cuda
}  // namespace lowbit
