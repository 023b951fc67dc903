"""Running a training job: strategies, workdirs, atomic checkpoints that resume, evaluation,
TensorBoard pictures. The launcher (`launch/`) is a thin layer of flags over this."""

import json
import math
import os
import shutil
import tempfile
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


def save_or_check_run_config(workdir, run_config):
  """Writes `workdir/config.json`, or checks that the one there describes the same run.

  `model` and `data` must match to resume; training lengths (`epochs`) may grow.
  """
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    saved = read_run_config(workdir)
    for section in ('model', 'data'):
      differences = {k: (saved[section].get(k), v) for k, v in run_config[section].items()
                     if saved[section].get(k) != v}
      if differences:
        detail = ', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in differences.items())
        raise RunError(f'{workdir} holds a run with a different {section} config ({detail}). '
                       'Use another --workdir, or the same flags to resume that run.')
  os.makedirs(workdir, exist_ok=True)
  write_json_atomic(path, run_config)


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


class Checkpointer:
  """Model and optimizer state (step counter included) in `workdir/checkpoints`, keeping the
  last `keep`. TF writes a checkpoint's files first and then atomically renames the index that
  names the latest, so a kill at any moment leaves the previous checkpoint loadable. Under
  MultiWorkerMirroredStrategy every worker saves (the save is collective) but only the chief
  keeps its files."""

  def __init__(self, workdir, model, strategy=None, keep=3):
    self.directory = os.path.join(workdir, 'checkpoints')
    # Every variable by position (Keras layers in lists are invisible to TF's object graph, which
    # would drop e.g. the residual blocks' batch-norm statistics).
    self.checkpoint = tf.train.Checkpoint(variables=list(model.variables),
                                          optimizer=model.optimizer)
    self.model = model
    chief = strategy is None or is_chief(strategy)
    directory = self.directory if chief else tempfile.mkdtemp(prefix='realnvp_worker_ckpt_')
    self._chief = chief
    self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=keep)

  @property
  def step(self):
    return int(self.model.optimizer.iterations.numpy())

  def restore_latest(self, required=False, with_optimizer=True):
    """Restores the latest checkpoint (without the optimizer's state for inference); returns its
    step, or None when there is none."""
    latest = tf.train.latest_checkpoint(self.directory)
    if latest is None:
      if required:
        raise RunError(f'No checkpoint in {self.directory}: train first (launch.train).')
      return None
    if with_optimizer:  # compile() has built the optimizer's slots
      checkpoint = self.checkpoint
    else:
      checkpoint = tf.train.Checkpoint(variables=list(self.model.variables))
    try:
      status = checkpoint.restore(latest)
      status.assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError, IndexError, KeyError) as e:
      raise RunError(f'Checkpoint {latest} cannot be restored ({type(e).__name__}: '
                     f'{str(e).splitlines()[0][:300]}). Delete it to fall back to an earlier one.'
                     ) from None
    if not with_optimizer:
      status.expect_partial()
    return int(latest.rsplit('-', 1)[1])  # saved under its step

  def save(self):
    path = self.manager.save(checkpoint_number=self.step)
    if not self._chief:
      shutil.rmtree(self.manager.directory, ignore_errors=True)
    return path


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
