"""Shared machinery of the flow's bijectors: one pass gives the value and its log-det.

TFP asks a bijector for its transform and its log-det in two calls; a coupling layer would run its
network twice. Every bijector here computes both from one call (`forward_and_log_det`,
`inverse_and_log_det`), and TFP's entry points are thin views of those two.

Caching. TFP's bijector cache keys results on the input tensor and keeps them as long as that
tensor lives, so after the weights change it would return the old transform and log-det. These
bijectors never use it: `forward`, `inverse` and the two log-det methods are overridden (as TFP's
own `tfb.Invert` overrides them) to compute afresh at every call, and `FlowDistribution` gets one
pass per call from the one-pass methods directly. Nothing outlives a call, so nothing can outlive
the weights it was computed with.
"""

import collections.abc
import contextlib

import tensorflow as tf
import tensorflow_probability as tfp

tfb = tfp.bijectors


@contextlib.contextmanager
def one_pass():
  """Kept for compatibility: a no-op. Nothing is cached, and `FlowDistribution` runs each network
  once per call without it."""
  yield


class _KerasVariables(collections.abc.Mapping):
  """A live view `{path: tf.Variable}` of Keras layers' variables, for `tf.Module`.

  Keras 3 variables are not `tf.Variable`s, so `tf.Module.trainable_variables` (and every TFP
  distribution built on the bijector) would miss them. `tf.Module` walks its attributes and the
  mappings in them: this one yields the `tf.Variable` behind each Keras variable, read when asked,
  so variables that a layer creates on its first call are found too.
  """

  def __init__(self, layers_fn):
    self._layers_fn = layers_fn

  def _variables(self):
    return {f'{i}/{v.path}': getattr(v, 'value', v)
            for i, layer in enumerate(self._layers_fn())
            for v in getattr(layer, 'weights', ())}

  def __getitem__(self, key):
    return self._variables()[key]

  def __iter__(self):
    return iter(self._variables())

  def __len__(self):
    return len(self._variables())


