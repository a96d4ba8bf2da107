"""Kernels at scale: tiles, memory bounds, progress, checkpoints, several processes.

`batch(kernel_fn, batch_size)` computes `kernel_fn(x1, x2)` in tiles and
assembles them into the kernel of the untiled call; `estimate_memory` bounds
the memory of such a computation before it runs.

The package, file by file:

- `tiling`: `batch` and its run: tiles computed, placed into the result,
  dealt out among processes, saved to the checkpoint.
- `plan`: what a run computes: the kernel function's call, the fields of the
  result and how tiles fill them, the list of tiles.
- `memory`: `estimate_memory`, the bytes alive while a kernel function runs on
  shape-only tensors, and the tile size that fits.
- `checkpoint`: the checkpoint directory (`meta.json`, one file per tile) a
  run resumes from.
- `files`: files opened without following links, written atomically, locked,
  memory-mapped, and the disk space they need.
- `fingerprint`: what a computation depends on, hashed to tell checkpoints apart.
- `distributed`: the `torch.distributed` group that shares the tiles.
- `inputs`: examples of `x1` and `x2`, and shape-only inputs.
- `arguments`: the checks of the arguments that are `batch`'s own.
"""

from .memory import AUTO_MEMORY_FRACTION, MemoryEstimate, estimate_memory
from .tiling import batch

__all__ = ['AUTO_MEMORY_FRACTION', 'MemoryEstimate', 'batch', 'estimate_memory']
