"""torchntk: infinite-width neural networks (NNGP and NTK kernels) in PyTorch."""

from . import functional, stax
from .kernel import Kernel

__version__ = "0.1.0"
