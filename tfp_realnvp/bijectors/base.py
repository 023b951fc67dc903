"""Shared machinery of the flow's bijectors: one pass gives the value and its log-det.

TFP asks a bijector for its transform and its log-det in two calls; a coupling layer would run its
network twice. Every bijector here computes both from one call (`forward_and_log_det`,
`inverse_and_log_det`), and TFP's four hooks are thin views of those two.
"""

import tensorflow as tf
import tensorflow_probability as tfp

tfb = tfp.bijectors


class FlowBijector(tfb.Bijector):
  """A bijector on `[H, W, C]` events that returns `(value, log|det J|)` from one pass.

  Subclasses implement `_forward_and_log_det(x, training)` and `_inverse_and_log_det(y, training)`
  on rank-4 `[N, H, W, C]` tensors, returning the value and the per-example log-det `[N]`; a
  subclass that changes the event shape overrides `_output_shape`. Any leading batch shape is
  flattened here, so `[H, W, C]` alone and `[..., H, W, C]` both work.

  `training` selects batch statistics in batch normalization; TFP's own calls
  (`forward`, `inverse`, `*_log_det_jacobian`, distributions) default to inference.
  """

  def __init__(self, event_shape, validate_args=False, parameters=None, name=None,
               dtype=tf.float32, is_constant_jacobian=False):
    event_shape = tuple(int(d) for d in event_shape)
    if len(event_shape) != 3 or min(event_shape) < 1:
      raise ValueError(f'{name}: event_shape must be [H, W, C] with positive sizes, '
                       f'got {list(event_shape)}.')
    self._event_shape_in = event_shape
    super().__init__(forward_min_event_ndims=3, validate_args=validate_args,
                     parameters=parameters, name=name, dtype=tf.as_dtype(dtype),
                     is_constant_jacobian=is_constant_jacobian)

  @property
  def event_shape_in(self):
    """The `[H, W, C]` event shape the forward direction takes."""
    return self._event_shape_in

  @property
  def event_shape_out(self):
    """The `[H, W, C]` event shape the forward direction gives."""
    return self._output_shape(self._event_shape_in)

  def _output_shape(self, shape):
    return shape

  @property
  def parts(self):
    """The bijectors this one is made of (none for a single layer)."""
    return ()

  @property
  def keras_layers(self):
    """The Keras layers holding this bijector's variables (a Keras model must own them)."""
    return [layer for part in self.parts for layer in part.keras_layers]

  def forward_and_log_det(self, x, training=False):
    """Returns `(forward(x), forward_log_det_jacobian(x))` from one pass."""
    x = self._checked(x, self.event_shape_in, 'forward')
    return self._batched(self._forward_and_log_det, x, training)

  def inverse_and_log_det(self, y, training=False):
    """Returns `(inverse(y), inverse_log_det_jacobian(y))` from one pass."""
    y = self._checked(y, self.event_shape_out, 'inverse')
    return self._batched(self._inverse_and_log_det, y, training)

  def _checked(self, x, event_shape, direction):
    x = tf.convert_to_tensor(x)
    if x.dtype != self.dtype:
      raise TypeError(f'{self.name}.{direction}: expected a {self.dtype.name} tensor, '
                      f'got {x.dtype.name}.')
    if x.shape.rank is None or x.shape.rank < 3 or not x.shape[-3:].is_compatible_with(
        event_shape):
      raise ValueError(f'{self.name}.{direction}: expected shape [..., {", ".join(map(str, event_shape))}]'
                       f' ([..., H, W, C]), got {x.shape}.')
    return x

  @staticmethod
  def _batched(fn, x, training):
    if x.shape.rank == 4:
      return fn(x, training)
    batch_shape = tf.shape(x)[:-3]
    y, log_det = fn(tf.reshape(x, [-1] + x.shape[-3:].as_list()), training)
    y = tf.reshape(y, tf.concat([batch_shape, y.shape[-3:].as_list()], axis=0))
    return y, tf.reshape(log_det, batch_shape)

  # TFP's hooks, all views of the two one-pass methods.
  def _forward(self, x, training=False):
    return self.forward_and_log_det(x, training)[0]

  def _inverse(self, y, training=False):
    return self.inverse_and_log_det(y, training)[0]

  def _forward_log_det_jacobian(self, x, training=False):
    return self.forward_and_log_det(x, training)[1]

  def _inverse_log_det_jacobian(self, y, training=False):
    return self.inverse_and_log_det(y, training)[1]

  def _forward_event_shape(self, input_shape):
    return tf.TensorShape(self.event_shape_out)

  def _inverse_event_shape(self, output_shape):
    return tf.TensorShape(self.event_shape_in)

  def _forward_event_shape_tensor(self, input_shape):
    return tf.constant(self.event_shape_out, dtype=tf.int32)

  def _inverse_event_shape_tensor(self, output_shape):
    return tf.constant(self.event_shape_in, dtype=tf.int32)


def sum_event(x):
  """Sums a `[N, H, W, C]` tensor over its event, giving `[N]`."""
  return tf.reduce_sum(x, axis=[-3, -2, -1])


class Sequential(FlowBijector):
  """Applies `bijectors` in order: forward runs first to last, inverse last to first.

  log|det J| is the sum of the parts' log-dets. (TFP's `Chain` lists them the other way round and
  cannot pass one log-det pass or the `training` flag through.)
  """

  def __init__(self, bijectors, validate_args=False, name='sequential'):
    parameters = dict(locals())
    self._bijectors = list(bijectors)
    for a, b in zip(self._bijectors, self._bijectors[1:]):
      if a.event_shape_out != b.event_shape_in:
        raise ValueError(f'{name}: {a.name} gives events {list(a.event_shape_out)} but {b.name} '
                         f'takes {list(b.event_shape_in)}.')
    first = self._bijectors[0]
    self._shape_out = self._bijectors[-1].event_shape_out
    super().__init__(first.event_shape_in, validate_args, parameters, name, first.dtype)

  @property
  def bijectors(self):
    return list(self._bijectors)

  def _output_shape(self, shape):
    return self._shape_out

  @property
  def parts(self):
    return tuple(self._bijectors)

  def _forward_and_log_det(self, x, training):
    total = tf.zeros(tf.shape(x)[:1], x.dtype)
    for b in self._bijectors:
      x, log_det = b.forward_and_log_det(x, training)
      total += log_det
    return x, total

  def _inverse_and_log_det(self, y, training):
    total = tf.zeros(tf.shape(y)[:1], y.dtype)
    for b in reversed(self._bijectors):
      y, log_det = b.inverse_and_log_det(y, training)
      total += log_det
    return y, total


class Inverted(FlowBijector):
  """The inverse of a `FlowBijector`: forward is `bijector.inverse` (e.g. un-squeezing)."""

  def __init__(self, bijector, name=None):
    parameters = dict(locals())
    self._bijector = bijector
    super().__init__(bijector.event_shape_out, bijector.validate_args, parameters,
                     name or f'inverted_{bijector.name}', bijector.dtype)

  def _output_shape(self, shape):
    return self._bijector.event_shape_in

  @property
  def parts(self):
    return (self._bijector,)

  def _forward_and_log_det(self, x, training):
    return self._bijector.inverse_and_log_det(x, training)

  def _inverse_and_log_det(self, y, training):
    return self._bijector.forward_and_log_det(y, training)
