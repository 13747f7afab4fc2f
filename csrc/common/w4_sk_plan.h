// The stream-K schedule of the warp-specialized 4-bit CUDA kernel (w4_ws_kernel<..., SK>, in
// csrc/cuda/w4_kernels.cuh): plain index arithmetic, host and device, so that every build (with
// or without CUDA) can check the partition on the host (w4_sk_plan_check).
#pragma once

#include <cstdint>
#include <string>

#include "dtype.h"  // LOWBIT_HD: host and device (inline)

namespace lowbit {
namespace cuda {
namespace w4 {

// The G blocks (all resident: one an SM) first take whole tiles as in a plain grid, tile b + w*G
// in wave w, so that neighbouring blocks work on the token tiles of one row block together (the
// weights are read from DRAM once); the tiles left after the full waves (at least half a wave:
// one full wave joins them when fewer are left) are split evenly by (tile, k block) iteration,
// each block a run of them, block G-1 first. A tile so split is finished by the block holding
// its first k block, at the end of its run; the rest of the tile lies at the start of the runs
// of LOWER blocks (dispatched earlier, so it never waits on a block that is not running yet).
// Tiles are token-tile fastest: tile = rb * tblocks + tt.
struct SkPlan {
  int tblocks, nkb, G, b, dp_tiles;  // dp_tiles: the tiles of the full waves (dp_tiles / G each)
  int64_t total, j0;                 // iterations of the split part; this block's first one
  int dp_n, nk;                      // this block's whole-tile iterations; all its iterations
  SkPlan() = default;
  // Block b of G over tblocks token tiles x nrb row blocks x nkb k blocks.
  LOWBIT_HD SkPlan(int tblocks_, int nrb, int nkb_, int G_, int b_)
      : tblocks(tblocks_), nkb(nkb_), G(G_), b(b_) {
    const int tiles = tblocks * nrb;
    int waves = tiles / G;
    if (waves > 0 && 2 * (tiles - waves * G) < G && tiles != waves * G) --waves;
    dp_tiles = waves * G;
    total = static_cast<int64_t>(tiles - dp_tiles) * nkb;
    j0 = start(b);
    dp_n = waves * nkb;
    nk = dp_n + static_cast<int>(start(b - 1) - j0);
  }
  // First split iteration of block q (block G-1 holds the first run; start(-1) = total).
  LOWBIT_HD int64_t start(int q) const { return total * (G - 1 - q) / G; }
  // True if block q has split iterations.
  LOWBIT_HD bool holds(int q) const { return start(q - 1) != start(q); }
  // The k block, token tile and row block of this block's iteration i.
  LOWBIT_HD void coords(int i, int& kb, int& tt, int& rb) const {
    int tile;
    if (i < dp_n) {
      const int w = i / nkb;
      kb = i - w * nkb;
      tile = b + w * G;
    } else {
      const int64_t j = j0 + (i - dp_n);
      const int64_t ts = j / nkb;
      kb = static_cast<int>(j - ts * nkb);
      tile = dp_tiles + static_cast<int>(ts);
    }
    tt = tile % tblocks;
    rb = tile / tblocks;
  }
  // One past the last iteration of the piece (one tile's run of k blocks) that starts at
  // iteration i, k block kb.
  LOWBIT_HD int piece_end(int i, int kb) const { return i + (nk - i < nkb - kb ? nk - i : nkb - kb); }
  // The last split iteration of the tile whose piece here ends at iteration i1 - 1, k block kb1
  // (a piece with the tile's first k block, not its last: the rest lies in lower blocks q while
  // start(q) <= this).
  LOWBIT_HD int64_t tile_last(int i1, int kb1) const { return j0 + (i1 - 1 - dp_n) + (nkb - 1 - kb1); }
};

// Checks the partition on the host, as the kernel walks it, for G blocks over tblocks x nrb tiles
// of nkb k blocks: every iteration covered once, one owner a tile, every parked partial added by
// that tile's owner, owners waiting only on lower blocks. Empty if it holds, else what failed.
std::string w4_sk_plan_check(int tblocks, int nrb, int nkb, int G);

// The K split of a grid of `tiles` tiles (the split-K kernels): a split of c is one thread block
// cluster of c blocks, which must share a GPC, so only active[log2 c] clusters run at once (0:
// not known, taken as all of them) and the time goes as waves x (k blocks a split) ~ waves / c.
// From s (the split wanted for bytes in flight) down to 2, the fewest waves / c, the fewer waves
// on a tie.
inline int split_for_waves(int s, int64_t tiles, const int (&active)[5]) {
  int best = s;
  int64_t best_waves = 0;
  for (int c = s; c >= 2; c /= 2) {
    int i = 0;
    while ((1 << i) < c) ++i;
    const int64_t fit = i < 5 ? active[i] : 0;
    const int64_t waves = fit > 0 ? (tiles + fit - 1) / fit : 1;
    if (c == s || waves * best < best_waves * c || (waves * best == best_waves * c && waves < best_waves)) {
      best = c;
      best_waves = waves;
    }
  }
  return best;
}

}  // namespace w4
}  // namespace cuda
}  // namespace lowbit
