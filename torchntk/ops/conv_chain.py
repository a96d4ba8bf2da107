"""A run of affine, pooling and ABRelu layers on full spatial covariances, fused in the extension.

Layer by layer, each Conv and nonlinearity streams the whole `(N1, N2, X, X',
Y, Y')` covariances through memory several times. The extension's
`conv_chain_*` take one pair of examples at a time through the whole run in
cache-sized buffers (csrc/conv_chain.cpp; on the GPU one thread block per
pair, csrc/conv_chain_cuda.cu): first every example with itself
(`chain_self`, which also returns the variances each nonlinearity needs), then
every pair (`chain_pairs`). Each layer of the run describes its own step
(`torchntk.stax.Layer.chain_step`) as one of the records below, which the
extension reads field by field, its `kind` naming the arithmetic
(csrc/conv_chain.cpp, `read_steps`):

    AffineStep:  nngp' = W_var·A(nngp) + b_var,  ntk' = gamma·A(nngp) + W_var·A(ntk) + delta,
    PoolStep:    nngp' = scale·B(nngp),           ntk' = scale·B(ntk),
    ABReluStep:  the arc-cosine kernel of `a·min(x, 0) + b·max(x, 0)`,

with `A` the unit-variance convolution map (`diagonal_conv` along every
spatial dimension) and `B` the sum over the window's box on both positions of
every spatial pair (`torchntk.functional.conv.pool`). There is no torch
version: without the extension, layers run one at a time (`torchntk.stax`
decides, see `torchntk.stax.fusion`); the records import without it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence, Union

import torch

from .extension import EXTENSION, takes


@dataclasses.dataclass(frozen=True)
class Window:
    """A window along one spatial dimension: `size` adjacent taps, windows
    `stride` apart, on the axis padded by `pad_low` and `pad_high` positions
    (the layer's padding, `torchntk.functional.conv.conv_padding`)."""

    size: int
    stride: int
    pad_low: int
    pad_high: int


@dataclasses.dataclass(frozen=True)
class AffineStep:
    """A shared-weight convolution (`Dense`: windows of 1, or none on flat
    kernels), with `(gamma, delta)` the NTK coefficients of its
    parameterization; `circular`: periodic padding."""

    kind: ClassVar[str] = 'affine'

    W_var: float
    b_var: float
    gamma: float
    delta: float
    circular: bool
    windows: tuple[Window, ...]

    @staticmethod
    def output_is_gaussian(input_is_gaussian: bool) -> bool:
        return True

    @staticmethod
    def output_iid_channels(input_iid_channels: bool) -> bool:
        return True   # i.i.d. weights over every input channel


@dataclasses.dataclass(frozen=True)
class PoolStep:
    """Box sums over `windows` times `scale` (`1/Π k²` for averages, 1 for sums)."""

    kind: ClassVar[str] = 'pool'

    scale: float
    circular: bool
    windows: tuple[Window, ...]

    @staticmethod
    def output_is_gaussian(input_is_gaussian: bool) -> bool:
        return input_is_gaussian   # a linear map of a Gaussian

    @staticmethod
    def output_iid_channels(input_iid_channels: bool) -> bool:
        return input_iid_channels


@dataclasses.dataclass(frozen=True)
class ABReluStep:
    """`φ(x) = a·min(x, 0) + b·max(x, 0)` (Cho & Saul 2009), on Gaussian
    inputs (an affine step before it, possibly through pooling)."""

    kind: ClassVar[str] = 'abrelu'

    a: float
    b: float

    @staticmethod
    def output_is_gaussian(input_is_gaussian: bool) -> bool:
        return False

    @staticmethod
    def output_iid_channels(input_iid_channels: bool) -> bool:
        return input_iid_channels


ChainStep = Union[AffineStep, PoolStep, ABReluStep]


def available(tensor: torch.Tensor) -> bool:
    """Whether the fused chain can run on `tensor`: where the extension takes
    it (float32/float64, CPU or CUDA as built, not under torch.compile or
    torch.func transforms)."""
    return takes(tensor) and hasattr(EXTENSION, 'conv_chain_pairs')


def needs_gradient(*values: object) -> bool:
    """Whether autograd is to go through any of `values` (tensors that require
    grad, in grad mode): the chain has no backward, the layers' rules have."""
    return torch.is_grad_enabled() and any(
        isinstance(value, torch.Tensor) and value.requires_grad for value in values)


def chain_self(cov: torch.Tensor, steps: Sequence[ChainStep], with_covariance: bool = True
               ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The run on each example's own covariance `(N, X, X', …)`: the output
    covariance and, per ABRelu step, the `(N, X·Y·…)` variances at its input.
    With `with_covariance=False` the covariance may be left out (`None`) where
    the variances alone cost less: then the pairs `(i, i)` of `chain_pairs`
    hold it, bitwise."""
    cov_out, *variances = EXTENSION.conv_chain_self(cov, list(steps), with_covariance)
    return cov_out, variances


def chain_pairs(nngp: torch.Tensor, ntk: torch.Tensor | None, variances1: Sequence[torch.Tensor],
                variances2: Sequence[torch.Tensor], steps: Sequence[ChainStep],
                symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The run on the pairs `(N1, N2, X, X', …)` of `nngp` and `ntk` (broadcast
    to `nngp`'s shape, or `None`), with the variance tables of `chain_self`.
    `symmetric`: the pairs of one batch with itself (x2 = None), where
    `cov[j, i, x', x, …] = cov[i, j, x, x', …]`; on the CPU only the pairs
    `i <= j` are computed, and the others are their transposes."""
    nngp_out, ntk_out = EXTENSION.conv_chain_pairs(nngp, ntk, list(variances1),
                                                    list(variances2), list(steps), symmetric)
    return nngp_out, (None if ntk is None else ntk_out)
