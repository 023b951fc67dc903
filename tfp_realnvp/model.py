"""`RealNVP`: the Keras model that owns the flow's variables and trains on bits/dim."""

import math
import numbers

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_realnvp import compat, presets
from tfp_realnvp.bijectors.actnorm import (ActNorm, ActNormParameters, data_dependent_init,
                                           initializing)
from tfp_realnvp.bijectors.base import batch_shape
from tfp_realnvp.bijectors.batch_norm import (BatchStatistics, as_bits, assign_running_average,
                                              deferred_running_averages)
from tfp_realnvp.bijectors.invertible_conv import Invertible1x1Conv, LUWeights
from tfp_realnvp.bijectors.multiscale import latent_groups, multiscale_flow
from tfp_realnvp.conditional import ClassConditionalNormal, ClassConditionalPrior, LabelError
from tfp_realnvp.distribution import FlowDistribution
from tfp_realnvp.nets import CouplingNet

tfb, tfd = tfp.bijectors, tfp.distributions


def _resolve_config(config, overrides):
  if config is None:
    config = presets.RealNVPConfig()
  elif isinstance(config, str):
    config = presets.get(config)
  elif isinstance(config, dict):
    config = presets.RealNVPConfig(**config)
  return config.replace(**overrides) if overrides else config


def to_uint8(pixels):
  """Continuous pixel values (the flow's data space, about [0, 256)) to uint8 images."""
  return tf.cast(tf.clip_by_value(tf.floor(pixels), 0., 255.), tf.uint8)


def _for_keras_reduction(metrics):
  """Keras 3.15 reduces step outputs across workers with `reduce(MEAN, v, axis=0)`, which fails
  on scalars under MultiWorkerMirroredStrategy: give it shape [1] there."""
  if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
    return {name: tf.reshape(value, [1]) for name, value in metrics.items()}
  return metrics


def _first_batch(x, y, batch_size):
  """`(images, labels or None)` of `fit`'s first batch of `x` (a dataset or iterable of batches,
  images first when they come with labels; or an array of images, `batch_size` (Keras: 32) of
  them, with `y` their labels)."""
  if hasattr(x, 'shape') and not isinstance(x, tf.data.Dataset):
    size = batch_size or 32
    return x[:size], None if y is None else y[:size]
  try:
    first = next(iter(x))
  except (TypeError, StopIteration) as e:
    raise ValueError(f'RealNVP.fit: cannot take a first batch of images from {type(x).__name__} '
                     'to initialise ActNorm from; call model.initialize_from_data(images) first.'
                     ) from e
  images, labels, _ = keras.utils.unpack_x_y_sample_weight(first)
  return images, labels


@keras.saving.register_keras_serializable(package='tfp_realnvp')
class BitsPerDim(keras.metrics.Mean):
  """Mean bits/dim of the model's outputs (`y_pred`; there are no targets). Lower is better, so
  Keras callbacks monitoring `bits_per_dim` / `val_bits_per_dim` (`EarlyStopping`,
  `ModelCheckpoint(save_best_only=True)`, `ReduceLROnPlateau`) work in `mode='auto'`."""

  def __init__(self, name='bits_per_dim', dtype=None):
    super().__init__(name=name, dtype=dtype)
    compat.lower_is_better(self)

  def update_state(self, y_true, y_pred, sample_weight=None):
    del y_true
    return super().update_state(y_pred, sample_weight)


def _compiled_with_running_averages_outside(forward_and_log_det):
  """`forward_and_log_det` compiled with XLA, the running averages it updates in training
  assigned after it, outside the compiled function: under MirroredStrategy, assigning a mirrored
  variable in a replica merges the replicas' values (their mean), which XLA cannot compile.
  The values leave the compiled function as bits (integers: no gradient flows to them)."""
  updated = {}  # per `training`: the variables whose values the compiled function returns

  def forward(x, training=False, **kwargs):
    with deferred_running_averages() as updates:
      y, log_det = forward_and_log_det(x, training=training, **kwargs)
    variables = [variable for variable, _ in updates]
    # Every trace of one `training` must update the same variables in the same order, each once
    # (the values are matched to them by position).
    known = updated.setdefault(bool(training), variables)
    if ([id(v) for v in known] != [id(v) for v in variables] or
        len({id(v) for v in variables}) != len(variables)):
      raise RuntimeError('The compiled flow updated other running averages than in its first '
                         'trace, or one twice: this is a bug in tfp_realnvp; compile without '
                         'jit_compile meanwhile.')
    return y, log_det, [as_bits(value) for _, value in updates]
  compiled = tf.function(forward, jit_compile=True)

  def forward_assigning_after(x, training=False, **kwargs):
    if initializing():
      # ActNorm's data-dependent initialisation: not compiled (a trace holding it would serve
      # training too, or the reverse).
      return forward_and_log_det(x, training=training, **kwargs)
    y, log_det, bits = compiled(x, training=training, **kwargs)
    for variable, value in zip(updated[bool(training)], bits, strict=True):
      assign_running_average(variable, tf.bitcast(value, variable.dtype))
    return y, log_det
  forward_assigning_after.compiled = compiled  # (the `tf.function`, for tests)
  return forward_assigning_after


