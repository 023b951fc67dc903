"""Affine coupling with checkerboard and channel-wise masks (Real NVP, Eq. 9)."""

import numpy as np
import tensorflow as tf

from tfp_realnvp.bijectors.base import FlowBijector, sum_event


def checkerboard(height, width, parity, dtype=np.float32):
  """Mask `[H, W, 1]`: 1 where `(row + col) % 2 == parity` (parity 1: odd sums), else 0."""
  rows, cols = np.indices((height, width))
  return ((rows + cols) % 2 == parity).astype(dtype)[..., None]


def channel_mask(channels, parity, dtype=np.float32):
  """Mask `[1, 1, C]`: 1 on the first half of the channels (parity 0) or the second (parity 1)."""
  if channels % 2:
    raise ValueError(f'channel_mask: needs an even number of channels, got {channels}.')
  first = np.arange(channels) < channels // 2
  return (first if parity == 0 else ~first).astype(dtype)[None, None, :]


class AffineCoupling(FlowBijector):
  """Real NVP's masked affine coupling layer on `[H, W, C]` events.

  With a binary mask `b` and `(s, t) = network(b * x)`:

    forward:   y = b * x + (1 - b) * (x * exp(s) + t)
    inverse:   x = b * y + (1 - b) * (y - t) * exp(-s),   with (s, t) = network(b * y)
    log|det dy/dx| = sum((1 - b) * s)

  The network sees only `b * x`, which the forward leaves unchanged, so the inverse recomputes the
  same `(s, t)`; neither needs the network's own Jacobian. The network is a Keras layer called as
  `network(inputs, training=...) -> (s, t)`, each `[N, H, W, C]`; its input is `b * x` with one
  more channel: the checkerboard (which sites are given) or, for channel masks, ones (where the
  image ends under zero padding).
  It should bound `s` (Real NVP: `s = scale * tanh(.)`, see `tfp_realnvp.nets.CouplingNet`).
  Class-conditional: given `labels`, the network is called as `network(inputs, labels=labels,
  training=...)`, so `(s, t)` depend on the class; the log-det keeps its form, `sum((1 - b) * s)`.

  The network runs once per call of `forward_and_log_det` / `inverse_and_log_det`.

  Example:
    mask = checkerboard(4, 4, parity=0)
    coupling = AffineCoupling(mask, CouplingNet(channels=2, num_filters=8, num_blocks=1),
                              event_shape=[4, 4, 2])
    y, log_det = coupling.forward_and_log_det(tf.random.normal([8, 4, 4, 2]))
  """

  def __init__(self, mask, network, event_shape, validate_args=False, name='affine_coupling',
               dtype=tf.float32):
    parameters = dict(locals())
    super().__init__(event_shape, validate_args, parameters, name, dtype)
    mask = np.asarray(mask)
    if mask.ndim != 3 or not tf.TensorShape(mask.shape).is_compatible_with(
        [d if m != 1 else 1 for d, m in zip(self.event_shape_in, mask.shape)]):
      raise ValueError(f'{name}: the mask must broadcast to the event shape '
                       f'{list(self.event_shape_in)}, got a mask of shape {list(mask.shape)}.')
    self._mask = tf.constant(mask, dtype=self.dtype)
    self._complement = tf.constant(1. - mask, dtype=self.dtype)  # 1 - b
    # The network's extra input channel: the checkerboard itself, or ones for channel masks
    # (which mark where the image ends under the convolutions' zero padding).
    self._mask_channel = mask.max(axis=-1, keepdims=True).astype(self.dtype.as_numpy_dtype)
    self._network = network

  @property
  def mask(self):
    return self._mask

  @property
  def network(self):
    return self._network

  def _own_keras_layers(self):
    return [self._network]

  _takes_labels = True

  def _shift_and_log_scale(self, x, training, labels):
    b = self._mask
    shape = (x.shape[:3].as_list() + [1] if x.shape[:3].is_fully_defined() else
             tf.concat([tf.shape(x)[:3], [1]], axis=0))  # (static: no ops for it in the graph)
    inputs = tf.concat([b * x, tf.broadcast_to(self._mask_channel, shape)], axis=-1)
    if labels is None:
      s, t = self._network(inputs, training=training)
    else:  # a class-conditional network: (s, t) = network(b * x, y)
      s, t = self._network(inputs, labels=labels, training=training)
    return self._complement * s, self._complement * t

  def _forward_and_log_det(self, x, training, labels=None):
    s, t = self._shift_and_log_scale(x, training, labels)
    return x * tf.exp(s) + t, sum_event(s)

  def _inverse_and_log_det(self, y, training, labels=None):
    s, t = self._shift_and_log_scale(y, training, labels)
    return (y - t) * tf.exp(-s), -sum_event(s)
