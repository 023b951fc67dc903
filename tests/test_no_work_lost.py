"""Nothing is lost: checkpoint recovery, divergence, a lock per workdir, config written only once a
run starts, atomic exports, checkpoints only inside the workdir, and scores on the right files.

The library's parts are tested in this process; the launcher's in real processes (kill -9, two
runs at once), on scikit-learn's real 8x8 digits."""

import csv
import hashlib
import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import randomize
from test_launch import digits, in_process, ok_in_process  # noqa: F401 (digits: a fixture)
import tfp_realnvp as rn
from tfp_realnvp import training
from tfp_realnvp.data import read_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = rn.RealNVPConfig((8, 8, 1), num_scales=2, num_blocks=1, num_filters=4)
# One scale (4 couplings): the launcher's lifecycle, not the flow (tested in the library's
# tests), at a third less tracing than two scales.
SMALL = ['--preset=mnist', '--num_scales=1', '--num_blocks=1', '--num_filters=4',
         '--batch_size=32']


def _model(seed=0):
  model = rn.RealNVP(CONFIG)
  model.compile()
  randomize(model.flow_layers, seed=seed, scale=0.1, variance=(0.8, 1.2))
  return model


def _save_at(checkpointer, step):
  checkpointer.model.optimizer.iterations.assign(step)
  return checkpointer.save()


