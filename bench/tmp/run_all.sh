set -u; export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
SH="4096x4096 14336x4096 4096x14336 28672x8192 8192x28672"
CUDAFLAGS=-DLOWBIT_W4_TUNING LOWBIT_CUDA=ON LOWBIT_CUDA_ARCHS=90a python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
el build
timeout 100 python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda_w4.py tests/test_nn.py 2>&1 | tail -4; el tests
timeout 60 python3 bench/op_overhead.py --device cuda --reps 2000 2>&1 | tail -4; el overhead
timeout 100 python3 bench/mlp_decode.py --m 1 16 64 --steps 30 2>&1 | tail -11 | tee $OUT/mlp.txt; el mlp
timeout 50 python3 bench/cuda_w4_sweep.py --formats int4 nf4 --m 48 64 --splits --tiles 0 32 34 41 42 --budget 0.02 --shapes $SH 2>&1 | tee $OUT/tiles_m64.log; el sweep
timeout 40 python3 bench/cuda_w4_sweep.py --formats nf4 --m 1 16 --splits 1 2 4 8 16 --budget 0.02 --shapes $SH 2>&1 | tee $OUT/splits.log; el splits
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  timeout 120 python3 -m lowbit.bench --op nf4 --shapes $SH --m 1 16 64 256 --budget 0.05 --markdown $OUT/bench_nf4_bnb.md 2>&1 | grep -v "^|" | cut -c1-200; el "nf4 vs bnb"
fi
