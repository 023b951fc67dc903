"""Lighter graph optimization for the training step's first call (TF's grappler), on this
package's own functions only, and only where the user left TF's settings at their defaults.

TF optimizes each function graph the first time it runs, with the options its call site
carries. A training step is one large function (the step: reading, clipping and updating each
variable, the flow's arithmetic) calling small ones (a coupling network or a residual block per
shape, and their backward passes), and optimizing them was about a quarter of the first step:
- the step's graph: grappler's second round of its passes changes next to nothing (it removed 83
  duplicate constants of about 3,700 ops at the small MNIST model) and took half of its time; of
  the first round's passes, the layout optimizer, the remapper, the loop, memory and function
  optimizers and the implementation selector changed no node of it (at the small MNIST model and
  at `cifar10`, where its networks run as functions: they hold the convolutions);
- each network and block function: of grappler's passes only the remapper changed a node (it
  fuses a convolution with its bias); the others took about 50 ms per function.
So the step runs one round of the passes that change it (pruning, common subexpressions,
arithmetic and dependency optimization; constant folding only where its own graph holds the
networks), and its functions the remapper, the layout optimizer (NHWC/NCHW on GPUs) and the
memory optimizer alone, on a machine with a GPU; on CPUs with oneDNN none of those three (TF's
log: the remapper fused a convolution with its bias, which oneDNN's own rewrite of the graph does
anyway, and the others changed no node; the three took about 20 ms per backward network
function). Where the step's own graph
holds the networks' convolutions (`--recompute`, or batch statistics synchronized over several
replicas), the step keeps every pass. Each figure: TF's own log (`TF_CPP_VMODULE=
meta_optimizer=1`). Side by side (README, "Speed and memory"): the small MNIST model's first step
about 0.5 s shorter (`cifar10`'s within the machine's noise), the steps the same. The networks'
options are made from the thread's options outside the step (`RealNVP.make_train_function`), not
inside it, where they would inherit the step's.

A setting the user made (`tf.config.optimizer.set_experimental_options`, or a pass turned on or
off in the context's config) is kept as made; `graph_options.ENABLED = False` (before `fit`
makes its train function) keeps TF's defaults everywhere.

TF has no public way to give a function's call sites options other than the context's: this
sets the current thread's `context.function_call_options` (TF's own mechanism, used by
`tf.function` call sites) while the step is called and traced.
"""

import contextlib

import tensorflow as tf
from tensorflow.core.protobuf import config_pb2
from tensorflow.core.protobuf import rewriter_config_pb2
from tensorflow.python.eager import context
from tensorflow.python.util import _pywrap_util_port

ENABLED = True  # False: TF's own options for the step and its functions

_DEFAULT = rewriter_config_pb2.RewriterConfig.DEFAULT
_OFF = rewriter_config_pb2.RewriterConfig.OFF

# Grappler's passes that changed nothing in the network and block functions (TF's log).
_UNUSED_IN_NETWORKS = ('constant_folding', 'arithmetic_optimization', 'loop_optimization',
                       'dependency_optimization', 'function_optimization',
                       'common_subgraph_elimination', 'shape_optimization',
                       'implementation_selector', 'pin_to_host_optimization', 'debug_stripper')
# Those not needed in them on CPUs with oneDNN (TF's log: the layout and memory optimizers changed
# no node, the remapper fused each convolution with its bias, which oneDNN's own rewrite of the
# graph does anyway; the three took about 20 ms per backward network function at `cifar10`).
_GPU_ONLY_IN_NETWORKS = ('layout_optimizer', 'remapping')
# Those that changed nothing in the step's own graph where its networks run as functions (TF's
# log; with the memory optimizer, whose setting has a type of its own).
_UNUSED_IN_STEP = ('layout_optimizer', 'remapping', 'loop_optimization', 'function_optimization',
                   'implementation_selector')
# And one that changes little there: constant folding removed 13 to 28 of 2,000 to 3,700 nodes
# (`cifar10`, the small MNIST model, batch size known while tracing) in 40 to 110 ms.
_MINOR_IN_STEP = ('constant_folding',)


def _copy(config):
  copy = config_pb2.ConfigProto()
  copy.CopyFrom(config)
  return copy


def current_config():
  """The options this thread's function call sites get now (TF's: the context's config, with
  soft placement unless the user set it)."""
  config = config_pb2.ConfigProto()
  config.ParseFromString(context.context().function_call_options.config_proto_serialized)
  return config


def _one_round(config):
  """`config` (a copy; the thread's current options when None) with one round of grappler's
  passes, unless the user chose the rounds."""
  config = current_config() if config is None else _copy(config)
  rewrite = config.graph_options.rewrite_options
  if rewrite.meta_optimizer_iterations == rewriter_config_pb2.RewriterConfig.DEFAULT_NUM_ITERS:
    rewrite.meta_optimizer_iterations = rewriter_config_pb2.RewriterConfig.ONE
  return config


def _turn_off(config, passes, memory=True):
  """Turns off each of `passes` (and with `memory`, the memory optimizer) that the user left at
  its default."""
  rewrite = config.graph_options.rewrite_options
  for name in passes:
    if getattr(rewrite, name) == _DEFAULT:
      setattr(rewrite, name, _OFF)
  if memory and rewrite.memory_optimization == rewriter_config_pb2.RewriterConfig.DEFAULT_MEM_OPT:
    rewrite.memory_optimization = rewriter_config_pb2.RewriterConfig.NO_MEM_OPT
  return config


def step_config(config=None, networks_in_functions=True):
  """The options for the training step's own graph: one round of grappler's passes, unless the
  user chose the rounds; with `networks_in_functions` (the step calls its networks as functions,
  so its own graph holds none of their convolutions), without the passes that changed nothing
  there (`_UNUSED_IN_STEP`, the memory optimizer) or little (`_MINOR_IN_STEP`)."""
  config = _one_round(config)
  if networks_in_functions:
    _turn_off(config, _UNUSED_IN_STEP + _MINOR_IN_STEP)
  return config


def gpus_visible():
  """Whether TF sees a GPU (where the networks may run)."""
  return bool(tf.config.list_logical_devices('GPU'))


def onednn_enabled():
  """Whether TF's CPU kernels are oneDNN's (its graph rewrite fuses a convolution with its
  bias); not on builds without it or with `TF_ENABLE_ONEDNN_OPTS=0`."""
  return bool(_pywrap_util_port.IsMklEnabled())


def network_config(config=None, gpu=None):
  """The options for the functions the step calls (networks, residual blocks, their backward
  passes): one round, and of the passes the user left at their defaults, the remapper, the
  layout and the memory optimizers only; on CPUs with oneDNN and no GPU (`gpu=None`: none
  visible), none of those either (`_GPU_ONLY_IN_NETWORKS`)."""
  config = _turn_off(_one_round(config), _UNUSED_IN_NETWORKS, memory=False)
  if not (gpus_visible() if gpu is None else gpu) and onednn_enabled():
    _turn_off(config, _GPU_ONLY_IN_NETWORKS)
  return config


@contextlib.contextmanager
def function_call_config(config):
  """Function call sites made, and functions called, on this thread inside get `config`."""
  ctx = context.context()
  before = ctx.function_call_options
  ctx.function_call_options = context.FunctionCallOptions(
      executor_type=before.executor_type, config_proto=config)
  try:
    yield
  finally:
    ctx.function_call_options = before
