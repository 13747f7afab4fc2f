// The "gemm" path of the ternary_matmul CPU kernel (x86 builds, LOWBIT_TM_GEMM; described at the
// top of ternary_matmul_kernels.cpp): panel packing, the broadcast-A micro-kernel and the task
// of one tile of byte rows.
//
// Part of ternary_matmul_kernels.cpp (compiled once per instruction set, see isa.h): include it
// only from there, inside its anonymous namespace, after Vec (ternary_vec.h), Activations,
// store_run, plane_count and Scratch. It includes nothing itself; the system headers are
// included by the .cpp before the namespace.
#pragma once

#if defined(LOWBIT_TM_GEMM)
constexpr int64_t kL = Vec::kLanes;  // byte rows per tile (4 * kL outputs)

// Panel of byte rows [r0, r0 + kL) and k in [k0, k0 + klen) (klen a multiple of 4):
// panel[g][i] = plane i of the dwords k0 + 4g of each row (lane j = row r0 + j; 0 past R).
void pack_panel(const TernaryMatmulArgs& a, int64_t R, int64_t r0, int64_t k0, int64_t klen, uint8_t* panel) {
  const int64_t groups = klen / 4;
  typename Vec::W rows[kL], t[kL];
  for (int64_t g0 = 0; g0 < groups; g0 += kL) {  // kL dwords = Vec::kBytes bytes of each row
    const int64_t k = k0 + 4 * g0;
    for (int64_t j = 0; j < kL; ++j) {
      const uint8_t* p = a.qweight + (r0 + j) * a.K + k;
      rows[j] = r0 + j >= R                ? Vec::zero()
                : k + Vec::kBytes <= a.K ? Vec::load_w(p)
                                         : Vec::load_w_part(p, a.K - k);
    }
    Vec::transpose(rows, t);
    const int64_t ng = std::min<int64_t>(kL, groups - g0);
    for (int64_t g = 0; g < ng; ++g) {
      uint8_t* dst = panel + (g0 + g) * 4 * Vec::kBytes;
      Vec::store_w(dst, Vec::plane<0>(t[g]));
      Vec::store_w(dst + Vec::kBytes, Vec::plane<1>(t[g]));
      Vec::store_w(dst + 2 * Vec::kBytes, Vec::plane<2>(t[g]));
      Vec::store_w(dst + 3 * Vec::kBytes, Vec::plane<3>(t[g]));
    }
  }
}

// c[m][i][j] (+)= Σ_g panel[g][i][j-th dword] · x_q[m][4g..4g+3], for MR <= 6 rows of x.
// Named accumulators (see dot_tile): c<m><i>.
#define LOWBIT_TM_GEMM_ROW(m, OP) \
  if constexpr (MR > m) { OP(m) }
#define LOWBIT_TM_GEMM_INIT(m)                                                      \
  c##m##0 = accumulate ? Vec::load_acc(c + (m * 4 + 0) * kL) : Vec::zero();         \
  c##m##1 = accumulate ? Vec::load_acc(c + (m * 4 + 1) * kL) : Vec::zero();         \
  c##m##2 = accumulate ? Vec::load_acc(c + (m * 4 + 2) * kL) : Vec::zero();         \
  c##m##3 = accumulate ? Vec::load_acc(c + (m * 4 + 3) * kL) : Vec::zero();
#define LOWBIT_TM_GEMM_STEP(m)                                                      \
  {                                                                                 \
    const typename Vec::X xb = Vec::bcast_x(x + m * ld + 4 * g);                    \
    c##m##0 = Vec::dot(c##m##0, b0, xb);                                            \
    c##m##1 = Vec::dot(c##m##1, b1, xb);                                            \
    c##m##2 = Vec::dot(c##m##2, b2, xb);                                            \
    c##m##3 = Vec::dot(c##m##3, b3, xb);                                            \
  }
