"""Round trips, closed-form log-dets against GradientTape Jacobians, shapes and errors."""

import numpy as np
import pytest
import tensorflow as tf

import bijector_test_util as btu
from conftest import TOLERANCE, log_det_by_autodiff, randomize
from tfp_realnvp import CouplingNet
from tfp_realnvp.bijectors import (ActNorm, ActNormParameters, AffineCoupling, BatchNorm,
                                   BatchStatistics, FactorOut, Invertible1x1Conv, Inverted, Logit,
                                   LUWeights, Sequential, Squeeze, channel_mask, checkerboard)

SHAPE = (4, 4, 2)


def _coupling(kind, parity, dtype, shape=SHAPE, seed=0):
  mask = (checkerboard(shape[0], shape[1], parity) if kind == 'checkerboard'
          else channel_mask(shape[2], parity))
  net = CouplingNet(shape[2], num_filters=4, num_blocks=1, dtype=dtype.name)
  coupling = AffineCoupling(mask, net, shape, dtype=dtype)
  coupling.forward(tf.zeros([1, *shape], dtype))  # builds the network
  randomize([net], seed)
  return coupling


def _batch_norm(dtype, shape=SHAPE, seed=0):
  norm = BatchNorm(BatchStatistics(0.9, dtype=dtype.name), shape, dtype=dtype)
  norm.forward(tf.zeros([1, *shape], dtype))
  randomize(norm.keras_layers, seed)
  return norm


def _glow_layer(kind, dtype, shape=SHAPE, seed=0):
  """ActNorm or the invertible 1x1 convolution with random trainable weights (the 1x1
  convolution's permutation and signs stay as initialised)."""
  layer = (ActNorm(ActNormParameters(dtype=dtype.name), shape, dtype=dtype) if kind == 'actnorm'
           else Invertible1x1Conv(LUWeights(seed=seed, dtype=dtype.name), shape, dtype=dtype))
  layer.forward(tf.zeros([1, *shape], dtype))
  rng = np.random.default_rng(seed)
  for w in layer.keras_layers[0].trainable_weights:
    w.assign(rng.normal(0., 0.3, w.shape).astype(w.dtype))
  return layer


def _check_bijector(bijector, x, dtype, atol_round_trip=None):
  """The checks TFP runs on a bijector, on a batch `x` of events."""
  tol = TOLERANCE[dtype]
  y, fldj = bijector.forward_and_log_det(x)
  x_back, ildj = bijector.inverse_and_log_det(y)
  np.testing.assert_allclose(x_back, x, atol=atol_round_trip or tol * 10)
  y_again, _ = bijector.forward_and_log_det(x_back)
  np.testing.assert_allclose(y_again, y, atol=atol_round_trip or tol * 10)
  np.testing.assert_allclose(ildj, -fldj, rtol=tol, atol=tol)
  np.testing.assert_allclose(fldj, log_det_by_autodiff(lambda e: bijector.forward(e), x),
                             rtol=tol, atol=tol)
  # TFP's own entry points agree with the one-pass methods.
  np.testing.assert_allclose(bijector.forward(x), y, rtol=tol, atol=tol)
  np.testing.assert_allclose(bijector.forward_log_det_jacobian(x, event_ndims=3), fldj,
                             rtol=tol, atol=tol)
  np.testing.assert_allclose(bijector.inverse_log_det_jacobian(y, event_ndims=3), ildj,
                             rtol=tol, atol=tol)
  return y, fldj


def _normal(shape, dtype, seed=1):
  return tf.random.stateless_normal(shape, [seed, 0], dtype=dtype)


def _composite(dtype):
  squeeze = Squeeze(SHAPE, dtype=dtype)
  inner = Sequential([_coupling('checkerboard', 0, dtype, shape=(2, 2, 4), seed=3),
                      _batch_norm(dtype, shape=(2, 2, 4), seed=4)])
  return Sequential([_coupling('checkerboard', 1, dtype), _batch_norm(dtype, seed=1), squeeze,
                     _coupling('channel', 0, dtype, shape=(2, 2, 8), seed=2),
                     FactorOut((2, 2, 8), inner), Inverted(squeeze)])


