// Outer-product kernels of the sparse24_matmul CPU kernel (family 2, larger M; described at the
// top of sparse24_matmul_kernels.cpp): weight packing, the x tables, run_outer's loop blocking
// and the fp32 (XtKernel) and bf16 (XpKernel) micro-tiles.
//
// Part of sparse24_matmul_kernels.cpp (compiled once per instruction set, see isa.h): include it
// only from there, inside its anonymous namespace, after the LOWBIT_S24_* macros,
// kMinWorkPerThread and store_out (gather driver). It includes nothing itself; the system and
// intrinsics headers are included by the .cpp before the namespace.
#pragma once

// ------------------------------------------------------------------------------------------
// Outer-product kernels (x arranged into tables; see the header comment and run_outer).

#if defined(LOWBIT_S24_AVX512) || defined(LOWBIT_S24_AVX2)

constexpr int kPackPrefetchRows = 16;  // pack: prefetch the weights of the row this far ahead

template <int Hint = _MM_HINT_T0>
inline void prefetch_row(const Sparse24MatmulArgs& a, int vbytes, int64_t n, int64_t g0, int64_t ng) {
  const char* v = static_cast<const char*>(a.values) + n * (a.K / 2) * vbytes + 2 * g0 * vbytes;
  const int64_t len = 2 * ng * vbytes;
  for (int64_t b = 0; b < len; b += 64) _mm_prefetch(v + b, static_cast<decltype(_MM_HINT_T0)>(Hint));
  _mm_prefetch(v + len - 1, static_cast<decltype(_MM_HINT_T0)>(Hint));
  const char* m = reinterpret_cast<const char*>(a.meta) + n * (a.K / 8) + g0 / 2;
  _mm_prefetch(m, static_cast<decltype(_MM_HINT_T0)>(Hint));
  _mm_prefetch(m + ng / 2 - 1, static_cast<decltype(_MM_HINT_T0)>(Hint));
}

constexpr int64_t kChunkTiles = 80;  // outer-product: weight tiles packed at a time (panel in L2)
constexpr int64_t kGroupTiles = 8;   // outer-product: tiles run back to back on one table (partial sums in L1)
constexpr int64_t kMaxMRange = 512;  // outer-product: x rows per work item, at most

struct OuterPlan {
  int64_t rows_per_part, nparts, mrange, nmranges;
  int threads;
};

OuterPlan make_outer_plan(const Sparse24MatmulArgs& a, int num_threads, int64_t nr, int64_t mc) {
  OuterPlan p{};
  const double work = static_cast<double>(a.M) * static_cast<double>(a.N) * static_cast<double>(a.K / 2);
  int64_t t = std::max(1, num_threads);
  t = std::min<int64_t>(t, std::max<int64_t>(1, static_cast<int64_t>(work / kMinWorkPerThread)));
  const int64_t ntiles = (a.N + nr - 1) / nr;
  // One row range per thread (tables are built per range); x rows are split too when there
  // are fewer tiles than threads, or more than kMaxMRange rows.
  p.rows_per_part = (ntiles + t - 1) / t * nr;
  p.nparts = (a.N + p.rows_per_part - 1) / p.rows_per_part;
  p.mrange = std::min<int64_t>((a.M + mc - 1) / mc * mc, kMaxMRange);
  if (p.nparts < t) p.mrange = std::min(p.mrange, ((a.M + t - 1) / t + mc - 1) / mc * mc);
  p.nmranges = (a.M + p.mrange - 1) / p.mrange;
  p.threads = static_cast<int>(std::min<int64_t>(t, p.nparts * p.nmranges));
  return p;
}

// out[m0 + m, n] = c[(n - n0) * ldc + m] (+ bias[n]) for m < mrows, n in [n0, n1): 16 outputs
// of a row at a time from a 16-row block of c (L1-resident), so that out is written in order.
template <int OD, int BD>
void store_transposed_t(const Sparse24MatmulArgs& a, int64_t m0, int64_t mrows, int64_t n0, int64_t n1,
                        const float* c, int64_t ldc) {
  for (int64_t nb = n0; nb < n1; nb += 16) {
    const int64_t cnt = std::min<int64_t>(16, n1 - nb);
    float bias[16] = {};
    if (a.bias)
      for (int64_t j = 0; j < cnt; ++j) bias[j] = load_as_float(a.bias, nb + j, BD);
    const float* cb = c + (nb - n0) * ldc;
    for (int64_t m = 0; m < mrows; ++m) {
      const int64_t o = (m0 + m) * a.N + nb;
      for (int64_t j = 0; j < cnt; ++j) store_from_float(a.out, o + j, OD, cb[j * ldc + m] + bias[j]);
    }
  }
}

