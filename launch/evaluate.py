"""Test bits/dim of a run's latest checkpoint over the whole test split.

  python -m launch.evaluate --workdir=runs/mnist [--noise_draws=1]

Dequantization noise as in the paper (U[0, 1) per pixel), `--noise_draws` draws per image
(seeded: the same number as launch.train's metrics.json for the same draws and batch size).
"""

import json

from absl import app, flags

from launch import flags as launch_flags
from launch.common import fail_clearly, run_data
from tfp_realnvp import training
from tfp_realnvp.data import evaluation_batches

FLAGS = launch_flags.FLAGS


@fail_clearly
def main(argv):
  del argv
  model, run_config, step = training.restore_model(FLAGS.workdir)
  data = run_data(run_config)
  train_config = run_config['train']
  batch = train_config['batch_size'] * train_config['replicas']
  bits = training.evaluate_bits_per_dim(model, evaluation_batches(data, batch), FLAGS.noise_draws)
  print(json.dumps({'test_bits_per_dim': bits, 'step': step, 'noise_draws': FLAGS.noise_draws,
                    'dataset': data.name}))


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
