"""Signal propagation: fixed points of a block's kernel map, their slopes and
depth scales over a grid of weight and bias variances, and the phase diagram.

A deep network repeats a block (`serial(Dense, Erf)`, a convolution and a
nonlinearity, a residual block, …). Send two inputs of equal variance `q` and
covariance `q12` through one block; its kernel map is

    q ↦ V(q),     q12 ↦ F(q, q12),     with F(q, q) = V(q)

(identical inputs stay identical). Mean field theory (Poole et al. 2016,
arXiv:1606.05340; Schoenholz et al. 2017, "Deep Information Propagation",
arXiv:1611.01232) reads off the behaviour of deep networks from its fixed points:

- `q* = V(q*)`, the variance every input converges to, at the rate
  `χ_q = ∂V/∂q(q*)`: `|q_l − q*| ~ χ_q^l = exp(−l/ξ_q)`, `ξ_q = −1/log χ_q`;
- the correlation map `C(c) = F(q*, c·q*)/q*` and its slope at `c = 1`,
  `χ₁ = ∂F/∂q12(q*, q*)` (`σ_w²·E[φ'(u)²]` for a Dense–φ block). Where
  `χ₁ < 1` (ordered phase) the stable fixed point is `c* = 1`: all inputs
  become alike. Where `χ₁ > 1` (chaotic phase) it is some `c* < 1`: nearby
  inputs decorrelate. `χ_c = ∂F/∂q12(q*, c*·q*)` (`= χ₁` in the ordered
  phase) sets the depth scale `ξ_c = −1/log χ_c` of `|c_l − c*| ~ exp(−l/ξ_c)`,
  which diverges on the critical line `χ₁ = 1`, where deep networks train.

Convolutional blocks (Xiao et al. 2018, "Dynamical Isometry and a Mean Field
Theory of CNNs", arXiv:1806.05393) carry a variance and a covariance per
position, so `q`, `q12`, `c` are vectors over positions and the slopes are
Jacobian matrices; `χ_q`, `χ₁`, `χ_c` are their spectral radii, the rate of
the slowest mode. With `CIRCULAR` padding a spatially uniform kernel stays
uniform and the phase diagram is exactly the fully connected one; with `SAME`
padding the zero border lowers the variances near the edges.

Fixed points are found for all grid points at once (`torch.func.vmap` over
the hyperparameters) by Newton's method with autograd Jacobians: `∂V/∂q` by
forward mode (one pass per group of positions whose rows of the Jacobian do
not overlap), `∂F/∂q12` through the layers' NTK rules, which carry Price's
theorem `∂E[φ(u)φ(v)]/∂cov12 = E[φ'(u)φ'(v)]` and so stay exact at `c = 1`.
The results are differentiable in `W_var` and `b_var`: one differentiable
Newton step at the solution gives the implicit-function-theorem derivative.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..kernel import Kernel
from ..stax.conv import Conv, ConvLocal, ConvTranspose
from ..stax.linear import Affine
from ..stax.module import Layer, check_nonnegative
from ..stax.requirements import Bool, Diagonal, Requirements

Tensor = torch.Tensor

__all__ = ['FixedPoints', 'Status', 'fixed_points', 'phase_diagram']

#: Side length per spatial dimension of the images a convolutional block is
#: analysed on when `spatial_shape` is not given.
DEFAULT_SPATIAL_SIZE = 8


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

    W_var: Tensor
    b_var: Tensor
    q_star: Tensor
    c_star: Tensor
    chi_q: Tensor
    chi_1: Tensor
    chi_c: Tensor
    status: Tensor
    diagonal_spatial: bool

    @property
    def depth_scale(self) -> Tensor:
        """`ξ_c = −1/log χ_c`, the depth over which input correlations are
        forgotten (inf where `χ_c ≥ 1`, i.e. on the critical line)."""
        return _depth_scale(self.chi_c)

    @property
    def depth_scale_q(self) -> Tensor:
        """`ξ_q = −1/log χ_q`, the depth over which the variance reaches `q*`
        (NaN where there is no finite `q*`)."""
        return torch.where(self.status == Status.FINITE, _depth_scale(self.chi_q), math.nan)

    @property
    def q_diverges(self) -> Tensor:
        """`(*grid)` bool: no finite `q*`, the variances grow without bound."""
        return self.status == Status.DIVERGES

    @property
    def ordered(self) -> Tensor:
        """`(*grid)` bool: `χ₁ < 1`, perturbations of the inputs shrink."""
        return self.chi_1 < 1

    def critical_line(self) -> Tensor:
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


def _depth_scale(chi: Tensor) -> Tensor:
    below = chi < 1
    safe = torch.where(below, chi, 0.5)  # keeps the unused branch's gradient finite
    return torch.where(below, -1 / torch.log(safe), torch.where(chi >= 1, math.inf, math.nan))


def fixed_points(block: Layer, W_var: float | Tensor, b_var: float | Tensor, *,
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
    check_nonnegative(q0, 'q0', 'fixed_points')
    q0 = float(q0)
    if q0 == 0:
        raise ValueError("fixed_points: q0 must be > 0, got 0.0")
    for name, value in (('max_iter', max_iter), ('chunk_size', chunk_size)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"fixed_points: {name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"fixed_points: {name} must be >= 1, got {value}")
    if diagonal_spatial is not None and not isinstance(diagonal_spatial, bool):
        raise TypeError(f"fixed_points: diagonal_spatial must be True, False or None, "
                        f"got {diagonal_spatial!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"fixed_points: progress must be True or False, got {progress!r}")
    kernel_map = _KernelMap(block, spatial_shape, diagonal_spatial, W_var.dtype, W_var.device)

    grid = W_var.shape + b_var.shape
    W_grid = W_var.reshape(W_var.shape + (1,) * b_var.ndim).expand(grid).reshape(-1)
    b_grid = b_var.expand(grid).reshape(-1)
    n = kernel_map.n
    kernel_map.variance_pattern = _jacobian_pattern(lambda q, W, b: kernel_map(q, q, W, b)[0],
                                                    kernel_map)
    if chunk_size is None:
        chunk_size = max(1, min(1024, 2**22 // n**2))
    parts = [_solve_chunk(kernel_map, W_grid[start:start + chunk_size],
                          b_grid[start:start + chunk_size], q0, max_iter)
             for start in tqdm(range(0, W_grid.numel(), chunk_size), desc='fixed_points',
                               unit='chunk', disable=not progress, delay=2., leave=False)]
    fields = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    state = kernel_map.state_shape
    return FixedPoints(
        W_var=W_var, b_var=b_var,
        q_star=fields['q_star'].reshape(grid + state),
        c_star=fields['c_star'].reshape(grid + state),
        chi_q=fields['chi_q'].reshape(grid), chi_1=fields['chi_1'].reshape(grid),
        chi_c=fields['chi_c'].reshape(grid), status=fields['status'].reshape(grid),
        diagonal_spatial=kernel_map.diagonal_spatial)


def _checked_variances(W_var: Any, b_var: Any) -> tuple[Tensor, Tensor]:
    tensors = []
    for name, value in (('W_var', W_var), ('b_var', b_var)):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number, value = float(value), torch.tensor(float(value))
            if math.isfinite(number) and not bool(torch.isfinite(value)):
                raise ValueError(f"fixed_points: {name}={number} overflows {value.dtype} (the "
                                 "default dtype); pass a float64 tensor")
        if not isinstance(value, Tensor):
            raise TypeError(f"fixed_points: {name} must be a float or a tensor, "
                            f"got {type(value).__name__}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"fixed_points: {name} must be a real tensor, got {value.dtype}")
        if value.is_meta:
            raise ValueError(f"fixed_points: {name} is on the meta device, which holds no values")
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


class _KernelMap:
    """The kernel map of (a private copy of) `block` on two inputs, as a
    function of flat tensors that `torch.func.vmap` can batch over the grid.

    The state of one input is `q`, of the pair `q12`, both flattened to `n`
    entries; `left[i]`, `right[i]` index the variances that entry `i` is a
    covariance of (`left = right = i` for a variance).
    """

    def __init__(self, block: Layer, spatial_shape: Sequence[int] | None,
                 diagonal_spatial: bool | None, dtype: torch.dtype, device: torch.device) -> None:
        self.block = copy.deepcopy(block)
        self.affine = [m for m in self.block.modules() if isinstance(m, Affine)]
        if not self.affine:
            raise ValueError("fixed_points: block has no affine layer (Dense, Conv, …) whose "
                             "W_std and b_std could be swept")
        self.spatial = self._spatial_shape(spatial_shape)
        # The width the block returns, so that a residual block's skip matches
        # its branch (the NNGP does not depend on widths).
        self.channels = self.affine[-1].width
        # Closing the block with a layer that accepts any layout asks whether
        # the block alone maps same-position covariances to themselves.
        requirements = block.requirements >> Requirements(
            diagonal_spatial=Diagonal(input=Bool.YES, output=Bool.YES))
        allowed = (requirements.diagonal_spatial is None
                   or requirements.diagonal_spatial.allows_diagonal)
        if diagonal_spatial and not allowed:
            raise ValueError("fixed_points: diagonal_spatial=True is not possible: the block "
                             "needs covariances between different positions")
        self.diagonal_spatial = allowed if diagonal_spatial is None else bool(diagonal_spatial)
        self.diagonal_batch = requirements.diagonal_batch
        self.dtype, self.device = dtype, device
        self.tiny = torch.finfo(dtype).tiny
        if self.diagonal_spatial:
            self.state_shape = self.spatial
            index = np.arange(math.prod(self.spatial))
            left = right = position_left = position_right = index
        else:
            self.state_shape = tuple(s for size in self.spatial for s in (size, size))
            multi = np.indices(self.state_shape).reshape(len(self.state_shape), -1)
            left, right = multi.copy(), multi.copy()
            left[1::2], right[0::2] = multi[0::2], multi[1::2]
            left = np.ravel_multi_index(left, self.state_shape)
            right = np.ravel_multi_index(right, self.state_shape)
            position_left = np.ravel_multi_index(multi[0::2], self.spatial)
            position_right = np.ravel_multi_index(multi[1::2], self.spatial)
        self.left, self.right, self.position_left, self.position_right = (
            torch.as_tensor(index, device=device)
            for index in (left, right, position_left, position_right))
        self.n = math.prod(self.state_shape)
        self.is_variance = self.left == self.right
        self._check_block()

    def _spatial_shape(self, spatial_shape: Sequence[int] | None) -> tuple[int, ...]:
        ranks = {len(m.filter_shape) for m in self.block.modules()
                 if isinstance(m, (Conv, ConvLocal, ConvTranspose))}
        if spatial_shape is not None:
            if not isinstance(spatial_shape, Sequence) or isinstance(spatial_shape, str) or any(
                    isinstance(s, bool) or not isinstance(s, int) for s in spatial_shape):
                raise TypeError(f"fixed_points: spatial_shape must be a sequence of ints, "
                                f"got {spatial_shape!r}")
            shape = tuple(spatial_shape)
            if not all(s >= 1 for s in shape):
                raise ValueError(f"fixed_points: spatial_shape must hold positive integers, "
                                 f"got {spatial_shape!r}")
            if ranks and ranks != {len(shape)}:
                raise ValueError(f"fixed_points: spatial_shape={shape} has {len(shape)} "
                                 f"dimensions but the block's convolutions have {sorted(ranks)}")
            return shape
        if len(ranks) > 1:
            raise ValueError(f"fixed_points: the block mixes convolutions of {sorted(ranks)} "
                             "spatial dimensions; give spatial_shape")
        return (DEFAULT_SPATIAL_SIZE,) * (ranks.pop() if ranks else 0)

    def start(self, q0: float) -> Tensor:
        """The white input kernel: `q0` on the variances, 0 between positions."""
        return torch.where(self.is_variance, q0, 0.).to(self.dtype)

    def generic_state(self, generator: torch.Generator) -> Tensor:
        """A random covariance of one input over positions, in the state layout."""
        positions = math.prod(self.spatial)
        factor = torch.randn(positions, positions, generator=generator, dtype=self.dtype)
        covariance = factor @ factor.T / positions + torch.eye(positions, dtype=self.dtype)
        return covariance[self.position_left, self.position_right].to(self.device)

    def _kernel(self, q: Tensor, q12: Tensor, ntk: Tensor | None = None) -> Kernel:
        q, q12 = q.reshape(self.state_shape), q12.reshape(self.state_shape)
        cov = q[None] if self.diagonal_batch else q[None, None]
        shape = (1, self.channels, *self.spatial)
        return Kernel(nngp=q12[None, None],
                      ntk=None if ntk is None else ntk.reshape(self.state_shape)[None, None],
                      cov1=cov, cov2=cov,
                      x1_is_x2=torch.zeros((), dtype=torch.bool, device=q.device),
                      is_gaussian=True, diagonal_batch=self.diagonal_batch,
                      diagonal_spatial=self.diagonal_spatial, shape1=shape, shape2=shape)

    def __call__(self, q: Tensor, q12: Tensor, W_var: Tensor, b_var: Tensor,
                 tangent: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """`V(q)`, `F(q, q12)` and, given `tangent`, the block's NTK output
        for that input NTK, for one grid point (flat `(n,)` states, 0-d variances).

        Every layer's NTK rule is affine in the input NTK with the derivative
        of its NNGP rule in `nngp` as the linear part (Price's theorem
        `∂E[φ(u)φ(v)]/∂cov12 = E[φ'(u)φ'(v)]` for nonlinearities), so the
        derivative of the NTK output in `tangent` is `∂F/∂q12`, exact even at
        `q12 = q`, where autograd through quadrature kernels (Tanh) is not.
        """
        # W_std = sqrt(W_var + tiny) changes W_std² by ~1e-308 but keeps the
        # derivative of W_std² = W_var finite at W_var = 0.
        W_std, b_std = torch.sqrt(W_var + self.tiny), torch.sqrt(b_var + self.tiny)
        for layer in self.affine:
            layer.W_std, layer.b_std = W_std, b_std
        out = self.block.propagate(self._kernel(q, q12, tangent))
        cov1 = out.cov1 if self.diagonal_batch else torch.diagonal(out.cov1, 0, 0, 1).movedim(-1, 0)
        ntk = None if tangent is None else out.ntk.expand_as(out.nngp).reshape(-1)
        return cov1.reshape(-1), out.nngp.reshape(-1), ntk

    def _check_block(self) -> None:
        q = self.start(1.).to(self.device)
        one = torch.ones((), dtype=self.dtype, device=self.device)
        for layer in self.affine:
            layer.W_std, layer.b_std = one, one
        out = self.block.propagate(self._kernel(q, q / 2))
        if not isinstance(out, Kernel):
            raise ValueError(f"fixed_points: the block returns {type(out).__name__} of kernels, "
                             "not one kernel; its kernel map has no fixed point (close it with "
                             "a fan-in layer)")
        if out.shape1 != (1, self.channels, *self.spatial) \
                or out.diagonal_spatial != self.diagonal_spatial:
            raise ValueError(f"fixed_points: the block maps activations of shape "
                             f"(N, {self.channels}, *{self.spatial}) to (N, *{out.shape1[1:]}); it "
                             "must keep the kernel's shape to have a fixed point")

    def correlation(self, q: Tensor, q12: Tensor) -> Tensor:
        """`q12[i] / sqrt(q[left[i]]·q[right[i]])` for `(G, n)` states."""
        return q12 / torch.sqrt(q[..., self.left] * q[..., self.right])

    def is_covariance(self, q: Tensor, q12: Tensor, slack: float) -> Tensor:
        """`(G,)`: whether `q` has variances ≥ 0 and `q12² ≤ q[left]·q[right]`
        (correlations in [−1, 1], up to a relative `slack`)."""
        bound = q[..., self.left] * q[..., self.right]
        return (q[..., self.is_variance] >= 0).all(-1) & (q12 * q12 <= bound * (1 + slack)).all(-1)


ValueAndJacobian = Callable[[Tensor, Sequence[Tensor]], tuple[Tensor, Tensor]]


def _autograd_jacobian(fn: Callable[..., Tensor]) -> ValueAndJacobian:
    """`(x, params) ↦ (fn(x_g, *params_g), ∂fn/∂x_g)` for every row `g`, by forward mode."""
    def twice(x, *p):
        y = fn(x, *p)
        return y, y

    def value_and_jacobian(x: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        jacobian, value = torch.func.vmap(torch.func.jacfwd(twice, has_aux=True))(x, *params)
        return value, jacobian
    return value_and_jacobian


def _jacobian_pattern(fn: Callable[..., Tensor], kernel_map: _KernelMap) -> Tensor:
    """Which entries of `∂fn/∂x` can be nonzero: those nonzero at two random points."""
    generator = torch.Generator().manual_seed(0)
    x = torch.stack([kernel_map.generic_state(generator) for _ in range(2)])
    params = [torch.tensor([1.3, 0.7], dtype=x.dtype, device=x.device),
              torch.tensor([0.1, 0.3], dtype=x.dtype, device=x.device)]
    with torch.no_grad():
        return (_autograd_jacobian(fn)(x, params)[1] != 0).any(0)


def _sparse_jacobian(fn: Callable[..., Tensor], pattern: Tensor) -> ValueAndJacobian:
    """Like `_autograd_jacobian`, with one forward-mode pass per group of
    columns of the Jacobian that have no nonzero row in common (greedy column
    colouring, Curtis, Powell & Reid 1974): 9 passes instead of 64 for a 3×3
    convolution on 8×8 images."""
    n = pattern.shape[0]
    conflicts = ((pattern.T.double() @ pattern.double()) > 0).cpu().numpy()
    colors = np.zeros(n, dtype=np.int64)
    for column in range(n):
        taken = set(colors[:column][conflicts[column, :column]])
        colors[column] = next(color for color in range(n) if color not in taken)
    colors = torch.as_tensor(colors, device=pattern.device)
    tangents = torch.nn.functional.one_hot(colors).T

    def single(x, *p):
        def push(tangent):
            return torch.func.jvp(lambda y: fn(y, *p), (x,), (tangent,))
        return torch.func.vmap(push)(tangents.to(x.dtype))

    def value_and_jacobian(x: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        values, products = torch.func.vmap(single)(x, *params)        # (G, colors, n)
        return values[:, 0], products[:, colors, :].transpose(-1, -2) * pattern
    return value_and_jacobian


def _spectral_radius(matrix: Tensor) -> Tensor:
    if matrix.shape[-1] == 1:
        return matrix[..., 0, 0].abs()
    return torch.linalg.eigvals(matrix).abs().amax(-1)


def _newton(value_and_jacobian: ValueAndJacobian, x: Tensor, params: Sequence[Tensor],
            valid: Callable[..., Tensor], is_variance: Tensor, tol: float,
            max_iter: int, floor: Tensor | float = 0.) -> tuple[Tensor, Tensor, Tensor]:
    """Fixed points `x = f(x, *params)` of every row, without gradients.

    A Newton step `x − (J − I)⁻¹(f(x) − x)` is taken where it is finite,
    `valid`, and heads the way the plain iteration `x ← f(x)` goes (so it
    moves toward the attractor the network reaches, not toward a repelling
    fixed point); elsewhere the plain iteration is. A row stops once
    `|f(x) − x| ≤ tol·|x| + floor` (`|x|` its largest entry), after taking that
    last step, or when `f(x)` overflows. The test is relative, so that tiny fixed
    points get every digit, and on the residual, which a map's rounding keeps
    from shrinking further, not on the step, which near a critical line
    (`J ≈ I`) amplifies that rounding; the absolute `floor` of a row lets an
    iteration that approaches a fixed point at 0 stop.

    Returns:
        `x`, whether each row converged, and whether its last step increased
        every variance (a diverging variance map).
    """
    x = x.detach().clone()
    params = [p.detach() for p in params]
    converged = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    increasing = torch.zeros_like(converged)
    active = torch.arange(x.shape[0], device=x.device)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    floor = torch.as_tensor(floor, dtype=x.dtype, device=x.device).expand(x.shape[0])
    with torch.no_grad():
        for _ in range(max_iter):
            if active.numel() == 0:
                break
            x_active, p_active = x[active], [p[active] for p in params]
            value, jacobian = value_and_jacobian(x_active, p_active)
            residual = value - x_active
            overflow = ~torch.isfinite(value).all(-1)
            increasing[active] = (residual[:, is_variance] > 0).all(-1)
            step, singular = torch.linalg.solve_ex(jacobian - eye, -residual)
            newton = x_active + step
            accept = ((singular == 0) & torch.isfinite(newton).all(-1) & valid(newton, *p_active)
                      & ((step * residual).sum(-1) > 0))
            done = residual.abs().amax(-1) <= tol * x_active.abs().amax(-1) + floor[active]
            converged[active] = done
            x[active] = torch.where(overflow[:, None], x_active,
                                    torch.where(accept[:, None], newton, value))
            active = active[~(done | overflow)]
    return x, converged, increasing


def _implicit_step(fn: Callable[..., Tensor], x: Tensor, params: Sequence[Tensor],
                   jacobian: Tensor) -> Tensor:
    """The converged `x` with the derivative `−(J − I)⁻¹ ∂fn/∂params` of the
    implicit function theorem: that of one Newton step from `x` (`jacobian`
    is the `J` to use, taken as a constant); the value stays `x`."""
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    value = torch.func.vmap(fn)(x, *params)
    step, singular = torch.linalg.solve_ex(jacobian.detach() - eye, x - value)
    # Where J − I is singular (on a critical line, or a line of fixed points)
    # the derivative does not exist.
    step = torch.where((singular == 0)[:, None] & torch.isfinite(step), step, 0.)
    return x + (step - step.detach())


def _is_homogeneous(kernel_map: _KernelMap, q: Tensor, W_var: Tensor, eps: float) -> Tensor:
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


def _solve_chunk(kernel_map: _KernelMap, W_var: Tensor, b_var: Tensor, q0: float,
                 max_iter: int) -> dict[str, Tensor]:
    """All results for a chunk of `G` grid points, as flat `(G, …)` tensors."""
    G, n = W_var.shape[0], kernel_map.n
    eps = torch.finfo(W_var.dtype).eps
    tol = 100 * eps
    is_variance = kernel_map.is_variance
    start = kernel_map.start(q0).to(W_var.device).expand(G, n)

    def V(q, W, b):
        return kernel_map(q, q, W, b)[0]

    def F(q12, q_c, W, b, growth):
        return kernel_map(q_c, q12, W, b)[1] / growth

    def F_tangent(tangent, q12, q_c, W, b, growth):
        _, value, ntk = kernel_map(q_c, q12, W, b, tangent)
        return ntk / growth, value / growth

    def F_and_jacobian(q12: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """`F(q12)` and `∂F/∂q12` through the NTK rules (see `_KernelMap.__call__`)."""
        jacobian, value = torch.func.vmap(torch.func.jacfwd(F_tangent, has_aux=True))(
            torch.zeros_like(q12), q12, *params)
        return value, jacobian

    V_and_jacobian = _sparse_jacobian(V, kernel_map.variance_pattern)

    def valid_q(q, *_):
        return kernel_map.is_covariance(q, q, 1e3 * eps)

    # Without gradients, a Jacobian at the solution serves both the implicit
    # step and the slopes; with them, the slopes are taken again at the
    # differentiable solution.
    differentiable = torch.is_grad_enabled() and (W_var.requires_grad or b_var.requires_grad)

    # 1. The variance fixed point q*: the attractor of the iteration from q0.
    # Only where V(0) = 0 (no bias: V(0) is then of the order of the smallest
    # normal number, which `_KernelMap` adds to b_var; below its square root,
    # b_var counts as 0) can q* be 0: there the iteration may approach it
    # linearly, so its residuals are also measured against q0; elsewhere a
    # tiny q* is a real one, found to full relative precision.
    with torch.no_grad():
        at_zero = torch.func.vmap(V)(torch.zeros_like(start), W_var, b_var).abs().amax(-1)
    fixes_zero = ~(at_zero > math.sqrt(torch.finfo(W_var.dtype).tiny) * q0)
    q, converged, increasing = _newton(V_and_jacobian, start, (W_var, b_var), valid_q,
                                       is_variance, tol, max_iter, tol * q0 * fixes_zero)
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
        direction, done, _ = _newton(_autograd_jacobian(normalized), start[projective],
                                     (W_var[projective],), valid_q, is_variance, tol, max_iter,
                                     tol)
        q_c[projective] = direction
        projective[projective.clone()] = done
    b_c = torch.where(projective, 0., b_var)
    growth, jacobian_q = V_and_jacobian(q_c, (W_var, b_c))
    growth = torch.where(projective, growth[:, is_variance].mean(-1), 1.)
    chi_q = _spectral_radius(jacobian_q)
    stable = converged & (chi_q <= 1 + 1e3 * eps)
    status = torch.where(stable, Status.FINITE,
                         torch.where(diverges, Status.DIVERGES, Status.NOT_CONVERGED))
    projective = projective & (stable | diverges)
    q_star = _implicit_step(V, torch.where(stable[:, None], q, start), (W_var, b_var), jacobian_q)
    q_star = torch.where(zero[:, None], q_star - q_star.detach(), q_star)  # exactly 0
    q_c = torch.where((stable & ~projective)[:, None], q_star + q_c * zero[:, None], q_c)
    if differentiable:
        chi_q = _spectral_radius(V_and_jacobian(q_c, (W_var, b_c))[1])

    # 3. The correlation fixed point: q12* = q_c (c* = 1) in the ordered phase,
    # else the stable q12* reached from uncorrelated inputs.
    params = (q_c, W_var, b_c, growth)
    usable = stable | projective
    correlated = projective | (stable & ~zero)   # where c is defined
    chi_1 = _spectral_radius(F_and_jacobian(q_c, params)[1]) * growth
    chaotic = correlated & (chi_1 > growth)

    def valid_q12(q12, q_c, *_):
        return kernel_map.is_covariance(q_c, q12, 1e3 * eps)

    q12, chi_c = q_c, chi_1 / growth
    if bool(chaotic.any()):
        rows = torch.nonzero(chaotic)[:, 0]
        sub = [p[rows] for p in params]
        solved, done, _ = _newton(F_and_jacobian, torch.zeros_like(sub[0]), sub, valid_q12,
                                  is_variance, tol, max_iter, tol * sub[0].abs().amax(-1))
        jacobian_c = F_and_jacobian(solved, sub)[1]
        solved = _implicit_step(F, solved, sub, jacobian_c)
        if differentiable:
            jacobian_c = F_and_jacobian(solved, sub)[1]
        q12 = q12.index_put((rows,), solved)
        chi_c = chi_c.index_put((rows,), _spectral_radius(jacobian_c))
        failed = torch.zeros_like(chaotic).index_put((rows,), ~done)
        status = torch.where(failed, Status.NOT_CONVERGED, status)
        correlated = correlated & ~failed

    # Rows without correlations get harmless values, so that no NaN reaches the gradients.
    c_star = kernel_map.correlation(*(torch.where(correlated[:, None], t, start) for t in (q_c, q12)))
    return dict(q_star=torch.where(stable[:, None], q_star, math.nan),
                c_star=torch.where(correlated[:, None], c_star, math.nan),
                chi_q=torch.where(usable, chi_q, math.nan),
                chi_1=torch.where(usable, chi_1, math.nan),
                chi_c=torch.where(correlated, chi_c, math.nan),
                status=status.to(torch.int8))


def phase_diagram(result: FixedPoints, *, title: str | None = None) -> Any:
    """Plot `q*`, `c*` and the depth scale `ξ_c` over the `(σ_w², σ_b²)` grid,
    with the critical line `χ₁ = 1` and the region without finite `q*`.

    Quantities over positions (convolutional blocks) are averaged. Needs
    matplotlib (the `demo` extra); the figure is made without pyplot, so
    save it with `fig.savefig(path)`.

    Args:
        result: `fixed_points` over 1-D `W_var` and `b_var`.
        title: figure title.

    Returns:
        A `matplotlib.figure.Figure` with three panels.
    """
    if not isinstance(result, FixedPoints):
        raise TypeError(f"phase_diagram: result must be the FixedPoints of fixed_points, got "
                        f"{type(result).__name__}")
    if title is not None and not isinstance(title, str):
        raise TypeError(f"phase_diagram: title must be a string, got {type(title).__name__}")
    try:
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("phase_diagram needs matplotlib: pip install 'torchntk[demo]'") from error
    if result.W_var.ndim != 1 or result.b_var.ndim != 1 or len(result.W_var) < 2 \
            or len(result.b_var) < 2:
        raise ValueError(f"phase_diagram: needs fixed points over 1-D W_var and b_var of at least "
                         f"2 values each, got shapes {tuple(result.W_var.shape)} and "
                         f"{tuple(result.b_var.shape)}")

    def grid_values(t: Tensor) -> np.ndarray:
        t = t.detach().to('cpu', torch.float64)
        return t.flatten(2).nanmean(-1).numpy().T if t.ndim > 2 else t.numpy().T

    W, b = (v.detach().to('cpu', torch.float64).numpy() for v in (result.W_var, result.b_var))
    depth = grid_values(result.depth_scale)
    finite_depth = depth[np.isfinite(depth) & (depth > 0)]
    panels = [
        ('$q^*$' + (' (mean over positions)' if result.q_star.ndim > 2 else ''),
         grid_values(result.q_star), {}),
        ('$c^*$' + (' (mean over positions)' if result.c_star.ndim > 2 else ''),
         grid_values(result.c_star), {}),
        (r'depth scale $\xi_c = -1/\log\chi_c$',
         np.where(np.isfinite(depth), depth, np.nan),
         {'norm': LogNorm(vmin=max(finite_depth.min(), 1e-2), vmax=finite_depth.max())}
         if finite_depth.size else {}),
    ]
    fig = Figure(figsize=(15, 4.4), layout='constrained')
    diverges = grid_values(result.q_diverges.to(torch.float64))
    chi_1 = grid_values(result.chi_1)
    for ax, (label, values, options) in zip(fig.subplots(1, 3), panels):
        mesh = ax.pcolormesh(W, b, values, shading='auto', cmap='viridis', **options)
        fig.colorbar(mesh, ax=ax)
        if np.nanmin(chi_1) < 1 < np.nanmax(chi_1):
            ax.contour(W, b, chi_1, levels=[1.], colors='white', linestyles='--', linewidths=2)
        if diverges.any():
            ax.contourf(W, b, diverges, levels=[0.5, 1.5], colors='none', hatches=['//'])
        ax.set_xlabel(r'$\sigma_w^2$')
        ax.set_ylabel(r'$\sigma_b^2$')
        ax.set_title(label)
    fig.suptitle((title + ': ' if title else '') + r'critical line $\chi_1 = 1$ dashed'
                 + (r', no finite $q^*$ hatched' if diverges.any() else ''))
    return fig
