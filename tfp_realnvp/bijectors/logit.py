"""Real NVP's preprocessing: dequantized pixels in [0, 256) to logit space, with its log-det."""

import numpy as np
import tensorflow as tf

from tfp_realnvp.bijectors.base import FlowBijector, sum_event


class Logit(FlowBijector):
  """Maps pixels `x` in `[0, 256)` to `y = logit(p)`, `p = alpha + (1 - 2 alpha) * x / 256`.

    forward:   y = log(p) - log(1 - p)
    inverse:   x = 256 * (sigmoid(y) - alpha) / (1 - 2 alpha)
    log|det dy/dx| = sum(log((1 - 2 alpha) / 256) - log(p) - log(1 - p))

  The official code's squashing to `[alpha, 1 - alpha]` (alpha = 0.05); a flow on `y` times this
  Jacobian is a density on the logit's domain, `x` in `(-256 alpha, 256 (1 - alpha)) / (1 - 2
  alpha)`, about (-14.2, 270.2): the model's support, a little wider than [0, 256), where every
  decoded latent lands. Its mass in [0, 256)^D is at most 1, so bits/dim of dequantized pixels
  bound the discrete negative log-likelihood from above, as in the paper.
  With `validate_args`, inputs outside the domain (NaN included) raise an error instead of
  giving NaN.

  Example:
    Logit([28, 28, 1]).forward(128. * tf.ones([28, 28, 1]))  # zeros
  """

  def __init__(self, event_shape, alpha=0.05, validate_args=False, name='logit', dtype=tf.float32):
    parameters = dict(locals())
    if not 0. < alpha < 0.5:
      raise ValueError(f'{name}: alpha must lie in (0, 0.5), got {alpha}.')
    super().__init__(event_shape, validate_args, parameters, name, dtype)
    self._alpha = alpha
    self._log_slope = np.log((1. - 2. * alpha) / 256.)

  def _forward_and_log_det(self, x, training):
    if self.validate_args:
      x = self.checked_domain(x)
    p = self._alpha + (1. - 2. * self._alpha) * x / 256.
    y = tf.math.log(p) - tf.math.log1p(-p)
    return y, self._log_det(y)

  def _inverse_and_log_det(self, y, training):
    x = 256. * (tf.sigmoid(y) - self._alpha) / (1. - 2. * self._alpha)
    # Where sigmoid(y) rounds to 0 or 1 (|y| beyond about 17 in float32), x would land on the
    # domain's edge, outside it: kept one float inside, so every sample has a finite density.
    dtype = x.dtype.as_numpy_dtype
    low, high = (np.nextafter(dtype(bound), dtype(toward))
                 for bound, toward in zip(self._domain(), (np.inf, -np.inf)))
    return tf.clip_by_value(x, low, high), -self._log_det(y)

  def _domain(self):
    """The open interval `(low, high)` of `x` where `p` lies in (0, 1)."""
    return tuple(256. * np.array([-self._alpha, 1. - self._alpha]) / (1. - 2. * self._alpha))

  def checked_domain(self, x):
    """`x`, with a run-time check that it lies in the domain (the message names the bounds)."""
    # p must lie in (0, 1): x in (-256 alpha / (1 - 2 alpha), 256 (1 - alpha) / (1 - 2 alpha)), a bit
    # wider than [0, 256], the range that decoded latents can reach.
    low, high = self._domain()
    message = (f'{self.name}: pixels must lie in the model\'s support, the logit\'s domain '
               f'({low:.3g}, {high:.4g}), which holds [0, 256) and every sample')
    with tf.control_dependencies([
        tf.debugging.assert_greater(x, tf.constant(low, x.dtype), message=message),
        tf.debugging.assert_less(x, tf.constant(high, x.dtype), message=message)]):
      return tf.identity(x)

  def _log_det(self, y):
    # -log p - log(1 - p) = softplus(-y) + softplus(y), stable for any y.
    return sum_event(self._log_slope + tf.nn.softplus(-y) + tf.nn.softplus(y))
