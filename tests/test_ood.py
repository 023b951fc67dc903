"""Out-of-distribution scores (`tfp_realnvp.ood`): each formula against a direct computation, and
on real digits, the failure of raw likelihood on simpler images and the scores that fix it."""

import io
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import tfp_realnvp as rn
from tfp_realnvp import ood

CONFIG = rn.RealNVPConfig((8, 8, 1), num_scales=2, num_blocks=1, num_filters=4)


def _images(count, seed=0, shape=(8, 8, 1)):
  return np.random.default_rng(seed).integers(0, 256, [count, *shape], dtype=np.uint8)


def _varied_images(count, seed=0):
  """Noise with a random number of blank rows: images of varied complexity."""
  images = _images(count, seed)
  for image, rows in zip(images, np.random.default_rng(seed + 1).integers(0, 7, count)):
    image[:rows] = 0
  return images


@pytest.mark.parametrize('overrides', [dict(image_shape=(8, 8, 1), num_scales=3),
                                       dict(image_shape=(8, 8, 3), num_scales=2, layout='glow',
                                            steps_per_scale=2)],
                         ids=['real_nvp', 'glow'])
def test_the_levels_shares_sum_to_the_log_density(overrides):
  model = rn.RealNVP('mnist', num_blocks=1, num_filters=4, **overrides)
  images = _images(5, shape=overrides['image_shape'])
  shares = ood.level_log_probs(model, tf.identity(images), seed=3).numpy()
  num_scales = overrides['num_scales']
  assert shares.shape == (5, 1 + num_scales)
  np.testing.assert_allclose(shares.sum(-1), model.log_prob(tf.identity(images), seed=3),
                             rtol=1e-5)
  np.testing.assert_allclose(ood.level_bits_per_dim(model, tf.identity(images), seed=3).numpy()
                             .sum(-1), model.bits_per_dim(tf.identity(images), seed=3), rtol=1e-5)
  # The preprocessing's share is the logit's log-det of the same dequantized pixels.
  pixels = model.dequantize(tf.identity(images), seed=3)
  np.testing.assert_allclose(shares[:, 0], model.flow.parts[0].forward_log_det_jacobian(
      pixels, event_ndims=3), rtol=1e-5)
  # Level l holds half of what is left: D/2, D/4, ..., the last scale the rest.
  levels = ood.latent_levels(overrides['image_shape'], num_scales)
  size = math.prod(overrides['image_shape'])
  expected = [size // 2 ** (l + 1) for l in range(num_scales - 1)]
  assert [int((levels == l).sum()) for l in range(num_scales)] == [*expected,
                                                                     size - sum(expected)]


def test_the_levels_hold_the_parts_the_flow_factors_out():
  # The finest level's latent elements are those the first scale factored out: changing one of
  # them changes only level 0's Gaussian term, not the log-dets.
  model = rn.RealNVP(CONFIG)
  levels = ood.latent_levels(CONFIG.image_shape, 2)
  latent = model.encode(_images(1))
  moved = latent.numpy().copy()
  where = tuple(np.argwhere(levels == 0)[0])
  moved[(0, *where)] += 1.
  pixels = model.decode(moved)
  before = ood.level_log_probs(model, model.decode(latent)).numpy()
  after = ood.level_log_probs(model, pixels).numpy()
  gaussian = lambda z: -0.5 * z ** 2  # noqa: E731
  change = gaussian(moved[(0, *where)]) - gaussian(latent.numpy()[(0, *where)])
  assert after[0, 1] - before[0, 1] == pytest.approx(change, abs=0.05)
  np.testing.assert_allclose(after[0, 0], before[0, 0], rtol=1e-3)


def test_compressed_bits_are_the_png_files_length():
  images = np.concatenate([np.zeros([1, 8, 8, 1], np.uint8), _images(1)])
  bits = ood.compressed_bits_per_dim(images, 'png')
  for image, value in zip(images, bits):
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buffer, format='PNG', optimize=True)
    assert value == len(buffer.getvalue()) * 8 / 64
  assert bits[0] < bits[1]  # a blank image is simpler than noise
  best = ood.compressed_bits_per_dim(images, 'best')
  assert np.all(best <= bits)
  with pytest.raises(ValueError, match='Unknown compressor'):
    ood.compressed_bits_per_dim(images, 'zip')
  with pytest.raises(ValueError, match=r'Expected uint8 images \[N, H, W, 1 or 3\]'):
    ood.compressed_bits_per_dim(images[0], 'png')


