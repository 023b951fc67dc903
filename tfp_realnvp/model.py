"""`RealNVP`: the Keras model that owns the multi-scale flow and gives its exact density.

The density API is here (log_prob, bits_per_dim, sample, encode, decode, the TFP distribution);
Keras' compile and steps are in `keras_training`, the class-conditional API in `conditional`.
"""

import math
import numbers

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_realnvp import presets
from tfp_realnvp.bijectors.actnorm import ActNorm, ActNormParameters
from tfp_realnvp.bijectors.batch_norm import BatchStatistics
from tfp_realnvp.bijectors.invertible_conv import Invertible1x1Conv, LUWeights
from tfp_realnvp.bijectors.multiscale import latent_groups, multiscale_flow
from tfp_realnvp.conditional import (ClassConditionalMethods, ClassConditionalNormal,
                                     ClassConditionalPrior)
from tfp_realnvp.distribution import FlowDistribution
from tfp_realnvp.keras_training import BitsPerDim, KerasTraining  # noqa: F401 (BitsPerDim: its old home)
from tfp_realnvp.nets import CouplingNet

tfb, tfd = tfp.bijectors, tfp.distributions


def _resolve_config(config, overrides):
  if config is None:
    config = presets.RealNVPConfig()
  elif isinstance(config, str):
    config = presets.get(config)
  elif isinstance(config, dict):
    config = presets.RealNVPConfig.from_dict(config)
  return config.replace(**overrides) if overrides else config


def to_uint8(pixels):
  """Continuous pixel values (the flow's data space, about [0, 256)) to uint8 images."""
  return tf.cast(tf.clip_by_value(tf.floor(pixels), 0., 255.), tf.uint8)


