"""Preemption: on SIGTERM (a scheduler taking the machine back) or SIGINT (Ctrl-C), training stops
at a step every worker agrees on, checkpoints that step, and the run ends with `Preempted`.

On one machine the step in flight finishes and is checkpointed. Under MultiWorkerMirroredStrategy,
TF's `tf.distribute.experimental.PreemptionCheckpointHandler` makes the workers agree, through the
coordination service, on the step to save at (the one after the signal reaches them all: the
step in flight and one or two more). Here it saves with the run's `Checkpointer` (`ckpt-STEP`,
written only when finite, rotated, the chief's files only) instead of its own checkpoint manager,
and ends the run by raising `Preempted`, so the launcher can say what happened and exit with
`REQUEUE` (SIGTERM) or `INTERRUPTED` (SIGINT).

  preemption = SaveOnPreemption(checkpointer, strategy)
  try:
    model.fit(..., callbacks=[..., preemption])
  finally:
    preemption.close()   # SIGTERM and SIGINT as they were
"""

import logging
import os
import shutil
import signal
import tempfile

import keras
import tensorflow as tf

REQUEUE = 42  # SIGTERM: checkpointed, run the same command again (TF's code for a preempted run)
INTERRUPTED = 130  # SIGINT (Ctrl-C): checkpointed; 128 + SIGINT, as a shell reports it


class _WithoutTheHandlersOwnDeprecation(logging.Filter):
  """TF's handler reads a property of its own that TF marks deprecated, warning at every save."""

  def filter(self, record):
    return 'PreemptionCheckpointHandler.total_run_calls' not in record.getMessage()


tf.get_logger().addFilter(_WithoutTheHandlersOwnDeprecation())


class Preempted(Exception):
  """Training stopped on a signal after checkpointing `step`; `status` is the exit status."""

  def __init__(self, step, signal_name, status, path):
    signal_name = signal_name or 'a signal to another worker'
    super().__init__(f'stopped by {signal_name} at step {step}')
    self.step, self.signal_name, self.status, self.path = step, signal_name, status, path


class SaveOnPreemption(keras.callbacks.Callback):
  """A Keras callback (every worker's `fit` must carry it) that checkpoints and stops on SIGTERM or
  SIGINT; build it in the main thread, before `fit`, and `close()` it after. A second SIGINT
  stops at once (KeyboardInterrupt): the checkpoints on disk stay loadable (TF writes an index
  last), only the one being written is lost."""

  def __init__(self, checkpointer, strategy):
    super().__init__()
    self.checkpointer = checkpointer
    self.signal_name = None  # the first signal received
    self._saved_path = None
    # TF's handler restores from, and makes workers' folders beside, a checkpoint folder of its
    # own: a private one, outside the workdir (it saves nothing there: `save_fn` is ours).
    self._scratch = tempfile.mkdtemp(prefix='realnvp_preemption_')
    self._previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for signum in self._previous:
      signal.signal(signum, self._on_signal)
    resolver = getattr(strategy, 'cluster_resolver', None)
    self.handler = None
    if resolver is not None and resolver.cluster_spec().as_dict():
      # Several workers: TF's handler makes them agree on the step. It polls
      # `termination_watcher_fn` (every second, in a thread of its own) instead of taking SIGTERM
      # itself: so SIGINT counts too, and the signal handlers can be put back.
      self.handler = tf.distribute.experimental.PreemptionCheckpointHandler(
          resolver, tf.train.Checkpoint(), os.path.join(self._scratch, 'checkpoints'),
          tf.distribute.experimental.TerminationConfig(
              termination_watcher_fn=lambda: self.signal_name is not None, exit_fn=self._stop,
              save_fn=self._save))

  def _on_signal(self, signum, frame):
    del frame
    if self.signal_name == 'SIGINT' and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: at once
    self.signal_name = self.signal_name or signal.Signals(signum).name

  def _save(self, *args, **kwargs):
    del args, kwargs  # TF's checkpoint number: the step is the optimizer's
    self._saved_path = self.checkpointer.save()

  def _stop(self):
    raise Preempted(self.checkpointer.step, self.signal_name,
                    INTERRUPTED if self.signal_name == 'SIGINT' else REQUEUE,
                    self._saved_path)

  def on_train_batch_end(self, batch, logs=None):
    if self.handler is not None:
      self.handler.save_checkpoint_if_preempted()
    elif self.signal_name:  # one machine: the step just finished (TF's handler would train two
      self._save()          # more, its agreement and its once-a-second watch)
      self._stop()

  def close(self):
    """SIGTERM and SIGINT back as they were (ignored if one came: the run is stopping already);
    TF's handler's folder removed. (A signal after the last step stops nothing: `signal_name`
    says it came.)"""
    for signum, handler in self._previous.items():
      signal.signal(signum, signal.SIG_IGN if self.signal_name else handler)
    shutil.rmtree(self._scratch, ignore_errors=True)
