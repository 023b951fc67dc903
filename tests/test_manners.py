"""Keras and launcher manners (issue 11): `.keras` files that resume, callbacks that monitor
bits/dim, flags derived from the config, per-command flags, progress, one-line errors,
TensorBoard, streamed image folders, strict files."""

import io
import json
import os
import stat
import sys

from absl import flags
from absl.testing import flagsaver
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import tfp_realnvp as rn
from tfp_realnvp import data as data_lib
from tfp_realnvp import training
from test_launch import SMALL, in_process, launch, ok

CONFIG = rn.RealNVPConfig((8, 8, 1), num_scales=2, num_blocks=1, num_filters=4)


def _digits(count=256):
  from sklearn.datasets import load_digits
  return np.round(load_digits().images[:count] * 255 / 16).astype(np.uint8)[..., None]


# --- Keras lifecycle -----------------------------------------------------------------------------

def test_keras_file_loads_compiled_and_trains_on_where_it_stopped(tmp_path):
  keras.utils.set_random_seed(0)
  model = rn.RealNVP(CONFIG)
  model.compile()
  model.fit(_digits(96), batch_size=32, epochs=1, verbose=0)
  path = str(tmp_path / 'model.keras')
  model.save(path)
  loaded = keras.models.load_model(path)  # no compile() after loading
  assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 3
  for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  # One more step on the same (already dequantized, so noise-free) batch: identical weights only
  # if Adam's moments and step count came back; a fresh optimizer steps by about lr * sign(g).
  batch = _digits(32).astype(np.float32) + 0.5
  model.train_on_batch(batch)
  loaded.train_on_batch(batch)
  for a, b in zip(model.trainable_variables, loaded.trainable_variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
  assert loaded.evaluate(_digits(64), batch_size=32, verbose=0,
                        return_dict=True)['bits_per_dim'] > 0


def test_keras_files_saved_with_kerass_own_compile_config_still_load():
  from keras.src.trainers.trainer import Trainer
  model = rn.RealNVP(CONFIG)
  model.compile()
  older = Trainer.get_compile_config(model)  # what files saved before this method hold
  assert older['metrics'] is None or isinstance(older['metrics'], list)
  fresh = rn.RealNVP(CONFIG)
  fresh.compile_from_config(older)
  assert fresh.compiled and isinstance(fresh.optimizer, keras.optimizers.Adam)
  assert 'bits_per_dim' in fresh.evaluate(_digits(32), batch_size=32, verbose=0,
                                          return_dict=True)


def test_callbacks_monitor_val_bits_per_dim_as_lower_is_better(tmp_path):
  keras.utils.set_random_seed(0)
  model = rn.RealNVP(CONFIG)
  model.compile()
  images = _digits()
  best = keras.callbacks.ModelCheckpoint(str(tmp_path / 'best.keras'), 'val_bits_per_dim',
                                         save_best_only=True)
  stop = keras.callbacks.EarlyStopping('val_bits_per_dim', patience=5)
  plateau = keras.callbacks.ReduceLROnPlateau('val_bits_per_dim', patience=1, factor=0.5,
                                              min_delta=100.)  # no epoch improves by 100
  history = model.fit(images[:192], batch_size=32, epochs=3, verbose=0,
                      validation_data=(images[192:],), callbacks=[best, stop, plateau])
  values = history.history['val_bits_per_dim']
  assert values[-1] < values[0]  # training works, so lowest and highest differ
  assert best.best == pytest.approx(min(values))  # lower is better, not higher
  assert stop.best == pytest.approx(min(values))
  restored = keras.models.load_model(tmp_path / 'best.keras')  # compiled, at its step
  assert int(restored.optimizer.iterations) in (6, 12, 18)
  assert plateau.monitor_op is keras.ops.less


def test_resumed_runs_bar_numbers_epochs_out_of_the_runs_total(capsys):
  model = rn.RealNVP(CONFIG)
  model.compile()
  batches = tf.data.Dataset.from_tensor_slices(_digits()).repeat().batch(32)
  model.optimizer.iterations.assign(7)  # resumed at step 7: in epoch 2 of 3, of 4 steps each
  training.fit_resumable(model, batches, 3, 4, 7, [training.EpochProgbar(3)], verbose=1)
  out = capsys.readouterr().out
  assert 'Epoch 2/3' in out and 'Epoch 3/3' in out and 'Epoch 2/2' not in out


# --- The config and the flags derived from it ---------------------------------------------------

def test_progress_lines_report_the_mean_over_each_window():
  log = io.StringIO()
  lines = training.ProgressLines(1, 10, 32, every_steps=5, stream=log)

  class Model:
    optimizer = type('Optimizer', (), {'iterations': tf.Variable(0, dtype=tf.int64)})()
  lines.set_model(Model())
  values = [9., 7., 8., 6., 5., 1., 2., 3., 2., 2.]
  lines.on_train_begin()
  lines.on_epoch_begin(0)
  for batch in range(10):  # Keras' logs: the mean since the epoch began
    lines.on_train_batch_end(batch, {'loss': np.mean(values[:batch + 1])})
  first, second = log.getvalue().splitlines()
  assert 'step 5/10 (epoch 1/1): loss 7.0000' in first
  assert 'step 10/10 (epoch 1/1): loss 2.0000' in second


def test_the_old_memory_settings_are_read_as_recompute_levels():
  # config.json and .keras files written before `recompute` had levels hold a boolean
  # `recompute`, `recompute_blocks` and `recompute_batch_norm`.
  written = rn.presets.get('mnist').to_dict()
  for (recompute, blocks, batch_norm, compute_dtype), level in (
      ((False, 'auto', 'auto', None), 'auto'), ((False, 'auto', 'auto', 'bfloat16'), 'auto'),
      ((True, 'auto', 'auto', None), 'networks'), ((True, 'none', 'off', None), 'networks'),
      ((False, 'all', 'auto', None), 'blocks'), ((False, 'largest', 'off', None), 'largest_blocks'),
      ((False, 'none', 'auto', None), 'batch_norm'), ((False, 'none', 'auto', 'bfloat16'), 'none'),
      ((False, 'auto', 'on', 'bfloat16'), 'batch_norm'), ((False, 'none', 'off', None), 'none')):
    old = {**written, 'recompute': recompute, 'recompute_blocks': blocks,
           'recompute_batch_norm': batch_norm, 'compute_dtype': compute_dtype}
    config = rn.RealNVPConfig.from_dict(old)
    assert config.recompute == level, (old, config.recompute)
    assert 'recompute_blocks' not in config.to_dict()
  # In Python, the old names still work, with a warning naming the level to use.
  config = rn.presets.get('mnist')
  for old, level in ((dict(recompute=True), 'networks'), (dict(recompute_blocks='all'), 'blocks'),
                     (dict(recompute_batch_norm='off', recompute_blocks='none'), 'none')):
    with pytest.warns(DeprecationWarning, match=f"is now recompute='{level}'"):
      assert config.replace(**old).recompute == level
  with pytest.warns(DeprecationWarning, match="recompute=True is now recompute='networks'"):
    assert rn.RealNVPConfig(recompute=True).recompute == 'networks'
  for old, level in ((dict(recompute=True), 'networks'), (dict(recompute_blocks=True), 'blocks'),
                     (dict(recompute_batch_norm=False), 'none'), (dict(recompute=False),
                                                                  'batch_norm')):
    with pytest.warns(DeprecationWarning, match=f"are now recompute='{level}'"):
      assert rn.CouplingNet(2, 4, 1, **old).recompute == level
  with pytest.raises(rn.presets.ConfigError, match='given together'):
    rn.RealNVPConfig.from_dict({**written, 'recompute': 'networks', 'recompute_blocks': 'all'})
  with pytest.warns(DeprecationWarning, match="recompute=False is now recompute='auto'"):
    assert config.replace(recompute=False).recompute == 'auto'
  assert rn.RealNVP({**written, 'image_shape': (8, 8, 1), 'num_scales': 2, 'recompute': False,
                     'recompute_blocks': 'all'}).config.recompute == 'blocks'
  with pytest.raises(rn.presets.ConfigError, match="recompute must be one of 'auto', 'none', "
                     "'batch_norm', 'largest_blocks', 'blocks', 'networks', got 'all'"):
    config.replace(recompute='all')


def test_run_settings_may_change_when_resuming_but_not_the_architecture(tmp_path):
  config = rn.presets.get('mnist')
  glows = {'normalization', 'mixing', 'layout', 'steps_per_scale', 'network'}
  assert set(config.architecture()) == {'image_shape', 'num_scales', 'num_blocks', 'num_filters',
                                        'alpha', 'batch_norm_epsilon', 'dtype', 'num_classes',
                                        *glows}
  run = {'model': config.to_dict(), 'data': {'dataset': 'npz:a', 'data_dir': None,
                                             'image_size': None}, 'train': {}}
  # A run from before Glow's options (its config.json lacks them) resumes as the paper's layers.
  training.write_run_config(str(tmp_path), {
      **run, 'model': {k: v for k, v in run['model'].items() if k not in glows}})
  training.check_run_config(str(tmp_path), run)
  with pytest.raises(training.RunError, match='normalization'):
    (tmp_path / 'checkpoints').mkdir()
    (tmp_path / 'checkpoints' / 'ckpt-1.index').write_bytes(b'')
    training.check_run_config(str(tmp_path), {
        **run, 'model': config.replace(normalization='actnorm').to_dict()})
  (tmp_path / 'checkpoints' / 'ckpt-1.index').unlink()
  (tmp_path / 'checkpoints').rmdir()
  training.write_run_config(str(tmp_path), run)
  os.makedirs(tmp_path / 'checkpoints')
  (tmp_path / 'checkpoints' / 'ckpt-7.index').write_bytes(b'')
  for change in (dict(recompute='networks'), dict(compute_dtype='bfloat16'), dict(learning_rate=5e-4),
                 dict(clipnorm=0.), dict(validate_args=False), dict(l2=0.),
                 dict(batch_norm_momentum=0.99), dict(sync_batch_norm=False)):
    training.check_run_config(str(tmp_path), {**run, 'model': config.replace(**change).to_dict()})
  # float16 keeps a loss-scaling optimizer in its checkpoints: no switching to or from it.
  with pytest.raises(training.RunError, match='without float16 mixed precision'):
    training.check_run_config(str(tmp_path), {**run, 'model': config.replace(
        compute_dtype='float16').to_dict()})
  for change in (dict(num_filters=8), dict(alpha=0.1), dict(num_blocks=2)):
    with pytest.raises(training.RunError, match='different model config'):
      training.check_run_config(str(tmp_path),
                                {**run, 'model': config.replace(**change).to_dict()})


def test_model_flags_are_derived_from_the_config_fields():
  from launch import flags as launch_flags
  launch_flags.define_model()
  fields = {f.name: f for f in rn.presets.FIELDS.values() if f.metadata['flag']}
  assert set(fields) == set(rn.presets.FIELDS) - {'image_shape', 'dtype'}
  for name, field in fields.items():
    flag = flags.FLAGS[launch_flags.model_flag_name(field)]
    assert field.metadata['help'] in flag.help
    assert ('architecture' if field.metadata['kind'] == 'architecture' else 'run setting') in \
        flag.help
  with flagsaver.flagsaver():
    flags.FLAGS([sys.argv[0], '--num_blocks=3', '--mixed_precision=bfloat16',
                 '--recompute=networks'])
    assert launch_flags.model_overrides() == dict(num_blocks=3, compute_dtype='bfloat16',
                                                  recompute='networks')
  # Resuming, the run settings not given as flags are the run's own, not the preset's.
  data = data_lib.Data('npz:x', None, None, (8, 8, 1))
  saved = rn.presets.get('mnist', image_shape=(8, 8, 1), recompute='networks', learning_rate=5e-4,
                         compute_dtype='bfloat16').to_dict()
  with flagsaver.flagsaver():
    flags.FLAGS([sys.argv[0], '--num_scales=2', '--learning_rate=1e-4', '--recompute=none'])
    config = launch_flags.model_config(data, saved)
  assert (config.compute_dtype, config.recompute, config.learning_rate) == ('bfloat16', 'none',
                                                                            1e-4)
  # A run written before `recompute` had levels resumes with its settings as a level.
  old = {**saved, 'recompute': False, 'recompute_blocks': 'all', 'recompute_batch_norm': 'auto'}
  with flagsaver.flagsaver():
    flags.FLAGS([sys.argv[0]])
    assert launch_flags.model_config(data, old).recompute == 'blocks'
  # The config's own checks are the flags' validators, naming the flag.
  for bad, message in (('--alpha=0.7', r'--alpha: .*alpha must be a finite number in \(0, '
                                       r'0.5\)'),
                       ('--num_filters=0', '--num_filters: .*num_filters must be at least 1'),
                       ('--learning_rate=nan', '--learning_rate: .*learning_rate must be a finite')):
    with flagsaver.flagsaver(), pytest.raises(flags.IllegalFlagValueError, match=message):
      flags.FLAGS([sys.argv[0], bad])


# --- Per-command flags and --help (real processes) ------------------------------------------

def test_each_command_takes_only_its_own_flags_and_lists_them_in_help():
  result = launch('evaluate', '--workdir=x', '--num_filters=64')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      'error: launch.evaluate has no flag --num_filters. `python -m launch.evaluate --help` '
      'lists its flags.')
  with in_process('train', '--model_dir=x') as result:  # the parser's hints, in this process
    assert result['code'] == 2 and 'has no flag --model_dir; did you mean --workdir?' in \
        result['err'] and 'log_dir' not in result['err']
  with in_process('sample', '--workdir=x', '--temperature=nan') as result:
    assert result['code'] == 2 and '--temperature must be a finite number' in result['err']
  helped = ok(launch('train', '--help')).stdout
  for name in ('workdir', 'dataset', 'num_filters', 'learning_rate', 'mixed_precision',
               'recompute', 'batch_size', 'epochs', 'restart', 'log_every_steps'):
    assert f'--{name}' in helped or f'--[no]{name}' in helped, name
  assert '--log_dir' not in helped and '--xla_' not in helped  # absl's and TF's stay in helpfull


