"""The coupling networks' layers (`tfp_realnvp.nets`) the fused Adam and the clipping of the summed gradient (`compat`)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfp_realnvp import compat, nets, training
from tfp_realnvp.nets import network
from conftest import randomize


def _adam_steps(optimizer, dtype, steps=5):
  rng = np.random.default_rng(0)
  variables = [keras.Variable(rng.normal(size=shape).astype(dtype)) for shape in ([3, 4], [5])]
  optimizer.build(variables)
  initial = [v.numpy() for v in variables]

  @tf.function
  def step(i):
    gradients = [tf.sin(v.value * (i + 1.)) * 3. for v in variables]
    optimizer.apply_gradients(zip(gradients, variables))
  for i in range(steps):
    step(tf.constant(i, dtype))
  return initial, [v.numpy() for v in variables]


def _adam_by_hand(initial, steps=5, lr=0.1, beta_1=0.8, beta_2=0.95, epsilon=1e-3, clipnorm=2.):
  variables = [w.copy() for w in initial]
  m = [np.zeros_like(w) for w in variables]
  v = [np.zeros_like(w) for w in variables]
  lr = float(np.float32(lr))  # Keras keeps the learning rate in a float32 variable
  for t in range(1, steps + 1):
    gradients = [np.sin(w * t) * 3. for w in variables]
    norm = np.sqrt(sum(np.sum(g ** 2) for g in gradients))
    gradients = [g * min(1., clipnorm / norm) for g in gradients]
    for w, mw, vw, g in zip(variables, m, v, gradients):
      mw += (1. - beta_1) * (g - mw)
      vw += (1. - beta_2) * (g ** 2 - vw)
      w -= lr * np.sqrt(1. - beta_2 ** t) / (1. - beta_1 ** t) * mw / (np.sqrt(vw) + epsilon)
  return variables


def test_fused_adam_is_adam():
  kwargs = dict(learning_rate=0.1, beta_1=0.8, beta_2=0.95, epsilon=1e-3, global_clipnorm=2.)
  initial, ours = _adam_steps(compat.Adam(**kwargs), 'float64')
  for a, b in zip(ours, _adam_by_hand(initial)):
    np.testing.assert_allclose(a, b, rtol=1e-12)
  # And Keras' Adam, within float32 rounding.
  _, fused = _adam_steps(compat.Adam(**kwargs), 'float32')
  _, keras_ = _adam_steps(keras.optimizers.Adam(**kwargs), 'float32')
  for a, b in zip(fused, keras_):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_fused_adam_casts_its_step_constants_once_per_dtype_not_per_variable():
  def casts(count):
    variables = [keras.Variable(np.ones([2], 'float32')) for _ in range(count)]
    optimizer = compat.Adam(0.1)
    optimizer.build(variables)
    graph = tf.function(lambda: optimizer.apply_gradients(
        [(tf.ones([2]), v) for v in variables])).get_concrete_function().graph
    return sum(op.type == 'Cast' for op in graph.get_operations())
  assert casts(2) == casts(12)  # a cast per variable made Casts 6 per variable


def test_fused_adam_refuses_amsgrad():
  with pytest.raises(ValueError, match='amsgrad'):
    compat.Adam(amsgrad=True)


@pytest.mark.parametrize('sparse', [False, True])
def test_clipping_scales_every_gradient_by_the_global_norm(sparse):
  variables = [keras.Variable(np.zeros([4], 'float32')), keras.Variable(np.zeros([3], 'float32'))]
  optimizer = compat.clip_after_all_reduce(keras.optimizers.SGD(1.), clipnorm=2.)
  first = np.array([3., 0., 4., 0.], 'float32')
  gradient = (tf.IndexedSlices(tf.constant([[3.], [4.]]), tf.constant([0, 2]), tf.constant([4, 1]))
              if sparse else tf.constant(first))
  if sparse:
    variables[0] = keras.Variable(np.zeros([4, 1], 'float32'))
    first = first[:, None]
  optimizer.apply_gradients([(gradient, variables[0]), (tf.constant([0., 12., 0.]), variables[1])])
  scale = 2. / 13.  # the global norm is sqrt(9 + 16 + 144) = 13
  np.testing.assert_allclose(variables[0].numpy(), -scale * first, rtol=1e-6)
  np.testing.assert_allclose(variables[1].numpy(), [0., -12. * scale, 0.], rtol=1e-6)
  # A non-finite norm makes every gradient NaN (as tf.clip_by_global_norm), for the checks.
  variable = keras.Variable(np.zeros([2], 'float32'))
  compat.clip_after_all_reduce(keras.optimizers.SGD(1.), clipnorm=2.).apply_gradients(
      [(tf.constant([np.inf, 1.]), variable)])
  assert np.isnan(variable.numpy()).all()


def test_l2_decay_is_keras_l2_and_serializes():
  x = tf.constant(np.random.default_rng(0).normal(size=[3, 3, 4, 5]), tf.float32)
  np.testing.assert_allclose(nets.L2(5e-5)(x), keras.regularizers.L2(5e-5)(x), rtol=1e-6)
  restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(nets.L2(3e-4)))
  assert isinstance(restored, nets.L2) and restored.l2 == 3e-4


def test_l2_decay_gradient_is_two_l2_w_with_no_unused_op():
  @tf.function(autograph=False)
  def gradient(w):
    with tf.GradientTape() as tape:
      tape.watch(w)
      decay = nets.L2(5e-5)(w)
    return decay, tape.gradient(decay, w)
  w = tf.constant(np.random.default_rng(1).normal(size=[3, 3, 2, 4]), tf.float32)
  np.testing.assert_allclose(gradient(w)[1], 1e-4 * w.numpy(), rtol=1e-6)
  graph = gradient.get_concrete_function(w).graph
  used = {i.op.name for op in graph.get_operations() for i in op.inputs}
  used |= {t.op.name for t in graph.outputs}
  unused = [op.type for op in graph.get_operations() if op.name not in used]
  assert unused == [], unused  # (with the constant first, the tape made its gradient too)


def _batch_norm_pair(channels=3):
  ours = nets.BatchNormalization(momentum=0.9, epsilon=1e-4)
  reference = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-4)
  for layer in (ours, reference):
    layer.build([None, 5, 5, channels])
    layer.gamma.assign([1., 2., -0.5][:channels])
    layer.beta.assign([0.5, -1., 0.][:channels])
  return ours, reference


def _output_and_gradients(layer, x, training):
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x, training=training)
    loss = tf.reduce_sum(y * tf.sin(x))
  return [y, *tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])]


def test_batch_normalization_matches_keras_in_training():
  x = tf.constant(np.random.default_rng(1).normal(2., 3., [8, 5, 5, 3]), tf.float32)
  ours, reference = _batch_norm_pair()
  for a, b in zip(_output_and_gradients(ours, x, True), _output_and_gradients(reference, x, True)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ours.moving_mean, reference.moving_mean, rtol=1e-5)
  # Running averages of the unbiased batch variance (TF's fused kernel and PyTorch).
  count = 8 * 5 * 5
  unbiased = np.var(x.numpy(), axis=(0, 1, 2)) * count / (count - 1)
  np.testing.assert_allclose(ours.moving_variance, 0.9 + 0.1 * unbiased, rtol=1e-5)


def test_batch_normalization_uses_running_averages_in_inference():
  x = tf.constant(np.random.default_rng(2).normal(2., 3., [4, 5, 5, 3]), tf.float32)
  ours, reference = _batch_norm_pair()
  for layer in (ours, reference):
    layer.moving_mean.assign([1., -2., 0.5])
    layer.moving_variance.assign([4., 0.5, 2.])
  for a, b in zip(_output_and_gradients(ours, x, False),
                  _output_and_gradients(reference, x, False)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(ours.moving_mean, [1., -2., 0.5])


def test_batch_normalization_float64_path_matches_the_fused_kernel():
  x = np.random.default_rng(3).normal(1., 2., [8, 4, 4, 3])
  layers = {}
  for dtype in ('float32', 'float64'):
    layers[dtype] = nets.BatchNormalization(0.9, 1e-4, dtype=dtype)
    layers[dtype].build([None, 4, 4, 3])
    layers[dtype].gamma.assign([1., 2., -0.5])
  y32 = layers['float32'](tf.constant(x, tf.float32), training=True)
  y64 = layers['float64'](tf.constant(x, tf.float64), training=True)
  np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-4)
  for name in ('moving_mean', 'moving_variance'):
    np.testing.assert_allclose(getattr(layers['float32'], name), getattr(layers['float64'], name),
                               rtol=1e-5)


def _coupling_net_gradients(net, x):
  @tf.function
  def step():
    with tf.GradientTape() as tape:
      s, t = net(x, training=True)
      loss = tf.reduce_sum(s * tf.cos(x[..., :2])) + tf.reduce_sum(t ** 2)
    return [s, t, *tape.gradient(loss, net.trainable_variables)]
  return step()


@pytest.mark.parametrize('recompute', ['batch_norm', 'blocks', 'networks'])
def test_a_recomputing_network_gives_autodiffs_gradients_and_one_update(recompute):
  x = tf.constant(np.random.default_rng(4).normal(size=[4, 6, 6, 3]), tf.float32)
  results = {}
  for level in ('none', recompute):
    net = nets.CouplingNet(channels=2, num_filters=8, num_blocks=2, recompute=level)
    net.build(x.shape)
    randomize([net], seed=5)
    results[level] = (_coupling_net_gradients(net, x),
                      [v.numpy() for v in net.non_trainable_variables])
  (plain, plain_moving), (recomputed, recomputed_moving) = results['none'], results[recompute]
  assert len(plain) == 2 + len(net.trainable_variables)
  for a, b in zip(plain, recomputed):
    assert np.abs(a).max() > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # The backward pass runs parts of the network again but must not update the running
  # averages again.
  for a, b in zip(plain_moving, recomputed_moving):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_recomputing_applies_where_its_custom_gradients_do():
  x32, x64, empty = tf.zeros([2, 4, 4, 3]), tf.zeros([2, 4, 4, 3], tf.float64), tf.zeros([0, 4, 4, 3])
  for level in nets.NETWORK_RECOMPUTE:
    assert nets.plan(level, x32, True, True) == (level, True)  # one replica
    assert nets.plan(level, x32, False, True) == ('none', False)  # inference: nothing to keep
  for level in ('batch_norm', 'blocks'):  # float64 and empty batches: autodiff's tensors
    assert nets.plan(level, x64, True, True) == ('none', True)
    assert nets.plan(level, empty, True, False) == ('none', True)
  assert nets.plan('networks', x64, True, True) == ('networks', True)
  with pytest.raises(ValueError, match="recompute must be one of none, batch_norm, blocks, "
                     "networks, got 'largest_blocks'"):
    nets.plan('largest_blocks', x32, True, True)


def test_residual_blocks_of_one_shape_share_one_trace():
  net = nets.CouplingNet(channels=2, num_filters=7, num_blocks=3)  # 7 features: a new shape
  x = tf.zeros([2, 6, 6, 3])
  net.build(x.shape)
  before = network._block_traced.experimental_get_tracing_count()
  tf.function(lambda: net(x, training=True))()
  assert network._block_traced.experimental_get_tracing_count() == before + 1


def _backward_calls(graph):
  return [op for op in graph.get_operations() if op.type.endswith('PartitionedCall') and
          op.get_attr('f').name.startswith('__inference___backward')]


def test_backward_calls_of_the_shared_functions_get_no_constant_inputs():
  # Constant inputs (zero gradients for the running averages' updates) made grappler specialize
  # a shared backward function per call site: a copy optimized and instantiated per block.
  first, second = (nets.CouplingNet(channels=2, num_filters=4, num_blocks=2) for _ in range(2))
  x = tf.random.normal([2, 4, 4, 2])
  first.build(x.shape)
  second.build(x.shape)
  weights = first.trainable_weights + second.trainable_weights

  @tf.function
  def gradient(x):
    with tf.GradientTape() as tape:
      s, t = first(x, training=True)
      s, t = second(x + s + t, training=True)  # (s = t = 0 at the start)
      loss = tf.reduce_sum(s) + tf.reduce_sum(t)
    return tape.gradient(loss, weights)
  graph = gradient.get_concrete_function(x).graph
  network_calls = _backward_calls(graph)  # one per network, of one shared function
  assert len(network_calls) == 2
  assert len({call.get_attr('f').name for call in network_calls}) == 1
  network = graph._functions[network_calls[0].get_attr('f').name].graph
  block_calls = _backward_calls(network)
  assert len(block_calls) == 2  # one per block
  for call in network_calls + block_calls:
    assert not [i.op.type for i in call.inputs if i.op.type == 'Const']
  # The running averages are still updated (they leave the functions as bits).
  before = [(net.blocks.moving_mean.numpy(), net.norm_out.moving_mean.numpy())
            for net in (first, second)]
  gradient(tf.identity(x))
  for net, (blocks, out) in zip((first, second), before):
    changed = np.abs(net.blocks.moving_mean.numpy() - blocks).max(axis=-1)  # [block, unit]
    assert (changed > 0).all()
    assert (net.norm_out.moving_mean.numpy() != out).all()


def _unit_inputs(dtype, seed=0, channels=5, batch=3):
  rng = np.random.default_rng(seed)
  x = tf.constant(rng.normal(1., 2., [batch, 6, 6, channels]), dtype)
  f32 = lambda a: tf.constant(a, tf.float32)  # noqa: E731  batch norm statistics stay float32
  norm = (f32(rng.uniform(0.5, 2., [channels])), f32(rng.normal(0., 1., [channels])),
          f32(rng.normal(0., 1., [channels])), f32(rng.uniform(0.5, 2., [channels])))
  conv = (tf.constant(rng.normal(0., 0.3, [3, 3, channels, 4]), dtype),
          tf.constant(rng.uniform(0.5, 2., [4]), dtype), tf.constant(rng.normal(0., 1., [4]), dtype))
  return x, norm, conv


def _unit_and_gradients(x, norm, conv, keep_only_inputs, compile_mode):
  """bn_relu_conv's output, running-average updates and gradients (x, gamma, beta, v, g, bias)."""
  def run(x, norm, conv):
    with tf.GradientTape() as tape:
      tape.watch([x, *norm[:2], *conv])
      y, updated = nets.bn_relu_conv(x, norm, conv, True, 0.9, 1e-4,
                                     keep_only_input=keep_only_inputs)
      loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.sin(tf.cast(y, tf.float32)))
    return [y, *updated, *tape.gradient(loss, [x, *norm[:2], *conv])]
  if compile_mode != 'eager':
    run = tf.function(run, jit_compile=compile_mode == 'xla')
  return [np.asarray(tf.cast(t, tf.float32)) for t in run(x, norm, conv)]


