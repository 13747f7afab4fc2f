#!/usr/bin/env bash
# One GPU run for the CUDA 4-bit kernels' tile candidates: a tuning build (every candidate,
# sm_90a), the CUDA tests of the 4-bit kernels (the candidates in their own process, so that a
# fault there costs only their results) and the sweeps (bench/cuda_w4_sweep.py): MMA_TILES
# (default: the M <= 16 candidates) at SWEEP_M, WG_TILES (the large-M wgmma candidates, for WG_FORMATS; default the stream-K
# ones) at SWEEP_WG_M. TILE_TEST_S bounds the candidate tests. L2AB=1 first runs the
# L2-policy A/B (bench/l2_ab.sh, CUDA only). Run from the repository root on the GPU machine;
# logs under $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/lowbit-out}; mkdir -p "$OUT"
export OUT CUDAFLAGS="${CUDAFLAGS:--DLOWBIT_W4_TUNING}"
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
SHAPES=${SHAPES:-4096x4096 14336x4096 4096x14336 28672x8192 8192x28672}
# STEPS picks the parts (a warm machine keeps the build between calls): build test mma wg, and
# (not by default) splits (every forced K split at SPLIT_M for SPLIT_FORMATS) and eager
# (bench/op_overhead.py and bench/mlp_decode.py at EAGER_M).
STEPS=" ${STEPS:-build test mma wg} "; has() { [[ "$STEPS" == *" $1 "* ]]; }
if [ "${L2AB:-0}" = 1 ]; then
  CUDA_OPS="int4 nf4" TRITON_OPS="" MS="${MS:-1 16}" timeout 270 bash bench/l2_ab.sh 2>&1 | tail -45; el "l2 a/b"
elif has build; then
  LOWBIT_CUDA=ON LOWBIT_CUDA_ARCHS="${LOWBIT_CUDA_ARCHS:-90a}" python3 -m pip install -q --no-build-isolation --no-deps . \
    > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  el build
fi
if has test; then
timeout 100 python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda_w4.py -k "not tile_candidates" 2>&1 \
  | tail -8 | tee "$OUT/pytest_w4.log"; el pytest
timeout ${TILE_TEST_S:-150} python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda_w4.py -k "tile_candidates" 2>&1 \
  | tail -12 | tee "$OUT/pytest_tiles.log"; el "pytest tiles"
fi
has mma && {
timeout "${SWEEP_S:-240}" python3 bench/cuda_w4_sweep.py --formats int4 nf4 --m ${SWEEP_M:-1 16 32 64 128 256} --splits \
  --tiles ${MMA_TILES:-0 14 37 38} --budget 0.03 --shapes $SHAPES 2>&1 | tee "$OUT/tiles.log"; el sweep; }
has wg && {
timeout "${SWEEP_S:-120}" python3 bench/cuda_w4_sweep.py --formats ${WG_FORMATS:-int4} --m ${SWEEP_WG_M:-64 256 1024} --splits \
  --tiles ${WG_TILES:-0 55 56 57} --budget 0.03 --shapes $SHAPES 2>&1 | tee "$OUT/tiles_wg.log"; el "sweep wgmma"; }
has splits && {
timeout "${SWEEP_S:-120}" python3 bench/cuda_w4_sweep.py --formats ${SPLIT_FORMATS:-int4 nf4} --m ${SPLIT_M:-1} \
  --splits 1 2 4 8 16 --budget 0.03 --shapes $SHAPES 2>&1 | tee "$OUT/splits.log"; el splits; }
has eager && {
timeout 120 python3 bench/op_overhead.py --device cuda --reps 2000 2>&1 | tee "$OUT/op_overhead.log"
timeout 240 python3 bench/mlp_decode.py --m ${EAGER_M:-1 16 64 256} 2>&1 | tee "$OUT/mlp_decode.log"; el eager; }
