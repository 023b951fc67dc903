"""The s/t networks of the coupling layers: ResNets with weight norm and batch norm (Keras 3)."""

import keras
from keras import ops
import tensorflow as tf

from tfp_realnvp.bijectors.batch_norm import synchronized_moments


class WeightNormConv2D(keras.layers.Layer):
  """A 'same'-padded convolution with weight normalization: `w = g * v / ||v||`.

  The norm runs over the kernel's spatial and input axes, one `g` per output channel. L2 decay
  (Real NVP: 5e-5) applies to `g` only. `zero_init` starts `g` at zero, so the layer outputs its
  bias (zero): the last layer of a coupling network, which then starts as the identity.
  """

  def __init__(self, filters, kernel_size=3, l2=0., zero_init=False, **kwargs):
    super().__init__(**kwargs)
    self.filters, self.kernel_size, self.l2, self.zero_init = filters, kernel_size, l2, zero_init

  def build(self, input_shape):
    k = self.kernel_size
    self.v = self.add_weight(shape=(k, k, input_shape[-1], self.filters), name='v',
                             initializer=keras.initializers.HeNormal())
    self.g = self.add_weight(shape=(self.filters,), name='g',
                             initializer='zeros' if self.zero_init else 'ones',
                             regularizer=keras.regularizers.L2(self.l2) if self.l2 else None)
    self.bias = self.add_weight(shape=(self.filters,), name='bias', initializer='zeros')

  def call(self, x):
    v = ops.convert_to_tensor(self.v)
    w = self.g * v * ops.rsqrt(ops.sum(ops.square(v), axis=(0, 1, 2), keepdims=True) + 1e-12)
    return ops.conv(x, w, padding='same') + self.bias

  def get_config(self):
    return {**super().get_config(), 'filters': self.filters, 'kernel_size': self.kernel_size,
            'l2': self.l2, 'zero_init': self.zero_init}


class BatchNormalization(keras.layers.Layer):
  """Batch normalization of the coupling networks: `gamma * (x - mean) / sqrt(var + eps) + beta`.

  In training, the batch's per-channel moments (synchronized across replicas), and running
  averages `m <- momentum * m + (1 - momentum) * batch`; in inference, the running averages. The
  same variables and arithmetic as Keras' layer, but on one replica it is TF's fused kernel: one
  op forward and one backward, which keep only the input for the gradient (Keras' layer is a
  dozen ops, with their intermediates kept).
  """

  def __init__(self, momentum=0.9, epsilon=1e-4, **kwargs):
    super().__init__(**kwargs)
    self.momentum, self.epsilon = momentum, epsilon

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

  def call(self, x, training=False):
    if not training:
      return self._fused(x, self.moving_mean, self.moving_variance, is_training=False)[0]
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
      y, mean, variance = self._fused(x, [], [], is_training=True)
      count = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), variance.dtype)
      variance *= (count - 1.) / count  # the kernel returns the unbiased variance
    else:
      mean, variance = synchronized_moments(tf.cast(x, tf.float32))
      inverse_std = self.gamma * tf.math.rsqrt(variance + self.epsilon)
      y = x * tf.cast(inverse_std, x.dtype) + tf.cast(self.beta - mean * inverse_std, x.dtype)
    for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
      moving.assign(self.momentum * moving + (1. - self.momentum) * tf.stop_gradient(batch))
    return y

  def _fused(self, x, mean, variance, is_training):
    return tf.raw_ops.FusedBatchNormV3(
        x=x, scale=self.gamma, offset=self.beta, mean=mean, variance=variance,
        epsilon=self.epsilon, is_training=is_training)[:3]

  def get_config(self):
    return {**super().get_config(), 'momentum': self.momentum, 'epsilon': self.epsilon}


class ResidualBlock(keras.layers.Layer):
  """Pre-activation block: `x + conv(relu(bn(conv(relu(bn(x))))))`, 3x3 weight-norm convs."""

  def __init__(self, filters, l2=0., momentum=0.9, **kwargs):
    super().__init__(**kwargs)
    norm = dict(momentum=momentum, epsilon=1e-4, dtype=self.dtype_policy)
    self.norm1 = BatchNormalization(**norm)
    self.conv1 = WeightNormConv2D(filters, 3, l2, dtype=self.dtype_policy)
    self.norm2 = BatchNormalization(**norm)
    self.conv2 = WeightNormConv2D(filters, 3, l2, dtype=self.dtype_policy)

  def call(self, x, training=False):
    h = self.conv1(ops.relu(self.norm1(x, training=training)))
    return x + self.conv2(ops.relu(self.norm2(h, training=training)))


class CouplingNet(keras.layers.Layer):
  """Real NVP's s/t network: `(s, t)` for an affine coupling on `channels` channels.

  conv 3x3 -> `num_blocks` residual blocks -> bn, relu -> zero-initialised conv 3x3 to 2C
  channels, split into `raw_s` and `t`; `s = scale * tanh(raw_s)` with a learned per-channel
  `scale` (starting at 1; L2 decay like the weight-norm `g`s). The zero start makes the coupling
  the identity at initialisation. Returns `(s, t)` in float32 whatever the layer's compute dtype.
  """

  def __init__(self, channels, num_filters, num_blocks, l2=0., momentum=0.9, **kwargs):
    super().__init__(**kwargs)
    self.channels, self.num_filters, self.num_blocks = channels, num_filters, num_blocks
    self.l2, self.momentum = l2, momentum
    policy = self.dtype_policy
    self.conv_in = WeightNormConv2D(num_filters, 3, l2, dtype=policy)
    self.blocks = [ResidualBlock(num_filters, l2, momentum, dtype=policy)
                   for _ in range(num_blocks)]
    self.norm_out = BatchNormalization(momentum, 1e-4, dtype=policy)
    self.conv_out = WeightNormConv2D(2 * channels, 3, l2, zero_init=True, dtype=policy)

  def build(self, input_shape):
    self.scale = self.add_weight(shape=(self.channels,), name='scale', initializer='ones',
                                 regularizer=keras.regularizers.L2(self.l2) if self.l2 else None)

  def call(self, x, training=False):
    h = self.conv_in(x)
    for block in self.blocks:
      h = block(h, training=training)
    h = self.conv_out(ops.relu(self.norm_out(h, training=training)))
    raw_s, t = ops.split(ops.cast(h, self.variable_dtype), 2, axis=-1)
    return self.scale * ops.tanh(raw_s), t

  def get_config(self):
    return {**super().get_config(), 'channels': self.channels, 'num_filters': self.num_filters,
            'num_blocks': self.num_blocks, 'l2': self.l2, 'momentum': self.momentum}
