"""`launch.ood` and `launch.score --method`: out-of-distribution scores from the launcher, on a
run written directly (an untrained two-scale model: the launcher's files and errors, not the
scores' quality, which test_real_digits measures) and a background model trained with
`launch.train --background_noise`."""

import csv
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

import tfp_realnvp as rn
from tfp_realnvp import ood, training
from test_launch import digits, in_process, ok_in_process  # noqa: F401 (digits: a fixture)

CONFIG = rn.RealNVPConfig((8, 8, 1), num_scales=2, num_blocks=1, num_filters=4)


def _write_run(workdir, dataset, config=CONFIG):
  os.makedirs(workdir, exist_ok=True)
  model = rn.RealNVP(config)
  model.compile()
  training.write_run_config(workdir, {'model': config.to_dict(), 'data': {
      'dataset': dataset, 'data_dir': None, 'image_size': None}, 'train': {}})
  training.Checkpointer(workdir, model).save()
  return model


@pytest.fixture(scope='module')
def runs(digits, tmp_path_factory):
  """`(workdir, background_workdir, ood sources)`."""
  root = tmp_path_factory.mktemp('ood')
  workdir = str(root / 'run')
  _write_run(workdir, digits[0])
  background = str(root / 'background')
  result = ok_in_process('train', f'--workdir={background}', f'--dataset={digits[0]}',
                         '--preset=mnist', '--num_scales=2', '--num_blocks=1', '--num_filters=4',
                         '--batch_size=32', '--epochs=1', '--steps_per_epoch=5',
                         '--background_noise=0.2')
  assert "background model: 20% of each training image's pixels" in result['out']
  assert training.read_run_config(background)['train']['background_noise'] == 0.2
  rng = np.random.default_rng(0)
  np.savez(root / 'noise.npz', x_train=rng.integers(0, 256, [40, 8, 8, 1], dtype=np.uint8),
           x_test=rng.integers(0, 256, [30, 8, 8, 1], dtype=np.uint8))
  photos = root / 'photos'
  photos.mkdir()
  for i in range(12):  # colour pictures of another size: resized and made grey
    Image.fromarray(rng.integers(0, 256, [20, 30, 3], dtype=np.uint8)).save(photos / f'{i}.png')
  return workdir, background, [f'npz:{root}/noise.npz', f'images:{photos}']


def test_ood_writes_a_table_json_and_pictures_per_set(runs, tmp_path):
  workdir, background, sources = runs
  result = ok_in_process('ood', f'--workdir={workdir}', f'--ood={",".join(sources)}',
                         f'--background_workdir={background}', f'--out_dir={tmp_path}',
                         '--image_size=8', '--max_images=50')
  out = result['out']
  assert 'colour images made grey for the model' in out
  with open(tmp_path / 'ood.json') as f:
    report = json.load(f)
  assert report['methods'] == list(ood.METHODS)  # all of them run here (a list: not sorted)
  assert report['in']['held_out'] + report['in']['scored'] == 50  # the digits' first 50
  columns = ['bits_per_dim', 'preprocessing', 'level_0', 'level_1', 'complexity',
             'likelihood_ratio', 'typicality', 'fitted', 'combined']
  assert sorted(report['results']) == sorted(sources)
  for source in sources:
    assert sorted(report['results'][source]) == sorted(columns)
    for figures in report['results'][source].values():
      assert 0 <= figures['auroc'] <= 1 and 0 <= figures['fpr_at_95_tpr'] <= 1
  for name in ('noise', 'photos'):  # the sources' base names
    for picture in ('roc', 'histograms'):
      with Image.open(tmp_path / f'{name}_{picture}.png') as image:
        assert image.size[0] >= 600
  for source in sources:  # the table: a row per method and set
    assert sum(line.startswith(source[:24]) for line in out.splitlines()) == len(columns)
  assert report['results'][sources[0]]['bits_per_dim']['out'] == 50  # test split, then train
  assert report['results'][sources[1]]['bits_per_dim']['out'] == 12
  assert 'typicality test (mean), batches of 10' in out
  assert f'wrote: {tmp_path}/ood.json' in out
  # Some methods only (the typicality test still gets the bits/dim it needs).
  result = ok_in_process('ood', f'--workdir={workdir}', f'--ood={sources[0]}', '--max_images=50',
                         '--methods=typicality,complexity', f'--out_dir={tmp_path}/some',
                         '--typicality_statistic=median')
  with open(tmp_path / 'some' / 'ood.json') as f:
    assert sorted(json.load(f)['results'][sources[0]]) == ['complexity', 'typicality']
  assert 'typicality test (median), batches of 10' in result['out']


