"""`tfp_realnvp.benchmark` and `python -m launch.benchmark` on a tiny model."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import tfp_realnvp as rn
from tfp_realnvp import benchmark


def test_convolutions_are_read_from_every_coupling_network():
  # 2 scales: 3 checkerboard couplings on 8x8x1 (4 features), 3 channel couplings on 4x4x4
  # (twice the features: 8), 4 checkerboard couplings on 4x4x2 (the next scale: 8); each
  # network: conv in (one more input channel: the mask), 2 convs per block, conv out.
  model = rn.RealNVP(rn.RealNVPConfig((8, 8, 1), num_scales=2, num_blocks=1, num_filters=4))
  shapes = benchmark.convolutions(model, batch_size=5)
  assert len(shapes) == 10 * 4
  assert shapes[:4] == [((5, 8, 8, 2), (3, 3, 2, 4), (5, 8, 8, 4)),
                        ((5, 8, 8, 4), (3, 3, 4, 4), (5, 8, 8, 4)),
                        ((5, 8, 8, 4), (3, 3, 4, 4), (5, 8, 8, 4)),
                        ((5, 8, 8, 4), (3, 3, 4, 2), (5, 8, 8, 2))]
  assert shapes[12] == ((5, 4, 4, 5), (3, 3, 5, 8), (5, 4, 4, 8))
  assert shapes[-1] == ((5, 4, 4, 8), (3, 3, 8, 4), (5, 4, 4, 4))
  # conv in of the first network: 2 FLOPs per multiply-add, 3x3x2 inputs, 5x8x8x4 outputs.
  assert benchmark.convolution_flops(shapes[:1]) == 2 * 3 * 3 * 2 * 5 * 8 * 8 * 4


def test_benchmark_command_reports_every_figure(tmp_path):
  output = tmp_path / 'benchmark.json'
  result = subprocess.run(
      [sys.executable, '-m', 'launch.benchmark', '--presets=mnist', '--num_scales=2',
       '--num_blocks=1', '--num_filters=4', '--batch_size=16', '--steps=2',
       '--precisions=bfloat16', '--quality_budget=4', '--quality_every=2',
       '--quality_layers=class_conditional', f'--output={output}'],
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'train img/s' in result.stdout and 'test bits/dim' in result.stdout
  report = json.loads(output.read_text())
  figures, = report['results']  # one precision (each runs the same code in its own process)
  assert figures['precision'] == 'bfloat16'
  # A measurement in a process of its own (memory and first step from nothing).
  assert figures['process_id'] != os.getpid()
  assert figures['train_traces'] == 1  # no retracing after the first step
  assert 'dist.log_prob img/s' in result.stdout
  # Nothing about the port unless this run measured it.
  assert 'PyTorch' not in result.stdout and 'the port' not in result.stdout \
      and 'pytorch_port' not in report
  for key in ('train_images_per_second', 'log_prob_images_per_second',
              'distribution_log_prob_images_per_second', 'distribution_log_prob_speed_ratio',
              'sample_images_per_second', 'encode_images_per_second',
              'decode_images_per_second', 'input_pipeline_images_per_second',
              'train_flops_per_second', 'convolutions_alone_flops_per_second',
              'networks_alone_step_seconds', 'peak_rss_bytes', 'train_peak_rss_bytes',
              'train_first_step_seconds'):
    assert figures[key] > 0, key
  assert figures['convolutions'] == 10 * 4
  assert figures['train_first_step_seconds'] > figures['train_step_seconds']
  assert report['quality'] == report['quality_by_layers']['class_conditional']  # the first
  conditional = report['quality_by_layers']['class_conditional']
  assert conditional['config']['num_classes'] == 10
  assert 0 <= conditional['test_accuracy'] <= 1 and conditional['test_marginal_bits_per_dim'] > 0
  with Image.open(conditional['class_grid']) as grid:  # a row of 10 samples per digit
    assert grid.size == (10 * 29 + 1, 10 * 29 + 1)
  assert "Bayes' test accuracy" in result.stdout
  for quality in report['quality_by_layers'].values():
    rows = quality['rows']
    assert rows and rows[-1]['train_seconds'] >= 4
    assert all(0 < row['test_bits_per_dim'] < 20 for row in rows)


def test_benchmark_command_rejects_unknown_quality_layers():
  from test_launch import in_process
  with in_process('benchmark', '--quality_layers=paper,glu', required=()) as result:
    assert result['code'] != 0 and '--quality_layers: unknown glu' in result['err']


def test_benchmark_command_rejects_an_unknown_preset():
  from test_launch import in_process
  with in_process('benchmark', '--presets=nope', required=()) as result:
    assert result['code'] == 2 and "Unknown preset 'nope'" in result['err']


STUB_PORT = r"""
import argparse, json
p = argparse.ArgumentParser()
for name in ('--config', '--mode', '--batch_size', '--warmup', '--steps', '--out'):
  p.add_argument(name)
a = p.parse_args()
speed = {'train': 4.0, 'eval': 16.0, 'sample': 8.0}[a.mode]
import time
block = b'x' * (300 * 2**20)  # 300 MiB resident for a while: the port's memory
time.sleep(0.5)
print(f'[{a.config}/{a.mode}] step 0 warmup 20.000s  val=1')
json.dump({'images_per_s_median': speed, 'peak_rss_mib': 4096.0, 'config': a.config,
           'batch_size': int(a.batch_size)}, open(a.out, 'w'))
