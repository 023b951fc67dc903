"""Checkpoints written before the residual blocks' weights were stacked (`nets.ResidualBlocks`)
restore, model and optimizer.

`data/per_block_run` is a `launch.train` run made with the code before the change (commit
eeafff5): `python -m launch.train --workdir=per_block_run --dataset=npz:digits.npz
--preset=mnist --num_scales=1 --num_blocks=2 --num_filters=2 --batch_size=32 --epochs=1
--steps_per_epoch=20 --checkpoint_every_steps=20` (`digits.npz`: scikit-learn's digits, the first
1,500 for training). `expected.npz` holds, from that code: the log-densities of 8 test digits
(pixel centres), the variable count, and, of the first network, the second block's second
kernel with its Adam momentum and velocity, and the first block's first running mean.
"""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from tfp_realnvp import RealNVP, training

RUN = os.path.join(os.path.dirname(__file__), 'data', 'per_block_run')


@pytest.fixture
def run(tmp_path):
  path = str(tmp_path / 'run')
  shutil.copytree(RUN, path)  # a restore may set unloadable checkpoints aside: work on a copy
  return path


def _first_network(model):
  return next(layer for layer in model.flow_layers if hasattr(layer, 'blocks'))


def test_a_per_block_checkpoint_restores_the_model_exactly(run):
  expected = np.load(os.path.join(run, 'expected.npz'))
  model, _, step = training.restore_model(run)
  assert step == 20
  assert len(training.legacy_variables(model)) == expected['num_variables'] > len(model.variables)
  np.testing.assert_allclose(model.log_prob(tf.constant(expected['images'])),
                             expected['log_prob'], rtol=1e-6)
  blocks = _first_network(model).blocks
  np.testing.assert_array_equal(blocks.v.numpy()[1, 1], expected['block_1_conv2_v'])
  np.testing.assert_array_equal(blocks.moving_mean.numpy()[0, 0],
                                expected['block_0_norm1_moving_mean'])


def test_a_per_block_checkpoint_restores_the_optimizer_and_training_goes_on(run):
  expected = np.load(os.path.join(run, 'expected.npz'))
  run_config = training.read_run_config(run)
  model = training.model_from_run_config(run_config)
  model.compile()
  checkpointer = training.Checkpointer(run, model)
  assert checkpointer.restore_latest() == 20
  optimizer, blocks = model.optimizer, _first_network(model).blocks
  i = optimizer._get_variable_index(blocks.v)
  np.testing.assert_array_equal(optimizer._momentums[i].numpy()[1, 1],
                                expected['block_1_conv2_v_m'])
  np.testing.assert_array_equal(optimizer._velocities[i].numpy()[1, 1],
                                expected['block_1_conv2_v_v'])
  assert int(optimizer.iterations.numpy()) == 20

  images = np.random.default_rng(0).integers(0, 256, [32, 8, 8, 1]).astype(np.uint8)
  model.fit(images, batch_size=32, epochs=1, verbose=0)
  checkpointer.save()  # the stacked layout, which restores by TF's own reader
  restored = training.model_from_run_config(run_config)
  restored.compile()
  assert training.Checkpointer(run, restored).restore_latest() == 21
  for a, b in zip(restored.variables + restored.optimizer.variables,
                  model.variables + model.optimizer.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_per_block_checkpoint_of_another_model_is_refused_with_the_shape(run):
  model = RealNVP('mnist', image_shape=(8, 8, 1), num_scales=1, num_blocks=2, num_filters=3)
  model.compile()
  with pytest.raises(training.RunError, match=r'ckpt-20 \(ValueError: variables/\d+/.* has '
                     r'shape \[3, 3, 2, 2\], but .*/v has \[3, 3, 2, 3\]'):
    training.Checkpointer(run, model).restore_latest()
