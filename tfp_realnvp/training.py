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
    return tf.distribute.MirroredStrategy(
        [d.name for d in (gpus or tf.config.list_logical_devices('CPU'))])
  return tf.distribute.MirroredStrategy() if gpus else tf.distribute.get_strategy()


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


def write_json_atomic(path, value):
  directory = os.path.dirname(os.path.abspath(path))
  with tempfile.NamedTemporaryFile('w', dir=directory, delete=False, suffix='.tmp') as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(f.name, path)


# Model-config fields a resumed run may change: the optimizer's, not what the checkpoint means
# (lowering the learning rate is how a diverged run goes on).
RESUMABLE_WITH_NEW = ('learning_rate', 'clipnorm')


def check_run_config(workdir, run_config):
  """Checks that `workdir/config.json`, if there, describes the same run (`model` and `data`
  must match to resume, but for `RESUMABLE_WITH_NEW`; training lengths such as `epochs` may
  grow). Writes nothing."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  saved = read_run_config(workdir)
  for section in ('model', 'data'):
    differences = {k: (saved.get(section, {}).get(k), v) for k, v in run_config[section].items()
                   if saved.get(section, {}).get(k) != v
                   and not (section == 'model' and k in RESUMABLE_WITH_NEW)}
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
  os.makedirs(workdir, exist_ok=True)
  lock = open(os.path.join(workdir, 'train.lock'), 'a+')  # pylint: disable=consider-using-with
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


def read_run_config(workdir):
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise RunError(f'{workdir} has no config.json: is it the workdir of a launch.train run?') \
        from None
  except json.JSONDecodeError as e:
    raise RunError(f'{path} is corrupt ({e}).') from None


def model_from_run_config(run_config):
  return RealNVP(RealNVPConfig(**run_config['model']))


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
    # would drop e.g. the residual blocks' batch-norm statistics).
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


class SampleGrid(keras.callbacks.Callback):
  """A grid of samples in TensorBoard after each epoch."""

  def __init__(self, log_dir, num=36, temperature=0.7):
    super().__init__()
    self.writer = tf.summary.create_file_writer(os.path.join(log_dir, 'samples'))
    self.num, self.temperature = num, temperature

  def on_epoch_end(self, epoch, logs=None):
    grid = image_grid(to_uint8(self.model.sample(self.num, self.temperature, seed=0)).numpy())
    with self.writer.as_default():
      tf.summary.image(f'samples_t{self.temperature}', grid[None], step=epoch + 1)
    self.writer.flush()


def evaluate_bits_per_dim(model, batches, noise_draws=1, seed=0):
  """Mean bits/dim over every image of `batches` (uint8), averaging the log-density over
  `noise_draws` dequantization draws per image. Seeded per batch, so it is repeatable."""
  batch_sum = _batch_sums.setdefault(model, {}).get(noise_draws)
  if batch_sum is None:  # one traced function per model, reused by later evaluations
    model_ref = weakref.ref(model)  # a strong reference would keep the model alive

    @tf.function(reduce_retracing=True)
    def batch_sum(images, batch_seed):
      total = tf.zeros([], tf.float64)
      for draw in range(noise_draws):
        bits = model_ref().bits_per_dim(images, seed=batch_seed * noise_draws + draw + 1)
        total += tf.reduce_sum(tf.cast(bits, tf.float64))
      return total / noise_draws
    _batch_sums[model][noise_draws] = batch_sum

  total, count = 0., 0
  for index, images in enumerate(batches):
    total += float(batch_sum(images, tf.constant(seed * 1_000_003 + index, tf.int64)))
    count += int(images.shape[0])
  if count == 0:
    raise RunError('The evaluation split is empty.')
  if not math.isfinite(total):
    raise RunError(f'The test bits/dim is not finite ({total / count}): the model has diverged.')
  return total / count


_batch_sums = weakref.WeakKeyDictionary()


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


def latent_manifold(model, images, size=8):
  """The paper's latent manifold picture: decodes
  z = cos(a) (cos(b) z1 + sin(b) z2) + sin(a) (cos(b) z3 + sin(b) z4), a, b in [0, pi/2] on a
  `size` x `size` grid, from four encoded images. Returns `size**2` float images."""
  z1, z2, z3, z4 = tf.unstack(model.encode(images[:4]))
  angles = np.linspace(0., math.pi / 2, size)
  latents = [math.cos(a) * (math.cos(b) * z1 + math.sin(b) * z2)
             + math.sin(a) * (math.cos(b) * z3 + math.sin(b) * z4)
             for a in angles for b in angles]
  return model.decode(tf.stack(latents))


def restore_model(workdir):
  """The model of `workdir` at its latest checkpoint: `(model, run_config, step)`."""
  run_config = read_run_config(workdir)
  model = model_from_run_config(run_config)
  model.compile()
  step = Checkpointer(workdir, model).restore_latest(required=True, with_optimizer=False)
  return model, run_config, step
