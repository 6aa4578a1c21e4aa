#!/usr/bin/env bash
# A slice of the paper's protocol (mnist-paper) on the GPU machine, for a session of the device tool whose
# device time is not needed for .ci/gpu-session.sh. Resumes from the rows committed in
# data/results/mnist-paper/ (they travel with the tree): the runner skips every run that has a row.
#
#   TOPONEURO_COMMIT=<hash> STACK=<K> MINUTES=<M> bash .ci/gpu-experiment.sh     (device tool: timeout_s = 60 M + 60)
#
# Trains the pending runs in stacks of at most K (default 64) for at most M minutes (default 8); a run's row and
# curve are written when the run stops, so a stack cut by the time limit keeps its finished members (the
# others start again next session: a stack's checkpoint, weights, momentum and best weights per member (about
# 7 MB each for the mlp), is too large to come back). Everything but the checkpoints and the saved initialisations (drawn again, the same, from
# the seeds on the CPU) comes back as $OUT/mnist-paper.tar.gz; here:
#   tar -xzf <files_at>/mnist-paper.tar.gz -C data/results && toponeuro experiment report mnist-paper
# and commit data/results/mnist-paper with the device and the commit (the rows record both).
# CONFIG and DEVICE pick another shipped config and device (the smoke test: CONFIG=mnist-quick DEVICE=cpu).
if [ -d .whl ]; then  # the GPU machine: giotto-ph and ripser carried as wheels (see .ci/gpu-session.sh)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
: "${TOPONEURO_COMMIT:?set TOPONEURO_COMMIT to the commit being run (the copied tree has no .git)}"
stack=${STACK:-64}
minutes=${MINUTES:-8}
config=${CONFIG:-mnist-paper}  # CONFIG=mnist-quick DEVICE=cpu: a smoke test of this script on any machine
device=${DEVICE:-cuda}
work=$(mktemp -d)
[ -d data/results/$config ] && cp -r data/results/$config $work/
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/device.txt 2>&1
python3 -m toponeuro experiment run $config --out $work --dry-run | tee $OUT/session.log
timeout -k 10 $(( minutes * 60 )) python3 -m toponeuro experiment run $config --engine batched --device $device \
  --stack-size $stack --out $work --no-progress >> $OUT/session.log 2>&1
echo "run: rc=$? (124: stopped at the time limit; finished runs are kept)" | tee -a $OUT/session.log
python3 -m toponeuro experiment run $config --out $work --dry-run | tee -a $OUT/session.log
tar --exclude=checkpoints --exclude=init --exclude=.lock -czf $OUT/$config.tar.gz -C $work $config
ls -la $OUT
