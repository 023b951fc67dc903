"""Running a training job; the launcher (`launch/`) is a thin layer of flags over this. One
module per concern, lower ones first (none imports a later one):

- `errors`: `RunError`, what a run reports to its user;
- `strategies`: distribution strategies, clusters from TF_CONFIG or Slurm;
- `workdir`: the run's folder (its lock, `--restart`) and atomic JSON files;
- `checkpoints`: `Checkpointer`, atomic checkpoints that resume;
- `run_config`: the run's `config.json`, and `restore_model`;
- `callbacks`: the training loop (`fit_resumable`) and its checkpointing callbacks;
- `preemption`: checkpoint and stop on SIGTERM or SIGINT (`SaveOnPreemption`, `Preempted`);
- `progress`: progress lines and bars;
- `evaluation`: bits/dim, the Bayes classifier, samples per class, the latent manifold;
- `tensorboard`: `TensorBoardLogger`.

Every public name is here too: `from tfp_realnvp import training; training.Checkpointer`.
"""

from tfp_realnvp.training.errors import RunError
from tfp_realnvp.training.strategies import (STRATEGIES, SlurmCluster, build_strategy,
                                             check_same_start, check_shared_workdir,
                                             gather_from_workers,
                                             cluster_description, is_chief, mirrored_strategy,
                                             slurm_tasks, split_cpu, tf_config_workers)
from tfp_realnvp.training.workdir import (current_umask, lock_workdir, set_aside_run,
                                          write_json_atomic)
from tfp_realnvp.training.checkpoints import Checkpointer, all_finite, checkpoint_steps
from tfp_realnvp.training.run_config import (DATA_KEYS, RUN_CONFIG_SECTIONS, check_run_config,
                                             model_from_run_config, read_run_config,
                                             restore_model, write_run_config)
from tfp_realnvp.training.callbacks import (CheckpointEvery, StopOnDivergence, fit_resumable,
                                            steps_per_epoch)
from tfp_realnvp.training.preemption import (INTERRUPTED, REQUEUE, Preempted,
                                             SaveOnPreemption)
from tfp_realnvp.training.progress import EpochProgbar, Progress, ProgressLines, interactive
from tfp_realnvp.training.evaluation import (class_samples, evaluate_bits_per_dim,
                                             evaluate_classifier, latent_manifold)
from tfp_realnvp.training.tensorboard import CLASS_GRID_ROWS, TensorBoardLogger