@keras.saving.register_keras_serializable(package='tfp_realnvp')
class RealNVP(keras.Model):
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

  def _recomputes_blocks(self, event_shape, filters):
    """Whether a network's residual blocks recompute their first convolution in the backward
    pass (`RealNVPConfig.recompute_blocks`): 'largest' on the largest maps, `H * W * filters`
    (the first scale's; in the real_nvp layout its checkerboard networks, before the squeeze);
    'auto' as 'largest' in float32, as 'none' under mixed precision or with `recompute` (which
    runs each network again anyway). Never in float64, which keeps autodiff's tensors."""
    mode = self.config.recompute_blocks
    if self.config.dtype == 'float64':
      return False
    if mode == 'auto':
      mode = 'none' if self.config.compute_dtype or self.config.recompute else 'largest'
    if mode != 'largest':
      return mode == 'all'
    height, width = self.config.image_shape[:2]
    if self.config.layout == 'real_nvp':
      largest = height * width * self._network_filters(0, 'checkerboard')
    else:  # glow: every coupling after a squeeze
      largest = (height // 2) * (width // 2) * self._network_filters(0, 'channel')
    return event_shape[0] * event_shape[1] * filters >= largest

  def _coupling_network(self, event_shape, scale, kind):
    filters = self._network_filters(scale, kind)
    policy = (f'mixed_{self.config.compute_dtype}' if self.config.compute_dtype
              else self.config.dtype)
    return CouplingNet(event_shape[-1], filters, self.config.num_blocks, l2=self.config.l2,
                       momentum=self.config.batch_norm_momentum, recompute=self.config.recompute,
                       synchronized=self.config.sync_batch_norm, kind=self.config.network,
                       num_classes=self.config.num_classes, dtype=policy,
                       recompute_blocks=self._recomputes_blocks(event_shape, filters),
                       recompute_batch_norm=self._recomputes_batch_norm())

  def _recomputes_batch_norm(self):
    """Whether the networks' batch norm -> ReLU -> convolution units run their batch norm and ReLU
    again in the backward pass instead of keeping the ReLU's output
    (`RealNVPConfig.recompute_batch_norm`): 'auto' in float32 (the memory), not under mixed
    precision (the speed)."""
    mode = self.config.recompute_batch_norm
    if mode == 'auto':
      return not self.config.compute_dtype
    return mode == 'on'

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

  def needs_data_initialization(self):
    """Whether some `ActNorm` has not been set from data yet (see `initialize_from_data`)."""
    return any(not layer.initialized.numpy() for layer in self.flow_layers
               if isinstance(layer, ActNormParameters))

  def initialize_from_data(self, images, labels=None):
    """Glow's data-dependent initialisation: one training-mode pass over `images` (a global
    batch) sets every `ActNorm` not yet set so that its output has zero mean and unit variance
    per channel. Under the model's `tf.distribute` strategy the batch is split over the
    replicas and the statistics are of the whole batch. `fit` calls it on its first batch when
    `needs_data_initialization()`; a restored checkpoint keeps the flag, so a resumed run does
    not initialise again. (The networks' batch-norm running averages see this batch too.)
    A class-conditional model takes the batch's `labels` too."""
    images = tf.convert_to_tensor(images)
    labels = self._labels(labels, images, 'initialize_from_data')
    strategy = self.distribute_strategy
    dataset = tf.data.Dataset.from_tensor_slices(
        images if labels is None else (images, labels)).batch(int(images.shape[0]))
    options = tf.data.Options()  # every worker takes the whole batch (duplicates keep the moments)
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    batch = next(iter(strategy.experimental_distribute_dataset(dataset.with_options(options))))

    def replica(batch):
      images, labels = batch if self.num_classes else (batch, None)
      with data_dependent_init():
        self(images, labels=labels, training=True)
    tf.function(lambda batch: strategy.run(replica, args=(batch,)))(batch)

  def fit(self, x=None, y=None, batch_size=None, *args, **kwargs):
    """Keras `fit`; a model with `ActNorm` not yet set from data is first set from the first
    batch of `x` (`initialize_from_data`)."""
    if self.needs_data_initialization():
      self.initialize_from_data(*_first_batch(x, y, batch_size))
    return super().fit(x, y, batch_size, *args, **kwargs)

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

  def _labels(self, labels, images, what):
    """`labels` as int32 `[N]` (one label is repeated for the batch of `images`), checked against
    the model: required by a class-conditional model, refused by another, in [0, num_classes)
    (a `LabelError` naming `what`). None for an unconditional model."""
    if not self.num_classes:
      if labels is not None:
        raise LabelError(f'{self.name}.{what}: labels given to a model that is not '
                         'class-conditional (num_classes=0); drop them, or train a model with '
                         'num_classes set.')
      return None
    if labels is None:
      raise LabelError(f'{self.name}.{what}: this model is class-conditional ({self.num_classes} '
                       'classes): give labels (ints in [0, '
                       f'{self.num_classes}), one per image).')
    if isinstance(labels, bool):
      raise LabelError(f'{self.name}.{what}: labels must be ints, got {labels!r} (pass '
                       'training= by keyword).')
    labels = tf.convert_to_tensor(labels)
    if not labels.dtype.is_integer:
      raise LabelError(f'{self.name}.{what}: labels must be integers, got {labels.dtype.name}.')
    labels = tf.cast(labels, tf.int32)
    count = None if images is None else tf.shape(images)[0]
    if labels.shape.rank == 0 and count is not None:
      labels = tf.fill([count], labels)
    elif labels.shape.rank != 1:
      raise LabelError(f'{self.name}.{what}: expected labels of shape [N] (one per image) or '
                       f'one label, got shape {labels.shape}.')
    elif images is not None and images.shape[:1].is_fully_defined() and labels.shape[
        :1].is_fully_defined() and images.shape[0] != labels.shape[0]:
      raise LabelError(f'{self.name}.{what}: {images.shape[0]} images but {labels.shape[0]} '
                       'labels.')
    static = tf.get_static_value(labels)
    if static is not None:
      bad = static[(static < 0) | (static >= self.num_classes)]
      if bad.size:
        raise LabelError(f'{self.name}.{what}: labels must be in [0, {self.num_classes}), got '
                         f'{int(bad[0])}.')
      return labels
    checks = [tf.debugging.assert_non_negative(labels, message=f'{self.name}.{what}: labels must '
                                               f'be in [0, {self.num_classes})'),
              tf.debugging.assert_less(labels, self.num_classes, message=f'{self.name}.{what}: '
                                       f'labels must be in [0, {self.num_classes})')]
    if count is not None:
      checks.append(tf.debugging.assert_equal(tf.size(labels), count, message=f'{self.name}.'
                                              f'{what}: one label per image expected'))
    with tf.control_dependencies(checks):
      return tf.identity(labels)

  def _require_classes(self, what):
    if not self.num_classes:
      raise LabelError(f'{self.name}.{what}: the model is not class-conditional (num_classes=0).')

  def _latent_log_prob(self, latent, labels):
    if labels is None:
      return self.distribution.distribution.log_prob(latent)
    return ClassConditionalNormal(labels, self.prior).log_prob(latent)

  def distribution_given(self, labels):
    """`p(x | y)` for `labels` (int, any shape) as a TFP distribution: a `FlowDistribution`
    (`TransformedDistribution(ClassConditionalNormal(labels), Invert(flow))`, the flow
    conditioned on the labels) with batch shape `labels.shape`, reading the current weights at
    every call. `sample()` gives one image per label; `log_prob(x)` takes `x`
    `[*labels.shape, H, W, C]`. Class-conditional models only."""
    self._require_classes('distribution_given')
    labels = tf.convert_to_tensor(labels)
    if not labels.dtype.is_integer:
      raise LabelError(f'{self.name}.distribution_given: labels must be integers, got '
                       f'{labels.dtype.name}.')
    static = tf.get_static_value(labels)
    if static is not None and np.any((static < 0) | (static >= self.num_classes)):
      raise LabelError(f'{self.name}.distribution_given: labels must be in [0, '
                       f'{self.num_classes}).')
    labels = tf.cast(labels, tf.int32)
    return FlowDistribution(ClassConditionalNormal(labels, self.prior), self.flow,
                            labels=labels, name=f'{self.name}_given_labels')

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

  def class_log_prior(self):
    """`log p(y)` `[num_classes]`: the frequencies of the labels `fit` trained on (uniform
    before any)."""
    self._require_classes('class_log_prior')
    return self.prior.log_class_prior()

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

  def class_log_likelihoods(self, images, seed=None):
    """`log p(x | y)` for every class: `[N, num_classes]`, each image dequantized once (the same
    noise for every class; `seed` makes it repeatable)."""
    self._require_classes('class_log_likelihoods')
    pixels = self._pixels(images, 'uniform', seed)
    count = tf.shape(pixels)[0]
    return tf.stack([self.log_prob(pixels, tf.fill([count], k))
                     for k in range(self.num_classes)], axis=-1)

  def marginal_log_prob(self, images, seed=None):
    """`log p(x) = log sum_y p(y) p(x | y)` (the class mixture, `model.distribution`'s density)
    in nats, `[N]`, from `class_log_likelihoods`: the density to score images whose class is
    unknown (e.g. out-of-distribution detection)."""
    return tf.reduce_logsumexp(self.class_log_likelihoods(images, seed) + self.class_log_prior(),
                               axis=-1)

  def predict_proba(self, images, seed=None):
    """The posterior `p(y | x) = p(x | y) p(y) / sum_y' p(x | y') p(y')`, `[N, num_classes]`,
    with `p(y)` from the training labels (`class_log_prior`)."""
    return tf.nn.softmax(self.class_log_likelihoods(images, seed) + self.class_log_prior(), -1)

  def classify(self, images, seed=None):
    """Bayes' classifier: `argmax_y log p(x | y) + log p(y)`, int32 `[N]`."""
    return tf.argmax(self.class_log_likelihoods(images, seed) + self.class_log_prior(), -1,
                     output_type=tf.int32)

  def compile(self, optimizer=None, jit_compile=False, metrics=None, **kwargs):
    """Keras `compile` with the paper's optimizer by default (Adam, global-norm clipping) and
    the `bits_per_dim` metric (lower is better), before any `metrics` given.

    `jit_compile=True` compiles the flow with XLA inside Keras' step, on one replica (Keras'
    own `jit_compile` fails under MirroredStrategy, which `launch.train` uses on one GPU: the
    running averages are assigned after the compiled flow). With `compute_dtype='float16'` the optimizer is
    wrapped in a `LossScaleOptimizer`. The compile arguments are saved with the model
    (`get_compile_config`): a `.keras` file loads compiled, optimizer state and step included,
    and trains on where it stopped.
    """
    given_optimizer = optimizer
    if optimizer is None:
      optimizer = keras.optimizers.Adam(self.config.learning_rate)
    if self.config.compute_dtype == 'float16' and not isinstance(
        optimizer, keras.optimizers.LossScaleOptimizer):
      optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    # Clipped by the global norm of the gradient summed over replicas, after the optimizer's
    # one all-reduce (`global_clipnorm` would clip each replica's part).
    compat.clip_after_all_reduce(optimizer, self.config.clipnorm)
    if jit_compile and self.distribute_strategy.num_replicas_in_sync > 1:
      raise ValueError(
          f'jit_compile=True runs on one replica, not '
          f'{self.distribute_strategy.num_replicas_in_sync} '
          f'({type(self.distribute_strategy).__name__}): compile without jit_compile, or train '
          'on one device.')
    self._flow_forward = (_compiled_with_running_averages_outside(self.flow.forward_and_log_det)
                          if jit_compile else self.flow.forward_and_log_det)
    metrics = list(metrics or [])
    super().compile(optimizer=optimizer, jit_compile=False, metrics=[BitsPerDim(), *metrics],
                    **kwargs)
    inner = given_optimizer.inner_optimizer if isinstance(
        given_optimizer, keras.optimizers.LossScaleOptimizer) else given_optimizer
    self._realnvp_compile_config = {
        'optimizer': None if inner is None else keras.saving.serialize_keras_object(inner),
        'jit_compile': bool(jit_compile),
        'metrics': [keras.saving.serialize_keras_object(m) for m in metrics],
        **{k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str, type(None)))}}
    # Built here, not inside the first traced step: creating variables there makes
    # tf.function trace the whole step twice.
    self.optimizer.build(self.trainable_variables)
    # The metrics too: otherwise Keras builds them under a strategy by calling the model on a
    # symbolic batch of images alone, which a class-conditional model refuses (every layer is
    # built in __init__; the metrics take bits/dim, one per image).
    for metric in self.metrics:  # Keras' container of the compiled metrics
      if hasattr(metric, 'build') and not metric.built:
        metric.build(None, tf.zeros([1], self.config.dtype))

  def get_compile_config(self):
    """What `compile` was given, for `.keras` files (see `compile`)."""
    return getattr(self, '_realnvp_compile_config', None) if self.compiled else None

  def compile_from_config(self, config):
    """Compiles as `get_compile_config` recorded (Keras calls this when loading a `.keras`
    file, then restores the optimizer's variables, step counter included)."""
    config = dict(config)
    optimizer = config.pop('optimizer', None)
    if optimizer is not None:
      optimizer = keras.saving.deserialize_keras_object(optimizer)
    # Files from before this method existed hold Keras' own compile config (loss: None,
    # metrics: None, ...): only what `compile` takes is passed on.
    metrics = [keras.saving.deserialize_keras_object(m)
               for m in config.pop('metrics', None) or []
               if not (isinstance(m, dict) and m.get('class_name') == 'BitsPerDim')]
    kwargs = {k: config[k] for k in ('run_eagerly', 'steps_per_execution')
              if config.get(k) is not None}
    self.compile(optimizer=optimizer, jit_compile=config.get('jit_compile') is True,
                 metrics=metrics, **kwargs)

  # The steps have no control flow on tensors: AutoGraph's conversion of them (0.46 s of a
  # profiled trace of the small MNIST model's step) buys nothing.
  @tf.autograph.experimental.do_not_convert
  def train_step(self, data):
    """Keras' step; the gradient is clipped by the global norm of its sum over replicas, in the
    optimizer's all-reduce (see `compile`)."""
    images, labels = self._images_and_labels(data, 'fit')
    if labels is not None:
      self.prior.count(labels)
    with tf.GradientTape() as tape:
      bits = self(images, labels=labels, training=True)
      loss = self.compute_loss(x=images, y_pred=bits, training=True)
      scaled_loss = self.optimizer.scale_loss(loss)
    variables = self.trainable_variables
    # One all-reduce per step: the optimizer's, which also clips (`compile`).
    self.optimizer.apply_gradients(zip(tape.gradient(scaled_loss, variables), variables))
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    self._loss_metric().update_state(loss * replicas, sample_weight=batch_shape(images)[0])
    return _for_keras_reduction(self.compute_metrics(images, None, bits))

  def _loss_metric(self):
    """Keras' own `loss` metric (the mean loss it reports), from the public `metrics`."""
    return next(metric for metric in self.metrics if metric.name == 'loss')

  def _images_and_labels(self, data, what):
    images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
    if labels is None and isinstance(images, (tuple, list)) and len(images) == 2:
      images, labels = images  # predict((images, labels))
    if self.num_classes and labels is None:
      raise LabelError(f'{self.name}.{what}: this model is class-conditional '
                       f'({self.num_classes} classes): give (images, labels) pairs '
                       '(`fit(images, labels)`, or a dataset of pairs, e.g. TFDS as_supervised).')
    if not self.num_classes and labels is not None:
      raise LabelError(f'{self.name}.{what}: got (images, labels) pairs, but the model is not '
                       'class-conditional (num_classes=0): give images only (e.g. '
                       'dataset.map(lambda x, y: x)), or set num_classes.')
    return images, labels

  @tf.autograph.experimental.do_not_convert
  def test_step(self, data):
    images, labels = self._images_and_labels(data, 'evaluate')
    bits = self(images, labels=labels, training=False)
    loss = self.compute_loss(x=images, y_pred=bits, training=False)
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    self._loss_metric().update_state(loss * replicas, sample_weight=batch_shape(images)[0])
    return _for_keras_reduction(self.compute_metrics(images, None, bits))

  @tf.autograph.experimental.do_not_convert
  def predict_step(self, data):
    images, labels = self._images_and_labels(data, 'predict')
    return self(images, labels=labels, training=False)

  def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
    """Mean bits/dim of the batch plus the L2 decay, scaled for the replicas' gradient sum."""
    loss = tf.reduce_mean(y_pred)
    decay = self.losses  # each access builds them: once
    if decay:
      loss += tf.add_n(decay)
    # Replicas' gradients are summed; Keras unscales the reported loss the same way.
    return loss / tf.distribute.get_strategy().num_replicas_in_sync

  def get_config(self):
    return {'config': self.config.to_dict(), 'name': self.name}

  @classmethod
  def from_config(cls, config):
    return cls(presets.RealNVPConfig.from_dict(config['config']), name=config.get('name'))
