"""Branching: `FanOut` and the fan-in layers `FanInSum`, `FanInProd`, `FanInConcat`.

Fan-in rules assume that the branches are independent given the inputs, as
after independently initialized affine layers (e.g. a residual block
`FanOut(2) → parallel(serial(Relu(), Dense(...)), Identity()) → FanInSum()`).

Masks: a sum or product is masked where every branch is; a concatenation
concatenates the branches' masks (neural-tangents' rules).
"""

from __future__ import annotations

import functools
import operator
from typing import Sequence

import torch

from ..checks import check_int, check_positive_int
from ..functional import conv as conv_maps
from ..kernel import Kernel, Shape
from .module import Layer


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

    def mask_rule(self, mask: torch.Tensor, input_shape: Shape) -> list[torch.Tensor]:
        return [mask] * self.num

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

    def mask_rule(self, masks: Sequence[torch.Tensor | None],
                  input_shapes: Sequence[Shape]) -> torch.Tensor | None:
        """Masked where every branch is (`None`: a branch without a mask)."""
        if any(m is None for m in masks):
            return None
        return functools.reduce(torch.logical_and, masks)


def _require_gaussian(ks: Sequence[Kernel], caller: str) -> None:
    if len(ks) > 1 and not all(k.is_gaussian for k in ks):
        raise ValueError(f"{caller}: every branch must end with an affine layer (Gaussian "
                         f"outputs; a branch that is the network's inputs, such as an Identity "
                         f"skip on them, is not); got is_gaussian={[k.is_gaussian for k in ks]}")


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
    product rule `ntk = Σ_i ntk_i ∏_{j≠i} nngp_j`. The kernel averages over
    channels, `(1/C) Σ_c ∏_i K_i[c]`, which is `∏_i (1/C) Σ_c K_i[c]` only when
    all branches but one have the same `K_i[c]` in every channel
    (`Kernel.iid_channels`): two branches that are the inputs themselves
    (`x ⊙ x`), or come after `Flatten`, are refused.
    """

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        self._check_inputs(xs)
        return functools.reduce(operator.mul, xs)

    def kernel_rule(self, ks: Sequence[Kernel]) -> Kernel:
        ks = self._checked(ks, same_shapes=True)
        iid = [k.iid_channels for k in ks]
        if iid.count(False) > 1:
            raise ValueError(
                "FanInProd: at most one branch may have channels that are not identically "
                "distributed (the network's inputs, or the outputs of Flatten or a channel "
                "FanInConcat, with no affine layer after them): the channel average of the "
                f"product is then not the product of the kernels; got iid_channels={iid}")
        nngp, ntk = ks[0].nngp, ks[0].ntk
        for k in ks[1:]:
            ntk = None if ntk is None else ntk * k.nngp + nngp * k.ntk
            nngp = nngp * k.nngp
        prod = lambda ts: None if ts[0] is None else functools.reduce(operator.mul, ts)
        return ks[0].replace(nngp=nngp, ntk=ntk, cov1=prod([k.cov1 for k in ks]),
                             cov2=prod([k.cov2 for k in ks]),
                             is_gaussian=len(ks) == 1 and ks[0].is_gaussian, iid_channels=all(iid))

    def output_shape(self, input_shapes: Sequence[Shape]) -> Shape:
        return input_shapes[0]


class FanInConcat(_FanIn):
    """Concatenation of the branches along `axis` (PyTorch layout: 0 batch,
    1 channels, 2… spatial; negative axes count from the end).

    Channels (`axis=1`): the kernel is the mean of the branch kernels weighted
    by the branch widths `C_i`, `k = Σ_i C_i·k_i / Σ_i C_i`; the result is not
    Gaussian until the next affine layer.

    A spatial or the batch axis: independent branches are uncorrelated, so
    the kernel along that axis is block-diagonal, the branch kernels on the
    diagonal (concatenated, with `diagonal_spatial`/`diagonal_batch`). Every
    branch must be Gaussian (end with an affine layer): a nonzero mean would
    correlate the blocks. Along the batch axis, examples of different
    branches are independent.

    Shape:
        Inputs `(N, C_i, *S)` (channels) or agreeing in all but `axis`;
        output concatenated along `axis`.
    """

    def __init__(self, axis: int = 1) -> None:
        super().__init__()
        self.axis = check_int(axis, 'axis', 'FanInConcat')

    def _resolved_axis(self, ndim: int) -> int:
        if not -ndim <= self.axis < ndim:
            raise ValueError(f"FanInConcat: axis={self.axis} is out of range for inputs with "
                             f"{ndim} axes")
        return self.axis % ndim

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        self._check_inputs(xs)
        return torch.cat(list(xs), dim=self.axis)

    def kernel_rule(self, ks: Sequence[Kernel]) -> Kernel:
        ks = self._checked(ks, same_shapes=False)
        axis = self._resolved_axis(len(ks[0].shape1))
        for shapes in ([k.shape1 for k in ks], [k.shape2 for k in ks]):
            others = {tuple(s[:axis]) + tuple(s[axis + 1:]) for s in shapes}
            if len({len(s) for s in shapes}) != 1 or len(others) != 1:
                raise ValueError(f"FanInConcat: branches must agree in all but axis {axis}, "
                                 f"got {shapes}")
        shape1 = self.output_shape([k.shape1 for k in ks])
        shape2 = self.output_shape([k.shape2 for k in ks])
        if axis == 1:
            return self._concat_channels(ks).replace(shape1=shape1, shape2=shape2)
        _require_gaussian(ks, 'FanInConcat')
        first = ks[0]

        def concat(tensors: Sequence[torch.Tensor | None], batch_ndim: int,
                   like: Sequence[torch.Tensor]) -> torch.Tensor | None:
            if tensors[0] is None:
                return None
            # The NTK of the inputs is a scalar zero: give it the full shape.
            tensors = [t.expand_as(l) for t, l in zip(tensors, like)]
            return _concat_covariances(tensors, axis, batch_ndim, first.diagonal_spatial)

        nngps = [k.nngp for k in ks]
        return first.replace(
            nngp=concat(nngps, 2, nngps), ntk=concat([k.ntk for k in ks], 2, nngps),
            cov1=concat([k.cov1 for k in ks], first.cov_batch_ndim, [k.cov1 for k in ks]),
            cov2=concat([k.cov2 for k in ks], first.cov_batch_ndim, [k.cov2 for k in ks]),
            x1_is_x2=functools.reduce(torch.logical_and, [k.x1_is_x2 for k in ks]),
            is_gaussian=True, shape1=shape1, shape2=shape2)

    def _concat_channels(self, ks: Sequence[Kernel]) -> Kernel:
        widths = [k.shape1[1] for k in ks]
        total = sum(widths)

        def mean(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
            if tensors[0] is None:
                return None
            return functools.reduce(operator.add, (w * t for w, t in zip(widths, tensors))) / total

        return ks[0].replace(nngp=mean([k.nngp for k in ks]), ntk=mean([k.ntk for k in ks]),
                             cov1=mean([k.cov1 for k in ks]), cov2=mean([k.cov2 for k in ks]),
                             is_gaussian=False, iid_channels=False)

    def output_shape(self, input_shapes: Sequence[Shape]) -> Shape:
        axis = self._resolved_axis(len(input_shapes[0]))
        shape = list(input_shapes[0])
        shape[axis] = sum(s[axis] for s in input_shapes)
        return tuple(shape)

    def mask_rule(self, masks: Sequence[torch.Tensor | None],
                  input_shapes: Sequence[Shape]) -> torch.Tensor:
        """The branches' masks concatenated (`None`: nothing masked in a branch)."""
        axis = self._resolved_axis(len(input_shapes[0]))
        present = [m for m in masks if m is not None]
        # Broadcast every mask to the largest mask shape off `axis`, its branch's size on it.
        common = [max(m.shape[d] for m in present) for d in range(len(input_shapes[0]))]
        full = []
        for mask, shape in zip(masks, input_shapes):
            size = [*common[:axis], shape[axis], *common[axis + 1:]]
            full.append(torch.zeros(size, dtype=torch.bool, device=present[0].device)
                        if mask is None else mask.expand(size))
        return torch.cat(full, dim=axis)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


def _concat_covariances(covs: Sequence[torch.Tensor], axis: int, batch_ndim: int,
                        diagonal_spatial: bool) -> torch.Tensor:
    """Covariance of activations concatenated along activation axis `axis`
    (0 batch, ≥ 2 spatial) from independent, zero-mean branches: the axis
    appears once (concatenate) or as a pair (block-diagonal, zero across
    branches)."""
    if axis == 0:
        paired = batch_ndim == 2
        first = 0
    else:
        paired = not diagonal_spatial
        first = batch_ndim + (axis - 2) * (2 if paired else 1)
    if not paired:
        return torch.cat(list(covs), dim=first)
    second = first + 1
    sizes = [c.shape[second] for c in covs]
    rows = [conv_maps.pad_axis(c, second, sum(sizes[:i]), sum(sizes[i + 1:]))
            for i, c in enumerate(covs)]
    return torch.cat(rows, dim=first)
