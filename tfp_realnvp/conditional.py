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


class ClassConditionalNormal(tfd.Distribution):
  """`N(mu_y, diag(sigma_y^2))` on `[H, W, C]` latents for the classes `labels` (batch shape
  `labels.shape`), from a `ClassConditionalPrior`'s variables, read at each call (never stale):

    log p(z | y) = sum_i -((z_i - mu_y,g(i)) / sigma_y,g(i))^2 / 2 - log sigma_y,g(i) - log(2 pi) / 2

  with `g(i)` the latent group of element `i`. `trainable_variables` are the prior's `loc` and
  `log_scale`.
  """

  def __init__(self, labels, prior, validate_args=False, allow_nan_stats=True,
               name='class_conditional_normal'):
    parameters = dict(locals())
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
