"""The optimizer: Adam with one fused kernel per variable (`compat.Adam`, registered as
`tfp_realnvp>Adam`; the same arguments, slots and checkpoints as `keras.optimizers.Adam`).
Clipping by the global norm of the replicas' summed gradient is `compat.clip_after_all_reduce`."""

from tfp_realnvp.compat import GRADIENT_ALL_REDUCE, Adam, clip_after_all_reduce  # noqa: F401
