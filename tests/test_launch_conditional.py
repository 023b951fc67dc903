"""The launcher with a class-conditional model, end to end: train on labelled digits, evaluate
(Bayes' accuracy), sample a class and a class grid, score with and without labels. In a file of
its own so that pytest's workers run it beside the other launcher tests."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from test_launch import SMALL, _metrics, in_process, ok_in_process


@pytest.fixture(scope='module')
def labelled_digits(tmp_path_factory):
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
  path = tmp_path_factory.mktemp('data') / 'labelled.npz'
  np.savez(path, x_train=images[:1500], x_test=images[1500:], y_train=digits.target[:1500],
           y_test=digits.target[1500:])
  return f'npz:{path}', images[1500:], digits.target[1500:]


def test_class_conditional_run_from_flags(labelled_digits, tmp_path):
  dataset, test_images, test_labels = labelled_digits
  workdir = str(tmp_path / 'conditional')
  result = ok_in_process('train', f'--workdir={workdir}', f'--dataset={dataset}', *SMALL,
                         '--epochs=1', '--steps_per_epoch=120', '--conditional')
  assert 'class-conditional, 10 classes' in result['out']
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  assert config['model']['num_classes'] == 10
  assert config['data']['class_names'] == [str(d) for d in range(10)]
  metrics = _metrics(workdir)
  assert metrics['num_classes'] == 10
  assert metrics['test_accuracy'] > 0.2  # chance: 0.1 (120 steps of a tiny model)
  assert metrics['test_bits_per_dim'] < metrics['test_marginal_bits_per_dim']  # the label helps
  with Image.open(os.path.join(workdir, 'class_grid.png')) as grid:
    assert grid.size == (8 * 9 + 1, 10 * 9 + 1)  # a row of 8 per class

  with in_process('evaluate', f'--workdir={workdir}') as run:
    assert run['code'] == 0, run['err']
  evaluated = json.loads(run['out'].strip().splitlines()[-1])
  assert evaluated['test_accuracy'] == pytest.approx(metrics['test_accuracy'])
  assert evaluated['test_bits_per_dim'] == pytest.approx(metrics['test_bits_per_dim'], rel=1e-6)

  grid_png = str(tmp_path / 'grid.png')
  with in_process('sample', f'--workdir={workdir}', '--class_grid', '--grid_size=3',
                  f'--out={grid_png}') as run:
    assert run['code'] == 0, run['err']
  with Image.open(grid_png) as grid:
    assert grid.size == (3 * 9 + 1, 10 * 9 + 1)
  # TensorBoard: a class grid from training's epoch end and one from launch.sample.
  import tensorflow as tf
  images_dir = os.path.join(workdir, 'logs', 'images')
  grids = [value for name in os.listdir(images_dir)
           for event in tf.compat.v1.train.summary_iterator(os.path.join(images_dir, name))
           for value in event.summary.value if value.tag == 'class_grid_t0.7']
  assert len(grids) == 2
  # The latent manifold of 4 test images of one class, encoded and decoded with it.
  with in_process('sample', f'--workdir={workdir}', '--interpolate', '--grid_size=2',
                  '--label=4', f'--out={tmp_path / "manifold.png"}') as run:
    assert run['code'] == 0, run['err']
  with Image.open(tmp_path / 'manifold.png') as grid:
    assert grid.size == (2 * 9 + 1, 2 * 9 + 1)
  with in_process('sample', f'--workdir={workdir}', '--label=3', '--num=4',
                  f'--out={tmp_path / "threes.png"}') as run:
    assert run['code'] == 0, run['err']
  assert 'of class 3' in run['out']
  with in_process('sample', f'--workdir={workdir}', '--label=10',
                  f'--out={tmp_path / "x.png"}') as run:
    assert run['code'] == 2 and 'the model has 10 classes' in run['err']

  # score: the npz's test labels, or --label; without labels, p(x) and a note saying so.
  scores = str(tmp_path / 'scores.csv')
  with in_process('score', f'--workdir={workdir}', f'--images={dataset}', f'--out={scores}',
                  required=('workdir', 'images')) as run:
    assert run['code'] == 0, run['err']
  with open(scores) as f:
    rows = list(csv.DictReader(f))
  assert [int(r['label']) for r in rows] == test_labels.tolist()
  np.save(tmp_path / 'images.npy', test_images[:20])
  for extra, note in (([], 'p(x), the class mixture'), (['--label=7'], 'given their labels')):
    with in_process('score', f'--workdir={workdir}', f'--images={tmp_path / "images.npy"}',
                    f'--out={scores}', *extra, required=('workdir', 'images')) as run:
      assert run['code'] == 0, run['err']
    assert note in run['out']


def test_score_takes_labels_from_class_folders_named_as_the_runs_classes():
  from launch import score
  names = [os.path.join('3', 'a.png'), os.path.join('1', 'deeper', 'b.png')]
  assert score._folder_labels('x', names, ['1', '3']).tolist() == [1, 0]  # pylint: disable=protected-access
  assert score._folder_labels('x', ['a.png'], ['1', '3']) is None  # loose images: no labels  # pylint: disable=protected-access
  assert score._folder_labels('x', [os.path.join('7', 'a.png')], ['1', '3']) is None  # pylint: disable=protected-access
