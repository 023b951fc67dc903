"""Trains Real NVP with Keras `fit`, checkpointing and resuming, then evaluates and samples.

  python -m launch.train --workdir=runs/mnist [--dataset=mnist] [--preset=...] [overrides]

Rerunning the same command resumes from the newest checkpoint that loads (never from step 0
over existing checkpoints: `--restart` sets the old run's files aside and starts over). One run
per workdir at a time (an OS lock, released however the run ends). A loss that is not finite
stops the run with an error, and a model that is not finite is never checkpointed.
"""

import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from launch import common
from launch import flags as launch_flags
from tfp_realnvp import hardware, training
from tfp_realnvp.data import evaluation_batches, on_images, training_batches
from tfp_realnvp.images import save_png
from tfp_realnvp.model import RealNVP, to_uint8
from tfp_realnvp.nets import CouplingNet
from tfp_realnvp.ood import perturb

FLAGS = launch_flags.FLAGS
launch_flags.define_workdir('Directory of the run: config.json, checkpoints/, logs/ (TensorBoard), '
                            'metrics.json, samples.png.')
launch_flags.define_data()
launch_flags.define_model()
launch_flags.define_training()
launch_flags.define_noise_draws()
launch_flags.define_sampling()
launch_flags.define('float', 'background_noise', 0., 'Train a background model (Ren et al., '
                    '2019) for launch.ood\'s likelihood_ratio: each training image with this '
                    'fraction of its pixels replaced by uniform noise (0.2 for a local model: '
                    '--num_scales=1 --num_blocks=1 --num_filters=8, docs/ood.md; 0: the images '
                    'as they are).', lower_bound=0., upper_bound=1.)
launch_flags.define('bool', 'restart', False, 'Start from step 0 even if the workdir holds '
                    'checkpoints (they, the config, metrics and logs are moved to '
                    'WORKDIR/before-restart-TIME/, not deleted). For one run: a command rerun to '
                    'resume must not carry it.')


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
      'data': {'dataset': data.name, 'data_dir': FLAGS.data_dir, 'image_size': FLAGS.image_size,
               **({'class_names': list(data.class_names)} if data.labeled else {})},
      'train': {'batch_size': FLAGS.batch_size, 'epochs': FLAGS.epochs,
                'replicas': strategy.num_replicas_in_sync, 'jit_compile': FLAGS.jit_compile,
                'strategy': FLAGS.strategy, 'seed': FLAGS.seed, 'noise_draws': FLAGS.noise_draws,
                **({'background_noise': FLAGS.background_noise} if FLAGS.background_noise
                   else {})},
  }


def banner(model, config, data, strategy, global_batch, steps, start):
  preset = launch_flags.preset_name(data) + ('' if FLAGS.preset else ', from the data')
  common.say(f'launch.train: {model.name}, {config.num_scales} scales, {config.num_blocks} '
             f'block(s), {config.num_filters} features (preset {preset}), '
             f'{model.count_params():,} parameters, images {list(config.image_shape)}')
  common.say(f'  data: {data.name}, {_count(data.num_train)} train / {_count(data.num_test)} '
             f'test images{" (streamed from disk)" if data.streamed else ""}'
             + (f'; class-conditional, {config.num_classes} classes' if config.num_classes
                else ''))
  common.say(f'  strategy: {common.strategy_name(strategy)}, {strategy.num_replicas_in_sync} '
             f'replica(s), global batch {global_batch} ({FLAGS.batch_size} per replica), '
             f'{steps} steps/epoch, {FLAGS.epochs} epochs'
             f'{", XLA" if FLAGS.jit_compile else ""}'
             f'{", " + config.compute_dtype if config.compute_dtype else ""}')
  cluster = training.cluster_description(strategy)
  if cluster:
    common.say(f'  cluster: {cluster}')
  if FLAGS.background_noise:
    common.say(f'  background model: {FLAGS.background_noise:.0%} of each training image\'s '
               'pixels replaced by noise (for launch.ood --background_workdir)')
  common.say(f'  {recompute_summary(model, config, strategy.num_replicas_in_sync)}')
  if config.compute_dtype:
    native, why = hardware.native_precision(config.compute_dtype)
    common.say(f'  mixed precision: {why}' if native else f'  warning: {why}')
  where = f'resuming from step {start}' if start else 'new run'
  common.say(f'  workdir: {FLAGS.workdir} ({where})')


