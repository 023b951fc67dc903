"""The training step's lighter graph optimization (`tfp_realnvp.graph_options`)."""

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context

from tfp_realnvp import RealNVP, graph_options, training

RewriterConfig = rewriter_config_pb2.RewriterConfig


def _small_model(**overrides):
  model = RealNVP('mnist', image_shape=(8, 8, 1), num_scales=2, num_blocks=1, num_filters=4,
                  **overrides)
  model.compile()
  return model


def _rewrite_options(serialized):
  config = config_pb2.ConfigProto()
  config.ParseFromString(serialized)
  return config.graph_options.rewrite_options


def test_the_functions_a_training_step_calls_get_the_network_options():
  model = _small_model()
  graph = tf.function(model.train_step).get_concrete_function(
      tf.zeros([4, 8, 8, 1], tf.uint8)).graph
  calls = [op for op in graph.get_operations() if op.type.endswith('PartitionedCall')]
  names = {op.get_attr('f').name for op in calls}
  # the shared networks, forward and backward
  assert any('network' in n and 'backward' in n for n in names), names
  assert any('network' in n and 'backward' not in n for n in names), names
  gpu = graph_options.gpus_visible()
  for op in calls:
    rewrite = _rewrite_options(op.get_attr('config_proto'))
    assert rewrite.meta_optimizer_iterations == RewriterConfig.ONE, op.name
    assert rewrite.constant_folding == RewriterConfig.OFF, op.name
    assert rewrite.arithmetic_optimization == RewriterConfig.OFF, op.name
    # on a GPU the remapper fuses a convolution with its bias and the layout optimizer may pick
    # NCHW; on CPUs neither changes a node
    expected = RewriterConfig.DEFAULT if gpu else RewriterConfig.OFF
    assert rewrite.remapping == expected, op.name
    assert rewrite.layout_optimizer == expected, op.name
    assert not rewrite.disable_meta_optimizer, op.name


def test_the_networks_keep_the_gpu_passes_only_where_there_is_a_gpu():
  default = config_pb2.ConfigProto()
  on_gpu = graph_options.network_config(default, gpu=True).graph_options.rewrite_options
  assert on_gpu.remapping == on_gpu.layout_optimizer == RewriterConfig.DEFAULT
  assert on_gpu.memory_optimization == RewriterConfig.DEFAULT_MEM_OPT
  on_cpu = graph_options.network_config(default, gpu=False).graph_options.rewrite_options
  assert on_cpu.remapping == on_cpu.layout_optimizer == RewriterConfig.OFF
  assert on_cpu.memory_optimization == RewriterConfig.NO_MEM_OPT
  mine = config_pb2.ConfigProto()
  mine.graph_options.rewrite_options.remapping = RewriterConfig.ON
  mine = graph_options.network_config(mine, gpu=False).graph_options.rewrite_options
  assert mine.remapping == RewriterConfig.ON  # a setting the user made is kept


def test_without_onednn_the_networks_keep_the_remapper_on_cpus(monkeypatch):
  # Without oneDNN's graph rewrite (other builds, TF_ENABLE_ONEDNN_OPTS=0) only the remapper
  # fuses a convolution with its bias.
  monkeypatch.setattr(graph_options, 'onednn_enabled', lambda: False)
  rewrite = graph_options.network_config(config_pb2.ConfigProto(), gpu=False)
  assert rewrite.graph_options.rewrite_options.remapping == RewriterConfig.DEFAULT


