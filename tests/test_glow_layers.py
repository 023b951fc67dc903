"""Glow's layers (`ActNorm`, `Invertible1x1Conv`): formulas, data-dependent init, inverse."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import TOLERANCE, log_det_by_autodiff, randomize
import tfp_realnvp as rn
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


GLOW_OPTIONS = {
    'actnorm': dict(normalization='actnorm'),
    '1x1_conv': dict(mixing='1x1_conv'),
    'glow': dict(normalization='actnorm', mixing='1x1_conv', layout='glow', steps_per_scale=2,
                 network='glow'),
}
TINY = rn.RealNVPConfig((8, 8, 1), num_scales=2, num_blocks=1, num_filters=4)


def _images(count=16, seed=0):
  return np.random.default_rng(seed).integers(0, 256, [count, 8, 8, 1], dtype=np.uint8)


@pytest.mark.parametrize('name', sorted(GLOW_OPTIONS))
def test_models_with_glows_layers_are_exact_flows(name):
  model = rn.RealNVP(TINY.replace(dtype='float64', **GLOW_OPTIONS[name]))
  randomize(model.flow_layers, seed=1, scale=0.1, variance=(0.8, 1.2))
  x = tf.random.stateless_uniform([2, 8, 8, 1], [0, 1], 1., 255., tf.float64)
  latent, log_det = model.flow.forward_and_log_det(x)
  np.testing.assert_allclose(log_det, log_det_by_autodiff(model.encode, x), rtol=1e-8)
  np.testing.assert_allclose(model.decode(latent), x, rtol=1e-9)
  np.testing.assert_allclose(model.log_prob(x), model.distribution.log_prob(tf.identity(x)),
                             rtol=1e-12)
  kinds = {type(b).__name__ for b in _all_bijectors(model.flow)}
  assert ('ActNorm' in kinds) == (model.config.normalization == 'actnorm')
  assert ('BatchNorm' in kinds) == (model.config.normalization == 'batch_norm')
  assert ('Invertible1x1Conv' in kinds) == (model.config.mixing == '1x1_conv')


def _all_bijectors(bijector):
  yield bijector
  for part in bijector.parts:
    yield from _all_bijectors(part)


def test_fit_sets_actnorm_from_its_first_batch_then_never_again(tmp_path):
  model = rn.RealNVP(TINY.replace(normalization='actnorm'))
  model.compile()
  assert model.needs_data_initialization()
  images = _images()
  dataset = tf.data.Dataset.from_tensor_slices(images).batch(8)
  model.fit(dataset, epochs=1, verbose=0)
  assert not model.needs_data_initialization()
  # Resumed from a checkpoint, the flag comes back: fit does not initialise again.
  training.Checkpointer(str(tmp_path), model).save()
  clone = rn.RealNVP(model.config)
  clone.compile()
  training.Checkpointer(str(tmp_path), clone).restore_latest()
  assert not clone.needs_data_initialization()
  clone.initialize_from_data = None  # would fail if called
  clone.fit(dataset, epochs=1, verbose=0)


def test_actnorm_in_the_model_starts_from_the_global_batchs_statistics():
  # The first coupling is the identity at initialisation (zero output convolution), so the
  # first ActNorm sees the logit of the pixels: its bias is minus their mean per channel, over
  # both replicas' halves of the batch.
  pixels = tf.random.stateless_uniform([8, 8, 8, 1], [3, 4], 0., 256.) * tf.linspace(
      0.2, 1., 8)[:, None, None, None]  # the halves differ
  strategy = training.mirrored_strategy(['/cpu:0', '/cpu:1'])
  with strategy.scope():
    model = rn.RealNVP(TINY.replace(normalization='actnorm'))
  model.initialize_from_data(pixels)
  first = next(b for b in _all_bijectors(model.flow) if type(b).__name__ == 'ActNorm')
  logits = model.flow.bijectors[0].forward(pixels)
  expected = -tf.reduce_mean(logits, [0, 1, 2])
  params = first.keras_layers[0]
  for bias in strategy.experimental_local_results(params.bias.value):
    np.testing.assert_allclose(bias, expected, rtol=1e-5)
  assert not model.needs_data_initialization()


def test_configs_written_before_glows_options_load_as_the_paper():
  old = {k: v for k, v in TINY.to_dict().items()
         if k not in ('normalization', 'mixing', 'layout', 'steps_per_scale', 'network')}
  config = rn.RealNVPConfig.from_dict(old)
  assert (config.normalization, config.mixing, config.layout, config.network) == (
      'batch_norm', 'none', 'real_nvp', 'resnet')


def test_glow_preset_is_glows_cifar10_architecture():
  config = rn.presets.get('glow')
  assert (config.image_shape, config.num_scales, config.steps_per_scale, config.num_filters) == (
      (32, 32, 3), 3, 32, 512)
  assert (config.normalization, config.mixing, config.layout, config.network) == (
      'actnorm', '1x1_conv', 'glow', 'glow')
  # The same layout, small: 3 levels of squeeze and couplings on 16x16x12, 8x8x24, 4x4x48.
  model = rn.RealNVP(config.replace(steps_per_scale=2, num_filters=8))
  shapes = [tuple(b.event_shape_in) for b in _all_bijectors(model.flow)
            if type(b).__name__ == 'AffineCoupling']
  assert shapes == [(16, 16, 12)] * 2 + [(8, 8, 24)] * 2 + [(4, 4, 48)] * 2
  with pytest.raises(rn.presets.ConfigError, match='multiples of 8'):
    rn.RealNVPConfig((28, 28, 1), num_scales=3, layout='glow')
