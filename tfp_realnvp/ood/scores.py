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
  2019): a model of the training images' local statistics only (one scale, one small block),
  trained on perturbed images (`launch.train --background_noise=0.2`) for a ratio never worse
  than chance (docs/ood.md); the same architecture trained so; or any model of more general
  images.
- `typicality`: `|bpd(x) - H|`, `H` the mean bits/dim of held-out in-distribution images (Nalisnick
  et al., 2019); `typicality_test` is its test for a batch.
- `fitted`: the Mahalanobis distance of the features `[levels..., L(x) / D]` from a Gaussian fitted
  to those of held-out in-distribution images (in the spirit of DoSE, Morningstar et al., 2021).
- `combined`: `-log10 p(x)`, `p(x)` the Bonferroni combination `min(1, k min_j p_j(x))` of the
  conformal p-values `p_j(x) = (1 + #{held-out i: s_j(i) >= s_j(x)}) / (n + 1)` of `k` scores
  `s_j` (default: `typicality`, and `likelihood_ratio` with a background model) against `n`
  held-out in-distribution images. Each score catches another kind of outlier (typicality:
  too likely or too unlikely; the ratio against a model of local pixel statistics: likely for
  local reasons only), and `p(x) < alpha` flags at most a fraction `alpha` of in-distribution
  images (as far as they are exchangeable with the held-out ones).

