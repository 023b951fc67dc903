"""The optimizer is Keras' own (`keras.optimizers.Adam`, the paper's Adam 1e-3); clipping by the
global norm of the replicas' summed gradient is `compat.clip_after_all_reduce`."""

import keras


@keras.saving.register_keras_serializable(package='tfp_realnvp')
class Adam(keras.optimizers.Adam):
  """`keras.optimizers.Adam` under the name `tfp_realnvp>Adam`, which `.keras` files saved by
  earlier versions (with a fused Adam of that name) refer to, so they still load. New code:
  `keras.optimizers.Adam`."""
