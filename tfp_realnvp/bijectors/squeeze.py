"""The 2x2 squeeze of Real NVP's multi-scale architecture."""

import tensorflow as tf

from tfp_realnvp.bijectors.base import FlowBijector, zero_log_det


class Squeeze(FlowBijector):
  """Space-to-depth by 2x2 blocks: `[H, W, C] -> [H/2, W/2, 4C]`, a permutation (log|det| = 0).

    forward:  y[i, j, (2a + b) * C + c] = x[2i + a, 2j + b, c]     (a, b in {0, 1})
    inverse:  the same indices read the other way (depth-to-space)

  The channel order is `tf.nn.space_to_depth`'s, so the first half of the output channels are the
  top row of each 2x2 block.

  Example:
    Squeeze([4, 4, 3]).forward(tf.zeros([4, 4, 3])).shape  # [2, 2, 12]
  """

  def __init__(self, event_shape, validate_args=False, name='squeeze', dtype=tf.float32):
    parameters = dict(locals())
    height, width, _ = event_shape
    if height % 2 or width % 2:
      raise ValueError(f'{name}: a 2x2 squeeze needs even height and width, got an event of shape '
                       f'{list(event_shape)}.')
    super().__init__(event_shape, validate_args, parameters, name, dtype,
                     is_constant_jacobian=True)

  def _output_shape(self, shape):
    height, width, channels = shape
    return (height // 2, width // 2, 4 * channels)

  def _forward_and_log_det(self, x, training):
    return tf.nn.space_to_depth(x, 2), zero_log_det(x)

  def _inverse_and_log_det(self, y, training):
    return tf.nn.depth_to_space(y, 2), zero_log_det(y)
