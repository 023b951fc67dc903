"""The run's folder: one process at a time (an OS lock), `--restart` setting the old run aside,
and JSON files written atomically with the umask's permissions."""

import fcntl
import json
import math
import os
import socket
import time

from tfp_realnvp.files import atomic_path, current_umask  # noqa: F401 (current_umask: re-exported)
from tfp_realnvp.training.errors import RunError


def _strict(value):
  """`value` with NaN and infinities as None (JSON has no such numbers)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_strict(v) for v in value]
  return value


def write_json_atomic(path, value):
  """Writes `value` as strict JSON (NaN and infinities as null) to `path` atomically, with the
  permissions of a new file under the umask."""
  with atomic_path(path) as temporary, open(temporary, 'w') as f:
    json.dump(_strict(value), f, indent=2, sort_keys=True, allow_nan=False)


_held_locks = []  # open lock files: closing one (or the process ending) releases its lock


def lock_workdir(workdir):
  """Takes `workdir` for this process, or raises `RunError` naming the process that has it.

  The lock is the OS's (`flock` on `workdir/train.lock`), so the OS releases it when the process
  ends, however it ends: a killed run leaves nothing that blocks the next one."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise RunError(f'--workdir={workdir} is a file, not a folder.')
  try:
    os.makedirs(workdir, exist_ok=True)
    lock = open(os.path.join(workdir, 'train.lock'), 'a+')  # pylint: disable=consider-using-with
  except OSError as e:  # read-only, a parent that is a file, ...
    raise RunError(f'--workdir={workdir} cannot be written ({e.strerror or e}).') from None
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:  # EWOULDBLOCK: another process holds it (other OSErrors propagate)
    lock.seek(0)
    holder = lock.read().strip() or 'another process'
    lock.close()
    raise RunError(f'{workdir} is in use by another launch.train ({holder}): wait for it to end, '
                   'or use another --workdir.') from None
  lock.seek(0)
  lock.truncate()
  lock.write(f'pid {os.getpid()} on {socket.gethostname()}, since '
             f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n')
  lock.flush()
  _held_locks.append(lock)
  return lock


def set_aside_run(workdir):
  """For `--restart`: moves the run's files (checkpoints, config, metrics, logs, samples) into
  `workdir/before-restart-TIME/`, kept, not deleted. Returns that folder, or None if empty."""
  names = [n for n in ('checkpoints', 'config.json', 'metrics.json', 'logs', 'samples.png')
           if os.path.exists(os.path.join(workdir, n))]
  if not names:
    return None
  base = os.path.join(workdir, f'before-restart-{time.strftime("%Y%m%d-%H%M%S")}')
  target, count = base, 1
  while os.path.exists(target):  # two restarts within a second
    count += 1
    target = f'{base}.{count}'
  os.makedirs(target)
  for name in names:
    os.replace(os.path.join(workdir, name), os.path.join(target, name))
  return target
