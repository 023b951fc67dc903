"""The training loop: Keras `fit` resumed mid-epoch at the checkpoint's step, with callbacks that
checkpoint (`CheckpointEvery`) and stop at the first non-finite loss (`StopOnDivergence`)."""

import keras
import numpy as np

from tfp_realnvp.training.errors import RunError


class CheckpointEvery(keras.callbacks.Callback):
  """Saves every `every_steps` steps and at the end of each epoch."""

  def __init__(self, checkpointer, every_steps=None):
    super().__init__()
    self.checkpointer, self.every_steps = checkpointer, every_steps

  def on_train_begin(self, logs=None):
    self._step = self.checkpointer.step  # counted here after, not read from the device each step

  def on_train_batch_end(self, batch, logs=None):
    self._step += 1
    if self.every_steps and self._step % self.every_steps == 0:
      self.checkpointer.save()

  def on_epoch_end(self, epoch, logs=None):
    self.checkpointer.save()


class StopOnDivergence(keras.callbacks.Callback):
  """Stops training with a `RunError` at the first step whose loss is not finite, before any
  callback after it in the list (put `CheckpointEvery` after it) can save that step."""

  def __init__(self, checkpointer, advice=''):
    super().__init__()
    self.checkpointer, self.advice = checkpointer, advice

  def on_train_begin(self, logs=None):
    self._step = self.checkpointer.step

  def on_train_batch_end(self, batch, logs=None):
    self._step += 1
    loss = (logs or {}).get('loss')
    if loss is not None and not np.all(np.isfinite(np.asarray(loss, np.float64))):
      # The loss of step d is that of the weights after step d - 1: those are diverged too.
      bad = [s for s in self.checkpointer.steps_on_disk() if s >= self._step - 1]
      moved = ''
      if bad:
        aside = self.checkpointer.set_aside(bad, 'diverged')
        moved = (f'the checkpoints of the weights that gave it '
                 f'({", ".join(f"ckpt-{s}" for s in bad)}) are moved to {aside}; ')
      saved = self.checkpointer.steps_on_disk()
      kept = (f'the newest checkpoint left is at step {saved[0]}' if saved else
              'no checkpoint is left to resume from')
      raise RunError(f'Training diverged: the loss is {float(np.ravel(loss)[0])} at step '
                     f'{self._step}. Stopped; {moved}{kept}. {self.advice}'.strip())


def steps_per_epoch(num_train, global_batch_size, requested=None):
  if requested:
    return requested
  if not num_train:
    raise RunError('The dataset does not say how many training images it has: give '
                   '--steps_per_epoch.')
  if num_train < global_batch_size:
    raise RunError(f'The training split has {num_train} images, fewer than one global batch '
                   f'({global_batch_size}); lower --batch_size.')
  return num_train // global_batch_size


def fit_resumable(model, batches, epochs, steps, start_step, callbacks, verbose='auto',
                  validation_data=None):
  """Keras `fit` from step `start_step` to `epochs * steps`, resuming mid-epoch if needed."""
  done_epochs, offset = divmod(start_step, steps)
  history = {}
  if offset and done_epochs < epochs:  # finish the interrupted epoch first
    h = model.fit(batches, initial_epoch=done_epochs, epochs=done_epochs + 1,
                  steps_per_epoch=steps - offset, callbacks=callbacks, verbose=verbose,
                  shuffle=False, validation_data=validation_data)
    history = dict(h.history)
    done_epochs += 1
  if done_epochs < epochs:
    h = model.fit(batches, initial_epoch=done_epochs, epochs=epochs, steps_per_epoch=steps,
                  callbacks=callbacks, verbose=verbose, shuffle=False,
                  validation_data=validation_data)
    for key, values in h.history.items():
      history.setdefault(key, []).extend(values)
  return history