"""


def test_the_port_is_compared_only_as_measured_in_the_same_run(tmp_path):
  from absl.testing import flagsaver
  from launch import benchmark as command
  from tfp_realnvp import presets
  stub = tmp_path / 'peer_bench.py'
  stub.write_text(STUB_PORT)
  ours = {'preset': 'cifar10', 'config': presets.get('cifar10').to_dict(), 'batch_size': 64,
          'jit_compile': False, 'precision': 'float32', 'train_images_per_second': 6.0, 'sample_images_per_second': 16.0,
          'log_prob_images_per_second': 20.0, 'train_peak_rss_bytes': 2 * 2**30,
          'train_first_step_seconds': 30.0}
  other = {**ours, 'preset': 'imagenet32', 'config': presets.get('imagenet32').to_dict()}
  bfloat16 = {**ours, 'precision': 'bfloat16', 'train_images_per_second': 10.0}
  runs = tmp_path / 'runs.txt'
  stub.write_text(STUB_PORT + f'open({str(runs)!r}, "a").write(a.mode + "\\n")\n')
  with flagsaver.flagsaver():
    command.FLAGS([sys.argv[0], f'--peer_bench={stub}', f'--peer_realnvp={tmp_path}',
                   f'--peer_python={sys.executable}', '--steps=1'])
    # the port has no imagenet32; bfloat16 is compared with the same float32 port run
    comparison, mixed = command.compare_with_port([ours, other, bfloat16])
  assert runs.read_text().split() == ['train', 'eval', 'sample']
  assert mixed['precision'] == 'bfloat16' and mixed['rows'][0]['ratio'] == pytest.approx(2.5)
  assert comparison['port_config'] == 'cifar32'
  ratios = {row['figure']: row['ratio'] for row in comparison['rows']}
  memory = ratios.pop('train peak memory GiB')
  assert ratios == pytest.approx({'train images/s': 1.5, 'sample images/s': 2.0,
                                  'log_prob images/s (port: eval)': 1.25, 'first step s': 1.5})
  # The port's memory is sampled from outside (300 MiB and the interpreter), not the harness'
  # ru_maxrss (4 GiB here; for real, it also counts the process that started the harness).
  port_train_gib = 2. / memory
  assert 300 / 1024 < port_train_gib < 0.6, port_train_gib
  assert comparison['port']['train']['harness_peak_rss_bytes'] == 4 * 2**30


def _synchronized_batch_norms(model):
  """`(in the networks, in the flow)`: the batch norms of the coupling networks (each before a
  convolution) and the flow's batch-norm layers."""
  from tfp_realnvp.bijectors.batch_norm import BatchStatistics
  from tfp_realnvp.nets import BatchNormalization, ResidualBlocks
  layers = list(model._flatten_layers())
  networks = sum(isinstance(layer, BatchNormalization) +
                 (2 * layer.num_blocks if isinstance(layer, ResidualBlocks) else 0)
                 for layer in layers)
  return networks, sum(isinstance(layer, BatchStatistics) for layer in layers)


def test_two_replicas_all_reduce_the_gradient_once_per_step():
  import tensorflow as tf
  config = rn.RealNVPConfig((8, 8, 1), num_scales=1, num_blocks=1, num_filters=4)
  devices = [d.name for d in tf.config.list_logical_devices('CPU')]
  lines = []
  one, two = benchmark.replica_scaling(config, devices, benchmark.Options(batch_size=8, steps=1),
                                       report=lines.append)
  assert one['replicas'] == 1 and two['replicas'] == 2
  assert one['collective_ops_per_step'] == {'gradient': 0, 'batch_norm': 0, 'other': 0}
  # One all-reduce of the whole gradient (clipping after it, not before a second one); per
  # synchronized batch norm, the sums (with the count) and the squared deviations forward, and
  # backward one all-reduce in the flow (its two sums together) and two in the networks
  # (autodiff's).
  networks, flow = _synchronized_batch_norms(rn.RealNVP(config))
  assert (networks, flow) == (4 * 3, 4)  # 4 couplings: 3 in each network (1 block), 1 after
  assert two['collective_ops_per_step'] == {'gradient': 1, 'batch_norm': 4 * networks + 3 * flow,
                                            'other': 0}
  assert two['train_images_per_second'] > 0 and two['speedup'] > 0
  assert any('1 for the gradient, 60 for the synchronized batch norms' in line for line in lines)


def test_benchmark_replicas_with_xla_are_refused_before_measuring():
  from test_launch import in_process
  with in_process('benchmark', '--presets=mnist', '--replicas=2', '--jit_compile',
                  required=()) as result:
    assert result['code'] == 2
    assert result['err'].strip().endswith('--jit_compile runs on one replica, not 2: drop '
                                          '--jit_compile, or train on one device '
                                          '(--strategy=one_device).')


def test_benchmark_replicas_need_the_devices():
  from test_launch import in_process
  with in_process('benchmark', '--presets=mnist', '--replicas=3', required=()) as result:
    assert result['code'] == 2
    assert result['err'].strip().endswith('--replicas=3 needs 3 devices, this machine has 2; on '
                                          'a CPU, add --cpu_devices=3.')


def test_each_measurement_process_has_exited_before_the_next_starts():
  from absl.testing import flagsaver
  from launch import benchmark as command
  config = rn.RealNVPConfig((8, 8, 1), num_scales=1, num_blocks=1, num_filters=4)
  with flagsaver.flagsaver():
    command.FLAGS([sys.argv[0]])
    figures = command.in_own_process('measure', 'tiny', config, benchmark.Options(8, 1))
  assert figures['process_id'] != os.getpid() and figures['train_images_per_second'] > 0
  # Gone, not still exiting (its exit overlapped the next measurement's first step).
  with pytest.raises(ProcessLookupError):
    os.kill(figures['process_id'], 0)
