"""The paper's configurations per dataset, as `RealNVPConfig`s."""

import dataclasses
import math
import numbers


@dataclasses.dataclass(frozen=True)
class RealNVPConfig:
  """Everything that defines a Real NVP model and its default optimizer.

  Attributes:
    image_shape: `[H, W, C]` of the images.
    num_scales: scales of the multi-scale architecture, the final one included.
    num_blocks: residual blocks per coupling network.
    num_filters: features of the finest scale's checkerboard networks; they double per scale,
      and channel couplings use twice those of the checkerboard ones at the same scale.
    alpha: the logit preprocessing's squashing, `logit(alpha + (1 - 2 alpha) x / 256)`.
    batch_norm_momentum: running averages `m <- momentum * m + (1 - momentum) * batch`.
    batch_norm_epsilon: added to the variance in the flow's batch normalization.
    l2: L2 decay on the weight-norm scales `g` and the coupling's tanh scale.
    learning_rate, clipnorm: Adam's rate and the global-norm clipping of the official code.
    dtype: dtype of the flow and its variables.
    compute_dtype: None, or 'bfloat16' / 'float16' for mixed precision inside the coupling
      networks only (the flow, log-dets and loss stay in `dtype`).
    validate_args: check inputs (pixel range, NaN) at run time.
    recompute: keep no coupling-network activations for the gradient; the backward pass runs
      each network forward again (about a third more compute, a fraction of the memory).
  """
  image_shape: tuple = (32, 32, 3)
  num_scales: int = 2
  num_blocks: int = 8
  num_filters: int = 64
  alpha: float = 0.05
  batch_norm_momentum: float = 0.9
  batch_norm_epsilon: float = 1e-4
  l2: float = 5e-5
  learning_rate: float = 1e-3
  clipnorm: float = 100.
  dtype: str = 'float32'
  compute_dtype: str = None
  validate_args: bool = True
  recompute: bool = False

  def __post_init__(self):
    object.__setattr__(self, 'image_shape', tuple(int(d) for d in self.image_shape))
    for field in ('num_scales', 'num_blocks', 'num_filters'):
      if getattr(self, field) < 1:
        raise ValueError(f'RealNVPConfig.{field} must be at least 1, got {getattr(self, field)}.')

    # Each float field's allowed values: (low, high, low included, high included); NaN never.
    bounds = {'alpha': (0., 0.5, False, False), 'batch_norm_momentum': (0., 1., True, False),
              'batch_norm_epsilon': (0., math.inf, False, False), 'l2': (0., math.inf, True, False),
              'learning_rate': (0., math.inf, False, False),
              'clipnorm': (0., math.inf, True, False)}  # clipnorm 0: no clipping
    for field, (low, high, low_ok, high_ok) in bounds.items():
      value = getattr(self, field)
      inside = (isinstance(value, numbers.Real) and math.isfinite(value)
                and (low < value or (low_ok and value == low))
                and (value < high or (high_ok and value == high)))
      if not inside:
        raise ValueError(f'RealNVPConfig.{field} must be a finite number in '
                         f'{"[" if low_ok else "("}{low:g}, {high:g}{"]" if high_ok else ")"}, '
                         f'got {value!r}.')

    if self.compute_dtype not in (None, 'bfloat16', 'float16'):
      raise ValueError(f"RealNVPConfig.compute_dtype must be None, 'bfloat16' or 'float16', got "
                       f'{self.compute_dtype!r}.')

  def replace(self, **overrides):
    unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise ValueError(f'Unknown RealNVPConfig fields: {sorted(unknown)}.')
    return dataclasses.replace(self, **overrides)

  def to_dict(self):
    return {**dataclasses.asdict(self), 'image_shape': list(self.image_shape)}


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
}


def get(name, **overrides):
  """The preset `name` with `overrides` (e.g. `get('cifar10', num_blocks=4)`)."""
  if name not in PRESETS:
    raise ValueError(f'Unknown preset {name!r}; known presets: {", ".join(sorted(PRESETS))}.')
  return PRESETS[name].replace(**overrides)
