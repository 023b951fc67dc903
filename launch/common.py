"""What the commands share beyond flags: clear errors instead of tracebacks."""

import functools
import sys

from tfp_realnvp.data import DataError
from tfp_realnvp.training import RunError


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