# Each bijector with points of its domain and its range (a grid over each, ends included).
BIJECTORS = {
    'checkerboard_coupling': (lambda dtype: _coupling('checkerboard', 1, dtype), (-3., 3.),
                              (-3., 3.)),
    'channel_coupling': (lambda dtype: _coupling('channel', 0, dtype), (-3., 3.), (-3., 3.)),
    'batch_norm': (_batch_norm, (-3., 3.), (-3., 3.)),
    'actnorm': (lambda dtype: _glow_layer('actnorm', dtype), (-3., 3.), (-3., 3.)),
    'invertible_1x1_conv': (lambda dtype: _glow_layer('1x1_conv', dtype, seed=1), (-3., 3.),
                            (-3., 3.)),
    'logit': (lambda dtype: Logit(SHAPE, dtype=dtype, validate_args=True), (-14., 270.),
              (-6., 6.)),
    'squeeze': (lambda dtype: Squeeze(SHAPE, dtype=dtype), (-3., 3.), (-3., 3.)),
    'multiscale_composite': (_composite, (-3., 3.), (-3., 3.)),
}


# XLA in float32, what models compile in; float64 in eager and tf.function.
REGIMES_AND_DTYPES = [(regime, dtype) for regime in btu.REGIMES
                      for dtype in ((tf.float32,) if regime == 'xla' else (tf.float32, tf.float64))]


@pytest.mark.parametrize('regime,dtype', REGIMES_AND_DTYPES,
                         ids=[f'{r}-{d.name}' for r, d in REGIMES_AND_DTYPES])
@pytest.mark.parametrize('name', sorted(BIJECTORS))
def test_bijector_contracts_in_every_regime(name, regime, dtype):
  """TFP's checks (round trips, ildj == -fldj on fresh tensors, finite on a grid, log-det against
  the autodiff Jacobian) in eager, tf.function and XLA."""
  make, domain, range_ = BIJECTORS[name]
  bijector = make(dtype)
  shape_out = bijector.event_shape_out
  x = btu.grid([3, *SHAPE], *domain, dtype, seed=1)
  y = btu.grid([3, *shape_out], *range_, dtype, seed=2)
  tol = TOLERANCE[dtype]
  # The logit's inverse loses float32 precision near the ends of its domain.
  rtol = 1e-4 if name == 'logit' and dtype == tf.float32 else tol
  btu.assert_bijective_and_finite(bijector, x, y, regime, rtol=rtol, atol=tol * 10)
  btu.assert_log_det_matches_jacobian(bijector, x[:2], regime, rtol=tol, atol=tol)


@pytest.mark.parametrize('kind', ['checkerboard', 'channel'])
@pytest.mark.parametrize('parity', [0, 1])
def test_affine_coupling_round_trip_and_log_det(kind, parity, dtype):
  coupling = _coupling(kind, parity, dtype)
  x = _normal([3, *SHAPE], dtype)
  y, fldj = _check_bijector(coupling, x, dtype)
  b = coupling.mask.numpy()
  # The masked part passes unchanged; the rest changes; the log-det is not trivially zero.
  np.testing.assert_array_equal((y * b).numpy(), (x * b).numpy())
  assert np.abs((y - x).numpy() * (1 - b)).max() > 1e-3
  assert np.abs(fldj.numpy()).min() > 1e-3


def test_affine_coupling_matches_paper_formula():
  dtype = tf.float64
  coupling = _coupling('checkerboard', 1, dtype)
  x = _normal([2, *SHAPE], dtype)
  b = checkerboard(4, 4, 1, np.float64)
  mask_channel = np.broadcast_to(b, (2, 4, 4, 1))
  s, t = coupling.network(tf.concat([b * x, mask_channel], -1))
  expected = b * x + (1 - b) * (x * np.exp(s) + t)
  y, fldj = coupling.forward_and_log_det(x)
  np.testing.assert_allclose(y, expected, rtol=1e-12)
  np.testing.assert_allclose(fldj, np.sum((1 - b) * s, axis=(1, 2, 3)), rtol=1e-12)


def test_masks():
  board = checkerboard(3, 4, parity=1)[..., 0]
  rows, cols = np.indices((3, 4))
  np.testing.assert_array_equal(board, (rows + cols) % 2 == 1)
  np.testing.assert_array_equal(checkerboard(3, 4, 0)[..., 0], 1 - board)
  np.testing.assert_array_equal(channel_mask(4, 0).ravel(), [1, 1, 0, 0])
  np.testing.assert_array_equal(channel_mask(4, 1).ravel(), [0, 0, 1, 1])
  with pytest.raises(ValueError, match='even number of channels'):
    channel_mask(3, 0)


