"""Evaluation of a trained model: test bits/dim, a class-conditional model's Bayes classifier, and
pictures' samples (per class, the paper's latent manifold)."""

import math
import weakref

import numpy as np
import tensorflow as tf

from tfp_realnvp.training.errors import RunError


def _images_and_labels(batch):
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch, None)


def evaluate_bits_per_dim(model, batches, noise_draws=1, seed=0, progress=None):
  """Mean bits/dim over every image of `batches` (uint8; `(images, labels)` for a
  class-conditional model: then of `p(x | y)`), averaging the log-density over `noise_draws`
  dequantization draws per image. Seeded per batch, so it is repeatable.
  `progress`: a `Progress`, updated with the images done."""
  model_ref = weakref.ref(model)  # the cached function must not keep the model alive

  def batch_sum(images, labels, batch_seed):
    def draw_sum(draw):
      bits = model_ref().bits_per_dim(images, labels, seed=batch_seed * noise_draws + draw + 1)
      return tf.reduce_sum(tf.cast(bits, tf.float64))
    if noise_draws == 1:
      return draw_sum(tf.constant(0, batch_seed.dtype))
    # the draws one after another through one copy of the flow
    draws = tf.map_fn(draw_sum, tf.range(noise_draws, dtype=batch_seed.dtype),
                      fn_output_signature=tf.float64, parallel_iterations=1)
    return tf.reduce_sum(draws) / noise_draws

  (total,), count = _sums_over_batches(batch_sum, batches, seed, progress,
                                       cache=(model, 'bits_per_dim', noise_draws))
  if not math.isfinite(total):
    raise RunError(f'The test bits/dim is not finite ({total / count}): the model has diverged.')
  return total / count


_traced = weakref.WeakKeyDictionary()  # model -> {key: traced batch function}


def _traced_once(batch_sums, images, labels, cache):
  """`batch_sums` traced once for batches of any size like `images` (and `labels`): the last,
  smaller batch reuses the trace. Kept per model under `cache = (model, *key)` for later
  evaluations."""
  model, *key = cache
  specs = [tf.TensorSpec([None, *images.shape[1:]], images.dtype)]
  if labels is not None:
    specs.append(tf.TensorSpec([None, *labels.shape[1:]], labels.dtype))
  key = (*key, *specs)
  traced = _traced.setdefault(model, {}).get(key)
  if traced is None:
    if labels is None:
      traced = tf.function(lambda images, seed: batch_sums(images, None, seed),
                           input_signature=[specs[0], tf.TensorSpec([], tf.int64)])
    else:
      traced = tf.function(batch_sums, input_signature=[*specs, tf.TensorSpec([], tf.int64)])
    _traced[model][key] = traced
  return traced


def _sums_over_batches(batch_sums, batches, seed, progress, labelled=False, cache=None):
  """`(sums, image count)`: the elementwise sums of `batch_sums(images, labels, batch_seed)`
  (a tuple of scalars, traced once: `_traced_once`) over `batches`, each batch seeded by its
  index; `progress` updated with the images done. An empty split is a `RunError`."""
  sums, count, traced = None, 0, None
  for index, batch in enumerate(batches):
    images, labels = _images_and_labels(batch)
    images = tf.convert_to_tensor(images)
    labels = None if labels is None else tf.convert_to_tensor(labels)
    if labelled and labels is None:
      raise RunError('Labelled batches (images, labels) expected.')
    if traced is None:
      traced = _traced_once(batch_sums, images, labels, cache)
    batch_seed = tf.constant(seed * 1_000_003 + index, tf.int64)
    values = traced(images, batch_seed) if labels is None else traced(images, labels, batch_seed)
    values = [float(v) for v in tf.nest.flatten(values)]
    sums = values if sums is None else [a + b for a, b in zip(sums, values)]
    count += int(images.shape[0])
    if progress is not None:
      progress.update(count)
  if progress is not None:
    progress.close()
  if count == 0:
    raise RunError('The evaluation split is empty.')
  return sums, count


def evaluate_classifier(model, batches, seed=0, progress=None):
  """Bayes' classifier of a class-conditional model on labelled `batches` `(images, labels)`:
  `{'accuracy': fraction of argmax_y log p(x | y) + log p(y) equal to the label,
  'marginal_bits_per_dim': -log p(x) / (D ln 2), p(x) = sum_y p(y) p(x | y), 'count'}`. One
  seeded dequantization draw per image (the same for every class)."""
  num_dims = math.prod(model.image_shape)
  model_ref = weakref.ref(model)  # the cached function must not keep the model alive

  def batch_results(images, labels, batch_seed):
    joint = (model_ref().class_log_likelihoods(images, seed=batch_seed) +
             model_ref().class_log_prior())
    right = tf.equal(tf.argmax(joint, -1, output_type=tf.int32), tf.cast(labels, tf.int32))
    marginal = -tf.reduce_logsumexp(tf.cast(joint, tf.float64), -1) / (num_dims * math.log(2.))
    return tf.reduce_sum(tf.cast(right, tf.float64)), tf.reduce_sum(marginal)

  (right, marginal), count = _sums_over_batches(batch_results, batches, seed, progress,
                                                labelled=True, cache=(model, 'classifier'))
  if not math.isfinite(marginal):
    raise RunError('The class log-likelihoods are not finite: the model has diverged.')
  return {'accuracy': right / count, 'marginal_bits_per_dim': marginal / count, 'count': count}


def class_samples(model, per_class=8, temperature=0.7, seed=0, num_classes=None):
  """`per_class` samples (float pixels) of each class of a class-conditional model (of its first
  `num_classes` classes if given), class by class (`image_grid(to_uint8(...),
  columns=per_class)`: a row per class)."""
  labels = np.repeat(np.arange(min(num_classes or model.num_classes, model.num_classes)),
                     per_class)
  return model.sample(len(labels), temperature, seed=seed, labels=labels)


def latent_manifold(model, images, size=8, label=None):
  """The paper's latent manifold picture: decodes
  z = cos(a) (cos(b) z1 + sin(b) z2) + sin(a) (cos(b) z3 + sin(b) z4), a, b in [0, pi/2] on a
  `size` x `size` grid, from four encoded images (of the class `label`, for a class-conditional
  model: encoded and decoded with it). Returns `size**2` float images."""
  z1, z2, z3, z4 = tf.unstack(model.encode(images[:4], label))
  angles = np.linspace(0., math.pi / 2, size)
  latents = [math.cos(a) * (math.cos(b) * z1 + math.sin(b) * z2)
             + math.sin(a) * (math.cos(b) * z3 + math.sin(b) * z4)
             for a in angles for b in angles]
  return model.decode(tf.stack(latents), label)
