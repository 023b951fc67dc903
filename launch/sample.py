"""Sample grids and the paper's latent manifold picture from a run, as PNG.

  python -m launch.sample --workdir=runs/mnist --num=64 --temperature=0.7 --out=grid.png
  python -m launch.sample --workdir=runs/mnist --interpolate --grid_size=8 --out=manifold.png
"""

import numpy as np
import tensorflow as tf

from launch import common
from launch import flags as launch_flags
from tfp_realnvp import training
from tfp_realnvp.images import save_png
from tfp_realnvp.model import to_uint8

FLAGS = launch_flags.FLAGS
launch_flags.define_workdir()
launch_flags.define_data_dir()
launch_flags.define_sampling()
launch_flags.define('integer', 'num', 64, 'Samples in the grid.', lower_bound=1, upper_bound=4096)
launch_flags.define('string', 'out', 'samples.png', 'PNG file to write (its folder must exist).')
launch_flags.define('bool', 'interpolate', False, 'Instead of samples: decode the latent manifold '
                    'spanned by four encoded test images, on a grid_size x grid_size grid.')
launch_flags.define('integer', 'grid_size', 8, 'Side of the interpolation grid.', lower_bound=2,
                    upper_bound=64)

BATCH = 64  # samples decoded per call (progress between them)


def main(argv):
  del argv
  common.check_output_file(FLAGS.out, 'out')
  model, run_config, step = training.restore_model(FLAGS.workdir)
  what = (f'the latent manifold of 4 test images on a {FLAGS.grid_size}x{FLAGS.grid_size} grid'
          if FLAGS.interpolate else f'{FLAGS.num} samples at temperature {FLAGS.temperature:g}')
  common.say(f'launch.sample: {model.name} ({model.count_params():,} parameters) at step {step} '
             f'of {FLAGS.workdir}: {what}')
  if FLAGS.interpolate:
    images = next(iter(common.run_data(run_config).test.batch(4)))
    if images.shape[0] < 4:
      raise training.RunError('--interpolate needs 4 test images.')
    pixels, columns = training.latent_manifold(model, images, FLAGS.grid_size), FLAGS.grid_size
  else:
    progress = training.Progress('sample', FLAGS.num)
    parts = []
    for start in range(0, FLAGS.num, BATCH):
      count = min(BATCH, FLAGS.num - start)
      parts.append(model.sample(count, FLAGS.temperature, seed=FLAGS.seed + start * 1_000_003))
      progress.update(start + count)
    progress.close()
    pixels, columns = tf.concat(parts, 0), None
  if not np.isfinite(pixels.numpy()).all():
    raise training.RunError('The samples hold NaN or infinite values: the model has diverged; '
                            'nothing written.')
  common.wrote([save_png(to_uint8(pixels).numpy(), FLAGS.out, columns)])


if __name__ == '__main__':
  common.run(main, required=['workdir'])
