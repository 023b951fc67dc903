"""Class conditioning: Glow's class-conditional prior on Real NVP's factored-out latent.

`p(x | y) = N(flow(x, y); mu_y, sigma_y) |det d flow(x, y) / dx|`: the label `y` changes the
coupling networks' `s` and `t` (`CouplingNet(num_classes=...)`) and the Gaussian on the latent,
never the log-det's form. The Gaussian has a learned mean and log-scale per class for each channel
of each factored-out part (`latent_groups`), the same at every pixel of that part.
"""

import math

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_realnvp.bijectors.base import _KerasVariables
from tfp_realnvp.distribution import FlowDistribution

tfd = tfp.distributions


class LabelError(ValueError):
  """Labels that do not fit the model: missing, unexpected, out of range or of the wrong shape."""


class ClassConditionalPrior(keras.layers.Layer):
  """The learned parameters of `p(z | y)` and the class prior `p(y)`.

  - `loc`, `log_scale`: `[num_classes, G]`, one value per class and latent group (`groups`, an
    int array `[H, W, C]` of group indices, e.g. `latent_groups(...)`); zero at first, so the
    prior starts as the unit Gaussian for every class.
  - `class_counts`: `[num_classes]`, the training labels seen (`count`), not trained; `p(y)` is
    their frequencies (uniform before any). Under `tf.distribute`, the global batch's.
  """

  def __init__(self, num_classes, groups, **kwargs):
    super().__init__(**kwargs)
    if num_classes < 1:
      raise ValueError(f'ClassConditionalPrior: num_classes must be >= 1, got {num_classes}.')
    self.num_classes = int(num_classes)
    self.groups = np.asarray(groups, np.int32)
    num_groups = int(self.groups.max()) + 1
    self.loc = self.add_weight(shape=(self.num_classes, num_groups), name='loc',
                               initializer='zeros')
    self.log_scale = self.add_weight(shape=(self.num_classes, num_groups), name='log_scale',
                                     initializer='zeros')
    self.class_counts = self.add_weight(shape=(self.num_classes,), name='class_counts',
                                        initializer='zeros', trainable=False,
                                        aggregation='only_first_replica')
    self.built = True  # every weight is made here

  def loc_and_log_scale(self, labels):
    """`(mu_y, log sigma_y)`, each `[*labels.shape, H, W, C]`."""
    loc, log_scale = (tf.gather(tf.gather(tf.convert_to_tensor(v), labels), self.groups, axis=-1)
                      for v in (self.loc, self.log_scale))
    return loc, log_scale

  def log_class_prior(self):
    """`log p(y)`, `[num_classes]`: the training labels' frequencies (uniform before any)."""
    counts = tf.convert_to_tensor(self.class_counts)
    total = tf.reduce_sum(counts)
    return tf.where(total > 0, tf.math.log(counts) - tf.math.log(total),
                    -math.log(self.num_classes) * tf.ones_like(counts))

  def count(self, labels):
    """Adds a batch of training labels to `class_counts` (in a replica: the global batch's)."""
    counts = tf.math.bincount(tf.cast(tf.reshape(labels, [-1]), tf.int32),
                              minlength=self.num_classes, maxlength=self.num_classes,
                              dtype=self.class_counts.dtype)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
      counts = context.all_reduce(tf.distribute.ReduceOp.SUM, counts)
    self.class_counts.assign_add(counts)


