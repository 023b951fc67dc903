"""Class-conditional Real NVP: p(x | y) exact, labels checked, the class prior, Bayes' classifier,
sampling a chosen class, and the model's TFP distributions."""

import math

import numpy as np
import pytest
import scipy.special
import tensorflow as tf
import tensorflow_probability as tfp

from conftest import log_det_by_autodiff, randomize
from bijector_test_util import REGIMES, fresh, in_regime
import tfp_realnvp as rn
from tfp_realnvp import training
from tfp_realnvp.bijectors import latent_groups
from tfp_realnvp.conditional import LabelError

tfd = tfp.distributions

TINY = rn.RealNVPConfig((8, 8, 1), num_scales=2, num_blocks=1, num_filters=4, num_classes=3)


def _conditional_model(dtype='float64', seed=1, **overrides):
  model = rn.RealNVP(TINY.replace(dtype=dtype, **overrides))
  randomize(model.flow_layers, seed=seed, scale=0.1, variance=(0.8, 1.2))
  rng = np.random.default_rng(seed)
  for w in (model.prior.loc, model.prior.log_scale):
    w.assign(rng.normal(0., 0.3, w.shape))
  return model


def _pixels(count=3, seed=1, dtype=tf.float64):
  return tf.random.stateless_uniform([count, 8, 8, 1], [seed, 0], 1., 255., dtype)


@pytest.mark.parametrize('shape,num_scales,layout', [((28, 28, 1), 3, 'real_nvp'),
                                                     ((32, 32, 3), 3, 'glow')])
def test_latent_groups_follow_the_squeezes_and_factor_outs(shape, num_scales, layout):
  # Undo the flow's squeezes: at each scale the factored-out half of the squeezed channels must
  # hold one group per channel, numbered on from the previous part's.
  groups = latent_groups(shape, num_scales, layout)
  assert groups.shape == shape
  rest, first = groups, 0
  for scale in range(num_scales):
    last = scale == num_scales - 1
    if layout == 'real_nvp' and last:
      squeezed = rest
    else:
      squeezed = tf.nn.space_to_depth(rest[None], 2)[0].numpy()
    half = squeezed.shape[-1] if last else squeezed.shape[-1] // 2
    expected = first + np.arange(half)
    np.testing.assert_array_equal(squeezed[..., :half],
                                  np.broadcast_to(expected, squeezed[..., :half].shape))
    rest, first = squeezed[..., half:], first + half
  assert groups.max() + 1 == first


def test_the_factored_out_part_does_not_depend_on_the_inner_scale():
  model = _conditional_model()
  groups = latent_groups(TINY.image_shape, TINY.num_scales)
  inner = [v for layer in model.flow.bijectors[1].bijectors[-2].keras_layers
           for v in layer.trainable_variables]  # the second scale, inside the factor-out
  assert inner
  weights = tf.random.stateless_normal([3, 8, 8, 1], [5, 0], dtype=tf.float64)
  for part, in_part in (('first', groups < 2), ('last', groups >= 2)):
    with tf.GradientTape() as tape:
      latent = model.encode(_pixels(), [0, 1, 2])
      total = tf.reduce_sum(latent * weights * in_part)
    gradients = tape.gradient(total, inner)
    size = sum(float(tf.reduce_sum(tf.abs(g))) for g in gradients if g is not None)
    assert (size == 0.) == (part == 'first'), (part, size)


