"""TFDS data sets with the paper's preprocessing (CelebA's central crop, LSUN's random crops,
horizontal flips), prepared beforehand: never downloaded here."""

import tensorflow as tf
import tensorflow_datasets as tfds

from tfp_realnvp.data import OFFLINE_DEFAULT, Data, DataError


def load(name, data_dir, labels=False):
  """The TFDS data set `name`, prepared in `data_dir`, with the paper's preprocessing, as
  `Data` (`tfp_realnvp.data.load` calls this for TFDS names)."""
  kind = name.split('/')[0]
  test_split = 'validation' if kind in ('imagenet_resized', 'lsun') else 'test'
  if labels and kind in ('celeb_a', 'lsun'):
    raise DataError(f'TFDS {name!r} has no class labels for a class-conditional model (use '
                    'mnist, fashion_mnist, cifar10 or imagenet_resized, or your own labels: '
                    'npz:PATH with y_train/y_test, images:DIR with a sub-folder per class).')
  try:
    # download=False: on a machine without the prepared data this fails at once instead of
    # retrying a download for minutes.
    train, test = (tfds.load(name, split=split, data_dir=data_dir, download=False,
                             try_gcs=False, shuffle_files=split == 'train',
                             as_supervised=labels)
                   for split in ('train', test_split))
  except (AssertionError, tfds.core.registered.DatasetNotFoundError, OSError, ValueError) as e:
    raise DataError(
        f'TFDS dataset {name!r} is not prepared in {data_dir or "~/tensorflow_datasets"} '
        f'({type(e).__name__}: {str(e).splitlines()[0][:200]}). Prepare it on a machine with network '
        f'access (`tfds build {name.split("/")[0]} --data_dir=DIR`, or python -c "import '
        f'tensorflow_datasets as tfds; tfds.load(\'{name}\', data_dir=\'DIR\')"), copy DIR here '
        f'and pass --data_dir=DIR; or use a local source: npz:PATH, idx:DIR, images:DIR, or '
        f'{OFFLINE_DEFAULT}.') from None
  preprocess, augment, shape = _TFDS_PREPROCESSING[kind]
  if labels:  # as_supervised: (image, label)
    train = train.map(lambda x, y: (preprocess(x, True), tf.cast(y, tf.int32)), tf.data.AUTOTUNE)
    test = test.map(lambda x, y: (preprocess(x, False), tf.cast(y, tf.int32)), tf.data.AUTOTUNE)
  else:
    train = train.map(lambda ex: preprocess(ex['image'], True), tf.data.AUTOTUNE)
    test = test.map(lambda ex: preprocess(ex['image'], False), tf.data.AUTOTUNE)
  sizes, class_names = {}, None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    if labels:
      class_names = tuple(builder.info.features['label'].names)
    sizes = {'train': builder.info.splits['train'].num_examples,
             'test': builder.info.splits[test_split].num_examples}
  except Exception:  # sizes are a convenience; mock or partial data may not carry them
    if labels and class_names is None:
      raise
  return Data(name, train, test, shape, sizes.get('train'), sizes.get('test'), augment,
              num_classes=len(class_names) if labels else None, class_names=class_names)


def _flip(image):
  return tf.image.random_flip_left_right(image)


def _celeb_a(image, training):
  # The paper: central 148x148 crop, resized to 64x64.
  image = tf.image.resize_with_crop_or_pad(image, 148, 148)
  image = tf.image.resize(image, [64, 64], method='area', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0., 255.), tf.uint8)


def _lsun(image, training):
  # The paper: shortest side to 96, then random 64x64 crops (central crops for evaluation).
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  size = tf.cast(tf.round(shape * 96. / tf.reduce_min(shape)), tf.int32)
  image = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(image, size, antialias=True)),
                                   0., 255.), tf.uint8)
  if training:
    return tf.image.random_crop(image, [64, 64, 3])
  return tf.image.resize_with_crop_or_pad(image, 64, 64)


def _identity(image, training):
  return image


_TFDS_PREPROCESSING = {
    # kind: (deterministic preprocessing, training augmentation, image shape)
    'mnist': (_identity, None, (28, 28, 1)),
    'fashion_mnist': (_identity, None, (28, 28, 1)),
    'cifar10': (_identity, _flip, (32, 32, 3)),
    'celeb_a': (_celeb_a, _flip, (64, 64, 3)),
    'imagenet_resized': (_identity, None, None),
    'lsun': (_lsun, _flip, (64, 64, 3)),
}