@pytest.mark.parametrize('compile_mode', ['eager', 'function', 'xla'])
@pytest.mark.parametrize('dtype', [tf.float32, tf.bfloat16])
def test_bn_relu_conv_recomputed_in_the_backward_pass_gives_autodiffs_gradient(dtype, compile_mode):
  x, norm, conv = _unit_inputs(dtype)
  kept = _unit_and_gradients(x, norm, conv, False, compile_mode)
  recomputed = _unit_and_gradients(x, norm, conv, True, compile_mode)
  assert len(kept) == 1 + 2 + 6
  tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == tf.float32 else dict(rtol=2e-2, atol=2e-2)
  for name, a, b in zip(['y', 'mean', 'variance', 'dx', 'dgamma', 'dbeta', 'dv', 'dg', 'dbias'],
                        kept, recomputed):
    assert np.all(np.isfinite(b)), name
    assert np.abs(a).max() > 1e-3, name  # every gradient is non-trivial
    np.testing.assert_allclose(b, a, err_msg=name, **tolerance)


def _on_two_replicas(x, norm, conv):
  """bn_relu_conv on two replicas (half the batch each, statistics synchronized): per replica,
  its output, updates and gradients (as `_unit_and_gradients`), the collective ops a replica
  runs, and what `plan` gives a network there."""
  devices = [d.name for d in tf.config.list_logical_devices('CPU')]
  assert len(devices) == 2, 'conftest configures two logical CPU devices'
  strategy = training.mirrored_strategy(devices)
  half = x.shape[0] // 2
  halves = strategy.experimental_distribute_values_from_function(
      lambda context: x[context.replica_id_in_sync_group * half:][:half])
  plans = set()

  def run(x):
    plans.add(nets.plan('blocks', x, True, True))
    with tf.GradientTape() as tape:
      tape.watch([x, *norm[:2], *conv])
      y, updated = nets.bn_relu_conv(x, norm, conv, True, 0.9, 1e-4)
      loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.sin(tf.cast(y, tf.float32)))
    return [y, *updated, *tape.gradient(loss, [x, *norm[:2], *conv])]
  step = tf.function(lambda x: strategy.run(run, args=(x,)))
  graph = step.get_concrete_function(halves).graph.as_graph_def()
  results = step(halves)
  collectives = sum(node.op.startswith('CollectiveReduce') for nodes in
                    [graph.node, *(f.node_def for f in graph.library.function)] for node in nodes)
  per_replica = [[np.asarray(tf.cast(t, tf.float32)) for t in strategy.experimental_local_results(r)]
                 for r in results]
  return per_replica, collectives // 2, plans


