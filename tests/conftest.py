"""Test set-up: two logical CPU devices (for MirroredStrategy tests) and shared helpers."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices('CPU')
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)


def randomize(layers, seed=0, scale=0.3, variance=(0.5, 2.0)):
  """Gives Keras layers random weights (so no coupling is the identity) and positive,
  non-trivial batch-norm statistics, as after some training."""
  rng = np.random.default_rng(seed)
  for layer in layers:
    for w in layer.weights:
      if w.path.endswith(('/permutation', '/sign_s')):  # fixed parts of a 1x1 convolution's LU
        continue
      if 'variance' in w.path:
        value = rng.uniform(*variance, w.shape)
      elif 'moving_mean' in w.path:
        value = rng.normal(0., 0.5, w.shape)
      else:
        value = rng.normal(0., scale, w.shape)
      w.assign(value.astype(w.dtype))


def log_det_by_autodiff(fn, x):
  """log|det J| of `fn` at each event of `x` [N, H, W, C], from a GradientTape Jacobian."""
  @tf.function  # traced once for every event (the same shape): the Jacobian's loop once
  def log_det(event):
    with tf.GradientTape() as tape:
      tape.watch(event)
      y = fn(event)
    size = int(np.prod(event.shape))
    return tf.linalg.slogdet(tf.reshape(tape.jacobian(y, event), [size, size]))[1]
  return tf.stack([log_det(event[None]) for event in tf.unstack(x)])


TOLERANCE = {tf.float32: 2e-4, tf.float64: 1e-9}


@pytest.fixture(params=[tf.float32, tf.float64], ids=['float32', 'float64'])
def dtype(request):
  return request.param
