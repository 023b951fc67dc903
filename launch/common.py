"""What the commands share beyond flags: parsing (each command's own flags, one-line errors),
clear errors instead of tracebacks for the user's mistakes, checked output paths, banners."""

import difflib
import functools
import os
import signal
import sys

from absl import app, flags, logging

from launch import flags as launch_flags
from tfp_realnvp.conditional import LabelError
from tfp_realnvp.data import DataError, data_error_in
from tfp_realnvp.export import ExportError
from tfp_realnvp.presets import ConfigError
from tfp_realnvp.training import RunError

FLAGS = launch_flags.FLAGS
USER_ERRORS = (DataError, RunError, ConfigError, ExportError, LabelError)


def _command():
  main = sys.modules['__main__']
  spec = getattr(main, '__spec__', None)
  return spec.name if spec else os.path.basename(sys.argv[0])


def fail(message):
  """A one-line error on stderr, exit status 2."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


class Terminated(BaseException):
  """SIGTERM, as an exception (a BaseException, as KeyboardInterrupt: no `except Exception`
  swallows it): what is being written is removed (files are written whole or not at all,
  `tfp_realnvp.files`), and the command ends promptly."""


def _terminate(signum, frame):
  del signum, frame
  raise Terminated()


def fail_clearly(main):
  """Turns the package's own errors (bad data, workdir, checkpoint, config, export) into one
  line on stderr and exit status 2, and SIGTERM or Ctrl-C into one line and 143 or 130 (128 +
  the signal). Anything else (a bug) keeps its traceback."""
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      fail(e)
    except (Terminated, KeyboardInterrupt) as e:
      name, status = (('SIGTERM', 143) if isinstance(e, Terminated) else ('SIGINT', 130))
      print(f'{_command()}: stopped by {name}; no partial output is left.', file=sys.stderr,
            flush=True)
      sys.exit(status)
    except Exception as e:  # a DataError raised inside a tf.data pipeline arrives as an OpError
      message = data_error_in(e)
      if message is None:
        raise
      fail(message)
  return wrapped


def _parser(required):
  def parse(argv):
    command = _command()
    if any(a in ('--help', '-help', '-h', '-?', '--helpshort', '-helpshort') for a in argv[1:]):
      app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)  # absl's own exits with 1
    try:
      argv, note = launch_flags.renamed_flags(argv)
      if note:
        print(note, file=sys.stderr, flush=True)
      rest = FLAGS(argv)
    except flags.UnrecognizedFlagError as e:
      name = e.flagname
      alias = launch_flags.ALIASES.get(name)
      guesses = ([alias] if alias in launch_flags.OURS else
                 difflib.get_close_matches(name, launch_flags.OURS, n=2, cutoff=0.6))
      hint = f'; did you mean {" or ".join(f"--{g}" for g in guesses)}?' if guesses else '.'
      fail(f'{command} has no flag --{name}{hint} `python -m {command} --help` lists its flags.')
    except flags.Error as e:
      fail(f'{command}: {e}')
    missing = [name for name in required if FLAGS[name].value is None]
    if missing:
      fail(f'{command} needs {", ".join(f"--{m}" for m in missing)} '
           f'({FLAGS[missing[0]].help.rstrip(".")}).')
    if not FLAGS['verbosity'].present:  # TF's INFO logs (e.g. every checkpoint write) are noise
      logging.set_verbosity(logging.WARNING)
    if len(rest) > 1:
      fail(f'{command} takes only flags, got {" ".join(rest[1:])!r}.')
    return rest
  return parse


def run(main, required=()):
  """`app.run(main)` for a command: `--help` lists the command's own flags; an unknown flag, a
  bad value or a missing required flag is one line on stderr, exit status 2; SIGTERM ends it
  promptly (`Terminated`)."""
  for name in launch_flags.OURS:  # --help lists them (the main module's key flags)
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])
  signal.signal(signal.SIGTERM, _terminate)
  app.run(fail_clearly(main), flags_parser=_parser(required))


def run_data(run_config):
  """The data of a run, from its config.json (`--data_dir` may point elsewhere now); with labels
  when its model is class-conditional."""
  data_config = run_config['data']
  data_dir = (FLAGS.data_dir if 'data_dir' in FLAGS else None) or data_config['data_dir']
  return launch_flags.load_data(data_config['dataset'], data_dir, data_config['image_size'],
                                labels=bool(run_config['model'].get('num_classes')))


def check_output_file(path, flag):
  """Refuses, before any work, an output path whose folder is missing or that is a folder."""
  if os.path.isdir(path):
    raise RunError(f'--{flag}={path} is a folder; give a file name.')
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise RunError(f'--{flag}={path}: the folder {folder} does not exist; create it first.')
  if not os.access(folder, os.W_OK):
    raise RunError(f'--{flag}={path}: the folder {folder} is not writable.')


def strategy_name(strategy):
  name = type(strategy).__name__
  return 'default (one device)' if name.startswith('_Default') else name


def say(line):
  print(line, flush=True)


def wrote(paths):
  """The closing line: every file a command wrote."""
  say('wrote: ' + ', '.join(paths))


def check_xla(jit_compile, replicas):
  """XLA compiles the flow on one replica only (`RealNVP.compile`)."""
  if jit_compile and replicas > 1:
    raise RunError(f'--jit_compile runs on one replica, not {replicas}: drop --jit_compile, or '
                   'train on one device (--strategy=one_device).')