def test_class_conditional_flow_is_exact():
  model = _conditional_model()
  x, labels = _pixels(), tf.constant([0, 2, 1])
  latent, log_det = model.flow.forward_and_log_det(x, labels=labels)
  np.testing.assert_allclose(
      log_det, [log_det_by_autodiff(lambda e, k=k: model.encode(e, [k]), x[i:i + 1])[0]
                for i, k in enumerate(labels.numpy())], rtol=1e-8)
  np.testing.assert_allclose(model.decode(latent, labels), x, rtol=1e-9)
  # The label changes s, t and the prior: other labels give other latents and densities.
  assert not np.allclose(model.encode(x, [1, 0, 2]), latent)
  # log p(x | y) = log N(z; mu_y, sigma_y) + log|det|, the prior per (part, channel) group.
  groups = latent_groups(TINY.image_shape, TINY.num_scales)
  loc = model.prior.loc.numpy()[labels.numpy()][:, groups]
  scale = np.exp(model.prior.log_scale.numpy()[labels.numpy()][:, groups])
  gaussian = np.sum(-0.5 * ((latent - loc) / scale) ** 2 - np.log(scale)
                    - 0.5 * math.log(2 * math.pi), axis=(1, 2, 3))
  np.testing.assert_allclose(model.log_prob(x, labels), gaussian + log_det, rtol=1e-12)
  np.testing.assert_allclose(model.distribution_given(labels).log_prob(fresh(x)),
                             gaussian + log_det, rtol=1e-12)
  np.testing.assert_allclose(model.bits_per_dim(x, labels),
                             -(gaussian + log_det) / (64 * math.log(2)), rtol=1e-12)


def test_the_models_distribution_is_the_class_mixture():
  model = _conditional_model()
  model.prior.class_counts.assign([1., 3., 6.])
  x = _pixels()
  per_class = model.class_log_likelihoods(x).numpy()  # float pixels: no noise
  for k in range(3):
    np.testing.assert_allclose(per_class[:, k], model.log_prob(x, k), rtol=1e-12)
  log_prior = np.log([0.1, 0.3, 0.6])
  np.testing.assert_allclose(model.class_log_prior(), log_prior, rtol=1e-12)
  np.testing.assert_allclose(model.distribution.log_prob(fresh(x)),
                             scipy.special.logsumexp(per_class + log_prior, axis=1), rtol=1e-10)
  posterior = scipy.special.softmax(per_class + log_prior, axis=1)
  np.testing.assert_allclose(model.predict_proba(x), posterior, rtol=1e-9)
  np.testing.assert_array_equal(model.classify(x), posterior.argmax(1))
  # Its variables are the model's: the flow, the prior's means and scales.
  assert {id(v) for v in model.distribution.trainable_variables} == {
      id(v.value) for v in model.trainable_variables}
  # Weights changed after it was made: its numbers follow them (nothing stale).
  model.prior.loc.assign(model.prior.loc + 0.5)
  np.testing.assert_allclose(model.distribution_given([0, 1, 2]).log_prob(fresh(x)),
                             model.log_prob(x, [0, 1, 2]), rtol=1e-12)
  assert not np.allclose(model.log_prob(x, [0, 1, 2]), per_class[:, [0, 1, 2]].diagonal())


def test_every_class_goes_through_one_copy_of_the_flow_in_a_traced_function():
  # A copy per class made the first call of a 10-class model's classifier four times slower
  # (tracing and optimizing ten flows).
  model = _conditional_model('float32', num_classes=10)
  x = _pixels(dtype=tf.float32)

  def convolutions(fn):
    graph = tf.function(fn).get_concrete_function(x).graph.as_graph_def()
    return sum(node.op == 'Conv2D' for nodes in
               [graph.node, *(f.node_def for f in graph.library.function)] for node in nodes)
  one_class = convolutions(lambda x: model.log_prob(x, tf.zeros([3], tf.int32)))
  assert one_class > 0
  for method in (model.class_log_likelihoods, model.marginal_log_prob, model.classify):
    assert convolutions(method) == one_class, method.__name__


