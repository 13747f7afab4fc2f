#!/usr/bin/env bash
# One GPU run for the Triton kernels (issue 4): build, compiled GPU tests, benchmarks, short table.
# Run from the repository root on the GPU machine; results go under $OUT (default /tmp/lowbit-out).
set -uo pipefail
export PYTHONUNBUFFERED=1 LOWBIT_CUDA=${LOWBIT_CUDA:-OFF} CMAKE_BUILD_PARALLEL_LEVEL=16 LOWBIT_BACKEND=triton
OUT=${OUT:-/tmp/lowbit-out}; mkdir -p "$OUT"
REPO=$(pwd)
SHAPES=${SHAPES:-"4096x4096 14336x4096 4096x14336 28672x8192 8192x28672"}
MS=${MS:-"1 16 256 2048"}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
cd /tmp
python3 -c "import torch, triton, lowbit; print(torch.__version__, triton.__version__); print(lowbit.info())" \
  > "$OUT/info.txt" 2>&1; tail -8 "$OUT/info.txt"
t0=$(date +%s)
# 1. compiled tests, in the background (4 workers)
(cd "$REPO" && LOWBIT_BACKEND= timeout 420 python3 -m pytest -m cuda tests/test_triton.py -q -n 4 -p no:cacheprovider \
   > "$OUT/tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/tests.log") &
# 2. warm Triton's compile cache for every candidate of every benchmark case, 4 processes in parallel
for op in int4 nf4 "ternary sparse24"; do
  (timeout 300 python3 -m lowbit.bench --op $op --shapes $SHAPES --m $MS --budget 0.001 > "$OUT/warm_${op// /_}.log" 2>&1) &
done
(timeout 300 python3 -m lowbit.bench --op kv8 kv4 --batch 1 32 --ctx 4096 --budget 0.001 > "$OUT/warm_kv.log" 2>&1) &
wait
echo "tests + warm-up: $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/tests.log"
# 3. the benchmark proper, alone on the GPU
python3 -m lowbit.bench --op int4 nf4 ternary sparse24 --shapes $SHAPES --m $MS --budget 0.3 \
  --markdown "$OUT/matmul.md" --json "$OUT/matmul.json" > "$OUT/matmul.log" 2>&1 || tail -20 "$OUT/matmul.log"
python3 -m lowbit.bench --op kv8 kv4 --batch 1 4 16 32 --ctx 4096 16384 32768 --budget 0.3 \
  --markdown "$OUT/kv.md" --json "$OUT/kv.json" > "$OUT/kv.log" 2>&1 || tail -20 "$OUT/kv.log"
echo "total: $(( $(date +%s) - t0 )) s"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
python3 "$REPO/bench/triton_summary.py" "$OUT/matmul.json" "$OUT/kv.json" | tee "$OUT/summary.txt"
