#!/usr/bin/env bash
# Short GPU check after a host-side change: build, the w4 CUDA tests, the acceptance bench at
# M = 1 and 16 (the decode sizes). Logs under $OUT.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/lowbit-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOWBIT_CUDA=ON LOWBIT_CUDA_ARCHS="${LOWBIT_CUDA_ARCHS:-90a}" python3 -m pip install --no-build-isolation --no-deps -q . \
  >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
[ -n "${BNB_PATH:-}" ] && export PYTHONPATH="$BNB_PATH"
timeout 60 python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda_w4.py 2>&1 | tail -2
timeout 120 python3 -m lowbit.bench --op int4 nf4 --shapes 4096x4096 14336x4096 4096x14336 28672x8192 8192x28672 \
  --m 1 16 --budget 0.25 --markdown "$OUT/bench_verify.md" 2>&1 | grep -v "^|" | cut -c1-190
