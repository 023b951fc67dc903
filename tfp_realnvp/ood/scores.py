"""Out-of-distribution scores of a trained model, each "higher = more anomalous".

  scorer = OODScorer(model, background=None).fit(held_out_in_distribution_images)
  scores = scorer.score(images, ['bits_per_dim', 'complexity', 'fitted'])   # {name: [N]}

Methods (`bpd` = bits/dim under the model, `D` the image's dimensions):
- `bits_per_dim`: `bpd(x)`; fails on images simpler than the training data (Nalisnick et al.,
  ICLR 2019).
- `levels`: each level's share of `bpd(x)` (`level_bits_per_dim`), a score per column:
  `preprocessing`, `level_0`, ... (Schirrmeister et al., NeurIPS 2020).
- `complexity`: `bpd(x) - L(x) / D`, `L` the bits of a lossless compressor (Serra et al., ICLR
  2020).
- `likelihood_ratio`: `bpd(x) - bpd_bg(x)`, `bpd_bg` under a background model (Ren et al., NeurIPS
  2019): the same architecture trained on perturbed training images (`launch.train
  --background_noise`), or any model of more general images.
- `typicality`: `|bpd(x) - H|`, `H` the mean bits/dim of held-out in-distribution images (Nalisnick
  et al., 2019); `typicality_test` is its test for a batch.
- `fitted`: the Mahalanobis distance of the features `[levels..., L(x) / D]` from a Gaussian fitted
  to those of held-out in-distribution images (in the spirit of DoSE, Morningstar et al., 2021).

A class-conditional model scores the class mixture `p(x) = sum_y p(y) p(x | y)`
(`marginal_log_prob`); its per-level scores are not defined (the latent's Gaussian depends on the
label).
"""

import math

import numpy as np
import tensorflow as tf

from tfp_realnvp.ood.complexity import compressed_bits_per_dim
from tfp_realnvp.ood.levels import level_bits_per_dim, level_names

METHODS = ('bits_per_dim', 'levels', 'complexity', 'likelihood_ratio', 'typicality', 'fitted')
NEEDS_BACKGROUND = ('likelihood_ratio',)
NEEDS_FIT = ('typicality', 'fitted')


def check_methods(methods, model=None, background=None):
  """The methods as a list, or a ValueError naming the first that is unknown or cannot run."""
  methods = [methods] if isinstance(methods, str) else list(methods)
  if not methods:
    raise ValueError(f'No score method given; choose from {", ".join(METHODS)}.')
  for method in methods:
    if method not in METHODS:
      raise ValueError(f'Unknown score method {method!r}; choose from {", ".join(METHODS)}.')
    if method in NEEDS_BACKGROUND and background is None:
      raise ValueError(f'{method} needs a background model (launch: --background_workdir; a run '
                       'trained with --background_noise).')
    if model is not None and method in ('levels', 'fitted'):
      if model.num_classes:
        raise ValueError(f'{method} scores are per level of an unconditional model; this one is '
                         f'class-conditional ({model.num_classes} classes).')
      if model.config.num_scales < 2:
        raise ValueError(f'{method} scores need a model with levels (num_scales >= 2); this one '
                         'has one scale.')
  return methods


