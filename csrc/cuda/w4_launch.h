// Entry points of the 4-bit CUDA kernels, one instantiation per (format, activation dtype) in
// csrc/cuda/w4_<fmt>_<dtype>.cu (see w4_kernels.cuh), so that nvcc compiles them in parallel.
#pragma once

#include <cuda_runtime.h>

#include "../common/w4_matmul.h"

namespace lowbit {
namespace cuda {
namespace w4 {

// out = x @ W^T (+ bias) on `stream`; the pointers' device must be current, the arguments checked.
template <int FMT, int DT>
void w4_launch(const W4Args& a, cudaStream_t stream);

// out[N, K] = W in the activation dtype, on `stream`.
template <int FMT, int DT>
void w4_dequant_launch(const W4Args& a, cudaStream_t stream);

// True if the current GPU runs the warp-specialized large-M kernel (instantiated for int4/f16;
// every format and dtype share its requirements).
template <int FMT, int DT>
bool w4_ws_ready();

}  // namespace w4
}  // namespace cuda
}  // namespace lowbit
