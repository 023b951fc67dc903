"""`tfp_realnvp.benchmark` and `python -m launch.benchmark` on a tiny model."""

import json
import subprocess
import sys

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
       '--quality_budget=4', '--quality_every=2', f'--output={output}'],
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'train img/s' in result.stdout and 'test bits/dim' in result.stdout
  report = json.loads(output.read_text())
  figures, = report['results']
  assert figures['train_traces'] == 1  # no retracing after the first step
  assert 'dist.log_prob img/s' in result.stdout
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
  rows = report['quality']['rows']
  assert rows and rows[-1]['train_seconds'] >= 4
  assert all(0 < row['test_bits_per_dim'] < 20 for row in rows)


def test_benchmark_command_rejects_an_unknown_preset():
  from test_launch import in_process
  with in_process('benchmark', '--presets=nope', required=()) as result:
    assert result['code'] == 2 and "Unknown preset 'nope'" in result['err']
