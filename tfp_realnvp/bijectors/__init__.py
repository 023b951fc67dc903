"""Real NVP's bijectors on `[H, W, C]` events, each with a one-pass value and log-det, and Glow's
(ActNorm, the invertible 1x1 convolution) as options."""

from tfp_realnvp.bijectors.actnorm import ActNorm, ActNormParameters, data_dependent_init
from tfp_realnvp.bijectors.affine_coupling import AffineCoupling, channel_mask, checkerboard
from tfp_realnvp.bijectors.base import FlowBijector, Inverted, Sequential, one_pass
from tfp_realnvp.bijectors.batch_norm import BatchNorm, BatchStatistics
from tfp_realnvp.bijectors.invertible_conv import Invertible1x1Conv, LUWeights
from tfp_realnvp.bijectors.logit import Logit
from tfp_realnvp.bijectors.multiscale import FactorOut, latent_groups, multiscale_flow
from tfp_realnvp.bijectors.squeeze import Squeeze
