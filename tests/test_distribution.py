"""`model.distribution` and the flow as a TFP user meets them: fresh numbers after any weight
change, variables, event shapes, one support, composition, batch shapes, finite statistics, and
one network pass per call."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_realnvp as rn
from tfp_realnvp.bijectors import FlowBijector, Squeeze

tfb, tfd = tfp.bijectors, tfp.distributions

DIGITS = rn.RealNVPConfig((8, 8, 1), num_scales=2, num_blocks=1, num_filters=8)


@pytest.fixture(scope='module')
def digits():
  """scikit-learn's 1,797 real 8x8 digits as uint8 `[N, 8, 8, 1]` (0..16 scaled to 0..255)."""
  from sklearn.datasets import load_digits
  images = np.minimum(load_digits().images * 16., 255.).astype(np.uint8)[..., None]
  return images[:1500], images[1500:]


def _float_pixels(images, seed=0):
  """Dequantized float pixels (what TFP's `log_prob` takes)."""
  return tf.constant(images, tf.float32) + tf.random.stateless_uniform(images.shape, [seed, 0])


def _flow_parts(bijector):
  yield bijector
  for part in bijector.parts:
    yield from _flow_parts(part)


def test_log_prob_follows_the_weights_after_fit_assign_and_load_weights(digits, tmp_path):
  train, _ = digits
  model = rn.RealNVP(DIGITS)
  x = _float_pixels(train[:8])  # the same tensor object throughout
  dist = model.distribution
  lp0 = dist.log_prob(x)
  np.testing.assert_allclose(lp0, model.log_prob(x), rtol=1e-5)
  model.compile()
  model.fit(train[:256], batch_size=64, epochs=1, verbose=0)
  lp1 = dist.log_prob(x)
  assert np.abs(lp1 - lp0).max() > 1.  # training moved the density...
  np.testing.assert_allclose(lp1, model.log_prob(x), rtol=1e-5)  # ...and TFP's API follows
  model.save_weights(str(tmp_path / 'trained.weights.h5'))
  # assign
  for layer in model.flow_layers:
    if isinstance(layer, rn.CouplingNet):
      layer.scale.assign(0.5 * layer.scale)
  lp2 = dist.log_prob(x)
  assert np.abs(lp2 - lp1).max() > 1e-2
  np.testing.assert_allclose(lp2, model.log_prob(x), rtol=1e-5)
  # load_weights
  model.load_weights(str(tmp_path / 'trained.weights.h5'))
  np.testing.assert_allclose(dist.log_prob(x), lp1, rtol=1e-5)
  # The bijector's own entry points, on one tensor: fresh after a change too.
  fldj_before = model.flow.forward_log_det_jacobian(x, event_ndims=3)
  latent = model.flow.forward(x)
  model.flow_layers[0].scale.assign(2. * model.flow_layers[0].scale)
  np.testing.assert_allclose(model.flow.forward_log_det_jacobian(x, event_ndims=3),
                             model.flow.forward_and_log_det(x)[1], rtol=1e-5)
  assert np.abs(model.flow.forward_and_log_det(x)[1] - fldj_before).max() > 1e-2
  np.testing.assert_allclose(model.flow.inverse(latent), model.decode(latent), rtol=1e-5)


def test_log_prob_follows_the_weights_inside_a_tf_function(digits):
  model = rn.RealNVP(DIGITS)
  x = _float_pixels(digits[0][:8])
  nets = [layer for layer in model.flow_layers if isinstance(layer, rn.CouplingNet)]

  @tf.function
  def before_and_after_a_change():
    before = model.distribution.log_prob(x)
    for net in nets:
      net.conv_out.g.assign(tf.fill(net.conv_out.g.shape, 0.3))
      net.conv_out.bias.assign(tf.fill(net.conv_out.bias.shape, 0.1))
    after = model.distribution.log_prob(x)
    with tf.control_dependencies([after]):  # one after the other (TF crashed once running both)
      expected = model.log_prob(tf.identity(x))
    return before, after, expected

  before, after, expected = before_and_after_a_change()
  assert np.abs(after - before).max() > 1.
  np.testing.assert_allclose(after, expected, rtol=1e-5)


def test_samples_are_scored_with_the_current_weights():
  model = rn.RealNVP(DIGITS)
  samples = model.distribution.sample(4, seed=1)
  for layer in model.flow_layers:
    if isinstance(layer, rn.CouplingNet):
      layer.conv_out.bias.assign(tf.fill(layer.conv_out.bias.shape, 0.2))
  np.testing.assert_allclose(model.distribution.log_prob(samples), model.log_prob(samples),
                             rtol=1e-5)
  # Sample and log-prob in one pass: the log-det handed over is the right one (sign included).
  samples, log_prob = model.distribution.experimental_sample_and_log_prob(4, seed=2)
  np.testing.assert_allclose(log_prob, model.log_prob(samples), rtol=1e-4)


