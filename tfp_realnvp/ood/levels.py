"""The multi-scale latent's levels: each factored-out part's share of the log-density.

Real NVP's scale `l` maps its input `h_l` to a part `z_l` of the latent, factored out, and the
input of the next scale `h_{l+1}`; by the chain rule

  log p(x) = LD_pre(x) + sum_l [log N(z_l) + LD_l(h_l)]

where `LD_pre` is the log-det of the logit preprocessing and `LD_l` that of scale `l`'s own
layers (couplings, normalizations, squeezes; not the next scales'). `level_log_probs` gives these
terms per image: the levels' shares of the density, which sum to `log_prob` (Schirrmeister et al.,
NeurIPS 2020: local pixel statistics dominate the first terms, what the image shows the later
ones).
"""

import math

import tensorflow as tf

from tfp_realnvp.bijectors.base import Sequential
from tfp_realnvp.bijectors.logit import Logit
from tfp_realnvp.bijectors.multiscale import FactorOut, latent_levels


def level_names(num_scales):
  """The columns of `level_log_probs`: 'preprocessing', 'level_0', ..."""
  return ['preprocessing'] + [f'level_{level}' for level in range(num_scales)]


def level_log_probs(model, images, seed=None):
  """`[N, 1 + num_scales]` nats: the logit preprocessing's log-det, then each level's
  `log N(z_l) + LD_l` (module docstring); their sum is `model.log_prob(images, seed=seed)`.
  uint8 images are dequantized as `log_prob` does (the same noise for the same `seed`).
  Unconditional models (a class-conditional model's latent Gaussian depends on the label)."""
  if model.num_classes:
    raise ValueError(f'{model.name}: per-level scores are for unconditional models; this one is '
                     f'class-conditional ({model.num_classes} classes).')
  pixels = model.dequantize(images, seed)
  num_scales = model.config.num_scales
  log_dets = [[] for _ in range(num_scales + 1)]  # 0: the preprocessing, 1 + l: level l

  def walk(bijector, x, level):
    if isinstance(bijector, FactorOut):
      factored, rest = tf.split(x, 2, axis=-1)
      return tf.concat([factored, walk(bijector.parts[0], rest, level + 1)], axis=-1)
    if isinstance(bijector, Sequential):
      for part in bijector.parts:
        x = walk(part, x, level)
      return x
    y, log_det = bijector.forward_and_log_det(x, training=False)
    log_dets[0 if isinstance(bijector, Logit) else 1 + level].append(log_det)
    return y

  latent = walk(model.flow, pixels, 0)
  levels = latent_levels(model.image_shape, num_scales)
  gaussian = -0.5 * tf.square(latent) - 0.5 * math.log(2 * math.pi)
  columns = []
  for column, terms in enumerate(log_dets):
    total = tf.add_n(terms) if terms else tf.zeros(tf.shape(latent)[:1], latent.dtype)
    if column:
      mask = tf.constant(levels == column - 1, latent.dtype)
      total += tf.reduce_sum(gaussian * mask, axis=[-3, -2, -1])
    columns.append(total)
  return tf.stack(columns, axis=-1)


def level_bits_per_dim(model, images, seed=None):
  """`level_log_probs` in bits per dimension of the whole image (`-nats / (D ln 2)`): the
  columns sum to `model.bits_per_dim(images, seed=seed)`."""
  num_dims = math.prod(model.image_shape)
  return -level_log_probs(model, images, seed) / (num_dims * math.log(2.))
