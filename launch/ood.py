"""Out-of-distribution detection, measured: how well each score tells a run's test images from
other image sets (AUROC, AUPR, FPR at 95% TPR), as a table, JSON and pictures.

  python -m launch.ood --workdir=runs/mnist --ood=images:photos/,npz:letters.npz
      [--in=DATA] [--background_workdir=runs/mnist-background] [--methods=all]

In-distribution: the test split of `--in` (default: the run's own dataset), never trained on; its
first `--held_out` fraction fits `typicality`, `fitted` and `combined` (`tfp_realnvp.ood`), the rest is
scored. Each `--ood` source (any data source launch.train reads) gives up to `--max_images`
images, its test split first. Colour images are made grey for a grey model, and grey ones
colour, with a note. Writes OUT_DIR/ood.json, and per OOD set a ROC-curve PNG and a PNG of the
score histograms in vs out. `likelihood_ratio` needs `--background_workdir`: a run trained
with `launch.train --background_noise=0.2` on the same data.
"""

import os
import re

import numpy as np

from launch import common
from launch import flags as launch_flags
from tfp_realnvp import ood, training
from tfp_realnvp.data import DataError

FLAGS = launch_flags.FLAGS
launch_flags.define_workdir()
launch_flags.define_data_dir()
launch_flags.define('string', 'in', None, 'In-distribution data source, its test split (default: '
                    'the run\'s dataset).')
launch_flags.define('list', 'ood', None, 'Out-of-distribution data sources, comma-separated: any '
                    'source launch.train reads (npz:PATH, images:DIR, a TFDS name, ...).')
launch_flags.define('integer', 'image_size', None, 'Side of the square images for images:DIR '
                    'sources (default: the model\'s).', lower_bound=4)
launch_flags.define('string', 'background_workdir', None, 'likelihood_ratio\'s background model: '
                    'a run on the same data of local statistics only (--num_scales=1 '
                    '--num_blocks=1 --num_filters=8), with --background_noise=0.2 if the ratio '
                    'is used alone (docs/ood.md).')
launch_flags.define('list', 'methods', ['all'], 'Scores to measure: all, or some of '
                    f'{", ".join(ood.METHODS)}.')
launch_flags.define('integer', 'max_images', 2000, 'Images per set at most.', lower_bound=1)
launch_flags.define('float', 'held_out', 0.5, 'Fraction of the in-distribution test images that '
                    'fits typicality, fitted and combined (the rest is scored).', lower_bound=0.05,
                    upper_bound=0.95)
launch_flags.define('integer', 'typicality_batch', 10, 'Batch size of the typicality test (0: '
                    'skip it).', lower_bound=0)
launch_flags.define('enum', 'typicality_statistic', 'mean', 'The typicality test\'s batch '
                    'statistic: mean (Nalisnick et al.) or median (robust to in-distribution '
                    'outliers).', enum_values=['mean', 'median'])
launch_flags.define('enum', 'compressor', 'png', 'Lossless compressor of complexity and fitted.',
                    enum_values=['png', 'webp', 'best'])
launch_flags.define('string', 'out_dir', None, 'Where ood.json and the PNGs go (default: '
                    'WORKDIR/ood).')


def images_of(source, split_order, image_shape, limit):
  """Up to `limit` uint8 images of `source` (its splits in `split_order`), in the model's
  channels; a one-line DataError for another image size or an empty source."""
  size = FLAGS.image_size or image_shape[0]
  data = launch_flags.load_data(source, FLAGS.data_dir, size if source.startswith('images:')
                                else None)
  images = []
  for split in split_order:
    dataset = getattr(data, split)
    if dataset is None:
      continue
    for image in dataset.take(limit - len(images)).as_numpy_iterator():
      images.append(image[0] if isinstance(image, tuple) else image)
    if len(images) >= limit:
      break
  if not images:
    raise DataError(f'{source}: no images.')
  images = np.stack(images)
  if images.shape[1:3] != tuple(image_shape[:2]):
    hint = (f' (images:DIR sources are resized: give --image_size={image_shape[0]}, or leave it '
            'out)' if source.startswith('images:') else '')
    raise DataError(f'{source}: images of {list(images.shape[1:])}, the model takes '
                    f'{list(image_shape)}{hint}.')
  if images.shape[-1] != image_shape[-1]:
    common.say(f'  {source}: {"colour" if images.shape[-1] == 3 else "grey"} images made '
               f'{"grey" if image_shape[-1] == 1 else "colour"} for the model')
    images = (np.round(images.mean(-1, keepdims=True)).astype(np.uint8) if image_shape[-1] == 1
              else np.repeat(images, 3, -1))
  return images


def file_names(sources):
  """A short file name per source: a path's base name without extension ('npz:a/noise.npz' ->
  'noise'), a TFDS name as it is ('lsun/bedroom' -> 'lsun_bedroom'); numbered when repeated."""
  names = []
  for source in sources:
    kind, colon, rest = source.partition(':')
    name = os.path.splitext(os.path.basename(rest.rstrip('/')))[0] if colon else kind
    name = re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('_') or 'set'
    names.append(name if name not in names else f'{name}_{len(names)}')
  return names


def table(results):
  lines = [f'{"OOD set":<24} {"method":<18} {"AUROC":>7} {"AUPR-in":>8} {"AUPR-out":>9} '
           f'{"FPR95":>7}']
  for source, methods in results.items():
    for method, m in methods.items():
      lines.append(f'{source[:24]:<24} {method:<18} {m["auroc"]:7.3f} {m["aupr_in"]:8.3f} '
                   f'{m["aupr_out"]:9.3f} {m["fpr_at_95_tpr"]:7.3f}')
  return '\n'.join(lines)