@pytest.mark.parametrize('dtype', [tf.float32, tf.float64, tf.bfloat16])
def test_synchronized_bn_relu_conv_gives_the_whole_batchs_results(dtype):
  # Two replicas with synchronized statistics must give what one device gives on the whole
  # batch (autodiff's tensors: the custom gradients that keep less take one replica's
  # statistics, and `plan` says so).
  x, norm, conv = _unit_inputs(dtype, batch=4)
  whole = _unit_and_gradients(x, norm, conv, False, 'function')
  per_replica, collectives, plans = _on_two_replicas(x, norm, conv)
  assert collectives == 4  # the moments forward, their gradients backward
  assert plans == {('none', False)}
  names = ['y', 'mean', 'variance', 'dx', 'dgamma', 'dbeta', 'dv', 'dg', 'dbias']
  for name, expected, (first, second) in zip(names, whole, per_replica):
    if name in ('y', 'dx'):  # each replica's rows
      got = np.concatenate([first, second])
    elif name in ('mean', 'variance'):  # the same running averages on both
      np.testing.assert_array_equal(first, second)
      got = first
    else:  # each replica's part of the weights' gradient: the optimizer adds them
      got = first + second
    assert np.abs(expected).max() > 1e-3, name
    # bfloat16: halves rounded apart, so within its 8 bits of the tensor's scale
    tolerance = (dict(rtol=2e-2, atol=1e-2 * np.abs(expected).max()) if dtype == tf.bfloat16
                 else dict(rtol=1e-5, atol=1e-5))
    np.testing.assert_allclose(got, expected, err_msg=name, **tolerance)