void store_transposed(const Sparse24MatmulArgs& a, int64_t m0, int64_t mrows, int64_t n0, int64_t n1,
                      const float* c, int64_t ldc) {
  using Fn = void (*)(const Sparse24MatmulArgs&, int64_t, int64_t, int64_t, int64_t, const float*, int64_t);
  static constexpr Fn table[3][3] = {
      {store_transposed_t<kFloat32, kFloat32>, store_transposed_t<kFloat32, kFloat16>,
       store_transposed_t<kFloat32, kBFloat16>},
      {store_transposed_t<kFloat16, kFloat32>, store_transposed_t<kFloat16, kFloat16>,
       store_transposed_t<kFloat16, kBFloat16>},
      {store_transposed_t<kBFloat16, kFloat32>, store_transposed_t<kBFloat16, kFloat16>,
       store_transposed_t<kBFloat16, kBFloat16>}};
  table[a.out_dtype][a.bias ? a.bias_dtype : kFloat32](a, m0, mrows, n0, n1, c, ldc);
}

// The driver, shared by the bf16 (XP) and fp32 (XT) kernels; GotoBLAS-like blocking. A work item
// is a range of weight rows and of x rows. For each K block of KP groups:
//   * the tables of every x block of the range and every KG-group sub-block are built (each
//     table fits L1; all of them L2/L3);
//   * the rows are packed kChunkTiles tiles at a time (the panel stays in L2 and is read once
//     per x block), and for each x block, kGroupTiles tiles at a time run over the sub-block
//     tables in turn: a table is loaded into L1 once per kGroupTiles tiles, and those tiles'
//     partial sums stay in L1 across the sub-blocks.
// Partial sums live in a per-thread [x block][rows][MC] buffer, read and written once per K block.
// K provides NR, MC, W, VBYTES, KG (groups per table), KP (groups per K block, a multiple of
// KG), WORDS (32-bit words of a packed entry), table_bytes(),
//   pack_row(a, n, g0, ng, uint32_t* dst) -> bool: row n's entries for groups [g0, g0 + ng),
//     word j of group g0 + g at dst[j * KP + g], slot offsets relative to the group's table
//     (group g0 + g is at (g % KG) in it); true if a table needs its extra slots;
//   build(a, m0, mrows, g0, ng, extra, table): the table of x rows [m0, m0 + mrows) and
//     groups [g0, g0 + ng);
//   tile(mv, panel, ng, table, c, first): one tile over ng groups (its row i at panel + i * WORDS * KP).
template <class K>
void run_outer(const Sparse24MatmulArgs& a, int num_threads) {
  static_assert(K::KP % K::KG == 0, "a K block holds whole tables");
  const OuterPlan p = make_outer_plan(a, num_threads, K::NR, K::MC);
  const int64_t rows_pad = p.rows_per_part + K::NR;
  const int64_t chunk_rows = kChunkTiles * K::NR;
  const int64_t max_mblocks = p.mrange / K::MC;
  constexpr int64_t kTables = K::KP / K::KG;
  constexpr int64_t kRowWords = K::WORDS * K::KP;
  struct Scratch {
    std::vector<uint32_t> panel;
    std::vector<uint8_t> tables;
    std::vector<float> cpart;
  };
  std::vector<Scratch> scratch(static_cast<size_t>(p.threads));
  for (Scratch& s : scratch) {
    s.panel.resize(static_cast<size_t>((chunk_rows + K::NR) * kRowWords));
    s.tables.resize(static_cast<size_t>(max_mblocks * kTables * K::table_bytes() + 64));
    s.cpart.resize(static_cast<size_t>(p.mrange * rows_pad));
  }
  const int64_t G = a.K / 4;
  parallel_for(p.nparts * p.nmranges, p.threads, [&](int64_t task, int thread) {
    Scratch& s = scratch[static_cast<size_t>(thread)];
    const int64_t n_begin = (task % p.nparts) * p.rows_per_part;
    const int64_t n_end = std::min(a.N, n_begin + p.rows_per_part);
    const int64_t m_begin = (task / p.nparts) * p.mrange;
    const int64_t m_end = std::min(a.M, m_begin + p.mrange);
    const int64_t mblocks = (m_end - m_begin + K::MC - 1) / K::MC;
    const int64_t rows = n_end - n_begin;
    uint8_t* tables = s.tables.data() + ((64 - reinterpret_cast<uintptr_t>(s.tables.data()) % 64) % 64);
    auto table_at = [&](int64_t mb, int64_t tb) { return tables + (mb * kTables + tb) * K::table_bytes(); };
    for (int64_t gp = 0; gp < G; gp += K::KP) {
      const int64_t npg = std::min<int64_t>(K::KP, G - gp);
      const int64_t ntab = (npg + K::KG - 1) / K::KG;
      auto build_all = [&](bool extra) {
        for (int64_t mb = 0; mb < mblocks; ++mb) {
          const int64_t m0 = m_begin + mb * K::MC;
          for (int64_t tb = 0; tb < ntab; ++tb)
            K::build(a, m0, std::min<int64_t>(K::MC, m_end - m0), gp + tb * K::KG,
                     std::min<int64_t>(K::KG, npg - tb * K::KG), extra, table_at(mb, tb));
        }
      };
      build_all(false);
      bool tables_extra = false;
      for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
        const int64_t tiles = (std::min(chunk_rows, rows - r0) + K::NR - 1) / K::NR;
        bool extra = false;
        for (int64_t row = 0; row < tiles * K::NR; ++row) {
          if (r0 + row + kPackPrefetchRows < rows)
            prefetch_row(a, K::VBYTES, n_begin + r0 + row + kPackPrefetchRows, gp, npg);
          const int64_t n = std::min(n_begin + r0 + row, n_end - 1);  // a short last tile repeats its last row
          extra |= K::pack_row(a, n, gp, npg, s.panel.data() + row * kRowWords);
        }
        if (extra && !tables_extra) {  // illegal nibbles: fill in the extra slots of this block's tables
          build_all(true);
          tables_extra = true;
        }
        // The rows the next packing step reads: the next chunk, or the first of the next K block.
        const bool last_chunk = r0 + chunk_rows >= rows;
        const int64_t next_n = n_begin + (last_chunk ? 0 : r0 + chunk_rows);
        const int64_t next_g = last_chunk ? gp + K::KP : gp;
        const int64_t next_ng = std::min<int64_t>(K::KP, G - next_g);
        // (With one x block the tiles are too short to hide it, and the lines would crowd out
        // the panel and tables: then packing prefetches for itself.)
        const int64_t next_rows = next_g >= G || mblocks == 1 ? 0 : std::min(chunk_rows, n_end - next_n);
        for (int64_t mb = 0; mb < mblocks; ++mb) {
          const int64_t mrows = std::min<int64_t>(K::MC, m_end - m_begin - mb * K::MC);
          const int mv = static_cast<int>((mrows + K::W - 1) / K::W);
          float* c = s.cpart.data() + (mb * rows_pad + r0) * K::MC;  // [x block][row][MC]
          // While the tiles compute, bring the weights the next packing step reads into L2
          // (packing reads short runs of many rows: latency-bound unless prefetched).
          const int64_t steps = mblocks * ((tiles + kGroupTiles - 1) / kGroupTiles);
          const int64_t per_step = (next_rows + steps - 1) / steps;
          for (int64_t t0 = 0; t0 < tiles; t0 += kGroupTiles) {
            const int64_t t1 = std::min(tiles, t0 + kGroupTiles);
            const int64_t step = mb * ((tiles + kGroupTiles - 1) / kGroupTiles) + t0 / kGroupTiles;
            for (int64_t r = step * per_step; r < std::min(next_rows, (step + 1) * per_step); ++r)
              prefetch_row<_MM_HINT_T1>(a, K::VBYTES, next_n + r, next_g, next_ng);
            for (int64_t tb = 0; tb < ntab; ++tb) {
              const int64_t ng = std::min<int64_t>(K::KG, npg - tb * K::KG);
              const uint8_t* table = table_at(mb, tb);
              for (int64_t t = t0; t < t1; ++t)
                K::tile(mv, s.panel.data() + t * K::NR * kRowWords + tb * K::KG, ng, table, c + t * K::NR * K::MC,
                        gp == 0 && tb == 0);
            }
          }
        }
      }
    }
    for (int64_t mb = 0; mb < mblocks; ++mb) {
      const int64_t m0 = m_begin + mb * K::MC;
      store_transposed(a, m0, std::min<int64_t>(K::MC, m_end - m0), n_begin, n_end,
                       s.cpart.data() + mb * rows_pad * K::MC, K::MC);
    }
  });
}

