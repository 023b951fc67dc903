"""The paper's configurations per dataset, as `RealNVPConfig`s.

Each field says, in its metadata, what it is (`kind`): part of the model's `architecture` (what a
checkpoint's shapes and meaning depend on: a run resumes only with the same), or a `run` setting
(precision, recomputation, checks, optimizer: free to change when a run resumes). Its help text,
bounds and choices are there too; the launcher derives its flags from them.
"""

import dataclasses
import math
import numbers
import warnings

ARCHITECTURE, RUN = 'architecture', 'run'

# `RealNVPConfig.recompute`, from the least memory saved to the most (and 'auto').
RECOMPUTE = ('auto', 'none', 'batch_norm', 'largest_blocks', 'blocks', 'networks')


class ConfigError(ValueError):
  """A `RealNVPConfig` value outside what the model accepts, naming the field."""


def _field(default, kind, help, *, low=None, high=None, low_ok=True, high_ok=False, choices=None,
           flag=True, added=False):
  """A config field with what the launcher and the checks need: `kind` (ARCHITECTURE or RUN),
  `help`, numeric bounds (`low`/`high`, each included or not), `choices`, and the flag's name
  (`flag=True`: the field's own; a string: another; False: no flag). `added`: an architecture
  field that configs written before it existed lack; their models had its default."""
  return dataclasses.field(default=default, metadata=dict(
      kind=kind, help=help, low=low, high=high, low_ok=low_ok, high_ok=high_ok, choices=choices,
      flag=flag, added=added))


