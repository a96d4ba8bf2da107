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
from torch import Tensor

Scalar = float | Tensor
# A nonlinearity's rule: E[φ(u)φ(v)] and, when asked, its derivative in cov12.
ValueAndDerivative = tuple[Tensor, Tensor | None]


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


def _power_of_two(exponent: Tensor, dtype: torch.dtype) -> Tensor:
    """`2^exponent` in `dtype`, exactly (its bits; `exponent` integers in the normal range)."""
    info = torch.finfo(dtype)
    mantissa_bits = -int(math.log2(info.eps))
    bias = 2**(info.bits - mantissa_bits - 2) - 1
    bits = {16: torch.int16, 32: torch.int32, 64: torch.int64}[info.bits]
    return ((exponent.to(bits) + bias) << mantissa_bits).view(dtype)


def _root_scales(var: Tensor) -> tuple[Tensor, Tensor]:
    """`(2^k, 2^−k)` with `var·4^−k ∈ [1/2, 2)`: `var = m·2^e`, `m ∈ [1/2, 1)`,
    `k = ⌊e/2⌋` (`k = 0` for 0, inf and NaN). Both are normal numbers for
    every `var` of the dtype, subnormals included."""
    k = torch.frexp(var.detach())[1] >> 1
    return _power_of_two(k, var.dtype), _power_of_two(-k, var.dtype)


