"""Closed-form kernel maps of elementwise nonlinearities.

Each map takes the covariance `cov12` of two jointly Gaussian pre-activations
`u, v` with variances `var1`, `var2` (all broadcastable tensors) and returns

    nngp   = E[φ(u) φ(v)]          (Neal 1996; Lee et al. 2018, arXiv:1711.00165)
    d_nngp = E[φ'(u) φ'(v)]        (Jacot et al. 2018, arXiv:1806.07572)

`d_nngp` is `None` when `with_derivative` is false. It multiplies the incoming
NTK: `ntk' = d_nngp ⊙ ntk`. By Price's theorem `d_nngp = ∂nngp/∂cov12`.
Hyperparameters (`a`, `b`, …) are floats or scalar tensors.

The maps are differentiable everywhere, zero variances included: square roots
and angles use `safe_sqrt`/`angle`, whose gradients are zero where the
exact ones are undefined (neural-tangents issues #73 and #123).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

Tensor = torch.Tensor
Scalar = float | Tensor
KernelMap = tuple[Tensor, Tensor | None]


class _SafeSqrt(torch.autograd.Function):
    """`sqrt(max(x, 0))` whose derivative is 0 (not inf/NaN) where `x <= 0`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.clamp_min(0).sqrt_()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def _derivative(root: Tensor) -> Tensor:
        positive = root > 0
        return torch.where(positive, 0.5 / torch.where(positive, root, 1.), 0.)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (root,) = ctx.saved_tensors
        return grad * _SafeSqrt._derivative(root)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        (root,) = ctx.saved_tensors
        return tangent * _SafeSqrt._derivative(root)


class _SafeAtan2(torch.autograd.Function):
    """`atan2(y, x)` (0 at the origin) whose gradient is 0, not NaN, at `x = y = 0`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(y: Tensor, x: Tensor) -> Tensor:
        return torch.atan2(y, x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def _partials(y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """`(∂/∂y, ∂/∂x) = (x, −y) / (x² + y²)`, zero at the origin."""
        norm2 = x * x + y * y
        inverse = torch.where(norm2 > 0, 1 / torch.where(norm2 > 0, norm2, 1.), 0.)
        return x * inverse, -y * inverse

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        d_y, d_x = _SafeAtan2._partials(*ctx.saved_tensors)
        return grad * d_y, grad * d_x

    @staticmethod
    def jvp(ctx, tangent_y: Tensor, tangent_x: Tensor) -> Tensor:
        d_y, d_x = _SafeAtan2._partials(*ctx.saved_tensors)
        return tangent_y * d_y + tangent_x * d_x


def safe_sqrt(x: Tensor) -> Tensor:
    """`sqrt(max(x, 0))` with derivative 0 where `x <= 0` (rounding can make
    `var1·var2 − cov12²` slightly negative)."""
    return _SafeSqrt.apply(x)


def safe_atan2(y: Tensor, x: Tensor) -> Tensor:
    """`atan2(y, x)`, 0 with gradient 0 at `x = y = 0`."""
    return _SafeAtan2.apply(y, x)


def _sine(cov12: Tensor, var1: Tensor, var2: Tensor) -> Tensor:
    """`s = sqrt(var1·var2 − cov12²)`, the sine of the angle between the inputs
    times their norms."""
    # Both products rounded alike, so that an example paired with itself gets
    # exactly s = 0 (a fused multiply-add would leave the rounding error of
    # var1·var2, ~1e-8 after the square root, which the NTK of ReLU-like
    # layers amplifies).
    return safe_sqrt(var1 * var2 - cov12 * cov12)


def _angle(cov12: Tensor, var1: Tensor, var2: Tensor) -> tuple[Tensor, Tensor]:
    """`s` and the angle `θ = atan2(s, cov12) = π/2 − atan2(cov12, s) ∈ [0, π]`.

    The second form is `π/2` at `s = cov12 = 0` (zero variances), the limit
    along `cov12 = 0`, so that ReLU-like kernels use φ'(0) = (φ'(0⁻) + φ'(0⁺))/2.
    """
    s = _sine(cov12, var1, var2)
    return s, math.pi / 2 - safe_atan2(cov12, s)


def _like(x: Scalar, other: Tensor) -> Tensor:
    """`x` as a tensor of `other`'s dtype and device (keeping any autograd history)."""
    return torch.as_tensor(x, dtype=other.dtype, device=other.device)


def _cos(x: Scalar) -> Scalar:
    return torch.cos(x) if isinstance(x, Tensor) else math.cos(x)