#if defined(LOWBIT_S24_AVX512)
struct VecF {
  using T = __m512;
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const void* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T bcast(const float* p) { return _mm512_set1_ps(*p); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
};
#else
struct VecF {
  using T = __m256;
  static constexpr int W = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const void* p) { return _mm256_loadu_ps(static_cast<const float*>(p)); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
};
#endif

constexpr int64_t kXtMinM = 16;  // fp32 math: the gather kernel is faster below this M

// fp32 math: XT[c][m] = x[m0 + m, 4 g0 + c] (x transposed, as fp32); an entry holds the byte
// offsets of the two columns a group uses and its two values, widened to fp32.
template <int XD, int VD>
struct XtKernel {
  static constexpr int W = VecF::W;
  static constexpr int MV = 4;  // vectors of x rows per micro-tile
#if defined(LOWBIT_S24_AVX512)
  static constexpr int NR = 6;  // 6 x 4 accumulators of 32 registers
#else
  static constexpr int NR = 3;  // 3 x 4 accumulators of 16 registers
#endif
  static constexpr int64_t MC = MV * W;
  static constexpr int64_t KG = 16;   // groups per table: 64 columns x MC rows of fp32 (16 KiB with AVX-512)
  static constexpr int64_t KP = 128;  // groups per K block
  static constexpr int VBYTES = VD == kFloat32 ? 4 : 2;
  static constexpr int WORDS = 4;  // offsets of the two columns (bytes), the two values (fp32)
  static int64_t table_bytes() { return 4 * KG * MC * 4; }

