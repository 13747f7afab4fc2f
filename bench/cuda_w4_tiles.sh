#!/usr/bin/env bash
# One GPU run for the CUDA 4-bit kernels' medium/large-M tiles and the weight stream's L2
# policy: a tuning build (every tile candidate, sm_90a), the L2 A/B at M=1/16 (bench/l2_ab.sh,
# CUDA only), the CUDA tests of the 4-bit kernels (the wgmma candidates 6-8 in their own
# process, so that a fault there costs only their results) and the tile sweeps
# (bench/cuda_w4_sweep.py). Run from the repository root on the GPU machine; logs under $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/lowbit-out}; mkdir -p "$OUT"
export OUT CUDAFLAGS="${CUDAFLAGS:--DLOWBIT_W4_TUNING}"
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
SHAPES=${SHAPES:-4096x4096 14336x4096 4096x14336 28672x8192 8192x28672}
CUDA_OPS="int4 nf4" TRITON_OPS="" MS="${MS:-1 16}" timeout 270 bash bench/l2_ab.sh 2>&1 | tail -45; el "l2 a/b"
timeout 100 python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda_w4.py -k "not tile_candidates" 2>&1 \
  | tail -8 | tee "$OUT/pytest_w4.log"; el pytest
timeout 40 python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda_w4.py -k "tile_candidates" 2>&1 \
  | tail -12 | tee "$OUT/pytest_tiles.log"; el "pytest tiles"
timeout "${SWEEP_S:-80}" python3 bench/cuda_w4_sweep.py --formats int4 nf4 --m ${SWEEP_M:-32 64 128 256} --splits \
  --tiles 0 2 3 4 5 9 10 --budget 0.04 --shapes $SHAPES 2>&1 | tee "$OUT/tiles.log"; el sweep
timeout "${SWEEP_S:-80}" python3 bench/cuda_w4_sweep.py --formats int4 --m ${SWEEP_WG_M:-64 128 256 512 1024} --splits \
  --tiles 6 7 8 --budget 0.04 --shapes $SHAPES 2>&1 | tee "$OUT/tiles_wg.log"; el "sweep wgmma"
