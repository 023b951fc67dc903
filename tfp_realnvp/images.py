"""Pictures of a model's work: images tiled into a grid, saved as PNG."""

import math

import numpy as np
from PIL import Image

from tfp_realnvp.files import atomic_path


def image_grid(images, columns=None, padding=1):
  """Tiles uint8 images `[N, H, W, C]` (C = 1 or 3) into one `[rows*H', cols*W', C]` array."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
    raise ValueError(f'image_grid: expected uint8 images [N, H, W, 1 or 3], got '
                     f'{images.dtype} {list(images.shape)}.')
  n, height, width, channels = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding,
                  channels), 255, np.uint8)
  for i, image in enumerate(images):
    top, left = padding + (i // columns) * (height + padding), padding + (i % columns) * (width + padding)
    grid[top:top + height, left:left + width] = image
  return grid


def save_png(images, path, columns=None):
  """Saves uint8 images `[N, H, W, C]` as one PNG grid at `path` (atomically)."""
  grid = image_grid(images, columns)
  with atomic_path(path) as temporary:  # whole or not at all
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(temporary, format='PNG')
  return path
