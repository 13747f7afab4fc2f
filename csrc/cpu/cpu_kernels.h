// CPU kernels of the native module (plain C++; no Python, no torch).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "../common/int4_matmul.h"
#include "../common/kv_attention.h"
#include "../common/ternary_matmul.h"
#include "../common/sparse24_matmul.h"
#include "../common/nf4_matmul.h"

namespace lowbit {
namespace cpu {

// y = x @ dequant(W)^T (+ bias); see common/int4_matmul.h for the layout. The arguments
// must have passed check_int4_matmul_args. Uses up to num_threads (>= 1) threads,
// fewer for small problems.
void int4_matmul(const Int4MatmulArgs& args, int num_threads);

// Attention over a quantized KV cache; see common/kv_attention.h for the layout. The arguments
// must have passed check_kv_attention_args. Uses up to num_threads (>= 1) threads.
void kv_attention(const KvAttentionArgs& args, int num_threads);

// y = (x_q @ w_t^T) / (x_scale * weight_scale) (+ bias), BitNet b1.58; see
// common/ternary_matmul.h. The arguments must have passed check_ternary_matmul_args.
void ternary_matmul(const TernaryMatmulArgs& args, int num_threads);

// y = x @ W^T (+ bias) for a 2:4 sparse W; see common/sparse24_matmul.h. The arguments must
// have passed check_sparse24_matmul_args. Uses up to num_threads (>= 1) threads.
void sparse24_matmul(const Sparse24MatmulArgs& args, int num_threads);

// y = x @ dequant(W)^T (+ bias) for an NF4 weight; see common/nf4_matmul.h for the layout.
// The arguments must have passed check_nf4_matmul_args.
void nf4_matmul(const Nf4MatmulArgs& args, int num_threads);

// Instruction-set features of the running CPU, detected at run time. Every key is present
// on every platform (false where it does not apply), in a fixed order.
std::vector<std::pair<std::string, bool>> cpu_features();

}  // namespace cpu
}  // namespace lowbit
