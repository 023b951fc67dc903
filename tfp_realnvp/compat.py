"""The package's only uses of framework internals, each here because no public API does it.

Everything else in `tfp_realnvp` and `launch` uses public TensorFlow, Keras and TFP APIs only
(`tests/test_public_api.py` scans the sources). Each entry says what it buys; `tests/test_compat.py`
checks that what it reaches for is still there and fails with a message naming it on a version
where it moved (checked on TF 2.21, Keras 3.15, TFP 0.25).
"""

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