def test_sampling_a_chosen_class_decodes_its_gaussian():
  model = _conditional_model()
  samples = model.sample(4, temperature=0.7, seed=5, labels=2)
  np.testing.assert_array_equal(samples, model.sample(4, temperature=0.7, seed=5, labels=2))
  noise = tf.random.stateless_normal([4, 8, 8, 1], [5, 0], dtype=tf.float64)
  loc, log_scale = model.prior.loc_and_log_scale(tf.fill([4], 2))
  np.testing.assert_allclose(model.encode(samples, 2), loc + 0.7 * tf.exp(log_scale) * noise,
                             rtol=1e-7, atol=1e-9)
  # Other labels per sample, and classes drawn from p(y) when none is given.
  assert model.sample(3, seed=1, labels=[0, 1, 2]).shape == (3, 8, 8, 1)
  model.prior.class_counts.assign([0., 0., 5.])
  drawn = model.sample(3, temperature=0.7, seed=5)
  np.testing.assert_allclose(drawn, model.sample(3, temperature=0.7, seed=5, labels=2))
  # The class grid's samples: class by class, the first num_classes classes if asked.
  assert training.class_samples(model, per_class=2, num_classes=2, seed=3).shape == (4, 8, 8, 1)
  np.testing.assert_allclose(training.class_samples(model, per_class=2, seed=3),
                             model.sample(6, 0.7, seed=3, labels=[0, 0, 1, 1, 2, 2]))
  # TFP's way: one image per label, or sample_shape + labels' shape.
  given = model.distribution_given([0, 1])
  assert given.batch_shape == [2] and given.event_shape == [8, 8, 1]
  assert given.sample(seed=(1, 2)).shape == (2, 8, 8, 1)
  assert given.sample(3, seed=(1, 2)).shape == (3, 2, 8, 8, 1)
  assert model.distribution.sample(2, seed=(1, 2)).shape == (2, 8, 8, 1)
  # Both go into a tf.function as TFP's distributions do, with the model's variables.
  x = model.sample(2, seed=3, labels=[0, 1])
  log_prob = tf.function(lambda d, x: d.log_prob(x))
  np.testing.assert_allclose(log_prob(given, x), model.log_prob(x, [0, 1]), rtol=1e-10)
  np.testing.assert_allclose(log_prob(model.distribution, x), model.distribution.log_prob(x),
                             rtol=1e-10)
  assert {id(v) for v in tfd.Sample(model.distribution, 2).trainable_variables} == {
      id(v.value) for v in model.trainable_variables}


@pytest.mark.parametrize('regime', REGIMES)
def test_conditional_coupling_keeps_tfps_contract(regime):
  model = _conditional_model()
  coupling = model.flow.bijectors[1].bijectors[0]
  assert type(coupling).__name__ == 'AffineCoupling'
  x = tf.random.stateless_normal([3, 8, 8, 1], [2, 0], dtype=tf.float64)
  labels = tf.constant([2, 0, 1])
  forward = in_regime(lambda x, y: coupling.forward(x, labels=y), regime)
  inverse = in_regime(lambda x, y: coupling.inverse(x, labels=y), regime)
  fldj = in_regime(lambda x, y: coupling.forward_log_det_jacobian(x, 3, labels=y), regime)
  ildj = in_regime(lambda x, y: coupling.inverse_log_det_jacobian(x, 3, labels=y), regime)
  y = forward(fresh(x), labels)
  np.testing.assert_allclose(inverse(fresh(y), labels), x, rtol=1e-10)
  np.testing.assert_allclose(ildj(fresh(y), labels), -fldj(fresh(x), labels), rtol=1e-10)
  assert not np.allclose(forward(fresh(x), tf.constant([0, 1, 2])), y)  # the label matters
  expected = [log_det_by_autodiff(lambda e, k=k: coupling.forward(e, labels=[k]),
                                  x[i:i + 1])[0] for i, k in enumerate(labels.numpy())]
  np.testing.assert_allclose(fldj(fresh(x), labels), expected, rtol=1e-8)


