"""Keras' side of `RealNVP`: compile (the paper's optimizer and clipping), the train, test and
predict steps on bits/dim, the compile config saved in `.keras` files, the `bits_per_dim`
metric, XLA for the flow, and Glow's data-dependent ActNorm initialisation before `fit`."""

import contextlib
import warnings

import keras
import tensorflow as tf

from tfp_realnvp import compat
from tfp_realnvp.bijectors.actnorm import ActNormParameters, data_dependent_init, initializing
from tfp_realnvp.bijectors.base import batch_shape
from tfp_realnvp.bijectors.batch_norm import as_bits, assign_running_average, deferred_running_averages
from tfp_realnvp.conditional import LabelError


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


# Grappler's passes that changed no node of the training step's graphs on CPUs (TF's log,
# `TF_CPP_VMODULE=meta_optimizer=1`, before issue 26), the layout optimizer and the remapper
# among them (its convolution-bias fusion oneDNN makes anyway). Measured on CPUs only: on a
# machine with a GPU, `fit` keeps TF's options.
LIGHTER_PASSES = ('loop_optimization', 'function_optimization', 'implementation_selector',
                  'constant_folding', 'shape_optimization', 'layout_optimizer', 'remapping')
LIGHTER_GRAPH_OPTIMIZATION = True  # False: `fit` keeps TF's options (set before `fit`)


@contextlib.contextmanager
def lighter_graph_optimization():
  """Inside, on a machine without GPUs, TF optimizes the graphs it instantiates without grappler's
  passes that change nothing in a training step (`LIGHTER_PASSES`); a pass the user set
  (`tf.config.optimizer.set_experimental_options`) is kept as set, and afterwards the others are
  at TF's defaults again. `fit` runs inside this (`LIGHTER_GRAPH_OPTIMIZATION`). TF's options are
  process-wide: a function another thread first runs meanwhile gets them too. Measured:
  docs/design.md."""
  if not LIGHTER_GRAPH_OPTIMIZATION or tf.config.list_logical_devices('GPU'):
    yield
    return
  user_set = tf.config.optimizer.get_experimental_options()
  turned_off = [name for name in LIGHTER_PASSES if user_set.get(name) is None]
  tf.config.optimizer.set_experimental_options({name: False for name in turned_off})
  try:
    yield
  finally:  # None: TF's default again (not ON, which on CPUs is not the same for every pass)
    tf.config.optimizer.set_experimental_options({name: None for name in turned_off})


class KerasTraining:
  """`RealNVP`'s Keras methods (a mixin of `keras.Model`; see `RealNVP`)."""

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
    batch of `x` (`initialize_from_data`). TF optimizes the step's graphs without grappler's
    passes that change nothing there (`lighter_graph_optimization`)."""
    if self.needs_data_initialization():
      self.initialize_from_data(*_first_batch(x, y, batch_size))
    with lighter_graph_optimization():
      return super().fit(x, y, batch_size, *args, **kwargs)

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
      optimizer = compat.Adam(self.config.learning_rate)
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
    jit_compile = config.get('jit_compile') is True
    replicas = self.distribute_strategy.num_replicas_in_sync
    if jit_compile and replicas > 1:  # XLA runs on one replica: the file still loads
      warnings.warn(f'{self.name}: compiled without jit_compile, which the file asks for: XLA '
                    f'runs on one replica, not {replicas}.', stacklevel=2)
      jit_compile = False
    self.compile(optimizer=optimizer, jit_compile=jit_compile, metrics=metrics, **kwargs)

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
