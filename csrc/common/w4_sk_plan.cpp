// Host check of the CUDA large-M kernel's stream-K partition (see w4_sk_plan.h).
#include "w4_sk_plan.h"

#include <string>
#include <vector>

namespace lowbit {
namespace cuda {
namespace w4 {

std::string w4_sk_plan_check(int tblocks, int nrb, int nkb, int G) {
  if (tblocks < 1 || nrb < 1 || nkb < 1 || G < 1) return "every count must be >= 1";
  const int64_t tiles = int64_t{tblocks} * nrb;
  if (G > tiles * nkb || tiles * nkb > (int64_t{1} << 24)) return "G above the iterations (the launcher caps it), or too large to check";
  auto at = [&](const char* what, int b, int tile) {
    return std::string(what) + " (block " + std::to_string(b) + ", tile " + std::to_string(tile) + ")";
  };
  std::vector<int> cover(static_cast<size_t>(tiles * nkb), 0);
  struct Park {
    int tile = -1, k0 = 0, k1 = 0;
    bool used = false;
  };
  std::vector<Park> park(static_cast<size_t>(G));
  std::vector<char> owned(static_cast<size_t>(tiles), 0);
  // Blocks in order: a tile's parked pieces (in lower blocks) are known when its owner is met.
  for (int b = 0; b < G; ++b) {
    const SkPlan sk(tblocks, nrb, nkb, G, b);
    for (int i = 0; i < sk.nk;) {  // the pieces, as w4_ws_kernel's consumers walk them
      int kb, tt, rb;
      sk.coords(i, kb, tt, rb);
      const int tile = rb * tblocks + tt, i1 = sk.piece_end(i, kb), kb1 = kb + (i1 - 1 - i);
      if (tt < 0 || tt >= tblocks || rb < 0 || rb >= nrb) return at("tile out of range", b, tile);
      for (int ii = i; ii < i1; ++ii) {
        int k2, t2, r2;
        sk.coords(ii, k2, t2, r2);
        if (t2 != tt || r2 != rb || k2 != kb + (ii - i)) return at("a piece leaves its tile", b, tile);
        ++cover[static_cast<size_t>(int64_t{tile} * nkb + k2)];
      }
      if (kb != 0) {  // sk_tile_end parks it: only ever the block's first split piece
        if (i != sk.dp_n) return at("a piece without its tile's first k block is not the first split piece", b, tile);
        park[static_cast<size_t>(b)] = Park{tile, kb, kb1, false};
      } else {  // the owner: the lower blocks it waits for, as sk_tile_end finds them
        if (owned[static_cast<size_t>(tile)]++) return at("two owners", b, tile);
        int cov = kb1;
        if (kb1 != nkb - 1) {
          const int64_t last = sk.tile_last(i1, kb1);
          for (int q = b - 1; q >= 0 && sk.start(q) <= last; --q) {
            if (!sk.holds(q)) continue;
            Park& pq = park[static_cast<size_t>(q)];
            if (pq.tile != tile || pq.k0 != cov + 1 || pq.used) return at("a waited-for block holds no next piece", b, tile);
            pq.used = true;
            cov = pq.k1;
          }
        }
        if (cov != nkb - 1) return at("the owner's pieces do not reach the last k block", b, tile);
      }
      i = i1;
    }
  }
  for (size_t e = 0; e < cover.size(); ++e) {
    if (cover[e] != 1) return "iteration " + std::to_string(e) + " covered " + std::to_string(cover[e]) + " times";
  }
  for (int b = 0; b < G; ++b) {
    if (park[static_cast<size_t>(b)].tile >= 0 && !park[static_cast<size_t>(b)].used) return at("a parked piece nobody adds", b, park[static_cast<size_t>(b)].tile);
  }
  return std::string();
}

}  // namespace w4
}  // namespace cuda
}  // namespace lowbit
