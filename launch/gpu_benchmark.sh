#!/usr/bin/env bash
# The GPU check of issue 12, prepared to run whenever a GPU machine is available (meant to take
# under 10 minutes; so far dry-run on a CPU only):
# the cifar10 preset with bfloat16, on one GPU (with and without XLA) and on all of them, in one
# table.
#
#   bash launch/gpu_benchmark.sh [OUT_DIR]        (from the repository root)
#
# 1. launch.benchmark on one GPU: train, log_prob, sample, encode, decode images/s, first step,
#    peak memory (all measured in this run).
# 2. launch.train on CIFAR-sized generated images, one epoch: one GPU with and without XLA, and
#    all GPUs (MirroredStrategy; XLA runs on one device only): training images/s per GPU at the
#    same per-GPU batch.
# Environment: BATCH (per GPU, default 256), STEPS (timed training steps, default 200),
# EXTRA (flags for both, e.g. "--num_blocks=1" for a dry run on a CPU).
set -euo pipefail
OUT=${1:-${TMPDIR:-/tmp}/realnvp-gpu}
BATCH=${BATCH:-256}
STEPS=${STEPS:-200}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv 2>/dev/null || echo "no nvidia-smi"
GPUS=$(python -c "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))" 2>/dev/null)
echo "GPUs seen by TensorFlow: $GPUS"
python - "$OUT/cifar_sized.npz" "$BATCH" "$STEPS" "${GPUS:-0}" <<'PY'
import sys
import numpy as np
path, batch, steps, gpus = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), max(1, int(sys.argv[4]))
rng = np.random.default_rng(0)
train = rng.integers(0, 256, [batch * gpus * 2, 32, 32, 3], dtype=np.uint8)  # repeated by fit
np.savez(path, x_train=train, x_test=train[:batch])
PY
python -m launch.benchmark --presets=cifar10 --jit_compile --mixed_precision=bfloat16 \
  --batch_size="$BATCH" --steps=10 --quality_budget=0 --output="$OUT/benchmark.json" $EXTRA
# One GPU with and without XLA; all GPUs without it (XLA compiles the flow on one device only).
run() {
  python -m launch.train --workdir="$OUT/run-$1" --restart --dataset="npz:$OUT/cifar_sized.npz" \
    --preset=cifar10 --mixed_precision=bfloat16 --batch_size="$BATCH" --epochs=1 \
    --steps_per_epoch="$STEPS" --checkpoint_every_steps=0 --log_every_steps=50 "${@:2}" $EXTRA \
    || echo "launch.train $1 failed"
}
run one_device_xla --strategy=one_device --jit_compile
run one_device --strategy=one_device
run mirrored --strategy=mirrored
python - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
bench = json.load(open(os.path.join(out, 'benchmark.json')))['results'][0]
rows = [('launch.benchmark, 1 device', bench['train_images_per_second'], 1,
         bench['train_first_step_seconds'], bench['sample_images_per_second'],
         bench['log_prob_images_per_second'])]
for run in ('one_device_xla', 'one_device', 'mirrored'):
  path = os.path.join(out, f'run-{run}', 'metrics.json')
  if not os.path.exists(path):
    print(f'launch.train {run}: no metrics (it failed; see its output above)')
    continue
  metrics = json.load(open(path))
  rows.append((f'launch.train, {run}', metrics['images_per_second'], metrics['replicas'],
               None, None, None))
print('\ncifar10 preset, bfloat16, XLA where the run says so (launch.benchmark: XLA), batch per '
      'device', bench['batch_size'])
print(f'{"run":>30} {"devices":>8} {"train img/s":>12} {"per device":>11} {"first step s":>13} '
      f'{"sample img/s":>13} {"log_prob img/s":>15}')
fmt = lambda v, f: format(v, f) if v is not None else '-'
for name, speed, devices, first, sample, log_prob in rows:
  print(f'{name:>30} {devices:>8} {fmt(speed, ".1f"):>12} {fmt(speed / devices, ".1f"):>11} '
        f'{fmt(first, ".1f"):>13} {fmt(sample, ".1f"):>13} {fmt(log_prob, ".1f"):>15}')
PY