def _saved_activations(recompute):
  """The distinct activation-sized tensors a residual block's forward pass keeps for its backward
  pass (Identity aliases resolved), besides its output."""
  x, norm, conv = _unit_inputs(tf.float32, channels=4)
  conv = (conv[0][..., :4], conv[1], conv[2])
  block = tf.function(nets.residual_block, autograph=False,
                      experimental_attributes={'_noinline': True})

  @tf.function
  def step(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y, _ = block(x, norm, conv, norm, conv, True, 0.9, 1e-4, True, recompute)
    return tape.gradient(y, x)
  graph = step.get_concrete_function(x).graph
  forward, = [f for name, f in graph._functions.items() if name.startswith('__forward')]
  outputs = forward.graph.outputs

  def source(t):
    while t.op.type in ('Identity', 'IdentityN'):
      t = t.op.inputs[t.value_index]
    return t
  output = source(outputs[0])
  return {(s.op.type, s.name) for s in map(source, outputs[1:])
          if s.shape == x.shape and s.ref() != output.ref()}


def test_residual_block_keeps_what_its_recompute_level_says():
  # Autodiff keeps x (batch norm 1), relu(bn1(x)) (conv 1), conv 1's output (batch norm 2) and
  # relu(bn2(.)) (conv 2); recomputing batch norm and ReLU keeps x and conv 1's output only;
  # recomputing the first convolution too keeps the block's input alone.
  assert sorted(op for op, _ in _saved_activations('none')) == ['BiasAdd', 'Placeholder', 'Relu',
                                                                'Relu']
  assert sorted(op for op, _ in _saved_activations('batch_norm')) == ['BiasAdd', 'Placeholder']
  assert sorted(op for op, _ in _saved_activations('blocks')) == ['Placeholder']


def _block_and_gradients(x, norm1, conv1, norm2, conv2, recompute, compile_mode):
  """residual_block's output, running-average updates and gradients (x, then each unit's gamma,
  beta, v, g, bias)."""
  def run(x, norm1, conv1, norm2, conv2):
    with tf.GradientTape() as tape:
      tape.watch([x, *norm1[:2], *conv1, *norm2[:2], *conv2])
      y, updated = nets.residual_block(x, norm1, conv1, norm2, conv2, True, 0.9, 1e-4,
                                       recompute=recompute)
      loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.sin(tf.cast(y, tf.float32)))
    return [y, *updated, *tape.gradient(loss, [x, *norm1[:2], *conv1, *norm2[:2], *conv2])]
  if compile_mode != 'eager':
    run = tf.function(run, jit_compile=compile_mode == 'xla')
  return [np.asarray(tf.cast(t, tf.float32)) for t in run(x, norm1, conv1, norm2, conv2)]


