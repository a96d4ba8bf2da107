"""Kernel math of convolutions, pooling and resizing: linear maps of covariances.

Every function here maps a covariance tensor in the `Kernel` layout (see
`torchntk.kernel`) with `batch_ndim` leading batch axes (2 for `nngp`/`ntk`,
1 or 2 for `cov1`/`cov2`) to the covariance of the layer's outputs, in the
same layout. A layer `z = A x` that is linear in its input has output
covariance `A K Aᵀ`, applied to the `(X, X')` axes of each spatial dimension;
with `diagonal_spatial=True` only the same-position entries are kept. Layers
apply them through `Kernel.map_covariances`, which passes the scalar zero NTK
of the inputs by.

Padding names are neural-tangents': `'VALID'` (none), `'SAME'` (zeros, output
size `ceil(X / stride)`), `'CIRCULAR'` (`'SAME'` sizes, wrapping around).

References: Novak et al. 2019 (arXiv:1810.05148) for convolutions and
pooling; Garriga-Alonso et al. 2019 (arXiv:1808.05587); Arora et al. 2019
(arXiv:1904.11955) for the CNTK.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..ops import diagonal_conv, diagonal_conv_output_size
from ..ops.conv_chain import Window

PADDINGS = ('VALID', 'SAME', 'CIRCULAR')


# --- sizes and paddings: the one place that computes them -------------------------------------

def same_padding(size: int, k: int, stride: int) -> tuple[int, int]:
    """`(low, high)` zero padding of `'SAME'` windows (as TensorFlow, JAX and
    PyTorch's `padding='same'`): the output has `ceil(size / stride)` entries,
    the odd entry of padding goes high."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def conv_padding(size: int, k: int, stride: int, padding: str) -> tuple[int, int]:
    """`(low, high)` padding of a convolution or pooling window along one axis
    (`'CIRCULAR'` pads as much as `'SAME'`, by wrapping around)."""
    return (0, 0) if padding == 'VALID' else same_padding(size, k, stride)


def chain_windows(spatial_sizes: Sequence[int], window_shape: Sequence[int],
                  strides: Sequence[int], padding: str) -> tuple[Window, ...]:
    """A convolution's or pooling layer's window along each spatial axis, with
    its padding, as the fused chain's steps carry them."""
    return tuple(Window(k, stride, *conv_padding(size, k, stride, padding))
                 for size, k, stride in zip(spatial_sizes, window_shape, strides))


def conv_output_size(size: int, k: int, stride: int, padding: str) -> int:
    return diagonal_conv_output_size(size, k, stride, conv_padding(size, k, stride, padding))


def transpose_padding(k: int, stride: int, padding: str) -> tuple[int, int]:
    """`(low, high)` zero padding of the stride-dilated input of a transposed
    convolution (as `jax.lax.conv_transpose`); `'CIRCULAR'` pads as `'VALID'`
    and folds the result afterwards (`fold_circular`)."""
    if padding == 'SAME':
        total = k + stride - 2
        low = k - 1 if stride > k - 1 else -(-total // 2)
    else:
        total = k + stride - 2 + max(k - stride, 0)
        low = k - 1
    return low, total - low


def transpose_output_size(size: int, k: int, stride: int, padding: str) -> int:
    if padding == 'VALID':
        return size * stride + max(k - stride, 0)
    return size * stride


# --- one-axis linear maps ---------------------------------------------------------------------

def pad_axis(t: torch.Tensor, axis: int, low: int, high: int,
             circular: bool = False) -> torch.Tensor:
    """Pad (or, for negative amounts, crop) axis `axis` of `t` with zeros or by wrapping."""
    if circular:
        size = t.shape[axis]
        index = torch.arange(-low, size + high, device=t.device) % size
        return t.index_select(axis, index)
    if low < 0:
        t = t.narrow(axis, -low, t.shape[axis] + low)
        low = 0
    if high < 0:
        t = t.narrow(axis, 0, t.shape[axis] + high)
        high = 0
    if not (low or high):
        return t
    parts = []
    for amount in (low, high):
        shape = list(t.shape)
        shape[axis] = amount
        parts.append(t.new_zeros(shape))
    return torch.cat([parts[0], t, parts[1]], dim=axis)


def box_sum(t: torch.Tensor, axis: int, k: int, stride: int) -> torch.Tensor:
    """`out[p] = Σ_{i<k} t[stride·p + i]` along `axis` (a VALID window sum)."""
    size = (t.shape[axis] - k) // stride + 1
    span = stride * (size - 1) + 1
    out = t.narrow(axis, 0, span)
    for i in range(1, k):
        out = out + t.narrow(axis, i, span)
    if stride > 1:
        index = torch.arange(0, span, stride, device=t.device)
        out = out.index_select(axis, index)
    return out


def dilate_axis(t: torch.Tensor, axis: int, stride: int) -> torch.Tensor:
    """Insert `stride − 1` zeros between consecutive entries along `axis`."""
    if stride == 1:
        return t
    shape = list(t.shape)
    shape[axis] = (t.shape[axis] - 1) * stride + 1
    index = torch.arange(0, shape[axis], stride, device=t.device)
    return t.new_zeros(shape).index_copy(axis, index, t)


def fold_circular(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """Wrap axis `axis` of length `L` onto `size` entries around its centre:
    `out[q] = Σ_m t[q + (L − size)//2 + m·size]` (circular transposed convolution)."""
    length = t.shape[axis]
    if length == size:
        return t
    repeats = -(-length // size)
    t = pad_axis(t, axis, 0, repeats * size - length)
    t = t.unflatten(axis, (repeats, size)).sum(axis)
    return torch.roll(t, -((length - size) // 2), axis)


def window_counts(size: int, k: int, stride: int, padding: str, like: torch.Tensor) -> torch.Tensor:
    """Number of non-padding entries in each pooling window along one axis."""
    ones = like.new_ones(size)
    low, high = conv_padding(size, k, stride, padding)
    return box_sum(pad_axis(ones, 0, low, high), 0, k, stride)


# --- layout helpers ---------------------------------------------------------------------------

def _pairs(cov: torch.Tensor, batch_ndim: int, diagonal_spatial: bool) -> list[tuple[int, ...]]:
    """The axes of each spatial dimension: `(X,)` or `(X, X')`."""
    n_spatial = cov.ndim - batch_ndim
    if diagonal_spatial:
        return [(batch_ndim + d,) for d in range(n_spatial)]
    return [(batch_ndim + 2 * d, batch_ndim + 2 * d + 1) for d in range(n_spatial // 2)]


def spatial_diagonal(cov: torch.Tensor, batch_ndim: int) -> torch.Tensor:
    """`(B…, X, X', Y, Y', …) -> (B…, X, Y, …)`: the same-position entries."""
    for _ in range((cov.ndim - batch_ndim) // 2):
        cov = torch.diagonal(cov, dim1=batch_ndim, dim2=batch_ndim + 1)
    return cov


def embed_spatial_diagonal(cov: torch.Tensor, batch_ndim: int) -> torch.Tensor:
    """`(B…, X, Y, …) -> (B…, X, X', Y, Y', …)`, zero off the spatial diagonal."""
    n_spatial = cov.ndim - batch_ndim
    for d in range(n_spatial):
        axis = batch_ndim + 2 * d
        cov = torch.diag_embed(cov.movedim(axis, -1), dim1=axis, dim2=axis + 1)
    return cov


# --- kernel rules -----------------------------------------------------------------------------

def conv(cov: torch.Tensor, batch_ndim: int, diagonal_spatial: bool, filter_shape: Sequence[int],
         strides: Sequence[int], padding: str) -> torch.Tensor:
    r"""Covariance after a shared-weight convolution with unit-variance filters
    averaged over the window (Novak et al. 2019, eq. 7), per spatial dimension

        out[p, q] = (1/k) Σ_{i<k} cov_pad[s·p + i, s·q + i],

    and with `diagonal_spatial` its same-position form
    `out[p] = (1/k) Σ_i cov_pad[s·p + i]` (a box average).
    """
    circular = padding == 'CIRCULAR'
    for axes, k, stride in zip(_pairs(cov, batch_ndim, diagonal_spatial), filter_shape, strides):
        size = cov.shape[axes[0]]
        low, high = conv_padding(size, k, stride, padding)
        if diagonal_spatial:
            cov = box_sum(pad_axis(cov, axes[0], low, high, circular), axes[0], k, stride) / k
        else:
            cov = _along_pair(cov, axes, lambda c: diagonal_conv(c, k, stride, (low, high),
                                                                 circular))
    return cov


def _along_pair(cov: torch.Tensor, axes: tuple[int, int], fn) -> torch.Tensor:
    """Apply `fn: (B, X, X', R) -> (B, P, P', R)` to the adjacent pair `axes`:
    the axes before it form `B`, those after it `R` (a view, no copy)."""
    shape = cov.shape
    batch, rest = math.prod(shape[:axes[0]]), math.prod(shape[axes[1] + 1:])
    out = fn(cov.reshape(batch, shape[axes[0]], shape[axes[1]], rest))
    return out.reshape(*shape[:axes[0]], out.shape[1], out.shape[2], *shape[axes[1] + 1:])


def conv_transpose(cov: torch.Tensor, batch_ndim: int, diagonal_spatial: bool,
                   filter_shape: Sequence[int], strides: Sequence[int],
                   padding: str) -> torch.Tensor:
    r"""Covariance after a shared-weight transposed convolution: the
    convolution rule with stride 1 on the stride-dilated, padded input
    (`transpose_padding`),

        out[p, q] = (1/k) Σ_{i<k} cov_dil_pad[p + i, q + i],

    folded circularly for `'CIRCULAR'` (`fold_circular`, on each axis).
    """
    for axes, k, stride in zip(_pairs(cov, batch_ndim, diagonal_spatial), filter_shape, strides):
        size = cov.shape[axes[0]]
        low, high = transpose_padding(k, stride, 'VALID' if padding == 'CIRCULAR' else padding)
        for axis in axes:
            cov = dilate_axis(cov, axis, stride)
        if diagonal_spatial:
            cov = box_sum(pad_axis(cov, axes[0], low, high), axes[0], k, 1) / k
        else:
            cov = _along_pair(cov, axes, lambda c: diagonal_conv(c, k, 1, (low, high), False))
        if padding == 'CIRCULAR':
            for axis in axes:
                cov = fold_circular(cov, axis, size * stride)
    return cov


def pool(cov: torch.Tensor, batch_ndim: int, diagonal_spatial: bool, window_shape: Sequence[int],
         strides: Sequence[int], padding: str, average: bool = True,
         normalize_edges: bool = False) -> torch.Tensor:
    r"""Covariance after sum or average pooling: the window is a box on both
    axes of each pair (Novak et al. 2019, §3.2),

        out[p, q] = Σ_{i, j < k} cov_pad[s·p + i, s·q + j] / (n_p n_q),

    with `n = k` for averages (`n = 1` for sums), or with `normalize_edges` the
    number of non-padding entries in the window. With `diagonal_spatial` the
    input must have zero covariance between different positions, so
    `out[p] = Σ_i cov_pad[s·p + i] / n_p²`.
    """
    circular = padding == 'CIRCULAR'
    for axes, k, stride in zip(_pairs(cov, batch_ndim, diagonal_spatial), window_shape, strides):
        size = cov.shape[axes[0]]
        low, high = conv_padding(size, k, stride, padding)
        norm = None
        if average:
            norm = (window_counts(size, k, stride, padding, cov)
                    if normalize_edges and padding == 'SAME' else cov.new_full((), float(k)))
        for axis in axes:
            cov = box_sum(pad_axis(cov, axis, low, high, circular), axis, k, stride)
        if norm is not None:
            norms = [norm ** 2] if diagonal_spatial else [norm, norm]
            for axis, n in zip(axes, norms):
                cov = cov / _along(n, axis, cov.ndim)
    return cov


def _along(vector: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """View a 1-d (or 0-d) tensor so that it broadcasts along `axis` of an `ndim`-d tensor."""
    if vector.ndim == 0:
        return vector
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def global_pool(cov: torch.Tensor, batch_ndim: int, diagonal_spatial: bool,
                average: bool = True) -> torch.Tensor:
    r"""Covariance after summing (or averaging) over all positions:
    `Σ_{p, q} cov[p, q]` (divided by `|S|²`); with `diagonal_spatial` the
    off-diagonal covariances are zero and it is `Σ_p cov[p]` (divided by `|S|²`)."""
    axes = tuple(range(batch_ndim, cov.ndim))
    out = cov.sum(axes)
    if average:
        size = math.prod([cov.shape[a[0]] for a in _pairs(cov, batch_ndim, diagonal_spatial)])
        out = out / size**2
    return out


def flatten(cov: torch.Tensor, batch_ndim: int, diagonal_spatial: bool) -> torch.Tensor:
    r"""Covariance of the flattened features `(C·|S|)`: the mean over positions
    of the same-position covariances, `(1/|S|) Σ_p cov[p, p]`."""
    if not diagonal_spatial:
        cov = spatial_diagonal(cov, batch_ndim)
    return cov.mean(tuple(range(batch_ndim, cov.ndim))) if cov.ndim > batch_ndim else cov


def resize_matrix(in_size: int, out_size: int, method: str, antialias: bool,
                  like: torch.Tensor) -> torch.Tensor:
    """The `(out_size, in_size)` matrix of `jax.image.resize` along one axis.

    `'linear'`: triangle-kernel weights at half-pixel centres, widened by the
    downsampling factor when `antialias`, renormalized to sum to one, zero for
    samples outside the input. `'nearest'`: `floor((p + ½)·in / out)`
    (in float32, as jax computes it).
    """
    if method == 'nearest':
        offsets = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * in_size / out_size)
        index = offsets.floor().long().to(like.device)
        return torch.nn.functional.one_hot(index, in_size).to(like.dtype)
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    scale = out_size / in_size
    kernel_scale = max(1 / scale, 1.) if antialias else 1.
    sample = (torch.arange(out_size, dtype=dtype) + 0.5) / scale - 0.5
    distance = (sample[:, None] - torch.arange(in_size, dtype=dtype)[None, :]).abs() / kernel_scale
    weights = (1 - distance).clamp_min(0)
    total = weights.sum(1, keepdim=True)
    weights = torch.where(total.abs() > 1000 * torch.finfo(torch.float32).eps,
                          weights / torch.where(total != 0, total, 1.), 0.)
    inside = (sample >= -0.5) & (sample <= in_size - 0.5)
    weights = torch.where(inside[:, None], weights, 0.)
    return weights.to(device=like.device, dtype=like.dtype)


def apply_along(t: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """`out[..., p, ...] = Σ_x matrix[p, x] t[..., x, ...]` along `axis`."""
    return torch.tensordot(t.movedim(axis, -1), matrix, dims=([-1], [1])).movedim(-1, axis)


def resize(cov: torch.Tensor, batch_ndim: int, diagonal_spatial: bool,
           matrices: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Covariance after a per-axis linear resize `z = M x`: `M cov Mᵀ` on each
    pair of axes (`None` leaves a spatial dimension unchanged). Resizing
    mixes positions, so it needs full spatial covariances."""
    for axes, matrix in zip(_pairs(cov, batch_ndim, diagonal_spatial), matrices):
        if matrix is None:
            continue
        if diagonal_spatial:
            raise ValueError("resize: resizing a spatial dimension needs diagonal_spatial=False")
        for axis in axes:
            cov = apply_along(cov, axis, matrix)
    return cov
