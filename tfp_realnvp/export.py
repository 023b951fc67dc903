"""SavedModel export for serving: `log_prob`, `sample`, `encode`, `decode` signatures that plain
TensorFlow loads without this package or TFP (the graph holds only TF ops and the variables)."""

import math
import os
import shutil
import tempfile

import tensorflow as tf

from tfp_realnvp.model import to_uint8

MAX_SAMPLES = 4096
# What `tf.saved_model.save` writes: a folder holding only these may be replaced by an export.
SAVED_MODEL_ENTRIES = {'saved_model.pb', 'saved_model.pbtxt', 'variables', 'assets',
                       'fingerprint.pb', 'keras_metadata.pb'}


class ServingModule(tf.Module):
  """The inference-mode model (batch norm on running averages) behind four signatures.

  - `log_prob` (also `serving_default`): `images` uint8 `[N, H, W, C]` -> `log_prob` (nats, the
    model's density, on the logit's domain) and `bits_per_dim`, float32 `[N]`. Dequantization is deterministic:
    each pixel is taken at its centre, `x + 0.5`.
  - `sample`: `num_samples` int32 (1..4096), `temperature` float32 (> 0), `seed` int64 ->
    `images` uint8; the same seed gives the same images.
  - `encode`: `images` uint8 -> `latent` float32 `[N, H, W, C]` (pixel centres, as `log_prob`).
  - `decode`: `latent` float32 -> `images` uint8.
  Wrong shapes or dtypes are refused by the signatures; bad values raise InvalidArgumentError.
  """

  def __init__(self, model):
    super().__init__(name='real_nvp_serving')
    shape = model.image_shape
    # Only the (tf.Variable) variables are tracked, not the Keras model or TFP objects, so that
    # loading needs nothing beyond TensorFlow, and TF1 loaders (saved_model_cli run) find them.
    self.variables_ = [v.value for v in model.variables]
    num_dims = math.prod(shape)
    images_spec = tf.TensorSpec([None, *shape], tf.uint8, name='images')
    latent_spec = tf.TensorSpec([None, *shape], tf.float32, name='latent')

    @tf.function(input_signature=[images_spec])
    def log_prob(images):
      pixels = tf.cast(images, tf.float32) + 0.5
      latent, log_det = model.flow.forward_and_log_det(pixels)
      value = -0.5 * tf.reduce_sum(tf.square(latent) + math.log(2 * math.pi), [1, 2, 3]) + log_det
      return {'log_prob': value, 'bits_per_dim': -value / (num_dims * math.log(2.))}

    @tf.function(input_signature=[images_spec])
    def encode(images):
      return {'latent': model.encode(images)}

    @tf.function(input_signature=[latent_spec])
    def decode(latent):
      checks = [tf.debugging.assert_all_finite(latent, 'decode: the latent holds NaN or inf')]
      with tf.control_dependencies(checks):
        return {'images': to_uint8(model.decode(latent))}

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32, name='num_samples'),
                                  tf.TensorSpec([], tf.float32, name='temperature'),
                                  tf.TensorSpec([], tf.int64, name='seed')])
    def sample(num_samples, temperature, seed):
      checks = [
          tf.debugging.assert_positive(num_samples, 'sample: num_samples must be at least 1'),
          tf.debugging.assert_less_equal(num_samples, MAX_SAMPLES,
                                         f'sample: num_samples must be at most {MAX_SAMPLES}'),
          tf.debugging.assert_positive(temperature, 'sample: temperature must be > 0'),
      ]
      with tf.control_dependencies(checks):
        latent = temperature * tf.random.stateless_normal(
            tf.concat([[num_samples], shape], 0), tf.stack([seed, tf.constant(0, tf.int64)]))
      return {'images': to_uint8(model.decode(latent))}

    self.log_prob, self.encode, self.decode, self.sample = log_prob, encode, decode, sample

  def signatures(self):
    return {'serving_default': self.log_prob, 'log_prob': self.log_prob, 'encode': self.encode,
            'decode': self.decode, 'sample': self.sample}


def export_saved_model(model, path):
  """Writes `model` (float32, inference mode) as a SavedModel at `path`; returns `path`.

  Atomic: the SavedModel is written to a sibling folder and renamed into place, so `path` holds
  either the previous export, whole, or the new one, never a mixture (a failed write, e.g. on a
  full disk, leaves the previous one as it was). A model holding NaN or infinite values is
  refused."""
  if model.config.dtype != 'float32':
    raise ValueError(f'export_saved_model: serving signatures are float32; the model is '
                     f'{model.config.dtype}.')
  if not all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in model.variables):
    raise ValueError(f'export_saved_model: the model holds NaN or infinite values; not exported '
                     f'(anything at {path} is kept).')
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'export_saved_model: {path} is a file; give a folder for the SavedModel.')
  if os.path.isdir(path) and not set(os.listdir(path)) <= SAVED_MODEL_ENTRIES:
    raise ValueError(f'export_saved_model: {path} holds files that are not a SavedModel\'s '
                     f'({", ".join(sorted(set(os.listdir(path)) - SAVED_MODEL_ENTRIES)[:5])}); '
                     'give a new or empty folder, or a previous export to replace.')
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{name}.writing-', dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from other users
  previous = None
  try:
    module = ServingModule(model)
    tf.saved_model.save(module, staging, signatures=module.signatures())
    if os.path.exists(path):
      previous = tempfile.mkdtemp(prefix=f'.{name}.previous-', dir=parent)
      os.replace(path, os.path.join(previous, name))
    os.replace(staging, path)
  except BaseException as e:
    if previous and not os.path.exists(path):  # put the previous export back
      os.replace(os.path.join(previous, name), path)
    shutil.rmtree(staging, ignore_errors=True)
    if previous:
      shutil.rmtree(previous, ignore_errors=True)
    if isinstance(e, OSError):  # e.g. a full disk: one line, the previous export kept
      raise ValueError(f'export_saved_model: writing {path} failed ({e}); anything that was '
                       'there is kept.') from e
    raise
  if previous:
    shutil.rmtree(previous, ignore_errors=True)
  return path