class FlowBijector(tfb.Bijector):
  """A bijector on `[H, W, C]` events that returns `(value, log|det J|)` from one pass.

  Subclasses implement `_forward_and_log_det(x, training)` and `_inverse_and_log_det(y, training)`
  on rank-4 `[N, H, W, C]` tensors, returning the value and the per-example log-det `[N]`; a
  subclass that changes the event shape overrides `_output_shape`. Any leading batch shape is
  flattened here, so `[H, W, C]` alone and `[..., H, W, C]` both work, and the event-shape methods
  keep leading event dims as TFP's `Reshape` does (`[2, H, W, C]` in, `[2, H', W', C']` out).

  `training` selects batch statistics in batch normalization; TFP's own calls
  (`forward`, `inverse`, `*_log_det_jacobian`, distributions) default to inference and take it as
  a keyword (`dist.log_prob(x, bijector_kwargs={'training': True})`).

  `labels` (int `[...]`, broadcast against the batch shape of `x`) condition a class-conditional
  flow: they reach the bijectors that set `_takes_labels` (the couplings, whose networks take
  them, and the containers that pass them on); the others never see them. A TFP keyword like
  `training`.

  `variables` and `trainable_variables` (`tf.Module`'s) list the `tf.Variable`s behind the Keras
  layers' variables, so any TFP distribution built on the bijector lists them too.
  """

  # Whether `_forward_and_log_det` / `_inverse_and_log_det` take `labels` (a third argument).
  _takes_labels = False

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
    # Read by tf.Module's variable walk (see `_KerasVariables`).
    self._keras_variables = _KerasVariables(self._own_keras_layers)

  @classmethod
  def _parameter_properties(cls, dtype, num_classes=None):
    # No parameter has a batch shape: one bijector per model (`experimental_batch_shape() == []`).
    return dict()

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

  def _own_keras_layers(self):
    """The Keras layers this bijector itself holds (not its parts')."""
    return []

  @property
  def keras_layers(self):
    """The Keras layers holding this bijector's variables (a Keras model must own them)."""
    return self._own_keras_layers() + [layer for part in self.parts
                                       for layer in part.keras_layers]

  def forward_and_log_det(self, x, training=False, labels=None):
    """Returns `(forward(x), forward_log_det_jacobian(x))` from one pass."""
    x = self._checked(x, self.event_shape_in, 'forward')
    return self._batched(self._forward_and_log_det, x, training, labels)

  def inverse_and_log_det(self, y, training=False, labels=None):
    """Returns `(inverse(y), inverse_log_det_jacobian(y))` from one pass."""
    y = self._checked(y, self.event_shape_out, 'inverse')
    return self._batched(self._inverse_and_log_det, y, training, labels)

  def _checked(self, x, event_shape, direction):
    x = tf.convert_to_tensor(x)
    if x.dtype != self.dtype:
      raise TypeError(f'{self.name}.{direction}: expected a {self.dtype.name} tensor, '
                      f'got {x.dtype.name}.')
    expected = f'[..., {", ".join(map(str, event_shape))}] ([..., H, W, C])'
    if x.shape.rank is None or x.shape.rank < 3 or not x.shape[-3:].is_compatible_with(
        event_shape):
      raise ValueError(f'{self.name}.{direction}: expected shape {expected}, got {x.shape}.')
    if self.validate_args and not x.shape[-3:].is_fully_defined():
      with tf.control_dependencies([tf.debugging.assert_equal(
          tf.shape(x)[-3:], tf.constant(event_shape, tf.int32),
          message=f'{self.name}.{direction}: expected shape {expected}')]):
        x = tf.identity(x)
    return x

  def _batched(self, fn, x, training, labels):
    if labels is None or not self._takes_labels:
      call = lambda x: fn(x, training)  # pylint: disable=unnecessary-lambda-assignment
    else:
      labels = tf.convert_to_tensor(labels)
      if not labels.dtype.is_integer:
        raise TypeError(f'{self.name}: labels must be integers, got {labels.dtype.name}.')
      labels = tf.cast(labels, tf.int32)
      if not (x.shape.rank == 4 and labels.shape.rank == 1 and
              labels.shape.is_compatible_with(x.shape[:1])):  # labels broadcast to x's batch
        both = tf.broadcast_dynamic_shape(tf.shape(x)[:-3], tf.shape(labels))
        x = tf.broadcast_to(x, tf.concat([both, x.shape[-3:].as_list()], axis=0))
        labels = tf.reshape(tf.broadcast_to(labels, both), [-1])
      call = lambda x: fn(x, training, labels)  # pylint: disable=unnecessary-lambda-assignment
    if x.shape.rank == 4:
      return call(x)
    leading = tf.shape(x)[:-3]
    y, log_det = call(tf.reshape(x, [-1] + x.shape[-3:].as_list()))
    y = tf.reshape(y, tf.concat([leading, y.shape[-3:].as_list()], axis=0))
    return y, tf.reshape(log_det, leading)

  # TFP's public entry points, computed afresh (TFP's versions would go through its cache, keyed
  # on the input tensor, and return an old value after the weights change).
  def forward(self, x, name='forward', **kwargs):
    with tf.name_scope(self.name), tf.name_scope(name):
      return self.forward_and_log_det(self._converted(x), **kwargs)[0]

  def inverse(self, y, name='inverse', **kwargs):
    with tf.name_scope(self.name), tf.name_scope(name):
      return self.inverse_and_log_det(self._converted(y), **kwargs)[0]

  def forward_log_det_jacobian(self, x, event_ndims=None, name='forward_log_det_jacobian',
                               **kwargs):
    with tf.name_scope(self.name), tf.name_scope(name):
      log_det = self.forward_and_log_det(self._converted(x), **kwargs)[1]
      return self._summed_over_event(log_det, event_ndims)

  def inverse_log_det_jacobian(self, y, event_ndims=None, name='inverse_log_det_jacobian',
                               **kwargs):
    with tf.name_scope(self.name), tf.name_scope(name):
      log_det = self.inverse_and_log_det(self._converted(y), **kwargs)[1]
      return self._summed_over_event(log_det, event_ndims)

  def _converted(self, x):
    return tf.convert_to_tensor(x, dtype_hint=self.dtype)

  def _summed_over_event(self, log_det, event_ndims):
    """The per-`[H, W, C]` log-det summed over the event dims before those (`event_ndims` > 3)."""
    if event_ndims is None:
      return log_det
    static = tf.get_static_value(event_ndims)
    if static is not None:
      extra = int(static) - 3
      if extra < 0:
        raise ValueError(f'{self.name}: event_ndims must be at least 3, got {int(static)}.')
      return tf.reduce_sum(log_det, axis=list(range(-extra, 0))) if extra else log_det
    extra = tf.cast(event_ndims, tf.int32) - 3
    checks = [tf.debugging.assert_non_negative(
        extra, message=f'{self.name}: event_ndims must be at least 3')] if self.validate_args else []
    with tf.control_dependencies(checks):
      rank = tf.rank(log_det)
      return tf.reduce_sum(log_det, axis=tf.range(rank - extra, rank))

  # TFP's subclass hooks (not reached through the entry points above; kept for TFP code that
  # calls them), views of the two one-pass methods.
  def _forward(self, x, training=False, labels=None):
    return self.forward_and_log_det(x, training, labels)[0]

  def _inverse(self, y, training=False, labels=None):
    return self.inverse_and_log_det(y, training, labels)[0]

  def _forward_log_det_jacobian(self, x, training=False, labels=None):
    return self.forward_and_log_det(x, training, labels)[1]

  def _inverse_log_det_jacobian(self, y, training=False, labels=None):
    return self.inverse_and_log_det(y, training, labels)[1]

  # Event shapes as TFP's `Reshape`: leading event dims are kept, the trailing [H, W, C] checked.
  def _forward_event_shape(self, input_shape):
    return self._replaced_event_shape(input_shape, self.event_shape_in, self.event_shape_out)

  def _inverse_event_shape(self, output_shape):
    return self._replaced_event_shape(output_shape, self.event_shape_out, self.event_shape_in)

  def _forward_event_shape_tensor(self, input_shape):
    return self._replaced_event_shape_tensor(input_shape, self.event_shape_in,
                                             self.event_shape_out)

  def _inverse_event_shape_tensor(self, output_shape):
    return self._replaced_event_shape_tensor(output_shape, self.event_shape_out,
                                             self.event_shape_in)

  def _replaced_event_shape(self, shape, event_in, event_out):
    shape = tf.TensorShape(shape)
    if shape.rank is None:
      return tf.TensorShape(None)
    if shape.rank < 3 or not shape[-3:].is_compatible_with(event_in):
      raise ValueError(f'{self.name}: expected an event shape [..., '
                       f'{", ".join(map(str, event_in))}] ([..., H, W, C]), got {shape}.')
    return shape[:-3].concatenate(event_out)

  def _replaced_event_shape_tensor(self, shape, event_in, event_out):
    static = tf.get_static_value(shape)
    if static is not None:
      return tf.constant(self._replaced_event_shape(static, event_in, event_out).as_list(),
                         tf.int32)
    shape = tf.cast(shape, tf.int32)
    if self.validate_args:
      with tf.control_dependencies([tf.debugging.assert_equal(
          shape[-3:], tf.constant(event_in, tf.int32),
          message=f'{self.name}: expected an event shape [..., '
                  f'{", ".join(map(str, event_in))}] ([..., H, W, C])')]):
        shape = tf.identity(shape)
    return tf.concat([shape[:-3], tf.constant(event_out, tf.int32)], axis=0)


