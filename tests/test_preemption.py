"""Preemption on one machine, in real processes: SIGTERM or SIGINT during launch.train checkpoints
the step it stops at and the rerun finishes the run; a signal while a checkpoint is written leaves
every checkpoint loadable; the other commands end on SIGTERM leaving no partial file. (Several
workers: test_clusters.)"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tfp_realnvp import files, training
from test_launch import ROOT, SMALL, digits, launch, ok  # noqa: F401 (digits: a fixture)

STOPPED = re.compile(r'launch\.train: stopped by (.+?) at step (\d+); checkpoint (\S+)')


def _train(workdir, data, *extra, env=None, log=None):
  """A launch.train process whose output goes to the file `log` (pipes could fill and block)."""
  return subprocess.Popen(
      [sys.executable, '-m', 'launch.train', f'--workdir={workdir}', f'--dataset={data}', *SMALL,
       '--log_every_steps=5', *extra], cwd=ROOT, env={**os.environ, **(env or {})},
      stdout=log, stderr=subprocess.STDOUT, text=True)


def _wait_for(log, text, process, timeout=300):
  deadline = time.time() + timeout
  while True:
    log.seek(0)
    if text in log.read():
      return
    assert process.poll() is None, (f'ended before {text!r}', _read(log)[-3000:])
    assert time.time() < deadline, (f'no {text!r}', _read(log)[-3000:])
    time.sleep(0.05)


def _read(log):
  """The whole log so far. (Logs are opened 'a+': the child writes through a copy of the same
  file descriptor, and with O_APPEND its writes never land where this process seeks to read.)"""
  log.seek(0)
  return log.read()


def _stopped_at(output):
  found = STOPPED.findall(output)
  assert len(found) == 1, output[-3000:]
  return found[0][0], int(found[0][1])


def _loads(workdir, step):
  """Whether the checkpoint at `step` loads (all of it, optimizer too) and is finite."""
  model = training.model_from_run_config(training.read_run_config(workdir))
  model.compile()
  checkpointer = training.Checkpointer(workdir, model)
  try:
    checkpointer.checkpoint.read(os.path.join(workdir, 'checkpoints', f'ckpt-{step}')) \
        .assert_existing_objects_matched()
  except Exception:  # pylint: disable=broad-except
    return False
  return training.all_finite(model.weights + model.optimizer.variables)


def test_sigterm_checkpoints_the_step_it_stops_at_and_the_rerun_finishes(digits, tmp_path):
  workdir = str(tmp_path / 'run')
  args = ['--steps_per_epoch=150', '--epochs=1', '--checkpoint_every_steps=1000']  # none periodic
  with open(tmp_path / 'train.log', 'a+') as log:
    process = _train(workdir, digits[0], *args, log=log)
    _wait_for(log, 'step 60/', process)  # mid-epoch
    signalled = time.time()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    seconds = time.time() - signalled
    output = _read(log)
  assert process.returncode == training.REQUEUE == 42, output[-3000:]
  name, step = _stopped_at(output)
  print(f'SIGTERM -> exit: {seconds:.1f} s, stopped at step {step}')
  assert name == 'SIGTERM' and 60 <= step < 150
  assert 'Run the same command to resume from it (exit status 42)' in output
  assert training.checkpoint_steps(workdir) == [step] and _loads(workdir, step)
  result = ok(launch('train', f'--workdir={workdir}', f'--dataset={digits[0]}', *SMALL, *args))
  assert f'Resuming from step {step}.' in result.stdout
  with open(os.path.join(workdir, 'metrics.json')) as f:
    assert json.load(f)['steps'] == 150  # as an uninterrupted run: no step lost or repeated


def test_a_signal_while_checkpointing_leaves_every_checkpoint_loadable(digits, tmp_path):
  # A checkpoint every step, so that the signals land while one is written; a second signal
  # soon after the first, at several moments.
  workdir = str(tmp_path / 'run')
  args = ['--steps_per_epoch=400', '--epochs=1', '--checkpoint_every_steps=1',
          '--keep_checkpoints=2']
  cases = [(signal.SIGTERM, 0.0, 42), (signal.SIGTERM, 0.03, 42), (signal.SIGINT, 0.01, 130),
           (signal.SIGINT, None, 130)]  # None: one signal only
  for index, (signum, delay, status) in enumerate(cases):
    with open(tmp_path / f'train{index}.log', 'a+') as log:
      process = _train(workdir, digits[0], *args, log=log)
      _wait_for(log, 'step 10/' if index == 0 else '/400 (epoch', process)  # training, resumed
      time.sleep(0.3 * index)
      process.send_signal(signum)
      if delay is not None:
        time.sleep(delay)
        if process.poll() is None:
          process.send_signal(signum)  # a second one, while the first is being handled
      process.wait(timeout=120)
      output = _read(log)
    assert process.returncode == status, output[-3000:]
    steps = training.checkpoint_steps(workdir)
    assert steps and all(_loads(workdir, step) for step in steps), (index, steps)
    if signum == signal.SIGTERM or delay is None:  # a second SIGTERM changes nothing
      assert _stopped_at(output) == (signal.Signals(signum).name, steps[0])
    else:  # a second Ctrl-C stops at once: maybe before the save, never with a broken file
      assert 'stopped by SIGINT' in output
    assert not [name for name in os.listdir(os.path.join(workdir, 'checkpoints'))
                if name.endswith('.tmp')]


def test_other_commands_end_on_sigterm_leaving_no_partial_file(digits, tmp_path):
  workdir = str(tmp_path / 'run')
  ok(launch('train', f'--workdir={workdir}', f'--dataset={digits[0]}', *SMALL, '--epochs=1',
            '--steps_per_epoch=2'))
  many = np.tile(digits[1], (60, 1, 1, 1))  # about 100,000 images: long enough to interrupt
  np.save(tmp_path / 'many.npy', many)
  out = tmp_path / 'out'
  out.mkdir()
  with open(tmp_path / 'score.log', 'a+') as log:
    process = subprocess.Popen(
        [sys.executable, '-m', 'launch.score', f'--workdir={workdir}',
         f'--images={tmp_path}/many.npy', f'--out={out}/scores.csv', '--noise_draws=4'],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    _wait_for(log, 'launch.score:', process)
    time.sleep(1)
    signalled = time.time()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    output = _read(log)
  assert process.returncode == 143, output[-2000:]
  assert time.time() - signalled < 30
  assert 'launch.score: stopped by SIGTERM; no partial output is left.' in output
  assert os.listdir(out) == []


def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / 'a.json'
  path.write_text('old')
  with pytest.raises(KeyboardInterrupt):
    with files.atomic_path(str(path)) as temporary:
      with open(temporary, 'w') as f:
        f.write('half of the new')
      raise KeyboardInterrupt
  assert path.read_text() == 'old' and os.listdir(tmp_path) == ['a.json']
  with files.atomic_path(str(path), '.png') as temporary:
    assert temporary.endswith('.png') and os.path.dirname(temporary) == str(tmp_path)
    with open(temporary, 'w') as f:
      f.write('new')
  assert path.read_text() == 'new' and os.listdir(tmp_path) == ['a.json']
  assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~files.current_umask())




def test_sigterm_outside_the_training_steps_exits_to_be_requeued(tmp_path, capsys, monkeypatch):
  """Before the steps (starting, restoring, tracing) or after them (the test evaluation), SIGTERM
  (`Terminated`) exits 42 naming the newest checkpoint: nothing is lost, a scheduler requeues."""
  from absl.testing import flagsaver
  from launch import common
  from launch import train as command

  def main(argv):
    del argv
    raise common.Terminated()
  monkeypatch.setattr(command, 'main', main)
  os.makedirs(tmp_path / 'checkpoints')
  (tmp_path / 'checkpoints' / 'ckpt-7.index').write_bytes(b'')
  with flagsaver.flagsaver():
    command.FLAGS(['launch.train', f'--workdir={tmp_path}'])
    with pytest.raises(SystemExit) as exit_:
      command.train(['launch.train'])
  assert exit_.value.code == 42
  assert capsys.readouterr().err == (
      f'launch.train: stopped by SIGTERM outside the training steps; the newest checkpoint is '
      f'{tmp_path}/checkpoints/ckpt-7. Run the same command to resume (exit status 42).\n')
