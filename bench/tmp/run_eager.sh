set -u; export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
LOWBIT_CUDA=ON LOWBIT_CUDA_ARCHS=90a python3 -m pip install -q --no-build-isolation --no-deps . > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
el build
timeout 120 python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda_w4.py tests/test_nn.py -k "not tile_candidates" 2>&1 | tail -5; el tests
timeout 100 python3 bench/op_overhead.py --device cuda --reps 5000 2>&1 | tail -5; el overhead
timeout 60 python3 bench/tmp/diag_eager.py 2>&1 | grep -A12 "plans made" | head -40; el diag
timeout 200 python3 bench/mlp_decode.py --m 1 16 64 256 2>&1 | tail -14; el mlp
