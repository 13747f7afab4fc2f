// CPU kernel for int4_matmul, compiled once per instruction set (see isa.h): the int4 format
// (w = (q - zero) * scale, groups of G along each row, element 2j of a row in the low nibble
// of byte j) plugged into the 4-bit lookup-table core, lut4_core.h.
#include <algorithm>
#include <cstdint>

#include "../common/int4_matmul.h"
#include "lut4_core.h"

namespace lowbit {
namespace cpu {
namespace {

struct Int4Format {
  static constexpr bool kHighFirst = false;  // element 2j of a row is the low nibble
  static constexpr bool kHasZero = true;
  alignas(64) float table[16];  // T[i] = i
  const uint8_t* q;
  const void* scales;
  const void* zeros;
  int scales_dtype, zeros_dtype;
  int64_t K, G, ngroups;
  int log2_G;  // -1 unless G is a power of two (then k >> log2_G replaces a division)

  explicit Int4Format(const Int4MatmulArgs& a)
      : q(a.qweight), scales(a.scales), zeros(a.zeros), scales_dtype(a.scales_dtype),
        zeros_dtype(a.zeros_dtype), K(a.K), G(a.group_size), ngroups(a.K / a.group_size), log2_G(-1) {
    for (int i = 0; i < 16; ++i) table[i] = static_cast<float>(i);
    for (int l = 0; l < 62; ++l)
      if ((int64_t{1} << l) == G) log2_G = l;
  }

  bool fast() const { return G % 32 == 0; }  // then K % 32 == 0 too

  // Segments of the GEMV: the groups; their scales and zeros for row n, as float32.
  int64_t seg_len() const { return G; }
  void row_scales(int64_t n, float* s, float* z) const {
    load_f32(scales, scales_dtype, n * ngroups, ngroups, s);
    if (zeros) {
      load_f32(zeros, zeros_dtype, n * ngroups, ngroups, z);
    } else {
      std::fill(z, z + ngroups, 8.0f);
    }
  }

  // Scale and zero of (n, k) and the end of its group.
  int64_t segment(int64_t n, int64_t k, float& s, float& z) const {
    const int64_t g = log2_G >= 0 ? k >> log2_G : k / G;
    s = load_as_float(scales, n * ngroups + g, scales_dtype);
    z = zeros ? load_as_float(zeros, n * ngroups + g, zeros_dtype) : 8.0f;
    return (g + 1) * G;
  }
};

}  // namespace

void LOWBIT_ISA_FN(int4_matmul_kernel)(const Int4MatmulArgs& a, int num_threads) {
  const Lut4Io io = lut4_io(a);
  run_lut4(Int4Format(a), io, num_threads);
}

}  // namespace cpu
}  // namespace lowbit
