"""An image's complexity as the bits a generic lossless compressor needs for it (Serra et al., ICLR
2020): subtracted from a model's bits/dim, it removes what makes simple images likely to any
model."""

import io
import math

import numpy as np
from PIL import Image, features


def _png(image):
  buffer = io.BytesIO()
  image.save(buffer, format='PNG', optimize=True)  # zlib's best level, filters tried
  return buffer.tell()


def _webp(image):
  buffer = io.BytesIO()
  image.save(buffer, format='WEBP', lossless=True, quality=100, method=6)  # its slowest, smallest
  return buffer.tell()


COMPRESSORS = {'png': _png, 'webp': _webp}


def available_compressors():
  """The compressors this installation can run ('webp' needs Pillow built with libwebp)."""
  return ['png'] + (['webp'] if features.check('webp') else [])


def compressed_bits_per_dim(images, compressor='png'):
  """`[N]` float64: the length in bits of each uint8 image `[N, H, W, C]` (C = 1 or 3) compressed
  losslessly, per dimension (`H * W * C`). `compressor`: 'png', 'webp' or 'best' (per image the
  shortest of those available)."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'Expected uint8 images [N, H, W, 1 or 3], got {images.dtype} '
                     f'{list(images.shape)}.')
  names = available_compressors() if compressor == 'best' else [compressor]
  for name in names:
    if name not in COMPRESSORS:
      raise ValueError(f'Unknown compressor {name!r}; choose one of png, webp, best.')
    if name not in available_compressors():
      raise ValueError(f'This Pillow cannot write {name} (built without it); use png.')
  dims = math.prod(images.shape[1:])
  bits = []
  for array in images:
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    bits.append(min(COMPRESSORS[name](image) for name in names) * 8 / dims)
  return np.array(bits, np.float64)
