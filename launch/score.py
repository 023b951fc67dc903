"""Bits/dim per image under a trained model: out-of-distribution and anomaly scores.

  python -m launch.score --workdir=runs/mnist --images=digits.npy --out=scores.csv

`--images`: a .npy file (uint8 [N, H, W, C] or [N, H, W]), npz:PATH (its x_test), or a folder
of PNG/JPEG (centre-cropped and resized to the model's size). Output: CSV or JSON by extension.
Dequantization: `--noise_draws` seeded U[0, 1) draws per image, averaged.
"""

import csv
import json
import os

from absl import app, flags
import numpy as np
import tensorflow as tf

from launch import flags as launch_flags
from launch.common import fail_clearly
from tfp_realnvp import data as data_lib
from tfp_realnvp import training

FLAGS = launch_flags.FLAGS
flags.DEFINE_string('images', None, 'Images to score: .npy, npz:PATH or a folder.')
flags.DEFINE_string('out', 'scores.csv', 'Output file, .csv or .json.')


def read_images(source, image_shape):
  if source.startswith('npz:'):
    images = data_lib.load(source).test
    images = np.stack(list(images.as_numpy_iterator()))
    names = [f'{source}[{i}]' for i in range(len(images))]
  elif os.path.isdir(source):
    names, images = data_lib.read_image_folder(source, image_shape[0])  # names with images
    if image_shape[-1] == 1:
      images = np.round(images.mean(-1, keepdims=True)).astype(np.uint8)
  elif source.endswith('.npy') and os.path.exists(source):
    images = np.load(source, allow_pickle=False)
    names = [f'{source}[{i}]' for i in range(len(images))]
  else:
    raise data_lib.DataError(f'--images={source!r}: expected an existing .npy file, npz:PATH or '
                             'a folder of images.')
  images = data_lib.as_images(images, source)
  if images.shape[1:] != tuple(image_shape):
    raise data_lib.DataError(f'{source}: the model takes images {list(image_shape)}, got '
                             f'{list(images.shape[1:])}.')
  return images, names


@fail_clearly
def main(argv):
  del argv
  model, _, _ = training.restore_model(FLAGS.workdir)
  images, names = read_images(FLAGS.images, model.image_shape)
  bits = np.zeros(len(images))
  for start in range(0, len(images), 256):
    batch = images[start:start + 256]
    draws = [model.bits_per_dim(batch, seed=start * FLAGS.noise_draws + d + 1)
             for d in range(FLAGS.noise_draws)]
    bits[start:start + len(batch)] = tf.reduce_mean(tf.stack(draws), 0).numpy()
  if not np.isfinite(bits).all():
    bad = [n for n, b in zip(names, bits) if not np.isfinite(b)]
    raise training.RunError(f'{len(bad)} scores are not finite (e.g. {bad[0]}): the model has '
                            'diverged; nothing written.')
  rows = [{'image': n, 'bits_per_dim': float(b)} for n, b in zip(names, bits)]
  if FLAGS.out.endswith('.json'):
    with open(FLAGS.out, 'w') as f:
      json.dump(rows, f, indent=1)
  else:
    with open(FLAGS.out, 'w', newline='') as f:
      writer = csv.DictWriter(f, ['image', 'bits_per_dim'])
      writer.writeheader()
      writer.writerows(rows)
  print(f'scored {len(rows)} images (mean {bits.mean():.4f} bits/dim): {FLAGS.out}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir', 'images'])
  app.run(main)
