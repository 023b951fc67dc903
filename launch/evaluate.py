"""Test bits/dim of a run's latest checkpoint over the whole test split.

  python -m launch.evaluate --workdir=runs/mnist [--noise_draws=1]

Dequantization noise as in the paper (U[0, 1) per pixel), `--noise_draws` draws per image
(seeded: the same number as launch.train's metrics.json for the same draws and batch size).
Prints progress, then one JSON line: test bits/dim, step, noise draws, dataset. For a
class-conditional model: the bits/dim of p(x | y) given the test labels, and Bayes' classifier
(argmax_y log p(x | y) + log p(y)): its test accuracy, and the bits/dim of the class mixture p(x).
"""

import json

from launch import common
from launch import flags as launch_flags
from tfp_realnvp import training
from tfp_realnvp.data import evaluation_batches

FLAGS = launch_flags.FLAGS
launch_flags.define_workdir()
launch_flags.define_data_dir()
launch_flags.define_noise_draws()


def main(argv):
  del argv
  model, run_config, step = training.restore_model(FLAGS.workdir)
  data = common.run_data(run_config)
  train_config = run_config['train']
  missing = [k for k in ('batch_size', 'replicas') if k not in train_config]
  if missing:
    raise training.RunError(f'{FLAGS.workdir}/config.json: the train section lacks {missing}.')
  batch = train_config['batch_size'] * train_config['replicas']
  common.say(f'launch.evaluate: {model.name} ({model.count_params():,} parameters) at step '
             f'{step} of {FLAGS.workdir}; {data.name}, {data.num_test or "?"} test images, '
             f'{FLAGS.noise_draws} noise draw(s) each')
  progress = training.Progress('evaluate', data.num_test)
  bits = training.evaluate_bits_per_dim(model, evaluation_batches(data, batch), FLAGS.noise_draws,
                                        progress=progress)
  result = {'test_bits_per_dim': bits, 'step': step, 'noise_draws': FLAGS.noise_draws,
            'dataset': data.name}
  if model.num_classes:
    classifier = training.evaluate_classifier(model, evaluation_batches(data, batch),
                                              progress=training.Progress('classify',
                                                                         data.num_test))
    result.update(num_classes=model.num_classes, test_accuracy=classifier['accuracy'],
                  test_marginal_bits_per_dim=classifier['marginal_bits_per_dim'])
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  common.run(main, required=['workdir'])
