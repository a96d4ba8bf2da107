"""Kernel layout of the predictors: zipped kernels as matrices, and where the output axes go.

A kernel of targets `y (N, *O)` has every output axis not in `trace_axes` twice,
zipped (`(N1, N2, O, O')`), and none of the traced ones (it is `Θ ⊗ I` along
them). The predictors solve with the matrix `(N·O, N'·O')` of the kept axes and
carry the traced axes as columns of the right-hand side.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..checks import check_axes


def kernel_matrix(kernel: torch.Tensor) -> torch.Tensor:
    """Zipped `(A1, A1', B1, B1', …)` -> matrix `(A1·B1·…, A1'·B1'·…)`."""
    rows, cols = kernel.shape[::2], kernel.shape[1::2]
    order = list(range(0, kernel.ndim, 2)) + list(range(1, kernel.ndim, 2))
    return kernel.permute(order).reshape(math.prod(rows), math.prod(cols))


def zipped_kernel(matrix: torch.Tensor, kept: tuple[int, ...]) -> torch.Tensor:
    """Covariance `(*lead, D, D)` -> zipped `(*lead, A, A', B, B', …)` with `kept = (A, B, …)`."""
    lead = matrix.shape[:-2]
    split = matrix.reshape(*lead, *kept, *kept)
    order = list(range(len(lead)))
    for axis in range(len(kept)):
        order += [len(lead) + axis, len(lead) + len(kept) + axis]
    return split.permute(order)


def symmetrized(matrix: torch.Tensor) -> torch.Tensor:
    """Remove the round-off asymmetry of a covariance."""
    return 0.5 * (matrix + matrix.mT)


class OutputAxes:
    """Where the output axes of `y (N, *O)` go: kept axes index kernel rows, traced ones columns."""

    def __init__(self, y_shape: Sequence[int], trace_axes: Sequence[int], caller: str):
        self.ndim, self.caller, self.y_shape = len(y_shape), caller, tuple(y_shape)
        trace_axes = check_axes(trace_axes, 'trace_axes', caller)
        trace = set()
        for axis in trace_axes:
            if not -self.ndim <= axis < self.ndim:
                raise ValueError(f"{caller}: trace_axes must be axes of y_train (ndim "
                                 f"{self.ndim}), got {tuple(trace_axes)}")
            trace.add(axis % self.ndim)
        self.trace = tuple(sorted(trace))
        self.kept = tuple(a for a in range(self.ndim) if a not in trace)
        self.trace_shape = tuple(y_shape[a] for a in self.trace)
        self.kept_shape = tuple(y_shape[a] for a in self.kept)

    def outputs_shape(self, kept_shape: Sequence[int]) -> tuple[int, ...]:
        """The shape `(M, *O)` of outputs whose kept axes have sizes `kept_shape`."""
        shape = dict(zip(self.kept, kept_shape)) | dict(zip(self.trace, self.trace_shape))
        return tuple(shape[a] for a in range(self.ndim))

    def to_matrix(self, f: torch.Tensor) -> torch.Tensor:
        """`(N, *O)` -> `(kept size, traced size)`."""
        return f.permute(self.kept + self.trace).reshape(-1, math.prod(self.trace_shape))

    def from_matrix(self, matrix: torch.Tensor, kept_shape: Sequence[int],
                    lead: Sequence[int] = ()) -> torch.Tensor:
        """`(*lead, kept size, traced size)` -> `(*lead, N, *O)`."""
        split = matrix.reshape(*lead, *kept_shape, *self.trace_shape)
        n_lead = split.ndim - self.ndim
        inverse = [0] * self.ndim
        for position, axis in enumerate(self.kept + self.trace):
            inverse[axis] = position
        return split.permute(*range(n_lead), *(n_lead + p for p in inverse))

    def check_kernel(self, kernel: torch.Tensor, arg: str, rows: Sequence[int],
                     cols: Sequence[int]) -> None:
        """Refuse a kernel whose shape is not `rows` and `cols` zipped."""
        expected = tuple(size for pair in zip(rows, cols) for size in pair)
        if tuple(kernel.shape) != expected:
            raise ValueError(
                f"{self.caller}: {arg} must have shape {expected} (the axes of y_train, of shape "
                f"{self.y_shape}, not in trace_axes={self.trace}, each twice, zipped), got "
                f"{tuple(kernel.shape)}")