def _fingerprint(folder):
  """Every file under `folder` with a hash of its bytes (but the lock, which names its holder)."""
  result = {}
  for root, _, files in os.walk(folder):
    for name in files:
      if name == 'train.lock':
        continue
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        result[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return result


def _corrupt(prefix):
  with open(prefix + '.data-00000-of-00001', 'r+b') as f:
    f.truncate(64)


def test_restore_takes_the_newest_checkpoint_that_loads_and_says_why(tmp_path):
  workdir = str(tmp_path)
  lines = []
  checkpointer = training.Checkpointer(workdir, _model(), keep=3, report=lines.append)
  prefixes = {step: _save_at(checkpointer, step) for step in (5, 10, 15)}
  assert checkpointer.steps_on_disk() == [15, 10, 5]
  assert tf.train.latest_checkpoint(checkpointer.directory).endswith('ckpt-15')  # TF's tools

  def restored():
    fresh = training.Checkpointer(workdir, _model(seed=1), report=lines.append)
    return fresh.restore_latest(required=True, with_optimizer=False), fresh

  _corrupt(prefixes[15])
  step, fresh = restored()
  assert step == 10 and [s for s, _ in fresh.skipped] == [15]
  assert 'Restored' in lines[-1] and 'ckpt-15 (' in lines[-1] and 'step 10' in lines[-1]
  # The newest deleted (TF's state file still names it): the next one, not "no checkpoint".
  for name in os.listdir(checkpointer.directory):
    if name.startswith('ckpt-15.') or name.startswith('ckpt-10.'):
      os.remove(os.path.join(checkpointer.directory, name))
  assert restored()[0] == 5
  # A missing or garbled state file changes nothing.
  state = os.path.join(checkpointer.directory, 'checkpoint')
  os.remove(state)
  assert restored()[0] == 5
  with open(state, 'w') as f:
    f.write('model_checkpoint_path: "ckpt-99"\ngarbage {{{')
  assert restored()[0] == 5


def test_checkpoints_outside_the_workdir_are_never_loaded_or_deleted(tmp_path):
  other = str(tmp_path / 'other_run')
  other_checkpointer = training.Checkpointer(other, _model(seed=2))
  _save_at(other_checkpointer, 50)
  before = _fingerprint(other)
  workdir = str(tmp_path / 'runs' / 'this')
  checkpointer = training.Checkpointer(workdir, _model(), keep=1)
  _save_at(checkpointer, 3)
  state = os.path.join(checkpointer.directory, 'checkpoint')
  outside_paths = (os.path.join(other, 'checkpoints', 'ckpt-50'),  # absolute
                   '../../../other_run/checkpoints/ckpt-50')  # relative, leaving the workdir
  for own_step, outside in zip((3, 4), outside_paths):
    with open(state, 'w') as f:
      f.write(f'model_checkpoint_path: "{outside}"\nall_model_checkpoint_paths: "{outside}"\n')
    fresh = training.Checkpointer(workdir, _model(seed=1), keep=1)
    assert fresh.restore_latest() == own_step  # its own, not the other run's step 50
    _save_at(fresh, own_step + 1)  # the rotation deletes its own older checkpoint only
  assert checkpointer.steps_on_disk() == [5]
  assert _fingerprint(other) == before


def test_when_no_checkpoint_loads_nothing_changes(tmp_path):
  workdir = str(tmp_path)
  checkpointer = training.Checkpointer(workdir, _model())
  for step in (1, 2):
    _corrupt(_save_at(checkpointer, step))
  before = _fingerprint(workdir)
  with pytest.raises(training.RunError, match=r'None of the 2 checkpoints .* loads \(ckpt-2 .*; '
                     r'ckpt-1 .*\)\. Nothing was changed; .* --restart'):
    training.Checkpointer(workdir, _model()).restore_latest()
  assert _fingerprint(workdir) == before


def test_unloadable_checkpoints_are_set_aside_not_rotated_with_good_ones(tmp_path):
  workdir = str(tmp_path)
  checkpointer = training.Checkpointer(workdir, _model(), keep=2)
  for step in (10, 20):
    _save_at(checkpointer, step)
  _corrupt(os.path.join(checkpointer.directory, 'ckpt-20'))
  resumed = training.Checkpointer(workdir, _model(), keep=2, report=lambda line: None)
  assert resumed.restore_latest() == 10
  resumed.set_aside_skipped()
  assert sorted(os.listdir(os.path.join(checkpointer.directory, 'unloadable'))) == [
      'ckpt-20.data-00000-of-00001', 'ckpt-20.index']
  _save_at(resumed, 11)
  assert resumed.steps_on_disk() == [11, 10]  # the good ckpt-10 is still there


def test_a_model_that_is_not_finite_is_never_saved_or_restored(tmp_path):
  workdir = str(tmp_path)
  model = _model()
  checkpointer = training.Checkpointer(workdir, model)
  _save_at(checkpointer, 1)
  before = _fingerprint(workdir)
  weight = model.trainable_variables[0]
  weight.assign(tf.fill(weight.shape, np.nan))
  with pytest.raises(training.RunError, match='NaN or infinite values at step 2; not checkpointed'):
    _save_at(checkpointer, 2)
  assert _fingerprint(workdir) == before
  # A NaN checkpoint written some other way (an older version) is skipped on restore.
  tf.train.Checkpoint(variables=list(model.variables), optimizer=model.optimizer).write(
      os.path.join(checkpointer.directory, 'ckpt-2'))
  fresh = training.Checkpointer(workdir, _model(seed=3), report=lambda line: None)
  assert fresh.restore_latest() == 1
  assert 'NaN or infinite' in fresh.skipped[0][1]
  with pytest.raises(ValueError, match='NaN or infinite values; not exported'):
    rn.export_saved_model(model, str(tmp_path / 'exported'))


def test_export_is_atomic(tmp_path, monkeypatch):
  path = str(tmp_path / 'exported')
  first = _model(seed=1)
  rn.export_saved_model(first, path)
  before = _fingerprint(path)
  save = tf.saved_model.save

  def full_disk(module, export_dir, signatures=None):
    save(module, export_dir, signatures=signatures)  # the files are written...
    with open(os.path.join(export_dir, 'saved_model.pb'), 'r+b') as f:
      f.truncate(10)  # ...but one is cut short,
    raise OSError(28, 'No space left on device')  # and the write fails
  monkeypatch.setattr(tf.saved_model, 'save', full_disk)
  with pytest.raises(ValueError, match=r'writing .*exported failed \(.*No space left.*\); '
                     'anything that was there is kept'):
    rn.export_saved_model(_model(seed=2), path)
  monkeypatch.undo()
  assert _fingerprint(path) == before  # the previous export, whole, byte for byte
  assert sorted(os.listdir(tmp_path)) == ['exported']  # no staging folders left
  rn.export_saved_model(_model(seed=2), path)  # a successful one replaces it
  assert _fingerprint(path) != before and sorted(os.listdir(tmp_path)) == ['exported']
  # A folder holding anything but a SavedModel is never replaced (nor deleted).
  (tmp_path / 'work').mkdir()
  (tmp_path / 'work' / 'notes.txt').write_text('keep me')
  with pytest.raises(ValueError, match='holds files that are not a SavedModel.*notes.txt'):
    rn.export_saved_model(_model(seed=2), str(tmp_path / 'work'))
  assert os.listdir(tmp_path / 'work') == ['notes.txt']


def test_one_reader_returns_paths_with_their_images(tmp_path):
  folder = tmp_path / 'folder'
  (folder / 'sub').mkdir(parents=True)
  rng = np.random.default_rng(0)
  pictures = {'a_black.png': np.zeros([8, 8, 3], np.uint8),
              'c_digit.png': rng.integers(0, 256, [8, 8, 3], dtype=np.uint8),
              'd_white.png': np.full([8, 8, 3], 255, np.uint8),
              'sub/e_grey.png': np.full([8, 8, 3], 128, np.uint8)}
  for name, picture in pictures.items():
    Image.fromarray(picture).save(folder / name)
  (folder / 'b_notes.txt').write_text('not an image')
  paths, images = read_image_folder(str(folder), 8)
  assert paths == sorted(pictures)
  for path, image in zip(paths, images):
    np.testing.assert_array_equal(image, pictures[path])


def test_score_puts_each_score_on_its_file(tmp_path):
  workdir = str(tmp_path / 'run')
  model = _model()
  no_data = {'dataset': None, 'data_dir': None, 'image_size': None}
  training.write_run_config(workdir, {'model': CONFIG.to_dict(), 'data': no_data,
                                     'train': {}})
  training.Checkpointer(workdir, model).save()
  folder = tmp_path / 'folder'
  folder.mkdir()
  rng = np.random.default_rng(1)
  pictures = {'a_black.png': np.zeros([8, 8], np.uint8),
              'c_digit.png': rng.integers(0, 256, [8, 8], dtype=np.uint8),
              'd_white.png': np.full([8, 8], 255, np.uint8)}
  for name, picture in pictures.items():
    Image.fromarray(picture).save(folder / name)
  (folder / 'b_notes.txt').write_text('not an image')
  ok_in_process('score', f'--workdir={workdir}', f'--images={folder}', f'--out={tmp_path}/s.csv',
                '--noise_draws=1')
  with open(tmp_path / 's.csv') as f:
    rows = list(csv.DictReader(f))
  assert [row['image'] for row in rows] == sorted(pictures)
  batch = np.stack([pictures[name] for name in sorted(pictures)])[..., None]
  expected = model.bits_per_dim(batch, seed=1).numpy()  # score's seed for its first batch
  for row, bits in zip(rows, expected):
    assert float(row['bits_per_dim']) == pytest.approx(float(bits), rel=1e-4), row['image']
  assert len(set(np.round(expected, 3))) == 3  # three different scores, each on its file


def _train_args(workdir, dataset, *extra):
  return [f'--workdir={workdir}', f'--dataset={dataset}', *SMALL, *extra]


def test_recovery_end_to_end_never_restarts_silently(digits, tmp_path):
  workdir = str(tmp_path / 'run')
  args = _train_args(workdir, digits[0], '--epochs=2', '--steps_per_epoch=10',
                     '--checkpoint_every_steps=5', '--keep_checkpoints=3')
  # A run that fails on its flags writes no config.json to block the corrected retry.
  with in_process('train', *args, '--num_scales=5') as result:
    assert result['code'] == 2 and 'cannot be squeezed' in result['err']
  assert not os.path.exists(os.path.join(workdir, 'config.json'))
  ok_in_process('train', *args)
  checkpoints = os.path.join(workdir, 'checkpoints')
  assert training.checkpoint_steps(workdir) == [20, 15, 10]
  _corrupt(os.path.join(checkpoints, 'ckpt-20'))
  os.remove(os.path.join(checkpoints, 'checkpoint'))  # and TF's state file is gone
  with in_process('evaluate', f'--workdir={workdir}') as result:
    assert result['code'] == 0, result['err'][-2000:]
    assert json.loads(result['out'].strip().splitlines()[-1])['step'] == 15
    assert 'skipped: ckpt-20 (' in result['err']
  result = ok_in_process('train', *args)  # resumes from 15, not 0; ckpt-20 is set aside
  assert 'Resuming from step 15.' in result['out'] and 'ckpt-20 (' in result['err']
  assert training.checkpoint_steps(workdir) == [20, 15, 10]
  assert os.path.exists(os.path.join(checkpoints, 'unloadable', 'ckpt-20.index'))
  # None loads: refused, nothing touched; --restart keeps the old files aside.
  for step in training.checkpoint_steps(workdir):
    _corrupt(os.path.join(checkpoints, f'ckpt-{step}'))
  before = _fingerprint(workdir)
  with in_process('train', *args) as result:
    assert result['code'] == 2 and 'None of the 3 checkpoints' in result['err']
  assert _fingerprint(workdir) == before
  with in_process('train', *args, '--restart') as result:
    assert result['code'] == 0, result['err'][-2000:]
    assert 'Resuming' not in result['out'] and 'before-restart-' in result['out']
  aside, = [n for n in os.listdir(workdir) if n.startswith('before-restart-')]
  kept = _fingerprint(os.path.join(workdir, aside))
  assert all(kept[k] == v for k, v in before.items() if k.startswith('checkpoints/'))
  assert training.checkpoint_steps(workdir) == [20, 15, 10]  # the new run's


def test_nan_flags_are_refused():
  from absl import flags
  from absl.testing import flagsaver
  from launch import flags as launch_flags
  launch_flags.define_model()
  launch_flags.define_sampling()
  for flag in ('learning_rate', 'clipnorm', 'l2', 'temperature'):
    for value in ('nan', 'inf'):
      with flagsaver.flagsaver(), pytest.raises(flags.IllegalFlagValueError,
                                                match=f'--{flag}: .*{flag} must be a '
                                                f'finite number|--{flag} must be a finite'):
        flags.FLAGS([sys.argv[0], f'--{flag}={value}'])


# Adam at this rate gives an infinite loss at step 6 on these digits, with two scales
DIVERGING_RATE, DIVERGING_SCALES = '30', '--num_scales=2'


def test_divergence_stops_the_run_keeps_good_checkpoints_and_resumes_at_a_lower_rate(
    digits, tmp_path):
  workdir = str(tmp_path / 'run')
  args = _train_args(workdir, digits[0], '--epochs=1', '--steps_per_epoch=40',
                     '--checkpoint_every_steps=1', '--keep_checkpoints=3', DIVERGING_SCALES)
  with in_process('train', *args, f'--learning_rate={DIVERGING_RATE}') as result:
    assert result['code'] == 2 and 'Training diverged' in result['err'], result['err'][-3000:]
  print(result['err'].strip().splitlines()[-1])
  diverged_at = int(result['err'].split(' at step ')[1].split('.')[0])
  steps = training.checkpoint_steps(workdir)
  assert steps and steps[0] == diverged_at - 2  # the weights that gave the NaN are set aside
  diverged = os.listdir(os.path.join(workdir, 'checkpoints', 'diverged'))
  assert f'ckpt-{diverged_at - 1}.index' in diverged
  assert not os.path.exists(os.path.join(workdir, 'metrics.json'))
  # The same command with a lower rate resumes from what is kept (whose loss is finite, or the
  # divergence check would stop it at once) and finishes.
  result = ok_in_process('train', *args, '--learning_rate=1e-3')
  assert f'Resuming from step {steps[0]}.' in result['out']
  with open(os.path.join(workdir, 'metrics.json')) as f:
    metrics = json.load(f)
  assert metrics['steps'] == 40 and np.isfinite(metrics['test_bits_per_dim'])
  assert training.read_run_config(workdir)['model']['learning_rate'] == 1e-3
