"""A run of Conv, pooling and ABRelu layers on full spatial covariances, fused in the extension.

Layer by layer, each Conv and nonlinearity streams the whole `(N1, N2, X, X',
Y, Y')` covariances through memory several times. The extension's
`conv_chain_*` take one pair of examples at a time through the whole run in
cache-sized buffers (csrc/conv_chain.cpp; on the GPU one thread block per
pair, csrc/conv_chain_cuda.cu): first every example with itself
(`chain_self`, which also returns the variances each nonlinearity needs), then
every pair (`chain_pairs`). The steps are

    Conv:   nngp' = α·A(nngp) + β,   ntk' = γ·A(nngp) + α·A(ntk) + δ,
    Pool:   nngp' = c·B(nngp),       ntk' = c·B(ntk),
    ABRelu: the arc-cosine kernel of `a·min(x, 0) + b·max(x, 0)`,

with `A` the unit-variance convolution map (`diagonal_conv` along every
spatial dimension) and `B` the sum over the window's box on both positions of
every spatial pair (`torchntk.functional.conv.pool`). There is no torch version: without the extension, layers
run one at a time (`torchntk.stax` decides, see `torchntk.stax.fusion`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .extension import EXTENSION, takes

Step = list[float]


def available(tensor: torch.Tensor) -> bool:
    """Whether the fused chain can run on `tensor`: where the extension takes
    it (float32/float64, CPU or CUDA as built, not under torch.compile or
    torch.func transforms)."""
    return takes(tensor) and hasattr(EXTENSION, 'conv_chain_pairs')


def conv_step(alpha: float, beta: float, gamma: float, delta: float, circular: bool,
              windows: Sequence[tuple[int, int, int, int]]) -> Step:
    """A Conv step; `windows` holds `(k, stride, pad_low, pad_high)` per spatial dimension."""
    return [0., alpha, beta, gamma, delta, float(circular), float(len(windows)),
            *(float(value) for window in windows for value in window)]


def pool_step(scale: float, circular: bool,
              windows: Sequence[tuple[int, int, int, int]]) -> Step:
    """A pooling step: the box sums times `scale` (`1/Π k²` for averages, 1
    for sums); `windows` as `conv_step`'s."""
    return [2., scale, 0., 0., 0., float(circular), float(len(windows)),
            *(float(value) for window in windows for value in window)]


def abrelu_step(a: float, b: float) -> Step:
    """An ABRelu step, `φ(x) = a·min(x, 0) + b·max(x, 0)`."""
    return [1., float(a), float(b)]


def chain_self(cov: torch.Tensor, steps: Sequence[Step], with_covariance: bool = True
               ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The run on each example's own covariance `(N, X, X', …)`: the output
    covariance and, per ABRelu step, the `(N, X·Y·…)` variances at its input.
    With `with_covariance=False` the covariance may be left out (`None`) where
    the variances alone cost less: then the pairs `(i, i)` of `chain_pairs`
    hold it, bitwise."""
    cov_out, *variances = EXTENSION.conv_chain_self(cov, list(steps), with_covariance)
    return cov_out, variances


def chain_pairs(nngp: torch.Tensor, ntk: torch.Tensor | None, variances1: Sequence[torch.Tensor],
                variances2: Sequence[torch.Tensor], steps: Sequence[Step],
                symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The run on the pairs `(N1, N2, X, X', …)` of `nngp` and `ntk` (broadcast
    to `nngp`'s shape, or `None`), with the variance tables of `chain_self`.
    `symmetric`: the pairs of one batch with itself (x2 = None), where
    `cov[j, i, x', x, …] = cov[i, j, x, x', …]`; on the CPU only the pairs
    `i <= j` are computed, and the others are their transposes."""
    nngp_out, ntk_out = EXTENSION.conv_chain_pairs(nngp, ntk, list(variances1),
                                                    list(variances2), list(steps), symmetric)
    return nngp_out, (None if ntk is None else ntk_out)
