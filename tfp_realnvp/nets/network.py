"""Real NVP's s/t network as a function of its weights, and the one place (`plan`) that picks
how it runs in training: what its backward pass recomputes, and whether it goes through the
traced functions shared by every network and block of a shape.

What each choice was measured to buy is in `docs/design.md`.
"""

import tensorflow as tf

from tfp_realnvp.bijectors.batch_norm import as_bits, one_replica
from tfp_realnvp.nets.ops import bn_relu, local_statistics, weight_norm_conv
from tfp_realnvp.nets.recompute import bn_relu_conv_keeping_input, residual_block_keeping_input

EPSILON = 1e-4  # the networks' batch norm

# What one coupling network is told to recompute, from the least memory saved to the most:
# nothing; each batch norm -> ReLU -> convolution unit keeps only its input; each residual block
# too; the whole network runs again.
NETWORK_RECOMPUTE = ('none', 'batch_norm', 'blocks', 'networks')


def plan(recompute, x, training, synchronized):
  """`(level, shared)`: how a coupling network on `x` runs (`recompute`: one of
  `NETWORK_RECOMPUTE`).

  - `level`: `recompute` where it applies, else 'none'. Nothing is recomputed in inference.
    'networks' applies in any training step. The custom gradients of 'batch_norm' and 'blocks'
    take one replica's batch statistics, float32 or narrower, and a batch that is not empty:
    elsewhere (statistics synchronized over several replicas, float64) autodiff keeps its
    tensors.
  - `shared`: in training on one replica, the networks and blocks run through one traced
    function per shape. Not in inference: there one graph may run several flow passes at
    once (a log-density per class, several dequantization draws), and concurrent calls of one
    function share its oneDNN CPU kernels, which crashed the process (`tests/test_nets.py`); a
    training step's networks run one after another. Not on several replicas either: their
    threads would call one function at once (on CPU devices, the same sharing of oneDNN
    kernels),
    and with synchronized statistics a cross-replica op cannot run inside a nested function.
  """
  if recompute not in NETWORK_RECOMPUTE:
    raise ValueError(f'recompute must be one of {", ".join(NETWORK_RECOMPUTE)}, got '
                     f'{recompute!r}.')
  local = training and local_statistics(synchronized)
  if not training:
    level = 'none'
  elif recompute in ('batch_norm', 'blocks') and not (
      local and x.dtype != tf.float64 and x.shape.num_elements() != 0):
    level = 'none'
  else:
    level = recompute
  return level, local and one_replica()


def bn_relu_conv(x, norm, conv, training, momentum, epsilon, conv_dtype=None, synchronized=True,
                 keep_only_input=False):
  """`(conv(relu(bn(x))), updated running averages)` (`norm`: gamma, beta, running mean and
  variance; `conv`: v, g, bias; the convolution's input cast to `conv_dtype` if given).
  `keep_only_input` (training, one replica's statistics): `bn_relu_conv_keeping_input`."""
  if keep_only_input and not training:
    raise ValueError('bn_relu_conv: keep_only_input is for training (batch statistics).')
  if keep_only_input:
    return bn_relu_conv_keeping_input(x, norm, conv, momentum, epsilon, conv_dtype)
  h, updated = bn_relu(x, norm, training, momentum, epsilon, synchronized, conv_dtype)
  return weight_norm_conv(h, *conv), updated


def residual_block(x, norm1, conv1, norm2, conv2, training, momentum, epsilon,
                   synchronized=True, recompute='none'):
  """`x + conv(relu(bn(conv(relu(bn(x))))))` from the layers' weights (`norm*`: gamma, beta,
  running mean and variance; `conv*`: v, g, bias). Returns `(y, updated running averages)`.

  `recompute`, a level `plan` gave: 'blocks' keeps only `x` (`residual_block_keeping_input`);
  'batch_norm' keeps `x` and the first convolution's output (`bn_relu_conv_keeping_input`);
  'none' keeps what autodiff does."""
  if recompute != 'none' and not training:
    raise ValueError(f'residual_block: recompute={recompute!r} is for training (batch '
                     'statistics); `plan` gives the level that applies.')
  if recompute == 'blocks':
    return residual_block_keeping_input(x, norm1, conv1, norm2, conv2, momentum, epsilon)
  keep = recompute == 'batch_norm'
  h, updated1 = bn_relu_conv(x, norm1, conv1, training, momentum, epsilon,
                             synchronized=synchronized, keep_only_input=keep)
  h, updated2 = bn_relu_conv(h, norm2, conv2, training, momentum, epsilon,
                             synchronized=synchronized, keep_only_input=keep)
  return x + h, updated1 + updated2


def unstack_blocks(stacked):
  """Each block's `(norm1, conv1, norm2, conv2)` (`residual_block`'s weights) from the stacked
  `(v, g, bias, gamma, beta, moving_mean, moving_variance)`, each `[num_blocks, 2, ...]`: one op
  per stacked tensor (`tf.unstack`; its gradient is one op too)."""
  num_blocks = stacked[0].shape[0]

  def units(*tensors):  # a tuple of slices per unit; block b's units are 2b and 2b + 1
    return list(zip(*(tf.unstack(tf.reshape(w, [2 * num_blocks, *w.shape[2:]]))
                      for w in tensors)))
  v, g, bias, gamma, beta, moving_mean, moving_variance = stacked
  norms, convs = units(gamma, beta, moving_mean, moving_variance), units(v, g, bias)
  return [(norms[2 * b], convs[2 * b], norms[2 * b + 1], convs[2 * b + 1])
          for b in range(num_blocks)]


