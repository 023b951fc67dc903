"""Exports a run's latest checkpoint as a SavedModel for serving (no tfp_realnvp needed to load).

  python -m launch.export --workdir=runs/mnist --export_dir=exported/mnist
  saved_model_cli show --dir exported/mnist --all
"""

import os


from launch import common
from launch import flags as launch_flags
from tfp_realnvp import training
from tfp_realnvp.export import ExportError, export_saved_model

FLAGS = launch_flags.FLAGS
launch_flags.define_workdir()
launch_flags.define('string', 'export_dir', None, 'Where to write the SavedModel (a new folder, or '
                    'a previous export to replace).')


def main(argv):
  del argv
  if os.path.exists(FLAGS.export_dir) and not os.path.isdir(FLAGS.export_dir):
    raise ExportError(f'--export_dir={FLAGS.export_dir} is a file; give a folder for the '
                      'SavedModel.')
  model, _, step = training.restore_model(FLAGS.workdir)
  common.say(f'launch.export: {model.name} ({model.count_params():,} parameters) at step {step} '
             f'of {FLAGS.workdir}')
  export_saved_model(model, FLAGS.export_dir)
  common.say(f'exported step {step} (signatures: serving_default, log_prob, sample, encode, '
             f'decode{", classify; each taking labels" if model.num_classes else ""})')
  common.wrote([f'{FLAGS.export_dir}/ (SavedModel)'])


if __name__ == '__main__':
  common.run(main, required=['workdir', 'export_dir'])
