// The int4 kernels for f16 activations (see w4_kernels.cuh).
#include "w4_kernels.cuh"

namespace lowbit {
namespace cuda {
namespace w4 {

template void w4_launch<kW4Int4, kFloat16>(const W4Args&, cudaStream_t);
template void w4_dequant_launch<kW4Int4, kFloat16>(const W4Args&, cudaStream_t);
template bool w4_ws_ready<kW4Int4, kFloat16>();

}  // namespace w4
}  // namespace cuda
}  // namespace lowbit
