// int4_matmul on the CPU: picks the kernel of the selected instruction set (isa.h).
#include "../common/int4_matmul.h"
#include "cpu_kernels.h"
#include "isa.h"

namespace lowbit {
namespace cpu {

using int4_matmul_kernel_t = void(const Int4MatmulArgs&, int);
LOWBIT_FOR_EACH_ISA(LOWBIT_ISA_DECLARE, int4_matmul_kernel)

void int4_matmul(const Int4MatmulArgs& a, int num_threads) {
  static const auto table = LOWBIT_ISA_TABLE(int4_matmul_kernel);
  table.pick("int4_matmul_cpu")(a, num_threads);
}

}  // namespace cpu
}  // namespace lowbit