def residual_blocks(x, stacked, training, momentum, epsilon, synchronized=True,
                    recompute='none', shared=False):
  """`residual_block` after `residual_block`, from their stacked weights `(v, g, bias, gamma,
  beta, moving_mean, moving_variance)` (each `[num_blocks, 2, ...]`). Returns `(y, updated)`:
  in training the updated running averages `(moving_mean, moving_variance)`, stacked like the
  weights; in inference `()`. `recompute`, `shared`: as `plan` gives them."""
  block = _shared_block if shared else residual_block
  updated = ()
  for weights in unstack_blocks(stacked):
    x, block_updated = block(x, *weights, training, momentum, epsilon, synchronized, recompute)
    updated += block_updated  # (mean1, variance1, mean2, variance2)
  if not updated:
    return x, ()
  shape = stacked[-1].shape
  return x, tuple(tf.reshape(tf.stack(values), shape) for values in (updated[0::2],
                                                                      updated[1::2]))


def coupling_network(x, weights, training, momentum, synchronized=True, conv_dtype='float32',
                     recompute='none'):
  """Real NVP's s/t network from its weights: `(s, t, *updated running averages)`, with no side
  effects (so a backward pass may run it again, and one traced function may serve every network
  of a shape). `weights`: `[conv_in, class_bias, blocks, hidden, norm_out, conv_out, scale]`, as
  `CouplingNet.call` gathers them; the output convolution runs in `conv_dtype`. `recompute`: one
  of `NETWORK_RECOMPUTE` (where it applies: `plan`)."""
  level, shared = plan(recompute, x, training, synchronized)
  args = (training, momentum, synchronized, conv_dtype)
  if level == 'networks':  # inside, autodiff's tensors, for one network's backward pass at a time
    forward = tf.recompute_grad(lambda x, *flat_weights: _network(
        x, tf.nest.pack_sequence_as(weights, flat_weights), *args, 'none', shared))
    return tuple(forward(x, *tf.nest.flatten(weights)))
  return (_shared_network if shared else _network)(x, weights, *args, level, shared)


def _network(x, weights, training, momentum, synchronized, conv_dtype, recompute, shared):
  conv_in, class_bias, blocks, hidden, norm_out, conv_out, scale = weights
  h = weight_norm_conv(x, *conv_in)
  for bias in class_bias:  # [N, 1, 1, F]: the class's bias
    h += bias
  updated = ()
  if blocks:
    h, updated = residual_blocks(h, blocks, training, momentum, EPSILON, synchronized,
                                 recompute, shared)
  keep = recompute != 'none'  # (the units of 'blocks' too)
  if hidden:
    h, hidden_updated = bn_relu_conv(h, *hidden, training, momentum, EPSILON,
                                     synchronized=synchronized, keep_only_input=keep)
    updated += hidden_updated
  # Under mixed precision, s and t come from a float32 convolution: their rounding would
  # otherwise enter the log-det and the latent directly (a small share of the FLOPs).
  h, out_updated = bn_relu_conv(h, norm_out, conv_out, training, momentum, EPSILON,
                                conv_dtype=conv_dtype, synchronized=synchronized,
                                keep_only_input=keep)
  raw_s, t = tf.split(h, 2, axis=-1)
  return (scale * tf.tanh(raw_s), t, *updated, *out_updated)


# The shared traced functions: one per shape, not inlined, called by every block (a `cifar10`
# model has 80 blocks in 3 shapes) and every network (10 in 3 shapes) of that shape. Tracing and
# optimizing a copy per call site was most of the first step; and inlined, grappler merges the
# recomputed ops of the backward pass with the forward pass's, which undoes the recomputation
# (`docs/design.md`: both measured). The running averages' updates leave as bits (integers): a
# float output would get a zero gradient from the tape, a constant input to each call of the
# backward function, for which grappler made, optimized and instantiated a copy of that function
# per call site.
def _block_with_updates_as_bits(*args):
  y, updated = residual_block(*args)
  return y, tuple(as_bits(u) for u in updated)


def _network_with_updates_as_bits(*args):
  s, t, *updated = _network(*args)
  return (s, t, *(as_bits(u) for u in updated))


_block_traced = tf.function(_block_with_updates_as_bits, autograph=False,
                            experimental_attributes={'_noinline': True})
_network_traced = tf.function(_network_with_updates_as_bits, autograph=False,
                              experimental_attributes={'_noinline': True})


def _shared_block(x, norm1, *args):
  """`residual_block` through the shared traced function."""
  y, updated = _block_traced(x, norm1, *args)
  return y, tuple(tf.bitcast(u, norm1[2].dtype) for u in updated)


def _shared_network(x, weights, *args):
  """`_network` through the shared traced function."""
  s, t, *updated = _network_traced(x, weights, *args)
  dtype = weights[4][2].dtype  # the running averages'
  return (s, t, *(tf.bitcast(u, dtype) for u in updated))
