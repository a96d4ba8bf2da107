"""Mean-field analysis of a block over a grid of weight and bias variances: the
fixed points `q*`, `c*` of its kernel map and the slopes `χ_q`, `χ₁`, `χ_c` there
(see `torchntk.signal`)."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..checks import check_flag, check_positive, check_positive_int, check_real_tensor
from ..stax.module import Layer
from .block_map import BlockKernelMap
from .newton import (autograd_jacobian, implicit_step, newton_fixed_points, sparse_jacobian,
                     spectral_radius)


class Status(enum.IntEnum):
    """Per grid point: what the variance map does.

    FINITE: a stable finite fixed point `q*` was found (possibly `q* = 0`).
    DIVERGES: the variances grow without bound (e.g. ReLU with `σ_w² > 2`,
        `Exp` with large weights); `q*` is NaN.
    NOT_CONVERGED: no stable fixed point within `max_iter` Newton steps (an
        oscillating or repelling map); the quantities that did not converge are NaN.
    """

    FINITE = 0
    DIVERGES = 1
    NOT_CONVERGED = 2


@dataclasses.dataclass(frozen=True)
class FixedPoints:
    """Fixed points and slopes of a block's kernel map over a `(W_var, b_var)` grid.

    The grid has shape `grid = W_var.shape + b_var.shape` (the outer product of
    the two sweeps); `state` is `()` for fully connected blocks, the spatial
    shape `(X, Y, …)` for convolutional blocks analysed on same-position
    covariances, and `(X, X', Y, Y', …)` for blocks that need covariances
    between positions (`diagonal_spatial=False`).

    Attributes:
        W_var, b_var: the swept weight and bias variances, as given.
        q_star: `(*grid, *state)`, the fixed-point variance of the kernel the
            block takes and returns, per position; NaN where there is none.
        c_star: `(*grid, *state)`, the stable fixed-point correlation of two
            inputs, per position (`q12*/sqrt(q*_x q*_x')`): 1 in the ordered
            phase. Where `q*` is 0 or infinite it is that of the normalized
            (projective) map if the block is positively homogeneous there (ReLU
            without bias, or at infinite variance), else NaN (e.g. Erf without
            bias in the ordered phase, where the signal itself vanishes).
        chi_q: `(*grid)`, spectral radius of `∂V/∂q` at `q*` (the growth factor
            of the variance for homogeneous maps without finite `q*`). With
            `diagonal_spatial=False` it covers the covariances between
            positions too, so it includes their decorrelation with depth.
        chi_1: `(*grid)`, spectral radius of `∂F/∂q12` at `q12 = q*`: the
            order (`< 1`) to chaos (`> 1`) parameter, the factor by which
            gradients grow per block; `σ_w²/2` for ReLU, finite even where `q*`
            is not. At `q* = 0` it is the limit `q* → 0⁺`.
        chi_c: `(*grid)`, spectral radius of the correlation map's slope at `c*`.
        status: `(*grid)` int8 `Status` codes.
        diagonal_spatial: whether the state holds same-position covariances only.
    """

    W_var: torch.Tensor
    b_var: torch.Tensor
    q_star: torch.Tensor
    c_star: torch.Tensor
    chi_q: torch.Tensor
    chi_1: torch.Tensor
    chi_c: torch.Tensor
    status: torch.Tensor
    diagonal_spatial: bool

    @property
    def depth_scale(self) -> torch.Tensor:
        """`ξ_c = −1/log χ_c`, the depth over which input correlations are
        forgotten (inf where `χ_c ≥ 1`, i.e. on the critical line)."""
        return _depth_scale(self.chi_c)

    @property
    def depth_scale_q(self) -> torch.Tensor:
        """`ξ_q = −1/log χ_q`, the depth over which the variance reaches `q*`
        (NaN where there is no finite `q*`)."""
        return torch.where(self.status == Status.FINITE, _depth_scale(self.chi_q), math.nan)

    @property
    def q_diverges(self) -> torch.Tensor:
        """`(*grid)` bool: no finite `q*`, the variances grow without bound."""
        return self.status == Status.DIVERGES

    @property
    def ordered(self) -> torch.Tensor:
        """`(*grid)` bool: `χ₁ < 1`, perturbations of the inputs shrink."""
        return self.chi_1 < 1

    def critical_line(self) -> torch.Tensor:
        """`σ_w²` of the critical line `χ₁ = 1` for each `b_var`: where `χ₁`
        first crosses 1 along the 1-D `W_var` sweep, interpolated linearly
        between grid points (NaN where it does not cross inside the grid).

        Shape: `b_var.shape`.
        """
        if self.W_var.ndim != 1 or len(self.W_var) < 2:
            raise ValueError(f"critical_line: needs a 1-D W_var sweep of at least 2 values, got "
                             f"shape {tuple(self.W_var.shape)}")
        W = self.W_var.detach()
        chi = self.chi_1.detach().reshape(len(W), -1)
        crosses = (chi[:-1] < 1) & (chi[1:] >= 1)
        first = crosses.to(torch.int8).argmax(0)
        columns = torch.arange(chi.shape[1], device=chi.device)
        chi_low, chi_high = chi[first, columns], chi[first + 1, columns]
        W_low, W_high = W[first], W[first + 1]
        line = W_low + (1 - chi_low) * (W_high - W_low) / (chi_high - chi_low)
        return torch.where(crosses.any(0), line, math.nan).reshape(self.b_var.shape)


def _depth_scale(chi: torch.Tensor) -> torch.Tensor:
    below = chi < 1
    safe = torch.where(below, chi, 0.5)  # keeps the unused branch's gradient finite
    return torch.where(below, -1 / torch.log(safe), torch.where(chi >= 1, math.inf, math.nan))


def fixed_points(block: Layer, W_var: float | torch.Tensor, b_var: float | torch.Tensor, *,
                 spatial_shape: Sequence[int] | None = None,
                 diagonal_spatial: bool | None = None, q0: float = 1.,
                 max_iter: int = 100, chunk_size: int | None = None,
                 progress: bool = True) -> FixedPoints:
    """Fixed points `q*`, `c*`, slopes `χ_q`, `χ₁`, `χ_c` of `block`'s kernel map
    for every `(W_var, b_var)` of a grid, in one vectorised computation.

    Every affine layer of `block` (`Dense`, `Conv`, …) gets `W_std² = W_var`
    and `b_std² = b_var`; the block itself is not modified. The block must map
    a kernel to a kernel of the same kind (same spatial shape): `q` and `c` are
    those of the kernel it takes and returns, so for `serial(Dense, φ)` they
    are post-activation quantities and for `serial(φ, Dense)` the
    pre-activation ones of Schoenholz et al.; the slopes, depth scales and
    critical line are the same for both.

    Convolutional blocks are analysed on `spatial_shape` images. When the
    block allows it (no pooling inside), the state is the same-position
    covariances, which a shared-weight convolution maps on their own (Xiao et
    al. 2018): `q[x]` is the variance at position `x` and `c[x]` the
    correlation of the two inputs at `x`. Otherwise (`diagonal_spatial=False`)
    it is the full covariance `q[x, x']` of one input and `c[x, x'] =
    q12[x, x'] / sqrt(q[x, x]·q[x', x'])`; its Jacobians have `(X·Y)²` rows,
    so keep such images small. The iteration starts from the white,
    spatially uniform input kernel `q = q0` (zero between positions).

    Where `q*` is 0 or infinite but the block is positively homogeneous
    (ReLU-like nonlinearities, biases negligible), the correlation map does not
    depend on the scale of `q`: `c*`, `χ₁` and `χ_c` are those of the map
    normalized by its growth factor `χ_q`. So ReLU's `χ₁ = σ_w²/2` marks its
    ordered/chaotic boundary at `σ_w² = 2`, beyond which `status` is
    `DIVERGES`, and `c* = 1` with `χ_c = 1` (correlations converge only
    polynomially).

    Args:
        block: a torchntk layer (usually `stax.serial(...)`) with affine layers.
        W_var, b_var: weight and bias variances, floats or tensors of any shape
            (typically 1-D); the grid is their outer product. Tensors that
            require grad make the results differentiable (derivatives are
            finite at `b_var = 0` too). `q*` is found to full relative
            precision however small; a `b_var` below the square root of the
            dtype's smallest normal number (~1e-154 in float64) counts as 0.
        spatial_shape: spatial shape of the images for convolutional blocks;
            default `(8,)*d` for a block with `d`-dimensional convolutions,
            `()` otherwise.
        diagonal_spatial: force the state layout; `None` picks same-position
            covariances whenever the block allows it.
        q0: starting variance (the fixed point reached from it is reported).
        max_iter: Newton steps per fixed point.
        chunk_size: grid points per vectorised batch; default bounds the
            Jacobians to ~2²² entries (at most 1024 points). Lower it for
            quadrature nonlinearities (`Tanh`: ~10⁴ values per kernel entry)
            on large images.
        progress: tqdm bar over chunks (shown after 2 s).

    Returns:
        A `FixedPoints` record of tensors over the grid.
    """
    W_var, b_var = _checked_variances(W_var, b_var)
    if not isinstance(block, Layer):
        raise TypeError(f"fixed_points: block must be a torchntk layer, got {type(block).__name__}")
    q0 = check_positive(q0, 'q0', 'fixed_points')
    check_positive_int(max_iter, 'max_iter', 'fixed_points')
    if chunk_size is not None:
        check_positive_int(chunk_size, 'chunk_size', 'fixed_points')
    check_flag(diagonal_spatial, 'diagonal_spatial', 'fixed_points', allow_none=True)
    check_flag(progress, 'progress', 'fixed_points')
    kernel_map = BlockKernelMap(block, spatial_shape, diagonal_spatial, W_var.dtype, W_var.device)

    grid = W_var.shape + b_var.shape
    W_grid = W_var.reshape(W_var.shape + (1,) * b_var.ndim).expand(grid).reshape(-1)
    b_grid = b_var.expand(grid).reshape(-1)
    n = kernel_map.n
    variance_pattern = kernel_map.variance_jacobian_pattern()
    if chunk_size is None:
        chunk_size = max(1, min(1024, 2**22 // n**2))
    chunk_results = [_solve_chunk(kernel_map, variance_pattern, W_grid[start:start + chunk_size],
                                  b_grid[start:start + chunk_size], q0, max_iter)
                     for start in tqdm(range(0, W_grid.numel(), chunk_size), desc='fixed_points',
                                       unit='chunk', disable=not progress, delay=2., leave=False)]
    fields = {name: torch.cat([chunk[name] for chunk in chunk_results])
              for name in chunk_results[0]}
    state = kernel_map.state_shape
    return FixedPoints(
        W_var=W_var, b_var=b_var,
        q_star=fields['q_star'].reshape(grid + state),
        c_star=fields['c_star'].reshape(grid + state),
        chi_q=fields['chi_q'].reshape(grid), chi_1=fields['chi_1'].reshape(grid),
        chi_c=fields['chi_c'].reshape(grid), status=fields['status'].reshape(grid),
        diagonal_spatial=kernel_map.diagonal_spatial)


def _checked_variances(W_var: Any, b_var: Any) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = []
    for name, value in (('W_var', W_var), ('b_var', b_var)):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number, value = float(value), torch.tensor(float(value))
            if math.isfinite(number) and not bool(torch.isfinite(value)):
                raise ValueError(f"fixed_points: {name}={number} overflows {value.dtype} (the "
                                 "default dtype); pass a float64 tensor")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"fixed_points: {name} must be a float or a tensor, "
                            f"got {type(value).__name__}")
        check_real_tensor(value, name, 'fixed_points')
        if value.numel() == 0:
            raise ValueError(f"fixed_points: {name} is empty")
        detached = value.detach()
        if not bool(torch.isfinite(detached).all()) or bool((detached < 0).any()):
            raise ValueError(f"fixed_points: {name} must be finite and >= 0, "
                             f"got values in [{float(detached.min())}, {float(detached.max())}]")
        tensors.append(value)
    W_var, b_var = tensors
    if W_var.device != b_var.device:
        raise ValueError(f"fixed_points: W_var and b_var must be on the same device, "
                         f"got {W_var.device} and {b_var.device}")
    dtype = torch.promote_types(W_var.dtype, b_var.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    return W_var.to(dtype), b_var.to(dtype)


def _is_homogeneous(kernel_map: BlockKernelMap, q: torch.Tensor, W_var: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """Whether the bias-free map is positively homogeneous of degree 1 (as with
    ReLU-like nonlinearities): `V₀(2q) = 2V₀(q)` and `F₀(2q, q) = 2F₀(q, q/2)`
    to rounding (scaling by 2 is exact in floating point)."""
    no_bias = torch.zeros_like(W_var)
    maps = torch.func.vmap(lambda *args: kernel_map(*args)[:2])
    with torch.no_grad():
        once = torch.cat(maps(q, q / 2, W_var, no_bias), -1)
        twice = torch.cat(maps(2 * q, q, W_var, no_bias), -1)
    scale = once.abs().amax(-1)
    return ((twice - 2 * once).abs().amax(-1) <= 1e3 * eps * scale) & (scale > 0)


def _solve_chunk(kernel_map: BlockKernelMap, variance_pattern: torch.Tensor,
                 W_var: torch.Tensor, b_var: torch.Tensor, q0: float,
                 max_iter: int) -> dict[str, torch.Tensor]:
    """All results for a chunk of `G` grid points, as flat `(G, …)` tensors
    (`variance_pattern`: where `∂V/∂q` can be nonzero)."""
    G, n = W_var.shape[0], kernel_map.n
    eps = torch.finfo(W_var.dtype).eps
    tol = 100 * eps
    is_variance = kernel_map.is_variance
    start = kernel_map.start(q0).to(W_var.device).expand(G, n)

    V = kernel_map.variance

    def F(q12, q_c, W, b, growth):
        return kernel_map(q_c, q12, W, b)[1] / growth

    def F_tangent(tangent, q12, q_c, W, b, growth):
        _, value, ntk = kernel_map(q_c, q12, W, b, tangent)
        return ntk / growth, value / growth

    def F_and_jacobian(q12: torch.Tensor,
                       params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """`F(q12)` and `∂F/∂q12` through the NTK rules (see `BlockKernelMap.__call__`)."""
        jacobian, value = torch.func.vmap(torch.func.jacfwd(F_tangent, has_aux=True))(
            torch.zeros_like(q12), q12, *params)
        return value, jacobian

    V_and_jacobian = sparse_jacobian(V, variance_pattern)

    def valid_q(q, *_):
        return kernel_map.is_covariance(q, q, 1e3 * eps)

    # Without gradients, a Jacobian at the solution serves both the implicit
    # step and the slopes; with them, the slopes are taken again at the
    # differentiable solution.
    differentiable = torch.is_grad_enabled() and (W_var.requires_grad or b_var.requires_grad)

    # 1. The variance fixed point q*: the attractor of the iteration from q0.
    # Only where V(0) = 0 (no bias: V(0) is then of the order of the smallest
    # normal number, which `BlockKernelMap` adds to b_var; below its square root,
    # b_var counts as 0) can q* be 0: there the iteration may approach it
    # linearly, so its residuals are also measured against q0; elsewhere a
    # tiny q* is a real one, found to full relative precision.
    with torch.no_grad():
        at_zero = torch.func.vmap(V)(torch.zeros_like(start), W_var, b_var).abs().amax(-1)
    fixes_zero = ~(at_zero > math.sqrt(torch.finfo(W_var.dtype).tiny) * q0)
    q, converged, increasing = newton_fixed_points(V_and_jacobian, start, (W_var, b_var),
                                                   valid_q, is_variance, tol, max_iter,
                                                   tol * q0 * fixes_zero)
    zero = converged & fixes_zero & (q.abs().amax(-1) <= 1e3 * tol * q0)
    diverges = ~converged & increasing

    # 2. The scale q_c at which the slopes are taken: q* itself; q* + ε²·q0 for
    # q* = 0, where maps by quadrature (Tanh) are not differentiable; and where
    # q* is 0 or infinite but the map is positively homogeneous (ReLU), the
    # direction q̂ (mean variance 1) that its bias-free version V₀ keeps,
    # V₀(q̂) = λ·q̂, with the growth factor λ that normalizes the map.
    projective = zero | diverges
    if bool(projective.any()):
        projective = projective & _is_homogeneous(kernel_map, start, W_var, eps)
    q_c = torch.where(zero[:, None], eps**2 * start, torch.where(converged[:, None], q, start))
    if bool(projective.any()):
        def normalized(q, W):
            value = V(q, W, torch.zeros_like(W))
            return value / value[is_variance].mean()
        direction, done, _ = newton_fixed_points(autograd_jacobian(normalized),
                                                 start[projective], (W_var[projective],),
                                                 valid_q, is_variance, tol, max_iter, tol)
        q_c[projective] = direction
        projective[projective.clone()] = done
    b_c = torch.where(projective, 0., b_var)
    growth, jacobian_q = V_and_jacobian(q_c, (W_var, b_c))
    growth = torch.where(projective, growth[:, is_variance].mean(-1), 1.)
    chi_q = spectral_radius(jacobian_q)
    stable = converged & (chi_q <= 1 + 1e3 * eps)
    status = torch.where(stable, Status.FINITE,
                         torch.where(diverges, Status.DIVERGES, Status.NOT_CONVERGED))
    projective = projective & (stable | diverges)
    q_star = implicit_step(V, torch.where(stable[:, None], q, start), (W_var, b_var), jacobian_q)
    q_star = torch.where(zero[:, None], q_star - q_star.detach(), q_star)  # exactly 0
    q_c = torch.where((stable & ~projective)[:, None], q_star + q_c * zero[:, None], q_c)
    if differentiable:
        chi_q = spectral_radius(V_and_jacobian(q_c, (W_var, b_c))[1])

    # 3. The correlation fixed point: q12* = q_c (c* = 1) in the ordered phase,
    # else the stable q12* reached from uncorrelated inputs.
    params = (q_c, W_var, b_c, growth)
    usable = stable | projective
    correlated = projective | (stable & ~zero)   # where c is defined
    chi_1 = spectral_radius(F_and_jacobian(q_c, params)[1]) * growth
    chaotic = correlated & (chi_1 > growth)

    def valid_q12(q12, q_c, *_):
        return kernel_map.is_covariance(q_c, q12, 1e3 * eps)

    q12, chi_c = q_c, chi_1 / growth
    if bool(chaotic.any()):
        rows = torch.nonzero(chaotic)[:, 0]
        sub = [p[rows] for p in params]
        solved, done, _ = newton_fixed_points(F_and_jacobian, torch.zeros_like(sub[0]), sub,
                                              valid_q12, is_variance, tol, max_iter,
                                              tol * sub[0].abs().amax(-1))
        jacobian_c = F_and_jacobian(solved, sub)[1]
        solved = implicit_step(F, solved, sub, jacobian_c)
        if differentiable:
            jacobian_c = F_and_jacobian(solved, sub)[1]
        q12 = q12.index_put((rows,), solved)
        chi_c = chi_c.index_put((rows,), spectral_radius(jacobian_c))
        failed = torch.zeros_like(chaotic).index_put((rows,), ~done)
        status = torch.where(failed, Status.NOT_CONVERGED, status)
        correlated = correlated & ~failed

    # Rows without correlations get harmless values, so that no NaN reaches the gradients.
    c_star = kernel_map.correlation(*(torch.where(correlated[:, None], t, start)
                                      for t in (q_c, q12)))
    return dict(q_star=torch.where(stable[:, None], q_star, math.nan),
                c_star=torch.where(correlated[:, None], c_star, math.nan),
                chi_q=torch.where(usable, chi_q, math.nan),
                chi_1=torch.where(usable, chi_1, math.nan),
                chi_c=torch.where(correlated, chi_c, math.nan),
                status=status.to(torch.int8))
