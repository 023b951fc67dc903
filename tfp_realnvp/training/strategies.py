"""Distribution strategies for a run: which one a `--strategy` flag names, a MirroredStrategy that
a second one in the process does not collide with, a cluster from TF_CONFIG or Slurm, logical CPUs
for tests, the chief worker."""

import json
import os

import tensorflow as tf

from tfp_realnvp.compat import mirrored_strategy
from tfp_realnvp.training.errors import RunError


STRATEGIES = ('auto', 'mirrored', 'multi_worker', 'one_device')


def slurm_tasks():
  """The number of tasks of the Slurm job step this process runs in (`srun`), 0 outside one (a
  batch script itself is no job step)."""
  if 'SLURM_PROCID' not in os.environ or not os.environ.get('SLURM_STEP_NUM_TASKS'):
    return 0
  return int(os.environ['SLURM_STEP_NUM_TASKS'])


def tf_config_workers():
  """The number of tasks in TF_CONFIG's cluster, 0 without TF_CONFIG."""
  if not os.environ.get('TF_CONFIG'):
    return 0
  try:
    cluster = json.loads(os.environ['TF_CONFIG']).get('cluster', {})
  except ValueError as e:
    raise RunError(f'TF_CONFIG is not valid JSON ({e}).') from None
  return sum(len(tasks) for tasks in cluster.values())


class SlurmCluster(tf.distribute.cluster_resolver.SlurmClusterResolver):
  """TF's Slurm resolver, each task using the GPUs it sees (those Slurm gives it; none on a CPU
  cluster, which TF's resolver cannot describe: it divides the node's GPUs among its tasks)."""

  def __init__(self, port_base=8888):
    self.gpus = len(tf.config.list_physical_devices('GPU'))  # starts no runtime
    per_task = max(self.gpus, 1)
    # Slurm has confined each task's GPUs already: TF's allocation by node (CUDA_VISIBLE_DEVICES)
    # stays off, and a node GPU count that any number of tasks per node fits passes its check.
    super().__init__(port_base=port_base, gpus_per_node=per_task * 4096, gpus_per_task=per_task,
                     auto_set_gpu=False)

  def num_accelerators(self, task_type=None, task_id=None, config_proto=None):
    del task_type, task_id, config_proto
    return {'GPU': self.gpus} if self.gpus else {}


def build_strategy(name='auto', slurm_port=8888):
  """auto: multi-worker in a Slurm job step of several tasks or under a TF_CONFIG cluster of
  several tasks, else MirroredStrategy over all local GPUs, else the default CPU; mirrored: over
  every local GPU (or every logical CPU when there is none); multi_worker: the cluster from
  TF_CONFIG, or else from Slurm's environment (TF's `SlurmClusterResolver`, ports from
  `slurm_port`)."""
  if name not in STRATEGIES:
    raise RunError(f'Unknown strategy {name!r}; choose one of {", ".join(STRATEGIES)}.')
  if name == 'auto' and (slurm_tasks() > 1 or tf_config_workers() > 1):
    name = 'multi_worker'
  if name == 'multi_worker':  # before anything starts TF's runtime (listing logical devices does)
    if os.environ.get('TF_CONFIG'):
      return tf.distribute.MultiWorkerMirroredStrategy()
    if slurm_tasks():
      try:
        resolver = SlurmCluster(slurm_port)
      except (RuntimeError, ValueError) as e:
        raise RunError(f'Slurm\'s environment does not describe the job step ({e}).') from None
      return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    if 'SLURM_JOB_ID' in os.environ:
      raise RunError('--strategy=multi_worker in a Slurm job needs a job step of its tasks: run '
                     'launch.train under srun (this is the batch script itself).')
    raise RunError('--strategy=multi_worker needs a cluster: neither TF_CONFIG (cluster and task, '
                   'see tf.distribute.MultiWorkerMirroredStrategy) nor a Slurm job step (srun: '
                   'SLURM_PROCID) is in the environment.')
  gpus = tf.config.list_logical_devices('GPU')
  if name == 'one_device':
    return tf.distribute.OneDeviceStrategy((gpus or tf.config.list_logical_devices('CPU'))[0].name)
  if name == 'mirrored':
    return mirrored_strategy([d.name for d in (gpus or tf.config.list_logical_devices('CPU'))])
  return mirrored_strategy() if gpus else tf.distribute.get_strategy()


def cluster_description(strategy):
  """'2 workers (this is worker 1; the chief: worker 0 at host:port)', or None on one machine."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
  if not spec:
    return None
  chief = ('chief', 0) if 'chief' in spec else ('worker', 0)
  count = sum(len(tasks) for tasks in spec.values())
  source = 'Slurm' if isinstance(resolver, SlurmCluster) else 'TF_CONFIG'
  return (f'{count} workers from {source} (this is {resolver.task_type} {resolver.task_id}; the '
          f'chief: {chief[0]} {chief[1]} at {spec[chief[0]][chief[1]]})')


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


def gather_from_workers(strategy, value):
  """`value` (a number) of every replica of every worker, as a sorted list of distinct values;
  a collective op: every worker calls it at the same point."""
  def gather():
    context = tf.distribute.get_replica_context()
    return context.all_gather(tf.constant([float(value)], tf.float64), axis=0)
  values = strategy.experimental_local_results(tf.function(lambda: strategy.run(gather))())[0]
  return sorted({float(v) for v in values.numpy()})


def check_same_start(strategy, step, directory):
  """Raises `RunError` on every worker unless all resume from the same step: each reads the
  checkpoints in `directory` itself, so a worker that cannot see the chief's would start over
  while the others resume."""
  steps = [int(s) for s in gather_from_workers(strategy, step)]
  if len(steps) > 1:
    resolver = strategy.cluster_resolver
    raise RunError(f'The workers would resume from different steps ({", ".join(map(str, steps))});'
                   f' this one ({resolver.task_type} {resolver.task_id}) from step {step}, the '
                   f'newest checkpoint it finds in {directory}. Every worker must read the '
                   'chief\'s checkpoints there: a file system they all mount, or a copy of '
                   'that folder on each.')


def check_shared_workdir(strategy, workdir):
  """Raises `RunError` on every worker unless each sees the `config.json` the chief has just
  written in `workdir` (a first run: no checkpoint to compare yet)."""
  gather_from_workers(strategy, 0)  # the chief has written it
  path = os.path.join(workdir, 'config.json')
  seen = gather_from_workers(strategy, os.path.exists(path))
  if seen != [1.]:
    resolver = strategy.cluster_resolver
    where = ('this one does not' if not os.path.exists(path) else 'another one does not')
    raise RunError(f'Not every worker sees {path}, which the chief wrote ({where}; this is '
                   f'{resolver.task_type} {resolver.task_id}): the workdir must be on a file '
                   'system every worker mounts, where they all read the chief\'s checkpoints.')