@dataclasses.dataclass(frozen=True)
class RealNVPConfig:
  """Everything that defines a Real NVP model and how it runs (see each field's `help`).

  Architecture (a checkpoint's shapes and meaning depend on these): `image_shape`, `num_scales`,
  `num_blocks`, `num_filters`, `alpha`, `batch_norm_epsilon`, `normalization`, `mixing`,
  `layout`, `steps_per_scale`, `network`, `num_classes`, `dtype`. The defaults are the paper's; Glow's layers
  are options (`normalization='actnorm'`, `mixing='1x1_conv'`, `layout='glow'`,
  `network='glow'`; the `glow` preset has them all).
  Run settings (may change between runs of the same model): `batch_norm_momentum`, `l2`,
  `learning_rate`, `clipnorm`, `compute_dtype`, `validate_args`, `recompute`, `sync_batch_norm`.
  """
  image_shape: tuple = _field((32, 32, 3), ARCHITECTURE, '[H, W, C] of the images.', flag=False)
  num_scales: int = _field(2, ARCHITECTURE, 'Scales of the multi-scale architecture, the final '
                           'one included.', low=1)
  num_blocks: int = _field(8, ARCHITECTURE, 'Residual blocks per coupling network.', low=1)
  num_filters: int = _field(64, ARCHITECTURE, 'Features of the finest scale\'s checkerboard '
                            'networks (doubled per scale, and for channel couplings).', low=1)
  alpha: float = _field(0.05, ARCHITECTURE, 'Logit preprocessing: logit(alpha + (1 - 2 alpha) '
                        'x / 256).', low=0., high=0.5, low_ok=False)
  batch_norm_momentum: float = _field(0.9, RUN, 'Momentum of the batch-norm running averages: '
                                      'm <- momentum m + (1 - momentum) batch.', low=0., high=1.)
  batch_norm_epsilon: float = _field(1e-4, ARCHITECTURE, 'Added to the variances in the flow\'s '
                                     'batch normalization.', low=0., high=math.inf, low_ok=False)
  l2: float = _field(5e-5, RUN, 'L2 decay on the weight-norm scales and the coupling\'s tanh '
                     'scale.', low=0., high=math.inf)
  learning_rate: float = _field(1e-3, RUN, 'Adam\'s learning rate.', low=0., high=math.inf,
                                low_ok=False)
  clipnorm: float = _field(100., RUN, 'Global-norm gradient clipping (0: none).', low=0.,
                           high=math.inf)
  normalization: str = _field('batch_norm', ARCHITECTURE, 'The flow layer after each coupling: '
                              'batch_norm (Real NVP) or actnorm (Glow: a learned per-channel '
                              'affine map, set from the first training batch).',
                              choices=('batch_norm', 'actnorm'), added=True)
  mixing: str = _field('none', ARCHITECTURE, 'Channel mixing before each coupling: none (Real '
                       'NVP) or 1x1_conv (Glow\'s invertible 1x1 convolution, in LU form).',
                       choices=('none', '1x1_conv'), added=True)
  layout: str = _field('real_nvp', ARCHITECTURE, 'Scales: real_nvp (3 checkerboard couplings, '
                       'squeeze, 3 channel couplings, factor out half; 4 checkerboard couplings '
                       'last; features double per scale) or glow (squeeze, steps_per_scale '
                       'channel couplings, factor out half; the same features at every scale).',
                       choices=('real_nvp', 'glow'), added=True)
  steps_per_scale: int = _field(32, ARCHITECTURE, 'Couplings per scale in the glow layout.',
                                low=1, added=True)
  network: str = _field('resnet', ARCHITECTURE, 'The coupling networks: resnet (Real NVP: '
                        'num_blocks residual blocks) or glow (conv 3x3, conv 1x1, conv 3x3; '
                        'num_blocks unused).', choices=('resnet', 'glow'), added=True)
  num_classes: int = _field(0, ARCHITECTURE, 'Classes of a class-conditional model p(x | y) '
                            '(0: unconditional, p(x)): labels condition the coupling networks and '
                            'the latent\'s Gaussian.', low=0, added=True)
  dtype: str = _field('float32', ARCHITECTURE, 'dtype of the flow and its variables.',
                      choices=('float32', 'float64'), flag=False)
  compute_dtype: str = _field(None, RUN, 'Mixed precision inside the coupling networks only '
                              '(log-dets and the loss stay in dtype): bfloat16 (GPUs, CPUs with '
                              'AVX512_BF16/AMX) or float16 (GPUs).',
                              choices=(None, 'bfloat16', 'float16'), flag='mixed_precision')
  validate_args: bool = _field(True, RUN, 'Check pixel ranges and NaNs at run time.')
  recompute: str = _field('auto', RUN, 'How much of the coupling networks\' forward pass the '
                          'backward pass runs again to save memory, from least to most: none '
                          '(autodiff keeps every activation; the fastest); batch_norm (each batch '
                          'norm -> ReLU -> convolution unit keeps only its input: half its '
                          'activations, for its batch norm and ReLU again); largest_blocks (also '
                          'the residual blocks on the model\'s largest maps keep only their '
                          'input, for their first convolution again); blocks (every residual '
                          'block so); networks (no activations kept: each network runs again, '
                          'about a third more compute); auto: largest_blocks in float32, none '
                          'under mixed precision (whose activations take half the memory). '
                          'Below networks, on one replica or with --nosync_batch_norm only, and '
                          'not in float64.', choices=RECOMPUTE)
  sync_batch_norm: bool = _field(True, RUN, 'Batch statistics over every replica\'s batch, so '
                                 'the loss is the global batch\'s on any number of replicas (3 '
                                 'all-reduces per batch norm per step); false: each replica\'s '
                                 'own (no all-reduce; the loss then depends on the split).')

  def __post_init__(self):
    if not (isinstance(self.image_shape, (tuple, list)) and len(self.image_shape) == 3):
      raise ConfigError(f'RealNVPConfig.image_shape must be [H, W, C], got {self.image_shape!r}.')
    object.__setattr__(self, 'image_shape', tuple(int(d) for d in self.image_shape))
    if isinstance(self.recompute, bool):  # before it had levels
      object.__setattr__(self, 'recompute', renamed_fields(
          {'recompute': self.recompute}, warn=True)['recompute'])
    if min(self.image_shape) < 1:
      raise ConfigError(f'RealNVPConfig.image_shape must be positive, got {list(self.image_shape)}.')
    for field in dataclasses.fields(self):
      if field.name != 'image_shape':
        check_field(field.name, getattr(self, field.name))
    height, width, _ = self.image_shape
    squeezes = self.num_scales - (self.layout == 'real_nvp')  # glow squeezes at every scale
    factor = 2 ** squeezes
    if height % factor or width % factor:
      raise ConfigError(f'An image of {height}x{width} cannot be squeezed {squeezes} '
                        f'times (num_scales={self.num_scales}, layout={self.layout}): height and '
                        f'width must be multiples of {factor}; lower num_scales.')

  def replace(self, **overrides):
    overrides = renamed_fields(overrides, warn=True, compute_dtype=self.compute_dtype)
    unknown = set(overrides) - set(FIELDS)
    if unknown:
      raise ConfigError(f'Unknown RealNVPConfig fields: {sorted(unknown)}; known: '
                        f'{", ".join(FIELDS)}.')
    return dataclasses.replace(self, **overrides)

  def to_dict(self):
    return {**dataclasses.asdict(self), 'image_shape': list(self.image_shape)}

  def architecture(self):
    """The architecture fields (see the class docstring) as a dict, as in `to_dict`."""
    return {k: v for k, v in self.to_dict().items() if FIELDS[k].metadata['kind'] == ARCHITECTURE}

  @classmethod
  def from_dict(cls, values, what='config'):
    """The config in `values` (as `to_dict` writes it); a `ConfigError` names missing or unknown
    fields (in `what`)."""
    if not isinstance(values, dict):
      raise ConfigError(f'{what}: expected a dict of RealNVPConfig fields, got {values!r}.')
    values = renamed_fields(values)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
      raise ConfigError(f'{what}: unknown RealNVPConfig fields {unknown} (known: '
                        f'{", ".join(FIELDS)}).')
    required = [name for name, f in FIELDS.items()
                if f.metadata['kind'] == ARCHITECTURE and not f.metadata['added'] and
                name not in values]
    if required:
      raise ConfigError(f'{what}: missing RealNVPConfig fields {required}.')
    return cls(**values)


