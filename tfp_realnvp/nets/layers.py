"""The s/t networks' Keras layers: weight-norm convolutions, batch norm, stacked residual blocks
and Real NVP's coupling network (Keras 3)."""

import math
import warnings

import keras
from keras import ops
import tensorflow as tf

from tfp_realnvp.bijectors.batch_norm import assign_running_average
from tfp_realnvp.nets.network import EPSILON, NETWORK_RECOMPUTE, coupling_network, residual_blocks
from tfp_realnvp.nets.ops import batch_norm, weight_norm_conv


def _tensors(*variables):
  """The variables' values (Keras casts them to the layer's compute dtype where it autocasts)."""
  return tuple(tf.convert_to_tensor(ops.convert_to_tensor(v)) for v in variables)


def _add_batch_norm_weights(layer, shape):
  """`layer.gamma`, `beta`, `moving_mean`, `moving_variance` of `shape`, float32 even under
  mixed precision (the fused kernel takes them so)."""
  weight = dict(shape=shape, autocast=False)
  layer.gamma = layer.add_weight(name='gamma', initializer='ones', **weight)
  layer.beta = layer.add_weight(name='beta', initializer='zeros', **weight)
  layer.moving_mean = layer.add_weight(name='moving_mean', initializer='zeros', trainable=False,
                                       aggregation='mean', **weight)
  layer.moving_variance = layer.add_weight(name='moving_variance', initializer='ones',
                                           trainable=False, aggregation='mean', **weight)


def _assign(variables, values):
  """Running averages <- their updates (there are none in inference)."""
  for variable, value in zip(variables, values or [None] * len(variables), strict=True):
    if value is not None:
      assign_running_average(variable, value)


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
    _add_batch_norm_weights(self, (input_shape[-1],))

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
    _add_batch_norm_weights(self, (*units, f))

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

  `recompute`, what the backward pass runs again to save memory (where it applies:
  `network.plan`): 'none' keeps autodiff's tensors; 'batch_norm' keeps only each batch norm ->
  ReLU -> convolution unit's input (half the activations, for its batch norm and ReLU again);
  'blocks' keeps only each residual block's input (half again, for its first convolution
  again); 'networks' keeps nothing (the whole network again, about a third more compute).
  `synchronized=False`: batch statistics of each replica's batch (see `BatchNormalization`).
  """

  def __init__(self, channels, num_filters, num_blocks, l2=0., momentum=0.9,
               recompute='batch_norm', synchronized=True, kind='resnet', num_classes=0,
               **kwargs):
    recompute = _renamed_recompute(recompute, kwargs)
    super().__init__(**kwargs)
    if kind not in ('resnet', 'glow'):
      raise ValueError(f'CouplingNet: kind must be resnet or glow, got {kind!r}.')
    if num_classes < 0:
      raise ValueError(f'CouplingNet: num_classes must be >= 0, got {num_classes}.')
    if recompute not in NETWORK_RECOMPUTE:
      raise ValueError(f'CouplingNet: recompute must be one of {", ".join(NETWORK_RECOMPUTE)}, '
                       f'got {recompute!r}.')
    self.num_classes = num_classes
    self.channels, self.num_filters, self.num_blocks = channels, num_filters, num_blocks
    self.l2, self.momentum, self.recompute = l2, momentum, recompute
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
    s, t, *updated = coupling_network(x, weights, bool(training), self.momentum,
                                      self.synchronized, self.variable_dtype, self.recompute)
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
            'recompute': self.recompute, 'num_classes': self.num_classes}


def _renamed_recompute(recompute, kwargs):
  """`CouplingNet`'s `recompute` level from the arguments it had before the levels (with a
  `DeprecationWarning`): `recompute=True` ('networks'), `recompute_blocks` and
  `recompute_batch_norm` (booleans; taken out of `kwargs`)."""
  blocks, batch_norm = kwargs.pop('recompute_blocks', None), kwargs.pop('recompute_batch_norm',
                                                                         None)
  if not isinstance(recompute, bool) and blocks is None and batch_norm is None:
    return recompute
  level = ('networks' if recompute is True else 'blocks' if blocks else
           'none' if batch_norm is False else 'batch_norm')
  warnings.warn(f'CouplingNet: recompute={recompute!r}, recompute_blocks={blocks!r}, '
                f'recompute_batch_norm={batch_norm!r} are now recompute={level!r} (one of '
                f'{", ".join(NETWORK_RECOMPUTE)}).', DeprecationWarning, stacklevel=3)
  return level
