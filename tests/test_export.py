"""SavedModel export: served by plain TensorFlow in a fresh process, without this package or TFP."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import randomize
import tfp_realnvp as rn
from tfp_realnvp import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = rn.RealNVPConfig((8, 8, 1), num_scales=2, num_blocks=1, num_filters=4)

# Runs in a fresh process where tfp_realnvp and TFP cannot be imported.
SERVE = r'''
import json, sys
sys.modules['tfp_realnvp'] = None
sys.modules['tensorflow_probability'] = None
import numpy as np
import tensorflow as tf

loaded = tf.saved_model.load(sys.argv[1])
images = tf.constant(np.load(sys.argv[2]))
out = {'signatures': sorted(loaded.signatures)}
scores = loaded.signatures['log_prob'](images=images)
out['log_prob'] = scores['log_prob'].numpy().tolist()
out['bits_per_dim'] = scores['bits_per_dim'].numpy().tolist()
out['default'] = loaded.signatures['serving_default'](images=images)['log_prob'].numpy().tolist()
latent = loaded.signatures['encode'](images=images)['latent']
out['latent'] = latent.numpy().tolist()
out['decoded'] = loaded.signatures['decode'](latent=latent)['images'].numpy().tolist()
sample = lambda n, t, s: loaded.signatures['sample'](
    num_samples=tf.constant(n), temperature=tf.constant(t), seed=tf.constant(s, tf.int64))['images']
first, again, other = sample(3, 0.7, 5), sample(3, 0.7, 5), sample(3, 0.7, 6)
out['sample_dtype'] = first.dtype.name
out['sample_shape'] = first.shape.as_list()
out['same_seed_same_images'] = bool(np.array_equal(first, again))
out['other_seed_other_images'] = not np.array_equal(first, other)
errors = {}
requests = {
    'wrong_rank': lambda: loaded.signatures['log_prob'](images=images[0]),
    'wrong_channels': lambda: loaded.signatures['log_prob'](images=tf.zeros([1, 8, 8, 3], tf.uint8)),
    'wrong_size': lambda: loaded.signatures['encode'](images=tf.zeros([1, 9, 8, 1], tf.uint8)),
    'float_images': lambda: loaded.signatures['log_prob'](images=tf.cast(images, tf.float32)),
    'empty_batch': lambda: loaded.signatures['log_prob'](images=tf.zeros([0, 8, 8, 1], tf.uint8)),
    'rank_5': lambda: loaded.signatures['encode'](images=tf.zeros([1, 1, 8, 8, 1], tf.uint8)),
    'decode_wrong_shape': lambda: loaded.signatures['decode'](latent=tf.zeros([2, 8, 8, 2])),
    'decode_empty': lambda: loaded.signatures['decode'](latent=tf.zeros([0, 8, 8, 1])),
    'inf_temperature': lambda: sample(2, float('inf'), 1),
    'nan_temperature': lambda: sample(2, float('nan'), 1),
    'no_samples': lambda: sample(0, 0.7, 1),
    'huge_samples': lambda: sample(10 ** 6, 0.7, 1),
    'zero_temperature': lambda: sample(2, 0.0, 1),
    'nan_latent': lambda: loaded.signatures['decode'](latent=tf.fill([1, 8, 8, 1], float('nan'))),
}
for name, request in requests.items():
  try:
    request()
    errors[name] = None
  except Exception as e:
    errors[name] = f'{type(e).__name__}: {e}'[:400]
out['errors'] = errors
print(json.dumps(out))
'''


@pytest.fixture(scope='module', params=['paper', 'glow_layers'])
def exported(tmp_path_factory, request):
  # The paper's layers, and Glow's (ActNorm, invertible 1x1 convolutions, Glow's layout and
  # networks): served alike without this package or TFP.
  config = CONFIG if request.param == 'paper' else CONFIG.replace(
      normalization='actnorm', mixing='1x1_conv', layout='glow', steps_per_scale=2,
      network='glow')
  model = rn.RealNVP(config)
  randomize(model.flow_layers, seed=0, scale=0.1, variance=(0.8, 1.2))
  path = str(tmp_path_factory.mktemp('export') / 'model')
  assert rn.export_saved_model(model, path) == path
  images = np.random.default_rng(0).integers(0, 256, [5, 8, 8, 1], dtype=np.uint8)
  np.save(os.path.join(os.path.dirname(path), 'images.npy'), images)
  return model, path, images


@pytest.fixture(scope='module')
def served(exported):
  _, path, _ = exported
  result = subprocess.run([sys.executable, '-c', SERVE, path,
                           os.path.join(os.path.dirname(path), 'images.npy')],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_plain_tensorflow_serves_the_same_density_and_latent(exported, served):
  model, _, images = exported
  assert served['signatures'] == ['decode', 'encode', 'log_prob', 'sample', 'serving_default']
  expected = model.log_prob(images.astype(np.float32) + 0.5)  # pixel centres
  np.testing.assert_allclose(served['log_prob'], expected, rtol=1e-5)
  np.testing.assert_allclose(served['default'], expected, rtol=1e-5)
  np.testing.assert_allclose(served['bits_per_dim'], model.bits_per_dim(images.astype(np.float32)
                                                                        + 0.5), rtol=1e-5)
  np.testing.assert_allclose(served['latent'], model.encode(images), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(served['decoded'], images)  # decode(encode(x)) gives x back


def test_sampling_is_seeded(served):
  assert served['sample_dtype'] == 'uint8' and served['sample_shape'] == [3, 8, 8, 1]
  assert served['same_seed_same_images'] and served['other_seed_other_images']


def test_bad_requests_get_clear_errors(served):
  errors = served['errors']
  shapes = {'wrong_rank': ('log_prob', 'uint8 images'), 'wrong_channels': ('log_prob', 'uint8 images'),
            'wrong_size': ('encode', 'uint8 images'), 'empty_batch': ('log_prob', 'uint8 images'),
            'rank_5': ('encode', 'uint8 images'), 'decode_wrong_shape': ('decode', 'a float32 latent'),
            'decode_empty': ('decode', 'a float32 latent')}
  for name, (signature, what) in shapes.items():  # named: the signature, expected and got
    assert errors[name] and f'{signature}: expected {what} of shape [N, 8, 8, 1] with N >= 1, ' \
        'got shape' in errors[name], (name, errors[name])
  assert errors['float_images'] and 'uint8' in errors['float_images']
  assert 'temperature must be finite' in errors['inf_temperature']
  assert 'temperature must be finite' in errors['nan_temperature']
  assert 'num_samples must be at least 1' in errors['no_samples']
  assert 'num_samples must be at most 4096' in errors['huge_samples']
  assert 'temperature must be > 0' in errors['zero_temperature']
  assert 'NaN or inf' in errors['nan_latent']


def test_saved_model_cli_shows_and_runs_the_signatures(exported, tmp_path):
  _, path, images = exported
  cli = os.path.join(os.path.dirname(sys.executable), 'saved_model_cli')
  shown = subprocess.run([cli, 'show', '--dir', path, '--all'], capture_output=True, text=True,
                         timeout=300)
  assert shown.returncode == 0, shown.stderr[-2000:]
  for name in ('serving_default', 'log_prob', 'sample', 'encode', 'decode'):
    assert f"signature_def['{name}']" in shown.stdout
  assert 'bits_per_dim' in shown.stdout and 'num_samples' in shown.stdout
  ran = subprocess.run([cli, 'run', '--dir', path, '--tag_set', 'serve', '--signature_def',
                        'log_prob', '--inputs', f'images={os.path.dirname(path)}/images.npy',
                        '--outdir', str(tmp_path)], capture_output=True, text=True, timeout=300)
  assert ran.returncode == 0, ran.stderr[-2000:]
  bits = np.load(tmp_path / 'bits_per_dim.npy')
  np.testing.assert_allclose(bits, exported[0].bits_per_dim(images.astype(np.float32) + 0.5),
                             rtol=1e-5)


def test_launch_export_restores_the_latest_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  model = rn.RealNVP(CONFIG)
  model.compile()
  randomize(model.flow_layers, seed=3, scale=0.1, variance=(0.8, 1.2))
  no_data = {'dataset': None, 'data_dir': None, 'image_size': None}
  training.write_run_config(workdir, {'model': CONFIG.to_dict(), 'data': no_data,
                                     'train': {}})
  training.Checkpointer(workdir, model).save()
  export_dir = str(tmp_path / 'exported')
  result = subprocess.run([sys.executable, '-m', 'launch.export', f'--workdir={workdir}',
                           f'--export_dir={export_dir}'], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  import tensorflow as tf
  loaded = tf.saved_model.load(export_dir)
  images = np.random.default_rng(1).integers(0, 256, [3, 8, 8, 1], dtype=np.uint8)
  np.testing.assert_allclose(loaded.signatures['log_prob'](images=tf.constant(images))['log_prob'],
                             model.log_prob(images.astype(np.float32) + 0.5), rtol=1e-5)


def test_keras_export_path_serves_bits_per_dim(tmp_path):
  import tensorflow as tf
  model = rn.RealNVP(CONFIG)
  randomize(model.flow_layers, seed=2, scale=0.1, variance=(0.8, 1.2))
  model.export(str(tmp_path / 'keras'), format='tf_saved_model', verbose=False)
  loaded = tf.saved_model.load(str(tmp_path / 'keras'))
  pixels = np.random.default_rng(0).uniform(0, 256, [3, 8, 8, 1]).astype(np.float32)
  np.testing.assert_allclose(loaded.serve(pixels), model.bits_per_dim(pixels), rtol=1e-5)


# A class-conditional model's signatures, served without this package or TFP.
SERVE_CONDITIONAL = r'''
import json, sys
sys.modules['tfp_realnvp'] = None
sys.modules['tensorflow_probability'] = None
import numpy as np
import tensorflow as tf

loaded = tf.saved_model.load(sys.argv[1])
images = tf.constant(np.load(sys.argv[2]))
labels = tf.constant([0, 2, 1, 2, 0], tf.int32)
out = {'signatures': sorted(loaded.signatures)}
out['log_prob'] = loaded.signatures['log_prob'](images=images, labels=labels)['log_prob'].numpy().tolist()
latent = loaded.signatures['encode'](images=images, labels=labels)['latent']
out['latent'] = latent.numpy().tolist()
out['decoded'] = loaded.signatures['decode'](latent=latent, labels=labels)['images'].numpy().tolist()
sample = lambda labels, s: loaded.signatures['sample'](
    num_samples=tf.constant(len(labels)), temperature=tf.constant(0.7),
    seed=tf.constant(s, tf.int64), labels=tf.constant(labels, tf.int32))['images']
out['samples'] = sample([1, 1, 2], 5).numpy().tolist()
out['same_seed_same_images'] = bool(np.array_equal(sample([1, 1, 2], 5), sample([1, 1, 2], 5)))
classified = loaded.signatures['classify'](images=images)
out['label'] = classified['label'].numpy().tolist()
out['probabilities'] = classified['probabilities'].numpy().tolist()
out['marginal'] = classified['log_prob'].numpy().tolist()
errors = {}
for name, request in {
    'label_out_of_range': lambda: loaded.signatures['log_prob'](images=images, labels=labels + 2),
    'too_few_labels': lambda: loaded.signatures['encode'](images=images, labels=labels[:2]),
    'sample_labels_count': lambda: loaded.signatures['sample'](
        num_samples=tf.constant(3), temperature=tf.constant(0.7), seed=tf.constant(1, tf.int64),
        labels=tf.constant([0, 1], tf.int32)),
}.items():
  try:
    request()
    errors[name] = None
  except Exception as e:
    errors[name] = f'{type(e).__name__}: {e}'[:400]
out['errors'] = errors
print(json.dumps(out))
'''


def test_class_conditional_signatures_take_labels(tmp_path):
  model = rn.RealNVP(CONFIG.replace(num_classes=3))
  randomize(model.flow_layers, seed=0, scale=0.1, variance=(0.8, 1.2))
  rng = np.random.default_rng(1)
  for w in (model.prior.loc, model.prior.log_scale):
    w.assign(rng.normal(0., 0.3, w.shape).astype(np.float32))
  model.prior.class_counts.assign([5., 1., 2.])
  path = rn.export_saved_model(model, str(tmp_path / 'model'))
  images = np.random.default_rng(0).integers(0, 256, [5, 8, 8, 1], dtype=np.uint8)
  np.save(tmp_path / 'images.npy', images)
  result = subprocess.run([sys.executable, '-c', SERVE_CONDITIONAL, path,
                           str(tmp_path / 'images.npy')], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  served = json.loads(result.stdout.strip().splitlines()[-1])
  assert served['signatures'] == ['classify', 'decode', 'encode', 'log_prob', 'sample',
                                  'serving_default']
  labels = np.array([0, 2, 1, 2, 0])
  centres = images.astype(np.float32) + 0.5
  np.testing.assert_allclose(served['log_prob'], model.log_prob(centres, labels), rtol=1e-5)
  np.testing.assert_allclose(served['latent'], model.encode(images, labels), rtol=1e-4,
                             atol=1e-4)
  assert np.abs(np.array(served['decoded']) - images.astype(int)).max() <= 1
  expected = rn.to_uint8(model.decode(
      model.prior.loc_and_log_scale(np.array([1, 1, 2]))[0] + 0.7 * np.exp(
          model.prior.loc_and_log_scale(np.array([1, 1, 2]))[1]) * tf_normal([3, 8, 8, 1], 5),
      [1, 1, 2]))
  assert np.abs(np.array(served['samples']) - expected.numpy().astype(int)).max() <= 1
  assert served['same_seed_same_images']
  np.testing.assert_allclose(served['probabilities'], model.predict_proba(centres), rtol=1e-4,
                             atol=1e-6)
  assert served['label'] == model.classify(centres).numpy().tolist()
  np.testing.assert_allclose(served['marginal'], model.distribution.log_prob(centres), rtol=1e-5)
  errors = served['errors']
  assert 'in [0, 3)' in errors['label_out_of_range']
  assert 'expected labels of shape [N]' in errors['too_few_labels']
  assert 'sample: expected labels' in errors['sample_labels_count']


def tf_normal(shape, seed):
  import tensorflow as tf
  return tf.random.stateless_normal(shape, tf.constant([seed, 0], tf.int64))
