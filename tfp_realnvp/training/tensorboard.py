"""TensorBoard: training curves, validation and test bits/dim, and sample pictures, at the
global step (`TensorBoardLogger`)."""

import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tfp_realnvp.images import image_grid
from tfp_realnvp.model import to_uint8
from tfp_realnvp.training.evaluation import class_samples
from tfp_realnvp.training.progress import WindowMeans


CLASS_GRID_ROWS = 20  # classes in TensorBoard's class grid at each epoch's end (8 samples each)


class TensorBoardLogger(keras.callbacks.Callback):
  """TensorBoard, every figure at the global step (the optimizer's step counter), so scalars
  and pictures line up and a resumed run continues its curves:

  - `logs/train`: `bits_per_dim` and `loss` every `every_steps` steps (means over those steps),
    the learning rate, and images/s;
  - `logs/validation`: `bits_per_dim` and `loss` at each epoch's end; `logs/test`: the final
    test bits/dim (`write_test`);
  - `logs/images`: a grid of real test images (once) and samples at each epoch's end (for a
    class-conditional model also `class_grid`: a row of samples per class, the first
    `CLASS_GRID_ROWS` classes).
  """

  def __init__(self, log_dir, every_steps=100, num_samples=36, temperature=0.7, real_images=None,
               global_batch=None):
    super().__init__()
    self.log_dir, self.every_steps, self.global_batch = log_dir, every_steps, global_batch
    self.num_samples, self.temperature = num_samples, temperature
    self.real_images = real_images
    self._writers = {}
    self._windows = WindowMeans()

  def writer(self, name):
    if name not in self._writers:
      self._writers[name] = tf.summary.create_file_writer(os.path.join(self.log_dir, name))
    return self._writers[name]

  def _scalars(self, name, values, step):
    with self.writer(name).as_default():
      for key, value in values.items():
        if math.isfinite(value):
          tf.summary.scalar(key, value, step=step)
    self.writer(name).flush()

  def on_train_begin(self, logs=None):
    self._step = int(self.model.optimizer.iterations.numpy())
    self._time, self._time_step = time.perf_counter(), self._step
    if self.real_images is not None:
      with self.writer('images').as_default():
        tf.summary.image('real_test_images', image_grid(np.asarray(self.real_images))[None],
                         step=self._step)
      self.writer('images').flush()
      self.real_images = None  # once per run

  def on_epoch_begin(self, epoch, logs=None):
    self._windows.reset()

  def on_train_batch_end(self, batch, logs=None):
    self._step += 1
    if self._step % self.every_steps == 0:
      window = self._windows.update(batch, logs)
      now = time.perf_counter()
      values = {k: v for k, v in window.items() if k in ('bits_per_dim', 'loss')}
      values['learning_rate'] = float(np.asarray(self.model.optimizer.learning_rate))
      if self.global_batch and now > self._time:
        values['images_per_second'] = ((self._step - self._time_step) * self.global_batch /
                                       (now - self._time))
      self._time, self._time_step = now, self._step
      self._scalars('train', values, self._step)

  def on_epoch_end(self, epoch, logs=None):
    logs = logs or {}
    self._scalars('validation', {k[4:]: float(np.ravel(v)[0]) for k, v in logs.items()
                                 if k.startswith('val_')}, self._step)
    grid = image_grid(to_uint8(self.model.sample(self.num_samples, self.temperature,
                                                 seed=0)).numpy())
    with self.writer('images').as_default():
      tf.summary.image(f'samples_t{self.temperature}', grid[None], step=self._step)
      if self.model.num_classes:
        samples = to_uint8(class_samples(self.model, temperature=self.temperature,
                                         num_classes=CLASS_GRID_ROWS)).numpy()
        tf.summary.image(f'class_grid_t{self.temperature}', image_grid(samples, columns=8)[None],
                         step=self._step)
    self.writer('images').flush()

  def write_test(self, bits_per_dim, step):
    """The final test bits/dim, at `step`."""
    self._scalars('test', {'bits_per_dim': bits_per_dim}, step)
