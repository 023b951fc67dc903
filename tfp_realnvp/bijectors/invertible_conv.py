"""Glow's invertible 1x1 convolution (Kingma & Dhariwal, 2018) in its LU form, as a flow layer."""

import keras
import numpy as np
import scipy.linalg
import tensorflow as tf

from tfp_realnvp.bijectors.base import FlowBijector, per_pixel_log_det


class LUWeights(keras.layers.Layer):
  """The `C x C` matrix `W = P L (U + diag(sign_s * exp(log_s)))` of an invertible 1x1
  convolution: a fixed permutation `P` and signs `sign_s`, a unit lower-triangular `L`, a
  strictly upper-triangular `U` and `log_s` (trainable), initialised from the LU decomposition of
  a random rotation (`keras.initializers.Orthogonal`, seeded by `seed` or Keras' global seed).
  """

  def __init__(self, seed=None, **kwargs):
    super().__init__(**kwargs)
    self.seed = seed

  def build(self, input_shape):
    channels = int(input_shape[-1])
    rotation = keras.ops.convert_to_numpy(
        keras.initializers.Orthogonal(seed=self.seed)((channels, channels), 'float64'))
    permutation, lower, upper = scipy.linalg.lu(rotation)  # rotation = P L U
    s = np.diag(upper)
    constant = dict(trainable=False, autocast=False)
    self.permutation = self.add_weight(shape=(channels, channels), name='permutation',
                                       initializer=keras.initializers.Constant(permutation),
                                       **constant)
    self.sign_s = self.add_weight(shape=(channels,), name='sign_s',
                                  initializer=keras.initializers.Constant(np.sign(s)), **constant)
    trainable = dict(autocast=False)
    self.lower = self.add_weight(shape=(channels, channels), name='lower',
                                 initializer=keras.initializers.Constant(np.tril(lower, -1)),
                                 **trainable)
    self.upper = self.add_weight(shape=(channels, channels), name='upper',
                                 initializer=keras.initializers.Constant(np.triu(upper, 1)),
                                 **trainable)
    self.log_s = self.add_weight(shape=(channels,), name='log_s',
                                 initializer=keras.initializers.Constant(np.log(np.abs(s))),
                                 **trainable)

  def factors(self, dtype):
    """`(P, L, U', log_s)` in `dtype`, with `L` unit lower-triangular and `U'` upper-triangular
    with diagonal `sign_s * exp(log_s)` (only the triangles of the variables count)."""
    p, lower, upper, log_s, sign_s = (tf.cast(tf.convert_to_tensor(v), dtype) for v in (
        self.permutation, self.lower, self.upper, self.log_s, self.sign_s))
    identity = tf.eye(tf.shape(log_s)[0], dtype=dtype)
    lower = tf.linalg.band_part(lower, -1, 0) - tf.linalg.band_part(lower, 0, 0) + identity
    upper = (tf.linalg.band_part(upper, 0, -1) - tf.linalg.band_part(upper, 0, 0) +
             tf.linalg.diag(sign_s * tf.exp(log_s)))
    return p, lower, upper, log_s

  def get_config(self):
    return {**super().get_config(), 'seed': self.seed}


def _mix(x, matrix):
  """`x @ matrix` over the channel axis of `[N, H, W, C]`."""
  return tf.einsum('nhwc,cd->nhwd', x, matrix)


class Invertible1x1Conv(FlowBijector):
  """Glow's invertible 1x1 convolution: a learned mixing of the channels at every pixel.

    forward:   y = x W,   W = P L (U + diag(sign_s * exp(log_s)))     (per pixel, x a row of C)
    inverse:   x = y W^-1,   W^-1 = (U + diag(..))^-1 L^-1 P^T  (triangular solves)
    log|det dy/dx| = H * W * sum_c log_s_c

  No determinant is ever computed: the LU form gives it. `W` starts as a random rotation
  (log-det 0). `P` and `sign_s` stay fixed; `L`, `U` and `log_s` are learned.

  Example:
    mix = Invertible1x1Conv(LUWeights(seed=0), event_shape=[4, 4, 6])
    y, log_det = mix.forward_and_log_det(x)
  """

  def __init__(self, weights_layer, event_shape, validate_args=False, name='invertible_1x1_conv',
               dtype=tf.float32):
    parameters = dict(locals())
    super().__init__(event_shape, validate_args, parameters, name, dtype)
    self._weights_layer = weights_layer

  def _own_keras_layers(self):
    return [self._weights_layer]

  def _factors(self, x):
    if not self._weights_layer.built:
      self._weights_layer.build(x.shape)
    return self._weights_layer.factors(x.dtype)

  def _forward_and_log_det(self, x, training):
    p, lower, upper, log_s = self._factors(x)
    return (_mix(x, tf.matmul(p, tf.matmul(lower, upper))),
            per_pixel_log_det(self.event_shape_in, log_s, x))

  def _inverse_and_log_det(self, y, training):
    p, lower, upper, log_s = self._factors(y)
    identity = tf.eye(tf.shape(log_s)[0], dtype=y.dtype)
    lower_inverse = tf.linalg.triangular_solve(lower, identity, lower=True)
    upper_inverse = tf.linalg.triangular_solve(upper, identity, lower=False)
    inverse = tf.matmul(upper_inverse, tf.matmul(lower_inverse, p, transpose_b=True))
    return _mix(y, inverse), -per_pixel_log_det(self.event_shape_in, log_s, y)
