"""The checks TFP runs on its own bijectors, written after TFP's `bijector_test_util.py` (which is
not in the wheel), for bijectors on `[..., H, W, C]` events, in each execution regime.

Every call gets a fresh tensor (`tf.identity`): TFP's cache keys on input tensors, so checks on
the same tensor object could pass by construction.
"""

import numpy as np
import tensorflow as tf

REGIMES = ('eager', 'function', 'xla')


def in_regime(fn, regime):
  """`fn` as it runs in `regime`: eagerly, as a `tf.function`, or compiled by XLA."""
  if regime == 'eager':
    return fn
  if regime not in REGIMES:
    raise ValueError(f'regime must be one of {REGIMES}, got {regime!r}')
  return tf.function(fn, autograph=False, jit_compile=regime == 'xla')


def fresh(t):
  """A new tensor with `t`'s value: no cache entry can be keyed on it."""
  return tf.identity(tf.convert_to_tensor(t))


def _api(bijector, regime):
  """TFP's four entry points and the two one-pass methods, in `regime`."""
  return dict(
      forward=in_regime(lambda x: bijector.forward(x), regime),
      inverse=in_regime(lambda y: bijector.inverse(y), regime),
      fldj=in_regime(lambda x: bijector.forward_log_det_jacobian(x, event_ndims=3), regime),
      ildj=in_regime(lambda y: bijector.inverse_log_det_jacobian(y, event_ndims=3), regime),
      forward_and_log_det=in_regime(lambda x: bijector.forward_and_log_det(x), regime),
      inverse_and_log_det=in_regime(lambda y: bijector.inverse_and_log_det(y), regime))


def assert_bijective_and_finite(bijector, x, y, regime, rtol, atol):
  """TFP's `assert_bijective_and_finite`: on points `x` of the domain and `y` of the range, every
  value and log-det is finite, the round trips return the start, `ildj(f(x)) == -fldj(x)` and
  `fldj(f^-1(y)) == -ildj(y)`, and the one-pass methods agree with TFP's entry points."""
  api = _api(bijector, regime)
  f_x = api['forward'](fresh(x))
  f_inv_y = api['inverse'](fresh(y))
  fldj_x = api['fldj'](fresh(x))
  ildj_y = api['ildj'](fresh(y))
  for name, value in (('forward(x)', f_x), ('inverse(y)', f_inv_y), ('fldj(x)', fldj_x),
                      ('ildj(y)', ildj_y)):
    assert np.isfinite(value.numpy()).all(), f'{bijector.name}: {name} is not finite ({regime})'
  np.testing.assert_allclose(api['inverse'](fresh(f_x)), x, rtol=rtol, atol=atol)
  np.testing.assert_allclose(api['forward'](fresh(f_inv_y)), y, rtol=rtol, atol=atol)
  np.testing.assert_allclose(api['ildj'](fresh(f_x)), -fldj_x, rtol=rtol, atol=atol)
  np.testing.assert_allclose(api['fldj'](fresh(f_inv_y)), -ildj_y, rtol=rtol, atol=atol)
  value, log_det = api['forward_and_log_det'](fresh(x))
  np.testing.assert_allclose(value, f_x, rtol=rtol, atol=atol)
  np.testing.assert_allclose(log_det, fldj_x, rtol=rtol, atol=atol)
  value, log_det = api['inverse_and_log_det'](fresh(y))
  np.testing.assert_allclose(value, f_inv_y, rtol=rtol, atol=atol)
  np.testing.assert_allclose(log_det, ildj_y, rtol=rtol, atol=atol)
  assert fldj_x.shape == x.shape[:-3] and ildj_y.shape == y.shape[:-3]


def jacobian_log_det(bijector, x, regime):
  """log|det J| of `bijector.forward` at each event of `x` `[N, H, W, C]`, from a GradientTape
  Jacobian computed in `regime` (the determinant is taken in NumPy, float64)."""
  def jacobian(event):
    with tf.GradientTape() as tape:
      tape.watch(event)
      y = bijector.forward(event)
    return tape.jacobian(y, event)

  jacobian = in_regime(jacobian, regime)
  size = int(np.prod(x.shape[1:]))
  return np.array([np.linalg.slogdet(np.reshape(jacobian(fresh(x[i:i + 1])).numpy(),
                                                [size, size]).astype(np.float64))[1]
                   for i in range(x.shape[0])])


def assert_log_det_matches_jacobian(bijector, x, regime, rtol, atol):
  """The closed-form `fldj(x)` equals log|det| of the autodiff Jacobian, event by event."""
  fldj = in_regime(lambda x: bijector.forward_log_det_jacobian(x, event_ndims=3), regime)
  np.testing.assert_allclose(fldj(fresh(x)), jacobian_log_det(bijector, x, regime),
                             rtol=rtol, atol=atol)


def grid(shape, low, high, dtype, seed=0):
  """Points on a grid over `[low, high]` (the ends included), in random order, shaped `shape`."""
  size = int(np.prod(shape))
  values = np.linspace(low, high, size)
  return tf.constant(np.random.default_rng(seed).permutation(values).reshape(shape), dtype)
