"""What the commands share beyond flags: clear errors instead of tracebacks, restoring a run."""

import functools
import sys

from launch import flags as launch_flags
from tfp_realnvp.data import DataError
from tfp_realnvp.training import RunError

FLAGS = launch_flags.FLAGS


def fail_clearly(main):
  """Turns the library's expected errors (bad data, workdir, checkpoint, config) into one line
  on stderr and exit status 2."""
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except (DataError, RunError, ValueError) as e:
      print(f'error: {e}', file=sys.stderr, flush=True)
      sys.exit(2)
  return wrapped


def run_data(run_config):
  """The data of a run, from its config.json (`--data_dir` may point elsewhere now)."""
  data_config = run_config['data']
  return launch_flags.load_data(data_config['dataset'], FLAGS.data_dir or data_config['data_dir'],
                                data_config['image_size'])
