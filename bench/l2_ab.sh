#!/usr/bin/env bash
# One GPU run that measures the L2 evict-first policy of the weight / KV streams: the probe
# (bench/l2_policy_probe.py), then the bench with the hint and without it (CUDA: on by default,
# LOWBIT_CUDA_W4_NO_L2_HINT=1 off; Triton: off by default, LOWBIT_TRITON_L2_HINT=1 on), each pair in back-to-back
# processes with the baselines timed in each. Run from the repository root on the GPU machine.
#   CUDA_OPS / TRITON_OPS   ops of each A/B ("" skips it); SHAPES, MS; KV=1 adds kv8/kv4 (Triton)
#   BUDGET                  seconds of timing per contender
# Logs and JSON under $OUT; a short summary of each run last.
set -u
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
OUT=${OUT:-/tmp/lowbit-out}; mkdir -p "$OUT"
SHAPES=${SHAPES:-"4096x4096 14336x4096 4096x14336 28672x8192 8192x28672"}
MS=${MS:-"1 16"}
CUDA_OPS=${CUDA_OPS-"int4 nf4"}
TRITON_OPS=${TRITON_OPS-"int4 nf4 ternary sparse24"}
BUDGET=${BUDGET:-0.1}
KV=${KV:-0}
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
REPO=$(pwd)
(LOWBIT_CUDA=${LOWBIT_CUDA:-ON} LOWBIT_CUDA_ARCHS=${LOWBIT_CUDA_ARCHS:-90a} \
  python3 -m pip install -q --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1
 echo "build rc=$?" >> "$OUT/build.log") &
timeout 150 python3 bench/l2_policy_probe.py 2>&1 | tee "$OUT/probe.txt"; el probe
cd /tmp
if [ -n "$TRITON_OPS" ]; then  # compile every Triton variant (disk cache) from the source tree meanwhile
  for hint in 1 0; do
    for op in $TRITON_OPS; do
      (if [ $hint = 1 ]; then export LOWBIT_TRITON_L2_HINT=1; fi
       PYTHONPATH=$REPO/python:$REPO LOWBIT_BACKEND=triton timeout 300 python3 -m lowbit.bench --op "$op" \
         --shapes $SHAPES --m $MS --budget 0.001 > "$OUT/warm_${op}_$hint.log" 2>&1) &
    done
  done
fi
wait; el "build + warm-up"; tail -1 "$OUT/build.log"
ab() {  # ab NAME BACKEND ENVVAR AT OPS...: ENVVAR=1 in the run with hint=AT (1 on, 0 off)
  local name=$1 backend=$2 var=$3 at=$4; shift 4
  for hint in 1 0; do
    if [ $hint = "$at" ]; then export "$var=1"; fi
    LOWBIT_BACKEND=$backend timeout 300 python3 -m lowbit.bench --op "$@" --shapes $SHAPES --m $MS \
      --budget "$BUDGET" --json "$OUT/${name}_hint$hint.json" > "$OUT/${name}_hint$hint.log" 2>&1
    unset "$var"; el "$name hint=$hint"
  done
}
[ -n "$CUDA_OPS" ] && ab cuda native LOWBIT_CUDA_W4_NO_L2_HINT 0 $CUDA_OPS
[ -n "$TRITON_OPS" ] && ab triton triton LOWBIT_TRITON_L2_HINT 1 $TRITON_OPS
if [ "$KV" = 1 ]; then
  for hint in 1 0; do
    if [ $hint = 1 ]; then export LOWBIT_TRITON_L2_HINT=1; fi
    LOWBIT_BACKEND=triton timeout 300 python3 -m lowbit.bench --op kv8 kv4 --batch 1 4 32 --ctx 4096 32768 \
      --budget "$BUDGET" --json "$OUT/kv_hint$hint.json" > "$OUT/kv_hint$hint.log" 2>&1
    unset LOWBIT_TRITON_L2_HINT; el "kv hint=$hint"
  done
fi
for f in "$OUT"/*_hint?.log; do echo "== $(basename "$f")"; grep -v "^|" "$f" | cut -c1-150; done
