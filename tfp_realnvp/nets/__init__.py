"""The s/t networks of the coupling layers: ResNets with weight norm and batch norm (Keras 3).

- `layers`: the Keras layers (`CouplingNet`, `ResidualBlocks`, `WeightNormConv2D`,
  `BatchNormalization`, `L2`).
- `network`: the network as a function of its weights, and `plan`, the one place that picks how
  it runs in training.
- `recompute`: the backward passes that keep less memory (`RealNVPConfig.recompute`).
- `ops`: weight-normalized convolution and batch normalization on tensors.
"""

from tfp_realnvp.nets.layers import (L2, BatchNormalization, CouplingNet, ResidualBlocks,
                                     WeightNormConv2D)
from tfp_realnvp.nets.network import (EPSILON, NETWORK_RECOMPUTE, bn_relu_conv, coupling_network,
                                      plan, residual_block, residual_blocks, unstack_blocks)
from tfp_realnvp.nets.ops import (batch_norm, convolution_backward, weight_norm_conv,
                                  weight_norm_kernel)

__all__ = ['L2', 'BatchNormalization', 'CouplingNet', 'ResidualBlocks', 'WeightNormConv2D',
           'EPSILON', 'NETWORK_RECOMPUTE', 'bn_relu_conv', 'coupling_network', 'plan',
           'residual_block', 'residual_blocks', 'unstack_blocks', 'batch_norm',
           'convolution_backward', 'weight_norm_conv', 'weight_norm_kernel']
