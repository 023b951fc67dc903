"""Running a training job: strategies, workdirs, atomic checkpoints that resume, evaluation,
TensorBoard pictures. The launcher (`launch/`) is a thin layer of flags over this."""

import fcntl
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import weakref

import keras
import numpy as np
import tensorflow as tf

from tfp_realnvp.images import image_grid
from tfp_realnvp.model import RealNVP, to_uint8
from tfp_realnvp.presets import RealNVPConfig

STRATEGIES = ('auto', 'mirrored', 'multi_worker', 'one_device')


class RunError(ValueError):
  """A run that cannot go on as asked (workdir, checkpoint or flags), with what to do."""


def build_strategy(name='auto'):
  """auto: MirroredStrategy over all local GPUs, else the default CPU; mirrored: over every
  local GPU (or every logical CPU when there is none); multi_worker: from TF_CONFIG."""
  if name not in STRATEGIES:
    raise RunError(f'Unknown strategy {name!r}; choose one of {", ".join(STRATEGIES)}.')
  if name == 'multi_worker':  # before anything starts TF's runtime (listing devices does)
    if 'TF_CONFIG' not in os.environ:
      raise RunError('--strategy=multi_worker needs the TF_CONFIG environment variable '
                     '(cluster and task); see tf.distribute.MultiWorkerMirroredStrategy.')
    return tf.distribute.MultiWorkerMirroredStrategy()
  gpus = tf.config.list_logical_devices('GPU')
  if name == 'one_device':
    return tf.distribute.OneDeviceStrategy((gpus or tf.config.list_logical_devices('CPU'))[0].name)
  if name == 'mirrored':
    return mirrored_strategy([d.name for d in (gpus or tf.config.list_logical_devices('CPU'))])
  return mirrored_strategy() if gpus else tf.distribute.get_strategy()


_COLLECTIVE_KEYS_PER_STRATEGY = 1_000_000


def mirrored_strategy(devices=None):
  """`tf.distribute.MirroredStrategy(devices)` whose collective ops cannot collide with those of
  an earlier one in this process: TF numbers every MirroredStrategy's collective keys from the
  same start, so a second strategy over the same devices reused the first one's keys and its
  collectives failed ('Shape mismatch in the collective instance')."""
  tf.distribute.MirroredStrategy._collective_key_base += _COLLECTIVE_KEYS_PER_STRATEGY
  return tf.distribute.MirroredStrategy(devices)


def split_cpu(num_devices):
  """Splits the CPU into `num_devices` logical devices (before TF starts; for tests and demos)."""
  cpu = tf.config.list_physical_devices('CPU')[0]
  tf.config.set_logical_device_configuration(
      cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)


def is_chief(strategy):
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  return resolver.task_type in (None, 'chief') or (
      resolver.task_type == 'worker' and resolver.task_id == 0 and
      'chief' not in resolver.cluster_spec().as_dict())


def current_umask():
  """The process's umask, read without changing it (Linux: /proc/self/status); elsewhere, by
  setting and restoring it."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except OSError:
    pass
  umask = os.umask(0o022)
  os.umask(umask)
  return umask


def _strict(value):
  """`value` with NaN and infinities as None (JSON has no such numbers)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_strict(v) for v in value]
  return value


def write_json_atomic(path, value):
  """Writes `value` as strict JSON (NaN and infinities as null) to `path` atomically, with the
  permissions of a new file under the umask."""
  directory = os.path.dirname(os.path.abspath(path))
  with tempfile.NamedTemporaryFile('w', dir=directory, delete=False, suffix='.tmp') as f:
    json.dump(_strict(value), f, indent=2, sort_keys=True, allow_nan=False)
  os.chmod(f.name, 0o666 & ~current_umask())  # NamedTemporaryFile's 0600 would hide it
  os.replace(f.name, path)


