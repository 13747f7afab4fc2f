// Host entry points of the 4-bit CUDA kernels: pointer/device checks, then the launch of the
// instantiation for the format and activation dtype (csrc/cuda/w4_<fmt>_<dtype>.cu).
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "../common/w4_matmul.h"
#include "cuda_kernels.h"
#include "cuda_util.h"
#include "w4_launch.h"

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

}  // namespace cuda
}  // namespace lowbit
