"""The s/t networks of the coupling layers: ResNets with weight norm and batch norm (Keras 3)."""

import math

import keras
from keras import ops
import tensorflow as tf

from tfp_realnvp.bijectors.batch_norm import (as_bits, assign_running_average, moving_average,
                                              one_replica, synchronized_moments)

EPSILON = 1e-4  # the networks' batch norm


def weight_norm_kernel(v, g):
  """`g * v / ||v||`, the norm over each output channel's kernel (spatial and input axes)."""
  return v * (g * tf.math.rsqrt(tf.reduce_sum(tf.square(v), axis=(0, 1, 2)) + 1e-12))


def weight_norm_conv(x, v, g, bias):
  """`conv(x, g * v / ||v||) + bias`, 'same' padding."""
  return tf.nn.bias_add(tf.nn.conv2d(x, weight_norm_kernel(v, g), 1, 'SAME'), bias)


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
  if fusable and _local(synchronized):
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


def _tensors(*variables):
  """The variables' values (Keras casts them to the layer's compute dtype where it autocasts)."""
  return tuple(tf.convert_to_tensor(ops.convert_to_tensor(v)) for v in variables)


def _assign(variables, values):
  """Running averages <- their updates (there are none in inference)."""
  for variable, value in zip(variables, values or [None] * len(variables), strict=True):
    if value is not None:
      assign_running_average(variable, value)


def _local(synchronized):
  """Whether batch statistics are of this replica's batch alone (no collective ops)."""
  return not synchronized or one_replica()


# Whether, in training, each batch norm -> ReLU -> convolution keeps only its input for the
# backward pass (`bn_relu_conv`, with synchronized statistics too); False keeps autodiff's tensors
# (for comparison).
KEEP_ONLY_CONVOLUTION_OUTPUTS = True


def convolution_backward(x, kernel, dy):
  """`(dx, dkernel)`: the gradients of `conv2d(x, kernel)` ('same' padding, stride 1) for `dy`
  at its output (one op each)."""
  strides = [1, 1, 1, 1]
  return (tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=kernel, out_backprop=dy,
                                         strides=strides, padding='SAME'),
          tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=tf.shape(kernel),
                                          out_backprop=dy, strides=strides, padding='SAME'))


def bn_relu_conv(x, norm, conv, training, momentum, epsilon, conv_dtype=None,
                 synchronized=True, recompute_batch_norm=True):
  """`conv(relu(bn(x)))` (`norm`: gamma, beta, running mean and variance; `conv`: v, g, bias;
  the convolution's input cast to `conv_dtype` if given) and the batch norm's updated running
  averages.

  In training (float32 or narrower) the backward pass keeps only `x` (the previous convolution's
  output) and recomputes the cheap batch norm and ReLU from it, as in-place activated batch norm
  does:
  autodiff would keep `x` for the batch norm and `relu(bn(x))` for the convolution, twice the
  memory. The gradient is the same (`tests/test_nets.py`). With statistics synchronized across
  replicas, see `_synchronized_bn_relu_conv`. `recompute_batch_norm=False` (one replica's
  statistics): autodiff's, both tensors kept and nothing recomputed (under mixed precision the
  faster, `RealNVPConfig.recompute_batch_norm`).
  """
  if training and KEEP_ONLY_CONVOLUTION_OUTPUTS and not _local(synchronized):
    # (every replica takes this path, whatever its batch: their collectives must match)
    return _synchronized_bn_relu_conv(x, norm, conv, momentum, epsilon, conv_dtype)
  if not (recompute_batch_norm and _keeps_only_inputs(x, training, synchronized)):
    h, updated = batch_norm(x, *norm, training, momentum, epsilon, synchronized)
    h = tf.nn.relu(h)
    return weight_norm_conv(h if conv_dtype is None else tf.cast(h, conv_dtype), *conv), updated
  y, *updated = _keeping_only_input(x, *norm, *conv, momentum, epsilon, conv_dtype)
  return y, tuple(updated)


def _keeps_only_inputs(x, training, synchronized):
  """Whether a unit on `x` takes the custom gradients that keep only their inputs, with one
  replica's statistics (`_keeping_only_input`, `_residual_block_recomputing`)."""
  return (training and KEEP_ONLY_CONVOLUTION_OUTPUTS and x.dtype != tf.float64 and
          _local(synchronized) and x.shape.num_elements() != 0)


