"""The networks' operations on tensors: weight-normalized convolution and batch normalization."""

import tensorflow as tf

from tfp_realnvp.bijectors.batch_norm import moving_average, one_replica, synchronized_moments


def weight_norm_kernel(v, g):
  """`g * v / ||v||`, the norm over each output channel's kernel (spatial and input axes)."""
  return v * (g * tf.math.rsqrt(tf.reduce_sum(tf.square(v), axis=(0, 1, 2)) + 1e-12))


def weight_norm_conv(x, v, g, bias):
  """`conv(x, g * v / ||v||) + bias`, 'same' padding."""
  return tf.nn.bias_add(tf.nn.conv2d(x, weight_norm_kernel(v, g), 1, 'SAME'), bias)


def convolution_backward(x, kernel, dy):
  """`(dx, dkernel)`: the gradients of `conv2d(x, kernel)` ('same' padding, stride 1) for `dy`
  at its output (one op each)."""
  strides = [1, 1, 1, 1]
  return (tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=kernel, out_backprop=dy,
                                         strides=strides, padding='SAME'),
          tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=tf.shape(kernel),
                                          out_backprop=dy, strides=strides, padding='SAME'))


def local_statistics(synchronized):
  """Whether batch statistics are of this replica's batch alone (no collective ops)."""
  return not synchronized or one_replica()


def batch_norm(x, gamma, beta, moving_mean, moving_variance, training, momentum, epsilon,
               synchronized=True):
  """`(gamma * (x - mean) / sqrt(var + epsilon) + beta, updated running averages)`.

  In training, the batch's moments (synchronized across replicas unless `synchronized=False`:
  then each replica's own) and the updated running averages `(mean, variance)`; in inference, the
  running averages and no update (`()`). TF's fused kernel where it applies (statistics of one
  replica's batch, float32 or narrower).
  """
  def normalize(mean, variance):  # in the statistics' dtype, as the fused kernel
    inverse_std = gamma * tf.math.rsqrt(variance + epsilon)
    return tf.cast(tf.cast(x, gamma.dtype) * inverse_std + (beta - mean * inverse_std), x.dtype)

  def fused(mean, variance, is_training, average=1.):
    return tf.raw_ops.FusedBatchNormV3(
        x=x, scale=gamma, offset=beta, mean=mean, variance=variance, epsilon=epsilon,
        exponential_avg_factor=average, is_training=is_training)[:3]

  fusable = x.dtype != tf.float64
  if not training:
    if fusable:
      return fused(moving_mean, moving_variance, is_training=False)[0], ()
    return normalize(moving_mean, moving_variance), ()
  if fusable and local_statistics(synchronized):
    # The kernel also returns the updated running averages (of the unbiased variance).
    y, *updated = fused(moving_mean, moving_variance, True, average=1. - momentum)
    if x.shape.num_elements() == 0:  # no statistics (the kernel gives NaN): keep the averages
      return y, (moving_mean, moving_variance)
    # (A run-time guard here, a select on the kernel's outputs, made the cifar10 model's first
    # step 28 s slower; inside the model an empty batch fails in the convolutions first.)
    return y, tuple(updated)
  mean, variance, count = synchronized_moments(tf.cast(x, gamma.dtype), with_count=True,
                                                synchronized=synchronized)
  # The unbiased variance is undefined for one value: keep the biased one (0) there.
  unbiased = variance * count / (max(count - 1., 1.) if isinstance(count, float) else
                                 tf.maximum(count - 1., 1.))
  return normalize(mean, variance), tuple(
      moving_average(m, batch, momentum, count) for m, batch in
      ((moving_mean, mean), (moving_variance, unbiased)))


def bn_relu(x, norm, training, momentum, epsilon, synchronized=True, conv_dtype=None):
  """`(relu(bn(x)), updated running averages)`, cast to `conv_dtype` if given (`norm`: gamma,
  beta, running mean and variance)."""
  h, updated = batch_norm(x, *norm, training, momentum, epsilon, synchronized)
  h = tf.nn.relu(h)
  return (h if conv_dtype is None else tf.cast(h, conv_dtype)), updated
