"""Glow's activation normalization (Kingma & Dhariwal, 2018) as a flow layer."""

import contextlib
import threading

import keras
import tensorflow as tf

from tfp_realnvp.bijectors.base import FlowBijector, per_pixel_log_det
from tfp_realnvp.bijectors.batch_norm import synchronized_moments

_init = threading.local()


@contextlib.contextmanager
def data_dependent_init():
  """Within this block, every `ActNorm` not yet initialised that a forward pass reaches (with
  `training=True`) takes its bias and scale from the batch it sees, then marks itself initialised
  (`RealNVP.fit` opens it for one pass over its first batch; see `RealNVP.initialize_from_data`).

  Example:
    with data_dependent_init():
      flow.forward_and_log_det(first_batch, training=True)
  """
  before = getattr(_init, 'active', False)
  _init.active = True
  try:
    yield
  finally:
    _init.active = before


def initializing():
  """Whether this thread is inside `data_dependent_init()`."""
  return getattr(_init, 'active', False)


class ActNormParameters(keras.layers.Layer):
  """ActNorm's per-channel `bias` and `log_scale` (trainable, starting at the identity), and
  `initialized` (0 until the data-dependent initialisation, then 1; in checkpoints, so a resumed
  run does not initialise again)."""

  def build(self, input_shape):
    channels = (input_shape[-1],)
    # Replicas assign the same values (the global batch's statistics): the first one's is kept.
    weight = dict(autocast=False, aggregation='only_first_replica')
    self.bias = self.add_weight(shape=channels, initializer='zeros', name='bias', **weight)
    self.log_scale = self.add_weight(shape=channels, initializer='zeros', name='log_scale',
                                     **weight)
    self.initialized = self.add_weight(shape=(), initializer='zeros', name='initialized',
                                       trainable=False, **weight)

  def call(self, x, training=False):
    """`(bias, log_scale)`; inside `data_dependent_init()` in training, first set from `x`
    (unless already initialised): the output then has zero mean and unit variance per channel
    over every replica's batch."""
    if training and initializing():
      mean, variance = synchronized_moments(tf.cast(x, self.bias.dtype))
      done = tf.cast(self.initialized, tf.bool)
      self.bias.assign(tf.where(done, self.bias, -mean))
      self.log_scale.assign(tf.where(done, self.log_scale,
                                     -tf.math.log(tf.sqrt(variance) + 1e-6)))
      self.initialized.assign(tf.ones_like(self.initialized))
    return tf.convert_to_tensor(self.bias), tf.convert_to_tensor(self.log_scale)


class ActNorm(FlowBijector):
  """Glow's ActNorm: a learned per-channel affine map, initialised from data.

    forward:   y = (x + bias) * exp(log_scale)
    inverse:   x = y * exp(-log_scale) - bias
    log|det dy/dx| = H * W * sum_c log_scale_c      (= H * W * sum_c log|scale_c|)

  Unlike batch normalization it does not depend on the batch once initialised: training and
  inference are the same map. Before its first training step it is set from a batch so that its
  output has zero mean and unit variance per channel (`data_dependent_init`; under a
  `tf.distribute` strategy, the statistics of the global batch), once: the `initialized` flag is
  kept in checkpoints.

  Example:
    norm = ActNorm(ActNormParameters(), event_shape=[4, 4, 2])
    with data_dependent_init():
      norm.forward_and_log_det(first_batch, training=True)
  """

  def __init__(self, parameters_layer, event_shape, validate_args=False, name='actnorm',
               dtype=tf.float32):
    parameters = dict(locals())
    super().__init__(event_shape, validate_args, parameters, name, dtype)
    self._parameters_layer = parameters_layer

  def _own_keras_layers(self):
    return [self._parameters_layer]

  def _forward_and_log_det(self, x, training):
    bias, log_scale = (tf.cast(p, x.dtype) for p in self._parameters_layer(x, training=training))
    return (x + bias) * tf.exp(log_scale), per_pixel_log_det(self.event_shape_in, log_scale, x)

  def _inverse_and_log_det(self, y, training):
    bias, log_scale = (tf.cast(p, y.dtype) for p in self._parameters_layer(y, training=False))
    return y * tf.exp(-log_scale) - bias, -per_pixel_log_det(self.event_shape_in, log_scale, y)
