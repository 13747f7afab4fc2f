#!/usr/bin/env bash
# One GPU session for the CUDA 4-bit kernels: build (sm_90a only, to save time), the CUDA
# tests, compute-sanitizer memcheck on a subset, the acceptance bench, the tuning sweep and
# the end-to-end MLP stack. Logs go to $OUT (default /tmp/lowbit-out); a short table last.
#   bash bench/cuda_w4_device.sh [quick]   (bitsandbytes: BNB_PATH or .whl/, see bench/peers.sh)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/lowbit-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3
step() { echo; echo "=== $* ($(date +%T))"; }
step gpu
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
step build
t0=$(date +%s)
LOWBIT_CUDA=ON LOWBIT_CUDA_ARCHS="${LOWBIT_CUDA_ARCHS:-90a}" $PY -m pip install --no-build-isolation --no-deps -q . \
  >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
. bench/peers.sh
$PY -c "import lowbit, json; i = lowbit.info(); print(json.dumps(i['native']['build'])[:300])"
$PY -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>&1 | tail -1
step "pytest -m cuda"
timeout 240 $PY -m pytest -m cuda -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/pytest.log" | tail -25
[ "${1:-}" = quick ] && exit 0
step bench
timeout 200 $PY -m lowbit.bench --op int4 nf4 --shapes 4096x4096 14336x4096 4096x14336 28672x8192 8192x28672 \
  --m 1 16 64 256 1024 4096 --budget 0.25 --markdown "$OUT/bench.md" 2>&1 | grep -v "^|" | tee "$OUT/bench.log"
step "bench, L2 flushed by reads"
LOWBIT_BENCH_FLUSH=read timeout 90 $PY -m lowbit.bench --op int4 nf4 \
  --shapes 4096x4096 14336x4096 4096x14336 28672x8192 8192x28672 --m 1 16 --budget 0.25 --markdown "$OUT/bench_read.md" \
  2>&1 | grep -v "^|" | tail -22
step sweep
timeout 60 $PY bench/cuda_w4_sweep.py --shapes 4096x4096 14336x4096 28672x8192 --m 128 192 256 --splits \
  2>&1 | tee "$OUT/sweep.log"
step mlp
timeout 90 $PY bench/mlp_decode.py 2>&1 | tee "$OUT/mlp.log"
step memcheck
# Without torch's caching allocator memcheck sees every allocation's bounds; CUDA graph capture
# then cannot allocate, so the capture tests run in a second pass with the allocator on.
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${MEMCHECK_S:-150}" compute-sanitizer --tool memcheck --error-exitcode 9 \
  $PY -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda_w4.py tests/test_native.py \
  -k "not graphs and not without_host_sync" >"$OUT/memcheck.log" 2>&1; echo "memcheck exit $?"
grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -2
timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 \
  $PY -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda_w4.py tests/test_native.py \
  -k "graphs or without_host_sync" >>"$OUT/memcheck.log" 2>&1; echo "memcheck (graphs) exit $?"
grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -2
step summary
grep -E "passed|failed" "$OUT/pytest.log" | tail -1
cat "$OUT/mlp.log" | tail -8
