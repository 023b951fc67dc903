"""Bits/dim per image under a trained model: out-of-distribution and anomaly scores.

  python -m launch.score --workdir=runs/mnist --images=digits.npy --out=scores.csv

`--images`: a .npy file (uint8 [N, H, W, C] or [N, H, W]), npz:PATH (its x_test), or a folder
of PNG/JPEG (centre-cropped and resized to the model's size). Output: CSV or JSON by extension.
Dequantization: `--noise_draws` seeded U[0, 1) draws per image, averaged.

A class-conditional model scores -log p(x | y) / (D ln 2) given labels: `--labels=FILE.npy` (one
int per image), `--label=K` (every image), an npz's `y_test`, or, for a folder, its sub-folders
named as the run's classes. Without labels it scores the class mixture p(x) = sum_y p(y) p(x | y)
(the out-of-distribution score), and says so. The output then has a `label` column.
"""

import csv
import json
import os

import numpy as np
import tensorflow as tf

from launch import common
from launch import flags as launch_flags
from tfp_realnvp import data as data_lib
from tfp_realnvp import ood, training
from tfp_realnvp.files import atomic_path

FLAGS = launch_flags.FLAGS
launch_flags.define_workdir()
launch_flags.define_noise_draws()
launch_flags.define('string', 'images', None, 'Images to score: .npy, npz:PATH or a folder.')
launch_flags.define('string', 'out', 'scores.csv', 'Output file, .csv or .json (its folder must '
                    'exist).')
launch_flags.define('string', 'labels', None, 'Class-conditional models: a .npy file of int '
                    'labels, one per image (default: the npz\'s y_test, or a folder\'s class '
                    'sub-folders; none: score p(x), the class mixture).')
launch_flags.define('integer', 'label', None, 'Class-conditional models: score every image as '
                    'this class.', lower_bound=0)
launch_flags.define('list', 'method', ['bits_per_dim'], 'Scores to write, a column each '
                    f'(higher = more anomalous): {", ".join(ood.METHODS)} (tfp_realnvp.ood; '
                    'levels: a column per level).')
launch_flags.define('string', 'background_workdir', None, 'likelihood_ratio\'s background model: a '
                    'run on the same data of local statistics (one scale; with '
                    '--background_noise=0.2 if the ratio is used alone).')
launch_flags.define('integer', 'held_out_images', 1000, 'typicality, fitted, combined: fit on this '
                    'many of the run\'s test images.', lower_bound=2)

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


def _folder_labels(source, names, class_names):
  """The labels of a folder's images from their class sub-folders, or None when the folder is
  not laid out by the run's classes."""
  if not class_names:
    return None
  index = {name: i for i, name in enumerate(class_names)}
  tops = [n.split(os.sep)[0] if os.sep in n else None for n in names]
  if any(top not in index for top in tops):
    return None
  return np.array([index[top] for top in tops], np.int32)


def read_images(source, image_shape, class_names=None, labelled=False):
  """`(images, names, labels)`: labels (int32 [N]) from an npz's y_test or a folder's class
  sub-folders when `labelled` and the source has them, else None."""
  labels = None
  if source.startswith('npz:'):
    loaded = data_lib.load(source, labels=labelled and _npz_has_labels(source[4:]))
    pairs = list(loaded.test.as_numpy_iterator())
    images = np.stack([p[0] for p in pairs] if loaded.labeled else pairs)
    if loaded.labeled:
      labels = np.array([p[1] for p in pairs], np.int32)
    names = [f'{source}[{i}]' for i in range(len(images))]
  elif os.path.isdir(source):
    names, images = data_lib.read_image_folder(source, image_shape[0])  # names with images
    if image_shape[-1] == 1:
      images = np.round(images.mean(-1, keepdims=True)).astype(np.uint8)
    if labelled:
      labels = _folder_labels(source, names, class_names)
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
  return images, names, labels


def _npz_has_labels(path):
  try:
    with np.load(path, allow_pickle=False) as arrays:
      return 'y_test' in arrays.files and 'y_train' in arrays.files
  except (OSError, ValueError, EOFError):
    return False  # load() reports what is wrong with the file


def image_labels(model, count, found):
  """The labels to score with: --labels, --label, or those the source holds (`found`); checked
  against the model. None: score without labels."""
  given = FLAGS.labels is not None or FLAGS.label is not None
  if given and not model.num_classes:
    raise training.RunError(f'--{"labels" if FLAGS.labels is not None else "label"} needs a '
                            'class-conditional model; this one is not (num_classes=0).')
  if FLAGS.labels is not None and FLAGS.label is not None:
    raise training.RunError('Give --labels or --label, not both.')
  if FLAGS.labels is not None:
    labels = data_lib.as_labels(read_npy(FLAGS.labels), count, FLAGS.labels)
  elif FLAGS.label is not None:
    labels = np.full([count], FLAGS.label, np.int32)
  else:
    labels = found if model.num_classes else None
  if labels is not None and labels.size and labels.max() >= model.num_classes:
    raise data_lib.DataError(f'The labels go up to {labels.max()}, but the model has '
                             f'{model.num_classes} classes (0 .. {model.num_classes - 1}).')
  return labels