A class-conditional model scores the class mixture `p(x) = sum_y p(y) p(x | y)`
(`marginal_log_prob`); its per-level scores are not defined (the latent's Gaussian depends on the
label).
"""

import math

import numpy as np
import tensorflow as tf

from tfp_realnvp.ood.complexity import compressed_bits_per_dim
from tfp_realnvp.ood.levels import level_bits_per_dim, level_names

METHODS = ('bits_per_dim', 'levels', 'complexity', 'likelihood_ratio', 'typicality', 'fitted',
           'combined')
NEEDS_BACKGROUND = ('likelihood_ratio',)
NEEDS_FIT = ('typicality', 'fitted', 'combined')
# The per-image quantities each single-valued method is computed from (`combined`: its parts').
QUANTITIES = {'bits_per_dim': ('bits',), 'levels': ('levels',), 'complexity': ('bits', 'compressed'),
              'likelihood_ratio': ('bits', 'background'), 'typicality': ('bits',),
              'fitted': ('levels', 'compressed')}


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

  Images are uint8 arrays `[N, H, W, C]` or a `tf.data.Dataset` of images (or of `(image,
  label)` pairs: the labels are ignored), single or batched: one pass over them computes every
  quantity the methods need. A model built under a `tf.distribute` strategy with several
  replicas scores each batch split across them (`model.distribute_strategy`).

  Args:
    model: a trained `RealNVP`.
    background: a second `RealNVP` of the same image shape, for `likelihood_ratio`.
    compressor: 'png', 'webp' or 'best', for `complexity` and `fitted`.
    batch_size: images per model call (of a dataset of single images too).
    seed: the dequantization noise's seed (repeatable scores).
    combine: the methods `combined` combines (default: `typicality`, and `likelihood_ratio`
      when a background model is given).
  """

  def __init__(self, model, background=None, compressor='png', batch_size=256, seed=0,
               combine=None):
    if background is not None and tuple(background.image_shape) != tuple(model.image_shape):
      raise ValueError(f'The background model is of images {list(background.image_shape)}, the '
                       f'model of {list(model.image_shape)}: train it on the same images.')
    self.model, self.background = model, background
    self.compressor, self.batch_size, self.seed = compressor, batch_size, seed
    if combine is None:
      combine = ['typicality'] + (['likelihood_ratio'] if background is not None else [])
    combine = check_methods(combine, model, background)
    for method in combine:
      if method not in QUANTITIES or method == 'levels':
        raise ValueError(f'combined combines single scores, not {method!r}; choose from '
                         f'{", ".join(m for m in QUANTITIES if m != "levels")}.')
    self.combine = tuple(combine)
    self.typical_bits_per_dim = None
    self._held_out_bits = self._gaussian = self._held_out_scores = None
    self._functions = {}

  # -- per-image quantities, batched ---------------------------------------------------------------

  def _function(self, name, dtype):
    """The quantity `name` of a batch `(images, seed) -> [B, ...]`, traced once for any batch
    size; on each replica of the model's strategy when it has several."""
    key = (name, dtype)
    if key in self._functions:
      return self._functions[key]
    fn = {'bits': self._bits(self.model), 'background': self._bits(self.background),
          'levels': lambda x, seed: level_bits_per_dim(self.model, x, seed)}[name]
    strategy = self.model.distribute_strategy
    replicas = strategy.num_replicas_in_sync
    spec = [tf.TensorSpec([None, *self.model.image_shape], dtype), tf.TensorSpec([], tf.int64)]
    if replicas == 1:
      traced = tf.function(fn, input_signature=spec)
      run = lambda images, seed: traced(images, seed).numpy()  # noqa: E731
    else:
      traced = tf.function(lambda images, seed: strategy.run(fn, args=(images, seed)))

      def run(images, seed):  # the batch split in order, one part per replica
        parts = tf.split(images, _split_sizes(len(images), replicas))
        inputs = strategy.experimental_distribute_values_from_function(
            lambda context: parts[context.replica_id_in_sync_group])
        outputs = strategy.experimental_local_results(traced(inputs, seed))
        return np.concatenate([output.numpy() for output in outputs])
    self._functions[key] = run
    return run

  def _batches(self, images):
    """The batches of `images` (an array or a `tf.data.Dataset`) as uint8 tensors, checked."""
    shape = tuple(self.model.image_shape)
    if isinstance(images, tf.data.Dataset):
      spec = images.element_spec
      if isinstance(spec, tuple):
        images, spec = images.map(lambda image, *_: image), spec[0]
      if spec.shape.rank == 3:
        images = images.batch(self.batch_size)
      if spec.shape.rank not in (3, 4) or tuple(spec.shape[-3:]) != shape:
        raise ValueError(f'Expected a dataset of images {list(shape)} (single or batched), got '
                         f'elements of {spec.shape}.')
      yield from images
      return
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != shape:
      raise ValueError(f'Expected images [N, {", ".join(map(str, shape))}], got '
                       f'{list(images.shape)}.')
    for start in range(0, len(images), self.batch_size):
      yield tf.constant(images[start:start + self.batch_size])

  def quantities(self, images, names):
    """`{name: [N] or [N, L] float64}` of the per-image quantities `names` over `images`, in one
    pass over their batches (each batch's noise seeded by its index, as `evaluate_bits_per_dim`
    does): 'bits' (bits/dim), 'background' (under the background model), 'levels' (the levels'
    shares of bits/dim), 'compressed' (the compressor's bits/dim)."""
    names = list(dict.fromkeys(names))
    if 'background' in names and self.background is None:
      raise ValueError('No background model given.')
    out = {name: [] for name in names}
    for index, batch in enumerate(self._batches(images)):
      seed = tf.constant(self.seed * 1_000_003 + index + 1, tf.int64)
      for name in names:
        out[name].append(compressed_bits_per_dim(batch.numpy(), self.compressor)
                         if name == 'compressed' else
                         self._function(name, batch.dtype)(batch, seed))
    if not out or not out[names[0]] or not sum(len(v) for v in out[names[0]]):
      raise ValueError('No images to score (an empty set).')
    return {name: np.concatenate(values).astype(np.float64) for name, values in out.items()}

  @staticmethod
  def _bits(model):
    if model is None:
      return None
    num_dims = math.prod(model.image_shape)
    if model.num_classes:
      return lambda x, seed: -model.marginal_log_prob(x, seed) / (num_dims * math.log(2.))
    return lambda x, seed: model.bits_per_dim(x, seed=seed)

  def bits_per_dim(self, images):
    """`[N]` bits/dim under the model (the class mixture for a class-conditional one)."""
    return self.quantities(images, ['bits'])['bits']

  def background_bits_per_dim(self, images):
    return self.quantities(images, ['background'])['background']

  def level_bits_per_dim(self, images):
    """`[N, 1 + num_scales]`: the levels' shares of bits/dim (`level_names` columns)."""
    return self.quantities(images, ['levels'])['levels']

  def compressed_bits_per_dim(self, images):
    return self.quantities(images, ['compressed'])['compressed']

  def features(self, images):
    """`[N, F]`: the per-level bits/dim and the compressor's bits/dim (the `fitted` score's)."""
    return _features(self.quantities(images, ['levels', 'compressed']))

  # -- fitting on held-out in-distribution images ---------------------------------------------------

  def fit(self, held_out, methods=None):
    """Fits, on `held_out` (in-distribution images the model did not train on), `typicality`
    (their mean bits/dim `H`), `fitted` (a Gaussian over their features) and `combined` (their
    scores of the combined methods, which it fits first); returns self. `methods`: those of the
    three to fit (default: each that the model allows: `fitted` needs levels)."""
    if methods is None:
      methods = [m for m in NEEDS_FIT if m != 'fitted' or
                 (not self.model.num_classes and self.model.config.num_scales > 1)]
    methods = [m for m in check_methods(methods, self.model, self.background) if m in NEEDS_FIT]
    if 'combined' in methods:
      methods = list(dict.fromkeys([*(m for m in self.combine if m in NEEDS_FIT), *methods]))
    values = self.quantities(held_out, self._needs(methods))
    if 'typicality' in methods:
      self._held_out_bits = values['bits']
      self.typical_bits_per_dim = float(np.mean(self._held_out_bits))
    if 'fitted' in methods:
      from sklearn.covariance import EmpiricalCovariance  # pylint: disable=import-outside-toplevel
      features = _features(values)
      if len(features) <= features.shape[1]:
        raise ValueError(f'fitted: {len(features)} held-out images for {features.shape[1]} '
                         'features; give more.')
      self._gaussian = EmpiricalCovariance().fit(features)
    if 'combined' in methods:
      scores = self._scores(values, self.combine)
      self._held_out_scores = {m: np.sort(scores[m]) for m in self.combine}
    return self

  def typicality_test(self, batch_bits_per_dim, batch_size=None, false_alarm=0.01, draws=1000,
                      seed=0, statistic='mean'):
    """Nalisnick et al.'s test for a batch: `(statistic, threshold)`, the batch is flagged as
    out-of-distribution when `statistic > threshold`. `statistic = |mean(batch) - H|`, `H` the
    held-out images' mean bits/dim (`statistic='median'`: medians instead of means, robust to
    the rare in-distribution image far from the rest, which sets the mean's threshold); the
    threshold is the `1 - false_alarm` quantile of the statistic over `draws` bootstrap batches of
    the held-out images' bits/dim (of the batch's size, or `batch_size`). `batch_bits_per_dim`:
    `[B]`, or `[M, B]` for `M` batches at once (then `statistic` is `[M]`)."""
    if self._held_out_bits is None:
      raise ValueError('typicality_test needs fit() on held-out in-distribution images first.')
    if statistic not in ('mean', 'median'):
      raise ValueError(f"statistic must be 'mean' or 'median', got {statistic!r}.")
    centre = np.mean if statistic == 'mean' else np.median
    typical = centre(self._held_out_bits)
    batch = np.asarray(batch_bits_per_dim, np.float64)
    size = batch_size or batch.shape[-1]
    rng = np.random.default_rng(seed)
    boot = centre(rng.choice(self._held_out_bits, (draws, size), replace=True), axis=-1)
    threshold = float(np.quantile(np.abs(boot - typical), 1 - false_alarm))
    value = np.abs(centre(batch, axis=-1) - typical)
    return (float(value) if value.ndim == 0 else value), threshold

  # -- the scores -----------------------------------------------------------------------------------

  def _needs(self, methods):
    parts = [*methods, *(self.combine if 'combined' in methods else ())]
    return list(dict.fromkeys(q for m in parts if m in QUANTITIES for q in QUANTITIES[m]))

  def score(self, images, methods=('bits_per_dim',)):
    """`{name: [N] float64}`, higher = more anomalous: a name per method, and a name per
    column for `levels` (`preprocessing`, `level_0`, ...). One pass over `images`."""
    methods = check_methods(methods, self.model, self.background)
    fitted = {'typicality': self._held_out_bits, 'fitted': self._gaussian,
              'combined': self._held_out_scores}
    for method in methods:
      if method in fitted and fitted[method] is None:
        raise ValueError(f'{method} needs held-out in-distribution images: fit(held_out) first '
                         'with it among the methods.')
    return self._scores(self.quantities(images, self._needs(methods)), methods)

  def _scores(self, values, methods):
    """The scores of `methods` from the per-image quantities `values`."""
    scores = {}
    for method in [*methods, *(self.combine if 'combined' in methods else ())]:
      if method in scores:
        continue
      if method == 'bits_per_dim':
        scores[method] = values['bits']
      elif method == 'levels':
        scores.update(zip(level_names(self.model.config.num_scales), values['levels'].T))
      elif method == 'complexity':
        scores[method] = values['bits'] - values['compressed']
      elif method == 'likelihood_ratio':
        scores[method] = values['bits'] - values['background']
      elif method == 'typicality':
        scores[method] = np.abs(values['bits'] - self.typical_bits_per_dim)
      elif method == 'fitted':
        scores[method] = self._gaussian.mahalanobis(_features(values))
    if 'combined' in methods:
      scores['combined'] = -np.log10(self.combined_p_values(scores))
    return {name: scores[name] for name in scores
            if name in methods or name not in METHODS}  # the levels' columns under their names

  def combined_p_values(self, scores):
    """`[N]`: the Bonferroni combination `min(1, k min_j p_j)` of the conformal p-values of the
    combined methods' `scores` (`{method: [N]}`) against the held-out images' (`combined`)."""
    if self._held_out_scores is None:
      raise ValueError('combined needs fit(held_out) first with it among the methods.')
    p_values = []
    for method, reference in self._held_out_scores.items():
      at_least = len(reference) - np.searchsorted(reference, scores[method], side='left')
      p_values.append((1 + at_least) / (len(reference) + 1))
    return np.minimum(1., len(p_values) * np.min(p_values, axis=0))


def _features(values):
  return np.concatenate([values['levels'], values['compressed'][:, None]], axis=-1)


def _split_sizes(count, parts):
  """`count` images in `parts` contiguous parts, as equal as they go (the first ones larger)."""
  return [count // parts + (i < count % parts) for i in range(parts)]
