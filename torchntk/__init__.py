"""torchntk: infinite-width neural networks (NNGP and NTK kernels) in PyTorch."""

from . import functional, stax
from .empirical import empirical_nngp_fn, empirical_ntk_fn
from .kernel import Kernel

__version__ = "0.1.0"