def check_run_config(workdir, run_config):
  """Checks that `workdir/config.json`, if there, describes the same model and data: the
  model's architecture fields (`RealNVPConfig.architecture()`) and the data must match to
  resume; run settings (precision, recompute, checks, optimizer) and training lengths may
  change. Writes nothing."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  saved = read_run_config(workdir)
  saved_sections = {'model': RealNVPConfig.from_dict(saved['model'], path).architecture(),
                    'data': saved['data']}
  new_sections = {'model': RealNVPConfig.from_dict(run_config['model']).architecture(),
                  'data': run_config['data']}
  saved_float16 = saved['model'].get('compute_dtype') == 'float16'
  if saved_float16 != (run_config['model'].get('compute_dtype') == 'float16') and \
      checkpoint_steps(workdir):
    raise RunError(f'{workdir} holds a run {"with" if saved_float16 else "without"} float16 mixed '
                   'precision, whose checkpoints hold the optimizer '
                   f'{"with" if saved_float16 else "without"} loss scaling: resume it '
                   f'{"with" if saved_float16 else "without"} --mixed_precision=float16 (bfloat16 '
                   'and float32 may alternate), or use another --workdir.')
  for section in ('model', 'data'):
    differences = {k: (saved_sections[section].get(k), v) for k, v in new_sections[section].items()
                   if saved_sections[section].get(k) != v}
    if differences:
      detail = ', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in differences.items())
      if not checkpoint_steps(workdir):
        raise RunError(f'{path} is from a run with a different {section} config ({detail}) that '
                       f'left no checkpoint: delete {path} to start this run there, or use '
                       'another --workdir.')
      raise RunError(f'{workdir} holds a run with a different {section} config ({detail}). '
                     'Use another --workdir, or the same flags to resume that run.')


def write_run_config(workdir, run_config):
  """Writes `workdir/config.json` (once the run is known to start: see `check_run_config`)."""
  os.makedirs(workdir, exist_ok=True)
  write_json_atomic(os.path.join(workdir, 'config.json'), run_config)


def checkpoint_steps(workdir):
  """The steps of the checkpoints in `workdir/checkpoints`, newest first."""
  try:
    names = os.listdir(os.path.join(workdir, 'checkpoints'))
  except (FileNotFoundError, NotADirectoryError):
    return []
  return sorted((int(m.group(1)) for m in map(_CHECKPOINT_INDEX.match, names) if m),
                reverse=True)


_held_locks = []  # open lock files: closing one (or the process ending) releases its lock


def lock_workdir(workdir):
  """Takes `workdir` for this process, or raises `RunError` naming the process that has it.

  The lock is the OS's (`flock` on `workdir/train.lock`), so the OS releases it when the process
  ends, however it ends: a killed run leaves nothing that blocks the next one."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise RunError(f'--workdir={workdir} is a file, not a folder.')
  try:
    os.makedirs(workdir, exist_ok=True)
    lock = open(os.path.join(workdir, 'train.lock'), 'a+')  # pylint: disable=consider-using-with
  except OSError as e:  # read-only, a parent that is a file, ...
    raise RunError(f'--workdir={workdir} cannot be written ({e.strerror or e}).') from None
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:  # EWOULDBLOCK: another process holds it (other OSErrors propagate)
    lock.seek(0)
    holder = lock.read().strip() or 'another process'
    lock.close()
    raise RunError(f'{workdir} is in use by another launch.train ({holder}): wait for it to end, '
                   'or use another --workdir.') from None
  lock.seek(0)
  lock.truncate()
  lock.write(f'pid {os.getpid()} on {socket.gethostname()}, since '
             f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n')
  lock.flush()
  _held_locks.append(lock)
  return lock


def set_aside_run(workdir):
  """For `--restart`: moves the run's files (checkpoints, config, metrics, logs, samples) into
  `workdir/before-restart-TIME/`, kept, not deleted. Returns that folder, or None if empty."""
  names = [n for n in ('checkpoints', 'config.json', 'metrics.json', 'logs', 'samples.png')
           if os.path.exists(os.path.join(workdir, n))]
  if not names:
    return None
  base = os.path.join(workdir, f'before-restart-{time.strftime("%Y%m%d-%H%M%S")}')
  target, count = base, 1
  while os.path.exists(target):  # two restarts within a second
    count += 1
    target = f'{base}.{count}'
  os.makedirs(target)
  for name in names:
    os.replace(os.path.join(workdir, name), os.path.join(target, name))
  return target


RUN_CONFIG_SECTIONS = ('model', 'data', 'train')


def read_run_config(workdir):
  """`workdir/config.json`, checked: its sections and the model's fields (`RunError` or
  `ConfigError` naming what is missing or unknown)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise RunError(f'--workdir={workdir} is a file, not a run\'s folder.')
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path) as f:
      run_config = json.load(f)
  except FileNotFoundError:
    raise RunError(f'{workdir} has no config.json: is it the workdir of a launch.train run?') \
        from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RunError(f'{path} is corrupt ({e}).') from None
  except OSError as e:
    raise RunError(f'Cannot read {path} ({e}).') from None
  if not isinstance(run_config, dict):
    raise RunError(f'{path}: expected a JSON object with sections {sorted(RUN_CONFIG_SECTIONS)}.')
  missing = sorted(set(RUN_CONFIG_SECTIONS) - set(run_config))
  unknown = sorted(set(run_config) - set(RUN_CONFIG_SECTIONS))
  if missing or unknown:
    raise RunError(f'{path}: ' + '; '.join(
        ([f'missing sections {missing}'] if missing else []) +
        ([f'unknown sections {unknown}'] if unknown else [])) +
        f' (expected {sorted(RUN_CONFIG_SECTIONS)}).')
  for section in RUN_CONFIG_SECTIONS:
    if not isinstance(run_config[section], dict):
      raise RunError(f'{path}: section {section!r} must be a JSON object.')
  missing = [k for k in DATA_KEYS if k not in run_config['data']]
  if missing:
    raise RunError(f'{path}: the data section lacks {missing}.')
  RealNVPConfig.from_dict(run_config['model'], f'{path}, section model')
  return run_config


DATA_KEYS = ('dataset', 'data_dir', 'image_size')


def model_from_run_config(run_config):
  return RealNVP(RealNVPConfig.from_dict(run_config['model']))


_CHECKPOINT_INDEX = re.compile(r'^ckpt-(\d+)\.index$')


def all_finite(variables):
  """Whether every float variable holds only finite values."""
  checks = [tf.reduce_all(tf.math.is_finite(v)) for v in variables
            if tf.as_dtype(v.dtype).is_floating]
  return bool(tf.reduce_all(checks)) if checks else True


class Checkpointer:
  """Model and optimizer state (step counter included) in `workdir/checkpoints/ckpt-STEP.*`,
  keeping the last `keep`.

  Only files in that folder are ever read or deleted: the checkpoints are found by listing it
  (TF's state file, `checkpoints/checkpoint`, is written for TF's tools but never followed, so a
  missing, garbled or outside-pointing one changes nothing). Restoring takes the newest
  checkpoint that loads and holds finite values, and says which newer ones were skipped and why.
  A model with non-finite values is never saved. TF writes a checkpoint's data before its index,
  so a kill at any moment leaves the previous checkpoints loadable. Under
  MultiWorkerMirroredStrategy every worker saves (the save is collective) but only the chief
  keeps its files.
  """

  def __init__(self, workdir, model, strategy=None, keep=3, report=None):
    self.directory = os.path.join(workdir, 'checkpoints')
    # Every variable by position (Keras layers in lists are invisible to TF's object graph, which
    # would drop e.g. the batch-norm statistics of Glow's hidden layers).
    self.checkpoint = tf.train.Checkpoint(variables=list(model.variables),
                                          optimizer=model.optimizer)
    self.model = model
    self.keep = keep
    self._chief = strategy is None or is_chief(strategy)
    self._report = report or (lambda line: print(line, file=sys.stderr, flush=True))
    self.skipped = []  # (step, reason) of the newer checkpoints the last restore skipped
    self._last_saved = None

  @property
  def step(self):
    return int(self.model.optimizer.iterations.numpy())

  def steps_on_disk(self):
    """The steps of the checkpoints in the folder (those with an index file), newest first."""
    return checkpoint_steps(os.path.dirname(self.directory))

  def _prefix(self, step):
    return os.path.join(self.directory, f'ckpt-{step}')

  def _files(self, step):
    prefix = f'ckpt-{step}.'
    return [os.path.join(self.directory, name) for name in os.listdir(self.directory)
            if name.startswith(prefix)]

  def restore_latest(self, required=False, with_optimizer=True):
    """Restores the newest checkpoint that loads and holds finite values (without the
    optimizer's state for inference); returns its step, or None when there is no checkpoint.

    Newer checkpoints that do not load are skipped, with the reason, in `self.skipped` and in a
    line on stderr. When checkpoints exist but none loads, raises `RunError` (nothing is
    changed)."""
    steps = self.steps_on_disk()
    self.skipped = []
    if not steps:
      if required:
        raise RunError(f'No checkpoint in {self.directory}: train first (launch.train).')
      return None
    variables = self.model.weights + (self.model.optimizer.variables if with_optimizer else [])
    for step in steps:
      if with_optimizer:  # compile() has built the optimizer's slots
        checkpoint = tf.train.Checkpoint(variables=list(self.model.variables),
                                         optimizer=self.model.optimizer)
      else:
        checkpoint = tf.train.Checkpoint(variables=list(self.model.variables))
      try:
        status = checkpoint.read(self._prefix(step))  # `write`'s pair: no save counter
        if not with_optimizer:
          status.expect_partial()  # the optimizer's values are left in the file
        status.assert_existing_objects_matched()
        if not all_finite(variables):
          raise ValueError('it holds NaN or infinite values')
      except (tf.errors.DataLossError, tf.errors.NotFoundError, tf.errors.InvalidArgumentError,
              tf.errors.OutOfRangeError, AssertionError, ValueError, IndexError, KeyError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        self.skipped.append((step, f'{type(e).__name__}: {reason}'))
        continue
      except tf.errors.OpError as e:  # e.g. permissions: the file may be fine, so stop here
        raise RunError(f'Cannot read {self._prefix(step)} ({type(e).__name__}: '
                       f'{str(e).strip().splitlines()[0][:200]}). Nothing was changed.') from None
      if self.skipped:
        self._report(f'Restored {self._prefix(step)} (step {step}), the newest checkpoint that '
                     f'loads; skipped: {self._describe_skipped()}.')
      return step
    raise RunError(f'None of the {len(steps)} checkpoints in {self.directory} loads '
                   f'({self._describe_skipped()}). Nothing was changed; to train from step 0 '
                   'anyway, rerun launch.train with --restart (the old files are kept aside).')

  def _describe_skipped(self):
    return '; '.join(f'ckpt-{step} ({reason})' for step, reason in self.skipped)

  def set_aside_skipped(self):
    """Moves the checkpoints the last restore skipped to `checkpoints/unloadable/` (kept, not
    deleted), so that training on from an older one does not mix them in or rotate them."""
    steps = [step for step, _ in self.skipped]
    if self._chief and steps:
      aside = self.set_aside(steps, 'unloadable')
      self._report(f'Moved the unloadable checkpoints to {aside}: '
                   f'{", ".join(f"ckpt-{s}" for s in steps)}.')

  def set_aside(self, steps, folder):
    """Moves the checkpoints at `steps` into `checkpoints/FOLDER/` (kept, out of the rotation
    and of restores); returns that folder. Only the chief moves files."""
    aside = os.path.join(self.directory, folder)
    if not self._chief:
      return aside
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      for path in self._files(step):
        target = os.path.join(aside, os.path.basename(path))
        if os.path.exists(target):
          target += f'.{time.strftime("%Y%m%d-%H%M%S")}'
        os.replace(path, target)
    if self.steps_on_disk():
      self._write_state()
    return aside

  def save(self):
    """Writes `ckpt-STEP` (once per step), keeps the newest `keep`; returns its path prefix.
    Refuses (RunError) a model whose values are not all finite."""
    step = self.step
    if step == self._last_saved:
      return self._prefix(step)
    if not all_finite(self.model.weights + self.model.optimizer.variables):
      raise RunError(f'Training diverged: the model holds NaN or infinite values at step {step}; '
                     f'not checkpointed (the checkpoints in {self.directory} are kept as they '
                     'were). Lower the learning rate or the clipping norm and resume.')
    if not self._chief:
      directory = tempfile.mkdtemp(prefix='realnvp_worker_ckpt_')
      try:
        self.checkpoint.write(os.path.join(directory, f'ckpt-{step}'))
      finally:
        shutil.rmtree(directory, ignore_errors=True)
      self._last_saved = step
      return None
    os.makedirs(self.directory, exist_ok=True)
    try:
      path = self.checkpoint.write(self._prefix(step))
    except (OSError, tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError) as e:
      raise RunError(f'Cannot write the checkpoint {self._prefix(step)} ({e}); the earlier ones '
                     'are kept.') from e
    self._last_saved = step
    self._rotate()
    self._write_state()
    return path

  def _rotate(self):
    for step in self.steps_on_disk()[self.keep:]:
      for path in self._files(step):
        os.remove(path)

  def _write_state(self):
    """TF's state file (relative names), for `tf.train.latest_checkpoint` and TF's tools."""
    steps = self.steps_on_disk()
    path = os.path.join(self.directory, 'checkpoint')
    if not steps:
      if os.path.exists(path):
        os.remove(path)
      return
    names = [f'ckpt-{s}' for s in reversed(steps)]
    lines = [f'model_checkpoint_path: "{names[-1]}"'] + [
        f'all_model_checkpoint_paths: "{name}"' for name in names]
    with tempfile.NamedTemporaryFile('w', dir=self.directory, delete=False, suffix='.tmp') as f:
      f.write('\n'.join(lines) + '\n')
    os.replace(f.name, path)


class CheckpointEvery(keras.callbacks.Callback):
  """Saves every `every_steps` steps and at the end of each epoch."""

  def __init__(self, checkpointer, every_steps=None):
    super().__init__()
    self.checkpointer, self.every_steps = checkpointer, every_steps

  def on_train_begin(self, logs=None):
    self._step = self.checkpointer.step  # counted here after, not read from the device each step

  def on_train_batch_end(self, batch, logs=None):
    self._step += 1
    if self.every_steps and self._step % self.every_steps == 0:
      self.checkpointer.save()

  def on_epoch_end(self, epoch, logs=None):
    self.checkpointer.save()


class StopOnDivergence(keras.callbacks.Callback):
  """Stops training with a `RunError` at the first step whose loss is not finite, before any
  callback after it in the list (put `CheckpointEvery` after it) can save that step."""

  def __init__(self, checkpointer, advice=''):
    super().__init__()
    self.checkpointer, self.advice = checkpointer, advice

  def on_train_begin(self, logs=None):
    self._step = self.checkpointer.step

  def on_train_batch_end(self, batch, logs=None):
    self._step += 1
    loss = (logs or {}).get('loss')
    if loss is not None and not np.all(np.isfinite(np.asarray(loss, np.float64))):
      # The loss of step d is that of the weights after step d - 1: those are diverged too.
      bad = [s for s in self.checkpointer.steps_on_disk() if s >= self._step - 1]
      moved = ''
      if bad:
        aside = self.checkpointer.set_aside(bad, 'diverged')
        moved = (f'the checkpoints of the weights that gave it '
                 f'({", ".join(f"ckpt-{s}" for s in bad)}) are moved to {aside}; ')
      saved = self.checkpointer.steps_on_disk()
      kept = (f'the newest checkpoint left is at step {saved[0]}' if saved else
              'no checkpoint is left to resume from')
      raise RunError(f'Training diverged: the loss is {float(np.ravel(loss)[0])} at step '
                     f'{self._step}. Stopped; {moved}{kept}. {self.advice}'.strip())


def interactive(stream=None):
  """Whether `stream` (stdout by default) is a terminal: bars redrawn in place only there."""
  stream = stream or sys.stdout
  return bool(getattr(stream, 'isatty', lambda: False)())


def _duration(seconds):
  seconds = int(round(seconds))
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


class Progress:
  """Progress of a long loop: on a terminal, one line redrawn in place; otherwise (a log file)
  a plain line at most every `every_seconds` and at the end, without `\\r` or colour codes.

    progress = Progress('evaluate', total=10000, unit='images')
    progress.update(640)   # done so far
    progress.close()
  """

  def __init__(self, label, total=None, unit='images', stream=None, every_seconds=30.):
    self.label, self.total, self.unit = label, total, unit
    self.stream = stream or sys.stdout
    self.every_seconds = every_seconds
    self.interactive = interactive(self.stream)
    self.start = self._last = time.perf_counter()
    self.done = 0

  def _line(self):
    elapsed = time.perf_counter() - self.start
    rate = self.done / elapsed if elapsed > 0 else 0.
    line = f'{self.label}: {self.done:,}' + (f'/{self.total:,}' if self.total else '')
    line += f' {self.unit}'
    if self.total:
      line += f' ({self.done / self.total:.0%})'
    line += f', {rate:.1f} {self.unit}/s, {_duration(elapsed)}'
    if self.total and rate > 0 and self.done < self.total:
      line += f', about {_duration((self.total - self.done) / rate)} left'
    return line

  def update(self, done):
    self.done = done
    now = time.perf_counter()
    if self.interactive:
      self.stream.write('\r' + self._line() + '\x1b[K')
      self.stream.flush()
    elif now - self._last >= self.every_seconds:
      self.stream.write(self._line() + '\n')
      self.stream.flush()
    else:
      return
    self._last = now

  def close(self):
    self.stream.write(('\r' + self._line() + '\x1b[K\n') if self.interactive else
                      self._line() + '\n')
    self.stream.flush()


class EpochProgbar(keras.callbacks.ProgbarLogger):
  """Keras' progress bar (for terminals), numbering epochs out of the run's total: a resumed
  run's `fit` calls see only the epochs left."""

  def __init__(self, total_epochs):
    super().__init__()
    self.total_epochs = total_epochs

  def set_params(self, params):
    super().set_params(params)
    self.epochs = self.total_epochs

  def on_epoch_begin(self, epoch, logs=None):
    self._reset_progbar()
    self._maybe_init_progbar()
    if self.verbose:
      print(f'Epoch {epoch + 1}/{self.total_epochs}', flush=True)


class ProgressLines(keras.callbacks.Callback):
  """For logs (output that is not a terminal): one plain line every `every_steps` steps and one
  at each epoch's end, with the metrics (window means), images/s and time left in the run."""

  def __init__(self, total_epochs, steps_per_epoch, global_batch, every_steps=100,
               stream=None):
    super().__init__()
    self.total_epochs, self.steps_per_epoch = total_epochs, steps_per_epoch
    self.global_batch, self.every_steps = global_batch, every_steps
    self.stream = stream or sys.stdout
    self._windows = _WindowMeans()

  def _say(self, line):
    self.stream.write(line + '\n')
    self.stream.flush()

  def on_train_begin(self, logs=None):
    self._step = int(self.model.optimizer.iterations.numpy())
    self._time, self._time_step = time.perf_counter(), self._step

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch
    self._windows.reset()

  def on_train_batch_end(self, batch, logs=None):
    self._step += 1
    if self._step % self.every_steps == 0:
      window = self._windows.update(batch, logs)
      self._say(f'step {self._step:,}/{self.total_epochs * self.steps_per_epoch:,} (epoch '
                f'{self._epoch + 1}/{self.total_epochs}): {_metric_text(window)}{self._speed()}')

  def _speed(self):
    now = time.perf_counter()
    steps, seconds = self._step - self._time_step, now - self._time
    self._time, self._time_step = now, self._step
    if not steps or seconds <= 0:
      return ''
    left = (self.total_epochs * self.steps_per_epoch - self._step) * seconds / steps
    return (f', {steps * self.global_batch / seconds:.1f} images/s'
            + (f', about {_duration(left)} left' if left > 0 else ''))

  def on_epoch_end(self, epoch, logs=None):
    self._say(f'epoch {epoch + 1}/{self.total_epochs} done at step {self._step:,}: '
              f'{_metric_text(logs or {})}')


def _metric_text(logs):
  return ', '.join(f'{k} {float(np.ravel(v)[0]):.4f}' for k, v in sorted(logs.items())
                   if np.size(v) and k != 'learning_rate')


class _WindowMeans:
  """Keras reports each metric as its mean since the epoch began: `update` gives the means over
  the steps since its last call in the epoch instead (from the running means and step counts;
  float64 arithmetic)."""

  def reset(self):
    self._previous, self._count = {}, 0

  def update(self, batch, logs):
    count = batch + 1
    window = {}
    for key, value in (logs or {}).items():
      value = float(np.ravel(value)[0]) if np.size(value) else math.nan
      before = self._previous.get(key, 0.)
      window[key] = ((value * count - before * self._count) / (count - self._count)
                     if count > self._count else value)
      self._previous[key] = value
    self._count = count
    return window


CLASS_GRID_ROWS = 20  # classes in TensorBoard's class grid at each epoch's end (8 samples each)


class TensorBoardLogger(keras.callbacks.Callback):
  """TensorBoard, every figure at the global step (the optimizer's step counter), so scalars
  and pictures line up and a resumed run continues its curves:

  - `logs/train`: `bits_per_dim` and `loss` every `every_steps` steps (means over those steps),
    the learning rate, and images/s;
  - `logs/validation`: `bits_per_dim` and `loss` at each epoch's end; `logs/test`: the final
    test bits/dim (`write_test`);
  - `logs/images`: a grid of real test images (once) and samples at each epoch's end (for a
    class-conditional model also `class_grid`: a row of samples per class, the first
    `CLASS_GRID_ROWS` classes).
  """

  def __init__(self, log_dir, every_steps=100, num_samples=36, temperature=0.7, real_images=None,
               global_batch=None):
    super().__init__()
    self.log_dir, self.every_steps, self.global_batch = log_dir, every_steps, global_batch
    self.num_samples, self.temperature = num_samples, temperature
    self.real_images = real_images
    self._writers = {}
    self._windows = _WindowMeans()

  def writer(self, name):
    if name not in self._writers:
      self._writers[name] = tf.summary.create_file_writer(os.path.join(self.log_dir, name))
    return self._writers[name]

  def _scalars(self, name, values, step):
    with self.writer(name).as_default():
      for key, value in values.items():
        if math.isfinite(value):
          tf.summary.scalar(key, value, step=step)
    self.writer(name).flush()

  def on_train_begin(self, logs=None):
    self._step = int(self.model.optimizer.iterations.numpy())
    self._time, self._time_step = time.perf_counter(), self._step
    if self.real_images is not None:
      with self.writer('images').as_default():
        tf.summary.image('real_test_images', image_grid(np.asarray(self.real_images))[None],
                         step=self._step)
      self.writer('images').flush()
      self.real_images = None  # once per run

  def on_epoch_begin(self, epoch, logs=None):
    self._windows.reset()

  def on_train_batch_end(self, batch, logs=None):
    self._step += 1
    if self._step % self.every_steps == 0:
      window = self._windows.update(batch, logs)
      now = time.perf_counter()
      values = {k: v for k, v in window.items() if k in ('bits_per_dim', 'loss')}
      values['learning_rate'] = float(np.asarray(self.model.optimizer.learning_rate))
      if self.global_batch and now > self._time:
        values['images_per_second'] = ((self._step - self._time_step) * self.global_batch /
                                       (now - self._time))
      self._time, self._time_step = now, self._step
      self._scalars('train', values, self._step)

  def on_epoch_end(self, epoch, logs=None):
    logs = logs or {}
    self._scalars('validation', {k[4:]: float(np.ravel(v)[0]) for k, v in logs.items()
                                 if k.startswith('val_')}, self._step)
    grid = image_grid(to_uint8(self.model.sample(self.num_samples, self.temperature,
                                                 seed=0)).numpy())
    with self.writer('images').as_default():
      tf.summary.image(f'samples_t{self.temperature}', grid[None], step=self._step)
      if self.model.num_classes:
        samples = to_uint8(class_samples(self.model, temperature=self.temperature,
                                         num_classes=CLASS_GRID_ROWS)).numpy()
        tf.summary.image(f'class_grid_t{self.temperature}', image_grid(samples, columns=8)[None],
                         step=self._step)
    self.writer('images').flush()

  def write_test(self, bits_per_dim, step):
    """The final test bits/dim, at `step`."""
    self._scalars('test', {'bits_per_dim': bits_per_dim}, step)


def _images_and_labels(batch):
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch, None)


def evaluate_bits_per_dim(model, batches, noise_draws=1, seed=0, progress=None):
  """Mean bits/dim over every image of `batches` (uint8; `(images, labels)` for a
  class-conditional model: then of `p(x | y)`), averaging the log-density over `noise_draws`
  dequantization draws per image. Seeded per batch, so it is repeatable.
  `progress`: a `Progress`, updated with the images done."""
  batch_sum = _batch_sums.setdefault(model, {}).get(noise_draws)
  if batch_sum is None:  # one traced function per model, reused by later evaluations
    model_ref = weakref.ref(model)  # a strong reference would keep the model alive

    @tf.function(reduce_retracing=True)
    def batch_sum(images, labels, batch_seed):
      total = tf.zeros([], tf.float64)
      for draw in range(noise_draws):
        bits = model_ref().bits_per_dim(images, labels,
                                        seed=batch_seed * noise_draws + draw + 1)
        total += tf.reduce_sum(tf.cast(bits, tf.float64))
      return total / noise_draws
    _batch_sums[model][noise_draws] = batch_sum

  (total,), count = _sums_over_batches(batch_sum, batches, seed, progress)
  if not math.isfinite(total):
    raise RunError(f'The test bits/dim is not finite ({total / count}): the model has diverged.')
  return total / count


_batch_sums = weakref.WeakKeyDictionary()


def _sums_over_batches(batch_sums, batches, seed, progress, labelled=False):
  """`(sums, image count)`: the elementwise sums of `batch_sums(images, labels, batch_seed)`
  (a tuple of scalars) over `batches`, each batch seeded by its index; `progress` updated with
  the images done. An empty split is a `RunError`."""
  sums, count = None, 0
  for index, batch in enumerate(batches):
    images, labels = _images_and_labels(batch)
    if labelled and labels is None:
      raise RunError('Labelled batches (images, labels) expected.')
    values = batch_sums(images, labels, tf.constant(seed * 1_000_003 + index, tf.int64))
    values = [float(v) for v in tf.nest.flatten(values)]
    sums = values if sums is None else [a + b for a, b in zip(sums, values)]
    count += int(images.shape[0])
    if progress is not None:
      progress.update(count)
  if progress is not None:
    progress.close()
  if count == 0:
    raise RunError('The evaluation split is empty.')
  return sums, count


def evaluate_classifier(model, batches, seed=0, progress=None):
  """Bayes' classifier of a class-conditional model on labelled `batches` `(images, labels)`:
  `{'accuracy': fraction of argmax_y log p(x | y) + log p(y) equal to the label,
  'marginal_bits_per_dim': -log p(x) / (D ln 2), p(x) = sum_y p(y) p(x | y), 'count'}`. One
  seeded dequantization draw per image (the same for every class)."""
  num_dims = math.prod(model.image_shape)

  @tf.function(reduce_retracing=True)
  def batch_results(images, labels, batch_seed):
    joint = model.class_log_likelihoods(images, seed=batch_seed) + model.class_log_prior()
    right = tf.equal(tf.argmax(joint, -1, output_type=tf.int32), tf.cast(labels, tf.int32))
    marginal = -tf.reduce_logsumexp(tf.cast(joint, tf.float64), -1) / (num_dims * math.log(2.))
    return tf.reduce_sum(tf.cast(right, tf.float64)), tf.reduce_sum(marginal)

  (right, marginal), count = _sums_over_batches(batch_results, batches, seed, progress,
                                                labelled=True)
  if not math.isfinite(marginal):
    raise RunError('The class log-likelihoods are not finite: the model has diverged.')
  return {'accuracy': right / count, 'marginal_bits_per_dim': marginal / count, 'count': count}


def class_samples(model, per_class=8, temperature=0.7, seed=0, num_classes=None):
  """`per_class` samples (float pixels) of each class of a class-conditional model (of its first
  `num_classes` classes if given), class by class (`image_grid(to_uint8(...),
  columns=per_class)`: a row per class)."""
  labels = np.repeat(np.arange(min(num_classes or model.num_classes, model.num_classes)),
                     per_class)
  return model.sample(len(labels), temperature, seed=seed, labels=labels)


def steps_per_epoch(num_train, global_batch_size, requested=None):
  if requested:
    return requested
  if not num_train:
    raise RunError('The dataset does not say how many training images it has: give '
                   '--steps_per_epoch.')
  if num_train < global_batch_size:
    raise RunError(f'The training split has {num_train} images, fewer than one global batch '
                   f'({global_batch_size}); lower --batch_size.')
  return num_train // global_batch_size


def fit_resumable(model, batches, epochs, steps, start_step, callbacks, verbose='auto',
                  validation_data=None):
  """Keras `fit` from step `start_step` to `epochs * steps`, resuming mid-epoch if needed."""
  done_epochs, offset = divmod(start_step, steps)
  history = {}
  if offset and done_epochs < epochs:  # finish the interrupted epoch first
    h = model.fit(batches, initial_epoch=done_epochs, epochs=done_epochs + 1,
                  steps_per_epoch=steps - offset, callbacks=callbacks, verbose=verbose,
                  shuffle=False, validation_data=validation_data)
    history = dict(h.history)
    done_epochs += 1
  if done_epochs < epochs:
    h = model.fit(batches, initial_epoch=done_epochs, epochs=epochs, steps_per_epoch=steps,
                  callbacks=callbacks, verbose=verbose, shuffle=False,
                  validation_data=validation_data)
    for key, values in h.history.items():
      history.setdefault(key, []).extend(values)
  return history


def latent_manifold(model, images, size=8, label=None):
  """The paper's latent manifold picture: decodes
  z = cos(a) (cos(b) z1 + sin(b) z2) + sin(a) (cos(b) z3 + sin(b) z4), a, b in [0, pi/2] on a
  `size` x `size` grid, from four encoded images (of the class `label`, for a class-conditional
  model: encoded and decoded with it). Returns `size**2` float images."""
  z1, z2, z3, z4 = tf.unstack(model.encode(images[:4], label))
  angles = np.linspace(0., math.pi / 2, size)
  latents = [math.cos(a) * (math.cos(b) * z1 + math.sin(b) * z2)
             + math.sin(a) * (math.cos(b) * z3 + math.sin(b) * z4)
             for a in angles for b in angles]
  return model.decode(tf.stack(latents), label)


def restore_model(workdir):
  """The model of `workdir` at its latest checkpoint: `(model, run_config, step)`."""
  run_config = read_run_config(workdir)
  model = model_from_run_config(run_config)
  model.compile()
  step = Checkpointer(workdir, model).restore_latest(required=True, with_optimizer=False)
  return model, run_config, step
