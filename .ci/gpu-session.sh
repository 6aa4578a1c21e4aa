#!/usr/bin/env bash
# The script for a GPU session of the device tool (one H100/H200, 15 minutes of device time in all, the
# machine's start included). It expects the giotto-ph and ripser wheels for the GPU machine's Python in
# .whl/ (that machine has no network); on a machine with network access `pip install -e .` replaces the
# first line. Run it as `TOPONEURO_COMMIT=<hash> bash .ci/gpu-session.sh` (the copied tree has no .git)
# with timeout_s=540, so that results record their commit.
#
# At most 8 files come back from $OUT, so every step's output goes to one log, $OUT/session.log, and the
# results to $OUT/device.txt, $OUT/cuda/{results.json,timings.png} (-> data/bench/cuda),
# $OUT/engine-cuda/{results.json,throughput.png} (-> data/bench/engine-cuda) and $OUT/gpu.ipynb (-> book/gpu.ipynb,
# the GPU chapter with its outputs): seven files.
# Order: what matters most first, each step under its own timeout (at most 8 minutes in all):
#   1. the CUDA tests (the stack kernels of tests/test_persistence_batched.py, the tree path, the dense
#      baselines, the batched engine's members against lone runs), 110 s
#   2. the batched engine's throughput against the single engine on MNIST mlp with T1 on every neuron
#      (50 runs one epoch each; the single engine timed on 3 of them), and the whole grid estimated at the
#      epochs per run of the CPU subset trained to early stopping, 110 s
#   3. the bench: the MST backends, and T1, MinCorr and DeCov through TopologicalRegulariser against one
#      Z^T Z, up to n = 32768, 120 s
#   4. the GPU chapter, executed by .ci/execute_notebook.py (the machine has no Jupyter), 100 s
#   5. a stack of 16 matrices (n = 1024) in one call against a loop of single calls, 25 s
# TOPONEURO_SLOW=1 adds the n = 3000 agreement of the CUDA kernels with SciPy and Prim (marked slow, 60 s),
# TOPONEURO_TRITON_SWEEP=1 the Triton tile sweep (.ci/triton_sweep.py, 60 s), at the end.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
log=$OUT/session.log
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/device.txt; python3 -c "import torch, triton;print(torch.__version__, 'triton', triton.__version__)" >> $OUT/device.txt
t0=$(date +%s)

# step NAME SECONDS COMMAND...: the command's output appended to the log under a header, its tail printed
step() {
  local name=$1 limit=$2; shift 2
  echo "===== $name (limit ${limit}s, at $(( $(date +%s) - t0 ))s)" >> "$log"
  timeout -k 5 "$limit" "$@" >> "$log" 2>&1
  echo "===== $name: rc=$? at $(( $(date +%s) - t0 ))s" | tee -a "$log"
}

# -v: a test that hangs until the timeout is named by the log's last lines
step "cuda tests" 110 python3 -m pytest -v -k cuda tests/ -p no:cacheprovider
tail -4 "$log"
step "engine throughput" 110 python3 -m toponeuro bench-engine mnist-paper --networks mlp --methods t1 --epochs 1 --single-runs 3 --device cuda --epochs-from data/results/mnist-paper-cpu-subset --out $OUT/engine-cuda --force --no-progress
step "bench" 120 python3 -m toponeuro bench --devices cuda cpu --backends torch torch-graph giotto-ph --n 2048 8192 16384 32768 --repeats 9 --max-seconds-per-case 3 --out $OUT/cuda --force --no-progress
step "gpu chapter" 100 python3 .ci/execute_notebook.py book/gpu.ipynb --out $OUT/gpu.ipynb
step "stack timing" 25 python3 .ci/stack_timing.py --device cuda --B 16 --n 1024 --m 128 --repeats 9
if [ "${TOPONEURO_SLOW:-0}" = 1 ]; then
  step "n = 3000 tests" 60 python3 -m pytest -v -m slow -k "cuda and 3000" tests/test_persistence.py tests/test_persistence_triton.py tests/test_persistence_batched.py -p no:cacheprovider
fi
if [ "${TOPONEURO_TRITON_SWEEP:-0}" = 1 ]; then
  step "triton sweep" 60 python3 .ci/triton_sweep.py
fi
tail -40 "$log"
ls -la $OUT $OUT/cuda $OUT/engine-cuda
