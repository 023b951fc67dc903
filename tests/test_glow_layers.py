"""Glow's layers (`ActNorm`, `Invertible1x1Conv`): formulas, data-dependent init, inverse."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import TOLERANCE, randomize
from tfp_realnvp import training
from tfp_realnvp.bijectors import (ActNorm, ActNormParameters, Invertible1x1Conv, LUWeights,
                                   data_dependent_init)

SHAPE = (4, 4, 3)


def randomize_trainable(layers, seed=0, scale=0.3):
  """Random values for the trainable weights only (the permutation and signs stay fixed)."""
  rng = np.random.default_rng(seed)
  for layer in layers:
    for w in layer.trainable_weights:
      w.assign(rng.normal(0., scale, w.shape).astype(w.dtype))


def _normal(shape, dtype=tf.float32, seed=1, mean=0., std=1.):
  return mean + std * tf.random.stateless_normal(shape, [seed, 0], dtype=dtype)


@pytest.mark.parametrize('dtype', [tf.float32, tf.float64])
def test_actnorm_formula_and_log_det(dtype):
  norm = ActNorm(ActNormParameters(dtype=dtype.name), SHAPE, dtype=dtype)
  x = _normal([5, *SHAPE], dtype)
  norm.forward(x)
  randomize(norm.keras_layers, seed=3)
  params = norm.keras_layers[0]
  bias, log_scale = params.bias.numpy(), params.log_scale.numpy()
  y, log_det = norm.forward_and_log_det(tf.identity(x))
  np.testing.assert_allclose(y, (x.numpy() + bias) * np.exp(log_scale), rtol=TOLERANCE[dtype])
  np.testing.assert_allclose(log_det, np.full([5], 16 * log_scale.sum()), rtol=TOLERANCE[dtype])


def test_actnorm_initialises_from_the_first_batch_once():
  norm = ActNorm(ActNormParameters(), SHAPE)
  x = _normal([64, *SHAPE], mean=3., std=[[[0.5, 2., 7.]]])
  y = norm.forward(x)  # not initialised: the identity
  np.testing.assert_allclose(y, x)
  with data_dependent_init():
    y = norm.forward_and_log_det(tf.identity(x), training=True)[0]
  np.testing.assert_allclose(tf.reduce_mean(y, [0, 1, 2]), 0., atol=1e-5)
  np.testing.assert_allclose(tf.math.reduce_std(y, [0, 1, 2]), 1., rtol=1e-4)
  params = norm.keras_layers[0]
  assert params.initialized.numpy() == 1.
  before = params.log_scale.numpy().copy()
  with data_dependent_init():  # once only
    norm.forward_and_log_det(10. * _normal([64, *SHAPE], seed=5), training=True)
  np.testing.assert_array_equal(params.log_scale.numpy(), before)
  # Outside the block, and in inference, nothing is initialised.
  fresh = ActNorm(ActNormParameters(), SHAPE)
  fresh.forward_and_log_det(x, training=True)
  with data_dependent_init():
    fresh.forward_and_log_det(tf.identity(x), training=False)
  assert fresh.keras_layers[0].initialized.numpy() == 0.


def test_actnorm_initialises_from_the_global_batch_under_a_strategy():
  strategy = training.mirrored_strategy(['/cpu:0', '/cpu:1'])
  with strategy.scope():
    norm = ActNorm(ActNormParameters(), SHAPE)
    norm.forward(tf.zeros([1, *SHAPE]))
  x = _normal([8, *SHAPE], mean=2., std=3.)
  halves = strategy.experimental_distribute_values_from_function(
      lambda context: x[4 * context.replica_id_in_sync_group:][:4])

  @tf.function
  def init(batch):
    def replica(b):
      with data_dependent_init():
        return norm.forward_and_log_det(b, training=True)[0]
    return strategy.run(replica, args=(batch,))
  init(halves)
  params = norm.keras_layers[0]
  mean = tf.reduce_mean(x, [0, 1, 2])
  np.testing.assert_allclose(params.bias.numpy(), -mean, rtol=1e-5)
  for value in strategy.experimental_local_results(params.bias.value):
    np.testing.assert_allclose(value, -mean, rtol=1e-5)  # every replica's copy


@pytest.mark.parametrize('dtype', [tf.float32, tf.float64])
def test_invertible_1x1_conv_is_lu_of_a_rotation_and_inverts_by_triangular_solves(dtype):
  mix = Invertible1x1Conv(LUWeights(seed=0, dtype=dtype.name), (3, 3, 5), dtype=dtype)
  x = _normal([4, 3, 3, 5], dtype)
  y, log_det = mix.forward_and_log_det(x)
  p, lower, upper, log_s = (f.numpy() for f in mix.keras_layers[0].factors(dtype))
  w = p @ lower @ upper
  np.testing.assert_allclose(w @ w.T, np.eye(5), atol=TOLERANCE[dtype])  # a rotation at first
  np.testing.assert_allclose(log_det, 0., atol=TOLERANCE[dtype] * 10)
  np.testing.assert_allclose(y, np.einsum('nhwc,cd->nhwd', x.numpy(), w), rtol=1e-5, atol=1e-6)
  randomize_trainable(mix.keras_layers, seed=2)
  p, lower, upper, log_s = (f.numpy() for f in mix.keras_layers[0].factors(dtype))
  w = p @ lower @ upper
  assert np.allclose(np.diag(lower), 1.) and np.allclose(np.tril(upper, -1), 0.)
  y, log_det = mix.forward_and_log_det(tf.identity(x))
  np.testing.assert_allclose(log_det, np.full([4], 9 * np.linalg.slogdet(w)[1]),
                             rtol=TOLERANCE[dtype] * 10)
  x_back, ildj = mix.inverse_and_log_det(tf.identity(y))
  np.testing.assert_allclose(x_back, x, atol=TOLERANCE[dtype] * 100)
  np.testing.assert_allclose(np.einsum('nhwc,cd->nhwd', y.numpy(), np.linalg.inv(w)), x_back,
                             atol=TOLERANCE[dtype] * 100)