def test_each_score_is_its_formula():
  model, background = rn.RealNVP(CONFIG), rn.RealNVP(CONFIG.replace(num_filters=8))
  held_out, images = _varied_images(40, seed=1), _varied_images(6, seed=2)
  scorer = ood.OODScorer(model, background, batch_size=4).fit(held_out)
  scores = scorer.score(images, ood.METHODS)
  bits = np.concatenate([model.bits_per_dim(images[i:i + 4], seed=i // 4 + 1).numpy()
                         for i in range(0, 6, 4)])
  np.testing.assert_allclose(scores['bits_per_dim'], bits, rtol=1e-6)
  png = ood.compressed_bits_per_dim(images)
  np.testing.assert_allclose(scores['complexity'], bits - png, rtol=1e-6)
  background_bits = np.concatenate([background.bits_per_dim(images[i:i + 4], seed=i // 4 + 1)
                                    .numpy() for i in range(0, 6, 4)])
  np.testing.assert_allclose(scores['likelihood_ratio'], bits - background_bits, rtol=1e-5)
  held_out_bits = np.concatenate([model.bits_per_dim(held_out[i:i + 4], seed=i // 4 + 1).numpy()
                                  for i in range(0, 40, 4)])
  np.testing.assert_allclose(scores['typicality'], np.abs(bits - held_out_bits.mean()),
                             rtol=1e-5)
  levels = np.stack([scores[name] for name in ood.level_names(2)], -1)
  np.testing.assert_allclose(levels.sum(-1), bits, rtol=1e-5)
  # fitted: the squared Mahalanobis distance from the held-out features' Gaussian
  features = scorer.features(held_out)
  mean, covariance = features.mean(0), np.cov(features, rowvar=False, bias=True)
  centred = np.concatenate([levels, png[:, None]], -1) - mean
  expected = np.einsum('ni,ij,nj->n', centred, np.linalg.inv(covariance), centred)
  np.testing.assert_allclose(scores['fitted'], expected, rtol=1e-4)
  # combined: -log10 of the Bonferroni-combined conformal p-values of typicality and the ratio
  held_out_bits_bg = np.concatenate([background.bits_per_dim(held_out[i:i + 4], seed=i // 4 + 1)
                                     .numpy() for i in range(0, 40, 4)])
  reference = {'typicality': np.abs(held_out_bits - held_out_bits.mean()),
               'likelihood_ratio': held_out_bits - held_out_bits_bg}
  p_values = [(1 + (reference[m][None, :] >= scores[m][:, None]).sum(-1)) / 41 for m in reference]
  expected = -np.log10(np.minimum(1., 2 * np.min(p_values, axis=0)))
  np.testing.assert_allclose(scores['combined'], expected, rtol=1e-6)
  assert scorer.combine == ('typicality', 'likelihood_ratio')


def test_typicality_test_flags_a_shifted_batch_not_a_typical_one():
  model = rn.RealNVP(CONFIG)
  scorer = ood.OODScorer(model).fit(_images(200, seed=3), methods=['typicality'])
  typical = scorer.bits_per_dim(_images(20, seed=4))
  statistic, threshold = scorer.typicality_test(typical)
  assert statistic < threshold
  statistic, threshold = scorer.typicality_test(typical - 0.5)
  assert statistic > threshold
  # Several batches at once; one far in-distribution outlier among the held-out images widens
  # the mean's threshold past a shifted batch, not the median's.
  batches = np.stack([typical[:10], typical[10:] - 0.5])
  statistics, _ = scorer.typicality_test(batches)
  assert statistics.shape == (2,) and statistics[1] == scorer.typicality_test(typical[10:] - 0.5)[0]
  scorer._held_out_bits = np.append(scorer._held_out_bits, scorer.typical_bits_per_dim + 200.)
  scorer.typical_bits_per_dim = scorer._held_out_bits.mean()
  statistics, threshold = scorer.typicality_test(batches)
  assert np.all(statistics < threshold)
  statistics, threshold = scorer.typicality_test(batches, statistic='median')
  assert statistics[0] < threshold < statistics[1]
  with pytest.raises(ValueError, match="statistic must be 'mean' or 'median', got 'mode'"):
    scorer.typicality_test(batches, statistic='mode')


def test_separation_is_sklearns_and_fpr_at_95_tpr_counts_accepted_ood():
  rng = np.random.default_rng(5)
  inside, outside = rng.normal(0, 1, 400), rng.normal(1.5, 1, 300)
  figures = ood.separation(inside, outside)
  pairs = (outside[:, None] > inside[None, :]).mean()  # P(OOD scores above in-distribution)
  assert figures['auroc'] == pytest.approx(pairs, abs=1e-9)
  threshold = np.sort(inside)[int(math.ceil(0.95 * 400)) - 1]  # accepts 95% of inside
  assert figures['fpr_at_95_tpr'] == pytest.approx((outside <= threshold).mean(), abs=1e-9)
  assert (figures['in'], figures['out']) == (400, 300)
  assert ood.separation(inside, inside + 100)['auroc'] == 1.
  assert ood.separation(inside, inside - 100)['auroc'] == 0.
  with pytest.raises(ValueError, match='0 out-of-distribution'):
    ood.separation(inside, [])


def test_perturb_replaces_the_given_fraction_of_pixels_with_noise():
  images = np.full([200, 8, 8, 3], 7, np.uint8)
  assert np.array_equal(ood.perturb(images, 0.).numpy(), images)
  perturbed = ood.perturb(images, 0.2, seed=1).numpy()
  assert perturbed.dtype == np.uint8
  changed = np.any(perturbed != 7, -1)
  assert 0.18 < changed.mean() < 0.22
  assert np.array_equal(perturbed, ood.perturb(images, 0.2, seed=1).numpy())  # repeatable
  with pytest.raises(ValueError, match=r'rate must lie in \[0, 1\], got 1.5'):
    ood.perturb(images, 1.5)


def test_bad_requests_are_one_line_errors():
  model = rn.RealNVP(CONFIG)
  scorer = ood.OODScorer(model)
  with pytest.raises(ValueError, match="Unknown score method 'llr'; choose from bits_per_dim"):
    scorer.score(_images(2), ['llr'])
  with pytest.raises(ValueError, match='likelihood_ratio needs a background model'):
    scorer.score(_images(2), ['likelihood_ratio'])
  with pytest.raises(ValueError, match='typicality needs held-out in-distribution images'):
    scorer.score(_images(2), ['typicality'])
  with pytest.raises(ValueError, match=r'Expected images \[N, 8, 8, 1\], got \[2, 16, 16, 1\]'):
    scorer.score(_images(2, shape=(16, 16, 1)))
  with pytest.raises(ValueError, match='empty set'):
    scorer.score(_images(0))
  with pytest.raises(ValueError, match=r'background model is of images \[16, 16, 1\]'):
    ood.OODScorer(model, rn.RealNVP(CONFIG.replace(image_shape=(16, 16, 1))))
  one_scale = ood.OODScorer(rn.RealNVP(CONFIG.replace(num_scales=1)))
  with pytest.raises(ValueError, match='levels scores need a model with levels'):
    one_scale.score(_images(2), ['levels'])
  one_scale.fit(_images(10))  # by default fits what the model allows: typicality, not fitted
  assert one_scale.score(_images(2), ['typicality'])['typicality'].shape == (2,)
  conditional = ood.OODScorer(rn.RealNVP(CONFIG.replace(num_classes=3)))
  with pytest.raises(ValueError, match='class-conditional'):
    conditional.score(_images(2), ['levels'])
  # A class-conditional model scores the class mixture.
  mixture = conditional.score(_images(2))['bits_per_dim']
  expected = -conditional.model.marginal_log_prob(_images(2), seed=1) / (64 * math.log(2.))
  np.testing.assert_allclose(mixture, expected, rtol=1e-5)


def test_combined_flags_at_most_its_false_alarm_rate_and_catches_either_kind_of_outlier():
  # Scores given directly (as from any model): held-out sets and in-distribution images from one
  # distribution (conformal p-values are valid over the held-out draw: 200 draws here), and
  # outliers that only one of the two combined scores sees.
  scorer = ood.OODScorer(rn.RealNVP(CONFIG), combine=['typicality', 'complexity'])
  rng = np.random.default_rng(0)
  p = []
  for _ in range(200):
    scorer._held_out_scores = {'typicality': np.sort(rng.normal(size=999)),  # the fitted state
                               'complexity': np.sort(rng.normal(size=999))}
    p.append(scorer.combined_p_values({'typicality': rng.normal(size=500),
                                       'complexity': rng.normal(size=500)}))
  for alpha in (0.01, 0.05, 0.2):  # Bonferroni over 2 valid p-values: at most alpha, near it
    assert alpha / 2 < np.mean(np.concatenate(p) <= alpha) <= alpha * 1.05
  outliers = {'typicality': np.array([9., 0.]), 'complexity': np.array([0., 9.])}
  assert np.all(scorer.combined_p_values(outliers) == 2 / 1000)  # each caught, by either score


def test_combined_fits_what_it_combines_and_refuses_what_it_cannot():
  model = rn.RealNVP(CONFIG)
  scorer = ood.OODScorer(model, combine=['complexity', 'fitted']).fit(_varied_images(30),
                                                                     ['combined'])
  scores = scorer.score(_varied_images(5, seed=7), ['combined', 'complexity'])
  assert set(scores) == {'combined', 'complexity'} and np.all(scores['combined'] >= 0)
  with pytest.raises(ValueError, match="combined combines single scores, not 'levels'"):
    ood.OODScorer(model, combine=['levels'])
  with pytest.raises(ValueError, match='likelihood_ratio needs a background model'):
    ood.OODScorer(model, combine=['likelihood_ratio'])
  with pytest.raises(ValueError, match='combined needs held-out in-distribution images'):
    ood.OODScorer(model).score(_images(2), ['combined'])


def test_a_dataset_streams_and_scores_as_the_array_does():
  model = rn.RealNVP(CONFIG)
  images, held_out = _varied_images(10, seed=3), _varied_images(20, seed=4)
  methods = ['bits_per_dim', 'levels', 'complexity', 'typicality', 'fitted', 'combined']
  scorer = ood.OODScorer(model, batch_size=4).fit(held_out)
  expected = scorer.score(images, methods)
  single = tf.data.Dataset.from_tensor_slices(images)
  for dataset in (single, single.batch(4), tf.data.Dataset.zip(single, single.map(lambda _: 0))):
    scores = scorer.score(dataset, methods)
    assert scores.keys() == expected.keys()
    for name in expected:
      np.testing.assert_allclose(scores[name], expected[name], rtol=1e-6, err_msg=name)
  streamed = ood.OODScorer(model, batch_size=4).fit(tf.data.Dataset.from_tensor_slices(held_out))
  np.testing.assert_allclose(streamed.score(images, ['fitted'])['fitted'], expected['fitted'],
                             rtol=1e-6)
  with pytest.raises(ValueError, match=r'Expected a dataset of images \[8, 8, 1\]'):
    scorer.score(tf.data.Dataset.from_tensor_slices(_images(2, shape=(4, 4, 1))))
  with pytest.raises(ValueError, match='empty set'):
    scorer.score(single.take(0))


def test_a_model_under_a_mirrored_strategy_scores_across_its_replicas():
  from tfp_realnvp import training
  devices = [d.name for d in tf.config.list_logical_devices('CPU')]
  reference = rn.RealNVP(CONFIG)
  strategy = training.mirrored_strategy(devices)
  with strategy.scope():
    mirrored = rn.RealNVP(CONFIG)
  mirrored.set_weights(reference.get_weights())
  seen = []  # the batch shape of each trace of the model's bits/dim (a trace per replica)
  bits_per_dim = mirrored.bits_per_dim

  def spy(images, *args, **kwargs):
    seen.append(tuple(images.shape))
    return bits_per_dim(images, *args, **kwargs)
  object.__setattr__(mirrored, 'bits_per_dim', spy)
  # Float pixels (dequantized already: no noise), 7 of them: the replicas' parts 4 and 3.
  images = np.random.default_rng(5).uniform(0, 256, [7, 8, 8, 1]).astype(np.float32)
  expected = ood.OODScorer(reference, batch_size=7).score(images, ['bits_per_dim', 'levels'])
  scores = ood.OODScorer(mirrored, batch_size=7).score(images, ['bits_per_dim', 'levels'])
  for name in expected:
    np.testing.assert_allclose(scores[name], expected[name], rtol=1e-5, err_msg=name)
  assert sorted(seen) == [(3, 8, 8, 1), (4, 8, 8, 1)]  # each replica its part of the batch