def test_the_same_input_tensor_gets_a_fresh_log_det_after_the_weights_change():
  # TFP's bijector cache keys on the input tensor: with it, `after` would be `before`.
  # (`one_pass()` is a no-op kept for old code; it must not bring a cache back.)
  model = rn.RealNVP(DIGITS)
  x = _float_pixels(np.full([2, 8, 8, 1], 90, np.uint8))
  with rn.bijectors.one_pass():
    before = model.flow.forward_log_det_jacobian(x, event_ndims=3)
  model.flow_layers[0].scale.assign(3. * model.flow_layers[0].scale)
  model.flow_layers[0].conv_out.g.assign(tf.fill(model.flow_layers[0].conv_out.g.shape, 0.5))
  with rn.bijectors.one_pass():
    after = model.flow.forward_log_det_jacobian(x, event_ndims=3)
  assert np.abs(after - before).max() > 1e-2
  np.testing.assert_allclose(after, model.flow.forward_and_log_det(x)[1], rtol=1e-5)


def test_variables_are_the_models_and_a_gradient_tape_loop_trains_them(digits):
  train, test = digits
  model = rn.RealNVP(DIGITS)
  dist = model.distribution
  expected = {id(v.value) for v in model.trainable_variables}
  assert len(expected) > 50
  for module in (dist, model.flow, model.generative_flow):
    assert {id(v) for v in module.trainable_variables} == expected
    assert all(isinstance(v, tf.Variable) for v in module.variables)
  # `variables` also holds the batch-norm statistics.
  assert {id(v) for v in dist.variables} == {id(v.value) for v in model.variables}
  assert len(dist.variables) > len(dist.trainable_variables)
  # A composite of the distribution lists them too.
  assert {id(v) for v in tfd.Sample(dist, 2).trainable_variables} == expected

  test_pixels = _float_pixels(test[:200], seed=9)
  before = float(tf.reduce_mean(-dist.log_prob(test_pixels))) / (64 * math.log(2.))
  rng = np.random.default_rng(0)

  @tf.function
  def gradients_of_loss(batch):
    with tf.GradientTape() as tape:
      loss = -tf.reduce_mean(dist.log_prob(batch)) / 64.
    return tape.gradient(loss, dist.trainable_variables)

  def step(update):
    batch = _float_pixels(train[rng.choice(len(train), 64)], seed=int(rng.integers(1 << 30)))
    gradients = gradients_of_loss(batch)
    assert all(g is not None for g in gradients)
    update(gradients)

  adam = keras.optimizers.Adam(1e-3)
  for _ in range(25):
    step(lambda g: adam.apply_gradients(zip(g, dist.trainable_variables)))
  for _ in range(25):  # plain gradient descent on the tf.Variables themselves
    step(lambda g: [v.assign_sub(1e-3 * gv) for v, gv in zip(dist.trainable_variables, g)])
  after = float(tf.reduce_mean(-dist.log_prob(test_pixels))) / (64 * math.log(2.))
  print(f'test bits/dim by a GradientTape loop: {before:.3f} -> {after:.3f}')
  assert after < before - 0.3


def test_it_is_tfps_transformed_distribution_and_a_composite_tensor():
  model = rn.RealNVP(DIGITS)
  dist = model.distribution
  assert isinstance(dist, tfd.TransformedDistribution)
  assert isinstance(dist, tf.__internal__.CompositeTensor)
  # tf.nest sees the model's variables (TFP's own distributions show theirs the same way).
  leaves = tf.nest.flatten(dist, expand_composites=True)
  assert {id(v) for v in leaves if isinstance(v, tf.Variable)} == {
      id(v.value) for v in model.variables}
  rebuilt = tf.nest.pack_sequence_as(dist, leaves, expand_composites=True)
  x = _float_pixels(np.full([4, 8, 8, 1], 100, np.uint8))
  np.testing.assert_allclose(rebuilt.log_prob(x), dist.log_prob(x), rtol=1e-6)
  # An argument of a tf.function: one trace, the current weights, gradients on the variables.
  traces = []

  @tf.function
  def loss_and_gradients(d, x):
    traces.append(None)
    with tf.GradientTape() as tape:
      loss = -tf.reduce_mean(d.log_prob(x))
    return loss, tape.gradient(loss, d.trainable_variables)

  loss, gradients = loss_and_gradients(dist, x)
  assert len(gradients) == len(model.trainable_variables)
  assert all(g is not None for g in gradients)
  for layer in model.flow_layers:
    if isinstance(layer, rn.CouplingNet):
      layer.conv_out.bias.assign(tf.fill(layer.conv_out.bias.shape, 0.2))
  loss_after, _ = loss_and_gradients(dist.copy(), x)
  assert len(traces) == 1
  assert abs(float(loss_after - loss)) > 1.
  np.testing.assert_allclose(loss_after, -tf.reduce_mean(model.log_prob(x)), rtol=1e-5)


