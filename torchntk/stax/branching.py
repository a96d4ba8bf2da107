"""Branching: `FanOut` and the fan-in layers `FanInSum`, `FanInProd`, `FanInConcat`.

Fan-in rules assume that the branches are independent given the inputs, as
after independently initialized affine layers (e.g. a residual block
`FanOut(2) → parallel(serial(Relu(), Dense(...)), Identity()) → FanInSum()`).
"""

from __future__ import annotations

import functools
import operator
from typing import Sequence

import torch

from ..kernel import Kernel, Shape
from .module import Layer, check_positive_int


class FanOut(Layer):
    """Copy the input into `num` branches."""

    def __init__(self, num: int) -> None:
        super().__init__()
        check_positive_int(num, 'num', 'FanOut')
        self.num = num

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x] * self.num

    def kernel_rule(self, k: Kernel) -> list[Kernel]:
        return [k] * self.num

    def output_shape(self, input_shape: Shape) -> list[Shape]:
        return [input_shape] * self.num

    def extra_repr(self) -> str:
        return str(self.num)


class _FanIn(Layer):
    """Shared checks of fan-in layers: a list of kernels of matching layouts."""

    def _checked(self, ks: Sequence[Kernel], same_shapes: bool) -> Sequence[Kernel]:
        name = type(self).__name__
        if isinstance(ks, Kernel) or not ks:
            raise ValueError(f"{name}: expected a list of kernels from parallel branches, got {ks!r:.60}")
        first = ks[0]
        for k in ks[1:]:
            if (k.diagonal_batch, k.diagonal_spatial) != (first.diagonal_batch, first.diagonal_spatial):
                raise ValueError(f"{name}: branches have different kernel layouts")
            if same_shapes and (k.shape1 != first.shape1 or k.shape2 != first.shape2):
                raise ValueError(f"{name}: all branches must have the same shape, got "
                                 f"{[k.shape1 for k in ks]}")
        return ks

    def _check_inputs(self, xs: Sequence[torch.Tensor]) -> None:
        if isinstance(xs, torch.Tensor) or not xs:
            raise ValueError(f"{type(self).__name__}: expected a list of tensors from parallel branches")


def _require_gaussian(ks: Sequence[Kernel], layer_name: str) -> None:
    if len(ks) > 1 and not all(k.is_gaussian for k in ks):
        raise ValueError(f"{layer_name}: every branch must end with an affine layer (Gaussian "
                         f"outputs); got is_gaussian={[k.is_gaussian for k in ks]}")


def _sum(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    return None if tensors[0] is None else functools.reduce(operator.add, tensors)


class FanInSum(_FanIn):
    """Sum of the branches: kernels add (independent, zero-mean Gaussian branches)."""

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        self._check_inputs(xs)
        if any(x.shape != xs[0].shape for x in xs):
            raise ValueError(f"FanInSum: all branches must have the same shape, got {[tuple(x.shape) for x in xs]}")
        return functools.reduce(operator.add, xs)

    def kernel_rule(self, ks: Sequence[Kernel]) -> Kernel:
        ks = self._checked(ks, same_shapes=True)
        _require_gaussian(ks, 'FanInSum')
        return ks[0].replace(nngp=_sum([k.nngp for k in ks]), ntk=_sum([k.ntk for k in ks]),
                             cov1=_sum([k.cov1 for k in ks]), cov2=_sum([k.cov2 for k in ks]))

    def output_shape(self, input_shapes: Sequence[Shape]) -> Shape:
        return input_shapes[0]


class FanInProd(_FanIn):
    """Elementwise product of the branches.

    For independent branches `E[∏ f_i(x) ∏ f_i(x')] = ∏ nngp_i`, and by the
    product rule `ntk = Σ_i ntk_i ∏_{j≠i} nngp_j`.
    """

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        self._check_inputs(xs)
        return functools.reduce(operator.mul, xs)

    def kernel_rule(self, ks: Sequence[Kernel]) -> Kernel:
        ks = self._checked(ks, same_shapes=True)
        nngp, ntk = ks[0].nngp, ks[0].ntk
        for k in ks[1:]:
            ntk = None if ntk is None else ntk * k.nngp + nngp * k.ntk
            nngp = nngp * k.nngp
        prod = lambda ts: None if ts[0] is None else functools.reduce(operator.mul, ts)
        return ks[0].replace(nngp=nngp, ntk=ntk, cov1=prod([k.cov1 for k in ks]),
                             cov2=prod([k.cov2 for k in ks]),
                             is_gaussian=len(ks) == 1 and ks[0].is_gaussian)

    def output_shape(self, input_shapes: Sequence[Shape]) -> Shape:
        return input_shapes[0]


class FanInConcat(_FanIn):
    """Concatenation of the branches along `axis` (the channel axis, 1).

    Concatenating channels averages the kernels weighted by the branch widths
    `C_i`: `k = Σ_i C_i·k_i / Σ_i C_i`. The result is not Gaussian until the
    next affine layer.
    """

    def __init__(self, axis: int = 1) -> None:
        super().__init__()
        if axis != 1:
            raise ValueError(f"FanInConcat: only concatenation along the channel axis (axis=1) "
                             f"is supported, got axis={axis}")
        self.axis = axis

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        self._check_inputs(xs)
        return torch.cat(list(xs), dim=self.axis)

    def kernel_rule(self, ks: Sequence[Kernel]) -> Kernel:
        ks = self._checked(ks, same_shapes=False)
        for k in ks:
            if k.shape1[:1] + k.shape1[2:] != ks[0].shape1[:1] + ks[0].shape1[2:]:
                raise ValueError(f"FanInConcat: branches must agree in all but the channel axis, "
                                 f"got {[k.shape1 for k in ks]}")
        widths = [k.shape1[1] for k in ks]
        total = sum(widths)

        def mean(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
            if tensors[0] is None:
                return None
            return functools.reduce(operator.add, (w * t for w, t in zip(widths, tensors))) / total

        return ks[0].replace(nngp=mean([k.nngp for k in ks]), ntk=mean([k.ntk for k in ks]),
                             cov1=mean([k.cov1 for k in ks]), cov2=mean([k.cov2 for k in ks]),
                             is_gaussian=False, shape1=self._concat_shape([k.shape1 for k in ks]),
                             shape2=self._concat_shape([k.shape2 for k in ks]))

    def _concat_shape(self, shapes: Sequence[Shape]) -> Shape:
        return (shapes[0][0], sum(s[1] for s in shapes), *shapes[0][2:])

    def output_shape(self, input_shapes: Sequence[Shape]) -> Shape:
        return self._concat_shape(input_shapes)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"
