"""Batch normalization as an invertible flow layer that follows Keras' training flag."""

import contextlib
import threading

import keras
import tensorflow as tf

from tfp_realnvp.bijectors.base import FlowBijector, per_pixel_log_det


class BatchStatistics(keras.layers.Layer):
  """Per-channel mean and variance: of the batch in training (and updating running averages),
  the running averages in inference.

  Batch statistics are synchronized across replicas under `tf.distribute`, so a global batch
  gives the same normalization (and loss) on any number of devices; `synchronized=False` takes
  each replica's own (no collective ops; the loss then depends on the split).
  """

  def __init__(self, momentum=0.9, synchronized=True, **kwargs):
    super().__init__(**kwargs)
    self.momentum, self.synchronized = momentum, synchronized

  def build(self, input_shape):
    channels = (input_shape[-1],)
    self.moving_mean = self.add_weight(shape=channels, initializer='zeros', trainable=False,
                                       name='moving_mean', aggregation='mean', autocast=False)
    self.moving_variance = self.add_weight(shape=channels, initializer='ones', trainable=False,
                                           name='moving_variance', aggregation='mean',
                                           autocast=False)

  def call(self, x, training=False, with_count=False, normalize_epsilon=None):
    """`(mean, variance)`: the batch's in training (updating the running averages), else the
    running averages; with `with_count` in training, also the number of values per channel (over
    every replica's batch when synchronized).

    With `normalize_epsilon` in training: `normalize_by_batch(x, <the batch's statistics>,
    normalize_epsilon)`, `(y, log_std)`, updating the running averages."""
    if training and normalize_epsilon is not None:
      return self._normalize(x, normalize_epsilon)
    if not training:
      return self.moving_mean, self.moving_variance
    mean, variance, count = synchronized_moments(x, with_count=True,
                                                 synchronized=self.synchronized)
    for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
      assign_running_average(moving, moving_average(moving, batch, self.momentum, count))
    return (mean, variance, count) if with_count else (mean, variance)

  def _normalize(self, x, epsilon):
    if self.synchronized and not one_replica():  # collective ops: not in a nested function
      mean, variance, count = self(x, training=True, with_count=True)
      return normalize_by_batch(x, *(tf.cast(t, x.dtype) for t in (mean, variance, count)),
                                epsilon, synchronized=True)
    y, log_std, *updated = _normalize_traced(x, tf.convert_to_tensor(self.moving_mean),
                                             tf.convert_to_tensor(self.moving_variance),
                                             self.momentum, epsilon)
    for moving, bits in zip((self.moving_mean, self.moving_variance), updated):
      assign_running_average(moving, tf.bitcast(bits, moving.dtype))
    return y, log_std

  def get_config(self):
    return {**super().get_config(), 'momentum': self.momentum, 'synchronized': self.synchronized}


def _normalize_with_updates_as_bits(x, moving_mean, moving_variance, momentum, epsilon):
  """`BatchStatistics(x, training=True, normalize_epsilon=epsilon)` on this replica's batch
  with no side effects: `(y, log_std, *updated running averages as bits)`."""
  mean, variance, count = synchronized_moments(x, with_count=True, synchronized=False)
  updated = tuple(moving_average(m, batch, momentum, count)
                  for m, batch in ((moving_mean, mean), (moving_variance, variance)))
  count = (tf.constant(count, x.dtype) if isinstance(count, float) else  # (tf.cast would
           tf.cast(count, x.dtype))                                       # go through float32)
  y, log_std = normalize_by_batch(x, tf.cast(mean, x.dtype), tf.cast(variance, x.dtype), count,
                                  epsilon, synchronized=False)
  return (y, log_std, *(as_bits(u) for u in updated))


_deferred = threading.local()  # per thread: MirroredStrategy traces each replica in its own


@contextlib.contextmanager
def deferred_running_averages():
  """Inside, `assign_running_average` records `(variable, value)` in the list this yields
  instead of assigning: the caller assigns them, e.g. outside an XLA-compiled function, where
  a mirrored variable's assignment (a cross-replica merge of its replicas' values) cannot run.
  Per thread: under MirroredStrategy, open it inside the replica function (each replica is
  traced in a thread of its own)."""
  outer = getattr(_deferred, 'updates', None)
  _deferred.updates = []
  try:
    yield _deferred.updates
  finally:
    _deferred.updates = outer


def assign_running_average(variable, value):
  """`variable.assign(value)` for a running average, or recorded for the caller inside
  `deferred_running_averages()`."""
  updates = getattr(_deferred, 'updates', None)
  if updates is None:
    variable.assign(value)
  else:
    updates.append((variable, value))


def as_bits(x):
  """`x`'s bits as integers of its width (`tf.bitcast`): not differentiable."""
  return tf.bitcast(x, {2: tf.int16, 4: tf.int32, 8: tf.int64}[x.dtype.size])


# In training, one traced function per shape serves every batch norm of that shape (the flow of
# the small MNIST model has 16 in 5 shapes): tracing each copy in the step's graph (some 60 ops
# with its gradient) was a tenth of that graph, and the graph's size is most of the first step.
# The running averages leave as bits (integers), for the reasons of the networks' shared
# functions (`nets/network.py`). Training only, where the flow's batch norms run one after
# another (see `nets.plan`); it holds no convolution.
_normalize_traced = tf.function(_normalize_with_updates_as_bits, autograph=False,
                                experimental_attributes={'_noinline': True})


def moving_average(moving, batch, momentum, count):
  """`momentum * moving + (1 - momentum) * batch`, or `moving` unchanged when the batch is empty
  (`count` values in all replicas' batches), whose statistics are undefined."""
  moving = tf.convert_to_tensor(moving)
  batch = tf.stop_gradient(tf.cast(batch, moving.dtype))
  # No select: the weight of the batch is 0 for an empty batch (whose statistics are 0, finite).
  weight = ((1. - momentum) * min(count, 1.) if isinstance(count, (int, float)) else
            (1. - momentum) * tf.minimum(tf.cast(count, moving.dtype), 1.))
  return moving + weight * (batch - moving)