def test_event_shapes_keep_leading_dims_and_check_the_event():
  model = rn.RealNVP(DIGITS)
  base = tfd.Sample(tfd.Normal(0., 1.), [2, 8, 8, 1])
  pair = tfd.TransformedDistribution(base, tfb.Invert(model.flow))
  assert pair.event_shape == [2, 8, 8, 1]
  samples = pair.sample(3, seed=2)
  assert samples.shape == (3, 2, 8, 8, 1)
  expected = tf.reduce_sum(tf.reshape(model.log_prob(tf.reshape(samples, [6, 8, 8, 1])),
                                      [3, 2]), axis=1)
  np.testing.assert_allclose(pair.log_prob(samples), expected, rtol=1e-5)

  squeeze = Squeeze([4, 4, 2])
  assert squeeze.forward_event_shape([5, 4, 4, 2]) == [5, 2, 2, 8]
  assert squeeze.inverse_event_shape([5, 2, 2, 8]) == [5, 4, 4, 2]
  np.testing.assert_array_equal(squeeze.forward_event_shape_tensor([5, 4, 4, 2]), [5, 2, 2, 8])
  np.testing.assert_array_equal(squeeze.inverse_event_shape_tensor([7, 2, 2, 8]), [7, 4, 4, 2])
  for wrong in ([6, 6, 6], [4, 4], [4, 4, 3]):
    with pytest.raises(ValueError, match=r'squeeze: expected an event shape \[\.\.\., 4, 4, 2\]'):
      squeeze.forward_event_shape(wrong)
  with pytest.raises(ValueError, match=r'expected an event shape \[\.\.\., 2, 2, 8\]'):
    squeeze.inverse_event_shape([4, 4, 2])

  # At run time (shapes unknown while tracing) under validate_args.
  checked = Squeeze([4, 4, 2], validate_args=True)
  shape_fn = tf.function(checked.forward_event_shape_tensor,
                         input_signature=[tf.TensorSpec([None], tf.int32)])
  np.testing.assert_array_equal(shape_fn(tf.constant([3, 4, 4, 2])), [3, 2, 2, 8])
  with pytest.raises(tf.errors.InvalidArgumentError, match='expected an event shape'):
    shape_fn(tf.constant([6, 6, 6]))
  forward_fn = tf.function(checked.forward, input_signature=[tf.TensorSpec([None] * 4)])
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'expected shape \[\.\.\., 4, 4, 2\]'):
    forward_fn(tf.zeros([1, 6, 6, 2]))


def test_one_support_for_samples_model_and_distribution():
  model = rn.RealNVP(DIGITS)
  samples = model.sample(64, temperature=2., seed=3)  # spread out: many leave [0, 256)
  assert float(tf.reduce_min(samples)) < 0. or float(tf.reduce_max(samples)) > 256.
  lp_model, lp_dist = model.log_prob(samples), model.distribution.log_prob(samples)
  assert np.isfinite(lp_model).all()
  np.testing.assert_allclose(lp_dist, lp_model, rtol=1e-5)
  # Both accept the same points and refuse the same points, with the same message.
  inside = np.full([1, 8, 8, 1], 100., np.float32)
  inside[0, 0, 0, 0], inside[0, 1, 1, 0] = -14., 270.
  assert np.isfinite(model.log_prob(inside)).all()
  assert np.isfinite(model.distribution.log_prob(inside)).all()
  compiled = rn.RealNVP(DIGITS)
  compiled.compile(jit_compile=True)  # XLA drops run-time checks: the model checks before it
  for bad in (-15., 271., np.nan):
    outside = np.full([1, 8, 8, 1], 100., np.float32)
    outside[0, 3, 3, 0] = bad
    for log_prob in (model.log_prob, model.distribution.log_prob, compiled.log_prob):
      with pytest.raises(tf.errors.InvalidArgumentError, match=r"model's support"):
        log_prob(outside)