def _bn_relu(x, gamma, beta, moving_mean, moving_variance, momentum, epsilon, conv_dtype):
  """`(relu(bn(x)) in conv_dtype, updated running averages)` in training, one replica's
  statistics."""
  h, updated = batch_norm(x, gamma, beta, moving_mean, moving_variance, True, momentum, epsilon,
                          synchronized=False)
  h = tf.nn.relu(h)
  return (h if conv_dtype is None else tf.cast(h, conv_dtype)), updated


def _bn_relu_conv_forward(x, gamma, beta, moving_mean, moving_variance, v, g, bias, momentum,
                          epsilon, conv_dtype):
  """`(conv(relu(bn(x))), updated running averages)`, as `bn_relu_conv` computes it."""
  h, updated = _bn_relu(x, gamma, beta, moving_mean, moving_variance, momentum, epsilon,
                        conv_dtype)
  return tf.nn.bias_add(tf.nn.conv2d(h, weight_norm_kernel(v, g), 1, 'SAME'), bias), updated


def _bn_relu_conv_backward(dy, x, gamma, beta, moving_mean, moving_variance, v, g, momentum,
                           epsilon, conv_dtype):
  """The gradients `(dx, dgamma, dbeta, dv, dg, dbias)` of `_bn_relu_conv_forward` for `dy` at
  its output, from its input `x` alone: the batch norm and ReLU again, not the convolution."""
  with tf.GradientTape() as tape:
    tape.watch([x, gamma, beta, v, g])
    h, _ = _bn_relu(x, gamma, beta, moving_mean, moving_variance, momentum, epsilon, conv_dtype)
    kernel = weight_norm_kernel(v, g)
  dh, dkernel = convolution_backward(h, kernel, dy)
  return (*tape.gradient([h, kernel], [x, gamma, beta, v, g], output_gradients=[dh, dkernel]),
          tf.raw_ops.BiasAddGrad(out_backprop=dy))


def _keeping_only_input(x, gamma, beta, moving_mean, moving_variance, v, g, bias, momentum,
                        epsilon, conv_dtype):
  """`(y, *updated)` of `_bn_relu_conv_forward`, with a gradient that keeps only `x`."""
  @tf.custom_gradient
  def unit(x, gamma, beta, v, g, bias):
    y, updated = _bn_relu_conv_forward(x, gamma, beta, moving_mean, moving_variance, v, g, bias,
                                       momentum, epsilon, conv_dtype)

    def gradient(dy, *unused_updates_gradients):
      return _bn_relu_conv_backward(dy, x, gamma, beta, moving_mean, moving_variance, v, g,
                                    momentum, epsilon, conv_dtype)
    return (y, *updated), gradient
  return unit(x, gamma, beta, v, g, bias)


def _residual_block_recomputing(x, norm1, conv1, norm2, conv2, momentum, epsilon):
  """`residual_block` in training (one replica's statistics) with a gradient that keeps only the
  block's input `x` (which the previous block's gradient needs anyway): the backward pass runs
  the first unit, its convolution included, again for the second unit's input `h`, then the
  two units' gradients as `bn_relu_conv` computes them. Half the block's activations for one
  convolution more."""
  (gamma1, beta1, mean1, var1), (v1, g1, bias1) = norm1, conv1
  (gamma2, beta2, mean2, var2), (v2, g2, bias2) = norm2, conv2

  @tf.custom_gradient
  def block(x, gamma1, beta1, v1, g1, bias1, gamma2, beta2, v2, g2, bias2):
    h, updated1 = _bn_relu_conv_forward(x, gamma1, beta1, mean1, var1, v1, g1, bias1,
                                        momentum, epsilon, None)
    y, updated2 = _bn_relu_conv_forward(h, gamma2, beta2, mean2, var2, v2, g2, bias2,
                                        momentum, epsilon, None)

    def gradient(dy, *unused_updates_gradients):
      with tf.GradientTape() as tape:  # the first unit again, its convolution included
        tape.watch([x, gamma1, beta1, v1, g1])
        a, _ = _bn_relu(x, gamma1, beta1, mean1, var1, momentum, epsilon, None)
        kernel = weight_norm_kernel(v1, g1)
      h = tf.nn.bias_add(tf.nn.conv2d(a, kernel, 1, 'SAME'), bias1)
      dh, *second_gradients = _bn_relu_conv_backward(dy, h, gamma2, beta2, mean2, var2, v2, g2,
                                                     momentum, epsilon, None)
      da, dkernel = convolution_backward(a, kernel, dh)
      dx, *first_gradients = tape.gradient([a, kernel], [x, gamma1, beta1, v1, g1],
                                           output_gradients=[da, dkernel])
      return (dx + dy, *first_gradients, tf.raw_ops.BiasAddGrad(out_backprop=dh),
              *second_gradients)
    return (x + y, *updated1, *updated2), gradient
  y, *updated = block(x, gamma1, beta1, v1, g1, bias1, gamma2, beta2, v2, g2, bias2)
  return y, tuple(updated)


