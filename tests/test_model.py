"""The whole flow as a Keras model: exact density end to end, variables, sampling, errors."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import log_det_by_autodiff, randomize
import tfp_realnvp as rn

TINY = rn.RealNVPConfig((4, 4, 2), num_scales=2, num_blocks=1, num_filters=4)


def _tiny_model(dtype='float32', seed=0, **randomize_args):
  model = rn.RealNVP(TINY.replace(dtype=dtype))
  randomize(model.flow_layers, seed, **randomize_args)
  return model


def _pixels(shape, dtype='float32', seed=0):
  return tf.random.stateless_uniform(shape, [seed, 1], 1., 255., dtype=dtype)


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
def test_whole_flow_log_det_matches_autodiff_jacobian(dtype):
  model = _tiny_model(dtype)
  x = _pixels([3, *TINY.image_shape], dtype)
  latent, log_det = model.flow.forward_and_log_det(x)
  expected = log_det_by_autodiff(model.encode, x)
  tol = 1e-3 if dtype == 'float32' else 1e-8
  np.testing.assert_allclose(log_det, expected, rtol=tol, atol=tol)
  # The latent keeps the image's shape; the couplings and norms add to the logit's log-det.
  assert latent.shape == x.shape
  logit_log_det = model.flow.bijectors[0].forward_and_log_det(x)[1]
  assert np.abs(log_det - logit_log_det).min() > 1.


def test_log_prob_is_base_of_encoding_plus_log_det():
  model = _tiny_model('float64')
  x = _pixels([5, *TINY.image_shape], 'float64')
  latent, log_det = model.flow.forward_and_log_det(x)
  gaussian = -0.5 * np.sum(latent.numpy() ** 2 + np.log(2 * np.pi), axis=(1, 2, 3))
  np.testing.assert_allclose(model.log_prob(x), gaussian + log_det, rtol=1e-10)
  np.testing.assert_allclose(model.distribution.log_prob(x), model.log_prob(x), rtol=1e-10)
  np.testing.assert_allclose(model.bits_per_dim(x), -model.log_prob(x) / (32 * math.log(2)))
  np.testing.assert_allclose(model.predict(x, verbose=0), model.bits_per_dim(x), rtol=1e-6)


def test_uint8_images_are_dequantized():
  model = _tiny_model()
  images = np.random.default_rng(0).integers(0, 256, [4, *TINY.image_shape], dtype=np.uint8)
  # Uniform noise: repeatable with a seed, different without; encode uses pixel centres.
  np.testing.assert_allclose(model.log_prob(images, seed=3), model.log_prob(images, seed=3))
  assert not np.allclose(model.log_prob(images, seed=3), model.log_prob(images, seed=4))
  noisy = images + tf.random.stateless_uniform(images.shape, [3, 0])
  np.testing.assert_allclose(model.log_prob(images, seed=3), model.log_prob(noisy), rtol=1e-6)
  np.testing.assert_allclose(model.encode(images), model.encode(images.astype('float32') + 0.5))


def test_model_owns_every_variable():
  model = _tiny_model()
  x = _pixels([2, *TINY.image_shape])
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(model.bits_per_dim(x, training=True))
  used = {id(v) for v in tape.watched_variables()}
  owned = {id(v.value) for v in model.trainable_variables}
  # Every variable the density uses is the model's, and every one of the model's is used.
  assert used == owned
  gradients = tape.gradient(loss, model.trainable_variables)
  assert all(g is not None for g in gradients)
  # Batch-norm statistics (non-trainable) are the model's too: 3 + 3 + 4 couplings with a
  # network and a flow batch norm each, and Keras batch norms inside the networks.
  flow_stats = [v for v in model.non_trainable_variables if 'batch_statistics' in v.path]
  assert len(flow_stats) == 2 * 10
  assert len(model.flow_layers) == 20


def test_event_shapes():
  model = _tiny_model()
  assert model.distribution.event_shape == TINY.image_shape
  flow = model.flow
  assert flow.forward_event_shape(TINY.image_shape) == TINY.image_shape
  scale0 = flow.bijectors[1]
  squeeze, factor_out, unsqueeze = scale0.bijectors[6], scale0.bijectors[-2], scale0.bijectors[-1]
  assert squeeze.event_shape_out == (2, 2, 8)
  assert factor_out.forward_event_shape([2, 2, 8]) == [2, 2, 8]
  assert unsqueeze.forward_event_shape([2, 2, 8]) == [4, 4, 2]
  assert unsqueeze.inverse_event_shape([4, 4, 2]) == [2, 2, 8]
  np.testing.assert_array_equal(unsqueeze.forward_event_shape_tensor([2, 2, 8]), [4, 4, 2])


def test_round_trip_sample_and_decode():
  # Milder weights keep the samples inside the range where float32's sigmoid is invertible.
  model = _tiny_model(scale=0.1, variance=(0.8, 1.2))
  x = _pixels([4, *TINY.image_shape])
  np.testing.assert_allclose(model.decode(model.encode(x)), x, atol=1e-3)
  samples = model.sample(6, temperature=0.7, seed=5)
  assert samples.shape == (6, *TINY.image_shape)
  np.testing.assert_array_equal(samples, model.sample(6, temperature=0.7, seed=5))
  np.testing.assert_allclose(model.encode(samples), 0.7 * tf.random.stateless_normal(
      [6, *TINY.image_shape], [5, 0]), atol=1e-3)
  assert model.distribution.sample(2).shape == (2, *TINY.image_shape)
  images = rn.to_uint8(samples)
  assert images.dtype == tf.uint8


def test_full_depth_round_trip_cifar10_preset():
  model = rn.RealNVP('cifar10')
  randomize(model.flow_layers, seed=1, scale=0.2, variance=(0.8, 1.2))
  nets = [layer for layer in model.flow_layers if isinstance(layer, rn.CouplingNet)]
  for net in nets:
    net.scale.assign(tf.ones_like(net.scale))  # tanh scales as initialised: |s| up to 1
  x = _pixels([4, 32, 32, 3])
  latent = model.encode(x)
  # The couplings are far from the identity: zeroing their last layers moves the latent a lot.
  last_layers = [net.conv_out.g for net in nets]
  saved = [g.numpy() for g in last_layers]
  for g in last_layers:
    g.assign(tf.zeros_like(g))
  assert np.abs(model.encode(x) - latent).mean() > 0.05
  for g, value in zip(last_layers, saved):
    g.assign(value)
  x_back = model.decode(latent)
  logit = model.flow.bijectors[0]
  pixel_error = np.abs(x_back - x).max() / 256.
  logit_error = np.abs(logit.forward(x_back) - logit.forward(x)).max()
  print(f'cifar10 preset round trip: max error {pixel_error:.2e} in pixels scaled to [0, 1), '
        f'{logit_error:.2e} in logit space')
  assert pixel_error <= 1e-4 and logit_error <= 1e-4


def test_bad_inputs_name_the_problem():
  model = _tiny_model()
  with pytest.raises(ValueError, match=r'expected images of shape \[\.\.\., 4, 4, 2\]'):
    model.log_prob(np.zeros([2, 4, 4, 3], np.uint8))
  with pytest.raises(TypeError, match='expected uint8 or float images, got string'):
    model.log_prob(np.full([1, 4, 4, 2], 'a'))
  bad = np.full([1, 4, 4, 2], 100., np.float32)
  for value in (np.nan, 300., -15.):
    bad[0, 0, 0, 0] = value
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"model's support.*\(-14.2, 270.2\)"):
      model.log_prob(bad)
  with pytest.raises(ValueError, match='cannot be squeezed'):
    rn.RealNVP(rn.presets.get('mnist', num_scales=4))
  with pytest.raises(ValueError, match='Unknown preset'):
    rn.RealNVP('cifar100')
  with pytest.raises(ValueError, match='Unknown RealNVPConfig fields'):
    rn.presets.get('mnist', filters=3)


def test_presets_follow_the_paper():
  cifar = rn.presets.get('cifar10')
  assert (cifar.num_scales, cifar.num_blocks, cifar.num_filters) == (2, 8, 64)
  imagenet32 = rn.presets.get('imagenet32')
  assert imagenet32.image_shape[0] // 2 ** (imagenet32.num_scales - 1) == 4
  for name in ('imagenet64', 'celeba', 'lsun'):
    preset = rn.presets.get(name)
    assert preset.image_shape == (64, 64, 3) and preset.num_blocks == 2
    assert preset.num_filters == 32 and 64 // 2 ** (preset.num_scales - 1) == 4
  model = rn.RealNVP('mnist')
  assert model.encode(np.zeros([1, 28, 28, 1], np.uint8)).shape == (1, 28, 28, 1)
  # Features double per scale; channel couplings use twice the checkerboard features.
  widths = [layer.num_filters for layer in model.flow_layers if isinstance(layer, rn.CouplingNet)]
  assert widths == [32] * 3 + [64] * 3 + [64] * 3 + [128] * 3 + [128] * 4


def test_config_round_trips_through_keras():
  model = rn.RealNVP('mnist', num_blocks=2)
  clone = rn.RealNVP.from_config(model.get_config())
  assert clone.config == model.config
  assert clone.count_params() == model.count_params()


def test_train_step_clips_the_global_gradient_norm():
  model = rn.RealNVP(TINY.replace(clipnorm=1e-3))
  model.compile(optimizer=keras.optimizers.SGD(1.0))
  before = [v.numpy().copy() for v in model.trainable_variables]
  images = np.random.default_rng(0).integers(0, 256, [8, *TINY.image_shape], dtype=np.uint8)
  model.train_on_batch(images)
  step = np.sqrt(sum(np.sum((v.numpy() - b) ** 2)
                     for v, b in zip(model.trainable_variables, before)))
  assert step == pytest.approx(1e-3, rel=1e-3)  # SGD at rate 1: the clipped gradient itself


def test_train_step_builds_the_l2_decay_once():
  model = rn.RealNVP(TINY)
  model.compile()
  calls, penalized = [], [w for w in model.weights if w.regularizer is not None]
  for weight in penalized:
    weight.regularizer = lambda x, r=weight.regularizer: calls.append(1) or r(x)
  images = np.random.default_rng(0).integers(0, 256, [8, *TINY.image_shape], dtype=np.uint8)
  tf.function(model.train_step).get_concrete_function(tf.constant(images))
  assert penalized and len(calls) == len(penalized)  # `if self.losses:` built them twice


def test_optimizer_defaults_follow_the_paper():
  model = _tiny_model()
  model.compile()
  assert isinstance(model.optimizer, rn.optimizers.Adam)  # the fused one (compat.py)
  assert float(model.optimizer.learning_rate) == pytest.approx(1e-3)
  # L2 5e-5 on the weight-norm scales g and the tanh scales only.
  penalized = {w.path for layer in model.flow_layers for w in layer.weights
               if w.regularizer is not None}
  assert penalized and all(p.endswith('/g') or p.endswith('/scale') for p in penalized)
  assert all(w.regularizer.l2 == pytest.approx(5e-5) for layer in model.flow_layers
             for w in layer.weights if w.regularizer is not None)


def test_a_training_step_with_a_known_batch_size_computes_no_shapes():
  # With the batch size known while tracing, the flow's shapes, value counts and zero log-dets
  # are constants, not ops run at every step.
  model = rn.RealNVP('mnist', image_shape=(8, 8, 1), num_scales=2, num_blocks=1, num_filters=4)
  model.compile()
  graph = tf.function(model.train_step).get_concrete_function(
      tf.zeros([4, 8, 8, 1], tf.uint8)).graph
  shape_ops = [op.name for op in graph.get_operations()
               if op.type in ('Shape', 'StridedSlice', 'Prod', 'BroadcastArgs')]
  assert not shape_ops, shape_ops


@pytest.mark.parametrize('run_eagerly', [False, True])
def test_evaluate_reports_the_loss_in_graph_and_eager_mode(run_eagerly):
  # float pixels: no dequantization noise, so evaluate and predict see the same inputs
  images = np.random.default_rng(1).uniform(0., 256., [8, 8, 8, 1]).astype(np.float32)
  dataset = tf.data.Dataset.from_tensor_slices(images).batch(4, drop_remainder=True)
  model = rn.RealNVP('mnist', image_shape=(8, 8, 1), num_scales=2, num_blocks=1, num_filters=4)
  model.compile(run_eagerly=run_eagerly)
  result = model.evaluate(dataset, verbose=0, return_dict=True)
  bits = float(np.mean(model.predict(images, batch_size=4, verbose=0)))
  # the loss is the mean bits/dim plus the L2 decay (tiny at initialisation)
  assert result['bits_per_dim'] == pytest.approx(bits, rel=1e-4)
  assert result['loss'] == pytest.approx(bits, rel=1e-2)


def test_fit_runs_under_lighter_graph_options_and_restores_tfs(monkeypatch):
  from tfp_realnvp import keras_training
  seen = []

  class Record(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
      seen.append(tf.config.optimizer.get_experimental_options())

    def on_epoch_end(self, epoch, logs=None):
      raise RuntimeError('stop here')  # an error inside fit restores the options too
  tf.config.optimizer.set_experimental_options({'remapping': True})  # the user's
  try:
    model = rn.RealNVP(TINY)
    model.compile()
    images = np.random.default_rng(0).integers(0, 256, [8, *TINY.image_shape]).astype(np.uint8)
    with pytest.raises(RuntimeError, match='stop here'):
      model.fit(images, batch_size=4, epochs=1, verbose=0, callbacks=[Record()])
    assert seen and seen[0]['remapping'] is True  # kept as the user set it
    assert all(seen[0][name] is False for name in keras_training.LIGHTER_PASSES
               if name != 'remapping')
    after = tf.config.optimizer.get_experimental_options()
    assert after['remapping'] is True
    assert all(after.get(name) is None for name in keras_training.LIGHTER_PASSES
               if name != 'remapping')
    # And off where asked.
    monkeypatch.setattr(keras_training, 'LIGHTER_GRAPH_OPTIMIZATION', False)
    seen.clear()
    with pytest.raises(RuntimeError, match='stop here'):
      model.fit(images, batch_size=4, epochs=1, verbose=0, callbacks=[Record()])
    assert all(seen[0].get(name) is None for name in keras_training.LIGHTER_PASSES
               if name != 'remapping')
  finally:
    tf.config.optimizer.set_experimental_options({'remapping': None})
