"""The inputs `x1`, `x2` of a batched call: their examples, rows of them, and
shape-only (`meta`) inputs for counting memory."""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch

from ..kernel import Kernel

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]
Shape = tuple[int, ...]


def n_examples(x: Any, name: str) -> int:
    """The batch size of `x`, a tensor `(N, ...)` or a list of such tensors."""
    if isinstance(x, Kernel) or (isinstance(x, (list, tuple)) and x and isinstance(x[0], Kernel)):
        raise TypeError(f"batch: {name} must be inputs, not a Kernel (batching a kernel that is "
                        "propagated further is not supported)")
    tensors = [x] if isinstance(x, torch.Tensor) else list(x) if isinstance(x, (list, tuple)) else []
    if not tensors or not all(isinstance(t, torch.Tensor) and t.ndim >= 1 for t in tensors):
        raise TypeError(f"batch: {name} must be a tensor (N, ...) or a list of such tensors, got "
                        f"{type(x).__name__}")
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"batch: the tensors of {name} have different batch sizes {sorted(sizes)}")
    return sizes.pop()


def examples(x: Inputs, start: int, stop: int, device: torch.device | None = None) -> Inputs:
    """Examples `start:stop` of `x`, on `device` if given."""
    if isinstance(x, torch.Tensor):
        return x[start:stop].to(device) if device is not None else x[start:stop]
    return type(x)(examples(t, start, stop, device) for t in x)


def first_tensor(x: Inputs) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x[0]


class MetaInputs:
    """Inputs of given shapes as `meta` tensors (shapes, no values)."""

    def __init__(self, shapes: list[Shape], dtype: torch.dtype, several: bool) -> None:
        sizes = {shape[0] for shape in shapes}
        if len(sizes) != 1:
            raise ValueError(f"estimate_memory: inputs with different batch sizes {sorted(sizes)}")
        self.shapes, self.dtype, self.several, self.n = shapes, dtype, several, sizes.pop()

    @classmethod
    def of_shape(cls, shape: Shape | Sequence[Shape], dtype: torch.dtype,
                 arg: str) -> MetaInputs:
        expected = f"estimate_memory: {arg} must be an input shape (N, ...) or a list of them"
        if not isinstance(shape, (tuple, list, torch.Size)):
            raise TypeError(f"{expected}, got {type(shape).__name__}")
        several = bool(shape) and not isinstance(shape[0], int)
        if several and not all(isinstance(s, (tuple, list, torch.Size)) for s in shape):
            raise TypeError(f"{expected}, got {shape!r}")
        shapes = [tuple(s) for s in shape] if several else [tuple(shape)]
        if not all(s and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s)
                   for s in shapes):
            raise ValueError(f"{expected} of sizes >= 0, got {shape!r}")
        return cls(shapes, dtype, several)

    @classmethod
    def like(cls, x: Inputs) -> MetaInputs:
        tensors = [x] if isinstance(x, torch.Tensor) else list(x)
        return cls([tuple(t.shape) for t in tensors], tensors[0].dtype,
                   not isinstance(x, torch.Tensor))

    def rows(self, start: int, stop: int) -> Inputs:
        """Rows `start:stop`, freshly allocated (so that a memory count sees them)."""
        stop = min(stop, self.n)
        tensors = [torch.empty((stop - start, *s[1:]), dtype=self.dtype, device='meta')
                   for s in self.shapes]
        return tensors if self.several else tensors[0]
