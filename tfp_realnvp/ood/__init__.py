"""Out-of-distribution detection with the exact density: scores beyond raw likelihood
(`OODScorer`, `METHODS`), the multi-scale latent's levels (`level_bits_per_dim`), compressors'
bits (`compressed_bits_per_dim`), and how well a score separates two sets (`separation`, with ROC
and histogram PNGs). See `docs/ood.md`.

  from tfp_realnvp import ood
  scorer = ood.OODScorer(model).fit(held_out_images)
  scores = scorer.score(images, ['bits_per_dim', 'complexity', 'fitted'])
  ood.separation(scorer.score(test_images, ['fitted'])['fitted'], scores['fitted'])['auroc']
"""

from tfp_realnvp.bijectors.multiscale import latent_levels
from tfp_realnvp.ood.complexity import available_compressors, compressed_bits_per_dim
from tfp_realnvp.ood.levels import level_bits_per_dim, level_log_probs, level_names
from tfp_realnvp.ood.metrics import histograms_png, roc_png, separation
from tfp_realnvp.ood.background import perturb
from tfp_realnvp.ood.scores import METHODS, NEEDS_FIT, OODScorer, check_methods

__all__ = ['METHODS', 'NEEDS_FIT', 'OODScorer', 'available_compressors', 'check_methods',
           'compressed_bits_per_dim', 'histograms_png', 'latent_levels', 'level_bits_per_dim',
           'level_log_probs', 'level_names', 'perturb', 'roc_png', 'separation']
