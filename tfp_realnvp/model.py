"""`RealNVP`: the Keras model that owns the flow's variables and trains on bits/dim."""

import math
import numbers

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_realnvp import optimizers, presets
from tfp_realnvp.bijectors.actnorm import ActNorm, ActNormParameters, data_dependent_init
from tfp_realnvp.bijectors.batch_norm import BatchStatistics
from tfp_realnvp.bijectors.invertible_conv import Invertible1x1Conv, LUWeights
from tfp_realnvp.bijectors.multiscale import multiscale_flow
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


def _first_images(x, batch_size):
  """The images of `fit`'s first batch of `x` (a dataset or iterable of batches, images first
  when they come with labels; or an array of images, `batch_size` (Keras: 32) of them)."""
  if hasattr(x, 'shape') and not isinstance(x, tf.data.Dataset):
    return x[:batch_size or 32]
  try:
    first = next(iter(x))
  except (TypeError, StopIteration) as e:
    raise ValueError(f'RealNVP.fit: cannot take a first batch of images from {type(x).__name__} '
                     'to initialise ActNorm from; call model.initialize_from_data(images) first.'
                     ) from e
  return keras.utils.unpack_x_y_sample_weight(first)[0]


@keras.saving.register_keras_serializable(package='tfp_realnvp')
class BitsPerDim(keras.metrics.Mean):
  """Mean bits/dim of the model's outputs (`y_pred`; there are no targets). Lower is better, so
  Keras callbacks monitoring `bits_per_dim` / `val_bits_per_dim` (`EarlyStopping`,
  `ModelCheckpoint(save_best_only=True)`, `ReduceLROnPlateau`) work in `mode='auto'`."""

  def __init__(self, name='bits_per_dim', dtype=None):
    super().__init__(name=name, dtype=dtype)
    self._direction = 'down'  # what Keras' monitor callbacks read

  def update_state(self, y_true, y_pred, sample_weight=None):
    del y_true
    return super().update_state(y_pred, sample_weight)


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
    self.distribution = FlowDistribution(
        tfd.Sample(tfd.Normal(tf.zeros([], dtype), tf.ones([], dtype)), config.image_shape),
        self.flow, name=self.name)
    self._num_dims = math.prod(config.image_shape)
    self._flow_forward = self.flow.forward_and_log_det
    self(tf.fill([1, *config.image_shape], tf.constant(128., dtype)))  # creates every variable

  def _coupling_network(self, event_shape, scale, kind):
    filters = self.config.num_filters
    if self.config.layout == 'real_nvp':  # the paper doubles them per scale, and for channels
      filters *= 2 ** scale * (2 if kind == 'channel' else 1)
    policy = (f'mixed_{self.config.compute_dtype}' if self.config.compute_dtype
              else self.config.dtype)
    return CouplingNet(event_shape[-1], filters, self.config.num_blocks, l2=self.config.l2,
                       momentum=self.config.batch_norm_momentum, recompute=self.config.recompute,
                       synchronized=self.config.sync_batch_norm, kind=self.config.network,
                       dtype=policy)

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

  def initialize_from_data(self, images):
    """Glow's data-dependent initialisation: one training-mode pass over `images` (a global
    batch) sets every `ActNorm` not yet set so that its output has zero mean and unit variance
    per channel. Under the model's `tf.distribute` strategy the batch is split over the
    replicas and the statistics are of the whole batch. `fit` calls it on its first batch when
    `needs_data_initialization()`; a restored checkpoint keeps the flag, so a resumed run does
    not initialise again. (The networks' batch-norm running averages see this batch too.)"""
    images = tf.convert_to_tensor(images)
    strategy = self.distribute_strategy
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(int(images.shape[0]))
    options = tf.data.Options()  # every worker takes the whole batch (duplicates keep the moments)
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    batch = next(iter(strategy.experimental_distribute_dataset(dataset.with_options(options))))

    def replica(images):
      with data_dependent_init():
        self(images, training=True)
    tf.function(lambda batch: strategy.run(replica, args=(batch,)))(batch)

  def fit(self, x=None, y=None, batch_size=None, *args, **kwargs):
    """Keras `fit`; a model with `ActNorm` not yet set from data is first set from the first
    batch of `x` (`initialize_from_data`)."""
    if self.needs_data_initialization():
      self.initialize_from_data(_first_images(x, batch_size))
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

  def log_prob(self, images, training=False, seed=None):
    """log p(x) in nats, one pass through the flow; the density lives on the logit
    preprocessing's domain (see the class docstring), the same as `model.distribution`'s.

    uint8 images are dequantized with U[0, 1) noise (`seed` makes it repeatable).
    """
    pixels = self._pixels(images, 'uniform', seed)
    latent, log_det = self._flow_forward(pixels, training=training)
    return self.distribution.distribution.log_prob(latent) + log_det

  def bits_per_dim(self, images, training=False, seed=None):
    """-log p(x) / (D ln 2): the paper's bits/dim, per image."""
    return -self.log_prob(images, training, seed) / (self._num_dims * math.log(2.))

  def call(self, images, training=False):
    return self.bits_per_dim(images, training=training)

  def encode(self, images, training=False):
    """The image-shaped latent `z = flow(x)`; uint8 images are taken at their pixel centres."""
    return self.flow.forward_and_log_det(self._pixels(images, 'centre'), training)[0]

  def decode(self, latent):
    """Pixels `x = flow^-1(z)` (floats, about [0, 256); `to_uint8` makes images)."""
    return self.flow.inverse_and_log_det(latent)[0]

  def sample(self, num_samples, temperature=1.0, seed=None):
    """`num_samples` images (float pixels) from latents `z ~ N(0, temperature^2 I)`;
    `temperature` a finite number >= 0 (0: the latent's mode, the image of z = 0)."""
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
    return self.decode(temperature * latent)

  def compile(self, optimizer=None, jit_compile=False, metrics=None, **kwargs):
    """Keras `compile` with the paper's optimizer by default (Adam, global-norm clipping) and
    the `bits_per_dim` metric (lower is better), before any `metrics` given.

    `jit_compile=True` compiles the flow with XLA inside Keras' step (Keras' own
    `jit_compile` fails under MirroredStrategy). With `compute_dtype='float16'` the optimizer is
    wrapped in a `LossScaleOptimizer`. The compile arguments are saved with the model
    (`get_compile_config`): a `.keras` file loads compiled, optimizer state and step included,
    and trains on where it stopped.
    """
    given_optimizer = optimizer
    if optimizer is None:
      optimizer = optimizers.Adam(self.config.learning_rate)
    if self.config.compute_dtype == 'float16' and not isinstance(
        optimizer, keras.optimizers.LossScaleOptimizer):
      optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    # Clipped by the global norm of the gradient summed over replicas, after the optimizer's
    # one all-reduce (`global_clipnorm` would clip each replica's part).
    optimizers.clip_after_all_reduce(optimizer, self.config.clipnorm)
    self._flow_forward = (tf.function(self.flow.forward_and_log_det, jit_compile=True)
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

  def train_step(self, data):
    """Keras' step; the gradient is clipped by the global norm of its sum over replicas, in the
    optimizer's all-reduce (see `compile`)."""
    images, _, _ = keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
      bits = self(images, training=True)
      loss = self.compute_loss(x=images, y_pred=bits, training=True)
      scaled_loss = self.optimizer.scale_loss(loss)
    variables = self.trainable_variables
    # One all-reduce per step: the optimizer's, which also clips (`compile`).
    self.optimizer.apply_gradients(zip(tape.gradient(scaled_loss, variables), variables))
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    self._loss_tracker.update_state(loss * replicas, sample_weight=tf.shape(images)[0])
    return _for_keras_reduction(self.compute_metrics(images, None, bits))

  def test_step(self, data):
    return _for_keras_reduction(super().test_step(data))

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