def other_scores(model, run_config, images):
  """The --method scores other than bits_per_dim (`tfp_realnvp.ood`), `{column: [N]}`."""
  methods = [m for m in FLAGS.method if m != 'bits_per_dim']
  if not methods:
    return {}
  background = (training.restore_model(FLAGS.background_workdir)[0]
                if FLAGS.background_workdir else None)
  try:
    scorer = ood.OODScorer(model, background)
    ood.check_methods(methods, model, background)
    fit = [m for m in methods if m in ood.NEEDS_FIT]
    if fit:
      data = common.run_data(run_config)
      held_out = [e[0] if isinstance(e, tuple) else e for e in
                  data.test.take(FLAGS.held_out_images).as_numpy_iterator()]
      common.say(f'fitting {", ".join(fit)} on {len(held_out)} of the run\'s test images')
      scorer.fit(np.stack(held_out), fit)
    return scorer.score(images, methods)
  except ValueError as e:
    raise training.RunError(str(e)) from None


def main(argv):
  del argv
  if not FLAGS.out.endswith(('.csv', '.json')):
    raise data_lib.DataError(f'--out={FLAGS.out}: give a .csv or .json file name.')
  common.check_output_file(FLAGS.out, 'out')
  model, run_config, step = training.restore_model(FLAGS.workdir)
  unknown = [m for m in FLAGS.method if m not in ood.METHODS]  # before reading any image
  if unknown:
    raise training.RunError(f'Unknown score method {unknown[0]!r}; choose from '
                            f'{", ".join(ood.METHODS)}.')
  images, names, found = read_images(FLAGS.images, model.image_shape,
                                     run_config['data'].get('class_names'),
                                     labelled=bool(model.num_classes))
  labels = image_labels(model, len(images), found)
  what = ''
  if model.num_classes:
    what = ('; p(x | y), given their labels' if labels is not None else
            '; no labels: p(x), the class mixture (give --labels or --label for p(x | y))')
  common.say(f'launch.score: {model.name} ({model.count_params():,} parameters) at step {step} '
             f'of {FLAGS.workdir}; {len(images):,} images from {FLAGS.images}, '
             f'{FLAGS.noise_draws} noise draw(s) each{what}')
  bits = np.zeros(len(images))
  progress = training.Progress('score', len(images))

  def score(batch, batch_labels, seed):
    if model.num_classes and batch_labels is None:
      return -model.marginal_log_prob(batch, seed=seed) / (
          np.prod(model.image_shape) * np.log(2.))
    return model.bits_per_dim(batch, batch_labels, seed=seed)
  for start in range(0, len(images), BATCH):
    batch = images[start:start + BATCH]
    batch_labels = None if labels is None else labels[start:start + BATCH]
    # seeded per batch as tfp_realnvp.ood.OODScorer does (its scores use the same noise)
    draws = [score(batch, batch_labels, start // BATCH * FLAGS.noise_draws + d + 1)
             for d in range(FLAGS.noise_draws)]
    bits[start:start + len(batch)] = tf.reduce_mean(tf.stack(draws), 0).numpy()
    progress.update(start + len(batch))
  progress.close()
  if not np.isfinite(bits).all():
    bad = [n for n, b in zip(names, bits) if not np.isfinite(b)]
    raise training.RunError(f'{len(bad)} scores are not finite (e.g. {bad[0]}): the model has '
                            'diverged; nothing written.')
  rows = [{'image': n, 'bits_per_dim': float(b)} for n, b in zip(names, bits)]
  if model.num_classes:
    rows = [{'image': row['image'], 'label': None if labels is None else int(labels[i]),
             'bits_per_dim': row['bits_per_dim']} for i, row in enumerate(rows)]
  for name, values in other_scores(model, run_config, images).items():
    for row, value in zip(rows, values):
      row[name] = float(value)
  with atomic_path(FLAGS.out) as temporary, open(temporary, 'w', newline='') as f:
    if FLAGS.out.endswith('.json'):
      json.dump(rows, f, indent=1)
    else:
      writer = csv.DictWriter(f, list(rows[0]) if rows else ['image', 'bits_per_dim'])
      writer.writeheader()
      writer.writerows(rows)
  common.say(f'scored {len(rows)} images (mean {bits.mean():.4f} bits/dim)')
  common.wrote([FLAGS.out])


if __name__ == '__main__':
  common.run(main, required=['workdir', 'images'])
