"""Closed-form kernel maps of elementwise nonlinearities.

Each map takes the covariance `cov12` of two jointly Gaussian pre-activations
`u, v` with variances `var1`, `var2` (all broadcastable tensors) and returns

    nngp   = E[φ(u) φ(v)]          (Neal 1996; Lee et al. 2018, arXiv:1711.00165)
    d_nngp = E[φ'(u) φ'(v)]        (Jacot et al. 2018, arXiv:1806.07572)

`d_nngp` is `None` when `with_derivative` is false. It multiplies the incoming
NTK: `ntk' = d_nngp ⊙ ntk`. The maps are differentiable everywhere, zero
variances included: square roots and angles use `safe_sqrt`/`safe_atan2`,
whose gradients are zero where the exact ones are undefined (neural-tangents
issues #73 and #123).
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor
KernelMap = tuple[Tensor, Tensor | None]


def safe_sqrt(x: Tensor) -> Tensor:
    """`sqrt(max(x, 0))` with gradient 0 (not inf/NaN) where `x <= 0`."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.)


def safe_atan2(y: Tensor, x: Tensor, fill_zero: float) -> Tensor:
    """`atan2(y, x)`, equal to `fill_zero` with gradient 0 at `y = x = 0`."""
    origin = (x == 0) & (y == 0)
    one = torch.ones_like(x)
    angle = torch.atan2(torch.where(origin, one, y), torch.where(origin, one, x))
    return torch.where(origin, fill_zero, angle)


def abrelu(cov12: Tensor, var1: Tensor, var2: Tensor, a: float, b: float,
           with_derivative: bool) -> KernelMap:
    """φ(x) = a·min(x, 0) + b·max(x, 0): the arc-cosine kernel of degree 1.

    With `s = sqrt(var1·var2 − cov12²)` and `θ = atan2(s, cov12)`
    (Cho & Saul 2009):

        nngp   = (a − b)²/(2π) · (s − θ·cov12) + (a² + b²)/2 · cov12
        d_nngp = (a² + b²)/2 − (a − b)²·θ/(2π)

    At zero variances `θ = π/2`, so that φ'(0) = (a + b)/2.
    """
    s = safe_sqrt(var1 * var2 - cov12**2)
    theta = safe_atan2(s, cov12, fill_zero=math.pi / 2)
    nngp = (a - b)**2 / (2 * math.pi) * (s - theta * cov12) + (a**2 + b**2) / 2 * cov12
    d_nngp = (a**2 + b**2) / 2 - (a - b)**2 / (2 * math.pi) * theta if with_derivative else None
    return nngp, d_nngp


def erf(cov12: Tensor, var1: Tensor, var2: Tensor, a: float, b: float, c: float,
        with_derivative: bool) -> KernelMap:
    """φ(x) = a·erf(b·x) + c (Williams 1997, arXiv:1711.00165 App. C):

        nngp   = a²·(2/π)·asin(2b²·cov12 / sqrt((1 + 2b²·var1)(1 + 2b²·var2))) + c²
        d_nngp = a²·(4b²/π) / sqrt((1 + 2b²·var1)(1 + 2b²·var2) − 4b⁴·cov12²)

    The arcsine is evaluated as an `atan2`, which stays in range under rounding.
    """
    b2 = b**2
    prod = (1 + 2 * b2 * var1) * (1 + 2 * b2 * var2)
    # prod − 4b⁴cov12² ≥ 1 + 4b⁴(var1·var2 − cov12²) ≥ 1: a plain sqrt is safe.
    root = torch.sqrt(prod - 4 * (b2 * cov12)**2)
    nngp = a**2 * (2 / math.pi) * torch.atan2(2 * b2 * cov12, root) + c**2
    d_nngp = a**2 * (4 * b2 / math.pi) / root if with_derivative else None
    return nngp, d_nngp