FIELDS = {f.name: f for f in dataclasses.fields(RealNVPConfig)}

# Fields that became `recompute`'s levels: `recompute` was a bool (True: 'networks').
OLD_RECOMPUTE_FIELDS = ('recompute_blocks', 'recompute_batch_norm')


def renamed_fields(values, warn=False, compute_dtype=None):
  """`values` (config fields) with the old memory settings as `recompute`'s level: a boolean
  `recompute` (True: networks; False: as the two others say), `recompute_blocks`
  (auto|largest|all|none) and `recompute_batch_norm` (auto|on|off), as configs written before
  they became one setting hold them (`compute_dtype`: the config's, where `values` lack it).
  `warn`: a `DeprecationWarning` naming the level."""
  old = {name: values[name] for name in OLD_RECOMPUTE_FIELDS if name in values}
  if not old and not isinstance(values.get('recompute'), bool):
    return values
  if old and isinstance(values.get('recompute'), str):
    raise ConfigError(f'RealNVPConfig: {", ".join(old)} and recompute={values["recompute"]!r} '
                      f'given together; {", ".join(old)} became recompute\'s levels: give '
                      'recompute alone.')
  values = {k: v for k, v in values.items() if k not in OLD_RECOMPUTE_FIELDS}
  mixed = values.get('compute_dtype', compute_dtype) is not None
  blocks, batch_norm = old.get('recompute_blocks', 'auto'), old.get('recompute_batch_norm', 'auto')
  if values.get('recompute') is True:
    level = 'networks'
  elif blocks == 'auto' and batch_norm == 'auto':
    level = 'auto'
  else:
    blocks = {'auto': 'none' if mixed else 'largest'}.get(blocks, blocks)
    batch_norm = {'auto': 'off' if mixed else 'on'}.get(batch_norm, batch_norm)
    level = {'all': 'blocks', 'largest': 'largest_blocks'}.get(
        blocks, 'batch_norm' if batch_norm == 'on' else 'none')
  if warn:
    given = ', '.join(f'{k}={v!r}' for k, v in {
        **({'recompute': values['recompute']} if 'recompute' in values else {}), **old}.items())
    warnings.warn(f'RealNVPConfig: {given} is now recompute={level!r} (one setting: '
                  f'{", ".join(RECOMPUTE)}).', DeprecationWarning, stacklevel=3)
  return {**values, 'recompute': level}