def typicality_batches(scorer, in_bits, out_bits, size, statistic):
  """The typicality test on batches of `size`: the fraction of OOD batches it flags and of
  in-distribution batches it flags (false alarms), and the AUROC of its statistic."""
  def batches(bits):
    return bits[:len(bits) // size * size].reshape(-1, size)
  if not len(batches(in_bits)) or not len(batches(out_bits)):
    return None
  inside, threshold = scorer.typicality_test(batches(in_bits), statistic=statistic)
  outside, _ = scorer.typicality_test(batches(out_bits), statistic=statistic)
  return {'batch_size': size, 'statistic': statistic, 'threshold': threshold,
          'ood_batches_flagged': float(np.mean(outside > threshold)),
          'in_batches_flagged': float(np.mean(inside > threshold)),
          'auroc': ood.separation(inside, outside)['auroc'],
          'batches': [len(inside), len(outside)]}


def main(argv):
  del argv
  if not FLAGS.ood:
    raise training.RunError('Give --ood=DATA[,DATA...]: the out-of-distribution sets.')
  model, run_config, step = training.restore_model(FLAGS.workdir)
  background = None
  if FLAGS.background_workdir:
    background, _, _ = training.restore_model(FLAGS.background_workdir)
  methods = (list(ood.METHODS) if FLAGS.methods == ['all'] else FLAGS.methods)
  if FLAGS.methods == ['all']:  # those that can run here
    methods = [m for m in methods if _runs(m, model, background)]
  try:
    methods = ood.check_methods(methods, model, background)
    scorer = ood.OODScorer(model, background, FLAGS.compressor)
  except ValueError as e:
    raise training.RunError(str(e)) from None
  out_dir = FLAGS.out_dir or os.path.join(FLAGS.workdir, 'ood')
  os.makedirs(out_dir, exist_ok=True)
  source = FLAGS['in'].value or run_config['data']['dataset']
  inside = images_of(source, ['test'], model.image_shape, FLAGS.max_images)
  held = int(round(len(inside) * FLAGS.held_out)) if set(methods) & set(ood.NEEDS_FIT) else 0
  if held and (held < 2 or held == len(inside)):
    raise DataError(f'{source}: {len(inside)} test images are too few to hold some out.')
  common.say(f'launch.ood: {model.name} at step {step} of {FLAGS.workdir}; in-distribution: '
             f'{source}, {len(inside) - held} test images scored'
             + (f', {held} held out to fit ' + ', '.join(m for m in methods if m in ood.NEEDS_FIT)
                if held else '')
             + f'; methods: {", ".join(methods)}')
  if held:
    scorer.fit(inside[:held], [m for m in methods if m in ood.NEEDS_FIT])
  in_scores = scorer.score(inside[held:], methods)
  results, report, pictures, in_bits = {}, {}, [], None
  for name, file_name in zip(FLAGS.ood, file_names(FLAGS.ood)):
    images = images_of(name, ['test', 'train'], model.image_shape, FLAGS.max_images)
    common.say(f'  {name}: {len(images)} images')
    out_scores = scorer.score(images, methods)
    results[name] = {m: ood.separation(in_scores[m], out_scores[m]) for m in in_scores}
    if 'typicality' in methods and FLAGS.typicality_batch:
      if in_bits is None:
        in_bits = (in_scores['bits_per_dim'] if 'bits_per_dim' in in_scores else
                   scorer.bits_per_dim(inside[held:]))
      batches = typicality_batches(
          scorer, in_bits, out_scores['bits_per_dim'] if 'bits_per_dim' in out_scores else
          scorer.bits_per_dim(images), FLAGS.typicality_batch, FLAGS.typicality_statistic)
      if batches:
        report.setdefault('typicality_batches', {})[name] = batches
    base = os.path.join(out_dir, file_name)
    pictures.append(ood.roc_png({m: (in_scores[m], out_scores[m]) for m in in_scores},
                                f'{base}_roc.png', f'{source} (in) vs {name} (OOD)'))
    pictures.append(ood.histograms_png({m: (in_scores[m], {name: out_scores[m]})
                                        for m in in_scores}, f'{base}_histograms.png',
                                       f'scores of {source} (in) and {name} (OOD)'))
  common.say('\n' + table(results))
  for name, batches in report.get('typicality_batches', {}).items():
    common.say(f'typicality test ({batches["statistic"]}), batches of {batches["batch_size"]}: '
               f'{name}: '
               f'{batches["ood_batches_flagged"]:.0%} of OOD batches flagged, '
               f'{batches["in_batches_flagged"]:.0%} of in-distribution ones (AUROC '
               f'{batches["auroc"]:.3f})')
  path = os.path.join(out_dir, 'ood.json')
  training.write_json_atomic(path, {
      'workdir': FLAGS.workdir, 'step': step, 'in': {'source': source, 'scored': len(inside) - held,
                                                     'held_out': held},
      'background_workdir': FLAGS.background_workdir, 'methods': methods,
      'compressor': FLAGS.compressor, 'results': results, **report})
  common.wrote([path, *pictures])


def _runs(method, model, background):
  try:
    ood.check_methods([method], model, background)
    return True
  except ValueError:
    return False


if __name__ == '__main__':
  common.run(main, required=['workdir'])
