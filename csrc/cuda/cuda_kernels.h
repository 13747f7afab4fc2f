// CUDA kernels of the native module. This header is plain C++ (no CUDA headers), so that
// bindings.cpp is compiled by the host compiler alone.
#pragma once

#include <cstdint>

#include "../common/int4_matmul.h"
#include "../common/w4_matmul.h"

namespace lowbit {
namespace cuda {

// y = x @ dequant(W)^T (+ bias) on the GPU that holds the pointers, enqueued on `stream`
// (a cudaStream_t as an integer; 0 = the legacy default stream). No host synchronization.
// The arguments must have passed check_int4_matmul_args; this function also checks that
// every pointer is device (or managed) memory of one GPU (ValueError otherwise) and turns
// CUDA errors into std::runtime_error.
void int4_matmul(const Int4MatmulArgs& args, uintptr_t stream);

// The 4-bit kernels on the repacked layout (csrc/common/w4_matmul.h), enqueued on `stream`
// without host synchronization (CUDA-graph capturable). The arguments must have passed
// check_w4_args; these check that every pointer is device memory of one GPU.
void w4_matmul(const W4Args& args, uintptr_t stream);
void w4_dequant(const W4Args& args, uintptr_t stream);
// w4_matmul with the weight side bound once (for repeated calls from one layer): the weight
// and bias pointers' GPU is found at construction, and each call checks only the activation
// and output pointers against it, then the whole argument set (check_w4_args).
class W4Plan {
 public:
  // `weights`: every field but x, x_row_stride, M and out.
  explicit W4Plan(const W4Args& weights);
  void operator()(uintptr_t x_ptr, int64_t x_row_stride, int64_t M, uintptr_t out_ptr, uintptr_t stream) const;
  int device() const { return device_; }

 private:
  W4Args args_;
  int device_ = -1;
};
// True if GPU `device` runs this build's large-M kernel of w4_matmul (the warp-specialized
// wgmma kernel: an sm_90a binary on an sm_90 GPU); the dense path is then not needed.
bool w4_fused_large_m(int device);

// CUDART_VERSION the module was compiled against (e.g. 13000).
int compiled_runtime_version();

}  // namespace cuda
}  // namespace lowbit
