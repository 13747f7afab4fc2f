#!/usr/bin/env bash
# One GPU run for the Triton kernels (issue 4): build, compiled GPU tests, host-overhead profile,
# benchmarks (eager = the official numbers; --graph = device time only), short tables.
# Run from the repository root on the GPU machine; everything lands in $OUT/results.tgz.
set -uo pipefail
export PYTHONUNBUFFERED=1 LOWBIT_CUDA=${LOWBIT_CUDA:-OFF} CMAKE_BUILD_PARALLEL_LEVEL=16 LOWBIT_BACKEND=triton
OUT=${OUT:-/tmp/lowbit-out}; R=/tmp/lowbit-results; mkdir -p "$OUT" "$R"
REPO=$(pwd)
SHAPES=${SHAPES:-"4096x4096 14336x4096 4096x14336 28672x8192 8192x28672"}
MS=${MS:-"1 16 256 2048"}
pack() { tar -czf "$OUT/results.tgz" -C "$R" . ; }
trap pack EXIT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$R/gpu.txt"
python3 -m pip install -q --no-build-isolation --no-deps . > "$R/build.log" 2>&1 || { tail -30 "$R/build.log"; exit 1; }
cd /tmp
python3 -c "import torch, triton, lowbit; print(torch.__version__, triton.__version__); print(lowbit.info())" > "$R/info.txt" 2>&1
t0=$(date +%s)
(cd "$REPO" && LOWBIT_BACKEND= timeout 400 python3 -m pytest -m cuda tests/test_triton.py -q -n 4 -p no:cacheprovider \
   > "$R/tests.log" 2>&1; echo "tests rc=$?" >> "$R/tests.log") &
for op in int4 nf4 "ternary sparse24"; do
  (timeout 300 python3 -m lowbit.bench --op $op --shapes $SHAPES --m $MS --budget 0.001 > "$R/warm_${op// /_}.log" 2>&1) &
done
(timeout 300 python3 -m lowbit.bench --op kv8 kv4 --batch 1 32 --ctx 4096 --budget 0.001 > "$R/warm_kv.log" 2>&1) &
wait
echo "tests + warm-up: $(( $(date +%s) - t0 )) s"; grep -E "passed|failed|rc=" "$R/tests.log" | tail -3
python3 "$REPO/bench/triton_host_profile.py" > "$R/host_profile.txt" 2>&1; head -14 "$R/host_profile.txt"
python3 -m lowbit.bench --op int4 nf4 ternary sparse24 --shapes $SHAPES --m $MS --budget 0.3 \
  --markdown "$R/matmul.md" --json "$R/matmul.json" > "$R/matmul.log" 2>&1 || tail -20 "$R/matmul.log"
python3 -m lowbit.bench --op kv8 kv4 --batch 1 4 16 32 --ctx 4096 16384 32768 --budget 0.3 \
  --markdown "$R/kv.md" --json "$R/kv.json" > "$R/kv.log" 2>&1 || tail -20 "$R/kv.log"
python3 -m lowbit.bench --graph --op int4 nf4 ternary sparse24 --shapes $SHAPES --m $MS --budget 0.2 \
  --json "$R/matmul_graph.json" > "$R/matmul_graph.log" 2>&1 || tail -20 "$R/matmul_graph.log"
python3 -m lowbit.bench --graph --op kv8 kv4 --batch 1 4 16 32 --ctx 4096 16384 32768 --budget 0.2 \
  --json "$R/kv_graph.json" > "$R/kv_graph.log" 2>&1 || tail -20 "$R/kv_graph.log"
echo "total: $(( $(date +%s) - t0 )) s"
python3 "$REPO/bench/triton_summary.py" "$R/matmul.json" "$R/kv.json" > "$R/summary.txt" 2>&1
python3 "$REPO/bench/triton_summary.py" "$R/matmul_graph.json" "$R/kv_graph.json" > "$R/summary_graph.txt" 2>&1
echo "== eager (official)"; cat "$R/summary.txt"
echo "== graph (device time)"; cat "$R/summary_graph.txt"