def _synchronized_bn_relu_conv(x, norm, conv, momentum, epsilon, conv_dtype=None):
  """`bn_relu_conv` in training with batch statistics over every replica's batch: the backward
  pass keeps only `x` (and the per-channel statistics) and recomputes the batch norm and ReLU, as
  on one replica; and it all-reduces batch norm's two per-channel gradient sums together, once,
  where autodiff all-reduces them one after the other. With `N` values per channel over all
  replicas, `x^ = (x - mean) / sqrt(var + eps)`, `z = gamma x^ + beta` and `dz` the gradient at
  `z` (through the convolution and the ReLU):

    dx = gamma / sqrt(var + eps) * (dz - (sum dz + x^ * sum(dz x^)) / N)   (sums: all replicas)
    dgamma = sum(dz x^),  dbeta = sum dz                  (this replica's: the optimizer adds them)
  """
  gamma, beta, moving_mean, moving_variance = norm
  context = tf.distribute.get_replica_context()
  dtype = gamma.dtype  # the statistics' (float32 under mixed precision)
  # Their dependence on x is in the gradient below: stop autodiff's.
  mean, variance, count = (tf.stop_gradient(t) for t in synchronized_moments(
      tf.cast(x, dtype), with_count=True))
  rsqrt = tf.math.rsqrt(variance + epsilon)
  unbiased = variance * count / tf.maximum(count - 1., 1.)  # as `batch_norm`
  updated = tuple(moving_average(m, batch, momentum, count) for m, batch in
                  ((moving_mean, mean), (moving_variance, unbiased)))

  def activation(x, gamma, beta):  # `(z, relu(z))` as `batch_norm` computes it
    scale = gamma * rsqrt
    z = tf.cast(x, dtype) * scale + (beta - mean * scale)
    h = tf.nn.relu(tf.cast(z, x.dtype))
    return z, (h if conv_dtype is None else tf.cast(h, conv_dtype))

  @tf.custom_gradient
  def unit(x, gamma, beta, v, g, bias):
    _, h = activation(x, gamma, beta)
    y = tf.nn.bias_add(tf.nn.conv2d(h, weight_norm_kernel(v, g), 1, 'SAME'), bias)

    def gradient(dy):
      z, h = activation(x, gamma, beta)
      with tf.GradientTape() as tape:
        tape.watch([v, g])
        kernel = weight_norm_kernel(v, g)
      dh, dkernel = convolution_backward(h, kernel, dy)
      dz = tf.where(z > 0, tf.cast(dh, dtype), tf.zeros([], dtype))  # through the ReLU
      x_hat = (tf.cast(x, dtype) - mean) * rsqrt
      sums = tf.stack([tf.reduce_sum(dz, [0, 1, 2]), tf.reduce_sum(dz * x_hat, [0, 1, 2])])
      total = context.all_reduce(tf.distribute.ReduceOp.SUM, sums)  # one all-reduce
      dx = gamma * rsqrt * (dz - (total[0] + x_hat * total[1]) / tf.maximum(count, 1.))
      return (tf.cast(dx, x.dtype), sums[1], sums[0],
              *tape.gradient(kernel, [v, g], output_gradients=dkernel),
              tf.raw_ops.BiasAddGrad(out_backprop=dy))
    return y, gradient
  return unit(x, gamma, beta, *conv), updated


def residual_block(x, norm1, conv1, norm2, conv2, training, momentum, epsilon,
                   synchronized=True, recompute=False, recompute_batch_norm=True):
  """`x + conv(relu(bn(conv(relu(bn(x))))))` from the layers' weights (`norm*`: gamma, beta,
  running mean and variance; `conv*`: v, g, bias). Returns `(y, updated running averages)`.

  `recompute`: in training with one replica's statistics, the backward pass keeps only `x` and
  runs the first convolution again (`_residual_block_recomputing`); otherwise it keeps `x` and
  the first convolution's output (`bn_relu_conv`; with `recompute_batch_norm=False`, also each
  unit's ReLU output, as autodiff does)."""
  if recompute and _keeps_only_inputs(x, training, synchronized):
    return _residual_block_recomputing(x, norm1, conv1, norm2, conv2, momentum, epsilon)
  h, updated1 = bn_relu_conv(x, norm1, conv1, training, momentum, epsilon,
                             synchronized=synchronized, recompute_batch_norm=recompute_batch_norm)
  h, updated2 = bn_relu_conv(h, norm2, conv2, training, momentum, epsilon,
                             synchronized=synchronized, recompute_batch_norm=recompute_batch_norm)
  return x + h, updated1 + updated2