def test_fit_calls_the_step_with_one_round_of_graph_optimization(monkeypatch):
  # as on a machine with a GPU, where the networks keep passes that the step turns off
  monkeypatch.setattr(graph_options, 'gpus_visible', lambda: True)
  model = _small_model()
  entered = []  # the options each call site made on this thread gets, in order
  function_call_config = graph_options.function_call_config

  def spy(config):
    entered.append(config)
    return function_call_config(config)
  monkeypatch.setattr(graph_options, 'function_call_config', spy)
  before = context.context().function_call_options.config_proto_serialized
  model.fit(np.full([8, 8, 8, 1], 128, np.uint8), batch_size=4, epochs=1, verbose=0)
  # restored after the call
  assert context.context().function_call_options.config_proto_serialized == before
  # the train function's call (the step), then train_step's, while the step is traced (once)
  assert len(entered) == 3, entered  # (the step's, the networks', then the step's again)
  step, networks = (config.graph_options.rewrite_options for config in entered[:2])
  assert step.meta_optimizer_iterations == networks.meta_optimizer_iterations == RewriterConfig.ONE
  # its networks run as functions: the passes that change nothing in the step's graph are off
  for name in ('layout_optimizer', 'remapping', 'loop_optimization', 'function_optimization',
               'implementation_selector'):
    assert getattr(step, name) == RewriterConfig.OFF, name
  assert step.memory_optimization == RewriterConfig.NO_MEM_OPT
  assert step.constant_folding == RewriterConfig.OFF  # (it changed little)
  assert step.common_subgraph_elimination == RewriterConfig.DEFAULT  # those that change it
  assert step.arithmetic_optimization == RewriterConfig.DEFAULT  # are kept
  # the networks get their own options, not the step's: the remapper, layout and memory
  # optimizers on (they inherited the step's when made inside it)
  assert networks.remapping == RewriterConfig.DEFAULT
  assert networks.layout_optimizer == RewriterConfig.DEFAULT
  assert networks.memory_optimization == RewriterConfig.DEFAULT_MEM_OPT
  assert networks.constant_folding == RewriterConfig.OFF
  function = model.train_function
  assert function.light_graph_options
  assert model.make_train_function() is function  # wrapped once


def test_settings_the_user_made_are_kept():
  config = config_pb2.ConfigProto()
  rewrite = config.graph_options.rewrite_options
  rewrite.constant_folding = RewriterConfig.ON
  rewrite.meta_optimizer_iterations = RewriterConfig.TWO
  rewrite.dependency_optimization = RewriterConfig.OFF
  light = graph_options.network_config(config).graph_options.rewrite_options
  assert light.constant_folding == RewriterConfig.ON
  assert light.meta_optimizer_iterations == RewriterConfig.TWO
  assert light.arithmetic_optimization == RewriterConfig.OFF  # left at its default: turned off
  step = graph_options.step_config(config_pb2.ConfigProto()).graph_options.rewrite_options
  assert step.meta_optimizer_iterations == RewriterConfig.ONE
  assert step.arithmetic_optimization == RewriterConfig.DEFAULT  # the passes that change it are
  assert step.dependency_optimization == RewriterConfig.DEFAULT  # kept
  mine = graph_options.step_config(config).graph_options.rewrite_options
  assert mine.constant_folding == RewriterConfig.ON  # as the user set it


def _convolutions_in_the_steps_own_graph(model, strategy=None):
  """How many convolution ops (forward or backward) the traced training step holds in its own
  graph (not in the functions it calls)."""
  images = tf.zeros([4, 8, 8, 1], tf.uint8)
  if strategy is None:
    graph = tf.function(model.train_step).get_concrete_function(images).graph
  else:
    batch = next(iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(images))))
    graph = tf.function(lambda data: strategy.run(model.train_step, args=(data,))
                        ).get_concrete_function(batch).graph
  return sum(op.type.startswith('Conv2D') for op in graph.get_operations())


def test_the_step_keeps_every_pass_where_its_own_graph_holds_the_networks_convolutions(
    monkeypatch):
  asked = []
  step_config = graph_options.step_config

  def spy(config=None, networks_in_functions=True):
    asked.append(networks_in_functions)
    return step_config(config, networks_in_functions)
  monkeypatch.setattr(graph_options, 'step_config', spy)
  devices = [d.name for d in tf.config.list_logical_devices('CPU')]
  cases = {'one replica': ({}, None), '--recompute': ({'recompute': True}, None),
           '2 replicas, synchronized': ({}, devices),
           '2 replicas, --nosync_batch_norm': ({'sync_batch_norm': False}, devices)}
  seen = {}
  for case, (overrides, replicas) in cases.items():
    strategy = training.mirrored_strategy(replicas) if replicas else None
    if strategy is None:
      model = _small_model(**overrides)
    else:
      with strategy.scope():
        model = _small_model(**overrides)
    in_functions = model._networks_run_as_functions_in_training()
    convolutions = _convolutions_in_the_steps_own_graph(model, strategy)
    # what the step's options assume is what the traced step holds
    assert in_functions == (convolutions == 0), (case, convolutions)
    seen[case] = in_functions
    model.make_train_function()  # the options it calls the step with
    assert asked.pop() == in_functions, case
  assert seen == {'one replica': True, '--recompute': False, '2 replicas, synchronized': False,
                  '2 replicas, --nosync_batch_norm': True}


