// nf4_matmul on the CPU: picks the kernel of the selected instruction set (isa.h).
#include "../common/nf4_matmul.h"
#include "cpu_kernels.h"
#include "isa.h"

namespace lowbit {
namespace cpu {

using nf4_matmul_kernel_t = void(const Nf4MatmulArgs&, int);
LOWBIT_FOR_EACH_ISA(LOWBIT_ISA_DECLARE, nf4_matmul_kernel)

void nf4_matmul(const Nf4MatmulArgs& a, int num_threads) {
  static const auto table = LOWBIT_ISA_TABLE(nf4_matmul_kernel);
  table.pick("nf4_matmul_cpu")(a, num_threads);
}

}  // namespace cpu
}  // namespace lowbit