def test_coupling_runs_its_network_once_per_direction():
  calls = []
  net = CouplingNet(2, num_filters=4, num_blocks=1)

  def counting_net(x, training=False):
    calls.append(1)
    return net(x, training=training)

  coupling = AffineCoupling(checkerboard(4, 4, 0), counting_net, SHAPE)
  x = _normal([2, *SHAPE], tf.float32)
  y, _ = coupling.forward_and_log_det(x)
  coupling.inverse_and_log_det(y)
  assert len(calls) == 2


def test_squeeze_layout_round_trip_and_shapes(dtype):
  squeeze = Squeeze([4, 6, 3], dtype=dtype)
  x = _normal([2, 4, 6, 3], dtype)
  y, _ = _check_bijector(squeeze, x, dtype)
  assert y.shape == (2, 2, 3, 12)
  # y[i, j, (2a + b) C + c] = x[2i + a, 2j + b, c]
  for i, j, a, b, c in [(0, 0, 0, 1, 2), (1, 2, 1, 0, 1), (1, 1, 1, 1, 0)]:
    assert y[1, i, j, (2 * a + b) * 3 + c] == x[1, 2 * i + a, 2 * j + b, c]
  assert squeeze.forward_event_shape([4, 6, 3]) == [2, 3, 12]
  assert squeeze.inverse_event_shape([2, 3, 12]) == [4, 6, 3]
  np.testing.assert_array_equal(squeeze.forward_event_shape_tensor([4, 6, 3]), [2, 3, 12])
  np.testing.assert_array_equal(squeeze.inverse_event_shape_tensor([2, 3, 12]), [4, 6, 3])
  with pytest.raises(ValueError, match='even height and width'):
    Squeeze([5, 4, 1])


def test_batch_norm_inference_round_trip_and_log_det(dtype):
  norm = _batch_norm(dtype)
  _check_bijector(norm, _normal([3, *SHAPE], dtype), dtype)


def test_batch_norm_follows_training_flag():
  norm = BatchNorm(BatchStatistics(momentum=0.5), SHAPE)
  x = 3. + 2. * _normal([64, *SHAPE], tf.float32)
  stats = norm.keras_layers[0]
  y_train, ldj_train = norm.forward_and_log_det(x, training=True)
  # Training: normalized by the batch's statistics, running averages moved half way.
  np.testing.assert_allclose(tf.reduce_mean(y_train, [0, 1, 2]), 0., atol=1e-4)
  np.testing.assert_allclose(tf.math.reduce_variance(y_train, [0, 1, 2]), 1., atol=1e-3)
  batch_mean = tf.reduce_mean(x, [0, 1, 2])
  np.testing.assert_allclose(stats.moving_mean, 0.5 * batch_mean, rtol=1e-5)
  batch_var = tf.math.reduce_variance(x, [0, 1, 2])
  np.testing.assert_allclose(ldj_train, np.full(64, -8. * np.log(batch_var + 1e-4).sum()),
                             rtol=1e-4)
  # Inference: the running averages, nothing updated.
  y_eval, ldj_eval = norm.forward_and_log_det(x)
  moving_var = stats.moving_variance.numpy()
  np.testing.assert_allclose(y_eval, (x - stats.moving_mean) / np.sqrt(moving_var + 1e-4),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ldj_eval, -8. * np.log(moving_var + 1e-4).sum(), rtol=1e-5)
  np.testing.assert_allclose(stats.moving_mean, 0.5 * batch_mean, rtol=1e-5)
  # The inverse always uses running averages, even when asked to train.
  np.testing.assert_allclose(norm.inverse(y_eval, training=True), x, rtol=1e-4, atol=1e-4)


