#!/usr/bin/env bash
# Short GPU check after a change: build, the w4 CUDA tests, the acceptance bench (int4, nf4) at
# the batch sizes MS (default 1 and 16, the decode sizes), and with MEMCHECK=1
# compute-sanitizer memcheck over the w4 kernel tests. CUDAFLAGS=-DLOWBIT_W4_TUNING builds the
# tile candidates too (the tests then check each). Logs under $OUT.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/lowbit-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
LOWBIT_CUDA=ON LOWBIT_CUDA_ARCHS="${LOWBIT_CUDA_ARCHS:-90a}" python3 -m pip install --no-build-isolation --no-deps -q . \
  >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
el build
. bench/peers.sh
timeout 90 python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda_w4.py 2>&1 | tail -4 | tee "$OUT/pytest_w4.log"
el pytest
timeout "${BENCH_S:-200}" python3 -m lowbit.bench --op int4 nf4 --shapes 4096x4096 14336x4096 4096x14336 28672x8192 \
  8192x28672 --m ${MS:-1 16} --budget "${BUDGET:-0.25}" --markdown "$OUT/bench_verify.md" --json "$OUT/bench_verify.json" \
  2>&1 | grep -v "^|" | cut -c1-190
el bench
if [ "${MEMCHECK:-0}" = 1 ]; then
  # Without torch's caching allocator memcheck sees every allocation's bounds.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${MEMCHECK_S:-150}" compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda_w4.py -k "${MEMCHECK_K:-not graphs}" >"$OUT/memcheck.log" 2>&1
  echo "memcheck exit $?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -2
  el memcheck
fi