# --- One-line errors for the user's mistakes ------------------------------------------------

def _refused(module, *args, message):
  with in_process(module, *args, required=() if module == 'benchmark' else ('workdir',)) as result:
    assert result['code'] == 2, (args, result)
    lines = result['err'].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], (args, lines)


@pytest.fixture(scope='module')
def run_workdir(tmp_path_factory):
  """A trained (2 steps) tiny run, from the launcher's own code in this process."""
  root = tmp_path_factory.mktemp('manners')
  np.savez(root / 'digits.npz', x_train=_digits(200), x_test=_digits(40))
  workdir = str(root / 'run')
  with in_process('train', f'--workdir={workdir}', f'--dataset=npz:{root}/digits.npz', *SMALL,
                '--epochs=1', '--steps_per_epoch=2') as result:
    assert result['code'] == 0, result['err'][-2000:]
  return workdir


def test_user_mistakes_are_one_line_errors(run_workdir, tmp_path):
  (tmp_path / 'a_file').write_text('x')
  np.save(tmp_path / 'scalar.npy', np.float32(3))
  (tmp_path / 'empty.npy').write_bytes(b'')
  bomb = tmp_path / 'bomb'
  bomb.mkdir()
  Image.new('1', (20_000, 10_000)).save(bomb / 'huge.png')  # 2e8 pixels: PIL's guard refuses
  w = f'--workdir={run_workdir}'
  _refused('sample', w, f'--out={tmp_path}/missing/grid.png', message='does not exist')
  _refused('sample', w, f'--out={tmp_path}', message='is a folder')
  _refused('score', w, f'--images={tmp_path}/empty.npy', f'--out={tmp_path}/s.csv',
           message='empty.npy is not a readable .npy file')
  _refused('score', w, f'--images={tmp_path}/scalar.npy', f'--out={tmp_path}/s.csv',
           message='scalar.npy holds a single value')
  _refused('score', w, f'--images={bomb}', f'--out={tmp_path}/s.csv',
           message='huge.png is too large to decode safely')
  _refused('export', w, f'--export_dir={tmp_path}/a_file', message='is a file')
  _refused('export', w, f'--export_dir={tmp_path}/a_file/model', message='cannot write in')
  _refused('train', f'--workdir={tmp_path}/a_file', '--dataset=npz:x', message='is a file')
  _refused('evaluate', f'--workdir={tmp_path}/a_file', message='is a file')
  for edit, message in ((lambda c: c['model'].pop('num_blocks'), "missing RealNVPConfig fields "
                         "['num_blocks']"),
                        (lambda c: c['model'].update(colour=1), "unknown RealNVPConfig fields "
                         "['colour']"),
                        (lambda c: c.pop('data'), "missing sections ['data']")):
    broken = tmp_path / f'broken{len(message)}'
    broken.mkdir()
    with open(os.path.join(run_workdir, 'config.json')) as f:
      config = json.load(f)
    edit(config)
    (broken / 'config.json').write_text(json.dumps(config))
    _refused('evaluate', f'--workdir={broken}', message=message)