def abrelu(cov12: Tensor, var1: Tensor, var2: Tensor, a: Scalar, b: Scalar,
           with_derivative: bool) -> KernelMap:
    """φ(x) = a·min(x, 0) + b·max(x, 0): the arc-cosine kernel of degree 1.

    With `s = sqrt(var1·var2 − cov12²)` and `θ = atan2(s, cov12)`
    (Cho & Saul 2009):

        nngp   = (a − b)²/(2π) · (s − θ·cov12) + (a² + b²)/2 · cov12
        d_nngp = (a² + b²)/2 − (a − b)²·θ/(2π)

    At zero variances `θ = π/2`, so that φ'(0) = (a + b)/2.
    """
    # With ψ = atan2(cov12, s) = π/2 − θ and k1 = (a − b)²/(2π):
    # d_nngp = (a² + b²)/2 − k1·π/2 + k1·ψ and nngp = k1·s + cov12·d_nngp.
    s = _sine(cov12, var1, var2)
    psi = safe_atan2(cov12, s)
    k1 = (a - b)**2 / (2 * math.pi)
    d_nngp = torch.addcmul(_like((a**2 + b**2) / 2 - k1 * math.pi / 2, psi), _like(k1, psi), psi)
    nngp = torch.addcmul(k1 * s, cov12, d_nngp)
    return nngp, d_nngp if with_derivative else None


def sign(cov12: Tensor, var1: Tensor, var2: Tensor, with_derivative: bool) -> KernelMap:
    """φ(x) = sign(x), with sign(0) = 0 (Cho & Saul 2009, degree 0):

        nngp   = 1 − 2θ/π,    θ = atan2(sqrt(var1·var2 − cov12²), cov12)
        d_nngp = 0

    φ' is zero almost everywhere, so the NTK is zero (as in neural-tangents).
    A zero variance means `u = 0` almost surely and gives `θ = π/2`, nngp = 0.
    """
    _, theta = _angle(cov12, var1, var2)
    nngp = 1 - 2 / math.pi * theta
    return nngp, torch.zeros_like(nngp) if with_derivative else None


def rectified_monomial(cov12: Tensor, var1: Tensor, var2: Tensor, degree: int,
                       with_derivative: bool) -> KernelMap:
    """φ(x) = [x ≥ 0]·xⁿ: the arc-cosine kernel of degree n (Cho & Saul 2009).

    `K_n = E[φ(u)φ(v)] = (var1·var2)^{n/2} J_n(θ) / (2π)`. Cho & Saul's
    `J_{n+1} = (2n + 1)·cos θ·J_n − sin θ·J_n'` combined with Price's theorem
    `∂K_n/∂cov12 = n²·K_{n−1}` gives, with `s = sqrt(var1·var2 − cov12²)`,

        K_0 = (π − θ)/(2π),   K_1 = cov12·K_0 + s/(2π),
        K_{n+1} = (2n + 1)·cov12·K_n + n²·s²·K_{n−1},
        d_nngp = n²·K_{n−1}   (0 for n = 0),

    polynomials in `cov12`, `s` and `θ` only, so no division by `sqrt(var1·var2)`.
    At zero variances `θ = π/2`; for n = 0 this gives 1/4, not the atom of
    `[0 ≥ 0] = 1` (the values there are finite, and exact for n ≥ 1).
    """
    s, theta = _angle(cov12, var1, var2)
    lower, kernel = None, (math.pi - theta) / (2 * math.pi)
    for n in range(degree):
        rest = s / (2 * math.pi) if n == 0 else n**2 * s**2 * lower
        lower, kernel = kernel, (2 * n + 1) * cov12 * kernel + rest
    if not with_derivative:
        return kernel, None
    return kernel, torch.zeros_like(kernel) if degree == 0 else degree**2 * lower