def _block_inputs(dtype):
  """A residual block's input and weights `(x, norm1, conv1, norm2, conv2)`, 4 channels."""
  x, norm1, conv1 = _unit_inputs(dtype, seed=1, channels=4)
  _, norm2, conv2 = _unit_inputs(dtype, seed=2, channels=4)
  square = lambda conv: (conv[0][..., :4], *conv[1:])  # noqa: E731  4 -> 4 channels
  return x, norm1, square(conv1), norm2, square(conv2)


_BLOCK_RESULTS = ['y', 'mean1', 'variance1', 'mean2', 'variance2', 'dx',
                  *(f'{w}{unit}' for unit in (1, 2) for w in ('dgamma', 'dbeta', 'dv', 'dg', 'dbias'))]


@pytest.mark.parametrize('compile_mode', ['eager', 'function', 'xla'])
def test_residual_block_recomputing_its_first_convolution_gives_the_same_gradient(compile_mode):
  inputs = _block_inputs(tf.float32)
  kept = _block_and_gradients(*inputs, 'none', compile_mode)
  recomputed = _block_and_gradients(*inputs, 'blocks', compile_mode)
  assert len(kept) == len(recomputed) == len(_BLOCK_RESULTS)
  for name, a, b in zip(_BLOCK_RESULTS, kept, recomputed):
    assert np.all(np.isfinite(b)), name
    # every gradient is non-trivial, but the first bias's: batch norm 2 removes its constant
    assert name == 'dbias1' or np.abs(a).max() > 1e-3, name
    np.testing.assert_allclose(b, a, err_msg=name, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('compile_mode', ['eager', 'function', 'xla'])
def test_residual_block_recomputing_in_bfloat16_is_as_close_to_float32(compile_mode):
  # In bfloat16 the recomputed convolution may round otherwise than the forward pass's (fused
  # or not) and a ReLU may flip: the check is the distance to float32's results, which must be
  # no worse than keeping the activations.
  reference = _block_and_gradients(*_block_inputs(tf.float32), 'none', compile_mode)
  inputs = _block_inputs(tf.bfloat16)
  kept = _block_and_gradients(*inputs, 'none', compile_mode)
  recomputed = _block_and_gradients(*inputs, 'blocks', compile_mode)
  for name, exact, a, b in zip(_BLOCK_RESULTS, reference, kept, recomputed):
    if name in ('dg1', 'dbias1'):  # 0 in exact arithmetic: batch norm 2 undoes them
      continue
    scale = np.abs(exact).max()
    error_kept, error = (np.abs(t - exact).max() / scale for t in (a, b))
    assert error_kept < 0.05, name
    assert error <= 1.5 * error_kept + 0.005, (name, error, error_kept)


@pytest.mark.parametrize('recompute', ['batch_norm', 'blocks'])
def test_a_network_recomputing_its_blocks_takes_the_block_that_keeps_its_input(recompute,
                                                                               monkeypatch):
  calls = []
  keeping_input = network.residual_block_keeping_input

  def spy(*args):
    calls.append(1)
    return keeping_input(*args)
  monkeypatch.setattr(network, 'residual_block_keeping_input', spy)
  # a shape of its own (9 or 10 features), so the shared block function is traced here
  net = nets.CouplingNet(channels=2, num_filters=9 + (recompute == 'blocks'), num_blocks=3,
                         recompute=recompute)
  x = tf.random.normal([2, 6, 6, 2])
  net.build(x.shape)
  _coupling_net_gradients(net, x)
  assert len(calls) == (1 if recompute == 'blocks' else 0)  # one trace serves the 3 blocks


@pytest.mark.parametrize('recompute', ['none', 'batch_norm', 'blocks', 'networks'])
def test_each_level_reaches_the_code_that_keeps_less(recompute, monkeypatch):
  calls = {'unit': 0, 'block': 0, 'network': 0}

  def spy(name, function):
    def counted(*args, **kwargs):
      calls[name] += 1
      return function(*args, **kwargs)
    return counted
  monkeypatch.setattr(network, 'bn_relu_conv_keeping_input',
                      spy('unit', network.bn_relu_conv_keeping_input))
  monkeypatch.setattr(network, 'residual_block_keeping_input',
                      spy('block', network.residual_block_keeping_input))
  monkeypatch.setattr(network.tf, 'recompute_grad', spy('network', tf.recompute_grad))
  # a shape of its own (11 features), so the shared functions are traced here
  net = nets.CouplingNet(channels=2, num_filters=11, num_blocks=1, recompute=recompute)
  x = tf.random.normal([2, 6, 6, 2])
  net.build(x.shape)
  _coupling_net_gradients(net, x)
  # the output unit keeps only its input from batch_norm up to blocks; networks runs autodiff
  # inside its rerun
  assert calls == {'unit': int(recompute in ('batch_norm', 'blocks')) * (
      1 + 2 * (recompute == 'batch_norm')), 'block': int(recompute == 'blocks'),
                   'network': int(recompute == 'networks')}, calls
  with pytest.raises(ValueError, match='for training'):
    nets.residual_block(x, *[None] * 4, False, 0.9, 1e-4, recompute='blocks')


def test_recompute_levels_per_network():
  from tfp_realnvp import RealNVP
  def levels(**overrides):
    model = RealNVP('cifar10', image_shape=(8, 8, 3), num_blocks=1, num_filters=4, **overrides)
    nets_ = [layer for layer in model.flow_layers if isinstance(layer, nets.CouplingNet)]
    return [(n.blocks.v.shape[-1], n.recompute) for n in nets_]
  # real_nvp layout, 2 scales: 3 checkerboard networks on 8x8 maps of 4 features (256 values),
  # 3 channel networks on 4x4x8 (128) and 4 final checkerboard networks on 4x4x8
  largest = [(4, 'blocks')] * 3 + [(8, 'batch_norm')] * 7
  assert levels(recompute='largest_blocks') == largest
  assert levels(recompute='largest_blocks', compute_dtype='bfloat16') == largest
  for level in ('none', 'batch_norm', 'blocks', 'networks'):
    assert levels(recompute=level) == [(4, level)] * 3 + [(8, level)] * 7
  # auto: largest_blocks in float32, none under mixed precision (half the activation memory
  # already)
  assert levels() == largest
  assert levels(compute_dtype='bfloat16') == [(4, 'none')] * 3 + [(8, 'none')] * 7
  # glow layout: each scale squeezes first, the same features at every scale: the first
  # scale's 2 couplings (4x4 maps) recompute their blocks, the second's (2x2) not
  assert levels(layout='glow', steps_per_scale=2) == [(4, 'blocks')] * 2 + [(4, 'batch_norm')] * 2


def test_replicas_never_share_one_traced_network_function():
  # Replicas run in threads of their own: through one traced function they would call it at
  # once (the oneDNN kernels of the next test's crash). One replica may share it.
  x = tf.zeros([2, 4, 4, 3])
  devices = [d.name for d in tf.config.list_logical_devices('CPU')]
  assert len(devices) == 2, 'conftest configures two logical CPU devices'
  for replicas, expected in ((devices, False), (devices[:1], True)):
    strategy = training.mirrored_strategy(replicas)
    shared = []
    strategy.run(lambda: shared.append(network.plan('batch_norm', x, True, False)[1]))
    assert shared == [expected] * len(replicas), replicas
  assert network.plan('batch_norm', x, True, False) == ('batch_norm', True)  # no strategy


def test_one_graph_may_run_many_flow_passes_at_once():
  # Independent passes in one graph (a log-density per class, several dequantization draws) run
  # concurrently. Through one shared block function they shared its oneDNN kernels and the
  # process crashed (a segmentation fault by the third call on this machine's CPU).
  from tfp_realnvp import RealNVP
  model = RealNVP('mnist', image_shape=(8, 8, 1), num_scales=2, num_blocks=1, num_filters=8)
  passes = lambda x: tf.stack([model.log_prob(x + 0.01 * k) for k in range(10)], -1)  # noqa: E731
  traced = tf.function(passes)
  x = tf.random.stateless_uniform([32, 8, 8, 1], [0, 1], 1., 255.)
  expected = passes(x)
  for seed in range(30):  # a race: it may take a few calls
    np.testing.assert_allclose(traced(tf.identity(x)), expected, rtol=1e-5)


def test_stacked_blocks_are_residual_blocks_on_their_slices():
  # Each block runs on its own slices of the stacked weights, and its running averages go back
  # to its own [block, unit] slots.
  layer = nets.ResidualBlocks(num_blocks=3, filters=4)
  x = tf.constant(np.random.default_rng(6).normal(1., 2., [3, 5, 5, 4]), tf.float32)
  layer.build(x.shape)
  randomize([layer], seed=7)
  stacked = [v.numpy() for v in (layer.v, layer.g, layer.bias, layer.gamma, layer.beta,
                                 layer.moving_mean, layer.moving_variance)]
  expected, means, variances = x, [], []
  for b in range(3):
    v, g, bias, gamma, beta, mean, variance = (tf.constant(w[b]) for w in stacked)
    expected, updated = nets.residual_block(
        expected, (gamma[0], beta[0], mean[0], variance[0]), (v[0], g[0], bias[0]),
        (gamma[1], beta[1], mean[1], variance[1]), (v[1], g[1], bias[1]), True, 0.9, 1e-4)
    means.append(updated[0::2])
    variances.append(updated[1::2])
  np.testing.assert_allclose(layer(x, training=True), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layer.moving_mean.numpy(), np.array(means), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(layer.moving_variance.numpy(), np.array(variances), rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(layer.moving_mean.numpy()[0], layer.moving_mean.numpy()[1])


def test_a_network_without_residual_blocks_trains():
  net = nets.CouplingNet(channels=2, num_filters=4, num_blocks=0)
  x = tf.random.normal([2, 4, 4, 2])
  net.build(x.shape)
  before = net.norm_out.moving_mean.numpy()
  _coupling_net_gradients(net, x)
  assert (net.norm_out.moving_mean.numpy() != before).all()