def test_a_read_only_workdir_is_a_one_line_error(tmp_path, monkeypatch):
  def denied(*args, **kwargs):
    raise PermissionError(13, 'Permission denied')
  monkeypatch.setattr(os, 'makedirs', denied)  # as root, chmod cannot make a folder read-only
  with pytest.raises(training.RunError, match='cannot be written .Permission denied'):
    training.lock_workdir(str(tmp_path / 'run'))


def test_bugs_keep_their_traceback():
  from launch import common

  def buggy(argv):
    raise tf.errors.InvalidArgumentError(None, None, 'Incompatible shapes: [2] vs. [3]')
  with pytest.raises(tf.errors.InvalidArgumentError):
    common.fail_clearly(buggy)([])

  def also_buggy(argv):
    raise ValueError('a bug, not a user error')
  with pytest.raises(ValueError, match='a bug'):
    common.fail_clearly(also_buggy)([])


def test_sampling_temperature_must_be_finite(run_workdir, tmp_path):
  model = rn.RealNVP(CONFIG)
  for temperature in (float('nan'), float('inf'), -1.):
    with pytest.raises(ValueError, match='temperature must be a finite number >= 0'):
      model.sample(2, temperature)
  _refused('sample', f'--workdir={run_workdir}', '--temperature=nan', f'--out={tmp_path}/g.png',
           message='--temperature must be a finite number')
  assert not os.path.exists(tmp_path / 'g.png')


