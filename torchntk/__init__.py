"""torchntk: infinite-width neural networks (NNGP and NTK kernels) in PyTorch."""

from . import functional, predict, signal, stax
from .batching import MemoryEstimate, batch, estimate_memory
from .empirical import (empirical_kernel_fn, empirical_nngp_fn, empirical_ntk_fn, linearize,
                        taylor_expand)
from .kernel import Kernel
from .monte_carlo import monte_carlo_kernel_fn

__version__ = "0.1.0"
