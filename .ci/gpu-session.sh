#!/usr/bin/env bash
# The script for a GPU session of the device tool (one H100/H200, 15 minutes in all). It expects the
# giotto-ph and ripser wheels for the GPU machine's Python in .whl/ (that machine has no network) and
# writes logs and a tarball of the results to $OUT. On a machine with network access,
# `pip install -e .` replaces the first line. Run it as `TOPONEURO_COMMIT=<hash> bash .ci/gpu-session.sh`
# (the copied tree has no .git) so that results record their commit.
# data/bench/cuda was measured on the tree of 1a5332b (which added it), before the one-sync-per-round Boruvka and before the
# torch-graph backend existed. Every shipped experiment is complete, so the session goes to the CUDA
# tests (about 2 minutes, then the n = 3000 ones) and the bench (up to 4.5 minutes); results come back as a
# tarball. Worst case about 9.5 minutes: run it with timeout_s=600, naming the card (kind) the README's table is for.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/device.txt; python3 -c "import torch;print(torch.__version__)" >> $OUT/device.txt
t0=$(date +%s)
# the Triton Boruvka's tiles, timed and checked against Prim's edges on the bench's matrices
timeout -k 5 90 python3 .ci/triton_sweep.py > $OUT/triton_sweep.log 2>&1; cat $OUT/triton_sweep.log | tail -30
echo "sweep done at $(( $(date +%s) - t0 ))s"
# -v: a test that hangs until the timeout is named by the log's last line
timeout -k 5 180 python3 -m pytest -v -k cuda tests/ -p no:cacheprovider > $OUT/cuda_tests.log 2>&1; tail -6 $OUT/cuda_tests.log
echo "tests done at $(( $(date +%s) - t0 ))s"
# the n = 3000 agreement of the CUDA kernels with SciPy (marked slow, so not in the run above)
timeout -k 5 90 python3 -m pytest -v -m slow -k "cuda and 3000" tests/test_persistence.py tests/test_persistence_triton.py -p no:cacheprovider > $OUT/cuda_tests_n3000.log 2>&1; tail -3 $OUT/cuda_tests_n3000.log
echo "n = 3000 tests done at $(( $(date +%s) - t0 ))s"
rm -f data/bench/cuda/*  # the last session's results must not come back as this one's
timeout -k 5 270 python3 -m toponeuro bench --devices cuda cpu --backends torch torch-graph giotto-ph --n 2048 8192 16384 32768 --repeats 9 --max-seconds-per-case 3 --out data/bench/cuda --no-progress > $OUT/bench.log 2>&1; tail -30 $OUT/bench.log
echo "bench done at $(( $(date +%s) - t0 ))s"
cp $OUT/device.txt $OUT/cuda_tests.log $OUT/cuda_tests_n3000.log $OUT/triton_sweep.log data/bench/cuda/
tar czf $OUT/bench.tgz data/bench/cuda
ls -la $OUT
