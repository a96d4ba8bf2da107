"""Kernels at scale: tiles, memory bounds, progress, checkpoints, several processes.

`batch(kernel_fn, batch_size)` computes `kernel_fn(x1, x2)` in tiles and
assembles them into the kernel of the untiled call; `estimate_memory` bounds
the memory of such a computation before it runs.
"""

from .tiling import AUTO_MEMORY_FRACTION, MemoryEstimate, batch, estimate_memory

__all__ = ['AUTO_MEMORY_FRACTION', 'MemoryEstimate', 'batch', 'estimate_memory']
