"""Training: the loss is exact under MirroredStrategy (real digits learn: test_real_digits)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import randomize
import tfp_realnvp as rn
from tfp_realnvp import training


# A large learning rate, so that a wrongly scaled gradient shows in the second epoch's loss, and a
# clipping norm below the gradient's, so that clipping per replica instead of globally shows too.
SMALL = rn.RealNVPConfig((8, 8, 2), num_scales=1, num_blocks=1, num_filters=4, learning_rate=1e-2,
                         clipnorm=1e-3)


def _train_and_evaluate(strategy, weights, train, test):
  with strategy.scope():
    model = rn.RealNVP(SMALL)
    model.set_weights(weights)
    model.compile()
  history = model.fit(train, batch_size=16, epochs=2, shuffle=False, verbose=0)
  evaluated = model.evaluate(test, batch_size=16, verbose=0, return_dict=True)
  return history.history, evaluated


def test_mirrored_strategy_gives_the_single_device_loss():
  devices = tf.config.list_logical_devices('CPU')
  assert len(devices) == 2, 'conftest configures two logical CPU devices'
  rng = np.random.default_rng(0)
  # Pre-dequantized float pixels: the same data on every replica count.
  train = rng.uniform(0, 256, [64, 8, 8, 2]).astype(np.float32)
  train[..., 0] = train[..., 1] * 0.5 + 60  # something to learn
  test = rng.uniform(0, 256, [32, 8, 8, 2]).astype(np.float32)
  reference = rn.RealNVP(SMALL)
  randomize(reference.flow_layers, seed=2, scale=0.1, variance=(0.8, 1.2))
  weights = reference.get_weights()
  one = _train_and_evaluate(tf.distribute.OneDeviceStrategy(devices[0].name), weights, train, test)
  two = _train_and_evaluate(training.mirrored_strategy([d.name for d in devices]), weights,
                            train, test)
  for key in ('loss', 'bits_per_dim'):
    np.testing.assert_allclose(two[0][key], one[0][key], rtol=1e-4)
    assert two[1][key] == pytest.approx(one[1][key], rel=1e-4)
  # The second epoch saw updated weights, by a margin well above the tolerance.
  assert abs(one[0]['bits_per_dim'][1] - one[0]['bits_per_dim'][0]) > 3e-3


def test_unsynchronized_batch_norm_takes_each_replicas_batch_without_collectives():
  from tfp_realnvp import benchmark
  devices = [d.name for d in tf.config.list_logical_devices('CPU')]
  images = np.random.default_rng(3).uniform(0, 256, [16, 8, 8, 2]).astype(np.float32)
  outputs = {}
  for sync in (True, False):
    config = SMALL.replace(sync_batch_norm=sync)
    reference = rn.RealNVP(config)
    randomize(reference.flow_layers, seed=2, scale=0.1, variance=(0.8, 1.2))
    # One device: the whole batch, and each half alone (batch statistics of 8 images).
    whole = reference(images, training=True).numpy()
    halves = np.concatenate([reference(images[:8], training=True).numpy(),
                             reference(images[8:], training=True).numpy()])
    strategy = training.mirrored_strategy(devices)
    with strategy.scope():
      model = rn.RealNVP(config)
      model.set_weights(reference.get_weights())
      model.compile()
    batch = next(iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(images).batch(16))))
    per_replica = tf.function(lambda x: strategy.run(
        lambda x: model(x, training=True), args=(x,)))(batch)
    outputs[sync] = (np.concatenate(strategy.experimental_local_results(per_replica)), whole,
                     halves, benchmark.collective_ops_per_step(model, strategy, images))
  synced, whole, halves, collectives = outputs[True]
  np.testing.assert_allclose(synced, whole, rtol=1e-5)  # the global batch's statistics
  assert collectives['batch_norm'] > 0
  unsynced, whole, halves, collectives = outputs[False]
  np.testing.assert_allclose(unsynced, halves, rtol=1e-5)  # each replica's own
  assert np.abs(unsynced - whole).max() > 1e-3  # and that is a different loss
  assert collectives == {'gradient': 1, 'batch_norm': 0, 'other': 0}


def test_strategies_in_one_process_do_not_share_collective_keys():
  # With tf.distribute.MirroredStrategy itself, the second or third strategy fails: 'Shape
  # mismatch in the collective instance 100'.
  devices = [d.name for d in tf.config.list_logical_devices('CPU')]
  for channels in (3, 2, 5):  # each strategy's first all-reduce, of another shape each time
    strategy = training.mirrored_strategy(devices)
    run = tf.function(lambda: strategy.run(lambda: tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, tf.ones([channels]))))
    for total in strategy.experimental_local_results(run()):
      np.testing.assert_array_equal(total, np.full([channels], 2.))


def test_xla_under_a_one_replica_mirrored_strategy_trains_as_without_it():
  # `launch.train` uses MirroredStrategy on one GPU. XLA cannot compile a mirrored variable's
  # assignment (a cross-replica merge): the running averages leave the compiled flow and are
  # assigned after it.
  device = tf.config.list_logical_devices('CPU')[0].name
  config = SMALL.replace(sync_batch_norm=False, clipnorm=100.)
  reference = rn.RealNVP(config)
  randomize(reference.flow_layers, seed=2, scale=0.1, variance=(0.8, 1.2))
  initial = reference.get_weights()
  train = np.random.default_rng(4).uniform(0, 256, [32, 8, 8, 2]).astype(np.float32)
  results = {}
  for jit_compile in (False, True):
    strategy = training.mirrored_strategy([device])
    with strategy.scope():
      model = rn.RealNVP(config)
      model.set_weights(initial)
      # SGD: Adam's steps on near-zero gradients would magnify XLA's rounding differences.
      model.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=jit_compile)
    history = model.fit(train, batch_size=16, epochs=1, shuffle=False, verbose=0)
    paths = [v.path for v in model.weights]
    results[jit_compile] = history.history['loss'], model.get_weights()
    compiled = getattr(model._flow_forward, 'compiled', None)
    assert (compiled is not None and compiled.experimental_get_tracing_count() > 0) == jit_compile
  (loss, weights), (xla_loss, xla_weights) = results[False], results[True]
  np.testing.assert_allclose(xla_loss, loss, rtol=1e-5)
  averages = [i for i, path in enumerate(paths) if 'moving_' in path]
  assert len(averages) > 10
  for i, path in enumerate(paths):  # (XLA's fusions round differently: 6e-6 seen on one device)
    np.testing.assert_allclose(xla_weights[i], weights[i], rtol=1e-4, atol=1e-5, err_msg=path)
  # Trained: every running average moved from its start, and the weights by well above the
  # tolerance.
  assert all(not np.allclose(weights[i], initial[i], rtol=1e-6, atol=0) for i in averages)
  assert max(np.abs(w - w0).max() for w, w0 in zip(weights, initial)) > 1e-2


def test_xla_on_several_replicas_is_a_clear_error():
  devices = [d.name for d in tf.config.list_logical_devices('CPU')]
  with training.mirrored_strategy(devices).scope():
    model = rn.RealNVP(SMALL.replace(sync_batch_norm=False))
    with pytest.raises(ValueError, match='jit_compile=True runs on one replica, not 2'):
      model.compile(jit_compile=True)



def test_a_keras_file_compiled_with_xla_loads_on_several_replicas(tmp_path):
  model = rn.RealNVP(SMALL)
  model.compile(jit_compile=True)
  path = str(tmp_path / 'xla.keras')
  model.save(path)
  devices = [d.name for d in tf.config.list_logical_devices('CPU')]
  with training.mirrored_strategy(devices).scope():
    with pytest.warns(UserWarning, match='XLA runs on one replica, not 2'):
      loaded = keras.models.load_model(path)
  assert loaded.compiled and not loaded.get_compile_config()['jit_compile']
  for a, b in zip(model.weights, loaded.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_actnorm_initialises_outside_xla():
  # The data-dependent initialisation runs outside the compiled flow, and training does not
  # reuse its trace.
  device = tf.config.list_logical_devices('CPU')[0].name
  config = SMALL.replace(normalization='actnorm')
  train = np.random.default_rng(5).uniform(0, 256, [32, 8, 8, 2]).astype(np.float32)
  with training.mirrored_strategy([device]).scope():
    model = rn.RealNVP(config)
    model.compile(jit_compile=True)
  assert model.needs_data_initialization()
  model.initialize_from_data(train[:16])  # as `fit` does on its first batch
  assert not model.needs_data_initialization()
  first = next(layer for layer in model.flow_layers
               if isinstance(layer, rn.bijectors.ActNormParameters))
  assert np.abs(first.log_scale.numpy()).min() > 0.1  # set from the data (it starts at 0)
  compiled = model._flow_forward.compiled
  assert compiled.experimental_get_tracing_count() == 0
  model.fit(train, batch_size=16, epochs=1, shuffle=False, verbose=0)
  # The compiled flow's traces (the training step's) assign nothing: no initialisation in them.
  traces = compiled._list_all_concrete_functions()
  assert traces and not [op for trace in traces for op in trace.graph.get_operations()
                         if op.type.startswith('Assign')]
  # On one device, through the public context as well.
  single = rn.RealNVP(config)
  single.compile(jit_compile=True)
  with rn.bijectors.data_dependent_init():
    single(train[:16], training=True)
  assert not single.needs_data_initialization()
  assert single._flow_forward.compiled.experimental_get_tracing_count() == 0