def _residual_block_with_updates_as_bits(x, norm1, conv1, norm2, conv2, *args):
  y, updated = residual_block(x, norm1, conv1, norm2, conv2, *args)
  return y, tuple(as_bits(u) for u in updated)


# Traced once per shape and reused by every block of that shape (not inlined): a `cifar10` model
# has 80 blocks in 3 shapes, and tracing and optimizing each copy was most of the first step.
# The running averages' updates leave it as bits (integers): a float output would get a zero
# gradient from the tape, a constant input to each call of the backward function, for which
# grappler made, optimized and instantiated a copy of that function per call site (80 copies,
# about 1.2 s of a `cifar10` model's first step).
_residual_block_traced = tf.function(_residual_block_with_updates_as_bits, autograph=False,
                                     experimental_attributes={'_noinline': True})


def _residual_block_function(x, norm1, conv1, norm2, conv2, *args):
  """`residual_block` through the shared traced function."""
  y, updated = _residual_block_traced(x, norm1, conv1, norm2, conv2, *args)
  return y, tuple(tf.bitcast(u, norm1[2].dtype) for u in updated)


def coupling_network(x, weights, training, momentum, synchronized=True, conv_dtype='float32',
                     recompute_blocks=False, recompute_batch_norm=True):
  """Real NVP's s/t network from its weights: `(s, t, *updated running averages)`, with no side
  effects (so a backward pass may run it again, and one traced function may serve every network
  of a shape). `weights`: `[conv_in, class_bias, blocks, hidden, norm_out, conv_out, scale]`, as
  `CouplingNet.call` gathers them; the output convolution runs in `conv_dtype`.
  `recompute_blocks`: see `residual_block`'s `recompute`; `recompute_batch_norm`: see
  `bn_relu_conv`."""
  conv_in, class_bias, blocks, hidden, norm_out, conv_out, scale = weights
  h = weight_norm_conv(x, *conv_in)
  for bias in class_bias:  # [N, 1, 1, F]: the class's bias
    h += bias
  updated = ()
  if blocks:
    h, updated = residual_blocks(h, blocks, training, momentum, EPSILON, synchronized,
                                 recompute_blocks, recompute_batch_norm)
  if hidden:
    h, hidden_updated = bn_relu_conv(h, *hidden, training, momentum, EPSILON,
                                     synchronized=synchronized,
                                     recompute_batch_norm=recompute_batch_norm)
    updated += hidden_updated
  # Under mixed precision, s and t come from a float32 convolution: their rounding would
  # otherwise enter the log-det and the latent directly (a small share of the FLOPs).
  h, out_updated = bn_relu_conv(h, norm_out, conv_out, training, momentum, EPSILON,
                                conv_dtype=conv_dtype, synchronized=synchronized,
                                recompute_batch_norm=recompute_batch_norm)
  raw_s, t = tf.split(h, 2, axis=-1)
  return (scale * tf.tanh(raw_s), t, *updated, *out_updated)


def _network_with_updates_as_bits(x, weights, *args):
  s, t, *updated = coupling_network(x, weights, *args)
  return (s, t, *(as_bits(u) for u in updated))


# In training, one traced function per shape serves every coupling network of that shape (a
# `cifar10` model has 10 networks in 3 shapes), for the reasons of `_residual_block_traced`.
_network_traced = tf.function(_network_with_updates_as_bits, autograph=False,
                              experimental_attributes={'_noinline': True})


def _shared_network(x, weights, *args):
  """`coupling_network` through the shared traced function."""
  s, t, *updated = _network_traced(x, weights, *args)
  dtype = weights[4][2].dtype  # the running averages'
  return (s, t, *(tf.bitcast(u, dtype) for u in updated))


def _network_function(training, synchronized):
  """The shared traced network in training with local batch statistics (see `_block_function`),
  `coupling_network` itself otherwise."""
  return _shared_network if training and _local(synchronized) else coupling_network