def test_benchmark_checks_its_output_before_measuring(tmp_path, monkeypatch):
  from tfp_realnvp import benchmark
  monkeypatch.setattr(benchmark, 'benchmark', lambda *a, **k: pytest.fail('measured first'))
  with in_process('benchmark', '--presets=mnist', f'--output={tmp_path}/missing/b.json',
                required=()) as result:
    assert result['code'] == 2 and 'does not exist' in result['err']


# --- Progress ----------------------------------------------------------------------------------

def test_progress_is_plain_lines_off_a_terminal_and_redrawn_on_one():
  log = io.StringIO()
  progress = training.Progress('evaluate', total=100, stream=log, every_seconds=0)
  for done in (25, 50, 100):
    progress.update(done)
  progress.close()
  lines = log.getvalue().splitlines()
  # the last count once: close() adds no copy of the line update(100) wrote
  assert lines[0].startswith('evaluate: 25/100 images (25%)') and len(lines) == 3
  assert lines[-1].startswith('evaluate: 100/100 images (100%)')
  quiet = io.StringIO()  # no line written since the start: close() writes the count
  progress = training.Progress('evaluate', total=100, stream=quiet, every_seconds=1e9)
  progress.update(100)
  progress.close()
  assert quiet.getvalue().count('\n') == 1 and 'evaluate: 100/100' in quiet.getvalue()
  assert '\r' not in log.getvalue() and '\x1b' not in log.getvalue()

  class Terminal(io.StringIO):
    def isatty(self):
      return True
  screen = Terminal()
  progress = training.Progress('evaluate', total=100, stream=screen)
  progress.update(50)
  progress.close()
  assert screen.getvalue().count('\r') == 2 and screen.getvalue().endswith('\n')