@keras.saving.register_keras_serializable(package='tfp_realnvp')
class RealNVP(ClassConditionalMethods, KerasTraining, keras.Model):
  """Real NVP (Dinh et al., 2017): an exact density on images `[H, W, C]`.

  The model owns every coupling network and batch-norm statistic of the multi-scale bijector
  `model.flow` (pixels -> image-shaped latent), and exposes it as a TFP distribution:
  `model.distribution`, a `FlowDistribution` (TFP's `TransformedDistribution(unit Gaussian on
  [H, W, C], Invert(flow))`, one flow pass per call), named after the model. Its
  `trainable_variables` are the model's. `model.generative_flow` is `Invert(flow)` (latent ->
  pixels, TFP's direction).

  The density's support is the logit preprocessing's domain, pixels in about (-14.2, 270.2)
  (`alpha = 0.05`), a little wider than [0, 256): every sample lies in it, and `log_prob` (the
  model's and the distribution's alike) accepts exactly those points (checked when
  `validate_args`). Bits/dim of dequantized images bound the discrete negative log-likelihood of
  uint8 images from above.

  Inputs: uint8 (or other integer) images are dequantized with U[0, 1) noise, as in the paper;
  float inputs are taken as already-dequantized pixels in [0, 256). `model(x)` and `predict` give
  bits/dim per image; `compile()` + `fit()` minimise their mean (plus the L2 decay), reported as
  `bits_per_dim`. Under `tf.distribute` the loss is exact for any replica count (batch
  statistics are synchronized across replicas).

  Class-conditional (`num_classes > 0`, `RealNVP('mnist', num_classes=10)`): `p(x | y)`, the
  label changing the coupling networks' `s` and `t` (a learned per-class bias) and the latent's
  Gaussian (a learned mean and log-scale per class, per channel of each factored-out part), never
  the log-det's form. Every method that takes images takes `labels` (int `[N]`, or one label for
  all); `fit` takes `(images, labels)` pairs (`fit(x, y)`, or a dataset of pairs) and counts the
  labels for the class prior `p(y)`; `classify(x)` is `argmax_y log p(x | y) + log p(y)`,
  `predict_proba(x)` the posterior. `model.distribution` is then the class mixture
  `p(x) = sum_y p(y) p(x | y)` (TFP's `MixtureSameFamily`), and `model.distribution_given(labels)`
  the TFP distribution `p(x | y)` for those labels.

  Example:
    model = RealNVP('mnist')          # or RealNVP(RealNVPConfig(...)), RealNVP('cifar10', num_blocks=4)
    model.compile()                   # Adam 1e-3, global-norm clipping 100
    model.fit(uint8_images, batch_size=64, epochs=10)
    model.bits_per_dim(test_images); model.sample(16, temperature=0.7)
  """

  def __init__(self, config=None, name=None, **overrides):
    keras_kwargs = {k: overrides.pop(k) for k in ('trainable',) if k in overrides}
    config = _resolve_config(config, overrides)
    super().__init__(name=name, dtype=config.dtype, **keras_kwargs)
    self.config = config
    self.flow = multiscale_flow(
        config.image_shape, config.num_scales, self._coupling_network, self._batch_statistics,
        alpha=config.alpha, batch_norm_epsilon=config.batch_norm_epsilon,
        validate_args=config.validate_args, dtype=config.dtype,
        normalization=self._actnorm if config.normalization == 'actnorm' else None,
        mixing=self._invertible_1x1_conv if config.mixing == '1x1_conv' else None,
        layout=config.layout, steps_per_scale=config.steps_per_scale)
    # Keras does not look inside the bijector (a tf.Module): this list makes the model own them.
    self.flow_layers = self.flow.keras_layers
    dtype = tf.as_dtype(config.dtype)
    self.num_classes = config.num_classes
    if self.num_classes:
      self.prior = ClassConditionalPrior(
          self.num_classes, latent_groups(config.image_shape, config.num_scales, config.layout),
          dtype=config.dtype)
      counts = self.prior.class_counts
      log_prior = tfp.util.DeferredTensor(getattr(counts, 'value', counts),
                                          lambda _: self.prior.log_class_prior())
      self.distribution = tfd.MixtureSameFamily(
          tfd.Categorical(logits=log_prior),
          self.distribution_given(tf.range(self.num_classes)), name=self.name)
    else:
      self.distribution = FlowDistribution(
          tfd.Sample(tfd.Normal(tf.zeros([], dtype), tf.ones([], dtype)), config.image_shape),
          self.flow, name=self.name)
    self._num_dims = math.prod(config.image_shape)
    self._flow_forward = self.flow.forward_and_log_det
    # Creates every variable.
    self(tf.fill([1, *config.image_shape], tf.constant(128., dtype)),
         labels=tf.zeros([1], tf.int32) if self.num_classes else None)

  def _network_filters(self, scale, kind):
    filters = self.config.num_filters
    if self.config.layout == 'real_nvp':  # the paper doubles them per scale, and for channels
      filters *= 2 ** scale * (2 if kind == 'channel' else 1)
    return filters

  def _network_recompute(self, event_shape, filters):
    """What a coupling network on `event_shape` with `filters` features recomputes
    (`CouplingNet`'s `recompute`) for `RealNVPConfig.recompute`: 'auto' is 'largest_blocks' in
    float32 and 'none' under mixed precision; 'largest_blocks' is 'blocks' on the model's
    largest maps, `H * W * filters` (in the real_nvp layout the first scale's checkerboard
    networks, before the squeeze; in glow's, every coupling after the first squeeze), and
    'batch_norm' on the others."""
    level = self.config.recompute
    if level == 'auto':
      level = 'none' if self.config.compute_dtype else 'largest_blocks'
    if level != 'largest_blocks':
      return level
    height, width = self.config.image_shape[:2]
    if self.config.layout == 'real_nvp':
      largest = height * width * self._network_filters(0, 'checkerboard')
    else:  # glow: every coupling after a squeeze
      largest = (height // 2) * (width // 2) * self._network_filters(0, 'channel')
    return 'blocks' if event_shape[0] * event_shape[1] * filters >= largest else 'batch_norm'

  def _coupling_network(self, event_shape, scale, kind):
    filters = self._network_filters(scale, kind)
    policy = (f'mixed_{self.config.compute_dtype}' if self.config.compute_dtype
              else self.config.dtype)
    return CouplingNet(event_shape[-1], filters, self.config.num_blocks, l2=self.config.l2,
                       momentum=self.config.batch_norm_momentum,
                       recompute=self._network_recompute(event_shape, filters),
                       synchronized=self.config.sync_batch_norm, kind=self.config.network,
                       num_classes=self.config.num_classes, dtype=policy)

  def _batch_statistics(self):
    return BatchStatistics(self.config.batch_norm_momentum, self.config.sync_batch_norm,
                           dtype=self.config.dtype)

  def _actnorm(self, event_shape, name):
    return ActNorm(ActNormParameters(dtype=self.config.dtype), event_shape,
                   validate_args=self.config.validate_args, name=name, dtype=self.config.dtype)

  def _invertible_1x1_conv(self, event_shape, name):
    return Invertible1x1Conv(LUWeights(dtype=self.config.dtype), event_shape,
                             validate_args=self.config.validate_args, name=name,
                             dtype=self.config.dtype)

  @property
  def image_shape(self):
    return self.config.image_shape

  @property
  def generative_flow(self):
    """`tfb.Invert(model.flow)`: latent -> pixels, the direction of TFP's convention."""
    return self.distribution.bijector

  def _pixels(self, images, dequantize, seed=None):
    """Float pixels from uint8 (dequantized into [0, 256)) or float (as given) images.

    Float pixels are checked (under `validate_args`) against the flow's `Logit` domain, the
    support for this method and `model.distribution` alike (here, before any XLA-compiled
    call, which would drop the check)."""
    images = tf.convert_to_tensor(images)
    if images.shape.rank is None or images.shape.rank < 3 or not images.shape[-3:].is_compatible_with(
        self.image_shape):
      raise ValueError(f'{self.name}: expected images of shape [..., '
                       f'{", ".join(map(str, self.image_shape))}], got {images.shape}.')
    dtype = tf.as_dtype(self.config.dtype)
    if images.dtype.is_floating:
      pixels = tf.cast(images, dtype)
      return self.flow.bijectors[0].checked_domain(pixels) if self.config.validate_args else pixels
    if not images.dtype.is_integer:
      raise TypeError(f'{self.name}: expected uint8 or float images, got {images.dtype.name}.')
    pixels = tf.cast(images, dtype)
    if dequantize == 'centre':
      return pixels + 0.5
    if seed is None:
      return pixels + tf.random.uniform(tf.shape(pixels), dtype=dtype)
    return pixels + tf.random.stateless_uniform(tf.shape(pixels), [seed, 0], dtype=dtype)

  def dequantize(self, images, seed=None):
    """Float pixels as `log_prob` takes them: uint8 images plus U[0, 1) noise (`seed` makes it
    repeatable), float images as given."""
    return self._pixels(images, 'uniform', seed)

  def _latent_log_prob(self, latent, labels):
    if labels is None:
      return self.distribution.distribution.log_prob(latent)
    return ClassConditionalNormal(labels, self.prior).log_prob(latent)

  def log_prob(self, images, labels=None, training=False, seed=None):
    """log p(x) (log p(x | y) for a class-conditional model, given `labels`) in nats, one pass
    through the flow; the density lives on the logit preprocessing's domain (see the class
    docstring), the same as `model.distribution`'s.

    uint8 images are dequantized with U[0, 1) noise (`seed` makes it repeatable).
    """
    pixels = self._pixels(images, 'uniform', seed)
    labels = self._labels(labels, pixels, 'log_prob')
    if labels is None:
      latent, log_det = self._flow_forward(pixels, training=training)
    else:
      latent, log_det = self._flow_forward(pixels, training=training, labels=labels)
    return self._latent_log_prob(latent, labels) + log_det

  def bits_per_dim(self, images, labels=None, training=False, seed=None):
    """-log p(x) / (D ln 2) (-log p(x | y) / (D ln 2) given `labels`): the paper's bits/dim, per
    image."""
    return -self.log_prob(images, labels, training, seed) / (self._num_dims * math.log(2.))

  def call(self, images, labels=None, training=False):
    if isinstance(images, (tuple, list)) and len(images) == 2 and labels is None:
      images, labels = images  # predict((images, labels))
    return self.bits_per_dim(images, labels, training=training)

  def encode(self, images, labels=None, training=False):
    """The image-shaped latent `z = flow(x)` (`flow(x, y)` given `labels`); uint8 images are
    taken at their pixel centres."""
    pixels = self._pixels(images, 'centre')
    labels = self._labels(labels, pixels, 'encode')
    return self.flow.forward_and_log_det(pixels, training, labels)[0]

  def decode(self, latent, labels=None):
    """Pixels `x = flow^-1(z)` (`flow^-1(z, y)` given `labels`; floats, about [0, 256);
    `to_uint8` makes images)."""
    latent = tf.convert_to_tensor(latent)
    return self.flow.inverse_and_log_det(latent, labels=self._labels(labels, latent, 'decode'))[0]

  def sample(self, num_samples, temperature=1.0, seed=None, labels=None):
    """`num_samples` images (float pixels) from latents `z ~ N(0, temperature^2 I)`;
    `temperature` a finite number >= 0 (0: the latent's mode, the image of z = 0).

    Class-conditional: images of the classes `labels` (one label, or `[num_samples]`), from
    `z ~ N(mu_y, (temperature sigma_y)^2)`; without labels, classes are drawn from `p(y)`
    (samples of the class mixture `p(x)`)."""
    if isinstance(temperature, numbers.Real) and not (math.isfinite(temperature) and
                                                      temperature >= 0):
      raise ValueError(f'{self.name}.sample: temperature must be a finite number >= 0, got '
                       f'{temperature!r}.')
    shape = [num_samples, *self.image_shape]
    dtype = tf.as_dtype(self.config.dtype)
    if seed is None:
      latent = tf.random.normal(shape, dtype=dtype)
    else:
      latent = tf.random.stateless_normal(shape, [seed, 0], dtype=dtype)
    if not self.num_classes:
      self._labels(labels, None, 'sample')  # refuses labels
      return self.decode(temperature * latent)
    if labels is None:
      logits = self.prior.log_class_prior()[None]
      labels = (tf.random.categorical(logits, num_samples, dtype=tf.int32) if seed is None else
                tf.random.stateless_categorical(logits, num_samples, [seed, 1], dtype=tf.int32))
      labels = labels[0]
    labels = self._labels(labels, latent, 'sample')
    loc, log_scale = self.prior.loc_and_log_scale(labels)
    return self.decode(loc + temperature * tf.exp(log_scale) * latent, labels)

  def get_config(self):
    return {'config': self.config.to_dict(), 'name': self.name}

  @classmethod
  def from_config(cls, config):
    return cls(presets.RealNVPConfig.from_dict(config['config']), name=config.get('name'))
