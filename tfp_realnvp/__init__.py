"""tfp_realnvp: Real NVP (Dinh, Sohl-Dickstein, Bengio, ICLR 2017) on TensorFlow Probability."""

from tfp_realnvp import bijectors, optimizers, presets
from tfp_realnvp.distribution import FlowDistribution
from tfp_realnvp.export import export_saved_model
from tfp_realnvp.model import RealNVP, to_uint8
from tfp_realnvp.nets import CouplingNet, WeightNormConv2D
from tfp_realnvp.presets import RealNVPConfig

__version__ = '0.1.0'