  static bool pack_row(const Sparse24MatmulArgs& a, int64_t n, int64_t g0, int64_t ng, uint32_t* dst) {
    const uint8_t* mp = a.meta + n * (a.K / 8) + g0 / 2;
    const int64_t voff = n * (a.K / 2) + 2 * g0;
    float* v0 = reinterpret_cast<float*>(dst + 2 * KP);
    float* v1 = reinterpret_cast<float*>(dst + 3 * KP);
    for (int64_t g = 0; g < ng; ++g) {
      const unsigned nib = (mp[g >> 1] >> ((g & 1) * 4)) & 15u;
      const int64_t gl = g % KG;  // the group's place in its table
      dst[g] = static_cast<uint32_t>((4 * gl + (nib & 3u)) * MC * 4);
      dst[KP + g] = static_cast<uint32_t>((4 * gl + (nib >> 2)) * MC * 4);
      v0[g] = load_as_float(a.values, voff + 2 * g, VD);
      v1[g] = load_as_float(a.values, voff + 2 * g + 1, VD);
    }
    return false;
  }

  // XT[c][m] = x[m0 + m, 4 g0 + c] as fp32 (rows past M stay as they were: never stored).
  static void build(const Sparse24MatmulArgs& a, int64_t m0, int64_t mrows, int64_t g0, int64_t ng, bool,
                    uint8_t* table) {
    float* xt = reinterpret_cast<float*>(table);
    for (int64_t m = 0; m < mrows; ++m) {
      const int64_t base = (m0 + m) * a.x_row_stride + 4 * g0;
      for (int64_t c = 0; c < 4 * ng; ++c) xt[c * MC + m] = load_as_float(a.x, base + c, XD);
    }
  }

