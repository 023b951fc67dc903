"""The launcher end to end, in real processes: train, evaluate, sample, score, resume after
SIGKILL, and clear errors (several workers: test_clusters). Data: scikit-learn's 8x8 digits (real, shipped)."""

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import flags as absl_flags
from absl.testing import flagsaver
from PIL import Image

from tfp_realnvp import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One scale (4 couplings): the launcher's lifecycle, not the flow (tested in the library's
# tests), at a third less tracing than two scales.
SMALL = ['--preset=mnist', '--num_scales=1', '--num_blocks=1', '--num_filters=8',
         '--batch_size=32']


def launch(command, *args, env=None, timeout=600):
  return subprocess.run([sys.executable, '-m', f'launch.{command}', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})


def ok(result):
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@contextlib.contextmanager
def in_process(module, *args, required=('workdir',)):
  """Runs a launcher command's main in this process, as `python -m` would (its flag parsing and
  error handling) but without a new interpreter's start-up; yields the exit code and the
  captured stdout and stderr. Every command's flags are defined here: which flags a command
  accepts is for `launch` (a real process) to test."""
  import importlib
  from launch import common
  command = importlib.import_module(f'launch.{module}')
  out, err, result = io.StringIO(), io.StringIO(), {}
  with flagsaver.flagsaver(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      argv = common._parser(required)([f'launch.{module}', *args])
      common.fail_clearly(command.main)(argv)
      result['code'] = 0
    except SystemExit as e:
      result['code'] = e.code
    finally:
      # an in-process train keeps its workdir lock: release it
      for lock in training.workdir._held_locks:
        lock.close()
      training.workdir._held_locks.clear()
  result.update(out=out.getvalue(), err=err.getvalue())
  yield result


def ok_in_process(module, *args):
  """`in_process` of a command that must succeed; returns its result."""
  with in_process(module, *args) as result:
    assert result['code'] == 0, result['err'][-3000:]
  return result


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
  from sklearn.datasets import load_digits
  images = np.round(load_digits().images * 255 / 16).astype(np.uint8)[..., None]
  path = tmp_path_factory.mktemp('data') / 'digits.npz'
  np.savez(path, x_train=images[:1500], x_test=images[1500:])
  return f'npz:{path}', images


@pytest.fixture(scope='module')
def trained(digits, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  ok(launch('train', f'--workdir={workdir}', f'--dataset={digits[0]}', *SMALL, '--epochs=3',
            '--steps_per_epoch=100', '--checkpoint_every_steps=100'))
  return workdir


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.json')) as f:
    return json.load(f)


def test_train_writes_metrics_config_samples_and_logs(trained):
  metrics = _metrics(trained)
  print(f'digits: test bits/dim {metrics["test_bits_per_dim"]:.3f} after {metrics["steps"]} steps')
  assert metrics['steps'] == 300 and metrics['images_per_second'] > 0
  assert metrics['test_bits_per_dim'] < 6.0  # an untrained model gives about 8.6
  with open(os.path.join(trained, 'config.json')) as f:
    config = json.load(f)
  assert config['model']['num_filters'] == 8 and config['model']['image_shape'] == [8, 8, 1]
  assert Image.open(os.path.join(trained, 'samples.png')).size == (8 * 9 + 1, 8 * 9 + 1)
  for logs in ('train', 'validation', 'test', 'images'):
    assert any(f.startswith('events.out') for f in os.listdir(os.path.join(trained, 'logs', logs)))


def test_evaluate_reproduces_the_training_runs_test_bits_per_dim(trained):
  result = json.loads(ok_in_process('evaluate', f'--workdir={trained}')['out'].strip().splitlines()[-1])
  assert result['step'] == 300
  assert result['test_bits_per_dim'] == pytest.approx(_metrics(trained)['test_bits_per_dim'],
                                                      abs=1e-6)


def test_sample_grid_and_interpolation_pngs(trained, tmp_path):
  ok_in_process('sample', f'--workdir={trained}', '--num=16', '--temperature=0.7',
                f'--out={tmp_path}/grid.png')
  assert Image.open(tmp_path / 'grid.png').size == (4 * 9 + 1, 4 * 9 + 1)
  ok_in_process('sample', f'--workdir={trained}', '--interpolate', '--grid_size=5',
                f'--out={tmp_path}/manifold.png')
  assert Image.open(tmp_path / 'manifold.png').size == (5 * 9 + 1, 5 * 9 + 1)


def test_score_ranks_noise_below_digits(trained, digits, tmp_path):
  noise = np.random.default_rng(0).integers(0, 256, [3, 8, 8, 1], dtype=np.uint8)
  np.save(tmp_path / 'mixed.npy', np.concatenate([digits[1][1500:1510], noise]))
  ok_in_process('score', f'--workdir={trained}', f'--images={tmp_path}/mixed.npy',
                f'--out={tmp_path}/scores.csv')
  with open(tmp_path / 'scores.csv') as f:
    bits = [float(row['bits_per_dim']) for row in csv.DictReader(f)]
  assert len(bits) == 13
  assert min(bits[10:]) > max(bits[:10])  # noise is out of distribution
  ok_in_process('score', f'--workdir={trained}', f'--images={tmp_path}/mixed.npy',
                f'--out={tmp_path}/scores.json')
  with open(tmp_path / 'scores.json') as f:
    assert [row['bits_per_dim'] for row in json.load(f)] == pytest.approx(bits)


def test_resume_after_sigkill_continues_from_the_last_checkpoint(digits, tmp_path):
  """One run per workdir while it lives; killed with SIGKILL, its lock does not block the next
  run, which resumes from the last checkpoint (weights, Adam's moments, step)."""
  workdir = str(tmp_path / 'run')
  args = [f'--workdir={workdir}', f'--dataset={digits[0]}', *SMALL, '--steps_per_epoch=60',
          '--checkpoint_every_steps=20']
  process = subprocess.Popen([sys.executable, '-m', 'launch.train', *args, '--epochs=50'],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not training.checkpoint_steps(workdir):
      assert process.poll() is None and time.time() < deadline
      time.sleep(0.1)
    with in_process('train', *args, '--epochs=50', '--seed=1') as second:
      assert second['code'] == 2 and f'is in use by another launch.train (pid {process.pid} on ' \
          in second['err'], second['err'][-2000:]
    with open(os.path.join(workdir, 'config.json')) as f:
      assert json.load(f)['train']['seed'] == 0  # the refused run wrote nothing
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()
  killed_at = training.checkpoint_steps(workdir)[0]
  assert killed_at > 0
  # The checkpoint holds the step counter and Adam's moments.
  model = training.model_from_run_config(training.read_run_config(workdir))
  model.compile()
  assert training.Checkpointer(workdir, model).restore_latest() == killed_at
  moments = [v for v in model.optimizer.variables if 'momentum' in v.path or 'velocity' in v.path]
  assert moments and all(np.any(v.numpy() != 0) for v in moments[:5])
  epochs = killed_at // 60 + 1
  result = ok(launch('train', *args, f'--epochs={epochs}'))
  print(f'killed at step {killed_at}; resumed run finished at step {_metrics(workdir)["steps"]}')
  assert f'Resuming from step {killed_at}.' in result.stdout
  assert _metrics(workdir)['steps'] == epochs * 60


def test_errors_are_one_clear_line(digits, trained, tmp_path):
  corrupt = tmp_path / 'corrupt.npz'
  corrupt.write_bytes(b'not an npz')
  empty = tmp_path / 'empty.npz'
  np.savez(empty, x_train=np.zeros([0, 8, 8, 1], np.uint8), x_test=np.zeros([0, 8, 8, 1], np.uint8))
  cases = [
      (['--dataset=cifar100'], "Unknown dataset 'cifar100'"),
      ([f'--dataset={digits[0]}', '--num_scales=5'], 'cannot be squeezed 4 times'),
      ([f'--dataset={digits[0]}', '--num_filters=4'], 'different model config'),
      ([f'--dataset=npz:{corrupt}'], 'cannot be read'),
      ([f'--dataset=npz:{empty}'], 'non-empty'),
      (['--dataset=mnist', f'--data_dir={tmp_path}'], 'not prepared'),
      (['--strategy=gpu'], 'strategy'),
  ]
  if _mirrored_replicas() > 1:
    cases.append(([f'--dataset={digits[0]}', '--strategy=mirrored', '--jit_compile'],
                  f'--jit_compile runs on one replica, not {_mirrored_replicas()}'))
  for flags, message in cases:
    workdir = trained if 'different' in message else str(tmp_path / 'w')
    start = time.time()
    with in_process('train', f'--workdir={workdir}', *SMALL, '--epochs=1', '--steps_per_epoch=2',
                    *flags) as result:
      assert result['code'] == 2, (flags, result['err'][-2000:])
      lines = result['err'].strip().splitlines()
      assert len(lines) == 1 and message in lines[0], (flags, lines)
    assert time.time() - start < 60, flags  # no waiting on a download
  # --conditional needs labels (the digits' npz has none); labels for an unconditional model.
  with in_process('train', f'--workdir={tmp_path / "c"}', f'--dataset={digits[0]}', *SMALL,
                  '--conditional') as result:
    assert result['code'] == 2 and "lacks ['y_test', 'y_train']" in result['err']
  np.save(tmp_path / 'few.npy', digits[1][:4])
  for command, flags in (('score', [f'--images={tmp_path / "few.npy"}', '--label=1',
                                    f'--out={tmp_path / "s.csv"}']),
                         ('sample', ['--class_grid', f'--out={tmp_path / "g.png"}'])):
    with in_process(command, f'--workdir={trained}', *flags) as result:
      assert result['code'] == 2 and 'needs a class-conditional model' in result['err'], (
          command, result['err'][-1000:])
  # The same in a real process: one line on stderr, exit status 2, no traceback.
  result = launch('evaluate', f'--workdir={tmp_path}/none')
  assert result.returncode == 2 and 'error: ' + f'{tmp_path}/none has no config.json' in \
      result.stderr and 'Traceback' not in result.stderr


def test_train_with_xla_on_one_device(digits, tmp_path):
  workdir = str(tmp_path / 'xla')
  ok_in_process('train', f'--workdir={workdir}', f'--dataset={digits[0]}', *SMALL, '--epochs=1',
                '--steps_per_epoch=5', '--strategy=one_device', '--jit_compile')
  metrics = _metrics(workdir)
  assert (metrics['replicas'], metrics['steps']) == (1, 5)
  assert 0 < metrics['test_bits_per_dim'] < 20
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['train']['jit_compile']


def _mirrored_replicas():
  """`--strategy=mirrored`'s replicas in this process (the GPUs, else conftest's 2 CPUs)."""
  import tensorflow as tf
  return len(tf.config.list_logical_devices('GPU') or tf.config.list_logical_devices('CPU'))


def test_xla_on_two_replicas_refused_before_restart_moves_the_run(digits, tmp_path):
  if _mirrored_replicas() < 2:
    pytest.skip('one device: XLA is not refused')
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"model": {}}')
  with in_process('train', f'--workdir={workdir}', f'--dataset={digits[0]}', *SMALL, '--restart',
                  '--strategy=mirrored', '--jit_compile') as result:
    assert result['code'] == 2
    assert f'--jit_compile runs on one replica, not {_mirrored_replicas()}' in result['err']
  assert os.listdir(workdir) == ['config.json']  # not set aside


def test_train_with_glows_layers_from_flags(digits, tmp_path):
  workdir = str(tmp_path / 'glow')
  ok_in_process('train', f'--workdir={workdir}', f'--dataset={digits[0]}', *SMALL, '--epochs=1',
                '--steps_per_epoch=20', '--normalization=actnorm', '--mixing=1x1_conv')
  with open(os.path.join(workdir, 'config.json')) as f:
    model = json.load(f)['model']
  assert (model['normalization'], model['mixing']) == ('actnorm', '1x1_conv')
  assert 0 < _metrics(workdir)['test_bits_per_dim'] < 20
  ok_in_process('evaluate', f'--workdir={workdir}')



def test_the_banner_says_what_recompute_does():
  from launch.train import recompute_summary
  from tfp_realnvp import RealNVP
  small = dict(image_shape=(8, 8, 1), num_scales=2, num_blocks=1, num_filters=4)
  model = RealNVP('mnist', **small)
  assert recompute_summary(model, model.config, 1) == (
      'recompute=auto: the residual blocks of 3 of 10 coupling networks keep only their input '
      '(their first convolution runs again); each batch norm -> ReLU -> convolution unit keeps '
      'only its input (its batch norm and ReLU run again)')
  assert recompute_summary(model, model.config, 2) == (
      'recompute=auto: not applied (batch statistics synchronized over 2 replicas); autodiff '
      'keeps every activation for the backward pass')
  unsynchronized = RealNVP('mnist', sync_batch_norm=False, **small)
  assert 'the residual blocks of 3 of 10' in recompute_summary(
      unsynchronized, unsynchronized.config, 2)
  mixed = RealNVP('mnist', compute_dtype='bfloat16', **small)
  assert recompute_summary(mixed, mixed.config, 1) == (
      'recompute=auto: autodiff keeps every activation for the backward pass')
  units = RealNVP('mnist', compute_dtype='bfloat16', recompute='batch_norm', **small)
  assert recompute_summary(units, units.config, 1) == (
      'recompute=batch_norm: each batch norm -> ReLU -> convolution unit keeps only its input '
      '(its batch norm and ReLU run again)')
  networks = RealNVP('mnist', recompute='networks', **small)
  assert recompute_summary(networks, networks.config, 2) == (
      'recompute=networks: each coupling network runs again in the backward pass (no '
      'activations kept)')
  wide = RealNVP('mnist', dtype='float64', recompute='blocks', **small)
  assert 'not applied (float64)' in recompute_summary(wide, wide.config, 1)


def test_the_old_memory_flags_are_aliases_of_recompute():
  from launch.flags import renamed_flags
  for old, level in ((['--recompute'], 'networks'), (['--norecompute'], 'auto'),
                     (['--recompute_blocks=all'], 'blocks'),
                     (['--recompute_blocks', 'largest'], 'largest_blocks'),
                     (['--recompute_blocks=none'], 'batch_norm'),
                     (['--recompute_batch_norm=off', '--recompute_blocks=none'], 'none'),
                     # (auto blocks: largest in float32, none under mixed precision)
                     (['--recompute_batch_norm=off'], 'largest_blocks'),
                     (['--recompute_batch_norm=on', '--mixed_precision=bfloat16'], 'batch_norm'),
                     (['--recompute_blocks=none', '--mixed_precision=bfloat16'], 'none'),
                     (['--recompute_batch_norm=auto', '--recompute_blocks=auto'], 'auto')):
    argv, note = renamed_flags(['train', '--epochs=1', *old])
    assert argv[-1] == f'--recompute={level}' and argv[:2] == ['train', '--epochs=1'], old
    assert f'is now --recompute={level}' in note, note
  assert renamed_flags(['train', '--recompute=blocks']) == (['train', '--recompute=blocks'], None)
  assert renamed_flags(['train', '--recompute', 'blocks']) == (['train', '--recompute', 'blocks'],
                                                               None)
  assert renamed_flags(['train', '--recompute=true'])[0] == ['train', '--recompute=networks']
  assert renamed_flags(['train', '--recompute_blocks=none', '--mixed_precision', 'bfloat16'])[0][
      -1] == '--recompute=none'
  with pytest.raises(absl_flags.Error, match='given together: give --recompute=LEVEL alone'):
    renamed_flags(['train', '--recompute=networks', '--recompute_blocks=all'])
  with pytest.raises(absl_flags.Error, match=r"--recompute_blocks: expected one of auto, largest, "
                     r"all, none, got 'some' \(the flag is now --recompute=LEVEL\)"):
    renamed_flags(['train', '--recompute_blocks=some'])
