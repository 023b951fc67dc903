"""Checkpoints in `workdir/checkpoints/ckpt-STEP.*` (`Checkpointer`): written only when finite,
rotated, restored from the newest one that loads."""

import os
import re
import shutil
import sys
import tempfile
import time

import tensorflow as tf

from tfp_realnvp.files import atomic_path
from tfp_realnvp.training.errors import RunError
from tfp_realnvp.training.strategies import is_chief


_CHECKPOINT_INDEX = re.compile(r'^ckpt-(\d+)\.index$')


def checkpoint_steps(workdir):
  """The steps of the checkpoints in `workdir/checkpoints`, newest first."""
  try:
    names = os.listdir(os.path.join(workdir, 'checkpoints'))
  except (FileNotFoundError, NotADirectoryError):
    return []
  return sorted((int(m.group(1)) for m in map(_CHECKPOINT_INDEX.match, names) if m),
                reverse=True)


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
    with atomic_path(path) as temporary, open(temporary, 'w') as f:
      f.write('\n'.join(lines) + '\n')