  template <int V>
  static void tile_mv(const uint32_t* panel, int64_t ng, const uint8_t* xt, float* c, bool first) {
    typename VecF::T acc[NR][V];
    for (int i = 0; i < NR; ++i)
      for (int r = 0; r < V; ++r) acc[i][r] = first ? VecF::zero() : VecF::load(c + i * MC + r * W);
    for (int64_t g = 0; g < ng; ++g) {
#pragma GCC unroll 6
      for (int i = 0; i < NR; ++i) {
        const uint32_t* e = panel + i * WORDS * KP + g;
        const uint8_t* p0 = xt + e[0];
        const uint8_t* p1 = xt + e[KP];
        const typename VecF::T w0 = VecF::bcast(reinterpret_cast<const float*>(e + 2 * KP));
        const typename VecF::T w1 = VecF::bcast(reinterpret_cast<const float*>(e + 3 * KP));
#pragma GCC unroll 4
        for (int r = 0; r < V; ++r) acc[i][r] = VecF::fma(VecF::load(p0 + 4 * W * r), w0, acc[i][r]);
#pragma GCC unroll 4
        for (int r = 0; r < V; ++r) acc[i][r] = VecF::fma(VecF::load(p1 + 4 * W * r), w1, acc[i][r]);
      }
    }
    for (int i = 0; i < NR; ++i)
      for (int r = 0; r < V; ++r) VecF::store(c + i * MC + r * W, acc[i][r]);
  }

  static void tile(int mv, const uint32_t* e, int64_t ng, const uint8_t* xt, float* c, bool first) {
    switch (mv) {
      case 1: tile_mv<1>(e, ng, xt, c, first); break;
      case 2: tile_mv<2>(e, ng, xt, c, first); break;
      case 3: tile_mv<3>(e, ng, xt, c, first); break;
      default: tile_mv<4>(e, ng, xt, c, first); break;
    }
  }
};
#endif  // outer-product fp32

#if defined(LOWBIT_S24_BF16)
constexpr int64_t kXpMinM = 32;  // bf16 math: the gather kernel is faster below this M

// Nibble -> slot of the XP table: the six legal pairs first (i0 < i1, in the format's order
// 4, 8, 12, 9, 13, 14), then the ten illegal nibbles, built only when a block holds one.
constexpr uint8_t kXpSlotOfNibble[16] = {6, 7, 8, 9, 0, 10, 11, 12, 1, 3, 13, 14, 2, 4, 5, 15};
constexpr uint8_t kXpNibbleOfSlot[16] = {4, 8, 12, 9, 13, 14, 0, 1, 2, 3, 5, 6, 7, 10, 11, 15};
constexpr int kXpLegalSlots = 6;

// vpermt2w indices over a 64-word table of 16 rows' quads (row m at words 4m..4m+3): dword m of
// slot s = words (4m + (nib & 3), 4m + (nib >> 2)) of the slot's nibble.
struct XpPick {
  alignas(64) uint16_t w[16][32];
};
constexpr XpPick make_xp_pick() {
  XpPick p{};
  for (int s = 0; s < 16; ++s) {
    const int nib = kXpNibbleOfSlot[s];
    for (int m = 0; m < 16; ++m) {
      p.w[s][2 * m] = static_cast<uint16_t>(4 * m + (nib & 3));
      p.w[s][2 * m + 1] = static_cast<uint16_t>(4 * m + (nib >> 2));
    }
  }
  return p;
}
alignas(64) constexpr XpPick kPick = make_xp_pick();

// pack_row's tables, by nibble: the slot's byte offset in a table's group 0 (legal slots in
// [KG][6], illegal ones in [KG][10] after them), and all-ones for an illegal nibble.
struct XpPackTables {
  alignas(64) uint32_t base[16];
  alignas(64) uint32_t illegal[16];
};
constexpr XpPackTables make_xp_pack_tables(int64_t slot_bytes, int64_t extra_base) {
  XpPackTables t{};
  for (int nib = 0; nib < 16; ++nib) {
    const int s = kXpSlotOfNibble[nib];
    const bool legal = s < kXpLegalSlots;
    t.base[nib] = static_cast<uint32_t>(legal ? s * slot_bytes : extra_base + (s - kXpLegalSlots) * slot_bytes);
    t.illegal[nib] = legal ? 0u : ~0u;
  }
  return t;
}

// bf16 math: XP[g][slot][m] (dword) = the bf16 pair (x[m0 + m, 4(g0 + g) + (nib & 3)],
// x[.., 4(g0 + g) + (nib >> 2)]) of the slot's nibble; legal slots [KG][6][MC] first, the
// illegal ones [KG][10][MC] after. An entry holds the slot's byte offset and the value pair
// (one dword of `values`): a stored pair times 16 x rows is one vdpbf16ps.
struct XpKernel {
  static constexpr int W = 16;
  static constexpr int MV = 4;   // zmm of 16 x rows per micro-tile
  static constexpr int NR = 6;   // weight rows per micro-tile: 6 x 4 accumulators
  static constexpr int64_t MC = MV * W;
  static constexpr int64_t KG = 16;   // groups per table: 24 KiB of legal slots, L1-resident
  static constexpr int64_t KP = 128;  // groups per K block
  static constexpr int VBYTES = 2;
  static constexpr int64_t SLOT = MC * 4;
  static constexpr int64_t EXTRA_BASE = KG * kXpLegalSlots * SLOT;
  static constexpr XpPackTables kXpPack = make_xp_pack_tables(SLOT, EXTRA_BASE);
  static constexpr int WORDS = 2;  // byte offset of the slot, the value pair
  static int64_t table_bytes() { return KG * 16 * SLOT; }