def _unit_sine(cov12: Tensor, var1: Tensor, var2: Tensor
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(c, s, up1, up2)` with `cov12 = c·up1·up2` and `sqrt(var1·var2 − cov12²)
    = s·up1·up2`: the covariance and sine at unit scale, `|c|, s ≲ 2`, and the
    powers of two `up = 2^k` of `_root_scales`.

    The products are formed at unit scale, `var1·4^−k1`, `var2·4^−k2` and
    `cov12·2^−(k1+k2)`, where they neither overflow nor underflow for any
    variances of the dtype; powers of two scale exactly, so this is the
    unscaled arithmetic wherever that stays in range.
    """
    up1, down1 = _root_scales(var1)
    up2, down2 = _root_scales(var2)
    c = cov12 * down1 * down2
    # Both products rounded alike, so that an example paired with itself gets
    # exactly s = 0 (a fused multiply-add would leave the rounding error of
    # var1·var2, ~1e-8 after the square root, which the NTK of ReLU-like
    # layers amplifies).
    gap = (var1 * down1 * down1) * (var2 * down2 * down2) - c * c
    return c, safe_sqrt(gap), up1, up2


def _sine(cov12: Tensor, var1: Tensor, var2: Tensor) -> Tensor:
    """`s = sqrt(var1·var2 − cov12²)`, the sine of the angle between the inputs
    times their norms, for every `s` of the dtype (`_unit_sine`)."""
    _, s, up1, up2 = _unit_sine(cov12, var1, var2)
    return s * up1 * up2


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


def _sin(x: Scalar) -> Scalar:
    return torch.sin(x) if isinstance(x, Tensor) else math.sin(x)


def abrelu(cov12: Tensor, var1: Tensor, var2: Tensor, a: Scalar, b: Scalar,
           with_derivative: bool) -> ValueAndDerivative:
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


def sign(cov12: Tensor, var1: Tensor, var2: Tensor, with_derivative: bool) -> ValueAndDerivative:
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
                       with_derivative: bool) -> ValueAndDerivative:
    """φ(x) = [x ≥ 0]·xⁿ: the arc-cosine kernel of degree n (Cho & Saul 2009).

    `K_n = E[φ(u)φ(v)] = (var1·var2)^{n/2} J_n(θ) / (2π)`. Cho & Saul's
    `J_{n+1} = (2n + 1)·cos θ·J_n − sin θ·J_n'` combined with Price's theorem
    `∂K_n/∂cov12 = n²·K_{n−1}` gives, with `s = sqrt(var1·var2 − cov12²)`,

        K_0 = (π − θ)/(2π),   K_1 = cov12·K_0 + s/(2π),
        K_{n+1} = (2n + 1)·cov12·K_n + n²·s²·K_{n−1},
        d_nngp = n²·K_{n−1}   (0 for n = 0),

    polynomials in `cov12`, `s` and `θ` only, so no division by `sqrt(var1·var2)`.
    They run at unit scale (`_unit_sine`), `K_n` then multiplied by `(up1·up2)ⁿ`
    one factor at a time, so that nothing overflows before the kernel does.
    At zero variances `θ = π/2`; for n = 0 this gives 1/4, not the atom of
    `[0 ≥ 0] = 1` (the values there are finite, and exact for n ≥ 1).
    """
    c, s, up1, up2 = _unit_sine(cov12, var1, var2)
    theta = math.pi / 2 - safe_atan2(c, s)
    lower, kernel = None, (math.pi - theta) / (2 * math.pi)
    for n in range(degree):
        rest = s / (2 * math.pi) if n == 0 else n**2 * s**2 * lower
        lower, kernel = kernel, (2 * n + 1) * c * kernel + rest

    def unscaled(k: Tensor, n: int) -> Tensor:
        for _ in range(n):
            k = k * up1 * up2
        return k

    if not with_derivative:
        return unscaled(kernel, degree), None
    d_nngp = torch.zeros_like(kernel) if degree == 0 else degree**2 * unscaled(lower, degree - 1)
    return unscaled(kernel, degree), d_nngp


def erf(cov12: Tensor, var1: Tensor, var2: Tensor, a: Scalar, b: Scalar, c: Scalar,
        with_derivative: bool) -> ValueAndDerivative:
    """φ(x) = a·erf(b·x) + c (Williams 1997, arXiv:1711.00165 App. C):

        nngp   = a²·(2/π)·asin(2b²·cov12 / sqrt((1 + 2b²·var1)(1 + 2b²·var2))) + c²
        d_nngp = a²·(4b²/π) / root,   root = sqrt((1 + 2b²·var1)(1 + 2b²·var2) − 4b⁴·cov12²)

    `root² = 1 + 2b²·(var1 + var2) + (2b²·s)²` with `s = sqrt(var1·var2 − cov12²)`
    is a sum of non-negative terms (the product form cancels once `b²·var ≫ 1`),
    taken as a `hypot` so that no square overflows; the arcsine is the
    `atan2(2b²·cov12, root)`.
    """
    b2 = b**2
    root = torch.hypot(torch.sqrt(1 + 2 * b2 * (var1 + var2)), 2 * b2 * _sine(cov12, var1, var2))
    nngp = a**2 * (2 / math.pi) * torch.atan2(2 * b2 * cov12, root) + c**2
    d_nngp = a**2 * (4 * b2 / math.pi) / root if with_derivative else None
    return nngp, d_nngp


def gelu(cov12: Tensor, var1: Tensor, var2: Tensor, with_derivative: bool) -> ValueAndDerivative:
    """φ(x) = x·Φ(x), Φ the standard normal CDF (Tsuchida et al. 2020,
    arXiv:2002.08517). With `P = (1 + var1)(1 + var2)`, `δ = sqrt(P − cov12²)`
    and `α = atan2(cov12, δ) = asin(cov12 / sqrt(P))`:

        nngp   = cov12/4 + (cov12·α + (var1·var2·δ² + cov12²)/(P·δ)) / (2π)
        d_nngp = 1/4 + α/(2π) + cov12·(1 + 1/δ² + (1 − var1·var2)/P) / (2π·δ)

    Evaluated without cancellation or overflow at any scale, with
    `pᵢ = 1/(1 + varᵢ)`, `s = sqrt(var1·var2 − cov12²)` and
    `β = π/2 + α = atan2(δ, −cov12)`:

        δ      = hypot(sqrt(1 + var1 + var2), s)
        nngp   = (cov12·β + var1·p1·var2·p2·δ + (cov12·sqrt(p1)·sqrt(p2))²/δ) / (2π)
        d_nngp = (β + cov12/δ·(1/δ² + p1 + p2)) / (2π)
    """
    s = _sine(cov12, var1, var2)
    delta = torch.hypot(torch.sqrt(1 + var1 + var2), s)
    beta = torch.atan2(delta, -cov12)
    p1, p2 = 1 / (1 + var1), 1 / (1 + var2)
    normalized = cov12 * torch.sqrt(p1) * torch.sqrt(p2)      # cov12 / sqrt(P)
    spread = (var1 * p1) * (var2 * p2) * delta + normalized * normalized / delta
    nngp = (cov12 * beta + spread) / (2 * math.pi)
    if not with_derivative:
        return nngp, None
    slope = 1 / (delta * delta) + p1 + p2
    return nngp, (beta + cov12 / delta * slope) / (2 * math.pi)


def _sinusoid(cov12: Tensor, var1: Tensor, var2: Tensor, half_a2: Scalar, b2: Scalar,
              sin2_c: Scalar, cos2_c: Scalar, with_derivative: bool) -> ValueAndDerivative:
    # See `sin`. Var(u ∓ v) = (var1 ∓ cov12) + (var2 ∓ cov12): exact differences
    # where cov12 is near var1, var2 (not the cancellation of b²·(var1 + var2)/2
    # − b²·cov12). E₋ − E₊ is E₋·(1 − e^{−2b²cov12}) through expm1 (for cov12 < 0
    # the mirror image), so small covariances keep their digits.
    same = torch.exp(-b2 / 2 * ((var1 - cov12) + (var2 - cov12)))        # E₋ = E[cos(b(u − v))]
    opposite = torch.exp(-b2 / 2 * ((var1 + cov12) + (var2 + cov12)))   # E₊
    positive = cov12.clamp_min(0)
    # `cov12 − positive` rather than a second clamp: one of the two carries the
    # gradient at cov12 = 0, not both.
    difference = (same * -torch.expm1(-2 * b2 * positive)
                  + opposite * torch.expm1(2 * b2 * (cov12 - positive)))
    nngp = half_a2 * (difference + 2 * sin2_c * opposite)
    return nngp, half_a2 * b2 * (difference + 2 * cos2_c * opposite) if with_derivative else None


def sin(cov12: Tensor, var1: Tensor, var2: Tensor, a: Scalar, b: Scalar, c: Scalar,
        with_derivative: bool) -> ValueAndDerivative:
    """φ(x) = a·sin(b·x + c); cos is `c + π/2`. From `2 sin(x) sin(y) = cos(x − y)
    − cos(x + y)` and `E[cos(w + k)] = cos(k)·exp(−Var(w)/2)` for Gaussian `w`,
    with `E± = exp(−b²·(var1 + var2 ± 2cov12)/2)`:

        nngp   = a²/2 · (E₋ − cos(2c)·E₊) = a²/2 · (E₋ − E₊ + 2sin²c·E₊)
        d_nngp = a²b²/2 · (E₋ + cos(2c)·E₊) = a²b²/2 · (E₋ − E₊ + 2cos²c·E₊)

    The second forms keep small inputs accurate: `E₋ − E₊` is formed without
    cancellation, and `1 ∓ cos(2c)` is never a difference.
    """
    return _sinusoid(cov12, var1, var2, a**2 / 2, b**2, _sin(c)**2, _cos(c)**2, with_derivative)


def rbf(cov12: Tensor, var1: Tensor, var2: Tensor, gamma: Scalar,
        with_derivative: bool) -> ValueAndDerivative:
    """φ(x) = √2·sin(√(2γ)·x + π/4), whose `sin` kernel is the RBF kernel
    (Rahimi & Recht 2007, random Fourier features):

        nngp   = exp(−γ·(var1 + var2 − 2cov12))
        d_nngp = 2γ·nngp
    """
    return _sinusoid(cov12, var1, var2, 1., 2 * gamma, .5, .5, with_derivative)


def gabor(cov12: Tensor, var1: Tensor, var2: Tensor, with_derivative: bool) -> ValueAndDerivative:
    """φ(x) = exp(−x²)·sin(x). For `w = (u, v)` of covariance `Σ` and `t = (1, ∓1)`,
    `E[e^{−|w|²} cos(t·w)] = D^{−1/2}·exp(−tᵀΣ(I + 2Σ)⁻¹t / 2)`, so with
    `D = det(I + 2Σ)`, `Δ = 4(var1·var2 − cov12²)`, `σ = var1 + var2` and
    `E± = exp(−(σ + Δ ± 2cov12) / (2D))`:

        nngp   = (E₋ − E₊) / (2√D)
        d_nngp = (E₋·(D + 8cov12² + g) − E₊·(g − D − 8cov12²)) / (2D^{5/2}),
                 g = 4cov12·(D + 1 + σ)

    Evaluated as `E± = e^{−h}·e^{∓t}` with `h = (σ + Δ)/(2D)` and `t = cov12/D`
    (so `E₋ − E₊ = 2e^{−h}·sinh t`, no cancellation), and `√D = hypot(sqrt(1 + 2σ),
    2s)`, `s = sqrt(var1·var2 − cov12²)`, dividing by `√D` one factor at a
    time, so that nothing overflows before the kernel does:

        nngp   = e^{−h}·sinh(t) / √D
        d_nngp = e^{−h}·(cosh(t)·(1 + 8cov12·t) + sinh(t)·4cov12·(1 + (1 + σ)/D)) / D^{3/2}
    """
    total = var1 + var2
    s = _sine(cov12, var1, var2)
    root = torch.hypot(torch.sqrt(1 + 2 * total), 2 * s)                 # √D ≥ 1
    t = cov12 / root / root
    decay = torch.exp(-(total / root + 4 * s * (s / root)) / (2 * root))  # e^{−h}
    nngp = decay * torch.sinh(t) / root
    if not with_derivative:
        return nngp, None
    shared = torch.cosh(t) * (1 + 8 * cov12 * t)
    slope = torch.sinh(t) * 4 * cov12 * (1 + (1 + total) / root / root)
    return nngp, decay * ((shared + slope) / root / root / root)


def exp(cov12: Tensor, var1: Tensor, var2: Tensor, a: Scalar, b: Scalar,
        with_derivative: bool) -> ValueAndDerivative:
    """φ(x) = a·exp(b·x), the log-normal moment `E[e^{b(u + v)}]`:

        nngp   = a²·exp(b²·((var1 + var2)/2 + cov12))
        d_nngp = b²·nngp
    """
    nngp = a**2 * torch.exp(b**2 * ((var1 + var2) / 2 + cov12))
    return nngp, b**2 * nngp if with_derivative else None


def gaussian(cov12: Tensor, var1: Tensor, var2: Tensor, a: Scalar, b: Scalar,
             with_derivative: bool) -> ValueAndDerivative:
    """φ(x) = a·exp(b·x²): `E[e^{b(u² + v²)}] = det(I − 2bΣ)^{−1/2}`, so with
    `det = sqrt((1 − 2b·var1)(1 − 2b·var2) − 4b²·cov12²)`:

        nngp   = a² / det
        d_nngp = 4a²b²·cov12 / det³

    where `I − 2bΣ` is positive definite (always for `b ≤ 0`); elsewhere the
    expectation diverges and both are inf. `det² = q + (2b·s)²` with
    `q = 1 − 2b·(var1 + var2)` and `s = sqrt(var1·var2 − cov12²)`, without the
    cancellation of the product form: `hypot(√q, 2b·s)` for `q > 0`, and
    `(2b·s − √−q)(2b·s + √−q)` for `q ≤ 0` (only `b > 0`, small variances).
    """
    q = 1 - 2 * b * (var1 + var2)
    t = 2 * b * _sine(cov12, var1, var2)
    positive = q > 0
    root_negative = safe_sqrt(-q)
    det = torch.where(positive, torch.hypot(safe_sqrt(torch.where(positive, q, 1.)), t),
                      safe_sqrt((t - root_negative) * (t + root_negative)))
    # Sylvester: positive definite iff 1 − 2b·var1 > 0 and det² > 0 (det = 0 gives inf).
    converges = 2 * b * var1 < 1
    nngp = torch.where(converges, a**2 / det, math.inf)
    if not with_derivative:
        return nngp, None
    return nngp, torch.where(converges, 4 * b**2 * cov12 / det / det * nngp, math.inf)


def exp_normalized(cov12: Tensor, var1: Tensor, var2: Tensor, gamma: Scalar, shift: Scalar,
                   do_clip: bool, with_derivative: bool) -> ValueAndDerivative:
    """The "Gaussian normalized kernel" (Shankar et al. 2020, arXiv:2003.02237 p. 6),
    a kernel map without an activation. With `r = sqrt(var1·var2)` and
    `ρ = cov12 / r` (clipped to [−1, 1] if `do_clip`):

        nngp   = r·exp(γ·(ρ + shift))
        d_nngp = γ·exp(γ·(ρ + shift))

    `r` is floored at 1e-15 (as in neural-tangents), which keeps zero variances
    finite; it is `sqrt(var1)·sqrt(var2)`, which does not overflow as `var1·var2` would.
    """
    norm = (safe_sqrt(var1) * safe_sqrt(var2)).clamp_min(1e-15)
    rho = cov12 / norm
    if do_clip:
        rho = torch.clamp(rho, -1., 1.)
    scale = torch.exp(gamma * (rho + shift))
    return norm * scale, gamma * scale if with_derivative else None


def hermite(cov12: Tensor, var1: Tensor, var2: Tensor, degree: int,
            with_derivative: bool) -> ValueAndDerivative:
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
               with_derivative: bool) -> ValueAndDerivative:
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