def test_labels_that_do_not_fit_are_clear_errors():
  model = _conditional_model()
  x = _pixels(2)
  for labels, message in ((None, 'is class-conditional'), ([0, 3], r'in \[0, 3\), got 3'),
                          ([-1, 0], r'in \[0, 3\), got -1'), ([0., 1.], 'must be integers'),
                          ([0, 1, 2], '2 images but 3 labels'), ([[0], [1]], 'shape')):
    with pytest.raises(LabelError, match=message):
      model.log_prob(x, labels)
  with pytest.raises(LabelError, match='is class-conditional'):
    model.encode(x)
  with pytest.raises(LabelError, match='pass training= by keyword'):
    model.log_prob(x, True)
  # In a traced function the range is checked at run time.
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'labels must be in \[0, 3\)'):
    tf.function(lambda y: model.log_prob(x, y))(tf.constant([0, 5]))
  with pytest.raises(LabelError, match=r'in \[0, 3\)'):
    model.distribution_given([4])
  plain = rn.RealNVP(TINY.replace(num_classes=0))
  with pytest.raises(LabelError, match='not class-conditional'):
    plain.log_prob(_pixels(2, dtype=tf.float32), [0, 1])
  with pytest.raises(LabelError, match='not class-conditional'):
    plain.sample(2, labels=1)
  with pytest.raises(LabelError, match='not class-conditional'):
    plain.distribution_given([0])
  with pytest.raises(LabelError, match='not class-conditional'):
    plain.classify(_pixels(2, dtype=tf.float32))


def _two_classes(count, seed=0):
  """Dark images (class 0) and bright ones (class 1), 8x8 grey."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, count)
  low = np.where(labels == 0, 0, 150)[:, None, None, None]
  images = (low + rng.integers(0, 100, [count, 8, 8, 1])).astype(np.uint8)
  return images, labels.astype(np.int32)


def test_fit_on_pairs_learns_the_classes_and_their_prior():
  model = rn.RealNVP(TINY.replace(num_classes=2))
  model.compile()
  images, labels = _two_classes(256)
  with pytest.raises(LabelError, match=r'give \(images, labels\) pairs'):
    model.fit(images, batch_size=32, epochs=1, verbose=0)
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(32)
  model.fit(dataset, epochs=4, verbose=0)
  counts = np.bincount(labels, minlength=2) * 4  # every label of 4 epochs
  np.testing.assert_array_equal(model.prior.class_counts.numpy(), counts)
  np.testing.assert_allclose(model.class_log_prior(), np.log(counts / counts.sum()), rtol=1e-6)
  test_images, test_labels = _two_classes(64, seed=1)
  assert np.mean(model.classify(test_images, seed=0).numpy() == test_labels) > 0.95
  right = model.bits_per_dim(test_images, test_labels, seed=0)
  wrong = model.bits_per_dim(test_images, 1 - test_labels, seed=0)
  assert float(tf.reduce_mean(right)) < float(tf.reduce_mean(wrong))
  evaluated = model.evaluate(test_images, test_labels, batch_size=64, verbose=0)
  np.testing.assert_allclose(evaluated[1], tf.reduce_mean(model.bits_per_dim(
      test_images, test_labels, seed=None)), rtol=0.05)  # fresh noise
  # An unconditional model refuses pairs.
  plain = rn.RealNVP(TINY.replace(num_classes=0))
  plain.compile()
  with pytest.raises(LabelError, match='not class-conditional'):
    plain.fit(dataset, epochs=1, verbose=0)


def test_class_counts_sum_over_replicas_and_checkpoint(tmp_path):
  strategy = training.mirrored_strategy(['/cpu:0', '/cpu:1'])
  with strategy.scope():
    model = rn.RealNVP(TINY.replace(num_classes=2, normalization='actnorm', num_scales=1))
    model.compile()
  images, labels = _two_classes(64)
  model.fit(images, labels, batch_size=16, epochs=1, verbose=0)
  assert not model.needs_data_initialization()  # ActNorm set from the first labelled batch
  np.testing.assert_array_equal(model.prior.class_counts.numpy(), np.bincount(labels))
  training.Checkpointer(str(tmp_path), model).save()
  clone = rn.RealNVP(model.config)
  clone.compile()
  training.Checkpointer(str(tmp_path), clone).restore_latest()
  np.testing.assert_array_equal(clone.prior.class_counts.numpy(), np.bincount(labels))
  np.testing.assert_array_equal(clone.prior.loc.numpy(), model.prior.loc.numpy())


def test_configs_written_before_classes_load_unconditional():
  old = {k: v for k, v in TINY.to_dict().items() if k != 'num_classes'}
  assert rn.RealNVPConfig.from_dict(old).num_classes == 0