class ClassConditionalNormal(tfd.AutoCompositeTensorDistribution):
  """`N(mu_y, diag(sigma_y^2))` on `[H, W, C]` latents for the classes `labels` (batch shape
  `labels.shape`), from a `ClassConditionalPrior`'s variables, read at each call (never stale):

    log p(z | y) = sum_i -((z_i - mu_y,g(i)) / sigma_y,g(i))^2 / 2 - log sigma_y,g(i) - log(2 pi) / 2

  with `g(i)` the latent group of element `i`. `trainable_variables` are the prior's `loc` and
  `log_scale`. A `CompositeTensor`, as TFP's distributions (through `tf.nest`, into a
  `tf.function`); `prior_variables` is not an input (see `FlowDistribution`'s `flow_variables`):
  it puts the prior's `tf.Variable`s in the type spec, what TFP passes back is only handed back,
  and the prior's own variables are always read.
  """

  def __init__(self, labels, prior, validate_args=False, allow_nan_stats=True,
               name='class_conditional_normal', prior_variables=None):
    parameters = dict(locals())
    del parameters['prior_variables']  # not a parameter (see the class docstring)
    self._given_prior_variables = None if prior_variables is None else lambda: prior_variables
    with tf.name_scope(name) as name:
      self._labels = tf.convert_to_tensor(labels, tf.int32, name='labels')
      self._prior = prior
      self._keras_variables = _KerasVariables(lambda: [prior])  # tf.Module sees the variables
      super().__init__(dtype=tf.as_dtype(prior.variable_dtype),
                       reparameterization_type=tfd.FULLY_REPARAMETERIZED,
                       validate_args=validate_args, allow_nan_stats=allow_nan_stats,
                       parameters=parameters, name=name)

  @classmethod
  def _parameter_properties(cls, dtype, num_classes=None):
    return dict(labels=tfp.util.ParameterProperties(event_ndims=0, is_preferred=False))

  @property
  def labels(self):
    return self._labels

  @property
  def prior(self):
    return self._prior

  @property
  def prior_variables(self):
    """The prior's `tf.Variable`s: the type spec's part (as TFP passed it back, if it did)."""
    if self._given_prior_variables is not None:
      return self._given_prior_variables()
    return tuple(getattr(v, 'value', v) for v in self._prior.weights)

  def _event_shape(self):
    return tf.TensorShape(self._prior.groups.shape)

  def _event_shape_tensor(self):
    return tf.constant(self._prior.groups.shape, tf.int32)

  def _batch_shape(self):
    return self._labels.shape

  def _batch_shape_tensor(self):
    return tf.shape(self._labels)

  def _log_prob(self, z):
    loc, log_scale = self._prior.loc_and_log_scale(self._labels)
    standard = (z - loc) * tf.exp(-log_scale)
    return tf.reduce_sum(-0.5 * tf.square(standard) - log_scale - 0.5 * math.log(2 * math.pi),
                         axis=[-3, -2, -1])

  def _sample_n(self, n, seed=None):
    loc, log_scale = self._prior.loc_and_log_scale(self._labels)
    noise = tf.random.stateless_normal(tf.concat([[n], tf.shape(loc)], 0),
                                       tfp.random.sanitize_seed(seed), dtype=self.dtype)
    return loc + tf.exp(log_scale) * noise

  def _mean(self):
    return self._prior.loc_and_log_scale(self._labels)[0]

  def _stddev(self):
    return tf.exp(self._prior.loc_and_log_scale(self._labels)[1])

  def _mode(self):
    return self._mean()


class ClassConditionalMethods:
  """`RealNVP`'s class-conditional API (a mixin; `num_classes > 0`): labels checked against the
  model, `p(x | y)` as a TFP distribution, the class prior, Bayes' classifier."""

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

  def class_log_prior(self):
    """`log p(y)` `[num_classes]`: the frequencies of the labels `fit` trained on (uniform
    before any)."""
    self._require_classes('class_log_prior')
    return self.prior.log_class_prior()

  def class_log_likelihoods(self, images, seed=None):
    """`log p(x | y)` for every class: `[N, num_classes]`, each image dequantized once (the same
    noise for every class; `seed` makes it repeatable). The classes one after another through
    one copy of the flow (`tf.map_fn`): a traced function holds the flow once, not once per
    class (the first call of a 10-class `mnist` model took 5 s instead of 21 s), and only one
    class's activations are alive at a time."""
    self._require_classes('class_log_likelihoods')
    pixels = self._pixels(images, 'uniform', seed)
    count = tf.shape(pixels)[0]
    per_class = tf.map_fn(lambda k: self.log_prob(pixels, tf.fill([count], k)),
                          tf.range(self.num_classes), fn_output_signature=pixels.dtype,
                          parallel_iterations=1)
    return tf.transpose(per_class)

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