class OODScorer:
  """Out-of-distribution scores of `model` (see the module docstring), streamed over batches.

  Args:
    model: a trained `RealNVP`.
    background: a second `RealNVP` of the same image shape, for `likelihood_ratio`.
    compressor: 'png', 'webp' or 'best', for `complexity` and `fitted`.
    batch_size: images per model call.
    seed: the dequantization noise's seed (repeatable scores).
  """

  def __init__(self, model, background=None, compressor='png', batch_size=256, seed=0):
    if background is not None and tuple(background.image_shape) != tuple(model.image_shape):
      raise ValueError(f'The background model is of images {list(background.image_shape)}, the '
                       f'model of {list(model.image_shape)}: train it on the same images.')
    self.model, self.background = model, background
    self.compressor, self.batch_size, self.seed = compressor, batch_size, seed
    self.typical_bits_per_dim = None
    self._held_out_bits = self._gaussian = None
    self._functions = {}

  # -- per-image quantities, batched ---------------------------------------------------------------

  def _traced(self, name, fn, images):
    key = (name, images.dtype)
    if key not in self._functions:
      spec = tf.TensorSpec([None, *self.model.image_shape], images.dtype)
      self._functions[key] = tf.function(fn, input_signature=[spec, tf.TensorSpec([], tf.int64)])
    return self._functions[key]

  def _per_image(self, name, fn, images):
    """`fn(images, seed)` over `images` in batches (one trace; each batch seeded by its index, as
    `evaluate_bits_per_dim` does), concatenated as numpy."""
    images = self._checked(images)
    traced = self._traced(name, fn, images)
    out = [traced(tf.constant(images[i:i + self.batch_size]),
                  tf.constant(self.seed * 1_000_003 + i // self.batch_size + 1, tf.int64)).numpy()
           for i in range(0, len(images), self.batch_size)]
    return np.concatenate(out).astype(np.float64)

  def _checked(self, images):
    images = np.asarray(images)
    shape = tuple(self.model.image_shape)
    if images.ndim != 4 or images.shape[1:] != shape:
      raise ValueError(f'Expected images [N, {", ".join(map(str, shape))}], got '
                       f'{list(images.shape)}.')
    if not len(images):
      raise ValueError('No images to score (an empty set).')
    return images

  @staticmethod
  def _bits(model):
    num_dims = math.prod(model.image_shape)
    if model.num_classes:
      return lambda x, seed: -model.marginal_log_prob(x, seed) / (num_dims * math.log(2.))
    return lambda x, seed: model.bits_per_dim(x, seed=seed)

  def bits_per_dim(self, images):
    """`[N]` bits/dim under the model (the class mixture for a class-conditional one)."""
    return self._per_image('bits', self._bits(self.model), images)

  def background_bits_per_dim(self, images):
    if self.background is None:
      raise ValueError('No background model given.')
    return self._per_image('background', self._bits(self.background), images)

  def level_bits_per_dim(self, images):
    """`[N, 1 + num_scales]`: the levels' shares of bits/dim (`level_names` columns)."""
    return self._per_image('levels', lambda x, seed: level_bits_per_dim(self.model, x, seed),
                           images)

  def compressed_bits_per_dim(self, images):
    return compressed_bits_per_dim(self._checked(images), self.compressor)

  def features(self, images):
    """`[N, F]`: the per-level bits/dim and the compressor's bits/dim (the `fitted` score's)."""
    return np.concatenate([self.level_bits_per_dim(images),
                           self.compressed_bits_per_dim(images)[:, None]], axis=-1)

  # -- fitting on held-out in-distribution images ---------------------------------------------------

  def fit(self, held_out, methods=None):
    """Fits `typicality` (the mean bits/dim `H` of `held_out`, in-distribution images the model
    did not train on) and `fitted` (a Gaussian over their features); returns self. `methods`:
    those of the two to fit (default: each that the model allows: `fitted` needs levels)."""
    if methods is None:
      methods = [m for m in NEEDS_FIT if m == 'typicality' or
                 (not self.model.num_classes and self.model.config.num_scales > 1)]
    methods = [m for m in check_methods(methods, self.model, self.background) if m in NEEDS_FIT]
    if 'typicality' in methods:
      self._held_out_bits = self.bits_per_dim(held_out)
      self.typical_bits_per_dim = float(np.mean(self._held_out_bits))
    if 'fitted' in methods:
      from sklearn.covariance import EmpiricalCovariance  # pylint: disable=import-outside-toplevel
      features = self.features(held_out)
      if len(features) <= features.shape[1]:
        raise ValueError(f'fitted: {len(features)} held-out images for {features.shape[1]} '
                         'features; give more.')
      self._gaussian = EmpiricalCovariance().fit(features)
    return self

  def typicality_test(self, batch_bits_per_dim, batch_size=None, false_alarm=0.01, draws=1000,
                      seed=0):
    """Nalisnick et al.'s test for a batch: `(statistic, threshold)`, the batch is flagged as
    out-of-distribution when `statistic > threshold`. `statistic = |mean(batch) - H|`; the
    threshold is the `1 - false_alarm` quantile of the statistic over `draws` bootstrap batches of
    the held-out images' bits/dim (of the batch's size, or `batch_size`)."""
    if self._held_out_bits is None:
      raise ValueError('typicality_test needs fit() on held-out in-distribution images first.')
    batch = np.asarray(batch_bits_per_dim, np.float64)
    size = batch_size or len(batch)
    rng = np.random.default_rng(seed)
    boot = rng.choice(self._held_out_bits, (draws, size), replace=True).mean(-1)
    threshold = float(np.quantile(np.abs(boot - self.typical_bits_per_dim), 1 - false_alarm))
    return float(abs(batch.mean() - self.typical_bits_per_dim)), threshold

  # -- the scores -----------------------------------------------------------------------------------

  def score(self, images, methods=('bits_per_dim',)):
    """`{name: [N] float64}`, higher = more anomalous: a name per method, and a name per
    column for `levels` (`preprocessing`, `level_0`, ...). Each quantity is computed once."""
    methods = check_methods(methods, self.model, self.background)
    for method, fitted in (('typicality', self._held_out_bits), ('fitted', self._gaussian)):
      if method in methods and fitted is None:
        raise ValueError(f'{method} needs held-out in-distribution images: fit(held_out) first '
                         'with it among the methods.')
    cache = {}

    def get(name, fn):
      if name not in cache:
        cache[name] = fn(images)
      return cache[name]

    bits = lambda: get('bits', self.bits_per_dim)  # noqa: E731
    compressed = lambda: get('compressed', self.compressed_bits_per_dim)  # noqa: E731
    levels = lambda: get('levels', self.level_bits_per_dim)  # noqa: E731
    scores = {}
    for method in methods:
      if method == 'bits_per_dim':
        scores[method] = bits()
      elif method == 'levels':
        scores.update(zip(level_names(self.model.config.num_scales), levels().T))
      elif method == 'complexity':
        scores[method] = bits() - compressed()
      elif method == 'likelihood_ratio':
        scores[method] = bits() - get('background', self.background_bits_per_dim)
      elif method == 'typicality':
        scores[method] = np.abs(bits() - self.typical_bits_per_dim)
      elif method == 'fitted':
        features = np.concatenate([levels(), compressed()[:, None]], axis=-1)
        scores[method] = self._gaussian.mahalanobis(features)
    return scores
