#!/usr/bin/env bash
# The script for a GPU session of the device tool (one H100/H200, 15 minutes in all). It expects the
# giotto-ph and ripser wheels for the GPU machine's Python in .whl/ (that machine has no network) and
# writes logs and the bench's results to $OUT (results.json and timings.png under $OUT/cuda, to be
# copied into data/bench/cuda). On a machine with network access, `pip install -e .` replaces the
# first line. Run it as `TOPONEURO_COMMIT=<hash> bash .ci/gpu-session.sh` (the copied tree has no .git)
# so that results record their commit, with timeout_s=430, naming the card (kind) the README's table is for.
# Order: what matters most first, each step under its own timeout (at most 7 minutes in all): the Triton
# tile sweep with its check against Prim (about 25 s), the bench (about 70 s), the CUDA tests (about
# 25 s; tests/test_persistence_batched.py's stacks among them), then the n = 3000 CUDA tests (about
# 80 s), then the timing of a stack against a loop (.ci/stack_timing.py, about 15 s), then the batched
# engine's CUDA test and throughput (not yet timed on a GPU: at most 3.5 minutes by their timeouts; the
# whole script then needs timeout_s=600).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/device.txt; python3 -c "import torch, triton;print(torch.__version__, 'triton', triton.__version__)" >> $OUT/device.txt
t0=$(date +%s)
# the Triton Boruvka's tiles, timed and checked against Prim's edges on the bench's matrices
timeout -k 5 60 python3 .ci/triton_sweep.py > $OUT/triton_sweep.log 2>&1; tail -20 $OUT/triton_sweep.log
echo "sweep done at $(( $(date +%s) - t0 ))s"
timeout -k 5 150 python3 -m toponeuro bench --devices cuda cpu --backends torch torch-graph giotto-ph --n 2048 8192 16384 32768 --repeats 9 --max-seconds-per-case 3 --out $OUT/cuda --no-progress > $OUT/bench.log 2>&1; tail -32 $OUT/bench.log
echo "bench done at $(( $(date +%s) - t0 ))s"
# -v: a test that hangs until the timeout is named by the log's last line
timeout -k 5 90 python3 -m pytest -v -k cuda tests/ -p no:cacheprovider > $OUT/cuda_tests.log 2>&1; tail -6 $OUT/cuda_tests.log
echo "tests done at $(( $(date +%s) - t0 ))s"
# the n = 3000 agreement of the CUDA kernels with SciPy and Prim (marked slow, so not in the run above)
timeout -k 5 90 python3 -m pytest -v -m slow -k "cuda and 3000" tests/test_persistence.py tests/test_persistence_triton.py tests/test_persistence_batched.py -p no:cacheprovider > $OUT/cuda_tests_n3000.log 2>&1; tail -3 $OUT/cuda_tests_n3000.log
echo "n = 3000 tests done at $(( $(date +%s) - t0 ))s"
# a stack of 16 matrices (n = 1024) in one call against a loop of single calls (about 15 s)
timeout -k 5 30 python3 .ci/stack_timing.py --device cuda --B 16 --n 1024 --m 128 --repeats 9 > $OUT/stack_timing.log 2>&1; cat $OUT/stack_timing.log
echo "stack timing done at $(( $(date +%s) - t0 ))s"
# the batched engine: its CUDA test (a stack's members against the same runs trained alone), then its
# throughput against the single engine on MNIST mlp with T1 on every neuron (50 runs, one epoch each; the
# single engine timed on 3 of them). Results: $OUT/engine-cuda/results.json and throughput.png
timeout -k 5 60 python3 -m pytest -v -m cuda tests/test_ensemble.py -p no:cacheprovider > $OUT/ensemble_cuda_tests.log 2>&1; tail -3 $OUT/ensemble_cuda_tests.log
timeout -k 5 150 python3 -m toponeuro bench-engine mnist-paper --networks mlp --methods t1 --epochs 1 --single-runs 3 --device cuda --out $OUT/engine-cuda --force --no-progress > $OUT/engine-cuda.log 2>&1; tail -4 $OUT/engine-cuda.log
echo "batched engine done at $(( $(date +%s) - t0 ))s"
ls -la $OUT $OUT/cuda
