"""Trains Real NVP with Keras `fit`, checkpointing and resuming, then evaluates and samples.

  python -m launch.train --workdir=runs/mnist [--dataset=mnist] [--preset=...] [overrides]

Rerunning the same command resumes from the newest checkpoint that loads (never from step 0
over existing checkpoints: `--restart` sets the old run's files aside and starts over). One run
per workdir at a time (an OS lock, released however the run ends). A loss that is not finite
stops the run with an error, and a model that is not finite is never checkpointed.
"""

import os
import time

from absl import app, flags, logging
import keras
import tensorflow as tf

from launch import flags as launch_flags
from launch.common import fail_clearly
from tfp_realnvp import training
from tfp_realnvp.data import evaluation_batches, training_batches
from tfp_realnvp.images import save_png
from tfp_realnvp.model import RealNVP, to_uint8

FLAGS = launch_flags.FLAGS
flags.DEFINE_bool('restart', False, 'Start from step 0 even if the workdir holds checkpoints '
                  '(they, the config, metrics and logs are moved to WORKDIR/before-restart-TIME/, '
                  'not deleted). For one run: a command rerun to resume must not carry it.')


class Throughput(keras.callbacks.Callback):
  """Images per second over the steps after the first (which traces and compiles)."""

  def __init__(self, global_batch):
    super().__init__()
    self.global_batch, self.steps, self.seconds = global_batch, 0, 0.
    self._start, self._first_done = None, False

  def on_train_batch_begin(self, batch, logs=None):
    self._start = time.perf_counter()

  def on_train_batch_end(self, batch, logs=None):
    if self._first_done:
      self.steps += 1
      self.seconds += time.perf_counter() - self._start
    self._first_done = True

  @property
  def images_per_second(self):
    return self.steps * self.global_batch / self.seconds if self.seconds else None


def run_config(data, config, strategy):
  return {
      'model': config.to_dict(),
      'data': {'dataset': data.name, 'data_dir': FLAGS.data_dir, 'image_size': FLAGS.image_size},
      'train': {'batch_size': FLAGS.batch_size, 'epochs': FLAGS.epochs,
                'replicas': strategy.num_replicas_in_sync, 'jit_compile': FLAGS.jit_compile,
                'strategy': FLAGS.strategy, 'seed': FLAGS.seed, 'noise_draws': FLAGS.noise_draws},
  }


@fail_clearly
def main(argv):
  del argv
  if FLAGS.cpu_devices:
    training.split_cpu(FLAGS.cpu_devices)
  strategy = training.build_strategy(FLAGS.strategy)
  data = launch_flags.load_data(FLAGS.dataset, FLAGS.data_dir, FLAGS.image_size)
  config = launch_flags.model_config(data)
  global_batch = FLAGS.batch_size * strategy.num_replicas_in_sync
  steps = training.steps_per_epoch(data.num_train, global_batch, FLAGS.steps_per_epoch)
  chief = training.is_chief(strategy)
  if FLAGS.restart and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    raise training.RunError('--restart is not for multi-worker runs (workers would read the '
                            'workdir while the chief moves files): restart once with one worker, '
                            'or move WORKDIR/checkpoints aside by hand.')
  if chief:
    training.lock_workdir(FLAGS.workdir)
    if FLAGS.restart:
      aside = training.set_aside_run(FLAGS.workdir)
      if aside:
        print(f'--restart: the previous run\'s files are in {aside}; starting from step 0.',
              flush=True)
  config_of_run = run_config(data, config, strategy)
  training.check_run_config(FLAGS.workdir, config_of_run)

  keras.utils.set_random_seed(FLAGS.seed)
  with strategy.scope():
    model = RealNVP(config)
    model.compile(jit_compile=FLAGS.jit_compile)
    checkpointer = training.Checkpointer(FLAGS.workdir, model, strategy, FLAGS.keep_checkpoints)
  start = checkpointer.restore_latest() or 0
  checkpointer.set_aside_skipped()  # newer, unloadable ones: kept aside, out of the rotation
  model.optimizer.learning_rate = config.learning_rate  # this run's, not the checkpoint's
  if start:
    logging.info('Resuming from the checkpoint at step %d.', start)
    print(f'Resuming from step {start}.', flush=True)
  if chief:  # the run is known to start: only now is its config written
    training.write_run_config(FLAGS.workdir, config_of_run)

  throughput = Throughput(global_batch)
  advice = (f'Lower --learning_rate (now {config.learning_rate:g}) or --clipnorm (now '
            f'{config.clipnorm:g}) and rerun the same command to resume from the last checkpoint.')
  callbacks = [training.StopOnDivergence(checkpointer, advice),
               training.CheckpointEvery(checkpointer, FLAGS.checkpoint_every_steps), throughput]
  if chief:
    log_dir = os.path.join(FLAGS.workdir, 'logs')
    callbacks += [keras.callbacks.TensorBoard(log_dir, update_freq='epoch'),
                  training.SampleGrid(log_dir, temperature=FLAGS.temperature)]
  # Keras reduces a first batch across workers, and collective ops take no uint8.
  multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
  integers = tf.int32 if multi_worker else tf.uint8
  batches = training_batches(data, global_batch, seed=FLAGS.seed, dtype=integers)
  # Validation bits/dim per epoch (Keras' evaluation: fresh noise each time) for TensorBoard.
  validation = evaluation_batches(data, global_batch, dtype=integers)
  started = time.time()
  history = training.fit_resumable(model, batches, FLAGS.epochs, steps, start, callbacks,
                                   validation_data=validation)
  train_seconds = time.time() - started

  test_bits = training.evaluate_bits_per_dim(model, evaluation_batches(data, global_batch),
                                             FLAGS.noise_draws)
  print(f'test bits/dim: {test_bits:.4f} ({data.name}, {FLAGS.noise_draws} noise draw(s) per image)')
  if chief:
    training.write_json_atomic(os.path.join(FLAGS.workdir, 'metrics.json'), {
        'test_bits_per_dim': test_bits, 'noise_draws': FLAGS.noise_draws,
        'steps': checkpointer.step, 'epochs': FLAGS.epochs, 'steps_per_epoch': steps,
        'global_batch_size': global_batch, 'replicas': strategy.num_replicas_in_sync,
        'images_per_second': throughput.images_per_second, 'train_seconds': train_seconds,
        'train_bits_per_dim': (history.get('bits_per_dim') or [None])[-1]})
    samples = to_uint8(model.sample(64, FLAGS.temperature, seed=FLAGS.seed)).numpy()
    save_png(samples, os.path.join(FLAGS.workdir, 'samples.png'))


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