def batch_shape(x):
  """`[N]` of `x` `[N, ...]`: a Python list when the batch size is known while tracing (no ops
  in the graph), else a tensor."""
  return x.shape[:1].as_list() if x.shape[:1].is_fully_defined() else tf.shape(x)[:1]


def zero_log_det(x):
  """The log-det `[N]` of a volume-preserving map on `x` `[N, ...]`: zeros."""
  return tf.zeros(batch_shape(x), x.dtype)


def per_pixel_log_det(event_shape, log_scales, x):
  """The log-det of a map that scales each channel alike at every pixel, `[N]` for `x`
  `[N, H, W, C]`: `H * W * sum_c log_scales_c` per example."""
  height, width, _ = event_shape
  return tf.fill(batch_shape(x), height * width * tf.reduce_sum(log_scales))


def sum_event(x):
  """Sums a `[N, H, W, C]` tensor over its event, giving `[N]`."""
  return tf.reduce_sum(x, axis=[-3, -2, -1])


class Sequential(FlowBijector):
  """Applies `bijectors` in order: forward runs first to last, inverse last to first.

  log|det J| is the sum of the parts' log-dets (each `[N]`, one per example, as every
  `FlowBijector` gives them). (TFP's `Chain` lists them the other way round and
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

  _takes_labels = True

  def _forward_and_log_det(self, x, training, labels=None):
    log_dets = []
    for b in self._bijectors:
      x, log_det = b.forward_and_log_det(x, training, labels)
      log_dets.append(log_det)
    return x, tf.add_n(log_dets)  # one op (a running sum was one per part)

  def _inverse_and_log_det(self, y, training, labels=None):
    log_dets = []
    for b in reversed(self._bijectors):
      y, log_det = b.inverse_and_log_det(y, training, labels)
      log_dets.append(log_det)
    return y, tf.add_n(log_dets)


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

  _takes_labels = True

  def _forward_and_log_det(self, x, training, labels=None):
    return self._bijector.inverse_and_log_det(x, training, labels)

  def _inverse_and_log_det(self, y, training, labels=None):
    return self._bijector.forward_and_log_det(y, training, labels)
