"""The kernel map of a block on two inputs, `(q, q12) ↦ (V(q), F(q, q12))`, as a
function of flat tensors that `torch.func.vmap` batches over a grid of variances."""

from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch

from ..checks import check_positive_int
from ..kernel import Kernel
from ..stax.conv import Conv, ConvLocal, ConvTranspose
from ..stax.linear import Affine
from ..stax.module import Layer
from ..stax.requirements import Bool, Diagonal, Requirements
from .newton import autograd_jacobian

#: Side length per spatial dimension of the images a convolutional block is
#: analysed on when `spatial_shape` is not given.
DEFAULT_SPATIAL_SIZE = 8


class BlockKernelMap:
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
            if not isinstance(spatial_shape, Sequence) or isinstance(spatial_shape, str):
                raise TypeError(f"fixed_points: spatial_shape must be a sequence of ints, "
                                f"got {spatial_shape!r}")
            shape = tuple(check_positive_int(size, f'spatial_shape[{i}]', 'fixed_points')
                          for i, size in enumerate(spatial_shape))
            if ranks and ranks != {len(shape)}:
                raise ValueError(f"fixed_points: spatial_shape={shape} has {len(shape)} "
                                 f"dimensions but the block's convolutions have {sorted(ranks)}")
            return shape
        if len(ranks) > 1:
            raise ValueError(f"fixed_points: the block mixes convolutions of {sorted(ranks)} "
                             "spatial dimensions; give spatial_shape")
        return (DEFAULT_SPATIAL_SIZE,) * (ranks.pop() if ranks else 0)

    def start(self, q0: float) -> torch.Tensor:
        """The white input kernel: `q0` on the variances, 0 between positions."""
        return torch.where(self.is_variance, q0, 0.).to(self.dtype)

    def generic_state(self, generator: torch.Generator) -> torch.Tensor:
        """A random covariance of one input over positions, in the state layout."""
        positions = math.prod(self.spatial)
        factor = torch.randn(positions, positions, generator=generator, dtype=self.dtype)
        covariance = factor @ factor.T / positions + torch.eye(positions, dtype=self.dtype)
        return covariance[self.position_left, self.position_right].to(self.device)

    def _kernel(self, q: torch.Tensor, q12: torch.Tensor,
                ntk: torch.Tensor | None = None) -> Kernel:
        q, q12 = q.reshape(self.state_shape), q12.reshape(self.state_shape)
        cov = q[None] if self.diagonal_batch else q[None, None]
        shape = (1, self.channels, *self.spatial)
        return Kernel(nngp=q12[None, None],
                      ntk=None if ntk is None else ntk.reshape(self.state_shape)[None, None],
                      cov1=cov, cov2=cov,
                      x1_is_x2=torch.zeros((), dtype=torch.bool, device=q.device),
                      is_gaussian=True, diagonal_batch=self.diagonal_batch,
                      diagonal_spatial=self.diagonal_spatial, shape1=shape, shape2=shape)

    def __call__(self, q: torch.Tensor, q12: torch.Tensor, W_var: torch.Tensor, b_var: torch.Tensor,
                 tangent: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
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

    def correlation(self, q: torch.Tensor, q12: torch.Tensor) -> torch.Tensor:
        """`q12[i] / sqrt(q[left[i]]·q[right[i]])` for `(G, n)` states."""
        return q12 / torch.sqrt(q[..., self.left] * q[..., self.right])

    def is_covariance(self, q: torch.Tensor, q12: torch.Tensor, slack: float) -> torch.Tensor:
        """`(G,)`: whether `q` has variances ≥ 0 and `q12² ≤ q[left]·q[right]`
        (correlations in [−1, 1], up to a relative `slack`)."""
        bound = q[..., self.left] * q[..., self.right]
        return (q[..., self.is_variance] >= 0).all(-1) & (q12 * q12 <= bound * (1 + slack)).all(-1)

    def variance(self, q: torch.Tensor, W_var: torch.Tensor, b_var: torch.Tensor) -> torch.Tensor:
        """The variance map `V(q)` for one grid point."""
        return self(q, q, W_var, b_var)[0]

    def variance_jacobian_pattern(self) -> torch.Tensor:
        """Which entries of `∂V/∂q` can be nonzero: those nonzero at two random points."""
        generator = torch.Generator().manual_seed(0)
        x = torch.stack([self.generic_state(generator) for _ in range(2)])
        params = [torch.tensor([1.3, 0.7], dtype=x.dtype, device=x.device),
                  torch.tensor([0.1, 0.3], dtype=x.dtype, device=x.device)]
        with torch.no_grad():
            return (autograd_jacobian(self.variance)(x, params)[1] != 0).any(0)
