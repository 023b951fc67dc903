"""Memory for compute: backward passes that keep only a unit's or a block's input and run the
rest of its forward pass again (`RealNVPConfig.recompute`; `network.py` picks where they apply).

Both are `tf.custom_gradient`s with one replica's batch statistics, in training. They give
autodiff's gradient (`tests/test_nets.py`) and the same running-average updates, which leave as
outputs (the caller assigns them).
"""

import tensorflow as tf

from tfp_realnvp.nets.ops import bn_relu, convolution_backward, weight_norm_kernel


def _unit_forward(x, norm, conv, momentum, epsilon, conv_dtype):
  """`(conv(relu(bn(x))), updated running averages)` in training, one replica's statistics."""
  h, updated = bn_relu(x, norm, True, momentum, epsilon, synchronized=False,
                       conv_dtype=conv_dtype)
  v, g, bias = conv
  return tf.nn.bias_add(tf.nn.conv2d(h, weight_norm_kernel(v, g), 1, 'SAME'), bias), updated


def _unit_backward(dy, x, norm, conv, momentum, epsilon, conv_dtype):
  """The gradients `(dx, dgamma, dbeta, dv, dg, dbias)` of `_unit_forward` for `dy` at its
  output, from its input `x` alone: the batch norm and ReLU again, not the convolution."""
  (gamma, beta, *averages), (v, g, _) = norm, conv
  with tf.GradientTape() as tape:
    tape.watch([x, gamma, beta, v, g])
    h, _ = bn_relu(x, (gamma, beta, *averages), True, momentum, epsilon, synchronized=False,
                   conv_dtype=conv_dtype)
    kernel = weight_norm_kernel(v, g)
  dh, dkernel = convolution_backward(h, kernel, dy)
  return (*tape.gradient([h, kernel], [x, gamma, beta, v, g], output_gradients=[dh, dkernel]),
          tf.raw_ops.BiasAddGrad(out_backprop=dy))


def bn_relu_conv_keeping_input(x, norm, conv, momentum, epsilon, conv_dtype=None):
  """`conv(relu(bn(x)))` and its running-average updates, whose backward pass keeps only `x`
  (the previous convolution's output) and runs the cheap batch norm and ReLU again, as in-place
  activated batch norm does: autodiff would keep `x` for the batch norm and `relu(bn(x))` for the
  convolution, twice the memory."""
  gamma, beta, moving_mean, moving_variance = norm

  @tf.custom_gradient
  def unit(x, gamma, beta, v, g, bias):
    norm, conv = (gamma, beta, moving_mean, moving_variance), (v, g, bias)
    y, updated = _unit_forward(x, norm, conv, momentum, epsilon, conv_dtype)

    def gradient(dy, *unused_updates_gradients):
      return _unit_backward(dy, x, norm, conv, momentum, epsilon, conv_dtype)
    return (y, *updated), gradient
  y, *updated = unit(x, gamma, beta, *conv)
  return y, tuple(updated)


def residual_block_keeping_input(x, norm1, conv1, norm2, conv2, momentum, epsilon):
  """`x + conv(relu(bn(conv(relu(bn(x))))))` and its running-average updates, whose backward
  pass keeps only the block's input `x` (which the previous block's gradient needs anyway): it
  runs the first unit, its convolution included, again for the second unit's input, then both
  units' gradients as `bn_relu_conv_keeping_input`'s. Half the block's activations for one
  convolution more."""
  (gamma1, beta1, *averages1), (gamma2, beta2, *averages2) = norm1, norm2

  @tf.custom_gradient
  def block(x, gamma1, beta1, v1, g1, bias1, gamma2, beta2, v2, g2, bias2):
    norm1, conv1 = (gamma1, beta1, *averages1), (v1, g1, bias1)
    norm2, conv2 = (gamma2, beta2, *averages2), (v2, g2, bias2)
    h, updated1 = _unit_forward(x, norm1, conv1, momentum, epsilon, None)
    y, updated2 = _unit_forward(h, norm2, conv2, momentum, epsilon, None)

    def gradient(dy, *unused_updates_gradients):
      with tf.GradientTape() as tape:  # the first unit again, its convolution included
        tape.watch([x, gamma1, beta1, v1, g1])
        a, _ = bn_relu(x, norm1, True, momentum, epsilon, synchronized=False)
        kernel = weight_norm_kernel(v1, g1)
      h = tf.nn.bias_add(tf.nn.conv2d(a, kernel, 1, 'SAME'), bias1)
      dh, *second_gradients = _unit_backward(dy, h, norm2, conv2, momentum, epsilon, None)
      da, dkernel = convolution_backward(a, kernel, dh)
      dx, *first_gradients = tape.gradient([a, kernel], [x, gamma1, beta1, v1, g1],
                                           output_gradients=[da, dkernel])
      return (dx + dy, *first_gradients, tf.raw_ops.BiasAddGrad(out_backprop=dh),
              *second_gradients)
    return (x + y, *updated1, *updated2), gradient
  y, *updated = block(x, gamma1, beta1, *conv1, gamma2, beta2, *conv2)
  return y, tuple(updated)