@keras.saving.register_keras_serializable(package='tfp_realnvp')
class L2(keras.regularizers.Regularizer):
  """`l2 * sum(x^2)`, Keras' `L2` as one op (`tf.nn.l2_loss`), whose gradient is one op too
  (Keras' is three ops and its gradient six: a thousand nodes of a `cifar10` step)."""

  def __init__(self, l2):
    self.l2 = float(l2)

  def __call__(self, x):
    # The constant second: the tape then skips its gradient (TF's `_MulGrad` does for a scalar
    # second factor), one op per weight that only grappler would prune.
    return tf.nn.l2_loss(x) * (2. * self.l2)

  def get_config(self):
    return {'l2': self.l2}


class WeightNormConv2D(keras.layers.Layer):
  """A 'same'-padded convolution with weight normalization: `w = g * v / ||v||`.

  The norm runs over the kernel's spatial and input axes, one `g` per output channel. L2 decay
  (Real NVP: 5e-5) applies to `g` only. `zero_init` starts `g` at zero, so the layer outputs its
  bias (zero): the last layer of a coupling network, which then starts as the identity.
  """

  def __init__(self, filters, kernel_size=3, l2=0., zero_init=False, autocast=True, **kwargs):
    super().__init__(**kwargs)
    self.filters, self.kernel_size, self.l2, self.zero_init = filters, kernel_size, l2, zero_init
    self.autocast = autocast  # False: the weights stay in the variables' dtype under mixed precision

  def build(self, input_shape):
    k = self.kernel_size
    self.v = self.add_weight(shape=(k, k, input_shape[-1], self.filters), name='v',
                             initializer=keras.initializers.HeNormal(), autocast=self.autocast)
    self.g = self.add_weight(shape=(self.filters,), name='g',
                             initializer='zeros' if self.zero_init else 'ones',
                             regularizer=L2(self.l2) if self.l2 else None, autocast=self.autocast)
    self.bias = self.add_weight(shape=(self.filters,), name='bias', initializer='zeros',
                                autocast=self.autocast)

  @property
  def weights_for_call(self):
    """`(v, g, bias)` as tensors in the compute dtype (with `autocast=False`, the variables')."""
    return _tensors(self.v, self.g, self.bias)

  def call(self, x):
    return weight_norm_conv(x, *(tf.cast(w, x.dtype) for w in self.weights_for_call))

  def get_config(self):
    return {**super().get_config(), 'filters': self.filters, 'kernel_size': self.kernel_size,
            'l2': self.l2, 'zero_init': self.zero_init, 'autocast': self.autocast}


class BatchNormalization(keras.layers.Layer):
  """Batch normalization of the coupling networks: `gamma * (x - mean) / sqrt(var + eps) + beta`.

  In training, the batch's per-channel moments (synchronized across replicas; with
  `synchronized=False`, each replica's own), and running averages
  `m <- momentum * m + (1 - momentum) * batch` (of the unbiased batch variance, as TF's kernel and
  PyTorch keep them); in inference, the running averages. The variables of Keras' layer, but with
  one replica's statistics it is TF's fused kernel: one op forward (running averages included)
  and one backward, which keep only the input for the gradient, where Keras' layer is a dozen ops
  with their intermediates kept.
  """

  def __init__(self, momentum=0.9, epsilon=1e-4, synchronized=True, **kwargs):
    super().__init__(**kwargs)
    self.momentum, self.epsilon, self.synchronized = momentum, epsilon, synchronized

  def build(self, input_shape):
    channels = (input_shape[-1],)
    # float32 even under mixed precision: the fused kernel takes them so.
    weight = dict(shape=channels, autocast=False)
    self.gamma = self.add_weight(name='gamma', initializer='ones', **weight)
    self.beta = self.add_weight(name='beta', initializer='zeros', **weight)
    self.moving_mean = self.add_weight(name='moving_mean', initializer='zeros', trainable=False,
                                       aggregation='mean', **weight)
    self.moving_variance = self.add_weight(name='moving_variance', initializer='ones',
                                           trainable=False, aggregation='mean', **weight)

  @property
  def weights_for_call(self):
    """`(gamma, beta, moving_mean, moving_variance)` as tensors (float32 under mixed
    precision)."""
    return _tensors(self.gamma, self.beta, self.moving_mean, self.moving_variance)

  def call(self, x, training=False):
    y, updated = batch_norm(x, *self.weights_for_call, training, self.momentum, self.epsilon,
                            self.synchronized)
    _assign((self.moving_mean, self.moving_variance), updated)
    return y

  def get_config(self):
    return {**super().get_config(), 'momentum': self.momentum, 'epsilon': self.epsilon,
            'synchronized': self.synchronized}


