"""Adam with one fused kernel per variable.

A Real NVP has hundreds of variables (140 trainable at the `cifar10` preset; 890 before the
residual blocks' weights were stacked). Keras' Adam writes each
update as some twenty ops, over half of a training step's graph; tracing and optimizing that graph
was most of the wait for the first step. TF's `ResourceApplyAdam` kernel does the same update in
one op.
"""

import keras
import tensorflow as tf


def _resource(variable):
  """The resource variable behind a Keras variable (under `tf.distribute.Strategy.update`, the
  handle is the current replica's)."""
  return variable.value if isinstance(variable, keras.Variable) else variable


@keras.saving.register_keras_serializable(package='tfp_realnvp')
class Adam(keras.optimizers.Adam):
  """`keras.optimizers.Adam` (same arguments, slots and checkpoints) with fused updates.

  With `g` the gradient, `t` the step (from 1), per variable:

    m <- beta_1 m + (1 - beta_1) g
    v <- beta_2 v + (1 - beta_2) g^2
    w <- w - lr sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + epsilon)

  exactly Keras' arithmetic, as one `ResourceApplyAdam` op; `beta^t` is computed once per step
  for all variables. `amsgrad` is not supported. Clipping, weight decay and loss scaling
  (`LossScaleOptimizer`) work as in Keras: they happen before the update.

  Example:
    model.compile(optimizer=tfp_realnvp.optimizers.Adam(1e-3, global_clipnorm=100.))
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    if self.amsgrad:
      raise ValueError('tfp_realnvp.optimizers.Adam does not support amsgrad=True; use '
                       'keras.optimizers.Adam.')
    self._constants = None

  def _constants_in(self, dtype):
    """This step's constants (see `_backend_update_step`) in `dtype`, cast once per dtype (a
    cast per variable was 6 ops times 890 variables in a `cifar10` step's graph)."""
    if dtype.name not in self._constants:  # (names: Keras tracks this dict, by string keys)
      self._constants[dtype.name] = {k: tf.cast(c, dtype)
                                     for k, c in self._constants['float64'].items()}
    return self._constants[dtype.name]

  def _backend_update_step(self, grads, trainable_variables, learning_rate):
    step = tf.cast(self.iterations + 1, tf.float64)
    scalar = lambda value: tf.constant(value, tf.float64)  # noqa: E731
    self._constants = {'float64': {  # cast to each variable's dtype in `update_step`
        'beta1_power': tf.pow(scalar(self.beta_1), step),
        'beta2_power': tf.pow(scalar(self.beta_2), step),
        'lr': tf.cast(learning_rate, tf.float64), 'beta1': scalar(self.beta_1),
        'beta2': scalar(self.beta_2), 'epsilon': scalar(self.epsilon)}}
    super()._backend_update_step(grads, trainable_variables, learning_rate)

  def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
    if tf.distribute.has_strategy():  # each replica's copy of each variable, as Keras does
      return super()._distributed_tf_update_step(distribution, grads_and_vars, learning_rate)
    # No strategy: the updates directly (Keras' per-variable `extended.update` machinery was a
    # tenth of tracing a `cifar10` step).
    for gradient, variable in grads_and_vars:
      self.update_step(gradient, variable, learning_rate)

  def update_step(self, gradient, variable, learning_rate):
    index = self._get_variable_index(variable)
    dtype = tf.as_dtype(variable.dtype)
    tf.raw_ops.ResourceApplyAdam(
        var=_resource(variable).handle, m=_resource(self._momentums[index]).handle,
        v=_resource(self._velocities[index]).handle, grad=tf.cast(gradient, dtype),
        **self._constants_in(dtype))


def _scaled(gradient, scale):
  if gradient is None:
    return None
  if isinstance(gradient, tf.IndexedSlices):
    return tf.IndexedSlices(gradient.values * tf.cast(scale, gradient.dtype), gradient.indices,
                            gradient.dense_shape)
  return gradient * tf.cast(scale, gradient.dtype)


GRADIENT_ALL_REDUCE = 'gradient_all_reduce'  # the name scope of the step's one gradient all-reduce


def clip_after_all_reduce(optimizer, clipnorm):
  """Makes `optimizer` clip the gradient by its global norm after summing it over replicas, in
  the one all-reduce it does anyway; returns `optimizer`.

  Keras' `global_clipnorm` clips each replica's part of the gradient before the sum, which
  neither bounds the step nor gives the same step on any number of replicas; clipping the sum
  before the optimizer's own all-reduce would communicate the gradient twice per step. Here the
  optimizer's all-reduce (any Keras optimizer on the TensorFlow backend; for a
  `LossScaleOptimizer`, its inner optimizer, which gets the unscaled gradient) is followed by

    g <- g * min(1, clipnorm / ||g||)    (||g|| over every variable's summed gradient)

  on every replica alike. `clipnorm=0` or None: no clipping (the all-reduce as Keras does it).
  """
  inner = getattr(optimizer, 'inner_optimizer', optimizer)
  if not hasattr(type(inner), '_all_reduce_sum_gradients'):
    raise TypeError(f'expected a Keras optimizer on the TensorFlow backend, got '
                    f'{type(inner).__name__}.')
  all_reduce = type(inner)._all_reduce_sum_gradients.__get__(inner)

  def all_reduce_then_clip(grads_and_vars):
    if tf.distribute.has_strategy():  # (with none, Keras' all-reduce is an identity per tensor)
      with tf.name_scope(GRADIENT_ALL_REDUCE):
        grads_and_vars = all_reduce(grads_and_vars)
    if not clipnorm:
      return grads_and_vars
    grads_and_vars = list(grads_and_vars)
    present = [g for g, _ in grads_and_vars if g is not None]
    # tf.clip_by_global_norm's arithmetic (NaN for a non-finite norm), without its identity op
    # per tensor
    norm = tf.linalg.global_norm(present)
    scale = (clipnorm * tf.minimum(1. / norm, tf.constant(1., norm.dtype) / clipnorm) +
             (norm - norm))
    return [(_scaled(g, scale), v) for g, v in grads_and_vars]
  inner._all_reduce_sum_gradients = all_reduce_then_clip
  return optimizer
