// Run-time CPU feature detection: cpuid + xgetbv on x86 (a feature counts only if the OS
// also saves its registers), getauxval on Linux/Arm, sysctl on Apple/Arm.
#include <cstdint>

#include "cpu_kernels.h"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#define LOWBIT_X86 1
#if defined(_MSC_VER)
#include <intrin.h>
#include <immintrin.h>
#else
#include <cpuid.h>
#endif
#elif defined(__aarch64__) || defined(_M_ARM64)
#define LOWBIT_ARM64 1
#if defined(__APPLE__)
#include <sys/sysctl.h>
#elif defined(__linux__)
#include <sys/auxv.h>
#endif
#endif

namespace lowbit {
namespace cpu {
namespace {

struct Features {
  bool avx = false, avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512dq = false, avx512vl = false, avx512vnni = false, avx512bf16 = false, avx_vnni = false;
  bool neon = false, dotprod = false, i8mm = false;
};

#if defined(LOWBIT_X86)
void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
#if defined(_MSC_VER)
  int v[4];
  __cpuidex(v, static_cast<int>(leaf), static_cast<int>(sub));
  for (int i = 0; i < 4; ++i) r[i] = static_cast<uint32_t>(v[i]);
#else
  __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
#endif
}

uint64_t xgetbv0() {
#if defined(_MSC_VER)
  return _xgetbv(0);
#else
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
#endif
}

inline bool bit(uint32_t v, int b) { return (v >> b) & 1u; }

void detect(Features& f) {
  uint32_t r[4];  // eax, ebx, ecx, edx
  cpuid(0, 0, r);
  const uint32_t max_leaf = r[0];
  if (max_leaf < 1) return;
  cpuid(1, 0, r);
  const uint32_t ecx1 = r[2];
  if (!bit(ecx1, 27)) return;  // no OSXSAVE: the OS saves no AVX state, nothing below is usable
  const uint64_t xcr0 = xgetbv0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;              // XMM and YMM state
  const bool os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;  // opmask, ZMM_Hi256, Hi16_ZMM
  if (!os_avx) return;
  f.avx = bit(ecx1, 28);
  f.fma = f.avx && bit(ecx1, 12);
  f.f16c = f.avx && bit(ecx1, 29);
  if (max_leaf < 7) return;
  cpuid(7, 0, r);
  const uint32_t max_sub7 = r[0], ebx7 = r[1], ecx7 = r[2];
  f.avx2 = f.avx && bit(ebx7, 5);
  if (os_avx512) {
    f.avx512f = bit(ebx7, 16);
    f.avx512bw = f.avx512f && bit(ebx7, 30);
    f.avx512dq = f.avx512f && bit(ebx7, 17);
    f.avx512vl = f.avx512f && bit(ebx7, 31);
    f.avx512vnni = f.avx512f && bit(ecx7, 11);
  }
  if (max_sub7 >= 1) {
    cpuid(7, 1, r);
    f.avx_vnni = f.avx2 && bit(r[0], 4);
    f.avx512bf16 = f.avx512f && bit(r[0], 5);
  }
}
#elif defined(LOWBIT_ARM64)
#if defined(__APPLE__)
bool sysctl_flag(const char* name) {
  int v = 0;
  size_t len = sizeof v;
  return sysctlbyname(name, &v, &len, nullptr, 0) == 0 && v != 0;
}
void detect(Features& f) {
  f.neon = true;  // AdvSIMD is mandatory on arm64
  f.dotprod = sysctl_flag("hw.optional.arm.FEAT_DotProd");
  f.i8mm = sysctl_flag("hw.optional.arm.FEAT_I8MM");
}
#elif defined(__linux__)
void detect(Features& f) {
  const unsigned long hw = getauxval(AT_HWCAP);
  const unsigned long hw2 = getauxval(AT_HWCAP2);
  f.neon = (hw >> 1) & 1ul;      // HWCAP_ASIMD
  f.dotprod = (hw >> 20) & 1ul;  // HWCAP_ASIMDDP
  f.i8mm = (hw2 >> 13) & 1ul;    // HWCAP2_I8MM
}
#else
void detect(Features& f) { f.neon = true; }  // arm64 elsewhere: only the mandatory baseline
#endif
#else
void detect(Features&) {}
#endif

}  // namespace

std::vector<std::pair<std::string, bool>> cpu_features() {
  Features f;
  detect(f);
  return {
      {"avx", f.avx},           {"avx2", f.avx2},
      {"fma", f.fma},           {"f16c", f.f16c},
      {"avx512f", f.avx512f},   {"avx512bw", f.avx512bw},
      {"avx512dq", f.avx512dq}, {"avx512vl", f.avx512vl},
      {"avx512vnni", f.avx512vnni}, {"avx512bf16", f.avx512bf16},
      {"avx_vnni", f.avx_vnni}, {"neon", f.neon},
      {"dotprod", f.dotprod},   {"i8mm", f.i8mm},
  };
}

}  // namespace cpu
}  // namespace lowbit