def test_evaluation_reports_progress():
  model = rn.RealNVP(CONFIG)
  log = io.StringIO()
  batches = tf.data.Dataset.from_tensor_slices(_digits(40)).batch(16)
  training.evaluate_bits_per_dim(model, batches, progress=training.Progress(
      'evaluate', 40, stream=log, every_seconds=0))
  assert [line.split(' images')[0] for line in log.getvalue().splitlines()] == [
      'evaluate: 16/40', 'evaluate: 32/40', 'evaluate: 40/40']


# --- Strict files ------------------------------------------------------------------------------

def test_json_files_are_strict_and_follow_the_umask(tmp_path):
  path = str(tmp_path / 'metrics.json')
  old = os.umask(0o022)
  try:
    training.write_json_atomic(path, {'bits': float('nan'), 'rate': [1.0, float('inf')]})
  finally:
    os.umask(old)
  with open(path) as f:
    text = f.read()
  assert json.loads(text, parse_constant=lambda c: pytest.fail(f'{c} is not JSON')) == {
      'bits': None, 'rate': [1.0, None]}
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


# --- Streamed image folders ------------------------------------------------------------------

def test_image_folders_are_streamed_and_corrupt_files_named(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  for i in range(12):
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / f'{i}.png')
  (tmp_path / '._0.png').write_bytes(b'macOS metadata')  # hidden files and folders: left out
  (tmp_path / '.ipynb_checkpoints').mkdir()
  (tmp_path / '.ipynb_checkpoints' / '0.png').write_bytes(b'a copy')
  reads = []
  read_image = data_lib.read_image
  monkeypatch.setattr(data_lib, 'read_image', lambda p, s: reads.append(p) or read_image(p, s))
  loaded = data_lib.load(f'images:{tmp_path}', image_size=8)
  assert reads == [] and (loaded.num_train, loaded.num_test) == (11, 1)  # nothing read yet
  first = next(iter(loaded.test)).numpy()
  assert len(reads) == 1
  Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(reads[0])  # changed on disk ...
  assert np.all(next(iter(loaded.test)).numpy() == 0) and np.any(first != 0)  # ... read again
  (tmp_path / reads[0]).write_bytes(b'not a png')
  with pytest.raises(tf.errors.OpError) as error:
    next(iter(loaded.test))
  assert data_lib.data_error_in(error.value) == (
      f'{reads[0]} is not a readable image (cannot identify image file {reads[0]!r}).')
  # Training batches read the files on every pass (no in-memory cache of the whole folder).
  (tmp_path / reads[0]).unlink()  # the test image: training reads only the other 11
  reads.clear()
  for _ in data_lib.training_batches(loaded, 4, seed=0).take(6):  # 24 images: 2 passes over 11
    pass
  assert len(reads) >= 22 and len(set(reads)) == 11


