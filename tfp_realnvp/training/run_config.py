"""`workdir/config.json`, the run's model, data and training settings: read and checked, compared
with a new run's before it resumes, written; and the model of a workdir at its latest checkpoint
(`restore_model`)."""

import json
import os

from tfp_realnvp.model import RealNVP
from tfp_realnvp.presets import RealNVPConfig
from tfp_realnvp.training.checkpoints import Checkpointer, checkpoint_steps
from tfp_realnvp.training.errors import RunError
from tfp_realnvp.training.workdir import write_json_atomic


RUN_CONFIG_SECTIONS = ('model', 'data', 'train')


DATA_KEYS = ('dataset', 'data_dir', 'image_size')


def read_run_config(workdir):
  """`workdir/config.json`, checked: its sections and the model's fields (`RunError` or
  `ConfigError` naming what is missing or unknown)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise RunError(f'--workdir={workdir} is a file, not a run\'s folder.')
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path) as f:
      run_config = json.load(f)
  except FileNotFoundError:
    raise RunError(f'{workdir} has no config.json: is it the workdir of a launch.train run?') \
        from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RunError(f'{path} is corrupt ({e}).') from None
  except OSError as e:
    raise RunError(f'Cannot read {path} ({e}).') from None
  if not isinstance(run_config, dict):
    raise RunError(f'{path}: expected a JSON object with sections {sorted(RUN_CONFIG_SECTIONS)}.')
  missing = sorted(set(RUN_CONFIG_SECTIONS) - set(run_config))
  unknown = sorted(set(run_config) - set(RUN_CONFIG_SECTIONS))
  if missing or unknown:
    raise RunError(f'{path}: ' + '; '.join(
        ([f'missing sections {missing}'] if missing else []) +
        ([f'unknown sections {unknown}'] if unknown else [])) +
        f' (expected {sorted(RUN_CONFIG_SECTIONS)}).')
  for section in RUN_CONFIG_SECTIONS:
    if not isinstance(run_config[section], dict):
      raise RunError(f'{path}: section {section!r} must be a JSON object.')
  missing = [k for k in DATA_KEYS if k not in run_config['data']]
  if missing:
    raise RunError(f'{path}: the data section lacks {missing}.')
  RealNVPConfig.from_dict(run_config['model'], f'{path}, section model')
  return run_config


def check_run_config(workdir, run_config):
  """Checks that `workdir/config.json`, if there, describes the same model and data: the
  model's architecture fields (`RealNVPConfig.architecture()`) and the data must match to
  resume; run settings (precision, recompute, checks, optimizer) and training lengths may
  change. Writes nothing."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  saved = read_run_config(workdir)
  saved_sections = {'model': RealNVPConfig.from_dict(saved['model'], path).architecture(),
                    'data': saved['data']}
  new_sections = {'model': RealNVPConfig.from_dict(run_config['model']).architecture(),
                  'data': run_config['data']}
  saved_float16 = saved['model'].get('compute_dtype') == 'float16'
  if saved_float16 != (run_config['model'].get('compute_dtype') == 'float16') and \
      checkpoint_steps(workdir):
    raise RunError(f'{workdir} holds a run {"with" if saved_float16 else "without"} float16 mixed '
                   'precision, whose checkpoints hold the optimizer '
                   f'{"with" if saved_float16 else "without"} loss scaling: resume it '
                   f'{"with" if saved_float16 else "without"} --mixed_precision=float16 (bfloat16 '
                   'and float32 may alternate), or use another --workdir.')
  for section in ('model', 'data'):
    differences = {k: (saved_sections[section].get(k), v) for k, v in new_sections[section].items()
                   if saved_sections[section].get(k) != v}
    if differences:
      detail = ', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in differences.items())
      if not checkpoint_steps(workdir):
        raise RunError(f'{path} is from a run with a different {section} config ({detail}) that '
                       f'left no checkpoint: delete {path} to start this run there, or use '
                       'another --workdir.')
      raise RunError(f'{workdir} holds a run with a different {section} config ({detail}). '
                     'Use another --workdir, or the same flags to resume that run.')


def write_run_config(workdir, run_config):
  """Writes `workdir/config.json` (once the run is known to start: see `check_run_config`)."""
  os.makedirs(workdir, exist_ok=True)
  write_json_atomic(os.path.join(workdir, 'config.json'), run_config)


def model_from_run_config(run_config):
  return RealNVP(RealNVPConfig.from_dict(run_config['model']))


def restore_model(workdir):
  """The model of `workdir` at its latest checkpoint: `(model, run_config, step)`."""
  run_config = read_run_config(workdir)
  model = model_from_run_config(run_config)
  model.compile()
  step = Checkpointer(workdir, model).restore_latest(required=True, with_optimizer=False)
  return model, run_config, step
