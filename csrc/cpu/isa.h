// Run-time instruction-set selection for the CPU kernels.
//
// Each kernel source listed in LOWBIT_CPU_KERNEL_SOURCES (CMakeLists.txt) is compiled once
// per instruction set this platform has (x86-64: scalar, avx2, avx512, avx512bf16; arm64:
// scalar, neon, neon_dot; elsewhere: scalar), with that set's compiler flags and
// LOWBIT_ISA_SUFFIX / LOWBIT_ISA_LEVEL defined. A kernel defines
//
//     void LOWBIT_ISA_FN(my_kernel)(const MyArgs&, int num_threads) { ... }
//
// which becomes my_kernel_avx2 etc., and uses `#if LOWBIT_ISA_LEVEL >= LOWBIT_ISA_AVX512`
// (or the compiler's __AVX512F__ / __ARM_FEATURE_DOTPROD macros) to choose its code. The
// `scalar` build is the portable behaviour of record. The dispatcher (a file compiled with
// the baseline flags) declares and picks one with LOWBIT_ISA_DECLARE / LOWBIT_ISA_TABLE:
//
//     using my_kernel_t = void(const MyArgs&, int);
//     LOWBIT_FOR_EACH_ISA(LOWBIT_ISA_DECLARE, my_kernel)
//     static const auto table = LOWBIT_ISA_TABLE(my_kernel);
//     table.pick("my_op_cpu")(args, threads);   // the selected ISA, or the next one below
//
// LOWBIT_CPU_ISA=<name> in the environment forces an instruction set (read at every call,
// so tests can run each path); naming one this build or CPU lacks is a ValueError.
//
// One-definition rule: kernel sources keep all their code in an anonymous namespace; the
// baseline objects come first on the link line, so any inline function or template the
// linker de-duplicates keeps its baseline-compiled copy.
#pragma once

#include <array>
#include <string>
#include <vector>

#include "lowbit_build_config.h"

// ISA levels (LOWBIT_ISA_LEVEL in kernel sources). x86 and Arm levels are never both built.
#define LOWBIT_ISA_SCALAR 0
#define LOWBIT_ISA_AVX2 1
#define LOWBIT_ISA_AVX512 2
#define LOWBIT_ISA_AVX512BF16 3
#define LOWBIT_ISA_NEON 4
#define LOWBIT_ISA_NEON_DOT 5

#define LOWBIT_ISA_CAT2_(a, b) a##_##b
#define LOWBIT_ISA_CAT_(a, b) LOWBIT_ISA_CAT2_(a, b)
#define LOWBIT_ISA_FN(name) LOWBIT_ISA_CAT_(name, LOWBIT_ISA_SUFFIX)

namespace lowbit {
namespace cpu {

enum class Isa : int { scalar = 0, avx2, avx512, avx512bf16, neon, neon_dot };
inline constexpr int kNumIsas = 6;

const char* isa_name(Isa isa);

// The instruction set the kernels run with now: LOWBIT_CPU_ISA if set (validated against the
// build and the CPU; std::invalid_argument naming `fn` otherwise), else the best this CPU
// and build support.
Isa selected_isa(const char* fn);

// The best instruction set of this build that the CPU supports.
Isa best_isa();

// Instruction sets compiled into this build, lowest first; and those the CPU can run.
std::vector<std::string> compiled_isas();
std::vector<std::string> supported_isas();

// The next set to try when `isa` has no kernel: avx512bf16 -> avx512 -> avx2 -> scalar,
// neon_dot -> neon -> scalar.
Isa fallback_isa(Isa isa);

template <class Fn>
struct IsaTable {
  std::array<Fn*, kNumIsas> fns{};

  // The kernel for the selected ISA, or the closest one below it.
  Fn* pick(const char* fn) const {
    Isa isa = selected_isa(fn);
    for (;;) {
      if (Fn* f = fns[static_cast<int>(isa)]) return f;
      isa = fallback_isa(isa);  // scalar is always compiled, so this ends
    }
  }
};

}  // namespace cpu
}  // namespace lowbit

#define LOWBIT_ISA_DECLARE(isa, name) name##_t name##_##isa;
#define LOWBIT_ISA_TABLE_ENTRY_(isa, name) \
  t.fns[static_cast<int>(::lowbit::cpu::Isa::isa)] = &name##_##isa;
#define LOWBIT_ISA_TABLE(name)                  \
  ([] {                                         \
    ::lowbit::cpu::IsaTable<name##_t> t;        \
    LOWBIT_FOR_EACH_ISA(LOWBIT_ISA_TABLE_ENTRY_, name) \
    return t;                                   \
  }())