  // Vectorized, 16 groups per step, no mask registers (slow on AMD): the nibbles of 8 meta
  // bytes widened to dwords index 16-entry tables (vpermd) of the slot offset and of whether
  // the nibble is illegal; offset = base[nib] + g * 6 * SLOT (+ g * 4 * SLOT if illegal).
  static bool pack_row(const Sparse24MatmulArgs& a, int64_t n, int64_t g0, int64_t ng, uint32_t* dst) {
    static_assert(KG % 16 == 0 && (KG & (KG - 1)) == 0 && KP % 16 == 0, "pack_row works in steps of 16 groups");
    const uint8_t* mp = a.meta + n * (a.K / 8) + g0 / 2;
    const uint8_t* vp = static_cast<const uint8_t*>(a.values) + n * a.K + 4 * g0;  // K/2 bf16 = K bytes a row
    const __m512i base = _mm512_load_si512(kXpPack.base);
    const __m512i illegal = _mm512_load_si512(kXpPack.illegal);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i legal_step = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(kXpLegalSlots * SLOT)));
    const __m512i extra_step = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>((16 - 2 * kXpLegalSlots) * SLOT)));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m512i any = _mm512_setzero_si512();
    for (int64_t g = 0; g < ng; g += 16) {
      const int64_t cnt = std::min<int64_t>(16, ng - g);  // even
      __m128i mb;
      __m512i pairs;
      if (cnt == 16) {
        mb = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mp + g / 2));
        pairs = _mm512_loadu_si512(vp + 4 * g);
      } else {  // the row's last groups: read no further than the row
        mb = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << (cnt / 2)) - 1u), mp + g / 2);
        pairs = _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << cnt) - 1u), vp + 4 * g);
      }
      const __m128i nib8 = _mm_unpacklo_epi8(_mm_and_si128(mb, low4), _mm_and_si128(_mm_srli_epi16(mb, 4), low4));
      const __m512i nib = _mm512_cvtepu8_epi32(nib8);  // groups g..g+15, in order (0 past cnt)
      __m512i bad = _mm512_permutexvar_epi32(nib, illegal);
      // (g % KG) is 0 here: KG is a multiple of 16, so lane l is group l of its table.
      __m512i off = _mm512_add_epi32(_mm512_permutexvar_epi32(nib, base), legal_step);
      off = _mm512_add_epi32(off, _mm512_and_si512(bad, extra_step));
      if (cnt < 16) bad = _mm512_maskz_mov_epi32(static_cast<__mmask16>((1u << cnt) - 1u), bad);
      any = _mm512_or_si512(any, bad);
      // Full-width stores (a panel row has room for KP groups; entries past ng are never read).
      _mm512_storeu_si512(dst + g, off);
      _mm512_storeu_si512(dst + KP + g, pairs);
    }
    return _mm512_test_epi32_mask(any, any) != 0;
  }

  // For each 16-row block of x: the 4 x values of a group for the 16 rows are gathered as 16
  // qwords (two zmm = a 64-word table, row m at words 4m..4m+3), then one vpermt2w per slot
  // pairs them up.
  static void build(const Sparse24MatmulArgs& a, int64_t m0, int64_t mrows, int64_t g0, int64_t ng, bool extra,
                    uint8_t* table) {
    const char* x = static_cast<const char*>(a.x);
    const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i row_bytes = _mm512_set1_epi64(a.x_row_stride * 2);
    for (int64_t mm = 0; mm < mrows; mm += 16) {
      const int64_t valid = std::min<int64_t>(16, mrows - mm);
      const __mmask8 mlo = static_cast<__mmask8>(valid >= 8 ? 0xFF : (1u << valid) - 1u);
      const __mmask8 mhi = static_cast<__mmask8>(valid <= 8 ? 0 : (1u << (valid - 8)) - 1u);
      // Masked-off lanes may hold row offsets past M: those addresses are never touched.
      const __m512i off_lo = _mm512_mullo_epi64(_mm512_add_epi64(lane, _mm512_set1_epi64(m0 + mm)), row_bytes);
      const __m512i off_hi = _mm512_mullo_epi64(_mm512_add_epi64(lane, _mm512_set1_epi64(m0 + mm + 8)), row_bytes);
      for (int64_t g = 0; g < ng; ++g) {
        const char* col = x + 8 * (g0 + g);
        const __m512i tlo = _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), mlo, off_lo, col, 1);
        const __m512i thi = _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), mhi, off_hi, col, 1);
        uint8_t* dst = table + g * kXpLegalSlots * SLOT + mm * 4;
