"""Real NVP's multi-scale architecture: scales of couplings with half the channels factored out."""

import numpy as np
import tensorflow as tf

from tfp_realnvp.bijectors.affine_coupling import AffineCoupling, channel_mask, checkerboard
from tfp_realnvp.bijectors.base import FlowBijector, Inverted, Sequential
from tfp_realnvp.bijectors.batch_norm import BatchNorm
from tfp_realnvp.bijectors.logit import Logit
from tfp_realnvp.bijectors.squeeze import Squeeze


class FactorOut(FlowBijector):
  """Sends the first half of the channels straight to the latent, the rest through `bijector`.

    forward:   y = concat(x[..., :C/2], bijector.forward(x[..., C/2:]))
    inverse:   x = concat(y[..., :C/2], bijector.inverse(y[..., C/2:]))
    log|det|   = bijector's log-det on the second half

  Example:
    FactorOut([8, 8, 12], inner_scale)   # inner_scale works on [8, 8, 6]
  """

  def __init__(self, event_shape, bijector, validate_args=False, name='factor_out'):
    parameters = dict(locals())
    height, width, channels = event_shape
    if channels % 2 or tuple(bijector.event_shape_in) != (height, width, channels // 2):
      raise ValueError(f'{name}: needs an even channel count and a bijector on '
                       f'[{height}, {width}, {channels // 2}], got events {list(event_shape)} and '
                       f'a bijector on {list(bijector.event_shape_in)}.')
    super().__init__(event_shape, validate_args, parameters, name, bijector.dtype)
    self._bijector = bijector

  @property
  def parts(self):
    return (self._bijector,)

  def _split(self, x):
    return tf.split(x, 2, axis=-1)

  _takes_labels = True

  def _forward_and_log_det(self, x, training, labels=None):
    factored, rest = self._split(x)
    rest, log_det = self._bijector.forward_and_log_det(rest, training, labels)
    return tf.concat([factored, rest], axis=-1), log_det

  def _inverse_and_log_det(self, y, training, labels=None):
    factored, rest = self._split(y)
    rest, log_det = self._bijector.inverse_and_log_det(rest, training, labels)
    return tf.concat([factored, rest], axis=-1), log_det


def multiscale_flow(image_shape, num_scales, coupling_network, batch_statistics=None, alpha=0.05,
                    batch_norm_epsilon=1e-4, validate_args=False, dtype=tf.float32,
                    normalization=None, mixing=None, layout='real_nvp', steps_per_scale=32):
  """The whole Real NVP bijector, pixels in `[0, 256)^(H, W, C)` to an image-shaped latent.

  `Logit` preprocessing, then `num_scales` scales. With `layout='real_nvp'` (the paper), each
  scale but the last: 3 checkerboard couplings (alternating parities), squeeze, 3 channel
  couplings (alternating halves), then the first half of the channels is factored out and the
  rest goes through the next scale; the result is un-squeezed, so the latent keeps the image's
  shape. The last scale: 4 checkerboard couplings. With `layout='glow'` (Glow), each scale:
  squeeze, `steps_per_scale` channel couplings, factor out half (the last scale: squeeze and
  the couplings). Every coupling is followed by a normalization (batch norm, or what
  `normalization` makes) and preceded by `mixing`'s layer, if any.

  Args:
    image_shape: `[H, W, C]`; H and W must stay even through the squeezes.
    num_scales: number of scales, the last one included.
    coupling_network: `fn(event_shape, scale, kind) -> keras layer` giving `(s, t)`; `scale` is
      0 for the finest scale and `kind` is 'checkerboard' or 'channel'.
    batch_statistics: `fn() -> BatchStatistics` layer, one per batch-norm bijector (when
      `normalization` is None).
    normalization: `fn(event_shape, name) -> FlowBijector` after each coupling (e.g. `ActNorm`),
      instead of batch norm.
    mixing: `fn(event_shape, name) -> FlowBijector` before each coupling (e.g.
      `Invertible1x1Conv`), or None (the paper: none).
  """
  height, width, _ = image_shape
  if num_scales < 1:
    raise ValueError(f'num_scales must be at least 1, got {num_scales}.')
  if layout not in ('real_nvp', 'glow'):
    raise ValueError(f'layout must be real_nvp or glow, got {layout!r}.')
  squeezes = num_scales - (layout == 'real_nvp')
  if height % 2 ** squeezes or width % 2 ** squeezes:
    raise ValueError(f'An image of {height}x{width} cannot be squeezed {squeezes} times '
                     f'(num_scales={num_scales}, layout={layout}): height and width must be '
                     f'multiples of {2 ** squeezes}.')
  if normalization is None and batch_statistics is None:
    raise ValueError('multiscale_flow needs batch_statistics or normalization.')
  common = dict(validate_args=validate_args, dtype=dtype)

  def normalize(shape, name):
    if normalization is not None:
      return normalization(shape, name)
    return BatchNorm(batch_statistics(), shape, epsilon=batch_norm_epsilon, name=name, **common)

  def coupling_steps(shape, scale, kind, count):
    steps = []
    for i in range(count):
      parity = i % 2
      mask = (checkerboard(shape[0], shape[1], parity) if kind == 'checkerboard'
              else channel_mask(shape[2], parity))
      if mixing is not None:
        steps.append(mixing(shape, f'mixing_s{scale}_{kind}{i}'))
      steps.append(AffineCoupling(mask, coupling_network(shape, scale, kind), shape,
                                  name=f'coupling_s{scale}_{kind}{i}', **common))
      steps.append(normalize(shape, f'{"batch_norm" if normalization is None else "norm"}'
                                    f'_s{scale}_{kind}{i}'))
    return steps

  def scale_flow(shape, scale):
    h, w, c = shape
    last = scale == num_scales - 1
    if layout == 'real_nvp' and last:
      return Sequential(coupling_steps(shape, scale, 'checkerboard', 4), name=f'scale{scale}')
    squeeze = Squeeze(shape, name=f'squeeze{scale}', **common)
    squeezed = squeeze.event_shape_out
    if layout == 'real_nvp':
      steps = [*coupling_steps(shape, scale, 'checkerboard', 3), squeeze,
               *coupling_steps(squeezed, scale, 'channel', 3)]
    else:
      steps = [squeeze, *coupling_steps(squeezed, scale, 'channel', steps_per_scale)]
    if not last:
      steps.append(FactorOut(squeezed, scale_flow((h // 2, w // 2, 2 * c), scale + 1),
                             validate_args=validate_args, name=f'factor_out{scale}'))
    return Sequential([*steps, Inverted(squeeze, name=f'unsqueeze{scale}')], name=f'scale{scale}')

  image_shape = tuple(image_shape)
  return Sequential([Logit(image_shape, alpha=alpha, **common), scale_flow(image_shape, 0)],
                    validate_args=validate_args, name='real_nvp')


def _depth_to_space(y):
  """numpy `tf.nn.depth_to_space(y, 2)` for one `[h, w, 4C]` array (the `Squeeze` inverse)."""
  h, w, c4 = y.shape
  c = c4 // 4
  return y.reshape(h, w, 2, 2, c).transpose(0, 2, 1, 3, 4).reshape(2 * h, 2 * w, c)


def latent_groups(image_shape, num_scales, layout='real_nvp'):
  """Where each factored-out part of `multiscale_flow`'s latent lies: an int array `[H, W, C]`
  giving, for each element of the image-shaped latent, its group `(part, channel)` as one index;
  part 0 (factored out at the finest scale) first, the last scale's output last, each part's
  channels in order. E.g. a per-group mean `m[G]` is the latent-shaped `m[latent_groups(...)]`.
  """
  def groups(shape, scale, first):
    h, w, c = shape
    last = scale == num_scales - 1
    if layout == 'real_nvp' and last:
      return first + np.broadcast_to(np.arange(c), shape)
    if last:  # glow: squeeze, couplings, un-squeeze
      return _depth_to_space(first + np.broadcast_to(np.arange(4 * c), (h // 2, w // 2, 4 * c)))
    factored = first + np.broadcast_to(np.arange(2 * c), (h // 2, w // 2, 2 * c))
    rest = groups((h // 2, w // 2, 2 * c), scale + 1, first + 2 * c)
    return _depth_to_space(np.concatenate([factored, rest], axis=-1))

  return np.ascontiguousarray(groups(tuple(image_shape), 0, 0))


def latent_levels(image_shape, num_scales):
  """An int array `[H, W, C]`: the level of each element of `multiscale_flow`'s image-shaped
  latent (0: the part factored out at the finest scale, ..., `num_scales - 1`: the last scale's
  output). Both layouts factor out half the channels of the squeezed map."""
  def levels(shape, scale):
    h, w, c = shape
    if scale == num_scales - 1:
      return np.full(shape, scale)
    factored = np.full((h // 2, w // 2, 2 * c), scale)
    rest = levels((h // 2, w // 2, 2 * c), scale + 1)
    return _depth_to_space(np.concatenate([factored, rest], axis=-1))

  return np.ascontiguousarray(levels(tuple(image_shape), 0))
