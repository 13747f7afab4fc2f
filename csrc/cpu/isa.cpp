// Instruction-set selection (see isa.h): what was compiled, what the CPU has, what was asked.
#include "isa.h"

#include <cstdlib>
#include <cstring>

#include "../common/check.h"
#include "cpu_kernels.h"

namespace lowbit {
namespace cpu {
namespace {

#define LOWBIT_ISA_COMPILED_ENTRY_(isa, unused) c[static_cast<int>(Isa::isa)] = true;
std::array<bool, kNumIsas> compiled_mask() {
  std::array<bool, kNumIsas> c{};
  LOWBIT_FOR_EACH_ISA(LOWBIT_ISA_COMPILED_ENTRY_, unused)
  return c;
}
#undef LOWBIT_ISA_COMPILED_ENTRY_

bool feature(const std::vector<std::pair<std::string, bool>>& f, const char* name) {
  for (const auto& kv : f)
    if (kv.first == name) return kv.second;
  return false;
}

// What the CPU can run, per ISA (computed once: cpuid does not change).
const std::array<bool, kNumIsas>& cpu_mask() {
  static const std::array<bool, kNumIsas> mask = [] {
    const auto f = cpu_features();
    std::array<bool, kNumIsas> m{};
    m[static_cast<int>(Isa::scalar)] = true;
    m[static_cast<int>(Isa::avx2)] = feature(f, "avx2") && feature(f, "fma") && feature(f, "f16c");
    m[static_cast<int>(Isa::avx512)] = m[static_cast<int>(Isa::avx2)] && feature(f, "avx512f") &&
                                       feature(f, "avx512bw") && feature(f, "avx512dq") &&
                                       feature(f, "avx512vl");
    m[static_cast<int>(Isa::avx512bf16)] =
        m[static_cast<int>(Isa::avx512)] && feature(f, "avx512vnni") && feature(f, "avx512bf16");
    m[static_cast<int>(Isa::neon)] = feature(f, "neon");
    m[static_cast<int>(Isa::neon_dot)] = m[static_cast<int>(Isa::neon)] && feature(f, "dotprod");
    return m;
  }();
  return mask;
}

bool usable(Isa isa) {
  static const std::array<bool, kNumIsas> compiled = compiled_mask();
  return compiled[static_cast<int>(isa)] && cpu_mask()[static_cast<int>(isa)];
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::avx512bf16: return "avx512bf16";
    case Isa::neon: return "neon";
    case Isa::neon_dot: return "neon_dot";
  }
  return "invalid";
}

Isa fallback_isa(Isa isa) {
  switch (isa) {
    case Isa::avx512bf16: return Isa::avx512;
    case Isa::avx512: return Isa::avx2;
    case Isa::neon_dot: return Isa::neon;
    default: return Isa::scalar;
  }
}

Isa best_isa() {
  static const Isa best = [] {
    Isa b = Isa::scalar;
    for (int i = 0; i < kNumIsas; ++i)
      if (usable(static_cast<Isa>(i))) b = static_cast<Isa>(i);  // x86 and Arm sets never mix
    return b;
  }();
  return best;
}

Isa selected_isa(const char* fn) {
  const char* env = std::getenv("LOWBIT_CPU_ISA");
  if (env == nullptr || *env == '\0') return best_isa();
  for (int i = 0; i < kNumIsas; ++i) {
    const Isa isa = static_cast<Isa>(i);
    if (std::strcmp(env, isa_name(isa)) != 0) continue;
    LOWBIT_CHECK(compiled_mask()[i], fn, ": LOWBIT_CPU_ISA=", env, " is not compiled into this build (",
                 "lowbit.info() lists the instruction sets it has)");
    LOWBIT_CHECK(cpu_mask()[i], fn, ": LOWBIT_CPU_ISA=", env, " but this CPU does not support it");
    return isa;
  }
  LOWBIT_CHECK(false, fn, ": LOWBIT_CPU_ISA=", env,
               " is not an instruction set name (scalar, avx2, avx512, avx512bf16, neon, neon_dot)");
  return Isa::scalar;
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  const auto c = compiled_mask();
  for (int i = 0; i < kNumIsas; ++i)
    if (c[i]) out.emplace_back(isa_name(static_cast<Isa>(i)));
  return out;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (int i = 0; i < kNumIsas; ++i)
    if (usable(static_cast<Isa>(i))) out.emplace_back(isa_name(static_cast<Isa>(i)));
  return out;
}

}  // namespace cpu
}  // namespace lowbit