def one_replica():
  """Whether this runs outside any strategy's replicas or on a single one."""
  context = tf.distribute.get_replica_context()
  return context is None or context.num_replicas_in_sync == 1


def synchronized_moments(x, with_count=False, synchronized=True):
  """Per-channel mean and variance of `[N, H, W, C]` over every replica's batch, in two passes
  (E[x^2] - E[x]^2 cancels badly in float32 when the mean is large); with `with_count`, also the
  number of values per channel (a Python float when the batch's shape is known while tracing and
  the statistics are local). An empty batch gives zeros. `synchronized=False`: this replica's
  batch alone.

  Across replicas, two all-reduces forward (the sums with the count, then the squared
  deviations), however many channels, and two backward under autodiff (`normalize_by_batch`
  takes one).
  """
  context = tf.distribute.get_replica_context()
  local = not synchronized or one_replica()
  if local and x.shape[:3].is_fully_defined():  # a Python number: no ops for it in the graph
    count = float(x.shape[:3].num_elements())
  else:
    count = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), x.dtype)
  sums = tf.reduce_sum(x, axis=[0, 1, 2])
  if not local:  # the count travels with the sums: one all-reduce
    packed = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.concat([sums, count[None]], 0))
    sums, count = packed[:-1], tf.stop_gradient(packed[-1])
  divisor = max(count, 1.) if isinstance(count, float) else tf.maximum(count, 1.)
  mean = sums / divisor
  squares = tf.reduce_sum(tf.square(x - mean), axis=[0, 1, 2])
  if not local:
    squares = context.all_reduce(tf.distribute.ReduceOp.SUM, squares)
  variance = squares / divisor
  return (mean, variance, count) if with_count else (mean, variance)


def normalize_by_batch(x, mean, variance, count, epsilon, synchronized=True):
  """`(y, log_std)`: `y = (x - mean) * exp(-log_std)`, `log_std = 0.5 * log(variance + epsilon)`
  per channel, for the batch's own statistics `mean`, `variance` (of `count` values per channel,
  over every replica's batch when `synchronized`), with their dependence on `x` in the gradient,
  as autodiff through `synchronized_moments` gives it but in a few ops and one all-reduce. With
  `x^ = (x - mean) / std`, `dy` and `dlog_std` the gradients at the outputs and `N = count`:

    dx = (dy - (sum dy + x^ * (sum(dy x^) - dlog_std)) / N) / std    (sums: every replica's)
  """
  context = tf.distribute.get_replica_context()
  local = not synchronized or one_replica()

  @tf.custom_gradient
  def normalize(x):
    log_std = 0.5 * tf.math.log(tf.stop_gradient(variance) + epsilon)
    inverse_std = tf.exp(-log_std)
    x_hat = (x - tf.stop_gradient(mean)) * inverse_std

    def gradient(dy, dlog_std):
      sums = tf.stack([tf.reduce_sum(dy, [0, 1, 2]),
                       tf.reduce_sum(dy * x_hat, [0, 1, 2]) - dlog_std])
      if not local:  # (each replica's dlog_std is its share of the loss's)
        sums = context.all_reduce(tf.distribute.ReduceOp.SUM, sums)
      return inverse_std * (dy - (sums[0] + x_hat * sums[1]) / tf.maximum(count, 1.))
    return (x_hat, log_std), gradient
  return normalize(x)


class BatchNorm(FlowBijector):
  """Real NVP's batch normalization on a coupling's output, as a bijector.

    forward:   y = (x - mean) / sqrt(var + eps)
    inverse:   x = y * sqrt(var + eps) + mean
    log|det dy/dx| = -0.5 * H * W * sum_c log(var_c + eps)

  Per channel, with no learned scale or shift (as the official code). The forward (data to
  latent) with `training=True` uses the batch's statistics (the log-det treats them as constants,
  as the paper does) and updates the running averages; otherwise, and always in the inverse
  (sampling), it uses the running averages, so the Jacobian is exact in inference.

  Example:
    norm = BatchNorm(BatchStatistics(momentum=0.9), event_shape=[4, 4, 2])
    y, log_det = norm.forward_and_log_det(x, training=True)
  """

  def __init__(self, statistics, event_shape, epsilon=1e-4, validate_args=False,
               name='batch_norm', dtype=tf.float32):
    parameters = dict(locals())
    super().__init__(event_shape, validate_args, parameters, name, dtype)
    self._statistics = statistics
    self._epsilon = epsilon

  def _own_keras_layers(self):
    return [self._statistics]

  def _log_std(self, x, training):
    mean, variance = self._statistics(x, training=training)
    return mean, 0.5 * tf.math.log(tf.cast(variance, x.dtype) + self._epsilon)

  def _forward_and_log_det(self, x, training):
    if training:  # the batch's statistics, their gradient in one pass (`normalize_by_batch`)
      y, log_std = self._statistics(x, training=True, normalize_epsilon=self._epsilon)
      return y, per_pixel_log_det(self.event_shape_in, -log_std, x)
    mean, log_std = self._log_std(x, training)
    return ((x - tf.cast(mean, x.dtype)) * tf.exp(-log_std),
            per_pixel_log_det(self.event_shape_in, -log_std, x))

  def _inverse_and_log_det(self, y, training):
    mean, log_std = self._log_std(y, training=False)
    return (y * tf.exp(log_std) + tf.cast(mean, y.dtype),
            per_pixel_log_det(self.event_shape_in, log_std, y))
