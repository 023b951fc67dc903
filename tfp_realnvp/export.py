"""SavedModel export for serving: `log_prob`, `sample`, `encode`, `decode` signatures that plain
TensorFlow loads without this package or TFP (the graph holds only TF ops and the variables)."""

import math
import os
import shutil
import tempfile

import tensorflow as tf

from tfp_realnvp.model import to_uint8

MAX_SAMPLES = 4096


class ExportError(ValueError):
  """A model or path that cannot be exported as asked, with what to do."""


def _checked_batch(x, what, shape, signature):
  """`x` after checking it is `[N, *shape]` with N >= 1 (an InvalidArgumentError that names the
  signature and the expected shape otherwise), with that static shape set."""
  actual, rank = tf.shape(x), len(shape) + 1
  padded = tf.concat([actual, tf.zeros([rank], tf.int32)], 0)[:rank]  # indexable at any rank
  good = (tf.equal(tf.size(actual), rank) & tf.reduce_all(tf.equal(padded[1:], shape))
          & tf.greater(padded[0], 0))
  check = tf.debugging.Assert(good, [
      f'{signature}: expected {what} of shape [N, {", ".join(map(str, shape))}] with N >= 1, got '
      'shape', actual], summarize=8)
  with tf.control_dependencies([check]):
    return tf.ensure_shape(tf.identity(x), [None, *shape])
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
  Wrong dtypes are refused by the signatures; a wrong shape or rank, an empty batch, and bad
  values (temperature not finite and > 0, a latent holding NaN) raise InvalidArgumentError with a
  message that names the signature, what it expected and what it got.

  A class-conditional model's signatures take `labels` (int32 `[N]`, one per image, latent or
  sample, in [0, num_classes)) beside their other inputs: `log_prob` gives log p(x | y), `encode`
  and `decode` use the labels' flow, and `sample(num_samples, temperature, seed, labels)` draws
  the labels' classes. One more signature, `classify`: `images` -> `label` int32 `[N]` (Bayes'
  classifier, argmax_y log p(x | y) + log p(y), pixel centres), `probabilities` float32
  `[N, num_classes]` (the posterior) and `log_prob` (log p(x) of the class mixture).
  """

  def __init__(self, model):
    super().__init__(name='real_nvp_serving')
    shape = model.image_shape
    # Only the (tf.Variable) variables are tracked, not the Keras model or TFP objects, so that
    # loading needs nothing beyond TensorFlow, and TF1 loaders (saved_model_cli run) find them.
    self.variables_ = [v.value for v in model.variables]
    num_dims = math.prod(shape)
    # Any rank in the signature: the checks below refuse wrong shapes with a clear message.
    images_spec = tf.TensorSpec(None, tf.uint8, name='images')
    latent_spec = tf.TensorSpec(None, tf.float32, name='latent')
    num_classes = model.num_classes
    # A class-conditional model's signatures take labels too; the same functions otherwise.
    labels_spec = [tf.TensorSpec(None, tf.int32, name='labels')] if num_classes else []

    def checked_labels(labels, count, signature):
      """`labels` (None for an unconditional model) after checking they are `[count]` and in
      [0, num_classes)."""
      if not num_classes:
        return None
      labels = tf.convert_to_tensor(labels)
      good = (tf.equal(tf.rank(labels), 1) & tf.equal(tf.size(labels), count) &
              tf.reduce_all((labels >= 0) & (labels < num_classes)))
      check = tf.debugging.Assert(good, [
          f'{signature}: expected labels of shape [N] (one per item) in [0, {num_classes}), got '
          'shape', tf.shape(labels), 'and values', labels], summarize=8)
      with tf.control_dependencies([check]):
        return tf.reshape(tf.identity(labels), [-1])

    def latent_log_prob(latent, labels):
      if labels is None:
        return -0.5 * tf.reduce_sum(tf.square(latent) + math.log(2 * math.pi), [1, 2, 3])
      loc, log_scale = model.prior.loc_and_log_scale(labels)
      standard = (latent - loc) * tf.exp(-log_scale)
      return tf.reduce_sum(-0.5 * tf.square(standard) - log_scale - 0.5 * math.log(2 * math.pi),
                           [1, 2, 3])

    def log_prob_given(pixels, labels):
      latent, log_det = model.flow.forward_and_log_det(pixels, labels=labels)
      return latent_log_prob(latent, labels) + log_det

    @tf.function(input_signature=[images_spec, *labels_spec])
    def log_prob(images, labels=None):
      images = _checked_batch(images, 'uint8 images', shape, 'log_prob')
      labels = checked_labels(labels, tf.shape(images)[0], 'log_prob')
      value = log_prob_given(tf.cast(images, tf.float32) + 0.5, labels)
      return {'log_prob': value, 'bits_per_dim': -value / (num_dims * math.log(2.))}

    @tf.function(input_signature=[images_spec, *labels_spec])
    def encode(images, labels=None):
      images = _checked_batch(images, 'uint8 images', shape, 'encode')
      labels = checked_labels(labels, tf.shape(images)[0], 'encode')
      return {'latent': model.encode(images, labels)}

    @tf.function(input_signature=[latent_spec, *labels_spec])
    def decode(latent, labels=None):
      latent = _checked_batch(latent, 'a float32 latent', shape, 'decode')
      labels = checked_labels(labels, tf.shape(latent)[0], 'decode')
      checks = [tf.debugging.assert_all_finite(latent, 'decode: the latent holds NaN or inf')]
      with tf.control_dependencies(checks):
        return {'images': to_uint8(model.decode(latent, labels))}

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32, name='num_samples'),
                                  tf.TensorSpec([], tf.float32, name='temperature'),
                                  tf.TensorSpec([], tf.int64, name='seed'), *labels_spec])
    def sample(num_samples, temperature, seed, labels=None):
      checks = [
          tf.debugging.assert_positive(num_samples, 'sample: num_samples must be at least 1'),
          tf.debugging.assert_less_equal(num_samples, MAX_SAMPLES,
                                         f'sample: num_samples must be at most {MAX_SAMPLES}'),
          tf.debugging.assert_all_finite(temperature, 'sample: temperature must be finite'),
          tf.debugging.assert_positive(temperature, 'sample: temperature must be > 0'),
      ]
      with tf.control_dependencies(checks):
        noise = tf.random.stateless_normal(
            tf.concat([[num_samples], shape], 0), tf.stack([seed, tf.constant(0, tf.int64)]))
      labels = checked_labels(labels, num_samples, 'sample')
      if labels is None:
        return {'images': to_uint8(model.decode(temperature * noise))}
      loc, log_scale = model.prior.loc_and_log_scale(labels)
      latent = loc + temperature * tf.exp(log_scale) * noise
      return {'images': to_uint8(model.decode(latent, labels))}

    self.log_prob, self.encode, self.decode, self.sample = log_prob, encode, decode, sample
    self.classify = None
    if num_classes:
      @tf.function(input_signature=[images_spec])
      def classify(images):
        images = _checked_batch(images, 'uint8 images', shape, 'classify')
        pixels = tf.cast(images, tf.float32) + 0.5
        count = tf.shape(pixels)[0]
        per_class = tf.map_fn(lambda k: log_prob_given(pixels, tf.fill([count], k)),
                              tf.range(num_classes), fn_output_signature=tf.float32,
                              parallel_iterations=1)  # one copy of the flow, as the model's
        joint = tf.transpose(per_class) + model.prior.log_class_prior()
        return {'label': tf.argmax(joint, -1, output_type=tf.int32),
                'probabilities': tf.nn.softmax(joint, -1),
                'log_prob': tf.reduce_logsumexp(joint, -1)}
      self.classify = classify

  def signatures(self):
    signatures = {'serving_default': self.log_prob, 'log_prob': self.log_prob,
                  'encode': self.encode, 'decode': self.decode, 'sample': self.sample}
    if self.classify is not None:
      signatures['classify'] = self.classify
    return signatures


def export_saved_model(model, path):
  """Writes `model` (float32, inference mode) as a SavedModel at `path`; returns `path`.

  Atomic: the SavedModel is written to a sibling folder and renamed into place, so `path` holds
  either the previous export, whole, or the new one, never a mixture (a failed write, e.g. on a
  full disk, leaves the previous one as it was). A model holding NaN or infinite values is
  refused."""
  if model.config.dtype != 'float32':
    raise ExportError(f'export_saved_model: serving signatures are float32; the model is '
                     f'{model.config.dtype}.')
  if not all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in model.variables):
    raise ExportError(f'export_saved_model: the model holds NaN or infinite values; not exported '
                     f'(anything at {path} is kept).')
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ExportError(f'export_saved_model: {path} is a file; give a folder for the SavedModel.')
  if os.path.isdir(path) and not set(os.listdir(path)) <= SAVED_MODEL_ENTRIES:
    raise ExportError(f'export_saved_model: {path} holds files that are not a SavedModel\'s '
                     f'({", ".join(sorted(set(os.listdir(path)) - SAVED_MODEL_ENTRIES)[:5])}); '
                     'give a new or empty folder, or a previous export to replace.')
  parent, name = os.path.split(path)
  try:
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f'.{name}.writing-', dir=parent)
  except OSError as e:  # a parent that is a file, a read-only folder
    raise ExportError(f'export_saved_model: cannot write in {parent} ({e}).') from None
  from tfp_realnvp.files import current_umask  # pylint: disable=import-outside-toplevel
  os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide the export from other users
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
      raise ExportError(f'export_saved_model: writing {path} failed ({e}); anything that was '
                       'there is kept.') from e
    raise
  if previous:
    shutil.rmtree(previous, ignore_errors=True)
  return path
