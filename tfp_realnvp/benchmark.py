"""Speed and memory figures of a Real NVP model: what `python -m launch.benchmark` prints.

Every figure is the median of several timed calls after a warm-up call (which traces and
compiles; its time is reported as the time to the first step). FLOPs are counted from the traced
coupling networks' layers: `2 * N * H * W * K_h * K_w * C_in * C_out` per convolution ('same'
padding, stride 1); a training step costs three times that (each convolution's two backprop ops
cost as much as the forward). Other ops (elementwise, reductions) are left out: they are
memory-bound and well under 1% of the FLOPs. The limit is the FLOP/s of the same convolutions run
alone, forward and both backprops. These are the model's FLOPs: with `recompute=networks` the step
also runs each network forward again, a third more convolutions than it is credited with, and
with `recompute=largest_blocks` (the default in float32: the blocks on the largest maps, 24 of 80
at `cifar10`) or `blocks` the first convolution of each such block again (at `cifar10` about 4%
more).
"""

import collections
import dataclasses
import resource
import statistics
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from tfp_realnvp.bijectors.affine_coupling import AffineCoupling
from tfp_realnvp.data import Data, evaluation_batches, training_batches
from tfp_realnvp.model import RealNVP
from tfp_realnvp.nets import convolution_backward
from tfp_realnvp.compat import GRADIENT_ALL_REDUCE
from tfp_realnvp.training import evaluate_bits_per_dim, mirrored_strategy


def _status_bytes(field, pid='self'):
  """A memory field of /proc/PID/status (`VmRSS`, `VmHWM`) in bytes, or None (no such process,
  or not Linux)."""
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def peak_rss_bytes():
  """This process' peak resident memory so far: Linux's `VmHWM`, which counts this program only
  (`ru_maxrss` also keeps the peak of the process it was forked from, across `exec`)."""
  peak = _status_bytes('VmHWM')
  return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ResidentMemory:
  """The peak resident memory of process `pid` (this one by default) while inside the `with`
  block, sampled every `interval` seconds (the process' own peak also counts what ran before)."""

  def __init__(self, interval=0.02, pid='self'):
    self.interval, self.pid, self.peak_bytes = interval, pid, 0
    self._done = threading.Event()

  def current_bytes(self):
    return _status_bytes('VmRSS', self.pid) or 0

  def _sample(self):
    while not self._done.wait(self.interval):
      self.peak_bytes = max(self.peak_bytes, self.current_bytes())

  def __enter__(self):
    self.peak_bytes = self.current_bytes()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._done.set()
    self._thread.join()
    self.peak_bytes = max(self.peak_bytes, self.current_bytes())


def timed_calls(fn, calls):
  """`(first_call_seconds, median_seconds)`: one warm-up call, then `calls` timed ones.

  Each call's result is read back (`.numpy()`), so asynchronous devices are timed to the end.
  """
  def run():
    start = time.perf_counter()
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, 'numpy') else t, fn())
    return time.perf_counter() - start
  first = run()
  return first, statistics.median(run() for _ in range(calls))


def couplings(bijector):
  """Every `AffineCoupling` inside a flow, in forward order."""
  if isinstance(bijector, AffineCoupling):
    return [bijector]
  return [c for part in bijector.parts for c in couplings(part)]


def convolutions(model, batch_size):
  """`[(input_shape, kernel_shape, output_shape)]` of every convolution of the coupling
  networks, from their layers and the event shapes the flow gives them."""
  shapes = []
  for coupling in couplings(model.flow):
    height, width, _ = coupling.event_shape_in
    for kernel in coupling.network.kernel_shapes:
      shapes.append(((batch_size, height, width, kernel[2]), kernel,
                     (batch_size, height, width, kernel[3])))
  return shapes


def convolution_flops(shapes):
  """Forward FLOPs of `convolutions`' shapes (a multiply-add counts 2)."""
  return sum(2 * np.prod(out) * np.prod(kernel[:3]) for _, kernel, out in shapes)


def convolutions_alone_seconds(shapes, calls, dtype=tf.float32):
  """Seconds for every convolution of `shapes` forward and both backprops, run alone on random
  tensors of the same shapes (the hardware's limit for this model's convolutions): each distinct
  shape timed by itself (median of `calls`), times how often it occurs."""
  total = 0.
  for (x_shape, w_shape, y_shape), count in collections.Counter(shapes).items():
    x, w, dy = (tf.random.normal(shape, dtype=dtype) for shape in (x_shape, w_shape, y_shape))

    @tf.function
    def run(x, w, dy):
      y = tf.nn.conv2d(x, w, 1, 'SAME')
      dx, dw = convolution_backward(x, w, dy)
      return tf.reduce_max(y) + tf.reduce_max(dx) + tf.reduce_max(dw)
    total += count * timed_calls(lambda: run(x, w, dy), calls)[1]
  return total


