"""Mixed precision as a trustworthy fast path: the hardware check, and bfloat16 losing nothing
that float32 keeps (test bits/dim after the same steps, round trips)."""

import keras
import numpy as np
import tensorflow as tf

from conftest import randomize
import tfp_realnvp as rn
from tfp_realnvp import hardware


def test_native_precision_reads_the_cpu_flags(monkeypatch):
  monkeypatch.setattr(tf.config, 'list_physical_devices', lambda kind=None: [])
  monkeypatch.setattr(hardware, '_cpu_flags', lambda: {'avx2', 'avx512f'})
  native, why = hardware.native_precision('bfloat16')
  assert not native and 'no AVX512_BF16' in why and 'slower than float32' in why
  monkeypatch.setattr(hardware, '_cpu_flags', lambda: {'avx512f', 'avx512_bf16'})
  native, why = hardware.native_precision('bfloat16')
  assert native and 'avx512_bf16' in why
  native, why = hardware.native_precision('float16')
  assert not native and 'GPUs with tensor cores' in why


def _digits():
  from sklearn.datasets import load_digits
  images = np.round(load_digits().images * 255 / 16)[..., None]
  pixels = images + np.random.default_rng(0).uniform(size=images.shape)  # dequantized once
  return pixels[:1536].astype(np.float32), pixels[1536:].astype(np.float32)


CONFIG = rn.RealNVPConfig((8, 8, 1), num_scales=2, num_blocks=2, num_filters=16)


def test_bfloat16_trains_to_the_same_test_bits_per_dim_as_float32():
  train, test = _digits()
  keras.utils.set_random_seed(0)
  initial = rn.RealNVP(CONFIG).get_weights()
  results = {}
  for compute_dtype in (None, 'bfloat16'):
    model = rn.RealNVP(CONFIG.replace(compute_dtype=compute_dtype))
    model.set_weights(initial)  # the same start (variables are float32 in both)
    model.compile()
    model.fit(train, batch_size=64, epochs=4, shuffle=False, verbose=0)  # 96 steps, same batches
    results[compute_dtype] = float(tf.reduce_mean(model.bits_per_dim(test)))
  print(f'digits test bits/dim after 96 steps: float32 {results[None]:.4f}, bfloat16 '
        f'{results["bfloat16"]:.4f}')
  assert results[None] < 6.5  # it learnt (untrained: about 8.5)
  assert abs(results['bfloat16'] - results[None]) < 0.01


def test_bfloat16_round_trips_are_as_exact_as_float32():
  _, test = _digits()
  errors = {}
  for compute_dtype in (None, 'bfloat16'):
    model = rn.RealNVP(CONFIG.replace(compute_dtype=compute_dtype))
    randomize(model.flow_layers, seed=0, scale=0.1, variance=(0.8, 1.2))
    pixels = tf.constant(test[:32])
    back = model.decode(model.encode(pixels))
    latent = tf.random.stateless_normal([32, 8, 8, 1], [1, 2])
    again = model.encode(model.decode(latent))
    errors[compute_dtype] = (float(tf.reduce_max(tf.abs(back - pixels))),
                             float(tf.reduce_max(tf.abs(again - latent))))
  # The couplings see the same (bfloat16) s and t both ways: the inverse is exact up to the
  # flow's own float32 arithmetic.
  assert errors['bfloat16'][0] < 1e-3 and errors['bfloat16'][1] < 1e-3, errors
  assert errors['bfloat16'][0] < 10 * errors[None][0] + 1e-4, errors
