"""Sample grids and the paper's latent manifold picture from a run, as PNG.

  python -m launch.sample --workdir=runs/mnist --num=64 --temperature=0.7 --out=grid.png
  python -m launch.sample --workdir=runs/mnist --interpolate --grid_size=8 --out=manifold.png

A class-conditional model: `--label=K` samples class K; `--class_grid` draws one row of
`--grid_size` samples per class, written to `--out` and to the run's TensorBoard (logs/images).
"""

import os

import numpy as np
import tensorflow as tf

from launch import common
from launch import flags as launch_flags
from tfp_realnvp import training
from tfp_realnvp.images import image_grid, save_png
from tfp_realnvp.model import to_uint8

FLAGS = launch_flags.FLAGS
launch_flags.define_workdir()
launch_flags.define_data_dir()
launch_flags.define_sampling()
launch_flags.define('integer', 'num', 64, 'Samples in the grid.', lower_bound=1, upper_bound=4096)
launch_flags.define('string', 'out', 'samples.png', 'PNG file to write (its folder must exist).')
launch_flags.define('bool', 'interpolate', False, 'Instead of samples: decode the latent manifold '
                    'spanned by four encoded test images, on a grid_size x grid_size grid.')
launch_flags.define('integer', 'grid_size', 8, 'Side of the interpolation grid; samples per '
                    'class in a --class_grid.', lower_bound=2, upper_bound=64)
launch_flags.define('integer', 'label', None, 'Class-conditional models: sample this class '
                    '(0 .. num_classes - 1; default: classes drawn from the training labels\' '
                    'frequencies).', lower_bound=0)
launch_flags.define('bool', 'class_grid', False, 'Class-conditional models: one row of '
                    '--grid_size samples per class, also written to the run\'s TensorBoard.')

BATCH = 64  # samples decoded per call (progress between them)


def main(argv):
  del argv
  common.check_output_file(FLAGS.out, 'out')
  if FLAGS.class_grid and FLAGS.interpolate:
    raise training.RunError('--class_grid and --interpolate draw different pictures: give one.')
  model, run_config, step = training.restore_model(FLAGS.workdir)
  if (FLAGS.label is not None or FLAGS.class_grid) and not model.num_classes:
    raise training.RunError(f'--{"label" if FLAGS.label is not None else "class_grid"} needs a '
                            f'class-conditional model; the one in {FLAGS.workdir} is not '
                            '(train with --conditional).')
  if FLAGS.label is not None and FLAGS.label >= model.num_classes:
    raise training.RunError(f'--label={FLAGS.label}: the model has {model.num_classes} classes '
                            f'(0 .. {model.num_classes - 1}).')
  names = run_config['data'].get('class_names')
  if FLAGS.interpolate:
    what = f'the latent manifold of 4 test images on a {FLAGS.grid_size}x{FLAGS.grid_size} grid'
  elif FLAGS.class_grid:
    what = (f'a class grid: {FLAGS.grid_size} samples of each of {model.num_classes} classes at '
            f'temperature {FLAGS.temperature:g}')
  else:
    what = (f'{FLAGS.num} samples at temperature {FLAGS.temperature:g}' +
            (f' of class {FLAGS.label}' + (f' ({names[FLAGS.label]})' if names else '')
             if FLAGS.label is not None else ''))
  common.say(f'launch.sample: {model.name} ({model.count_params():,} parameters) at step {step} '
             f'of {FLAGS.workdir}: {what}')
  if FLAGS.interpolate:
    test = common.run_data(run_config).test
    label = None
    if model.num_classes:  # 4 test images of one class (--label's, or the first image's)
      label = FLAGS.label if FLAGS.label is not None else int(next(iter(test))[1])
      test = test.filter(lambda image, y: tf.equal(y, label)).map(lambda image, y: image)
    images = next(iter(test.batch(4)))
    if images.shape[0] < 4:
      raise training.RunError('--interpolate needs 4 test images'
                              f'{"" if label is None else f" of class {label}"}.')
    pixels = training.latent_manifold(model, images, FLAGS.grid_size, label)
    columns = FLAGS.grid_size
  elif FLAGS.class_grid:
    pixels = training.class_samples(model, FLAGS.grid_size, FLAGS.temperature, FLAGS.seed)
    columns = FLAGS.grid_size
  else:
    progress = training.Progress('sample', FLAGS.num)
    parts = []
    for start in range(0, FLAGS.num, BATCH):
      count = min(BATCH, FLAGS.num - start)
      parts.append(model.sample(count, FLAGS.temperature, seed=FLAGS.seed + start * 1_000_003,
                                labels=FLAGS.label))
      progress.update(start + count)
    progress.close()
    pixels, columns = tf.concat(parts, 0), None
  if not np.isfinite(pixels.numpy()).all():
    raise training.RunError('The samples hold NaN or infinite values: the model has diverged; '
                            'nothing written.')
  images = to_uint8(pixels).numpy()
  written = [save_png(images, FLAGS.out, columns)]
  if FLAGS.class_grid:
    log_dir = os.path.join(FLAGS.workdir, 'logs', 'images')
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
      tf.summary.image(f'class_grid_t{FLAGS.temperature:g}',
                       image_grid(images, columns)[None], step=step)
    writer.flush()
    written.append(f'{log_dir}/ (TensorBoard: class_grid_t{FLAGS.temperature:g} at step {step})')
  common.wrote(written)


if __name__ == '__main__':
  common.run(main, required=['workdir'])
