"""The package's only uses of framework internals, each here because no public API does it.

Everything else in `tfp_realnvp` and `launch` uses public TensorFlow, Keras and TFP APIs only
(`tests/test_public_api.py` scans the sources). Each entry says what it buys; `tests/test_compat.py`
checks that what it reaches for is still there and fails with a message naming it on a version
where it moved (checked on TF 2.21, Keras 3.15, TFP 0.25).
"""

import keras
import tensorflow as tf

GRADIENT_ALL_REDUCE = 'gradient_all_reduce'  # the name scope of the step's one gradient all-reduce

# The private members used here, for the test that fails clearly where one has moved.
KERAS_OPTIMIZER_ALL_REDUCE = '_all_reduce_sum_gradients'
KERAS_METRIC_DIRECTION = '_direction'
TF_MIRRORED_KEY_BASE = '_collective_key_base'
_COLLECTIVE_KEYS_PER_STRATEGY = 1_000_000


def clip_after_all_reduce(optimizer, clipnorm):
  """Makes `optimizer` clip the gradient by its global norm after summing it over replicas, in
  the one all-reduce it does anyway; returns `optimizer`.

  What it buys: the paper's clipping (`clipnorm` on the global norm of the batch's gradient) on
  any number of replicas, with one all-reduce of the gradient per step. Keras' `global_clipnorm`
  clips each replica's part before the sum (another step on each replica count); clipping the sum
  in the training step with public APIs means all-reducing it there and again in the optimizer
  (two all-reduces of the whole gradient per step, `launch.benchmark --replicas` counts them).
  Keras has no public hook between its all-reduce and its update: this wraps the optimizer's
  `_all_reduce_sum_gradients` (any Keras optimizer on the TensorFlow backend; for a
  `LossScaleOptimizer`, its inner optimizer, which gets the unscaled gradient) with

    g <- g * min(1, clipnorm / ||g||)    (||g|| over every variable's summed gradient)

  on every replica alike (NaN for a non-finite norm, as `tf.clip_by_global_norm`).
  `clipnorm=0` or None: no clipping (the all-reduce as Keras does it).
  """
  inner = getattr(optimizer, 'inner_optimizer', optimizer)
  if not hasattr(type(inner), KERAS_OPTIMIZER_ALL_REDUCE):
    raise TypeError(f'expected a Keras optimizer on the TensorFlow backend, got '
                    f'{type(inner).__name__}.')
  all_reduce = getattr(type(inner), KERAS_OPTIMIZER_ALL_REDUCE).__get__(inner)

  def all_reduce_then_clip(grads_and_vars):
    if tf.distribute.has_strategy():  # (with none, Keras' all-reduce is an identity per tensor)
      with tf.name_scope(GRADIENT_ALL_REDUCE):
        grads_and_vars = all_reduce(grads_and_vars)
    if not clipnorm:
      return grads_and_vars
    grads_and_vars = list(grads_and_vars)
    gradients, _ = tf.clip_by_global_norm([g for g, _ in grads_and_vars], clipnorm)
    return list(zip(gradients, [v for _, v in grads_and_vars]))
  setattr(inner, KERAS_OPTIMIZER_ALL_REDUCE, all_reduce_then_clip)
  return optimizer


def lower_is_better(metric):
  """Marks a Keras metric as one to minimise, so Keras' monitor callbacks (`EarlyStopping`,
  `ModelCheckpoint(save_best_only=True)`, `ReduceLROnPlateau`) in `mode='auto'` take it as
  such (they read the metric's `_direction`; without it they refuse `mode='auto'`). Keras'
  own loss-wrapping metrics set it the same way. Returns `metric`."""
  setattr(metric, KERAS_METRIC_DIRECTION, 'down')
  return metric


def mirrored_strategy(devices=None):
  """`tf.distribute.MirroredStrategy(devices)` whose collective ops cannot collide with those of
  an earlier one in this process.

  What it buys: more than one MirroredStrategy in a process (`launch.benchmark --replicas`
  trains on 1 and N replicas; tests). TF numbers every MirroredStrategy's collective keys from
  the same class attribute, so a second strategy over the same devices reuses the first one's
  keys, and its first all-reduce of another shape fails for good ('Shape mismatch in the
  collective instance 100 ... Restart your program to reset', TF 2.21). TF's own tests move the
  same attribute; no public API sets the keys (`cross_device_ops=ReductionToOneDevice()` avoids
  collectives on CPUs only: with every device a GPU, MirroredStrategy uses them anyway).
  """
  base = getattr(tf.distribute.MirroredStrategy, TF_MIRRORED_KEY_BASE)
  setattr(tf.distribute.MirroredStrategy, TF_MIRRORED_KEY_BASE,
          base + _COLLECTIVE_KEYS_PER_STRATEGY)
  return tf.distribute.MirroredStrategy(devices)


def _resource(variable):
  """The resource variable behind a Keras variable (under `tf.distribute.Strategy.update`, the
  handle is the current replica's)."""
  return variable.value if isinstance(variable, keras.Variable) else variable


@keras.saving.register_keras_serializable(package='tfp_realnvp')
class Adam(keras.optimizers.Adam):
  """`keras.optimizers.Adam` (same arguments, slots and checkpoints) with fused updates.

  What it buys (measured 2026-12-07 on 2 cores of an AMD EPYC, `fit` on the small MNIST model:
  the `mnist` preset with 2 blocks of 16 features, float32, batch 64; three runs each, side by
  side; docs/design.md): first step 7.8 to 8.4 s with Keras' Adam, 3.8 to 4.1 s with this one,
  steps 0.22 s against 0.23 to 0.27 s. Keras writes each update as some twenty ops of its `ops`
  layer, traced per variable under the strategy's per-variable update; this is one
  `ResourceApplyAdam` per variable with `beta^t` computed once per step. It overrides Keras' private
  `_backend_update_step` and `_distributed_tf_update_step` and reads the private slots
  `_momentums` / `_velocities` (Keras' public `update_step` cannot find a variable's slots
  without them).

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
