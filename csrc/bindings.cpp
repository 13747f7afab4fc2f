// lowbit._C: the only file that knows about Python.
//
// Every function takes plain integers: data pointers (as returned by Tensor.data_ptr()),
// shapes, strides in elements, dtype codes (0=float32, 1=float16, 2=bfloat16), a thread
// count or a CUDA stream handle. Arguments are validated here and bad ones raise ValueError
// (std::invalid_argument) naming the argument; CUDA failures raise RuntimeError. The GIL is
// released while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "common/check.h"
#include "common/dtype.h"
#include "common/int4_matmul.h"
#include "common/kv_attention.h"
#include "common/ternary_matmul.h"
#include "common/w4_matmul.h"
#include "common/w4_sk_plan.h"
#include "common/sparse24_matmul.h"
#include "common/nf4_matmul.h"
#include "cpu/cpu_kernels.h"
#include "cpu/isa.h"
#include "lowbit_build_config.h"
#if defined(LOWBIT_WITH_CUDA)
#include "cuda/cuda_kernels.h"
#endif

namespace py = pybind11;

namespace lowbit {
namespace {

// Validate a CPU call's arguments and thread count, then run the kernel (GIL released by pybind).
template <class Args>
void run_cpu(const char* fn, const Args& a, void (*check)(const char*, const Args&), void (*kernel)(const Args&, int),
             int64_t num_threads) {
  check(fn, a);
  LOWBIT_CHECK(num_threads >= 1 && num_threads <= 4096, fn, ": num_threads=", num_threads, " must be in [1, 4096]");
  kernel(a, static_cast<int>(num_threads));
}

// The fields every matmul's Args shares: the activations, bias, output and sizes.
template <class Args>
void set_matmul_io(Args& a, uintptr_t x_ptr, int x_dtype, int64_t x_row_stride, uintptr_t bias_ptr, int bias_dtype,
                   uintptr_t out_ptr, int out_dtype, int64_t M, int64_t N, int64_t K) {
  a.x = reinterpret_cast<const void*>(x_ptr);
  a.x_dtype = x_dtype;
  a.x_row_stride = x_row_stride;
  a.bias = reinterpret_cast<const void*>(bias_ptr);
  a.bias_dtype = bias_dtype;
  a.out = reinterpret_cast<void*>(out_ptr);
  a.out_dtype = out_dtype;
  a.M = M;
  a.N = N;
  a.K = K;
}

Int4MatmulArgs make_int4_args(uintptr_t x_ptr, int x_dtype, int64_t x_row_stride, uintptr_t qweight_ptr,
                              uintptr_t scales_ptr, int scales_dtype, uintptr_t zeros_ptr, int zeros_dtype,
                              uintptr_t bias_ptr, int bias_dtype, uintptr_t out_ptr, int out_dtype, int64_t M,
                              int64_t N, int64_t K, int64_t group_size) {
  Int4MatmulArgs a;
  set_matmul_io(a, x_ptr, x_dtype, x_row_stride, bias_ptr, bias_dtype, out_ptr, out_dtype, M, N, K);
  a.qweight = reinterpret_cast<const uint8_t*>(qweight_ptr);
  a.scales = reinterpret_cast<const void*>(scales_ptr);
  a.scales_dtype = scales_dtype;
  a.zeros = reinterpret_cast<const void*>(zeros_ptr);
  a.zeros_dtype = zeros_dtype;
  a.group_size = group_size;
  return a;
}

void int4_matmul_cpu(uintptr_t x_ptr, int x_dtype, int64_t x_row_stride, uintptr_t qweight_ptr,
                     uintptr_t scales_ptr, int scales_dtype, uintptr_t zeros_ptr, int zeros_dtype,
                     uintptr_t bias_ptr, int bias_dtype, uintptr_t out_ptr, int out_dtype, int64_t M, int64_t N,
                     int64_t K, int64_t group_size, int64_t num_threads) {
  const Int4MatmulArgs a = make_int4_args(x_ptr, x_dtype, x_row_stride, qweight_ptr, scales_ptr, scales_dtype,
                                          zeros_ptr, zeros_dtype, bias_ptr, bias_dtype, out_ptr, out_dtype, M, N,
                                          K, group_size);
  run_cpu("int4_matmul_cpu", a, check_int4_matmul_args, cpu::int4_matmul, num_threads);
}

void nf4_matmul_cpu(uintptr_t x_ptr, int x_dtype, int64_t x_row_stride, uintptr_t qweight_ptr, uintptr_t absmax_ptr,
                    uintptr_t absmax_scale_ptr, uintptr_t absmax_code_ptr, double absmax_offset, uintptr_t bias_ptr,
                    int bias_dtype, uintptr_t out_ptr, int out_dtype, int64_t M, int64_t N, int64_t K,
                    int64_t blocksize, int64_t num_threads) {
  Nf4MatmulArgs a;
  set_matmul_io(a, x_ptr, x_dtype, x_row_stride, bias_ptr, bias_dtype, out_ptr, out_dtype, M, N, K);
  a.qweight = reinterpret_cast<const uint8_t*>(qweight_ptr);
  a.absmax = reinterpret_cast<const void*>(absmax_ptr);
  a.absmax_scale = reinterpret_cast<const float*>(absmax_scale_ptr);
  a.absmax_code = reinterpret_cast<const float*>(absmax_code_ptr);
  a.absmax_offset = static_cast<float>(absmax_offset);
  a.blocksize = blocksize;
  run_cpu("nf4_matmul_cpu", a, check_nf4_matmul_args, cpu::nf4_matmul, num_threads);
}

void sparse24_matmul_cpu(uintptr_t x_ptr, int x_dtype, int64_t x_row_stride, uintptr_t values_ptr, int values_dtype,
                         uintptr_t meta_ptr, uintptr_t bias_ptr, int bias_dtype, uintptr_t out_ptr, int out_dtype,
                         int64_t M, int64_t N, int64_t K, int64_t num_threads) {
  Sparse24MatmulArgs a;
  set_matmul_io(a, x_ptr, x_dtype, x_row_stride, bias_ptr, bias_dtype, out_ptr, out_dtype, M, N, K);
  a.values = reinterpret_cast<const void*>(values_ptr);
  a.values_dtype = values_dtype;
  a.meta = reinterpret_cast<const uint8_t*>(meta_ptr);
  run_cpu("sparse24_matmul_cpu", a, check_sparse24_matmul_args, cpu::sparse24_matmul, num_threads);
}

using Strides3 = std::array<int64_t, 3>;  // (batch, head, token) strides in elements

KvView kv_view(uintptr_t ptr, int dtype, const Strides3& s) {
  KvView t;
  t.ptr = reinterpret_cast<const void*>(ptr);
  t.dtype = dtype;
  t.stride_b = s[0];
  t.stride_h = s[1];
  t.stride_s = s[2];
  return t;
}

void kv_attention_cpu(uintptr_t q_ptr, int q_dtype, const Strides3& q_strides, uintptr_t k_ptr,
                      const Strides3& k_strides, uintptr_t k_scale_ptr, int k_scale_dtype,
                      const Strides3& k_scale_strides, uintptr_t k_zero_ptr, int k_zero_dtype,
                      const Strides3& k_zero_strides, uintptr_t v_ptr, const Strides3& v_strides,
                      uintptr_t v_scale_ptr, int v_scale_dtype, const Strides3& v_scale_strides, uintptr_t v_zero_ptr,
                      int v_zero_dtype, const Strides3& v_zero_strides, uintptr_t out_ptr, int out_dtype, int64_t B,
                      int64_t H_q, int64_t H_kv, int64_t S_q, int64_t S_kv, int64_t D, int64_t bits, bool causal,
                      double scale, int64_t num_threads) {
  KvAttentionArgs a;
  a.q = kv_view(q_ptr, q_dtype, q_strides);
  a.k = kv_view(k_ptr, kFloat32, k_strides);
  a.k_scale = kv_view(k_scale_ptr, k_scale_dtype, k_scale_strides);
  a.k_zero = kv_view(k_zero_ptr, k_zero_dtype, k_zero_strides);
  a.v = kv_view(v_ptr, kFloat32, v_strides);
  a.v_scale = kv_view(v_scale_ptr, v_scale_dtype, v_scale_strides);
  a.v_zero = kv_view(v_zero_ptr, v_zero_dtype, v_zero_strides);
  a.out = reinterpret_cast<void*>(out_ptr);
  a.out_dtype = out_dtype;
  a.B = B;
  a.H_q = H_q;
  a.H_kv = H_kv;
  a.S_q = S_q;
  a.S_kv = S_kv;
  a.D = D;
  LOWBIT_CHECK(bits == 8 || bits == 4, "kv_attention_cpu: bits=", bits, " must be 8 or 4");
  a.bits = static_cast<int>(bits);
  a.causal = causal;
  a.scale = static_cast<float>(scale);
  run_cpu("kv_attention_cpu", a, check_kv_attention_args, cpu::kv_attention, num_threads);
}

void ternary_matmul_cpu(uintptr_t x_ptr, int x_dtype, int64_t x_row_stride, uintptr_t qweight_ptr,
                        uintptr_t weight_scale_ptr, int64_t weight_scale_numel, uintptr_t bias_ptr, int bias_dtype,
                        uintptr_t out_ptr, int out_dtype, int64_t M, int64_t N, int64_t K, int64_t num_threads) {
  TernaryMatmulArgs a;
  set_matmul_io(a, x_ptr, x_dtype, x_row_stride, bias_ptr, bias_dtype, out_ptr, out_dtype, M, N, K);
  a.qweight = reinterpret_cast<const uint8_t*>(qweight_ptr);
  a.weight_scale = reinterpret_cast<const float*>(weight_scale_ptr);
  a.weight_scale_numel = weight_scale_numel;
  run_cpu("ternary_matmul_cpu", a, check_ternary_matmul_args, cpu::ternary_matmul, num_threads);
}

#if defined(LOWBIT_WITH_CUDA)
void int4_matmul_cuda(uintptr_t x_ptr, int x_dtype, int64_t x_row_stride, uintptr_t qweight_ptr,
                      uintptr_t scales_ptr, int scales_dtype, uintptr_t zeros_ptr, int zeros_dtype,
                      uintptr_t bias_ptr, int bias_dtype, uintptr_t out_ptr, int out_dtype, int64_t M, int64_t N,
                      int64_t K, int64_t group_size, uintptr_t stream) {
  const Int4MatmulArgs a = make_int4_args(x_ptr, x_dtype, x_row_stride, qweight_ptr, scales_ptr, scales_dtype,
                                          zeros_ptr, zeros_dtype, bias_ptr, bias_dtype, out_ptr, out_dtype, M, N,
                                          K, group_size);
  check_int4_matmul_args("int4_matmul_cuda", a);
  cuda::int4_matmul(a, stream);
}

W4Args make_w4_args(int fmt, int act_dtype, uintptr_t packed_w_ptr, uintptr_t packed_s_ptr, uintptr_t out_ptr,
                    int64_t N, int64_t K, int64_t n_pad, int64_t k_pad, int64_t group_size, int64_t num_groups) {
  W4Args a;
  a.fmt = fmt;
  a.act_dtype = act_dtype;
  a.packed_w = reinterpret_cast<const void*>(packed_w_ptr);
  a.packed_s = reinterpret_cast<const void*>(packed_s_ptr);
  a.out = reinterpret_cast<void*>(out_ptr);
  a.N = N;
  a.K = K;
  a.n_pad = n_pad;
  a.k_pad = k_pad;
  a.group_size = group_size;
  a.num_groups = num_groups;
  return a;
}

void w4_matmul_cuda(int fmt, uintptr_t x_ptr, int x_dtype, int64_t x_row_stride, uintptr_t packed_w_ptr,
                    uintptr_t packed_s_ptr, uintptr_t bias_ptr, int bias_dtype, uintptr_t out_ptr, int64_t M,
                    int64_t N, int64_t K, int64_t n_pad, int64_t k_pad, int64_t group_size, int64_t num_groups,
                    uintptr_t stream) {
  W4Args a = make_w4_args(fmt, x_dtype, packed_w_ptr, packed_s_ptr, out_ptr, N, K, n_pad, k_pad, group_size,
                          num_groups);
  a.x = reinterpret_cast<const void*>(x_ptr);
  a.x_row_stride = x_row_stride;
  a.bias = reinterpret_cast<const void*>(bias_ptr);
  a.bias_dtype = bias_dtype;
  a.M = M;
  check_w4_args("w4_matmul_cuda", a, false);
  cuda::w4_matmul(a, stream);
}

void w4_dequant_cuda(int fmt, int act_dtype, uintptr_t packed_w_ptr, uintptr_t packed_s_ptr, uintptr_t out_ptr,
                     int64_t N, int64_t K, int64_t n_pad, int64_t k_pad, int64_t group_size, int64_t num_groups,
                     uintptr_t stream) {
  const W4Args a = make_w4_args(fmt, act_dtype, packed_w_ptr, packed_s_ptr, out_ptr, N, K, n_pad, k_pad,
                                group_size, num_groups);
  check_w4_args("w4_dequant_cuda", a, true);
  cuda::w4_dequant(a, stream);
}
#endif

std::vector<std::string> split_list(const std::string& s) {  // CMake list "a;b" -> ["a", "b"]
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == ';') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

py::dict build_info() {
  py::dict d;
  d["version"] = LOWBIT_VERSION;
  d["build_type"] = LOWBIT_BUILD_TYPE;
  d["compiler"] = LOWBIT_CXX_COMPILER;
  d["cxx_flags"] = LOWBIT_CXX_FLAGS;
  d["system_processor"] = LOWBIT_SYSTEM_PROCESSOR;
#if defined(LOWBIT_WITH_CUDA)
  const int v = cuda::compiled_runtime_version();
  d["cuda"] = true;
  d["cuda_archs"] = split_list(LOWBIT_CUDA_ARCHS_LIST);
  d["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
  d["cuda_compiler"] = LOWBIT_CUDA_COMPILER;
#else
  d["cuda"] = false;
  d["cuda_archs"] = py::list();
  d["cuda_version"] = py::none();
  d["cuda_compiler"] = py::none();
#endif
  d["metal"] = false;
  d["sanitizers"] = split_list(LOWBIT_SANITIZERS_LIST);
  py::dict codes;
  for (int c = 0; c < kNumDTypes; ++c) codes[py::str(dtype_name(c))] = c;
  d["dtype_codes"] = codes;
  return d;
}

py::dict cpu_isa() {
  py::dict d;
  d["best"] = cpu::isa_name(cpu::best_isa());
  d["compiled"] = cpu::compiled_isas();
  d["supported"] = cpu::supported_isas();
  return d;
}

std::string selected_cpu_isa() { return cpu::isa_name(cpu::selected_isa("lowbit._C.selected_cpu_isa")); }

py::dict cpu_features() {
  py::dict d;
  for (const auto& kv : cpu::cpu_features()) d[py::str(kv.first)] = kv.second;
  return d;
}

}  // namespace
}  // namespace lowbit

PYBIND11_MODULE(_C, m) {
  using namespace pybind11::literals;
  m.doc() = "lowbit native kernels (pointer-level API; use lowbit.ops instead)";
  m.attr("__version__") = LOWBIT_VERSION;

  m.def("int4_matmul_cpu", &lowbit::int4_matmul_cpu, py::call_guard<py::gil_scoped_release>(),
        "x_ptr"_a, "x_dtype"_a, "x_row_stride"_a, "qweight_ptr"_a, "scales_ptr"_a, "scales_dtype"_a,
        "zeros_ptr"_a, "zeros_dtype"_a, "bias_ptr"_a, "bias_dtype"_a, "out_ptr"_a, "out_dtype"_a, "M"_a,
        "N"_a, "K"_a, "group_size"_a, "num_threads"_a,
        "out[M, N] = x[M, K] @ dequant(qweight, scales, zeros)^T (+ bias) on the CPU, fp32 accumulation.\n"
        "Pointers are addresses (0 = absent, allowed for zeros and bias only); x rows start every\n"
        "x_row_stride elements; qweight [N, K/2], scales/zeros [N, K/G], bias [N], out [M, N] contiguous.");
  m.def("kv_attention_cpu", &lowbit::kv_attention_cpu, py::call_guard<py::gil_scoped_release>(), "q_ptr"_a,
        "q_dtype"_a, "q_strides"_a, "k_ptr"_a, "k_strides"_a, "k_scale_ptr"_a, "k_scale_dtype"_a,
        "k_scale_strides"_a, "k_zero_ptr"_a, "k_zero_dtype"_a, "k_zero_strides"_a, "v_ptr"_a, "v_strides"_a,
        "v_scale_ptr"_a, "v_scale_dtype"_a, "v_scale_strides"_a, "v_zero_ptr"_a, "v_zero_dtype"_a,
        "v_zero_strides"_a, "out_ptr"_a, "out_dtype"_a, "B"_a, "H_q"_a, "H_kv"_a, "S_q"_a, "S_kv"_a, "D"_a,
        "bits"_a, "causal"_a, "scale"_a, "num_threads"_a,
        "out[B, H_q, S_q, D] = softmax(q k^T * scale) v over an int8 (bits=8) or 4-bit (bits=4) KV cache on\n"
        "the CPU, fp32 accumulation. Every operand is a [B, H, S, width] view with unit inner stride and\n"
        "(batch, head, token) strides in elements; zeros are 0 (and ignored) for bits=8; out is contiguous.\n"
        "causal masks bottom-right aligned (query i sees keys j <= i + S_kv - S_q).");
  m.def("ternary_matmul_cpu", &lowbit::ternary_matmul_cpu, py::call_guard<py::gil_scoped_release>(), "x_ptr"_a,
        "x_dtype"_a, "x_row_stride"_a, "qweight_ptr"_a, "weight_scale_ptr"_a, "weight_scale_numel"_a,
        "bias_ptr"_a, "bias_dtype"_a, "out_ptr"_a, "out_dtype"_a, "M"_a, "N"_a, "K"_a, "num_threads"_a,
        "out[M, N] = (x_q @ w_t^T) / (x_scale * weight_scale) (+ bias) on the CPU (BitNet b1.58): x\n"
        "quantized per row to int8 by absmax, qweight [ceil(N/4), K] in the Hugging Face 2-bit packing,\n"
        "weight_scale float32 [1] or [N], bias [N] (0 = absent), out [M, N] contiguous; integer products.");
  m.def("sparse24_matmul_cpu", &lowbit::sparse24_matmul_cpu, py::call_guard<py::gil_scoped_release>(),
        "x_ptr"_a, "x_dtype"_a, "x_row_stride"_a, "values_ptr"_a, "values_dtype"_a, "meta_ptr"_a, "bias_ptr"_a,
        "bias_dtype"_a, "out_ptr"_a, "out_dtype"_a, "M"_a, "N"_a, "K"_a, "num_threads"_a,
        "out[M, N] = x[M, K] @ W^T (+ bias) for a 2:4 sparse W (values [N, K/2], meta uint8 [N, K/8]) on\n"
        "the CPU, fp32 accumulation. Pointers are addresses (0 = absent, allowed for bias only); x rows\n"
        "start every x_row_stride elements; values, meta, bias [N], out [M, N] contiguous; K % 8 == 0.");
  m.def("nf4_matmul_cpu", &lowbit::nf4_matmul_cpu, py::call_guard<py::gil_scoped_release>(), "x_ptr"_a,
        "x_dtype"_a, "x_row_stride"_a, "qweight_ptr"_a, "absmax_ptr"_a, "absmax_scale_ptr"_a, "absmax_code_ptr"_a,
        "absmax_offset"_a, "bias_ptr"_a, "bias_dtype"_a, "out_ptr"_a, "out_dtype"_a, "M"_a, "N"_a, "K"_a,
        "blocksize"_a, "num_threads"_a,
        "out[M, N] = x[M, K] @ dequant(NF4 weight)^T (+ bias) on the CPU, fp32 accumulation.\n"
        "qweight: bitsandbytes' packed uint8 [ceil(N*K/2)]; absmax float32 [ceil(N*K/blocksize)], or uint8\n"
        "codes with absmax_scale float32 [ceil(nblocks/256)], absmax_code float32 [256] and absmax_offset\n"
        "(double quantization; both pointers 0 without). Pointers are addresses (0 = absent, allowed\n"
        "for bias and the double-quantization pair only); bias [N], out [M, N] contiguous.");
#if defined(LOWBIT_WITH_CUDA)
  m.def("int4_matmul_cuda", &lowbit::int4_matmul_cuda, py::call_guard<py::gil_scoped_release>(),
        "x_ptr"_a, "x_dtype"_a, "x_row_stride"_a, "qweight_ptr"_a, "scales_ptr"_a, "scales_dtype"_a,
        "zeros_ptr"_a, "zeros_dtype"_a, "bias_ptr"_a, "bias_dtype"_a, "out_ptr"_a, "out_dtype"_a, "M"_a,
        "N"_a, "K"_a, "group_size"_a, "stream"_a,
        "Same as int4_matmul_cpu, on the GPU holding the pointers, enqueued on the cudaStream_t `stream`\n"
        "(an integer; 0 = legacy default stream). Does not synchronize.");
  m.def("w4_matmul_cuda", &lowbit::w4_matmul_cuda, py::call_guard<py::gil_scoped_release>(), "fmt"_a, "x_ptr"_a,
        "x_dtype"_a, "x_row_stride"_a, "packed_w_ptr"_a, "packed_s_ptr"_a, "bias_ptr"_a, "bias_dtype"_a,
        "out_ptr"_a, "M"_a, "N"_a, "K"_a, "n_pad"_a, "k_pad"_a, "group_size"_a, "num_groups"_a, "stream"_a,
        "out[M, N] = x[M, K] @ W^T (+ bias) for a 4-bit weight (fmt 0 = int4, 1 = nf4) in the CUDA layout of\n"
        "lowbit.backends.w4_layout (packed_w, packed_s); x float16/bfloat16 with 16-byte aligned rows, out\n"
        "contiguous in x's dtype. Enqueued on `stream`, no synchronization.");
  m.def("w4_dequant_cuda", &lowbit::w4_dequant_cuda, py::call_guard<py::gil_scoped_release>(), "fmt"_a,
        "act_dtype"_a, "packed_w_ptr"_a, "packed_s_ptr"_a, "out_ptr"_a, "N"_a, "K"_a, "n_pad"_a, "k_pad"_a,
        "group_size"_a, "num_groups"_a, "stream"_a,
        "out[N, K] (contiguous, act_dtype) = the dense weight of a 4-bit weight in the CUDA layout.");
  py::class_<lowbit::cuda::W4Plan>(m, "W4Plan",
                                   "w4_matmul_cuda with the weight side bound once, for repeated calls from one layer:\n"
                                   "W4Plan(fmt, act_dtype, packed_w_ptr, packed_s_ptr, bias_ptr, bias_dtype, N, K, n_pad,\n"
                                   "k_pad, group_size, num_groups); then plan(x_ptr, x_row_stride, M, out_ptr, stream)\n"
                                   "(positional) runs out = x @ W^T (+ bias). The caller keeps the weight tensors alive.")
      .def(py::init([](int fmt, int act_dtype, uintptr_t packed_w_ptr, uintptr_t packed_s_ptr, uintptr_t bias_ptr,
                       int bias_dtype, int64_t N, int64_t K, int64_t n_pad, int64_t k_pad, int64_t group_size,
                       int64_t num_groups) {
             lowbit::W4Args a = lowbit::make_w4_args(fmt, act_dtype, packed_w_ptr, packed_s_ptr, 0, N, K, n_pad, k_pad,
                                                     group_size, num_groups);
             a.bias = reinterpret_cast<const void*>(bias_ptr);
             a.bias_dtype = bias_dtype;
             return lowbit::cuda::W4Plan(a);
           }),
           "fmt"_a, "act_dtype"_a, "packed_w_ptr"_a, "packed_s_ptr"_a, "bias_ptr"_a, "bias_dtype"_a, "N"_a, "K"_a,
           "n_pad"_a, "k_pad"_a, "group_size"_a, "num_groups"_a)
      .def("__call__", &lowbit::cuda::W4Plan::operator(), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("device", &lowbit::cuda::W4Plan::device);
  m.def("w4_fused_large_m_cuda", &lowbit::cuda::w4_fused_large_m, "device"_a,
        "True if w4_matmul_cuda has its large-M tensor-core kernel on this GPU (sm_90a build on Hopper).");
#endif
  m.def("w4_sk_plan_check", &lowbit::cuda::w4::w4_sk_plan_check, "tblocks"_a, "nrb"_a, "nkb"_a, "G"_a,
        "Host check of the CUDA large-M kernel's stream-K partition: '' if it holds, else what failed.");
  m.def(
      "w4_split_for_waves",
      [](int s, int64_t tiles, const std::array<int, 5>& active) {
        int a[5];
        for (int i = 0; i < 5; ++i) a[i] = active[i];
        return lowbit::cuda::w4::split_for_waves(s, tiles, a);
      },
      "s"_a, "tiles"_a, "active_clusters"_a,
      "The CUDA 4-bit kernels' K split for `tiles` tiles, given the clusters of 1, 2, 4, 8, 16 blocks\n"
      "that can run at once (0: not known), from the split `s` wanted for bytes in flight.");
  m.def("build_info", &lowbit::build_info, "What this build of the native module contains (a dict).");
  m.def("cpu_isa", &lowbit::cpu_isa,
        "CPU kernel instruction sets: 'compiled' into this build, 'supported' by this CPU too, and the\n"
        "'best' of those (what runs unless LOWBIT_CPU_ISA forces another).");
  m.def("selected_cpu_isa", &lowbit::selected_cpu_isa,
        "The instruction set the CPU kernels run with now (LOWBIT_CPU_ISA, validated, or the best).");
  m.def("cpu_features", &lowbit::cpu_features, "Instruction-set features of this CPU (dict[str, bool]).");
}
