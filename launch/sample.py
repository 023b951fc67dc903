"""Sample grids and the paper's latent manifold picture from a run, as PNG.

  python -m launch.sample --workdir=runs/mnist --num=64 --temperature=0.7 --out=grid.png
  python -m launch.sample --workdir=runs/mnist --interpolate --grid_size=8 --out=manifold.png
"""

from absl import app, flags
import numpy as np

from launch import flags as launch_flags
from launch.common import fail_clearly, run_data
from tfp_realnvp import training
from tfp_realnvp.images import save_png
from tfp_realnvp.model import to_uint8

FLAGS = launch_flags.FLAGS
flags.DEFINE_integer('num', 64, 'Samples in the grid.', lower_bound=1, upper_bound=4096)
flags.DEFINE_string('out', 'samples.png', 'PNG file to write.')
flags.DEFINE_bool('interpolate', False, 'Instead of samples: decode the latent manifold spanned '
                  'by four encoded test images, on a grid_size x grid_size grid.')
flags.DEFINE_integer('grid_size', 8, 'Side of the interpolation grid.', lower_bound=2)


@fail_clearly
def main(argv):
  del argv
  model, run_config, _ = training.restore_model(FLAGS.workdir)
  if FLAGS.interpolate:
    images = next(iter(run_data(run_config).test.batch(4)))
    if images.shape[0] < 4:
      raise training.RunError('--interpolate needs 4 test images.')
    pixels, columns = training.latent_manifold(model, images, FLAGS.grid_size), FLAGS.grid_size
  else:
    pixels, columns = model.sample(FLAGS.num, FLAGS.temperature, seed=FLAGS.seed), None
  if not np.isfinite(pixels.numpy()).all():
    raise training.RunError('The samples hold NaN or infinite values: the model has diverged; '
                            'nothing written.')
  save_png(to_uint8(pixels).numpy(), FLAGS.out, columns)
  print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