def _he_normal_per_kernel(shape, dtype=None):
  """Keras' `HeNormal` for each `[k, k, C_in, C_out]` kernel of a stack `[..., k, k, C_in, C_out]`
  (the fans are a kernel's, not the whole stack's)."""
  fan_in = shape[-4] * shape[-3] * shape[-2]
  # VarianceScaling's truncated normal: the standard deviation before truncation at 2 sigma
  return keras.initializers.TruncatedNormal(
      stddev=math.sqrt(2. / fan_in) / .87962566103423978)(shape, dtype)


def unstack_blocks(stacked):
  """Each block's `(norm1, conv1, norm2, conv2)` (`residual_block`'s weights) from the stacked
  `(v, g, bias, gamma, beta, moving_mean, moving_variance)`, each `[num_blocks, 2, ...]`: one op
  per stacked tensor (`tf.unstack`; its gradient is one op too)."""
  num_blocks = stacked[0].shape[0]

  def units(*tensors):  # a tuple of slices per unit; block b's units are 2b and 2b + 1
    return list(zip(*(tf.unstack(tf.reshape(w, [2 * num_blocks, *w.shape[2:]]))
                      for w in tensors)))
  v, g, bias, gamma, beta, moving_mean, moving_variance = stacked
  norms, convs = units(gamma, beta, moving_mean, moving_variance), units(v, g, bias)
  return [(norms[2 * b], convs[2 * b], norms[2 * b + 1], convs[2 * b + 1])
          for b in range(num_blocks)]


def residual_blocks(x, stacked, training, momentum, epsilon, synchronized=True,
                    recompute=False, recompute_batch_norm=True):
  """`residual_block` after `residual_block`, from their stacked weights `(v, g, bias, gamma,
  beta, moving_mean, moving_variance)` (each `[num_blocks, 2, ...]`). Returns `(y, updated)`:
  in training the updated running averages `(moving_mean, moving_variance)`, stacked like the
  weights; in inference `()`. `recompute`, `recompute_batch_norm`: see `residual_block`."""
  updated = ()
  for block in unstack_blocks(stacked):
    x, block_updated = _block_function(synchronized, training)(
        x, *block, training, momentum, epsilon, synchronized, recompute, recompute_batch_norm)
    updated += block_updated  # (mean1, variance1, mean2, variance2)
  if not updated:
    return x, ()
  shape = stacked[-1].shape
  return x, tuple(tf.reshape(tf.stack(values), shape) for values in (updated[0::2],
                                                                      updated[1::2]))


class ResidualBlocks(keras.layers.Layer):
  """`num_blocks` pre-activation blocks, each `x <- x + conv(relu(bn(conv(relu(bn(x))))))` (3x3
  weight-norm convolutions), with their weights stacked: each variable is `[num_blocks, 2, ...]`
  (the block, then its two batch norm -> ReLU -> convolution units).

  The same maps as a layer per block, in 7 variables instead of 14 per block. A training step
  reads, clips, decays and updates each variable with ops of its own (a `cifar10` model had 890
  trainable variables, and those ops were most of its step's graph), so stacking makes the step's
  graph smaller and its first call shorter. One op (`tf.unstack`) splits a variable into its
  blocks' slices, and its gradient is one op too.
  """

  def __init__(self, num_blocks, filters, l2=0., momentum=0.9, synchronized=True, **kwargs):
    super().__init__(**kwargs)
    self.num_blocks, self.filters, self.l2 = num_blocks, filters, l2
    self.momentum, self.synchronized = momentum, synchronized

  def build(self, input_shape):
    if input_shape[-1] != self.filters:
      raise ValueError(f'{self.name}: expected inputs of {self.filters} channels, got '
                       f'{input_shape[-1]}.')
    units, f = (self.num_blocks, 2), self.filters
    # The convolutions' weights are in the compute dtype; the batch norms' stay float32.
    self.v = self.add_weight(shape=(*units, 3, 3, f, f), name='v',
                             initializer=_he_normal_per_kernel)
    self.g = self.add_weight(shape=(*units, f), name='g', initializer='ones',
                             regularizer=L2(self.l2) if self.l2 else None)
    self.bias = self.add_weight(shape=(*units, f), name='bias', initializer='zeros')
    norm = dict(shape=(*units, f), autocast=False)
    self.gamma = self.add_weight(name='gamma', initializer='ones', **norm)
    self.beta = self.add_weight(name='beta', initializer='zeros', **norm)
    self.moving_mean = self.add_weight(name='moving_mean', initializer='zeros', trainable=False,
                                       aggregation='mean', **norm)
    self.moving_variance = self.add_weight(name='moving_variance', initializer='ones',
                                           trainable=False, aggregation='mean', **norm)

  @property
  def weights_for_call(self):
    """`residual_blocks`' stacked weights `(v, g, bias, gamma, beta, moving_mean,
    moving_variance)` as tensors (the batch norms' in float32 under mixed precision)."""
    return _tensors(self.v, self.g, self.bias, self.gamma, self.beta, self.moving_mean,
                    self.moving_variance)

  def assign_updates(self, updated):
    """Running averages <- `residual_blocks`' updates (none in inference)."""
    _assign((self.moving_mean, self.moving_variance), updated)

  def call(self, x, training=False):
    y, updated = residual_blocks(x, self.weights_for_call, bool(training), self.momentum,
                                 EPSILON, self.synchronized)
    self.assign_updates(updated)
    return y

  def get_config(self):
    return {**super().get_config(), 'num_blocks': self.num_blocks, 'filters': self.filters,
            'l2': self.l2, 'momentum': self.momentum, 'synchronized': self.synchronized}


