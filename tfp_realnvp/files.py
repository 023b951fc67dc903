"""Files written whole or not at all: `atomic_path` gives a temporary name beside the file, which
becomes the file only when the writing ends well (an error, Ctrl-C or a SIGTERM turned into an
exception leave the old file, or none, and no temporary one)."""

import contextlib
import os
import tempfile


def current_umask():
  """The process's umask, read without changing it (Linux: /proc/self/status); elsewhere, by
  setting and restoring it."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except OSError:
    pass
  umask = os.umask(0o022)
  os.umask(umask)
  return umask


@contextlib.contextmanager
def atomic_path(path, suffix=''):
  """Yields a temporary path in `path`'s folder to write (ending in `suffix`, for writers that
  go by the extension); renames it to `path`, with a new file's permissions under the umask,
  when the block ends, and removes it if the block raises."""
  directory = os.path.dirname(os.path.abspath(path))
  handle, temporary = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.',
                                       suffix=f'.tmp{suffix}')
  os.close(handle)
  try:
    yield temporary
    os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp's 0600 would hide it
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(temporary)
    raise