def recompute_summary(model, config, replicas):
  """What `--recompute` does in this run, in words."""
  networks = [layer for layer in model.flow_layers if isinstance(layer, CouplingNet)]
  levels = [net.recompute for net in networks]
  setting = f'recompute={config.recompute}'
  if 'networks' in levels:
    return (f'{setting}: each coupling network runs again in the backward pass (no activations '
            'kept)')
  why_not = ('float64' if config.dtype == 'float64' else
             f'batch statistics synchronized over {replicas} replicas'
             if config.sync_batch_norm and replicas > 1 else None)
  if set(levels) == {'none'} or why_not:
    return (f'{setting}: {f"not applied ({why_not}); " if why_not else ""}autodiff keeps every '
            'activation for the backward pass')
  blocks = sum(level == 'blocks' and net.blocks is not None for net, level in
               zip(networks, levels))
  return (f'{setting}: ' + (f'the residual blocks of {blocks} of {len(networks)} coupling '
                            'networks keep only their input (their first convolution runs '
                            'again); ' if blocks else '') +
          'each batch norm -> ReLU -> convolution unit keeps only its input (its batch norm and '
          'ReLU run again)')


def _count(number):
  return f'{number:,}' if number is not None else '?'


def main(argv):
  del argv
  if FLAGS.cpu_devices:
    training.split_cpu(FLAGS.cpu_devices)
  strategy = training.build_strategy(FLAGS.strategy, FLAGS.slurm_port)
  chief = training.is_chief(strategy)
  multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
  if FLAGS.restart and multi_worker:
    raise training.RunError('--restart is not for multi-worker runs (workers would read the '
                            'workdir while the chief moves files): restart once with one worker, '
                            'or move WORKDIR/checkpoints aside by hand.')
  # before anything is moved or read
  common.check_xla(FLAGS.jit_compile, strategy.num_replicas_in_sync)
  if chief:
    training.lock_workdir(FLAGS.workdir)
    if FLAGS.restart:
      aside = training.set_aside_run(FLAGS.workdir)
      if aside:
        common.say(f'--restart: the previous run\'s files are in {aside}; starting from step 0.')
  saved = (training.read_run_config(FLAGS.workdir)['model']
           if os.path.exists(os.path.join(FLAGS.workdir, 'config.json')) else None)
  data = launch_flags.load_data(FLAGS.dataset, FLAGS.data_dir, FLAGS.image_size,
                                labels=launch_flags.wants_labels(saved))
  config = launch_flags.model_config(data, saved)  # a resumed run keeps its run settings
  global_batch = FLAGS.batch_size * strategy.num_replicas_in_sync
  steps = training.steps_per_epoch(data.num_train, global_batch, FLAGS.steps_per_epoch)
  config_of_run = run_config(data, config, strategy)
  training.check_run_config(FLAGS.workdir, config_of_run)

  keras.utils.set_random_seed(FLAGS.seed)
  with strategy.scope():
    model = RealNVP(config)
    model.compile(jit_compile=FLAGS.jit_compile)
    checkpointer = training.Checkpointer(FLAGS.workdir, model, strategy, FLAGS.keep_checkpoints)
  start = checkpointer.restore_latest() or 0
  if multi_worker:
    training.check_same_start(strategy, start, checkpointer.directory)
  checkpointer.set_aside_skipped()  # newer, unloadable ones: kept aside, out of the rotation
  model.optimizer.learning_rate = config.learning_rate  # this run's, not the checkpoint's
  if start:
    common.say(f'Resuming from step {start}.')
  if chief:  # the run is known to start: only now is its config written
    training.write_run_config(FLAGS.workdir, config_of_run)
    banner(model, config, data, strategy, global_batch, steps, start)
  if multi_worker:
    training.check_shared_workdir(strategy, FLAGS.workdir)

  throughput = Throughput(global_batch)
  advice = (f'Lower --learning_rate (now {config.learning_rate:g}) or --clipnorm (now '
            f'{config.clipnorm:g}) and rerun the same command to resume from the last checkpoint.')
  callbacks = [training.StopOnDivergence(checkpointer, advice),
               training.CheckpointEvery(checkpointer, FLAGS.checkpoint_every_steps), throughput]
  log_dir = os.path.join(FLAGS.workdir, 'logs')
  tensorboard = None
  if chief:
    real = np.stack([e[0] if data.labeled else e for e in data.test.take(36).as_numpy_iterator()])
    tensorboard = training.TensorBoardLogger(log_dir, FLAGS.log_every_steps,
                                             temperature=FLAGS.temperature, real_images=real,
                                             global_batch=global_batch)
    callbacks.append(tensorboard)
  terminal = training.interactive()
  if terminal:
    callbacks.append(training.EpochProgbar(FLAGS.epochs))
  elif chief:
    callbacks.append(training.ProgressLines(FLAGS.epochs, steps, global_batch,
                                            FLAGS.log_every_steps))
  # Keras reduces a first batch across workers, and collective ops take no uint8.
  integers = tf.int32 if multi_worker else tf.uint8
  batches = training_batches(data, global_batch, seed=FLAGS.seed, dtype=integers)
  if FLAGS.background_noise:  # a background model learns from perturbed images
    batches = batches.map(on_images(lambda x: perturb(x, FLAGS.background_noise)))
  # Validation bits/dim per epoch (Keras' evaluation: fresh noise each time) for TensorBoard.
  validation = evaluation_batches(data, global_batch, dtype=integers)
  started = time.time()
  # SIGTERM or Ctrl-C: the workers agree on a step, checkpoint it, and the run stops (42 or 130).
  preemption = training.SaveOnPreemption(checkpointer, strategy)
  callbacks.insert(1, preemption)  # after StopOnDivergence: a diverged step is never saved
  try:
    history = training.fit_resumable(model, batches, FLAGS.epochs, steps, start, callbacks,
                                     verbose=1 if terminal else 0, validation_data=validation)
  except training.Preempted as e:
    where = e.path or os.path.join(checkpointer.directory, f'ckpt-{e.step}') + ' (the chief\'s)'
    print(f'launch.train: stopped by {e.signal_name} at step {e.step}; checkpoint {where} '
          f'written. Run the same command to resume from it (exit status {e.status}).',
          file=sys.stderr, flush=True)
    sys.exit(e.status)
  except (tf.errors.UnavailableError, tf.errors.AbortedError) as e:
    if not multi_worker:
      raise
    saved = checkpointer.steps_on_disk()
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    said = next((f'{line} {after}' for line, after in zip(lines, lines[1:] + [''])
                 if 'unhealthy' in line or 'heartbeat' in line), lines[0] if lines else '')
    print(f'launch.train: a worker stopped answering ({type(e).__name__}: '
          f'{said[:200]}); the newest checkpoint is at step '
          f'{saved[0] if saved else "none"}. Start every worker again with the same command to '
          f'resume (exit status {training.REQUEUE}).', file=sys.stderr, flush=True)
    sys.exit(training.REQUEUE)
  finally:
    preemption.close()
  train_seconds = time.time() - started
  signalled = preemption.signal_name is not None
  if multi_worker:  # a signal to one worker in the last steps: every worker stops here
    signalled = training.gather_from_workers(strategy, signalled)[-1] > 0
  if signalled:  # after the last step: training is over and checkpointed
    print(f'launch.train: stopped by {preemption.signal_name or "a signal to another worker"} '
          f'after the last step ({checkpointer.step}, checkpointed); run the same command for the '
          f'test evaluation and samples.', file=sys.stderr, flush=True)
    sys.exit(training.INTERRUPTED if preemption.signal_name == 'SIGINT' else training.REQUEUE)

  progress = training.Progress('test evaluation', data.num_test) if chief else None
  test_bits = training.evaluate_bits_per_dim(model, evaluation_batches(data, global_batch),
                                             FLAGS.noise_draws, progress=progress)
  common.say(f'test bits/dim: {test_bits:.4f} ({data.name}, {FLAGS.noise_draws} noise draw(s) '
             f'per image{", given the labels" if config.num_classes else ""})')
  classifier = {}
  if config.num_classes:
    classifier = training.evaluate_classifier(
        model, evaluation_batches(data, global_batch),
        progress=training.Progress('Bayes classifier', data.num_test) if chief else None)
    common.say(f'test accuracy of Bayes\' classifier: {classifier["accuracy"]:.4f}; class-mixture '
               f'bits/dim {classifier["marginal_bits_per_dim"]:.4f}')
  if chief:
    tensorboard.write_test(test_bits, checkpointer.step)
    metrics_path = os.path.join(FLAGS.workdir, 'metrics.json')
    training.write_json_atomic(metrics_path, {
        'test_bits_per_dim': test_bits, 'noise_draws': FLAGS.noise_draws,
        'steps': checkpointer.step, 'epochs': FLAGS.epochs, 'steps_per_epoch': steps,
        'global_batch_size': global_batch, 'replicas': strategy.num_replicas_in_sync,
        'images_per_second': throughput.images_per_second, 'train_seconds': train_seconds,
        'train_bits_per_dim': (history.get('bits_per_dim') or [None])[-1],
        **({'test_accuracy': classifier['accuracy'],
            'test_marginal_bits_per_dim': classifier['marginal_bits_per_dim'],
            'num_classes': config.num_classes} if classifier else {})})
    samples = to_uint8(model.sample(64, FLAGS.temperature, seed=FLAGS.seed)).numpy()
    samples_path = save_png(samples, os.path.join(FLAGS.workdir, 'samples.png'))
    if config.num_classes:
      grid_path = os.path.join(FLAGS.workdir, 'class_grid.png')
      save_png(to_uint8(training.class_samples(model, 8, FLAGS.temperature, FLAGS.seed)).numpy(),
               grid_path, 8)
      samples_path += f', {grid_path} (a row per class)'
    newest = checkpointer.steps_on_disk()
    common.wrote([os.path.join(FLAGS.workdir, 'config.json'),
                  *([os.path.join(checkpointer.directory, f'ckpt-{newest[0]}') +
                     f' (newest of {len(newest)})'] if newest else []),
                  metrics_path, samples_path, f'{log_dir}/ (TensorBoard: tensorboard '
                  f'--logdir={log_dir})'])


def train(argv):
  """`main`, with SIGTERM before or after training (outside `fit`, where the run checkpoints and
  stops) also exiting REQUEUE: nothing is lost, the newest checkpoint is named."""
  try:
    main(argv)
  except common.Terminated:
    steps = training.checkpoint_steps(FLAGS.workdir)
    newest = (f'the newest checkpoint is {os.path.join(FLAGS.workdir, "checkpoints")}'
              f'/ckpt-{steps[0]}' if steps else 'no checkpoint yet')
    print(f'launch.train: stopped by SIGTERM outside the training steps; {newest}. Run the same '
          f'command to resume (exit status {training.REQUEUE}).', file=sys.stderr, flush=True)
    sys.exit(training.REQUEUE)


if __name__ == '__main__':
  common.run(train, required=['workdir'])