def check_field(name, value):
  """Raises `ConfigError` unless `value` is allowed for the field `name` (its type, bounds and
  choices in the field's metadata); NaN and infinities never are."""
  field = FIELDS[name]
  meta = field.metadata
  if meta['choices'] is not None:
    if value not in meta['choices']:
      raise ConfigError(f'RealNVPConfig.{name} must be one of '
                        f'{", ".join(map(repr, meta["choices"]))}, got {value!r}.')
    return
  if field.type in (bool, 'bool'):
    if not isinstance(value, bool):
      raise ConfigError(f'RealNVPConfig.{name} must be True or False, got {value!r}.')
    return
  integer = field.type in (int, 'int')
  kind = numbers.Integral if integer else numbers.Real
  if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
    raise ConfigError(f'RealNVPConfig.{name} must be {"an integer" if integer else "a finite number"}'
                      f', got {value!r}.')
  low, high = meta['low'], meta['high']
  if integer:
    if low is not None and value < low:
      raise ConfigError(f'RealNVPConfig.{name} must be at least {low}, got {value}.')
    return
  inside = ((low is None or low < value or (meta['low_ok'] and value == low)) and
            (high is None or value < high or (meta['high_ok'] and value == high)))
  if not inside:
    raise ConfigError(f'RealNVPConfig.{name} must be a finite number in '
                      f'{"[" if meta["low_ok"] else "("}{low:g}, {high:g}'
                      f'{"]" if meta["high_ok"] else ")"}, got {value!r}.')


PRESETS = {
    # Table 1 configurations. CIFAR-10: 2 scales (downscale once), 8 blocks, 64 features.
    'cifar10': RealNVPConfig((32, 32, 3), num_scales=2, num_blocks=8, num_filters=64),
    # ImageNet 32x32: 4 blocks, 32 features, scales down to a 4x4 final scale.
    'imagenet32': RealNVPConfig((32, 32, 3), num_scales=4, num_blocks=4, num_filters=32),
    # 64x64 sets: 2 blocks, 32 features, down to 4x4.
    'imagenet64': RealNVPConfig((64, 64, 3), num_scales=5, num_blocks=2, num_filters=32),
    'celeba': RealNVPConfig((64, 64, 3), num_scales=5, num_blocks=2, num_filters=32),
    'lsun': RealNVPConfig((64, 64, 3), num_scales=5, num_blocks=2, num_filters=32),
    # MNIST (not in the paper): 28 -> 14 -> 7, so 3 scales with the final 4 checkerboard
    # couplings on 7x7x4; 4 blocks of 32 features, the ImageNet 32x32 network size.
    'mnist': RealNVPConfig((28, 28, 1), num_scales=3, num_blocks=4, num_filters=32),
    # Glow's CIFAR-10 architecture (Kingma & Dhariwal, 2018): 3 levels of 32 steps (ActNorm,
    # invertible 1x1 convolution, affine coupling), 512-feature networks (conv 3x3, 1x1, 3x3).
    'glow': RealNVPConfig((32, 32, 3), num_scales=3, num_filters=512, normalization='actnorm',
                          mixing='1x1_conv', layout='glow', steps_per_scale=32, network='glow'),
}


def get(name, **overrides):
  """The preset `name` with `overrides` (e.g. `get('cifar10', num_blocks=4)`)."""
  if name not in PRESETS:
    raise ConfigError(f'Unknown preset {name!r}; known presets: {", ".join(sorted(PRESETS))}.')
  return PRESETS[name].replace(**overrides)
