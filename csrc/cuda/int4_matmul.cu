// Simple, obviously-right CUDA kernel for int4_matmul: one warp per output element.
//
// Warp w computes y[m, n] for (m, n) = divmod(w, N) (grid-stride over all M*N outputs):
// lane l walks the packed bytes l, l+32, ... of weight row n, decodes both nibbles
// (low = even k, high = odd k), multiplies by x[m, k] in fp32, and the warp sums its 32
// partial sums with shuffles; lane 0 adds the bias and stores in out_dtype. Consecutive
// warps of a block share the row m, so the x row is read from L1/L2. Not fast for large M;
// tuned kernels come later, this one is the correctness baseline on the GPU.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../common/check.h"
#include "cuda_kernels.h"
#include "cuda_util.h"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps per block
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

template <int XDtype>
__device__ __forceinline__ float load_x(const void* x, int64_t i) {
  if constexpr (XDtype == kFloat16) {
    return half_to_float(static_cast<const uint16_t*>(x)[i]);
  } else if constexpr (XDtype == kBFloat16) {
    return bf16_to_float(static_cast<const uint16_t*>(x)[i]);
  } else {
    return static_cast<const float*>(x)[i];
  }
}

template <int XDtype>
__global__ void __launch_bounds__(kThreads) int4_matmul_kernel(const Int4MatmulArgs a) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t first_warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t total = a.M * a.N;
  const int64_t row_bytes = a.K / 2;
  const int64_t group_bytes = a.group_size / 2;  // a byte never straddles groups (G is even)
  const int64_t ngroups = a.K / a.group_size;

  for (int64_t p = first_warp; p < total; p += num_warps) {  // warp-uniform loop
    const int64_t m = p / a.N;
    const int64_t n = p - m * a.N;
    const uint8_t* q = a.qweight + n * row_bytes;
    const int64_t xrow = m * a.x_row_stride;
    float acc = 0.0f;
    for (int64_t b = lane; b < row_bytes; b += 32) {
      const int64_t g = n * ngroups + b / group_bytes;
      const float s = load_as_float(a.scales, g, a.scales_dtype);
      const float z = a.zeros != nullptr ? load_as_float(a.zeros, g, a.zeros_dtype) : 8.0f;
      const uint32_t v = q[b];
      const float w0 = s * (static_cast<float>(v & 0x0fu) - z);
      const float w1 = s * (static_cast<float>(v >> 4) - z);
      acc += load_x<XDtype>(a.x, xrow + 2 * b) * w0;
      acc += load_x<XDtype>(a.x, xrow + 2 * b + 1) * w1;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (lane == 0) {
      if (a.bias != nullptr) acc += load_as_float(a.bias, n, a.bias_dtype);
      store_from_float(a.out, m * a.N + n, a.out_dtype, acc);
    }
  }
}

}  // namespace

void int4_matmul(const Int4MatmulArgs& a, uintptr_t stream) {
  constexpr const char* fn = "int4_matmul_cuda";
  const int device = pointer_device(a.x, fn, "x_ptr");
  const struct {
    const void* p;
    const char* name;
  } others[] = {{a.qweight, "qweight_ptr"}, {a.scales, "scales_ptr"}, {a.zeros, "zeros_ptr"},
                {a.bias, "bias_ptr"}, {a.out, "out_ptr"}};
  for (const auto& o : others) {
    if (o.p == nullptr) continue;  // optional ones; required ones were checked non-null
    const int d = pointer_device(o.p, fn, o.name);
    LOWBIT_CHECK(d == device, "int4_matmul_cuda: ", o.name, " is on cuda:", d, " but x_ptr is on cuda:",
                 device);
  }
  DeviceGuard guard(device, fn);
  const int64_t warps_needed = a.M * a.N;
  const int64_t blocks = std::min(kMaxBlocks, (warps_needed + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const dim3 grid(static_cast<unsigned>(blocks));
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (a.x_dtype) {
    case kFloat16: int4_matmul_kernel<kFloat16><<<grid, kThreads, 0, s>>>(a); break;
    case kBFloat16: int4_matmul_kernel<kBFloat16><<<grid, kThreads, 0, s>>>(a); break;
    default: int4_matmul_kernel<kFloat32><<<grid, kThreads, 0, s>>>(a); break;
  }
  check_cuda(cudaGetLastError(), fn, "kernel launch");
}

int compiled_runtime_version() { return CUDART_VERSION; }

}  // namespace cuda
}  // namespace lowbit
