// kv_attention on the CPU: picks the kernel of the selected instruction set (isa.h).
#include "../common/kv_attention.h"
#include "cpu_kernels.h"
#include "isa.h"

namespace lowbit {
namespace cpu {

using kv_attention_kernel_t = void(const KvAttentionArgs&, int);
LOWBIT_FOR_EACH_ISA(LOWBIT_ISA_DECLARE, kv_attention_kernel)

void kv_attention(const KvAttentionArgs& a, int num_threads) {
  static const auto table = LOWBIT_ISA_TABLE(kv_attention_kernel);
  table.pick("kv_attention_cpu")(a, num_threads);
}

}  // namespace cpu
}  // namespace lowbit
