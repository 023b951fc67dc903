"""Exports a run's latest checkpoint as a SavedModel for serving (no tfp_realnvp needed to load).

  python -m launch.export --workdir=runs/mnist --export_dir=exported/mnist
  saved_model_cli show --dir exported/mnist --all
"""

from absl import app, flags

from launch import flags as launch_flags
from launch.common import fail_clearly
from tfp_realnvp import training
from tfp_realnvp.export import export_saved_model

FLAGS = launch_flags.FLAGS
flags.DEFINE_string('export_dir', None, 'Where to write the SavedModel.')


@fail_clearly
def main(argv):
  del argv
  model, _, step = training.restore_model(FLAGS.workdir)
  export_saved_model(model, FLAGS.export_dir)
  print(f'exported step {step} to {FLAGS.export_dir} (signatures: serving_default, log_prob, '
        'sample, encode, decode)')


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir', 'export_dir'])
  app.run(main)