#define LOWBIT_TM_GEMM_STORE(m)                                                     \
  Vec::store_acc(c + (m * 4 + 0) * kL, c##m##0);                                    \
  Vec::store_acc(c + (m * 4 + 1) * kL, c##m##1);                                    \
  Vec::store_acc(c + (m * 4 + 2) * kL, c##m##2);                                    \
  Vec::store_acc(c + (m * 4 + 3) * kL, c##m##3);
#define LOWBIT_TM_GEMM_ALL(OP) \
  LOWBIT_TM_GEMM_ROW(0, OP)    \
  LOWBIT_TM_GEMM_ROW(1, OP)    \
  LOWBIT_TM_GEMM_ROW(2, OP)    \
  LOWBIT_TM_GEMM_ROW(3, OP)    \
  LOWBIT_TM_GEMM_ROW(4, OP)    \
  LOWBIT_TM_GEMM_ROW(5, OP)

template <int MR>
void gemm_micro(const uint8_t* panel, int64_t groups, const int8_t* x, int64_t ld, int32_t* c, bool accumulate) {
  static_assert(MR >= 1 && MR <= 6, "6 rows at most");
  using A = typename Vec::A;
  A c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23;
  A c30, c31, c32, c33, c40, c41, c42, c43, c50, c51, c52, c53;
  LOWBIT_TM_GEMM_ALL(LOWBIT_TM_GEMM_INIT)
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = panel + g * 4 * Vec::kBytes;
    const typename Vec::W b0 = Vec::load_w(p);
    const typename Vec::W b1 = Vec::load_w(p + Vec::kBytes);
    const typename Vec::W b2 = Vec::load_w(p + 2 * Vec::kBytes);
    const typename Vec::W b3 = Vec::load_w(p + 3 * Vec::kBytes);
    LOWBIT_TM_GEMM_ALL(LOWBIT_TM_GEMM_STEP)
  }
  LOWBIT_TM_GEMM_ALL(LOWBIT_TM_GEMM_STORE)
}
#undef LOWBIT_TM_GEMM_ROW
#undef LOWBIT_TM_GEMM_INIT
#undef LOWBIT_TM_GEMM_STEP
#undef LOWBIT_TM_GEMM_STORE
#undef LOWBIT_TM_GEMM_ALL

template <int MR>
void gemm_rows(const uint8_t* panel, int64_t groups, const Activations& act, int64_t k0, int64_t M, int32_t* c,
               bool accumulate) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR)
    gemm_micro<MR>(panel, groups, act.q + m * act.ld + k0, act.ld, c + m * 4 * kL, accumulate);
  const int64_t rest = M - m;
  const int8_t* x = act.q + m * act.ld + k0;
  int32_t* cm = c + m * 4 * kL;
  switch (rest) {  // MR <= 6
    case 1: gemm_micro<1>(panel, groups, x, act.ld, cm, accumulate); break;
    case 2: gemm_micro<2>(panel, groups, x, act.ld, cm, accumulate); break;
    case 3: gemm_micro<3>(panel, groups, x, act.ld, cm, accumulate); break;
    case 4: gemm_micro<4>(panel, groups, x, act.ld, cm, accumulate); break;
    case 5: gemm_micro<5>(panel, groups, x, act.ld, cm, accumulate); break;
    default: break;
  }
}

// Task t of the gemm path: byte rows [t * kL, ...) against all rows of x.
void gemm_tile(const TernaryMatmulArgs& a, const Activations& act, int64_t t, Scratch& s) {
  const int64_t R = ternary_packed_rows(a.N);
  const int64_t r0 = t * kL;
  const int64_t rows = std::min(kL, R - r0);
  const int64_t K4 = round_up(a.K, 4);
  uint8_t* panel = s.panel.data() + (kAlign - reinterpret_cast<uintptr_t>(s.panel.data()) % kAlign) % kAlign;
  int32_t* c = s.acc.data();
  for (int64_t k0 = 0; k0 < K4; k0 += kKc) {
    const int64_t klen = std::min(kKc, K4 - k0);
    pack_panel(a, R, r0, k0, klen, panel);
    // Start fetching the next block of these rows while this one is multiplied.
    if (k0 + kKc < a.K)
      for (int64_t j = 0; j < rows; ++j) {
        const uint8_t* p = a.qweight + (r0 + j) * a.K + k0 + kKc;
        const int64_t len = std::min(kKc, a.K - k0 - kKc);
        for (int64_t b = 0; b < len; b += 64) _mm_prefetch(reinterpret_cast<const char*>(p + b), _MM_HINT_T1);
      }
    gemm_rows<Vec::kGemmMR>(panel, klen / 4, act, k0, a.M, c, k0 > 0);
  }
  for (int64_t m = 0; m < a.M; ++m)
    for (int i = 0; i < 4; ++i) {
      const int64_t count = plane_count(a, R, r0, rows, i);
      if (count > 0) store_run(a, act, m, r0 + i * R, count, c + (m * 4 + i) * kL, s.tmp.data());
    }
}

// The dot path re-reads all of x_q for every chunk of byte rows: it is the faster one while x_q
// stays in L2 (measured: M = 64, K = 14336 dot 4.2 ms, gemm 5.0 ms; M = 512, K = 14336
// dot 65 ms, gemm 33.5 ms; M = 512, K = 4096 equal).
constexpr int64_t kDotMaxXBytes = int64_t{1} << 20;
#endif
