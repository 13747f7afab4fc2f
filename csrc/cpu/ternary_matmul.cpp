// ternary_matmul on the CPU: picks the kernel of the selected instruction set (isa.h).
#include "../common/ternary_matmul.h"
#include "cpu_kernels.h"
#include "isa.h"

namespace lowbit {
namespace cpu {

using ternary_matmul_kernel_t = void(const TernaryMatmulArgs&, int);
LOWBIT_FOR_EACH_ISA(LOWBIT_ISA_DECLARE, ternary_matmul_kernel)

void ternary_matmul(const TernaryMatmulArgs& a, int num_threads) {
  static const auto table = LOWBIT_ISA_TABLE(ternary_matmul_kernel);
  table.pick("ternary_matmul_cpu")(a, num_threads);
}

}  // namespace cpu
}  // namespace lowbit
