// sparse24_matmul on the CPU: picks the kernel of the selected instruction set (isa.h).
#include "../common/sparse24_matmul.h"
#include "cpu_kernels.h"
#include "isa.h"

namespace lowbit {
namespace cpu {

using sparse24_matmul_kernel_t = void(const Sparse24MatmulArgs&, int);
LOWBIT_FOR_EACH_ISA(LOWBIT_ISA_DECLARE, sparse24_matmul_kernel)

void sparse24_matmul(const Sparse24MatmulArgs& a, int num_threads) {
  static const auto table = LOWBIT_ISA_TABLE(sparse24_matmul_kernel);
  table.pick("sparse24_matmul_cpu")(a, num_threads);
}

}  // namespace cpu
}  // namespace lowbit
