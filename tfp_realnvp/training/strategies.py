"""Distribution strategies for a run: which one a `--strategy` flag names, a MirroredStrategy that
a second one in the process does not collide with, logical CPUs for tests, the chief worker."""

import os

import tensorflow as tf

from tfp_realnvp.compat import mirrored_strategy
from tfp_realnvp.training.errors import RunError


STRATEGIES = ('auto', 'mirrored', 'multi_worker', 'one_device')


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
