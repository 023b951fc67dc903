"""The training step's lighter graph optimization (`tfp_realnvp.graph_options`)."""

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context

from tfp_realnvp import RealNVP, graph_options

RewriterConfig = rewriter_config_pb2.RewriterConfig


def _small_model():
  model = RealNVP('mnist', image_shape=(8, 8, 1), num_scales=2, num_blocks=1, num_filters=4)
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
  for op in calls:
    rewrite = _rewrite_options(op.get_attr('config_proto'))
    assert rewrite.meta_optimizer_iterations == RewriterConfig.ONE, op.name
    assert rewrite.constant_folding == RewriterConfig.OFF, op.name
    assert rewrite.arithmetic_optimization == RewriterConfig.OFF, op.name
    assert rewrite.remapping == RewriterConfig.DEFAULT, op.name  # fuses a convolution with its bias
    assert rewrite.layout_optimizer == RewriterConfig.DEFAULT, op.name
    assert not rewrite.disable_meta_optimizer, op.name


def test_fit_calls_the_step_with_one_round_of_graph_optimization(monkeypatch):
  model = _small_model()
  seen = []
  network_config = graph_options.network_config

  def spy(config=None):  # runs while the step is traced, inside the train function's call
    seen.append(context.context().function_call_options.config_proto_serialized)
    return network_config(config)
  monkeypatch.setattr(graph_options, 'network_config', spy)
  before = context.context().function_call_options.config_proto_serialized
  model.fit(np.full([8, 8, 8, 1], 128, np.uint8), batch_size=4, epochs=1, verbose=0)
  assert seen, 'the step was not traced through train_step'
  assert all(_rewrite_options(s).meta_optimizer_iterations == RewriterConfig.ONE for s in seen)
  # restored after the call
  assert context.context().function_call_options.config_proto_serialized == before
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
  assert step.constant_folding == RewriterConfig.DEFAULT  # the step keeps every pass