def networks_alone(model, batch_size, jit_compile=False):
  """A training step of the coupling networks alone: each network forward (batch statistics),
  backward and the optimizer's update, on random inputs of the shapes the flow gives them (no
  flow, clipping or L2 term). With `jit_compile`, the networks are compiled with XLA, as the
  flow is in the train step."""
  nets = [(c.network, tf.random.normal([batch_size, *c.event_shape_in[:2],
                                        c.event_shape_in[2] + 1]))
          for c in couplings(model.flow)]
  variables = model.trainable_variables

  @tf.function(jit_compile=jit_compile)
  def loss_of_networks():
    return tf.add_n([tf.reduce_mean(s) + tf.reduce_mean(t)
                     for s, t in (net(x, training=True) for net, x in nets)])

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      loss = loss_of_networks()
    model.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss
  return step


def _train_step_timings(model, batches, steps):
  """Runs Keras `fit` for `1 + steps` steps; returns `(first, median, traces)`: the first step's
  seconds (tracing included), the median of the others, and how often `train_step` was traced."""
  times, traces = [], []
  train_step = model.train_step

  def counted(data):
    traces.append(1)  # Python runs here only while tracing
    return train_step(data)
  model.train_step = counted

  class Clock(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
      self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
      float(logs['loss'])  # the step is done
      times.append(time.perf_counter() - self.start)

  start = time.perf_counter()
  model.fit(batches, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[Clock()])
  # fit's own work outside the steps (setup, teardown) is counted with the first step
  first = times[0] + (time.perf_counter() - start - sum(times))
  del model.train_step
  return first, statistics.median(times[1:]), len(traces)


def pipeline_images_per_second(batches, batch_size, steps=50):
  iterator = iter(batches)
  next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return steps * batch_size / (time.perf_counter() - start)


def synthetic_data(image_shape, count=512, seed=0):
  images = np.random.default_rng(seed).integers(0, 256, (count, *image_shape), dtype=np.uint8)
  dataset = tf.data.Dataset.from_tensor_slices(images)
  return Data('synthetic', dataset, dataset, tuple(image_shape), count, count)


@dataclasses.dataclass
class Options:
  batch_size: int = 64
  steps: int = 5
  jit_compile: bool = False


def benchmark(config, options=Options(), report=print):
  """Every figure for the model `config` (a `RealNVPConfig`), as a dict; `report` gets lines."""
  b = options.batch_size
  figures = {'config': config.to_dict(), 'batch_size': b, 'jit_compile': options.jit_compile,
             'threads': {'intra_op': tf.config.threading.get_intra_op_parallelism_threads(),
                         'inter_op': tf.config.threading.get_inter_op_parallelism_threads()}}

  start = time.perf_counter()
  model = RealNVP(config)
  model.compile(jit_compile=options.jit_compile)
  figures['build_seconds'] = time.perf_counter() - start
  # The convolutions alone before training: run after it, they crashed TF 2.21 (segmentation
  # fault in the oneDNN backprop kernels) twice here.
  shapes = convolutions(model, b)
  flops_per_image = 3 * convolution_flops(shapes) / b
  compute_dtype = tf.as_dtype(config.compute_dtype or config.dtype)
  conv_seconds = convolutions_alone_seconds(shapes, options.steps, compute_dtype)
  data = synthetic_data(config.image_shape, count=max(8 * b, 256))
  batches = training_batches(data, b, seed=0)
  gpus = tf.config.list_logical_devices('GPU')
  if gpus:
    tf.config.experimental.reset_memory_stats(gpus[0].name)
  with ResidentMemory() as memory:
    first, median, traces = _train_step_timings(model, batches, options.steps)
  if gpus:  # host memory is not the GPU's
    figures['train_peak_gpu_bytes'] = tf.config.experimental.get_memory_info(gpus[0].name)['peak']
    report(f'peak GPU memory in training: {figures["train_peak_gpu_bytes"] / 2**30:.2f} GiB')
  figures.update(train_first_step_seconds=first, train_step_seconds=median,
                 train_images_per_second=b / median, train_traces=traces,
                 train_peak_rss_bytes=memory.peak_bytes)
  report(f'train step: {median:.3f} s ({b / median:.1f} images/s); first step {first:.1f} s; '
         f'train_step traced {traces}x; peak resident memory in training '
         f'{memory.peak_bytes / 2**30:.2f} GiB')
  figures['input_pipeline_images_per_second'] = pipeline_images_per_second(batches, b)
  report(f'input pipeline alone: {figures["input_pipeline_images_per_second"]:.0f} images/s')

  pixels = tf.constant(np.random.default_rng(1).uniform(0, 256, [b, *config.image_shape]),
                       tf.as_dtype(config.dtype))
  latent = model.encode(pixels)
  calls = {
      'log_prob': tf.function(lambda: model.log_prob(pixels), jit_compile=options.jit_compile),
      # The same density through TFP's API (`TransformedDistribution.log_prob`).
      'distribution_log_prob': tf.function(lambda: model.distribution.log_prob(pixels),
                                           jit_compile=options.jit_compile),
      'sample': tf.function(lambda: model.sample(b, seed=1), jit_compile=options.jit_compile),
      'encode': tf.function(lambda: model.encode(pixels), jit_compile=options.jit_compile),
      'decode': tf.function(lambda: model.decode(latent), jit_compile=options.jit_compile),
  }
  for name, fn in calls.items():
    first, median = timed_calls(fn, options.steps)
    figures[f'{name}_images_per_second'] = b / median
    figures[f'{name}_first_call_seconds'] = first
    report(f'{name}: {b / median:.1f} images/s (first call {first:.1f} s)')
  figures['distribution_log_prob_speed_ratio'] = (figures['distribution_log_prob_images_per_second']
                                                  / figures['log_prob_images_per_second'])
  report(f'model.distribution.log_prob at {figures["distribution_log_prob_speed_ratio"]:.2f}x '
         'the speed of model.log_prob')

  _, nets_seconds = timed_calls(networks_alone(model, b, options.jit_compile), options.steps)
  train_seconds = figures['train_step_seconds']
  figures.update(
      convolutions=len(shapes), train_flops_per_image=flops_per_image,
      train_flops_per_second=flops_per_image * b / train_seconds,
      convolutions_alone_flops_per_second=flops_per_image * b / conv_seconds,
      fraction_of_convolution_limit=conv_seconds / train_seconds,
      networks_alone_step_seconds=nets_seconds,
      flow_overhead=train_seconds / nets_seconds - 1.,
      peak_rss_bytes=peak_rss_bytes())
  report(f'FLOPs: {flops_per_image / 1e9:.2f} GFLOP per image per train step '
         f'({len(shapes)} convolutions); achieved '
         f'{figures["train_flops_per_second"] / 1e9:.1f} GFLOP/s, convolutions alone '
         f'{figures["convolutions_alone_flops_per_second"] / 1e9:.1f} GFLOP/s '
         f'({100 * figures["fraction_of_convolution_limit"]:.0f}% of the limit)')
  report(f'flow overhead: train step {train_seconds:.3f} s vs networks alone {nets_seconds:.3f} s '
         f'({100 * figures["flow_overhead"]:+.1f}%)')
  return figures


class _Budget(keras.callbacks.Callback):
  """Stops `fit` after `budget_seconds` of training, evaluating every `every_seconds` (the
  evaluations' time is not counted)."""

  def __init__(self, budget_seconds, every_seconds, evaluate, report):
    super().__init__()
    self.budget, self.every = budget_seconds, every_seconds
    self.evaluate, self.report = evaluate, report
    self.rows, self.paused = [], 0.

  def on_train_begin(self, logs=None):
    self.start = time.perf_counter()

  def on_train_batch_end(self, batch, logs=None):
    spent = time.perf_counter() - self.start - self.paused
    last = spent >= self.budget
    if last or spent >= (len(self.rows) + 1) * self.every:
      pause = time.perf_counter()
      self.rows.append((spent, batch + 1, self.evaluate()))
      self.report(f'{spent:7.1f} s  {batch + 1:6d} steps  test bits/dim {self.rows[-1][2]:.3f}')
      self.paused += time.perf_counter() - pause
    self.model.stop_training = last


def quality_per_budget(config, train, test, budget_seconds, evaluate_every_seconds,
                       batch_size=64, report=print, labels=None):
  """Trains `config` on uint8 `train` images for `budget_seconds` of wall-clock training (the
  first step's tracing included, evaluations not) and returns rows
  `(train_seconds, steps, test_bits_per_dim)`, about every `evaluate_every_seconds`, and the
  trained model. A class-conditional `config` takes `labels=(train_labels, test_labels)`; its
  test bits/dim are then of p(x | y)."""
  if labels is not None:
    train, test = (train, labels[0]), (test, labels[1])
  data = Data('quality', tf.data.Dataset.from_tensor_slices(train),
              tf.data.Dataset.from_tensor_slices(test), config.image_shape,
              len(labels[0] if labels is not None else train),
              len(labels[1] if labels is not None else test),
              num_classes=config.num_classes or None)
  model = RealNVP(config)
  model.compile()
  test_batches = evaluation_batches(data, 256)
  budget = _Budget(budget_seconds, evaluate_every_seconds,
                   lambda: evaluate_bits_per_dim(model, test_batches), report)
  model.fit(training_batches(data, batch_size, seed=0), epochs=1, steps_per_epoch=10**9,
            verbose=0, callbacks=[budget])
  return budget.rows, model


COLLECTIVE_OPS = ('CollectiveReduce', 'CollectiveReduceV2', 'CollectiveReduceV3',
                  'CollectiveGather', 'CollectiveGatherV2', 'CollectiveReduceScatterV2',
                  'CollectiveAllToAllV2', 'CollectiveAllToAllV3', 'NcclAllReduce')


def collective_ops_per_step(model, strategy, batch):
  """The collective ops one replica runs in a training step (`model.train_step` under
  `strategy.run`, traced, not run), from the step's graph and every function it calls:
  `{'gradient': n, 'batch_norm': m, 'other': k}`. The gradient's all-reduce is the one in the
  optimizer's name scope `GRADIENT_ALL_REDUCE`; the others are the synchronized batch norms'
  (forward and backward)."""
  distributed = next(iter(strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensors(batch))))
  step = tf.function(lambda data: strategy.run(model.train_step, args=(data,)))
  graph = step.get_concrete_function(distributed).graph.as_graph_def()
  counts = collections.Counter()
  for nodes in [graph.node, *(f.node_def for f in graph.library.function)]:
    for node in nodes:
      if node.op in COLLECTIVE_OPS:
        kind = ('gradient' if GRADIENT_ALL_REDUCE in node.name else
                'batch_norm' if node.op.startswith('CollectiveReduce') else 'other')
        counts[kind] += 1
  replicas = strategy.num_replicas_in_sync
  return {kind: counts[kind] // replicas for kind in ('gradient', 'batch_norm', 'other')}


def replica_scaling(config, devices, options=Options(), report=print):
  """Training images/s on 1 replica and on all `devices` (a `MirroredStrategy` each), at the
  same global batch (`options.batch_size`, split over the replicas), with the collective ops per
  step of each: a list of dicts (without XLA: `RealNVP.compile` takes `jit_compile` on one
  replica only)."""
  b = options.batch_size
  if b % len(devices):
    raise ValueError(f'the global batch ({b}) must split evenly over {len(devices)} replicas.')
  data = synthetic_data(config.image_shape, count=max(8 * b, 256))
  batch = next(iter(training_batches(data, b, seed=0)))
  rows = []
  for replicas in sorted({1, len(devices)}):
    strategy = mirrored_strategy(devices[:replicas])
    with strategy.scope():
      model = RealNVP(config)
      model.compile()
    collectives = collective_ops_per_step(model, strategy, batch)
    first, median, _ = _train_step_timings(model, training_batches(data, b, seed=0),
                                           options.steps)
    rows.append({'replicas': replicas, 'global_batch': b, 'train_step_seconds': median,
                 'train_images_per_second': b / median, 'train_first_step_seconds': first,
                 'collective_ops_per_step': collectives})
    report(f'{replicas} replica(s), global batch {b}: {b / median:.1f} images/s (first step '
           f'{first:.1f} s); collective ops per replica per step: {collectives["gradient"]} '
           f'for the gradient, {collectives["batch_norm"]} for the synchronized batch norms'
           + (f', {collectives["other"]} other' if collectives['other'] else ''))
  if len(rows) == 2:
    rows[1]['speedup'] = rows[1]['train_images_per_second'] / rows[0]['train_images_per_second']
    report(f'{rows[1]["replicas"]} replicas at {rows[1]["speedup"]:.2f}x the images/s of one')
  return rows
