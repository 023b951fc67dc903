"""What `tfp_realnvp/compat.py` reaches for is still there: each check names the entry that needs
a new way on a TF or Keras version where it moved."""

import keras
import numpy as np
import tensorflow as tf

import tfp_realnvp as rn
from tfp_realnvp import compat


def test_keras_optimizers_still_all_reduce_in_the_method_compat_wraps():
  assert hasattr(keras.optimizers.Adam, compat.KERAS_OPTIMIZER_ALL_REDUCE), (
      f'Keras {keras.__version__} has no Optimizer.{compat.KERAS_OPTIMIZER_ALL_REDUCE}: '
      'compat.clip_after_all_reduce needs another way to clip the summed gradient.')


def test_keras_adam_still_has_what_the_fused_adam_overrides_and_reads():
  adam = keras.optimizers.Adam()
  adam.build([keras.Variable(np.zeros([2], 'float32'))])
  for name in ('_backend_update_step', '_distributed_tf_update_step', '_momentums',
               '_velocities', '_get_variable_index'):
    assert hasattr(adam, name), (f'Keras {keras.__version__} has no Adam.{name}: compat.Adam '
                                 '(the fused Adam) needs updating, or use keras.optimizers.Adam.')


def test_mirrored_strategy_still_numbers_its_collective_keys_from_the_attribute_compat_moves():
  assert isinstance(getattr(tf.distribute.MirroredStrategy, compat.TF_MIRRORED_KEY_BASE, None),
                    int), (f'TF {tf.__version__} has no MirroredStrategy.'
                           f'{compat.TF_MIRRORED_KEY_BASE}: compat.mirrored_strategy needs '
                           'another way to keep strategies in one process apart.')


def test_keras_monitor_callbacks_take_bits_per_dim_as_lower_is_better():
  model = rn.RealNVP(rn.RealNVPConfig((4, 4, 1), num_scales=1, num_blocks=1, num_filters=4))
  model.compile()
  for callback in (keras.callbacks.EarlyStopping(monitor='val_bits_per_dim'),
                   keras.callbacks.ReduceLROnPlateau(monitor='bits_per_dim')):
    callback.set_model(model)
    callback.on_train_begin()
    callback.on_epoch_end(0, {'bits_per_dim': 3., 'val_bits_per_dim': 3.})  # (sets monitor_op)
    assert callback.monitor_op is keras.ops.less, (
        f'Keras {keras.__version__} no longer reads the metric attribute '
        f'{compat.KERAS_METRIC_DIRECTION!r}: compat.lower_is_better needs another way.')


def test_the_clipping_in_compat_clips_the_sum_over_replicas():
  # Two replicas, each with its half of the gradient: the step is the sum's, clipped once.
  devices = [d.name for d in tf.config.list_logical_devices('CPU')][:2]
  strategy = compat.mirrored_strategy(devices)
  with strategy.scope():
    variable = keras.Variable(np.zeros([2], 'float32'))
    optimizer = compat.clip_after_all_reduce(keras.optimizers.SGD(1.), clipnorm=5.)
    optimizer.build([variable])
  halves = [tf.constant([3., 0.]), tf.constant([3., 8.])]  # sum [6, 8], norm 10

  @tf.function
  def step():
    def replica():
      index = tf.distribute.get_replica_context().replica_id_in_sync_group
      optimizer.apply_gradients([(tf.gather(tf.stack(halves), index), variable)])
    strategy.run(replica)
  step()
  np.testing.assert_allclose(variable.numpy(), [-3., -4.], rtol=1e-6)
