"""Checkpoints, run configs, evaluation and pictures of `tfp_realnvp.training`."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import tfp_realnvp as rn
from tfp_realnvp import training

CONFIG = rn.RealNVPConfig((8, 8, 1), num_scales=2, num_blocks=1, num_filters=4)


def _images(n=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, [n, 8, 8, 1], dtype=np.uint8)


def test_checkpoint_restores_every_variable_and_the_optimizer(tmp_path):
  model = rn.RealNVP(CONFIG)
  model.compile()
  model.fit(_images(), batch_size=8, epochs=1, verbose=0)
  checkpointer = training.Checkpointer(str(tmp_path), model)
  checkpointer.save()
  clone = rn.RealNVP(CONFIG)
  clone.compile()
  assert training.Checkpointer(str(tmp_path), clone).restore_latest() == 4
  for saved, restored in zip(model.variables, clone.variables):
    np.testing.assert_array_equal(saved.numpy(), restored.numpy(), err_msg=saved.path)
  for saved, restored in zip(model.optimizer.variables, clone.optimizer.variables):
    np.testing.assert_array_equal(saved.numpy(), restored.numpy(), err_msg=saved.path)
  x = _images(4, seed=1)
  np.testing.assert_array_equal(clone.bits_per_dim(x, seed=0), model.bits_per_dim(x, seed=0))


def test_checkpoints_keep_the_last_k_and_survive_a_torn_write(tmp_path):
  model = rn.RealNVP(CONFIG)
  model.compile()
  checkpointer = training.Checkpointer(str(tmp_path), model, keep=2)
  for _ in range(3):
    model.train_on_batch(_images(8))
    checkpointer.save()
  names = sorted(f for f in os.listdir(checkpointer.directory) if f.endswith('.index'))
  assert names == ['ckpt-2.index', 'ckpt-3.index']
  # A save killed before its index was renamed leaves stray files; the latest still loads.
  with open(os.path.join(checkpointer.directory, 'ckpt-4.data-00000-of-00001.tempstate1'), 'w') as f:
    f.write('partial')
  clone = rn.RealNVP(CONFIG)
  clone.compile()
  assert training.Checkpointer(str(tmp_path), clone).restore_latest() == 3


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
  model = rn.RealNVP(CONFIG)
  model.compile()
  with pytest.raises(training.RunError, match='No checkpoint in'):
    training.Checkpointer(str(tmp_path), model).restore_latest(required=True)
  checkpointer = training.Checkpointer(str(tmp_path), model)
  path = checkpointer.save()
  with open(path + '.data-00000-of-00001', 'r+b') as f:
    f.truncate(100)
  with pytest.raises(training.RunError, match=r'None of the 1 checkpoints .* loads \(ckpt-0 '):
    training.Checkpointer(str(tmp_path), model).restore_latest()


def test_a_checkpoint_of_another_model_is_refused_with_the_shapes(tmp_path):
  model = rn.RealNVP(CONFIG)
  model.compile()
  training.Checkpointer(str(tmp_path), model).save()
  other = rn.RealNVP(rn.RealNVPConfig((8, 8, 1), num_scales=2, num_blocks=1, num_filters=3))
  other.compile()
  with pytest.raises(training.RunError, match=r'None of the 1 checkpoints .* loads \(ckpt-0 '
                     r'\(ValueError: .*shape \(1, 2, 3, 3, 4, 4\).* shape \(1, 2, 3, 3, 3, 3\)'):
    training.Checkpointer(str(tmp_path), other).restore_latest()


def test_run_config_must_match_to_resume(tmp_path):
  run = {'model': CONFIG.to_dict(), 'data': {'dataset': 'npz:a', 'data_dir': None,
                                             'image_size': None}, 'train': {'epochs': 1}}
  training.check_run_config(str(tmp_path), run)  # nothing there yet
  training.write_run_config(str(tmp_path), run)
  assert training.read_run_config(str(tmp_path)) == json.loads(json.dumps(run))
  training.check_run_config(str(tmp_path), {**run, 'train': {'epochs': 5}})
  other = {**run, 'model': {**run['model'], 'num_blocks': 3}}
  # No checkpoint yet: only the config disagrees, and it may go.
  with pytest.raises(training.RunError, match=r'different model config \(num_blocks: 1 there, 3 '
                     r'now\) that left no checkpoint: delete .*config.json'):
    training.check_run_config(str(tmp_path), other)
  os.makedirs(tmp_path / 'checkpoints')
  (tmp_path / 'checkpoints' / 'ckpt-7.index').write_bytes(b'')
  with pytest.raises(training.RunError, match=r'holds a run with a different model config '
                     r'\(num_blocks: 1 there, 3 now\)\. Use another --workdir'):
    training.check_run_config(str(tmp_path), other)
  with open(tmp_path / 'config.json', 'w') as f:
    f.write('{not json')
  with pytest.raises(training.RunError, match='corrupt'):
    training.read_run_config(str(tmp_path))


def test_evaluation_is_repeatable_and_averages_noise_draws():
  model = rn.RealNVP(CONFIG)
  batches = tf.data.Dataset.from_tensor_slices(_images(10)).batch(4)
  first = training.evaluate_bits_per_dim(model, batches)
  assert first == training.evaluate_bits_per_dim(model, batches)
  expected = np.mean(np.concatenate([model.bits_per_dim(b, seed=i + 1).numpy()
                                     for i, b in enumerate(batches)]))
  assert first == pytest.approx(expected, rel=1e-6)
  assert training.evaluate_bits_per_dim(model, batches, noise_draws=3) != first
  with pytest.raises(training.RunError, match='empty'):
    training.evaluate_bits_per_dim(model, batches.take(0))


def test_evaluation_traces_the_flow_once_whatever_the_last_batchs_size():
  # A smaller last batch used to retrace the flow (about 1 s of a launcher run's end); a second
  # evaluation of the same model reuses the trace.
  model = rn.RealNVP(CONFIG)
  passes = []
  bits_per_dim = model.bits_per_dim
  model.bits_per_dim = lambda *args, **kwargs: passes.append(1) or bits_per_dim(*args, **kwargs)
  batches = tf.data.Dataset.from_tensor_slices(_images(10)).batch(4)  # 4, 4, 2
  first = training.evaluate_bits_per_dim(model, batches)
  assert len(passes) == 1
  assert training.evaluate_bits_per_dim(model, batches) == first and len(passes) == 1
  training.evaluate_bits_per_dim(model, batches, noise_draws=2)  # its own function, one pass
  assert len(passes) == 2


def test_latent_manifold_decodes_the_corners():
  model = rn.RealNVP(CONFIG)
  images = _images(4)
  grid = training.latent_manifold(model, images, size=3)
  assert grid.shape == (9, 8, 8, 1)
  centres = images.astype(np.float32) + 0.5
  # a = 0, b = 0 gives z1; a = 0, b = pi/2 gives z2; a = pi/2, b = 0 gives z3.
  for index, image in ((0, 0), (2, 1), (6, 2)):
    np.testing.assert_allclose(grid[index], centres[image], atol=1e-2)


def test_unknown_strategy_and_multi_worker_without_a_cluster(monkeypatch):
  with pytest.raises(training.RunError, match='Unknown strategy'):
    training.build_strategy('tpu')
  for name in [n for n in os.environ if n == 'TF_CONFIG' or n.startswith('SLURM_')]:
    monkeypatch.delenv(name)
  with pytest.raises(training.RunError, match=r'--strategy=multi_worker needs a cluster: neither '
                     r'TF_CONFIG .* nor a Slurm job step \(srun: SLURM_PROCID\)'):
    training.build_strategy('multi_worker')
  monkeypatch.setenv('SLURM_JOB_ID', '17')  # a Slurm batch script, not a job step (no srun)
  monkeypatch.setenv('SLURM_PROCID', '0')
  with pytest.raises(training.RunError, match='needs a job step of its tasks: run launch.train '
                     'under srun'):
    training.build_strategy('multi_worker')
  # What --strategy=auto goes by: the tasks of a Slurm job step, or of TF_CONFIG's cluster.
  assert training.slurm_tasks() == 0 and training.tf_config_workers() == 0
  monkeypatch.setenv('SLURM_PROCID', '1')
  monkeypatch.setenv('SLURM_STEP_NUM_TASKS', '4')
  assert training.slurm_tasks() == 4
  monkeypatch.setenv('TF_CONFIG', json.dumps({'cluster': {'chief': ['a:1'], 'worker': ['b:1', 'c:1']},
                                              'task': {'type': 'worker', 'index': 0}}))
  assert training.tf_config_workers() == 3
  monkeypatch.setenv('TF_CONFIG', '{not json')
  with pytest.raises(training.RunError, match='TF_CONFIG is not valid JSON'):
    training.tf_config_workers()


def test_xla_and_bfloat16_training_steps():
  images = _images(16)
  eager = rn.RealNVP(CONFIG)
  eager.compile()
  compiled = rn.RealNVP(CONFIG)
  compiled.set_weights(eager.get_weights())
  compiled.compile(jit_compile=True)
  # XLA computes the same step (its BN statistics and log-dets included).
  x = images.astype(np.float32) + 0.5
  np.testing.assert_allclose(compiled.train_on_batch(x), eager.train_on_batch(x), rtol=1e-4)
  np.testing.assert_allclose(compiled.bits_per_dim(x), eager.bits_per_dim(x), rtol=1e-4)
  # The running averages the compiled flow updates are assigned after it, as without XLA.
  averages = [(a, b) for a, b in zip(compiled.weights, eager.weights) if 'moving_' in a.path]
  assert len(averages) > 4 and compiled._flow_forward.compiled.experimental_get_tracing_count()
  for a, b in averages:
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
  mixed = rn.RealNVP(CONFIG.replace(compute_dtype='bfloat16'))
  mixed.set_weights(eager.get_weights())
  mixed.compile()
  net = next(layer for layer in mixed.flow_layers if isinstance(layer, rn.CouplingNet))
  assert net.compute_dtype == 'bfloat16' and net.variable_dtype == 'float32'
  bits = mixed.bits_per_dim(x)
  assert bits.dtype == tf.float32  # log-dets and the loss stay float32
  np.testing.assert_allclose(bits, eager.bits_per_dim(x), rtol=2e-2)
