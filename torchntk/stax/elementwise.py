"""Elementwise nonlinearities, all through one mechanism: `Elementwise`.

A nonlinearity φ maps a Gaussian input kernel to (Lee et al. 2018,
arXiv:1711.00165; Jacot et al. 2018, arXiv:1806.07572)

    nngp' = E[φ(u) φ(v)],    ntk' = E[φ'(u) φ'(v)] ⊙ ntk,

with `(u, v)` centred Gaussian of covariance `[[var1, nngp], [nngp, var2]]`.
A new activation is a subclass with `forward` (φ) and `kernel_map`
(a function of `torchntk.functional.elementwise`), or an `Elementwise(fn,
nngp_fn)` instance.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..functional import elementwise as maps
from ..functional.elementwise import KernelMap
from ..kernel import Kernel
from .module import Layer, check_positive_int
from .requirements import Diagonal, Requirements

Tensor = torch.Tensor
NngpFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class Elementwise(Layer):
    """A nonlinearity given by `fn` and the NNGP map `nngp_fn(cov12, var1, var2)`.

    `d_nngp_fn(cov12, var1, var2) = ∂nngp_fn/∂cov12 = E[φ'(u)φ'(v)]` gives the
    NTK; when omitted it is derived from `nngp_fn` by forward-mode autograd.
    """

    requires_gaussian = True

    def __init__(self, fn: Callable[[Tensor], Tensor] | None = None,
                 nngp_fn: NngpFn | None = None, d_nngp_fn: NngpFn | None = None) -> None:
        super().__init__()
        self.fn, self.nngp_fn, self.d_nngp_fn = fn, nngp_fn, d_nngp_fn

    @property
    def requirements(self) -> Requirements:
        return Requirements(diagonal_spatial=Diagonal())

    def forward(self, x: Tensor) -> Tensor:
        if self.fn is None:
            raise ValueError(f"{self._name()}: no fn given, so there is no finite network to apply")
        return self.fn(x)

    def kernel_map(self, cov12: Tensor, var1: Tensor, var2: Tensor,
                   with_derivative: bool) -> KernelMap:
        """`(E[φ(u)φ(v)], E[φ'(u)φ'(v)] or None)` for covariance `cov12`."""
        if self.nngp_fn is None:
            raise ValueError(f"{self._name()}: no nngp_fn given, so there is no kernel")
        if not with_derivative:
            return self.nngp_fn(cov12, var1, var2), None
        if self.d_nngp_fn is not None:
            return self.nngp_fn(cov12, var1, var2), self.d_nngp_fn(cov12, var1, var2)
        var1, var2 = (v.expand_as(cov12) for v in (var1, var2))
        return torch.func.jvp(lambda c: self.nngp_fn(c, var1, var2), (cov12,),
                              (torch.ones_like(cov12),))

    def kernel_rule(self, k: Kernel) -> Kernel:
        var1, var2 = k.variances()
        nngp, d_nngp = self.kernel_map(k.nngp, *k.outer(var1, var2), k.ntk is not None)
        cov1, _ = self.kernel_map(k.cov1, *k.outer_self(var1), False)
        cov2 = None if k.cov2 is None else self.kernel_map(k.cov2, *k.outer_self(var2), False)[0]
        return k.replace(nngp=nngp, ntk=None if k.ntk is None else d_nngp * k.ntk,
                         cov1=cov1, cov2=cov2, is_gaussian=False)


class ABRelu(Elementwise):
    """`φ(x) = a·min(x, 0) + b·max(x, 0)` (`functional.elementwise.abrelu`).

    `do_stabilize=True` rescales the covariances by their largest magnitude
    before the angle computation (the kernel is homogeneous of degree 1), which
    keeps very deep or very wide-`W_std` networks finite.
    """

    def __init__(self, a: float, b: float, do_stabilize: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.do_stabilize = a, b, do_stabilize

    def forward(self, x: Tensor) -> Tensor:
        return self.a * torch.clamp(x, max=0) + self.b * torch.clamp(x, min=0)

    def kernel_map(self, cov12, var1, var2, with_derivative):
        if not self.do_stabilize:
            return maps.abrelu(cov12, var1, var2, self.a, self.b, with_derivative)
        scale = cov12.abs().amax().clamp_min(1e-12)
        nngp, d_nngp = maps.abrelu(cov12 / scale, var1 / scale, var2 / scale, self.a, self.b,
                                   with_derivative)
        return nngp * scale, d_nngp

    def extra_repr(self) -> str:
        return f"a={self.a}, b={self.b}" + (", do_stabilize=True" if self.do_stabilize else "")


class Relu(ABRelu):
    """`φ(x) = max(x, 0)`: arc-cosine kernel of degree 1 (Cho & Saul 2009)."""

    def __init__(self, do_stabilize: bool = False) -> None:
        super().__init__(0., 1., do_stabilize)


class LeakyRelu(ABRelu):
    """`φ(x) = max(x, 0) + alpha·min(x, 0)`."""

    def __init__(self, alpha: float, do_stabilize: bool = False) -> None:
        super().__init__(alpha, 1., do_stabilize)


class Abs(ABRelu):
    """`φ(x) = |x|`."""

    def __init__(self, do_stabilize: bool = False) -> None:
        super().__init__(-1., 1., do_stabilize)


class Erf(Elementwise):
    """`φ(x) = a·erf(b·x) + c` (`functional.elementwise.erf`)."""

    def __init__(self, a: float = 1., b: float = 1., c: float = 0.) -> None:
        super().__init__()
        self.a, self.b, self.c = a, b, c

    def forward(self, x: Tensor) -> Tensor:
        return self.a * torch.special.erf(self.b * x) + self.c

    def kernel_map(self, cov12, var1, var2, with_derivative):
        return maps.erf(cov12, var1, var2, self.a, self.b, self.c, with_derivative)

    def extra_repr(self) -> str:
        return f"a={self.a}, b={self.b}, c={self.c}"


def Sigmoid_like() -> Erf:
    """`φ(x) = erf(x / 2.4020563531719796) / 2 + 1/2`, an Erf fitted to the logistic sigmoid."""
    return Erf(a=0.5, b=1 / 2.4020563531719796, c=0.5)


class ElementwiseNumerical(Elementwise):
    """Any `fn`, its kernels by Gauss–Hermite quadrature with `deg²` points.

    `E[φ(u)φ(v)]` is computed with `u = √var1·z1`, `v = (cov12/√var1)·z1 +
    √(var2 − cov12²/var1)·z2`, `z` standard normal, and the tensor product of
    the `deg`-point Gauss–Hermite rule (exact for polynomials of degree
    `< 2·deg` in each variable). The NTK uses `df`, by default φ' from autograd.
    Accuracy is that of the quadrature: excellent for smooth `fn`, poor for
    kinks (prefer the closed forms for ReLU-like functions).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], deg: int,
                 df: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__(fn)
        check_positive_int(deg, 'deg', self._name())
        self.deg, self.df = deg, df
        nodes, weights = np.polynomial.hermite.hermgauss(deg)
        # Rescale the rule for ∫e^{-x²} to the standard normal density.
        self.register_buffer('nodes', torch.from_numpy(nodes * math.sqrt(2)), persistent=False)
        self.register_buffer('weights', torch.from_numpy(weights / math.sqrt(math.pi)),
                             persistent=False)

    def _derivative(self, x: Tensor) -> Tensor:
        if self.df is not None:
            return self.df(x)
        return torch.func.jvp(self.fn, (x,), (torch.ones_like(x),))[1]

    def kernel_map(self, cov12, var1, var2, with_derivative):
        cov12, var1, var2 = torch.broadcast_tensors(cov12, var1, var2)
        z = self.nodes.to(cov12)
        w = self.weights.to(cov12)
        sd1 = maps.safe_sqrt(var1)
        slope = torch.where(sd1 > 0, cov12 / torch.where(sd1 > 0, sd1, 1.), 0.)
        residual = maps.safe_sqrt(var2 - slope**2)
        u = sd1[..., None] * z                                              # (..., deg)
        v = slope[..., None, None] * z[:, None] + residual[..., None, None] * z  # (..., deg, deg)
        w2 = w[:, None] * w

        def expectation(g: Callable[[Tensor], Tensor]) -> Tensor:
            return torch.einsum('...i,...ij,ij->...', g(u), g(v), w2)

        nngp = expectation(self.fn)
        return nngp, expectation(self._derivative) if with_derivative else None

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__name__', self.fn)}, deg={self.deg}"


