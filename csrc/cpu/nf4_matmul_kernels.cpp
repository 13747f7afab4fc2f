// CPU kernel for nf4_matmul, compiled once per instruction set (see isa.h): the nf4 format
// (bitsandbytes' layout: w = NF4[q] * absmax, blocks along the flattened weight, the even
// element of a byte in its high nibble, absmax float32 or double-quantized) plugged into the
// 4-bit lookup-table core, lut4_core.h.
#include <algorithm>
#include <cstdint>

#include "../common/nf4_matmul.h"
#include "lut4_core.h"

namespace lowbit {
namespace cpu {
namespace {

struct Nf4Format {
  static constexpr bool kHighFirst = true;  // element e is the high nibble of byte e/2 when e is even
  static constexpr bool kHasZero = false;
  alignas(64) float table[16];  // the NF4 values
  const uint8_t* q;
  const float* absmax_f32;   // without double quantization
  const uint8_t* absmax_q;   // with it: codes into absmax_code, scaled per 256 blocks, plus offset
  const float* absmax_scale;
  const float* absmax_code;
  float offset;
  int64_t K, blocksize;
  int log2_blocksize;

  explicit Nf4Format(const Nf4MatmulArgs& a)
      : q(a.qweight),
        absmax_f32(a.double_quant() ? nullptr : static_cast<const float*>(a.absmax)),
        absmax_q(a.double_quant() ? static_cast<const uint8_t*>(a.absmax) : nullptr),
        absmax_scale(a.absmax_scale), absmax_code(a.absmax_code), offset(a.absmax_offset), K(a.K),
        blocksize(a.blocksize), log2_blocksize(0) {
    for (int i = 0; i < 16; ++i) table[i] = kNf4Code[i];
    while ((int64_t{1} << log2_blocksize) < blocksize) ++log2_blocksize;
  }

  // SIMD decoders need rows of whole 32-element chunks (blocks are powers of two >= 32, so a
  // chunk then never straddles two blocks); K % blocksize != 0 is fine (blocks straddle rows).
  bool fast() const { return K % 32 == 0; }

  // absmax of block b, as bitsandbytes decodes it: code * scale, rounded, then + offset, rounded.
  float absmax(int64_t b) const {
    if (absmax_f32) return absmax_f32[b];
    volatile float scaled = absmax_code[absmax_q[b]] * absmax_scale[b / kNf4NestedBlocksize];  // no FMA
    return scaled + offset;
  }

  // Segments of the GEMV: the blocks when every row starts one (K % blocksize == 0), else
  // 32-column chunks (each within one block); their absmax for row n, as float32.
  int64_t seg_len() const { return K % blocksize == 0 ? blocksize : 32; }
  void row_scales(int64_t n, float* s, float*) const {
    const int64_t L = seg_len(), nseg = K / L;
    const int64_t e0 = n * K;
    if (absmax_f32) {
      for (int64_t g = 0; g < nseg; ++g) s[g] = absmax_f32[(e0 + g * L) >> log2_blocksize];
      return;
    }
    // Two passes keep the multiply and the add two roundings (no contraction into an FMA).
    for (int64_t g = 0; g < nseg; ++g) {
      const int64_t b = (e0 + g * L) >> log2_blocksize;
      s[g] = absmax_code[absmax_q[b]] * absmax_scale[b / kNf4NestedBlocksize];
    }
    for (int64_t g = 0; g < nseg; ++g) s[g] += offset;
  }

  // Scale of (n, k) and the end (in row n) of its block.
  int64_t segment(int64_t n, int64_t k, float& s, float& z) const {
    const int64_t e = n * K + k;
    const int64_t b = e >> log2_blocksize;
    s = absmax(b);
    z = 0.0f;
    return std::min(K, ((b + 1) << log2_blocksize) - n * K);
  }
};

}  // namespace

void LOWBIT_ISA_FN(nf4_matmul_kernel)(const Nf4MatmulArgs& a, int num_threads) {
  const Lut4Io io = lut4_io(a);
  run_lut4(Nf4Format(a), io, num_threads);
}

}  // namespace cpu
}  // namespace lowbit