def test_ood_and_score_refuse_bad_requests_in_one_line(runs, tmp_path, digits):
  workdir, background, sources = runs
  cases = [
      (['--methods=raw'], "Unknown score method 'raw'; choose from bits_per_dim, levels"),
      (['--methods=likelihood_ratio'], 'likelihood_ratio needs a background model'),
      (['--image_size=16'], 'images of [16, 16, 3], the model takes [8, 8, 1] (images:DIR '
                            'sources are resized: give --image_size=8, or leave it out)'),
      ([], None),
  ]
  for extra, message in cases[:3]:
    with in_process('ood', f'--workdir={workdir}', f'--ood={sources[1]}',
                    f'--out_dir={tmp_path}', *extra) as result:
      assert result['code'] == 2 and message in result['err'], (extra, result['err'][-2000:])
      assert len(result['err'].strip().splitlines()) == 1, result['err']
  one_scale = str(tmp_path / 'one_scale')
  _write_run(one_scale, digits[0], CONFIG.replace(num_scales=1))
  with in_process('ood', f'--workdir={one_scale}', f'--ood={sources[0]}', '--methods=levels',
                  f'--out_dir={tmp_path}') as result:
    assert result['code'] == 2 and 'levels scores need a model with levels' in result['err']
  other = str(tmp_path / 'other')
  _write_run(other, digits[0], CONFIG.replace(image_shape=(16, 16, 1)))
  with in_process('ood', f'--workdir={workdir}', f'--ood={sources[0]}',
                  f'--background_workdir={other}', f'--out_dir={tmp_path}') as result:
    assert result['code'] == 2 and 'background model is of images [16, 16, 1]' in result['err']
  np.save(tmp_path / 'empty.npy', np.zeros([0, 8, 8, 1], np.uint8))
  np.savez(tmp_path / 'empty.npz', x_train=np.zeros([0, 8, 8, 1], np.uint8),
           x_test=np.zeros([0, 8, 8, 1], np.uint8))
  with in_process('ood', f'--workdir={workdir}', f'--ood=npz:{tmp_path}/empty.npz',
                  f'--out_dir={tmp_path}') as result:
    assert result['code'] == 2 and 'empty' in result['err'] or 'no images' in result['err'], \
        result['err']
  with in_process('score', f'--workdir={workdir}', f'--images={tmp_path}/x.npy',
                  f'--out={tmp_path}/s.csv', '--method=bits_per_dim,lr') as result:
    assert result['code'] == 2 and "Unknown score method 'lr'" in result['err']


def test_score_writes_a_column_per_method(runs, digits, tmp_path):
  workdir, background, _ = runs
  images = digits[1][1500:1520]
  np.save(tmp_path / 'some.npy', images)
  ok_in_process('score', f'--workdir={workdir}', f'--images={tmp_path}/some.npy',
                f'--out={tmp_path}/s.csv', '--method=bits_per_dim,complexity,levels,'
                'likelihood_ratio,typicality,combined', f'--background_workdir={background}',
                '--held_out_images=100')
  with open(tmp_path / 's.csv') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ['image', 'bits_per_dim', 'complexity', 'preprocessing', 'level_0',
                           'level_1', 'likelihood_ratio', 'typicality', 'combined']
  bits = np.array([float(r['bits_per_dim']) for r in rows])
  png = ood.compressed_bits_per_dim(images)
  np.testing.assert_allclose([float(r['complexity']) for r in rows], bits - png, rtol=1e-4)
  levels = np.array([[float(r[c]) for c in ('preprocessing', 'level_0', 'level_1')]
                     for r in rows])
  np.testing.assert_allclose(levels.sum(-1), bits, rtol=1e-4)
  # combined: -log10 of a Bonferroni-combined conformal p-value (2 scores, 100 held-out images)
  combined = np.array([float(r['combined']) for r in rows])
  assert np.all(combined >= 0) and np.all(combined <= math.log10(101 / 2) + 1e-9)