def test_the_step_config_turns_off_only_passes_left_at_their_defaults():
  config = config_pb2.ConfigProto()
  rewrite = config.graph_options.rewrite_options
  rewrite.remapping = RewriterConfig.ON
  rewrite.memory_optimization = RewriterConfig.MANUAL
  light = graph_options.step_config(config).graph_options.rewrite_options
  assert light.remapping == RewriterConfig.ON
  assert light.memory_optimization == RewriterConfig.MANUAL
  assert light.layout_optimizer == RewriterConfig.OFF
  full = graph_options.step_config(config_pb2.ConfigProto(), networks_in_functions=False)
  rewrite = full.graph_options.rewrite_options
  assert rewrite.layout_optimizer == RewriterConfig.DEFAULT
  assert rewrite.constant_folding == RewriterConfig.DEFAULT
  assert rewrite.memory_optimization == RewriterConfig.DEFAULT_MEM_OPT
  assert rewrite.meta_optimizer_iterations == RewriterConfig.ONE
  # the networks keep the memory optimizer on a GPU
  network = graph_options.network_config(config_pb2.ConfigProto(), gpu=True)
  assert network.graph_options.rewrite_options.memory_optimization == \
      RewriterConfig.DEFAULT_MEM_OPT


def test_a_training_step_with_a_known_batch_size_computes_no_shapes():
  # Every op costs the first step about half a millisecond (tracing, graph passes): with the
  # batch size known while tracing, the flow's shapes, value counts and zero log-dets are
  # constants, not ops run at every step.
  model = _small_model()
  graph = tf.function(model.train_step).get_concrete_function(
      tf.zeros([4, 8, 8, 1], tf.uint8)).graph
  shape_ops = [op.name for op in graph.get_operations()
               if op.type in ('Shape', 'StridedSlice', 'Prod', 'BroadcastArgs')]
  assert not shape_ops, shape_ops


def test_fit_traces_the_step_into_the_function_that_reads_the_iterator():
  # Keras traces the step into a function of its own, called by the one that reads the
  # iterator, which captured every variable and optimizer slot a second time.
  model = _small_model()
  images = np.full([8, 8, 8, 1], 128, np.uint8)
  dataset = tf.data.Dataset.from_tensor_slices(images).batch(4, drop_remainder=True)
  model.fit(dataset, epochs=1, verbose=0)
  traced = model.train_function.traced
  assert traced.experimental_get_tracing_count() == 1
  graph = traced.get_concrete_function(iter(dataset)).graph
  # the step (here: its updates) is in this graph itself, not in a function it calls
  assert sum(op.type == 'ResourceApplyAdam' for op in graph.get_operations()) == len(
      model.trainable_variables)


def test_the_single_function_trains_as_keras_own():
  # Keras' own (nested) function runs with steps_per_execution > 1: the same two steps.
  images = np.random.default_rng(0).integers(0, 256, [8, 8, 8, 1]).astype(np.uint8)
  dataset = tf.data.Dataset.from_tensor_slices(images).batch(4, drop_remainder=True)
  weights = []
  for steps_per_execution in (1, 2):
    keras.utils.set_random_seed(7)
    model = RealNVP('mnist', image_shape=(8, 8, 1), num_scales=2, num_blocks=1, num_filters=4)
    model.compile(steps_per_execution=steps_per_execution)
    model.fit(dataset, epochs=1, verbose=0)
    assert (model.train_function.traced is not None) == (steps_per_execution == 1)
    weights.append([v.numpy() for v in model.variables])
  for ours, keras_own in zip(*weights):
    np.testing.assert_allclose(ours, keras_own, rtol=1e-5, atol=1e-6)


def test_evaluate_runs_through_the_single_function_and_run_eagerly_through_keras():
  images = np.random.default_rng(1).integers(0, 256, [8, 8, 8, 1]).astype(np.uint8)
  dataset = tf.data.Dataset.from_tensor_slices(images).batch(4, drop_remainder=True)
  for run_eagerly in (False, True):
    model = _small_model()
    model.compile(run_eagerly=run_eagerly)
    loss = model.evaluate(dataset, verbose=0, return_dict=True)['loss']
    assert np.isfinite(loss) and loss > 0.
    # (Keras' test function is not wrapped: `traced` is on the function itself)
    assert (getattr(model.test_function, 'traced', None) is not None) == (not run_eagerly)