def erf(cov12: Tensor, var1: Tensor, var2: Tensor, a: Scalar, b: Scalar, c: Scalar,
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


def gelu(cov12: Tensor, var1: Tensor, var2: Tensor, with_derivative: bool) -> KernelMap:
    """φ(x) = x·Φ(x), Φ the standard normal CDF (Tsuchida et al. 2020,
    arXiv:2002.08517). With `P = (1 + var1)(1 + var2)`, `δ = sqrt(P − cov12²)`
    and `α = atan2(cov12, δ) = asin(cov12 / sqrt(P))`:

        nngp   = cov12/4 + (cov12·α + (var1·var2·δ² + cov12²)/(P·δ)) / (2π)
        d_nngp = 1/4 + α/(2π) + cov12·(1 + 1/δ² + (1 − var1·var2)/P) / (2π·δ)

    `δ² ≥ 1 + var1 + var2 ≥ 1`, so a plain sqrt is safe.
    """
    prod = var1 * var2
    prod_plus = (1 + var1) * (1 + var2)
    delta2 = prod_plus - cov12**2
    delta = torch.sqrt(delta2)
    alpha = torch.atan2(cov12, delta)
    spread = (prod * delta2 + cov12**2) / (prod_plus * delta)
    nngp = cov12 / 4 + (cov12 * alpha + spread) / (2 * math.pi)
    if not with_derivative:
        return nngp, None
    slope = 1 + 1 / delta2 + (1 - prod) / prod_plus
    return nngp, 0.25 + (alpha + cov12 * slope / delta) / (2 * math.pi)


def _sinusoid(cov12: Tensor, var1: Tensor, var2: Tensor, half_a2: Scalar, b2: Scalar,
              cos_2c: Scalar, with_derivative: bool) -> KernelMap:
    # See `sin`; `rbf` passes `cos_2c = 0` exactly, which cos(2·fl(π/4)) is not.
    decay = -b2 * (var1 + var2) / 2
    same = torch.exp(decay + b2 * cov12)                 # E[cos(b(u − v))]
    opposite = cos_2c * torch.exp(decay - b2 * cov12)    # E[cos(b(u + v) + 2c)]
    nngp = half_a2 * (same - opposite)
    return nngp, half_a2 * b2 * (same + opposite) if with_derivative else None


def sin(cov12: Tensor, var1: Tensor, var2: Tensor, a: Scalar, b: Scalar, c: Scalar,
        with_derivative: bool) -> KernelMap:
    """φ(x) = a·sin(b·x + c); cos is `c + π/2`. From `2 sin(x) sin(y) = cos(x − y)
    − cos(x + y)` and `E[cos(w + k)] = cos(k)·exp(−Var(w)/2)` for Gaussian `w`,
    with `E± = exp(−b²·(var1 + var2 ± 2cov12)/2)`:

        nngp   = a²/2 · (E₋ − cos(2c)·E₊)
        d_nngp = a²b²/2 · (E₋ + cos(2c)·E₊)
    """
    return _sinusoid(cov12, var1, var2, a**2 / 2, b**2, _cos(2 * c), with_derivative)


def rbf(cov12: Tensor, var1: Tensor, var2: Tensor, gamma: Scalar,
        with_derivative: bool) -> KernelMap:
    """φ(x) = √2·sin(√(2γ)·x + π/4), whose `sin` kernel is the RBF kernel
    (Rahimi & Recht 2007, random Fourier features):

        nngp   = exp(−γ·(var1 + var2 − 2cov12))
        d_nngp = 2γ·nngp
    """
    return _sinusoid(cov12, var1, var2, 1., 2 * gamma, 0., with_derivative)


def gabor(cov12: Tensor, var1: Tensor, var2: Tensor, with_derivative: bool) -> KernelMap:
    """φ(x) = exp(−x²)·sin(x). For `w = (u, v)` of covariance `Σ` and `t = (1, ∓1)`,
    `E[e^{−|w|²} cos(t·w)] = D^{−1/2}·exp(−tᵀΣ(I + 2Σ)⁻¹t / 2)`, so with
    `D = det(I + 2Σ)`, `Δ = 4(var1·var2 − cov12²)`, `σ = var1 + var2` and
    `E± = exp(−(σ + Δ ± 2cov12) / (2D))`:

        nngp   = (E₋ − E₊) / (2√D)
        d_nngp = (E₋·(D + 8cov12² + g) − E₊·(g − D − 8cov12²)) / (2D^{5/2}),
                 g = 4cov12·(D + 1 + σ)

    `D = 1 + 2σ + Δ ≥ 1`, so a plain sqrt is safe.
    """
    total = var1 + var2
    delta = 4 * (var1 * var2 - cov12**2)
    det = 1 + 2 * total + delta
    minus = torch.exp(-(total + delta - 2 * cov12) / (2 * det))
    plus = torch.exp(-(total + delta + 2 * cov12) / (2 * det))
    nngp = (minus - plus) / (2 * torch.sqrt(det))
    if not with_derivative:
        return nngp, None
    shared, slope = det + 8 * cov12**2, 4 * cov12 * (det + 1 + total)
    d_nngp = (minus * (shared + slope) + plus * (shared - slope)) / (2 * det**2.5)
    return nngp, d_nngp


def exp(cov12: Tensor, var1: Tensor, var2: Tensor, a: Scalar, b: Scalar,
        with_derivative: bool) -> KernelMap:
    """φ(x) = a·exp(b·x), the log-normal moment `E[e^{b(u + v)}]`:

        nngp   = a²·exp(b²·((var1 + var2)/2 + cov12))
        d_nngp = b²·nngp
    """
    nngp = a**2 * torch.exp(b**2 * ((var1 + var2) / 2 + cov12))
    return nngp, b**2 * nngp if with_derivative else None


def gaussian(cov12: Tensor, var1: Tensor, var2: Tensor, a: Scalar, b: Scalar,
             with_derivative: bool) -> KernelMap:
    """φ(x) = a·exp(b·x²): `E[e^{b(u² + v²)}] = det(I − 2bΣ)^{−1/2}`, so with
    `det = sqrt((1 − 2b·var1)(1 − 2b·var2) − 4b²·cov12²)`:

        nngp   = a² / det
        d_nngp = 4a²b²·cov12 / det³

    For `b ≤ 0`, `det ≥ 1`; for `b > 0` the expectation diverges (inf) once
    `2b·var ≥ 1`.
    """
    det = safe_sqrt((1 - 2 * b * var1) * (1 - 2 * b * var2) - 4 * b**2 * cov12**2)
    nngp = a**2 / det
    return nngp, 4 * b**2 * cov12 * nngp / det**2 if with_derivative else None


def exp_normalized(cov12: Tensor, var1: Tensor, var2: Tensor, gamma: Scalar, shift: Scalar,
                   do_clip: bool, with_derivative: bool) -> KernelMap:
    """The "Gaussian normalized kernel" (Shankar et al. 2020, arXiv:2003.02237 p. 6),
    a kernel map without an activation. With `r = sqrt(var1·var2)` and
    `ρ = cov12 / r` (clipped to [−1, 1] if `do_clip`):

        nngp   = r·exp(γ·(ρ + shift))
        d_nngp = γ·exp(γ·(ρ + shift))

    `r` is floored at 1e-15 (as in neural-tangents), which keeps zero variances finite.
    """
    norm = torch.sqrt(torch.clamp(var1 * var2, min=1e-30))
    rho = cov12 / norm
    if do_clip:
        rho = torch.clamp(rho, -1., 1.)
    scale = torch.exp(gamma * (rho + shift))
    return norm * scale, gamma * scale if with_derivative else None


def hermite(cov12: Tensor, var1: Tensor, var2: Tensor, degree: int,
            with_derivative: bool) -> KernelMap:
    """φ = Heₙ/√n!, the normalized probabilists' Hermite polynomial, for inputs of
    unit variance (`var1 = var2 = 1`, which is assumed, not checked here):
    `E[Heₙ(u)Heₙ(v)] = n!·cov12ⁿ` (Mehler 1866; O'Donnell 2014, §11.2), so

        nngp   = cov12ⁿ
        d_nngp = n·cov12ⁿ⁻¹   (0 for n = 0)
    """
    nngp = cov12**degree
    if not with_derivative:
        return nngp, None
    return nngp, torch.zeros_like(nngp) if degree == 0 else degree * cov12**(degree - 1)


def polynomial(cov12: Tensor, var1: Tensor, var2: Tensor, coef: Sequence[Scalar],
               with_derivative: bool) -> KernelMap:
    """φ(x) = Σₖ coef[k]·xᵏ, through its Hermite expansion (Mehler; see e.g.
    Han et al. 2022, arXiv:2209.04121):

        nngp   = Σ_l cov12ˡ/l! · m_l(var1)·m_l(var2)
        d_nngp = Σ_{l≥1} cov12ˡ⁻¹/(l − 1)! · m_l(var1)·m_l(var2)

    where `m_l(q) = E[φ⁽ˡ⁾(√q·z)] = Σ_i coef[l + 2i]·(l + 2i)!/(2ⁱ·i!)·qⁱ`
    (Gaussian moments of the l-th derivative). No division by a variance occurs.
    """
    def moment(q: Tensor, l: int) -> Tensor:
        # Horner in q over the coefficients coef[l], coef[l + 2], ….
        terms = range(l, len(coef), 2)
        out = torch.zeros_like(q)
        for k in reversed(terms):
            i = (k - l) // 2
            out = out * q + coef[k] * (math.factorial(k) / (2**i * math.factorial(i)))
        return out

    nngp = torch.zeros_like(cov12)
    d_nngp = torch.zeros_like(cov12) if with_derivative else None
    for l in range(len(coef)):
        weight = moment(var1, l) * moment(var2, l)
        nngp = nngp + cov12**l / math.factorial(l) * weight
        if with_derivative and l > 0:
            d_nngp = d_nngp + cov12**(l - 1) / math.factorial(l - 1) * weight
    return nngp, d_nngp