def test_two_models_compose_and_the_distribution_is_named_after_the_model():
  first, second = rn.RealNVP(DIGITS), rn.RealNVP(DIGITS, name='second_model')
  assert first.distribution.name == first.name
  assert second.distribution.name == 'second_model'
  joint = tfd.JointDistributionSequential([first.distribution, rn.RealNVP(DIGITS).distribution])
  x, y = joint.sample(2, seed=4)
  assert x.shape == y.shape == (2, 8, 8, 1)
  assert joint.log_prob([x, y]).shape == (2,)
  mixture = tfd.Mixture(tfd.Categorical(logits=[0., 0.]),
                        [first.distribution, second.distribution])
  assert np.isfinite(mixture.log_prob(x)).all()
  assert rn.RealNVP.from_config(second.get_config()).name == 'second_model'


def test_batch_shapes_are_scalar():
  model = rn.RealNVP(DIGITS)
  for part in _flow_parts(model.flow):
    assert isinstance(part, FlowBijector)
    assert part.experimental_batch_shape() == []
  assert model.generative_flow.experimental_batch_shape() == []
  assert model.distribution.batch_shape == []
  assert model.distribution.event_shape == [8, 8, 1]


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
@pytest.mark.parametrize('batch', [1, 0])
def test_network_batch_norm_statistics_stay_finite_for_any_batch(batch, dtype):
  norm = rn.nets.BatchNormalization(dtype=dtype)
  x = tf.fill([batch, 1, 1, 3], tf.constant(2., dtype))
  norm(x, training=True)
  assert np.isfinite(norm.moving_mean.numpy()).all()
  assert np.isfinite(norm.moving_variance.numpy()).all()
  assert np.isfinite(norm(tf.ones([2, 1, 1, 3], dtype))).all()


@pytest.mark.parametrize('batch', [1, 0])
def test_running_statistics_stay_finite_for_any_batch(batch):
  model = rn.RealNVP(rn.RealNVPConfig(image_shape=(2, 2, 1), num_scales=2, num_blocks=1,
                                      num_filters=4, dtype='float64'))
  model.log_prob(tf.fill([batch, 2, 2, 1], tf.constant(100., tf.float64)), training=True)
  bad = [v.path for v in model.variables if not np.isfinite(v.numpy()).all()]
  assert not bad
  assert np.isfinite(model.log_prob(tf.fill([3, 2, 2, 1], tf.constant(90., tf.float64)))).all()


@pytest.mark.parametrize('traced', [False, True], ids=['eager', 'function'])
def test_each_network_runs_once_per_call_through_tfps_api(traced, monkeypatch):
  model = rn.RealNVP(DIGITS)
  nets = [layer for layer in model.flow_layers if isinstance(layer, rn.CouplingNet)]
  calls = []
  call = rn.CouplingNet.call

  def counted(self, *args, **kwargs):
    calls.append(id(self))
    return call(self, *args, **kwargs)

  monkeypatch.setattr(rn.CouplingNet, 'call', counted)
  dist = model.distribution
  x = _float_pixels(np.full([4, 8, 8, 1], 100, np.uint8))
  maybe_traced = (lambda fn: tf.function(fn)) if traced else (lambda fn: fn)
  for name, fn in [('log_prob', lambda: dist.log_prob(x)),
                   ('prob', lambda: dist.prob(x)),
                   ('sample', lambda: dist.sample(3, seed=1)),
                   ('sample_and_log_prob',
                    lambda: dist.experimental_sample_and_log_prob(3, seed=1)),
                   ('Sample of the distribution', lambda: tfd.Sample(dist, 2).log_prob(
                       tf.stack([x, x], axis=1)))]:
    calls.clear()
    maybe_traced(fn)()
    assert sorted(calls) == sorted(id(net) for net in nets), name



def test_any_tfp_bijector_as_the_flow_and_a_prior_of_the_wrong_rank():
  # Not only the package's flows: a TFP bijector goes through TFP's own two calls.
  prior = tfd.Sample(tfd.Normal(0., 1.), [2, 2, 1])
  flow = tfb.Scale(2.)  # data -> latent
  dist = rn.FlowDistribution(prior, flow)
  x = tf.constant(np.random.default_rng(0).normal(size=[3, 2, 2, 1]), tf.float32)
  expected = prior.log_prob(2. * x) + 4 * np.log(2.)
  np.testing.assert_allclose(dist.log_prob(x), expected, rtol=1e-6)
  samples, log_prob = dist.experimental_sample_and_log_prob(5, seed=(1, 2))
  np.testing.assert_allclose(log_prob, prior.log_prob(2. * samples) + 4 * np.log(2.), rtol=1e-5)
  model = rn.RealNVP(rn.RealNVPConfig((4, 4, 1), num_scales=1, num_blocks=1, num_filters=4))
  with pytest.raises(ValueError, match=r'rank 3 or more\), got \(\)'):
    rn.FlowDistribution(tfd.Normal(tf.zeros([4, 4]), 1.), model.flow)
