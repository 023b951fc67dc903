"""Progress output: a line redrawn in place on a terminal, plain lines in a log file (`Progress`
for loops, `EpochProgbar` and `ProgressLines` for training), and metrics as means over windows
of steps."""

import math
import sys
import time

import keras
import numpy as np


def interactive(stream=None):
  """Whether `stream` (stdout by default) is a terminal: bars redrawn in place only there."""
  stream = stream or sys.stdout
  return bool(getattr(stream, 'isatty', lambda: False)())


def _duration(seconds):
  seconds = int(round(seconds))
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


class Progress:
  """Progress of a long loop: on a terminal, one line redrawn in place; otherwise (a log file)
  a plain line at most every `every_seconds` and at the end, without `\\r` or colour codes.

    progress = Progress('evaluate', total=10000, unit='images')
    progress.update(640)   # done so far
    progress.close()
  """

  def __init__(self, label, total=None, unit='images', stream=None, every_seconds=30.):
    self.label, self.total, self.unit = label, total, unit
    self.stream = stream or sys.stdout
    self.every_seconds = every_seconds
    self.interactive = interactive(self.stream)
    self.start = self._last = time.perf_counter()
    self.done, self._written = 0, None  # the count of the last plain line written

  def _line(self):
    elapsed = time.perf_counter() - self.start
    rate = self.done / elapsed if elapsed > 0 else 0.
    line = f'{self.label}: {self.done:,}' + (f'/{self.total:,}' if self.total else '')
    line += f' {self.unit}'
    if self.total:
      line += f' ({self.done / self.total:.0%})'
    line += f', {rate:.1f} {self.unit}/s, {_duration(elapsed)}'
    if self.total and rate > 0 and self.done < self.total:
      line += f', about {_duration((self.total - self.done) / rate)} left'
    return line

  def update(self, done):
    self.done = done
    now = time.perf_counter()
    if self.interactive:
      self.stream.write('\r' + self._line() + '\x1b[K')
      self.stream.flush()
    elif now - self._last >= self.every_seconds:
      self.stream.write(self._line() + '\n')
      self.stream.flush()
      self._written = done
    else:
      return
    self._last = now

  def close(self):
    """The last line (off a terminal, unless the last line written already had the count)."""
    if not self.interactive and self._written == self.done:
      return
    self.stream.write(('\r' + self._line() + '\x1b[K\n') if self.interactive else
                      self._line() + '\n')
    self.stream.flush()


class EpochProgbar(keras.callbacks.ProgbarLogger):
  """Keras' progress bar (for terminals), numbering epochs out of the run's total: a resumed
  run's `fit` calls see only the epochs left."""

  def __init__(self, total_epochs):
    super().__init__()
    self.total_epochs = total_epochs

  def set_params(self, params):
    super().set_params(params)
    self.epochs = self.total_epochs  # what Keras' bar prints: 'Epoch {epoch + 1}/{epochs}'


class ProgressLines(keras.callbacks.Callback):
  """For logs (output that is not a terminal): one plain line every `every_steps` steps and one
  at each epoch's end, with the metrics (window means), images/s and time left in the run."""

  def __init__(self, total_epochs, steps_per_epoch, global_batch, every_steps=100,
               stream=None):
    super().__init__()
    self.total_epochs, self.steps_per_epoch = total_epochs, steps_per_epoch
    self.global_batch, self.every_steps = global_batch, every_steps
    self.stream = stream or sys.stdout
    self._windows = WindowMeans()

  def _say(self, line):
    self.stream.write(line + '\n')
    self.stream.flush()

  def on_train_begin(self, logs=None):
    self._step = int(self.model.optimizer.iterations.numpy())
    self._time, self._time_step = time.perf_counter(), self._step

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch
    self._windows.reset()

  def on_train_batch_end(self, batch, logs=None):
    self._step += 1
    if self._step % self.every_steps == 0:
      window = self._windows.update(batch, logs)
      self._say(f'step {self._step:,}/{self.total_epochs * self.steps_per_epoch:,} (epoch '
                f'{self._epoch + 1}/{self.total_epochs}): {_metric_text(window)}{self._speed()}')

  def _speed(self):
    now = time.perf_counter()
    steps, seconds = self._step - self._time_step, now - self._time
    self._time, self._time_step = now, self._step
    if not steps or seconds <= 0:
      return ''
    left = (self.total_epochs * self.steps_per_epoch - self._step) * seconds / steps
    return (f', {steps * self.global_batch / seconds:.1f} images/s'
            + (f', about {_duration(left)} left' if left > 0 else ''))

  def on_epoch_end(self, epoch, logs=None):
    self._say(f'epoch {epoch + 1}/{self.total_epochs} done at step {self._step:,}: '
              f'{_metric_text(logs or {})}')


def _metric_text(logs):
  return ', '.join(f'{k} {float(np.ravel(v)[0]):.4f}' for k, v in sorted(logs.items())
                   if np.size(v) and k != 'learning_rate')


class WindowMeans:
  """Keras reports each metric as its mean since the epoch began: `update` gives the means over
  the steps since its last call in the epoch instead (from the running means and step counts;
  float64 arithmetic)."""

  def reset(self):
    self._previous, self._count = {}, 0

  def update(self, batch, logs):
    count = batch + 1
    window = {}
    for key, value in (logs or {}).items():
      value = float(np.ravel(value)[0]) if np.size(value) else math.nan
      before = self._previous.get(key, 0.)
      window[key] = ((value * count - before * self._count) / (count - self._count)
                     if count > self._count else value)
      self._previous[key] = value
    self._count = count
    return window