class Tanh(ElementwiseNumerical):
    """`φ = tanh`, kernels by `deg`-point Gauss–Hermite quadrature (see `ElementwiseNumerical`)."""

    def __init__(self, deg: int = 25) -> None:
        super().__init__(torch.tanh, deg)


class Sigmoid(ElementwiseNumerical):
    """`φ = 1 / (1 + e^{-x})`, kernels by quadrature (see `ElementwiseNumerical`)."""

    def __init__(self, deg: int = 25) -> None:
        super().__init__(torch.sigmoid, deg)


class Softplus(ElementwiseNumerical):
    """`φ = log(1 + e^x)`, kernels by quadrature (see `ElementwiseNumerical`)."""

    def __init__(self, deg: int = 25) -> None:
        super().__init__(F.softplus, deg)


class SiLU(ElementwiseNumerical):
    """`φ = x·sigmoid(x)`, kernels by quadrature (see `ElementwiseNumerical`)."""

    def __init__(self, deg: int = 25) -> None:
        super().__init__(F.silu, deg)


class Mish(ElementwiseNumerical):
    """`φ = x·tanh(softplus(x))`, kernels by quadrature (see `ElementwiseNumerical`)."""

    def __init__(self, deg: int = 25) -> None:
        super().__init__(F.mish, deg)
