#!/usr/bin/env bash
# One GPU run for the Triton kernels (issue 4): build, compiled GPU tests, host-overhead profile,
# benchmarks (eager = the official numbers; --graph = device time only), short tables.
# Run from the repository root on the GPU machine; tables and logs land in $OUT/results.tgz.
#   LOWBIT_CUDA=ON       also build the native CUDA kernels (their tests run too)
#   TESTS="tests/x.py"   the compiled tests to run ("" skips them)
#   OPS, SHAPES, MS      matmul benchmark selection; GRAPH_MS: M values of the --graph run ("" skips it)
#   KV=0                 skip the KV benchmarks
# A bitsandbytes build under .peers/ (carried) becomes the nf4 peer.
set -uo pipefail
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16 LOWBIT_CUDA=${LOWBIT_CUDA:-OFF} LOWBIT_CUDA_ARCHS=${LOWBIT_CUDA_ARCHS:-90a}
OUT=${OUT:-/tmp/lowbit-out}; R=/tmp/lowbit-results; mkdir -p "$OUT" "$R"
pack() { tar -czf "$OUT/results.tgz" -C "$R" . ; }
trap pack EXIT
REPO=$(pwd)
[ -d .peers ] && export PYTHONPATH=$REPO/.peers${PYTHONPATH:+:$PYTHONPATH}
OPS=${OPS:-"int4 nf4 ternary sparse24"}
SHAPES=${SHAPES:-"4096x4096 14336x4096 4096x14336 28672x8192 8192x28672"}
MS=${MS:-"1 16 256 2048"}
GRAPH_MS=${GRAPH_MS-"1 16"}
TESTS=${TESTS-tests/test_triton.py}
KV=${KV:-1}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$R/gpu.txt"
python3 -m pip install -q --no-build-isolation --no-deps . > "$R/build.log" 2>&1 || { tail -30 "$R/build.log"; exit 1; }
cd /tmp
python3 -c "import torch, triton, lowbit; print(torch.__version__, triton.__version__); print(lowbit.info())" > "$R/info.txt" 2>&1
export LOWBIT_BACKEND=triton
t0=$(date +%s)
if [ -n "$TESTS" ]; then
  (cd "$REPO" && LOWBIT_BACKEND= timeout 400 python3 -m pytest -m cuda $TESTS -q -n 4 -p no:cacheprovider \
     > "$R/tests.log" 2>&1; echo "tests rc=$?" >> "$R/tests.log") &
fi
for op in $OPS; do  # compile every kernel variant once (Triton's disk cache), in parallel with the tests
  (timeout 300 python3 -m lowbit.bench --op $op --shapes $SHAPES --m $MS --budget 0.001 > "$R/warm_$op.log" 2>&1) &
done
[ "$KV" = 1 ] && (timeout 300 python3 -m lowbit.bench --op kv8 kv4 --batch 1 32 --ctx 4096 --budget 0.001 > "$R/warm_kv.log" 2>&1) &
wait
echo "tests + warm-up: $(( $(date +%s) - t0 )) s"; [ -n "$TESTS" ] && grep -E "passed|failed|rc=" "$R/tests.log" | tail -3
python3 "$REPO/bench/triton_host_profile.py" > "$R/host_profile.txt" 2>&1; head -14 "$R/host_profile.txt"
python3 -m lowbit.bench --op $OPS --shapes $SHAPES --m $MS --budget 0.3 \
  --markdown "$R/matmul.md" --json "$R/matmul.json" > "$R/matmul.log" 2>&1 || tail -20 "$R/matmul.log"
J="$R/matmul.json"; JG=""
if [ "$KV" = 1 ]; then
  python3 -m lowbit.bench --op kv8 kv4 --batch 1 4 16 32 --ctx 4096 16384 32768 --budget 0.3 \
    --markdown "$R/kv.md" --json "$R/kv.json" > "$R/kv.log" 2>&1 || tail -20 "$R/kv.log"
  J="$J $R/kv.json"
fi
if [ -n "$GRAPH_MS" ]; then
  python3 -m lowbit.bench --graph --op $OPS --shapes $SHAPES --m $GRAPH_MS --budget 0.2 \
    --json "$R/matmul_graph.json" > "$R/matmul_graph.log" 2>&1 || tail -20 "$R/matmul_graph.log"
  JG="$R/matmul_graph.json"
fi
echo "total: $(( $(date +%s) - t0 )) s"
python3 "$REPO/bench/triton_summary.py" $J > "$R/summary.txt" 2>&1
echo "== eager (official)"; cat "$R/summary.txt"
if [ -n "$JG" ]; then
  python3 "$REPO/bench/triton_summary.py" $JG > "$R/summary_graph.txt" 2>&1
  echo "== graph (device time)"; cat "$R/summary_graph.txt"
fi
