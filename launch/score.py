"""Bits/dim per image under a trained model: out-of-distribution and anomaly scores.

  python -m launch.score --workdir=runs/mnist --images=digits.npy --out=scores.csv

`--images`: a .npy file (uint8 [N, H, W, C] or [N, H, W]), npz:PATH (its x_test), or a folder
of PNG/JPEG (centre-cropped and resized to the model's size). Output: CSV or JSON by extension.
Dequantization: `--noise_draws` seeded U[0, 1) draws per image, averaged.
"""

import csv
import json
import os

import numpy as np
import tensorflow as tf

from launch import common
from launch import flags as launch_flags
from tfp_realnvp import data as data_lib
from tfp_realnvp import training

FLAGS = launch_flags.FLAGS
launch_flags.define_workdir()
launch_flags.define_noise_draws()
launch_flags.define('string', 'images', None, 'Images to score: .npy, npz:PATH or a folder.')
launch_flags.define('string', 'out', 'scores.csv', 'Output file, .csv or .json (its folder must '
                    'exist).')

BATCH = 256


def read_npy(path):
  """A .npy file's array, or a DataError that says what is wrong with it."""
  try:
    array = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:  # empty, truncated, pickled objects, not .npy
    raise data_lib.DataError(f'{path} is not a readable .npy file ({e}).') from None
  if array.ndim == 0:
    raise data_lib.DataError(f'{path} holds a single value; expected images [N, H, W, C] or '
                             '[N, H, W].')
  return array


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
    images = read_npy(source)
    names = [f'{source}[{i}]' for i in range(len(images))]
  else:
    raise data_lib.DataError(f'--images={source!r}: expected an existing .npy file, npz:PATH or '
                             'a folder of images.')
  images = data_lib.as_images(images, source)
  if images.shape[1:] != tuple(image_shape):
    raise data_lib.DataError(f'{source}: the model takes images {list(image_shape)}, got '
                             f'{list(images.shape[1:])}.')
  return images, names


def main(argv):
  del argv
  if not FLAGS.out.endswith(('.csv', '.json')):
    raise data_lib.DataError(f'--out={FLAGS.out}: give a .csv or .json file name.')
  common.check_output_file(FLAGS.out, 'out')
  model, _, step = training.restore_model(FLAGS.workdir)
  images, names = read_images(FLAGS.images, model.image_shape)
  common.say(f'launch.score: {model.name} ({model.count_params():,} parameters) at step {step} '
             f'of {FLAGS.workdir}; {len(images):,} images from {FLAGS.images}, '
             f'{FLAGS.noise_draws} noise draw(s) each')
  bits = np.zeros(len(images))
  progress = training.Progress('score', len(images))
  for start in range(0, len(images), BATCH):
    batch = images[start:start + BATCH]
    draws = [model.bits_per_dim(batch, seed=start * FLAGS.noise_draws + d + 1)
             for d in range(FLAGS.noise_draws)]
    bits[start:start + len(batch)] = tf.reduce_mean(tf.stack(draws), 0).numpy()
    progress.update(start + len(batch))
  progress.close()
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
  common.say(f'scored {len(rows)} images (mean {bits.mean():.4f} bits/dim)')
  common.wrote([FLAGS.out])


if __name__ == '__main__':
  common.run(main, required=['workdir', 'images'])
