"""Several workers, in real processes on localhost: a Slurm job step faked in the environment
trains with --strategy=auto, stops at one step on SIGTERM to one task, refuses to resume from
different steps, and leaves only the chief's files; TF_CONFIG's workers stop with one line when
one dies."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

from tfp_realnvp import training
from test_launch import ROOT, SMALL, digits  # noqa: F401 (digits: a fixture)
from test_preemption import _loads, _read, _stopped_at, _train, _wait_for


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_slurm_tasks_train_together_and_stop_at_one_step(digits, tmp_path):
  """A Slurm job step of two tasks on this machine (the variables Slurm sets; TF's resolver
  expands the node list itself): --strategy=auto picks multi-worker; SIGTERM to one task stops
  both at the same step; a task that cannot see the chief's checkpoints refuses to start over."""
  workdir, alone = str(tmp_path / 'run'), str(tmp_path / 'elsewhere')
  args = ['--batch_size=16', '--steps_per_epoch=100', '--epochs=1', '--checkpoint_every_steps=100']
  environ = {k: v for k, v in os.environ.items() if k != 'TF_CONFIG'}

  def start(workdirs, logs):
    port = _free_port()
    return [subprocess.Popen(
        [sys.executable, '-m', 'launch.train', f'--workdir={w}', f'--dataset={digits[0]}', *SMALL,
         '--log_every_steps=5', *args, f'--slurm_port={port}'], cwd=ROOT, stdout=log,
        stderr=subprocess.STDOUT, text=True,
        env={**environ, 'SLURM_PROCID': str(rank), 'SLURM_STEP_NUM_TASKS': '2',
             'SLURM_NTASKS': '2', 'SLURM_STEP_NODELIST': 'localhost',
             'SLURM_STEP_TASKS_PER_NODE': '2'})
        for rank, (w, log) in enumerate(zip(workdirs, logs))]

  def new_logs(phase):  # a file per phase and task (a truncated one keeps the writer's offset)
    return [open(tmp_path / f'{phase}{rank}.log', 'a+') for rank in range(2)]

  logs = new_logs('sigterm')
  try:
    processes = start([workdir, workdir], logs)
    _wait_for(logs[0], 'step 20/', processes[0])
    processes[1].send_signal(signal.SIGTERM)
    for process in processes:
      process.wait(timeout=300)
    outputs = [_read(log) for log in logs]
    assert [p.returncode for p in processes] == [42, 42], [o[-2000:] for o in outputs]
    assert '2 workers from Slurm (this is worker 0; the chief: worker 0 at localhost:' \
        in outputs[0]
    assert 'CollectiveAllReduceStrategy, 2 replica(s)' in outputs[0]  # auto: multi-worker
    (first, step), (second, other) = _stopped_at(outputs[0]), _stopped_at(outputs[1])
    assert step == other and second == 'SIGTERM' and 'another worker' in first
    assert training.checkpoint_steps(workdir)[0] == step
    # Only the chief writes in the workdir (task 1's checkpoints go to a temporary folder).
    assert sorted(os.listdir(workdir)) == ['checkpoints', 'config.json', 'logs', 'train.lock']
    assert all(re.fullmatch(r'ckpt-\d+\.(index|data-.*)|checkpoint', name)
               for name in os.listdir(os.path.join(workdir, 'checkpoints')))
    # A task that sees no checkpoint while the chief resumes: both stop, one line each.
    logs += new_logs('elsewhere')
    processes = start([workdir, alone], logs[-2:])
    for process in processes:
      process.wait(timeout=300)
    for process, log in zip(processes, logs[-2:]):
      errors = [line for line in _read(log).splitlines() if line.startswith('error:')]
      assert process.returncode == 2 and len(errors) == 1, _read(log)[-2000:]
      assert f'The workers would resume from different steps (0, {step})' in errors[0]
    assert not os.path.exists(os.path.join(alone, 'checkpoints'))
    # The rerun resumes both at the step and ends where an uninterrupted run does.
    logs += new_logs('rerun')
    processes = start([workdir, workdir], logs[-2:])
    for process, log in zip(processes, logs[-2:]):
      process.wait(timeout=300)
      assert process.returncode == 0, _read(log)[-3000:]
      assert f'Resuming from step {step}.' in _read(log)
    with open(os.path.join(workdir, 'metrics.json')) as f:
      metrics = json.load(f)
    assert metrics['steps'] == 100 and metrics['replicas'] == 2
    assert metrics['global_batch_size'] == 32  # the global batch spans both workers
  finally:
    for log in logs:
      log.close()


def test_when_a_worker_dies_the_others_stop_with_one_line(digits, tmp_path):
  """TF_CONFIG's two workers; worker 1 killed (SIGKILL: no notice): the chief notices (the
  coordination service's heartbeats), names the newest checkpoint, and exits to be requeued."""
  ports = [_free_port(), _free_port()]
  workdir = str(tmp_path / 'run')
  logs = [open(tmp_path / f'worker{i}.log', 'a+') for i in range(2)]
  try:
    processes = [_train(workdir, digits[0], '--batch_size=16', '--steps_per_epoch=400',
                        '--epochs=1', '--checkpoint_every_steps=10', '--strategy=multi_worker',
                        env={'TF_CONFIG': json.dumps({'cluster': {'worker': [
                            f'localhost:{p}' for p in ports]}, 'task': {'type': 'worker',
                                                                    'index': i}})},
                        log=logs[i]) for i in range(2)]
    _wait_for(logs[0], 'step 25/', processes[0])
    processes[1].send_signal(signal.SIGKILL)
    processes[0].wait(timeout=300)
    processes[1].wait()
    output = _read(logs[0])
  finally:
    for log in logs:
      log.close()
  assert processes[0].returncode == 42, output[-3000:]
  newest = training.checkpoint_steps(workdir)[0]
  assert newest >= 20 and _loads(workdir, newest)
  lines = [line for line in output.splitlines() if line.startswith('launch.train: a worker')]
  assert len(lines) == 1 and 'Traceback' not in output, output[-3000:]
  assert f'the newest checkpoint is at step {newest}. Start every worker again' in lines[0]
