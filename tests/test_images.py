"""Sample grids as PNG."""

import numpy as np
import pytest
from PIL import Image

from tfp_realnvp.images import image_grid, save_png


def test_grid_places_each_image(tmp_path):
  images = np.stack([np.full((3, 2, 1), 10 * i, np.uint8) for i in range(5)])
  grid = image_grid(images, columns=2, padding=1)
  assert grid.shape == (3 * 4 + 1, 2 * 3 + 1, 1)
  assert grid[1, 1, 0] == 0 and grid[1, 4, 0] == 10 and grid[5, 1, 0] == 20
  assert grid[9, 4, 0] == 255  # the empty sixth cell stays background
  path = save_png(images, tmp_path / 'grid.png', columns=2)
  loaded = np.asarray(Image.open(path))
  np.testing.assert_array_equal(loaded, grid[..., 0])


def test_grid_rejects_non_images():
  with pytest.raises(ValueError, match='expected uint8 images'):
    image_grid(np.zeros((2, 4, 4, 2), np.uint8))
  with pytest.raises(ValueError, match='expected uint8 images'):
    image_grid(np.zeros((2, 4, 4, 3), np.float32))