def _block_function(synchronized, training):
  """One traced function for every block of a shape in training, where batch statistics need no
  cross-replica sync (which cannot run inside a nested tf.function).

  Not in inference: there one graph may run several flow passes at once (a log-density per
  class, several dequantization draws), and calls of one shared function run concurrently on
  its single set of kernels, which oneDNN's CPU kernels do not survive (a segmentation fault;
  `tests/test_nets.py`). A training step's blocks run one after another."""
  return _residual_block_function if training and _local(synchronized) else residual_block


class CouplingNet(keras.layers.Layer):
  """Real NVP's s/t network: `(s, t)` for an affine coupling on `channels` channels.

  conv 3x3 -> `num_blocks` residual blocks -> bn, relu -> zero-initialised conv 3x3 to 2C
  channels, split into `raw_s` and `t` (`kind='glow'`: Glow's network, the residual blocks
  replaced by one bn, relu -> conv 1x1 of `num_filters`); `s = scale * tanh(raw_s)` with a learned per-channel
  `scale` (starting at 1; L2 decay like the weight-norm `g`s). The zero start makes the coupling
  the identity at initialisation. Returns `(s, t)` in float32 whatever the layer's compute dtype.

  Class-conditional (`num_classes > 0`): `call(x, labels=...)` adds a learned per-class bias
  (an embedding `[num_classes, num_filters]`, starting at zero) to the first convolution's
  output, so every later layer sees the class. This is what one-hot class channels on the input
  would give (a per-class bias of the first convolution), except at the borders, where zero
  padding would cut those channels off; and it costs no convolution FLOPs (1,000 ImageNet classes
  as input channels would multiply the first convolution's). Like the convolutions' biases it
  has no L2 decay.

  `recompute=True` keeps none of the network's activations for the gradient: the backward pass
  runs the network forward again (a third more compute for a fraction of the memory).
  `recompute_blocks=True` keeps half: each residual block's backward pass runs its first
  convolution again instead of keeping its output (one convolution more per block; see
  `residual_block`). `recompute_batch_norm=False`: each batch norm -> ReLU -> convolution unit
  keeps its ReLU output too, instead of running its batch norm and ReLU again in the backward
  pass (see `bn_relu_conv`).
  `synchronized=False`: batch statistics of each replica's batch (see `BatchNormalization`).
  """

  def __init__(self, channels, num_filters, num_blocks, l2=0., momentum=0.9, recompute=False,
               synchronized=True, kind='resnet', num_classes=0, recompute_blocks=False,
               recompute_batch_norm=True, **kwargs):
    super().__init__(**kwargs)
    if kind not in ('resnet', 'glow'):
      raise ValueError(f'CouplingNet: kind must be resnet or glow, got {kind!r}.')
    if num_classes < 0:
      raise ValueError(f'CouplingNet: num_classes must be >= 0, got {num_classes}.')
    self.num_classes = num_classes
    self.channels, self.num_filters, self.num_blocks = channels, num_filters, num_blocks
    self.l2, self.momentum, self.recompute = l2, momentum, recompute
    self.recompute_blocks = bool(recompute_blocks)
    self.recompute_batch_norm = bool(recompute_batch_norm)
    self.synchronized, self.kind = synchronized, kind
    policy = self.dtype_policy
    self.conv_in = WeightNormConv2D(num_filters, 3, l2, dtype=policy)
    self.blocks = (ResidualBlocks(num_blocks, num_filters, l2, momentum, synchronized,
                                  dtype=policy) if kind == 'resnet' else None)
    # Glow's hidden layer: bn, relu -> conv 1x1 (kind='glow')
    self.hidden = ([BatchNormalization(momentum, EPSILON, synchronized, dtype=policy),
                    WeightNormConv2D(num_filters, 1, l2, dtype=policy)] if kind == 'glow' else [])
    self.norm_out = BatchNormalization(momentum, EPSILON, synchronized, dtype=policy)
    # s and t come from the output convolution in the variables' dtype (float32 under mixed
    # precision): its weights are not cast to the compute dtype.
    self.conv_out = WeightNormConv2D(2 * channels, 3, l2, zero_init=True, autocast=False,
                                     dtype=policy)

  def build(self, input_shape):
    features = (*input_shape[:-1], self.num_filters)
    self.conv_in.build(input_shape)
    for layer in (*self._block_layers, *self.hidden, self.norm_out, self.conv_out):
      layer.build(features)
    self.scale = self.add_weight(shape=(self.channels,), name='scale', initializer='ones',
                                 regularizer=L2(self.l2) if self.l2 else None,
                                 autocast=False)  # s is float32 under mixed precision too
    if self.num_classes:
      self.class_embedding = self.add_weight(shape=(self.num_classes, self.num_filters),
                                             name='class_embedding', initializer='zeros')

  @property
  def _block_layers(self):
    return [] if self.blocks is None else [self.blocks]

  @property
  def kernel_shapes(self):
    """The shape `[k, k, C_in, C_out]` of every convolution's kernel, in the order they run."""
    blocks = ([] if self.blocks is None else
              [tuple(self.blocks.v.shape[2:])] * (2 * self.num_blocks))
    return [tuple(self.conv_in.v.shape), *blocks,
            *(tuple(layer.v.shape) for layer in self.hidden[1:]), tuple(self.conv_out.v.shape)]

  def call(self, x, labels=None, training=False):
    if self.num_classes and labels is None:
      raise ValueError(f'{self.name}: a class-conditional network ({self.num_classes} classes) '
                       'needs labels.')
    if not self.num_classes and labels is not None:
      raise ValueError(f'{self.name}: labels given to a network that is not class-conditional '
                       '(num_classes=0).')
    conv_out = self.conv_out.weights_for_call  # in the variables' dtype (`autocast=False`)
    class_bias = []
    if self.num_classes:
      class_bias = [tf.gather(_tensors(self.class_embedding)[0], labels)[:, None, None, :]]
    weights = [self.conv_in.weights_for_call, class_bias,
               [] if self.blocks is None else self.blocks.weights_for_call,
               [layer.weights_for_call for layer in self.hidden],
               self.norm_out.weights_for_call, conv_out, _tensors(self.scale)[0]]
    args = (bool(training), self.momentum, self.synchronized, self.variable_dtype,
            self.recompute_blocks, self.recompute_batch_norm)
    if training and self.recompute:
      forward = tf.recompute_grad(lambda x, *flat_weights: coupling_network(
          x, tf.nest.pack_sequence_as(weights, flat_weights), *args))
      s, t, *updated = forward(x, *tf.nest.flatten(weights))
    else:
      s, t, *updated = _network_function(args[0], self.synchronized)(x, weights, *args)
    # the blocks' stacked averages (none without blocks or in inference)
    in_blocks = 2 if updated and self.blocks is not None and self.num_blocks else 0
    if self.blocks is not None:
      self.blocks.assign_updates(updated[:in_blocks])
    _assign([v for layer in self.hidden[:1] for v in (layer.moving_mean, layer.moving_variance)] +
            [self.norm_out.moving_mean, self.norm_out.moving_variance], updated[in_blocks:])
    return s, t

  def get_config(self):
    return {**super().get_config(), 'channels': self.channels, 'num_filters': self.num_filters,
            'num_blocks': self.num_blocks, 'l2': self.l2, 'momentum': self.momentum,
            'synchronized': self.synchronized, 'kind': self.kind,
            'recompute': self.recompute, 'num_classes': self.num_classes,
            'recompute_blocks': self.recompute_blocks,
            'recompute_batch_norm': self.recompute_batch_norm}
