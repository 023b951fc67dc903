"""How well a score separates in-distribution from out-of-distribution images (scikit-learn's
metrics), and the pictures: ROC curves and score histograms, in vs out."""

import numpy as np

from tfp_realnvp.files import atomic_path


def separation(in_scores, out_scores):
  """`{'auroc', 'aupr_in', 'aupr_out', 'fpr_at_95_tpr', 'in', 'out'}` for anomaly scores
  (higher = more anomalous) of in-distribution and OOD images.

  - auroc: the probability that an OOD image scores above an in-distribution one (0.5: chance,
    below: the score ranks the wrong way);
  - aupr_out / aupr_in: average precision with the OOD (in-distribution, score negated) images as
    the positive class; both depend on the class balance (`in`, `out`: the counts);
  - fpr_at_95_tpr: the fraction of OOD images accepted at the threshold that accepts 95% of the
    in-distribution ones (in-distribution as the positive class).
  """
  from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve  # pylint: disable=import-outside-toplevel
  in_scores, out_scores = (np.asarray(s, np.float64).ravel() for s in (in_scores, out_scores))
  if not len(in_scores) or not len(out_scores):
    raise ValueError(f'Need scores of both sets, got {len(in_scores)} in-distribution and '
                     f'{len(out_scores)} out-of-distribution.')
  if not (np.isfinite(in_scores).all() and np.isfinite(out_scores).all()):
    raise ValueError('The scores are not all finite.')
  is_out = np.concatenate([np.zeros(len(in_scores)), np.ones(len(out_scores))])
  scores = np.concatenate([in_scores, out_scores])
  fpr, tpr, _ = roc_curve(1 - is_out, -scores)  # in-distribution positive, accepted below
  return {'auroc': float(roc_auc_score(is_out, scores)),
          'aupr_out': float(average_precision_score(is_out, scores)),
          'aupr_in': float(average_precision_score(1 - is_out, -scores)),
          'fpr_at_95_tpr': float(fpr[np.searchsorted(tpr, 0.95, side='left')]),
          'in': len(in_scores), 'out': len(out_scores)}


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')  # files only, no display
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _atomic_savefig(figure, path):
  with atomic_path(path) as temporary:
    figure.savefig(temporary, dpi=100, format='png')


def roc_png(curves, path, title):
  """One PNG of ROC curves, OOD as the positive class: `curves` is `{label: (in_scores,
  out_scores)}` (the label gets its AUROC)."""
  from sklearn.metrics import roc_auc_score, roc_curve  # pylint: disable=import-outside-toplevel
  plt = _pyplot()
  figure, axes = plt.subplots(figsize=(6, 6))
  for label, (in_scores, out_scores) in curves.items():
    is_out = np.concatenate([np.zeros(len(in_scores)), np.ones(len(out_scores))])
    scores = np.concatenate([in_scores, out_scores])
    fpr, tpr, _ = roc_curve(is_out, scores)
    axes.plot(fpr, tpr, label=f'{label} (AUROC {roc_auc_score(is_out, scores):.3f})')
  axes.plot([0, 1], [0, 1], 'k:', linewidth=1, label='chance')
  axes.set(xlabel='false positive rate (in-distribution flagged)',
           ylabel='true positive rate (OOD flagged)', title=title, xlim=(0, 1), ylim=(0, 1.01))
  axes.legend(loc='lower right', fontsize='small')
  figure.tight_layout()
  _atomic_savefig(figure, path)
  plt.close(figure)
  return path


def histograms_png(panels, path, title, in_label='in-distribution'):
  """One PNG with a histogram panel per method: `panels` is `{method: (in_scores,
  {ood_name: out_scores})}`."""
  plt = _pyplot()
  columns = min(3, len(panels))
  rows = -(-len(panels) // columns)
  figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.5 * rows), squeeze=False)
  for axis in axes.flat[len(panels):]:
    axis.set_visible(False)
  for axis, (method, (in_scores, outs)) in zip(axes.flat, panels.items()):
    everything = np.concatenate([in_scores, *outs.values()])
    low, high = np.percentile(everything, [0.5, 99.5])
    bins = np.linspace(low, high if high > low else low + 1, 50)
    axis.hist(np.clip(in_scores, low, high), bins, alpha=0.5, density=True, label=in_label)
    for name, out_scores in outs.items():
      axis.hist(np.clip(out_scores, low, high), bins, alpha=0.5, density=True, label=name)
    axis.set(title=method, xlabel='score (higher = more anomalous)')
    axis.legend(fontsize='x-small')
  figure.suptitle(title)
  figure.tight_layout()
  _atomic_savefig(figure, path)
  plt.close(figure)
  return path
