"""Pooling: `AvgPool`, `SumPool`, `GlobalAvgPool`, `GlobalSumPool`, and `Flatten`.

All are linear and parameter-free: the output covariance is the input
covariance pooled on both positions of each pair
(`torchntk.functional.conv`). Local pooling mixes positions, so it needs the
covariances between different positions unless those are zero (after
`ConvLocal`); global pooling and `Flatten` end the spatial part of a network,
so the layers before them may keep only what these read.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..checks import check_choice, check_flag, check_input_rank, check_window
from ..functional import conv as conv_maps
from ..kernel import Kernel, Shape, position_mask
from ..ops import conv_chain
from .finite_conv import pad_input, window_centre_mask
from .module import Layer
from .requirements import Bool, Diagonal, Requirements

_AVG_POOL_FNS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


class _Pool(Layer):
    """Shared arguments and rule of `AvgPool` and `SumPool`."""

    average = True
    remask = True

    def __init__(self, window_shape: Sequence[int], strides: Sequence[int] | None = None,
                 padding: str = 'VALID', normalize_edges: bool = False) -> None:
        super().__init__()
        name = self._name()
        self.window_shape = check_window(window_shape, 'window_shape', name)
        self.strides = check_window(strides, 'strides', name, len(self.window_shape)) or \
            (1,) * len(self.window_shape)
        self.padding = check_choice(padding, 'padding', name, conv_maps.PADDINGS)
        self.normalize_edges = check_flag(normalize_edges, 'normalize_edges', name)

    @property
    def n_spatial(self) -> int:
        return len(self.window_shape)

    @property
    def requirements(self) -> Requirements:
        return Requirements(diagonal_spatial=Diagonal(input=Bool.MAYBE))

    def output_shape(self, input_shape: Shape) -> Shape:
        check_input_rank(input_shape, self.n_spatial, self._name())
        return (*input_shape[:2], *(conv_maps.conv_output_size(size, k, stride, self.padding)
                                    for size, k, stride in zip(input_shape[2:], self.window_shape,
                                                               self.strides)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_rank(x.shape, self.n_spatial, self._name())
        pool = _AVG_POOL_FNS[self.n_spatial]
        out = pool(pad_input(x, self.window_shape, self.strides, self.padding),
                   self.window_shape, self.strides)
        if not self.average:
            return out * math.prod(self.window_shape)
        if self.normalize_edges and self.padding == 'SAME':
            inside = pad_input(x.new_ones(1, 1, *x.shape[2:]), self.window_shape, self.strides,
                               self.padding)
            out = out / pool(inside, self.window_shape, self.strides)
        return out

    def kernel_rule(self, k: Kernel) -> Kernel:
        check_input_rank(k.shape1, self.n_spatial, self._name())
        return k.map_covariances(
            lambda cov, batch_ndim: conv_maps.pool(cov, batch_ndim, k.diagonal_spatial,
                                                   self.window_shape, self.strides, self.padding,
                                                   self.average, self.normalize_edges),
            shape1=self.output_shape(k.shape1), shape2=self.output_shape(k.shape2))

    def mask_rule(self, mask: torch.Tensor, input_shape: Shape) -> torch.Tensor:
        positions = position_mask(mask, input_shape, self._name()).unsqueeze(1)
        return window_centre_mask(positions, input_shape[2:], self.window_shape, self.strides,
                                  self.padding)

    @property
    def chain_step_kind(self) -> type[conv_chain.PoolStep] | None:
        # The exact types (a subclass may change the rule), and no averages
        # normalized at 'SAME' edges (divided per position, not by one scale).
        fused = type(self) in (AvgPool, SumPool) and not (
            self.normalize_edges and self.padding == 'SAME')
        return conv_chain.PoolStep if fused else None

    def chain_step(self, input_shape: Shape) -> conv_chain.PoolStep | None:
        if len(input_shape) != self.n_spatial + 2:
            return None   # the layer's own rule raises the error
        windows = conv_maps.chain_windows(input_shape[2:], self.window_shape, self.strides,
                                          self.padding)
        scale = 1 / math.prod(self.window_shape)**2 if self.average else 1.
        return conv_chain.PoolStep(scale, self.padding == 'CIRCULAR', windows)

    def extra_repr(self) -> str:
        text = f"{self.window_shape}"
        if self.strides != (1,) * self.n_spatial:
            text += f", strides={self.strides}"
        if self.padding != 'VALID':
            text += f", padding={self.padding!r}"
        if self.normalize_edges:
            text += ", normalize_edges=True"
        return text


class AvgPool(_Pool):
    r"""Average over windows (`torch.nn.AvgPool{1,2,3}d`, neural-tangents' defaults).

    :math:`z[p] = (1/n_p) Σ_{i<k} x_pad[s·p + i]` per spatial dimension, with
    `n_p = k`, or with `normalize_edges=True` and `'SAME'` padding the number of
    non-padding entries in the window (`count_include_pad=False`). The kernel
    pools both positions of each pair: `K'[p, q] = Σ_{i,j} K[s·p+i, s·q+j] / (n_p n_q)`.
    With masks, an output is masked when its window's centre is (masked
    entries count as zeros, as in neural-tangents).

    Args:
        window_shape: window size per spatial dimension, e.g. `(2, 2)`.
        strides: stride per spatial dimension; `None` for 1 (as neural-tangents;
            `torch.nn.AvgPool2d` defaults to the window size).
        padding: `'VALID'`, `'SAME'` or `'CIRCULAR'`.
        normalize_edges: divide by the true window size at `'SAME'` edges.

    Shape:
        Input `(N, C, *S)`, output `(N, C, *S_out)` as for `Conv`.
    """


class SumPool(_Pool):
    r"""Sum over windows: `AvgPool` times the window size, `z[p] = Σ_{i<k} x_pad[s·p + i]`.

    Args:
        window_shape, strides, padding: as `AvgPool`.

    Shape:
        As `AvgPool`.
    """

    average = False

    def __init__(self, window_shape: Sequence[int], strides: Sequence[int] | None = None,
                 padding: str = 'VALID') -> None:
        super().__init__(window_shape, strides, padding)


class _GlobalPool(Layer):
    """Reduce all spatial axes; the output is `(N, C)`.

    With masks, the average divides by the number of unmasked positions of
    each example, `z = (1/n) Σ_p x[p]`, so `K' = Σ_{p,q} K[p, q] / (n n')`
    (neural-tangents; with its `diagonal_spatial=True` it divides by
    `|S|·n_both` instead, which disagrees with its own full-spatial kernel).
    """

    average = True

    @property
    def requirements(self) -> Requirements:
        return Requirements(diagonal_spatial=Diagonal(input=Bool.MAYBE, output=Bool.YES))

    def output_shape(self, input_shape: Shape) -> Shape:
        return tuple(input_shape[:2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = tuple(range(2, x.ndim))
        return x.mean(axes) if self.average else x.sum(axes)

    def forward_with_mask(self, x: torch.Tensor,
                          mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if mask is None:
            return self(x), None
        out_mask = self.mask_rule(mask, x.shape)
        if not self.average:
            return self(x), out_mask
        count = self._unmasked_count(position_mask(mask, x.shape, self._name()))
        return x.sum(tuple(range(2, x.ndim))) / count.unsqueeze(1), out_mask

    @staticmethod
    def _unmasked_count(positions: torch.Tensor) -> torch.Tensor:
        """Number of unmasked positions of each example, at least 1."""
        return (~positions).flatten(1).sum(1).clamp_min(1)

    def kernel_rule(self, k: Kernel) -> Kernel:
        masks = k.position_masks(self._name()) if self.average else None
        average = self.average and masks is None
        pooled = k.map_covariances(lambda cov, batch_ndim: conv_maps.global_pool(
            cov, batch_ndim, k.diagonal_spatial, average))
        nngp, ntk, cov1, cov2 = pooled.nngp, pooled.ntk, pooled.cov1, pooled.cov2
        if masks is not None:
            count1, count2 = (self._unmasked_count(m).to(nngp.dtype) for m in masks)

            def per_pair(n_a: torch.Tensor, n_b: torch.Tensor, pairwise: bool) -> torch.Tensor:
                return n_a[:, None] * n_b[None, :] if pairwise else n_a * n_b

            nngp = nngp / per_pair(count1, count2, True)
            ntk = None if ntk is None else ntk / per_pair(count1, count2, True)
            cov1 = cov1 / per_pair(count1, count1, not k.diagonal_batch)
            cov2 = None if cov2 is None else cov2 / per_pair(count2, count2, not k.diagonal_batch)
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2,
                         shape1=self.output_shape(k.shape1), shape2=self.output_shape(k.shape2))

    def mask_rule(self, mask: torch.Tensor, input_shape: Shape) -> torch.Tensor:
        positions = position_mask(mask, input_shape, self._name())
        return positions.flatten(1).all(1, keepdim=True)


class GlobalAvgPool(_GlobalPool):
    r"""Mean over all positions: :math:`z = (1/|S|) Σ_p x[p]`,
    `K' = (1/|S|²) Σ_{p,q} K[p, q]` (Novak et al. 2019, arXiv:1810.05148).

    Shape:
        Input `(N, C, *S)`, output `(N, C)`.
    """


class GlobalSumPool(_GlobalPool):
    r"""Sum over all positions: :math:`z = Σ_p x[p]`, `K' = Σ_{p,q} K[p, q]`.

    Shape:
        Input `(N, C, *S)`, output `(N, C)`.
    """

    average = False


class Flatten(Layer):
    r"""Flatten channels and positions into one feature axis (`torch.nn.Flatten`).

    A following `Dense` layer has independent weights per position, so only
    same-position covariances survive: `K' = (1/|S|) Σ_p K[p, p]` (Novak et al.
    2019, arXiv:1810.05148, "vectorization"). The output is no longer Gaussian
    per channel (channels at different positions are not identically
    distributed), so a nonlinearity, or a `FanInProd` with another such
    branch, needs an affine layer after it.

    Shape:
        Input `(N, C, *S)`, output `(N, C·prod(S))`.
    """

    @property
    def requirements(self) -> Requirements:
        return Requirements(diagonal_spatial=Diagonal(input=Bool.YES, output=Bool.YES))

    def output_shape(self, input_shape: Shape) -> Shape:
        return (input_shape[0], math.prod(input_shape[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)   # reshape(N, -1) is ambiguous for N = 0

    def mask_rule(self, mask: torch.Tensor, input_shape: Shape) -> torch.Tensor:
        return mask.expand(input_shape).reshape(input_shape[0], -1)

    def kernel_rule(self, k: Kernel) -> Kernel:
        return k.map_covariances(
            lambda cov, batch_ndim: conv_maps.flatten(cov, batch_ndim, k.diagonal_spatial),
            is_gaussian=False, diagonal_spatial=False,
            # Features at different positions have different kernels.
            iid_channels=k.iid_channels and math.prod(k.spatial1) == 1,
            shape1=self.output_shape(k.shape1), shape2=self.output_shape(k.shape2))