# --- A run and its resumption, as a new user sees them (real processes, output to a file) ------

def _events(folder):
  """{tag: [steps]} of the TensorBoard event files in `folder`."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  found = {}
  for name in sorted(os.listdir(folder)):
    accumulator = EventAccumulator(os.path.join(folder, name), size_guidance={'tensors': 0})
    accumulator.Reload()
    for tag in accumulator.Tags()['tensors']:
      found.setdefault(tag, []).extend(e.step for e in accumulator.Tensors(tag))
  return found


def test_a_resumed_run_with_new_run_settings_reports_and_logs_it_all(tmp_path):
  from sklearn.datasets import load_digits
  images = np.round(load_digits().images * 255 / 16).astype(np.uint8)[..., None]
  np.savez(tmp_path / 'digits.npz', x_train=images[:1500], x_test=images[1500:1600])
  workdir = str(tmp_path / 'run')
  common = [f'--workdir={workdir}', f'--dataset=npz:{tmp_path}/digits.npz', *SMALL,
            '--log_every_steps=10', '--checkpoint_every_steps=0']
  first = ok(launch('train', *common, '--epochs=1', '--steps_per_epoch=30'))
  # Resumed mid-epoch (30 = epoch 2 of 20-step epochs), with other run settings: allowed.
  second = ok(launch('train', *common, '--epochs=3', '--steps_per_epoch=20', '--recompute',
                     '--mixed_precision=bfloat16', '--learning_rate=5e-4'))
  for result in (first, second):
    assert '\r' not in result.stdout and '\x1b' not in result.stdout  # a log file, not a bar
  lines = second.stdout.splitlines()
  banner = '\n'.join(lines[:7])
  for part in ('launch.train: real_nvp', 'parameters', 'data: npz:', '1,500 train / 100 test',
               'strategy:', 'replica', f'workdir: {workdir} (resuming from step 30)',
               'bfloat16',
               # the old flag, a boolean before, is the level `networks` now
               'recompute=networks: each coupling network runs again in the backward pass'):
    assert part in banner, (part, banner)
  assert 'step 40/60 (epoch 2/3): bits_per_dim' in second.stdout
  assert 'epoch 2/3 done at step 40' in second.stdout  # not "Epoch 2/2"
  assert 'epoch 3/3 done at step 60' in second.stdout
  assert 'test evaluation: 100/100 images' in second.stdout
  written = lines[-1]
  for name in ('config.json', 'checkpoints/ckpt-60', 'metrics.json', 'samples.png', 'logs/'):
    assert f'{workdir}/{name}' in written, (name, written)
  with open(os.path.join(workdir, 'config.json')) as f:
    model = json.load(f)['model']
  assert (model['recompute'], model['compute_dtype']) == ('networks', 'bfloat16')  # this run's
  assert 'note: --recompute is now --recompute=networks' in second.stderr
  umask = os.umask(0)
  os.umask(umask)
  for name in ('config.json', 'metrics.json'):
    assert stat.S_IMODE(os.stat(os.path.join(workdir, name)).st_mode) == 0o666 & ~umask
  # TensorBoard: every figure at the global step, so curves and pictures line up across runs.
  logs = os.path.join(workdir, 'logs')
  assert _events(os.path.join(logs, 'train'))['bits_per_dim'] == [10, 20, 30, 40, 50, 60]
  assert _events(os.path.join(logs, 'validation'))['bits_per_dim'] == [30, 40, 60]
  assert _events(os.path.join(logs, 'test'))['bits_per_dim'] == [30, 60]
  pictures = _events(os.path.join(logs, 'images'))
  assert pictures['samples_t0.7'] == [30, 40, 60] and pictures['real_test_images'] == [0, 30]



def test_a_corrupt_image_met_while_training_is_one_line_naming_it(tmp_path):
  folder = tmp_path / 'images'
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(12):
    Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(folder / f'{i}.png')
  (folder / '5.png').write_bytes(b'truncated')  # every file but this one decodes
  with in_process('train', f'--workdir={tmp_path}/run', f'--dataset=images:{folder}',
                  '--image_size=8', *SMALL, '--batch_size=4', '--epochs=1',
                  '--steps_per_epoch=6') as result:
    assert result['code'] == 2, result['err'][-2000:]
    assert result['err'].strip() == (
        f'error: {folder}/5.png is not a readable image (cannot identify image file '
        f"'{folder}/5.png').")