def _batch_norm_training_gradients(x, compile_mode):
  """A loss on BatchNorm's training-mode output and log-det: its value and gradient at `x`, and
  the same from autodiff through the formula on `synchronized_moments` (the reference)."""
  from tfp_realnvp.bijectors.batch_norm import synchronized_moments
  norm = BatchNorm(BatchStatistics(momentum=0.5, dtype=x.dtype.name), SHAPE, dtype=x.dtype)
  rng = np.random.default_rng(3)
  weights = tf.constant(rng.normal(size=x.shape), x.dtype)
  per_example = tf.constant(rng.uniform(0.5, 2., x.shape[:1]), x.dtype)

  def loss(y, log_det):
    return tf.reduce_sum(weights * y * y) + tf.reduce_sum(per_example * log_det)

  def ours(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      value = loss(*norm.forward_and_log_det(x, training=True))
    return value, tape.gradient(value, x)

  def reference(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      mean, variance = synchronized_moments(x)
      log_std = 0.5 * tf.math.log(variance + 1e-4)
      y = (x - mean) * tf.exp(-log_std)
      value = loss(y, tf.fill(tf.shape(x)[:1], 16. * tf.reduce_sum(-log_std)))
    return value, tape.gradient(value, x)
  if compile_mode != 'eager':
    ours, reference = (tf.function(f, jit_compile=compile_mode == 'xla')
                       for f in (ours, reference))
  return ours(tf.identity(x)), reference(tf.identity(x))


@pytest.mark.parametrize('compile_mode', ['eager', 'function', 'xla'])
def test_batch_norm_training_gradient_is_autodiffs_through_the_statistics(dtype, compile_mode):
  # The batch's mean and variance depend on x; the custom gradient keeps that dependence (through
  # the output and the log-det) in a few ops.
  x = 3. + 2. * _normal([8, *SHAPE], dtype)
  (value, gradient), (expected_value, expected) = _batch_norm_training_gradients(
      x, compile_mode)
  tol = TOLERANCE[dtype]
  np.testing.assert_allclose(value, expected_value, rtol=tol)
  assert np.abs(expected).max() > 1e-2
  np.testing.assert_allclose(gradient, expected, rtol=tol * 10, atol=tol * 10)


def test_batch_norms_of_one_shape_share_one_trace_in_training():
  # Each batch norm traced into a training step's graph was some 60 ops with its gradient; one
  # shared function per shape keeps the graph (and the first step) small.
  from tfp_realnvp.bijectors import batch_norm
  shape = (3, 5, 2)  # a shape no other test traces
  first, second = (BatchNorm(BatchStatistics(momentum=0.5), shape) for _ in range(2))
  x = 3. + 2. * _normal([8, *shape], tf.float32)

  @tf.function
  def step(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y, log_det = first.forward_and_log_det(x, training=True)
      z, second_log_det = second.forward_and_log_det(2. * y + 1., training=True)
      loss = tf.reduce_sum(z * z) + tf.reduce_sum(log_det + second_log_det)
    return y, tape.gradient(loss, x)
  before = batch_norm._normalize_traced.experimental_get_tracing_count()
  graph = step.get_concrete_function(x).graph
  assert batch_norm._normalize_traced.experimental_get_tracing_count() == before + 1
  # The statistics are computed in the shared function, not in the step's graph.
  assert not [op.type for op in graph.get_operations()
              if op.type in ('Square', 'RealDiv', 'StopGradient')]
  y, _ = step(x)
  # each norm's running averages moved half way (momentum 0.5) to its own batch's statistics
  for norm, inputs in ((first, x.numpy()), (second, 2. * y.numpy() + 1.)):
    stats = norm.keras_layers[0]
    np.testing.assert_allclose(stats.moving_mean, 0.5 * inputs.mean((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(stats.moving_variance, 0.5 + 0.5 * inputs.var((0, 1, 2)),
                               rtol=1e-5)


def test_batch_norm_training_with_an_unknown_batch_size_matches_a_known_one():
  # With the batch size known while tracing, the count of values is a Python number (no ops).
  x = 3. + 2. * _normal([8, *SHAPE], tf.float32)
  results = []
  for signature in ([8, *SHAPE], [None, *SHAPE]):
    norm = BatchNorm(BatchStatistics(momentum=0.5), SHAPE)

    @tf.function(input_signature=[tf.TensorSpec(signature, tf.float32)])
    def run(x, norm=norm):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y, log_det = norm.forward_and_log_det(x, training=True)
        loss = tf.reduce_sum(tf.sin(y)) + tf.reduce_sum(log_det)
      return y, log_det, tape.gradient(loss, x)
    stats = norm.keras_layers[0]
    results.append([*run(tf.identity(x)), stats.moving_mean, stats.moving_variance])
  for known, unknown in zip(*results):
    np.testing.assert_array_equal(known, unknown)


def test_synchronized_batch_norm_gradient_on_two_replicas_is_the_whole_batchs():
  # Each replica's loss is its half's; their gradients are the whole batch's on one device,
  # with 3 collectives per replica (the sums with the count, the deviations, and one backward).
  from tfp_realnvp import training
  x = 3. + 2. * _normal([8, *SHAPE], tf.float64)
  rng = np.random.default_rng(5)
  weights = tf.constant(rng.normal(size=x.shape))
  # uneven per replica: each replica's share of the log-det's gradient differs
  per_example = tf.constant([0.5, 1., 1.5, 2., 3., 4., 5., 6.], tf.float64)
  norm = BatchNorm(BatchStatistics(momentum=0.5, dtype='float64'), SHAPE, dtype=tf.float64)

  def run(x, weights, per_example):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y, log_det = norm.forward_and_log_det(x, training=True)
      value = tf.reduce_sum(weights * y * y) + tf.reduce_sum(per_example * log_det)
    return tape.gradient(value, x)
  expected = run(tf.identity(x), weights, per_example)
  devices = [d.name for d in tf.config.list_logical_devices('CPU')]
  strategy = training.mirrored_strategy(devices)
  halves = [strategy.experimental_distribute_values_from_function(
      lambda context, t=t: t[4 * context.replica_id_in_sync_group:][:4])
      for t in (x, weights, per_example)]
  step = tf.function(lambda *halves: strategy.run(run, args=halves))
  graph = step.get_concrete_function(*halves).graph.as_graph_def()
  got = np.concatenate(strategy.experimental_local_results(step(*halves)))
  np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
  collectives = sum(node.op.startswith('CollectiveReduce') for nodes in
                    [graph.node, *(f.node_def for f in graph.library.function)] for node in nodes)
  assert collectives == 2 * 3


def test_unsynchronized_batch_norm_on_two_replicas_is_each_halfs_own():
  # Each replica runs the shared function on its half; the running averages (aggregated by
  # mean) move to the mean of the two halves' updates.
  from tfp_realnvp import training
  x = 3. + 2. * _normal([8, *SHAPE], tf.float32)
  rng = np.random.default_rng(6)
  weights = tf.constant(rng.normal(size=x.shape), tf.float32)

  def run(norm, x, weights):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y, log_det = norm.forward_and_log_det(x, training=True)
      value = tf.reduce_sum(weights * y * y) + tf.reduce_sum(log_det)
    return y, tape.gradient(value, x)
  expected, updates = [], []
  for half in (slice(0, 4), slice(4, 8)):  # each half alone, on one device
    alone = BatchNorm(BatchStatistics(momentum=0.5, synchronized=False), SHAPE)
    expected.append(run(alone, tf.identity(x[half]), weights[half]))
    stats = alone.keras_layers[0]
    updates.append((stats.moving_mean.numpy(), stats.moving_variance.numpy()))
  devices = [d.name for d in tf.config.list_logical_devices('CPU')]
  strategy = training.mirrored_strategy(devices)
  with strategy.scope():
    norm = BatchNorm(BatchStatistics(momentum=0.5, synchronized=False), SHAPE)
  halves = [strategy.experimental_distribute_values_from_function(
      lambda context, t=t: t[4 * context.replica_id_in_sync_group:][:4]) for t in (x, weights)]
  got = strategy.run(tf.function(lambda x, w: run(norm, x, w)), args=halves)
  for replica, (y, gradient) in enumerate(zip(*(strategy.experimental_local_results(t)
                                                 for t in got))):
    np.testing.assert_allclose(y, expected[replica][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gradient, expected[replica][1], rtol=1e-4, atol=1e-4)
  stats = norm.keras_layers[0]
  np.testing.assert_allclose(stats.moving_mean, np.mean([u[0] for u in updates], 0), rtol=1e-5)
  np.testing.assert_allclose(stats.moving_variance, np.mean([u[1] for u in updates], 0),
                             rtol=1e-5)
  halves = x.numpy()[:4], x.numpy()[4:]  # (momentum 0.5, from 0 and 1)
  np.testing.assert_allclose(stats.moving_mean, np.mean([0.5 * h.mean((0, 1, 2)) for h in halves],
                                                        0), rtol=1e-5)
  np.testing.assert_allclose(stats.moving_variance,
                             np.mean([0.5 + 0.5 * h.var((0, 1, 2)) for h in halves], 0), rtol=1e-5)


def test_logit_round_trip_log_det_and_formula(dtype):
  logit = Logit(SHAPE, dtype=dtype)
  x = tf.random.stateless_uniform([3, *SHAPE], [2, 0], 0., 256., dtype=dtype)
  y, fldj = _check_bijector(logit, x, dtype, atol_round_trip=1e-3 if dtype == tf.float32 else None)
  p = 0.05 + 0.9 * x.numpy() / 256.
  np.testing.assert_allclose(y, np.log(p / (1 - p)), rtol=1e-5, atol=1e-5)
  expected = np.sum(np.log(0.9 / 256.) - np.log(p) - np.log(1 - p), axis=(1, 2, 3))
  np.testing.assert_allclose(fldj, expected, rtol=1e-5)


def test_logit_inverse_of_extreme_latents_stays_inside_its_domain(dtype):
  # sigmoid(y) rounds to 0 or 1 for large |y|: x landed on the domain's edge, and log_prob with
  # validate_args refused a sample.
  logit = Logit(SHAPE, dtype=dtype, validate_args=True)
  y = tf.reshape(tf.constant([-200., -40., -20., 20., 40., 200.], dtype), [6, 1, 1, 1]) * tf.ones(
      [6, *SHAPE], dtype)
  x = logit.inverse(y)
  low, high = 256. * -0.05 / 0.9, 256. * 0.95 / 0.9
  assert (x.numpy() > np.asarray(low, dtype.as_numpy_dtype)).all()
  assert (x.numpy() < np.asarray(high, dtype.as_numpy_dtype)).all()
  y_again, log_det = logit.forward_and_log_det(tf.identity(x))  # checked: no error
  assert np.isfinite(y_again.numpy()).all() and np.isfinite(log_det.numpy()).all()


@pytest.mark.parametrize('bad', [-15., 271., np.nan])
def test_logit_rejects_inputs_outside_its_domain(bad):
  logit = Logit(SHAPE, validate_args=True)
  x = np.full([1, *SHAPE], 100., np.float32)
  x[0, 1, 2, 1] = bad
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"logit's domain \(-14.2, 270.2\)"):
    logit.forward(x)
  x[0, 1, 2, 1] = -14.
  assert np.isfinite(logit.forward(x)).all()


def test_factor_out_and_composition(dtype):
  squeeze = Squeeze(SHAPE, dtype=dtype)
  inner = Sequential([_coupling('checkerboard', 0, dtype, shape=(2, 2, 4), seed=3),
                      _batch_norm(dtype, shape=(2, 2, 4), seed=4)])
  flow = Sequential([_coupling('checkerboard', 1, dtype), _batch_norm(dtype, seed=1), squeeze,
                     _coupling('channel', 0, dtype, shape=(2, 2, 8), seed=2),
                     FactorOut((2, 2, 8), inner), Inverted(squeeze)])
  x = _normal([2, *SHAPE], dtype)
  y, _ = _check_bijector(flow, x, dtype)
  assert y.shape == x.shape
  assert len(flow.keras_layers) == 5


def test_leading_batch_shapes_and_single_events():
  coupling = _coupling('checkerboard', 0, tf.float32)
  x = _normal([2, 3, *SHAPE], tf.float32)
  y, ldj = coupling.forward_and_log_det(x)
  assert y.shape == x.shape and ldj.shape == (2, 3)
  y_flat, ldj_flat = coupling.forward_and_log_det(tf.reshape(x, [6, *SHAPE]))
  np.testing.assert_allclose(tf.reshape(y, [6, *SHAPE]), y_flat, rtol=1e-6)
  np.testing.assert_allclose(tf.reshape(ldj, [6]), ldj_flat, rtol=1e-6)
  y0, ldj0 = coupling.forward_and_log_det(x[0, 0])
  assert y0.shape == SHAPE and ldj0.shape == ()


def test_bad_inputs_name_the_problem():
  coupling = _coupling('checkerboard', 0, tf.float32)
  with pytest.raises(ValueError, match=r'expected shape \[\.\.\., 4, 4, 2\].*\(2, 4, 4, 3\)'):
    coupling.forward(tf.zeros([2, 4, 4, 3]))
  with pytest.raises(ValueError, match=r'expected shape'):
    coupling.forward(tf.zeros([4, 4]))
  with pytest.raises(TypeError, match='expected a float32 tensor, got float64'):
    coupling.forward_and_log_det(tf.zeros([1, *SHAPE], tf.float64))
  with pytest.raises(ValueError, match='mask must broadcast'):
    AffineCoupling(checkerboard(3, 3, 0), coupling.network, SHAPE)
  with pytest.raises(ValueError, match='bijector on'):
    FactorOut((2, 2, 8), Squeeze((2, 2, 8)))
