"""The background model's training images (Ren et al., NeurIPS 2019): the training images with a
fraction of their pixels replaced by noise, so that a model of them learns the background
statistics shared by all images but not what the training images show."""

import tensorflow as tf


def perturb(images, rate, seed=None):
  """uint8 `images [..., H, W, C]` with each pixel (all its channels) replaced, with probability
  `rate`, by uniform random values in [0, 255]. A TF op, for a `tf.data` map; `seed` (an int or a
  shape-[2] tensor) makes it repeatable."""
  if not 0. <= rate <= 1.:
    raise ValueError(f'The perturbation rate must lie in [0, 1], got {rate}.')
  images = tf.convert_to_tensor(images)
  shape = tf.shape(images)
  if seed is None:
    replace = tf.random.uniform(shape[:-1]) < rate
    noise = tf.random.uniform(shape, 0, 256, tf.int32)
  else:
    seed = tf.cast(tf.broadcast_to(seed, [2]), tf.int32)
    replace = tf.random.stateless_uniform(shape[:-1], seed) < rate
    noise = tf.random.stateless_uniform(shape, seed + [0, 1], 0, 256, tf.int32)
  return tf.where(replace[..., None], tf.cast(noise, images.dtype), images)