#pragma GCC unroll 6
        for (int s = 0; s < kXpLegalSlots; ++s)
          _mm512_storeu_si512(dst + s * SLOT, _mm512_permutex2var_epi16(tlo, _mm512_load_si512(kPick.w[s]), thi));
        if (extra) {
          uint8_t* ex = table + EXTRA_BASE + g * (16 - kXpLegalSlots) * SLOT + mm * 4;
          for (int s = kXpLegalSlots; s < 16; ++s)
            _mm512_storeu_si512(ex + (s - kXpLegalSlots) * SLOT,
                                _mm512_permutex2var_epi16(tlo, _mm512_load_si512(kPick.w[s]), thi));
        }
      }
    }
  }

  template <int V>
  static void tile_mv(const uint32_t* panel, int64_t ng, const uint8_t* xp, float* c, bool first) {
    __m512 acc[NR][V];
    for (int i = 0; i < NR; ++i)
      for (int r = 0; r < V; ++r) acc[i][r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * MC + 16 * r);
    for (int64_t g = 0; g < ng; ++g) {
#pragma GCC unroll 6
      for (int i = 0; i < NR; ++i) {
        const uint32_t* e = panel + i * WORDS * KP + g;
        const uint8_t* p = xp + e[0];
        const __m512i w = _mm512_set1_epi32(static_cast<int>(e[KP]));
#pragma GCC unroll 4
        for (int r = 0; r < V; ++r)
          acc[i][r] = _mm512_dpbf16_ps(acc[i][r], as_bh(_mm512_loadu_si512(p + 64 * r)), as_bh(w));
      }
    }
    for (int i = 0; i < NR; ++i)
      for (int r = 0; r < V; ++r) _mm512_storeu_ps(c + i * MC + 16 * r, acc[i][r]);
  }

  static void tile(int mv, const uint32_t* e, int64_t ng, const uint8_t* xp, float* c, bool first) {
    switch (mv) {
      case 1: tile_mv<1>(e, ng, xp, c, first); break;
      case 2: tile_mv<2>(e, ng, xp, c, first); break;
      case 3: tile_mv<3>(e, ng, xp, c, first); break;
      default: tile_mv<4>(e, ng, xp, c, first); break;
    }
  }
};
#endif  // LOWBIT_S24_BF16
