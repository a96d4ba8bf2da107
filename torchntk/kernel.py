"""The `Kernel` record that flows from layer to layer.

Layout (PyTorch convention: batch axis 0, channel axis 1, spatial axes after):
with `S = (X, Y, ...)` the spatial sizes of the activations,

=====================  ============================  ==========================
field                  ``diagonal_spatial=False``    ``diagonal_spatial=True``
=====================  ============================  ==========================
``nngp``, ``ntk``      ``(N1, N2, X, X', Y, Y', …)`` ``(N1, N2, X, Y, …)``
``cov1``               ``(N1, [N1,] X, X', …)``       ``(N1, [N1,] X, …)``
``cov2``               ``(N2, [N2,] X, X', …)``       ``(N2, [N2,] X, …)``
=====================  ============================  ==========================

where ``[N1,]`` is present only when ``diagonal_batch=False``. Spatial axes of
a pair are interleaved, as in neural-tangents. Channels are the infinite axis
and do not appear.

Masks (neural-tangents' ``mask1``/``mask2``) are boolean tensors in the layout
of the activations, ``(N, C, *S)`` with any axis possibly of size 1
(broadcast); ``True`` marks a masked entry, e.g. padding of variable-length
inputs. A covariance that involves a masked position is zero wherever a layer
says so (`torchntk.stax.Layer.remask`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import torch

from .ops.extension import empty_huge_pages

Shape = tuple[int, ...]
# The covariance fields of a `Kernel`, which layers' rules map.
COVARIANCES = ('nngp', 'ntk', 'cov1', 'cov2')
# How each field of a `Kernel` depends on the examples of x1 and x2, which says
# how the kernel of two batches is put together from blocks of their examples
# (`torchntk.batching`): 'pair' (N1, N2, …), one entry per pair of an x1 and an
# x2 example; 'cov1'/'cov2' the covariances of x1 (x2) with itself, per example
# or, without diagonal_batch, per pair (N, N, …); 'side1'/'side2' (N, …), per
# example of x1 (x2); 'same_inputs' whether x1 is x2; 'shape1'/'shape2' shapes
# whose first size is the batch's; 'const' the same for any examples.
FIELD_ROLES = {'nngp': 'pair', 'ntk': 'pair', 'cov1': 'cov1', 'cov2': 'cov2',
               'x1_is_x2': 'same_inputs', 'is_gaussian': 'const', 'diagonal_batch': 'const',
               'diagonal_spatial': 'const', 'iid_channels': 'const', 'shape1': 'shape1',
               'shape2': 'shape2', 'mask1': 'side1', 'mask2': 'side2'}


@dataclasses.dataclass(frozen=True)
class Kernel:
    """Immutable record of the kernels of a layer's outputs; change it with `replace`.

    It owns its layout: `map_covariances` applies a layer's covariance rule to
    every covariance field with that field's batch axes, `transpose` gives the
    kernel of the swapped batches (`transpose_pair` for one pair field), and
    `slice_examples` the kernel of some examples of each batch.

    Attributes:
        nngp: covariance of the outputs on `x1` and on `x2` (the NNGP kernel).
        ntk: the neural tangent kernel between `x1` and `x2`, or `None` when not
            requested. At the network input it is a scalar zero.
        cov1: covariance of the outputs on `x1` with themselves.
        cov2: covariance of the outputs on `x2` with themselves; `None` when
            `x2` is `x1`.
        x1_is_x2: 0-dim bool tensor, whether the two batches are the same inputs.
        is_gaussian: whether the outputs are zero-mean Gaussian given the
            inputs (true right after an affine layer); nonlinearities require
            it. The inputs themselves are not (they are fixed values), as in
            neural-tangents.
        diagonal_batch: `cov1`/`cov2` hold only the variance of each example.
        diagonal_spatial: every field holds only same-position covariances.
        shape1, shape2: shapes of the finite-width activations on `x1`, `x2`.
        mask1, mask2: boolean masks of the activations on `x1`, `x2`
            (broadcastable to `shape1`, `shape2`; `True` for masked), or `None`
            without masking. `mask2` is also `None` when `x2` is `x1`: `mask1`
            then holds for both.
        iid_channels: whether the channels are identically distributed given
            the inputs, so that the average over channels of a product of
            independent branches is the product of their kernels (`FanInProd`).
            True after an affine layer; false for the inputs themselves (fixed
            values), after `Flatten` (positions differ) and after a channel
            `FanInConcat`, until the next affine layer.
    """

    nngp: torch.Tensor
    ntk: torch.Tensor | None
    cov1: torch.Tensor
    cov2: torch.Tensor | None
    x1_is_x2: torch.Tensor
    is_gaussian: bool
    diagonal_batch: bool
    diagonal_spatial: bool
    shape1: Shape
    shape2: Shape
    mask1: torch.Tensor | None = None
    mask2: torch.Tensor | None = None
    iid_channels: bool = True

    def replace(self, **changes: Any) -> Kernel:
        return dataclasses.replace(self, **changes)

    @property
    def cov_batch_ndim(self) -> int:
        """Number of batch axes of `cov1`/`cov2`: 1 with `diagonal_batch`, else 2."""
        return 1 if self.diagonal_batch else 2

    def map_covariances(self, rule: Callable[[torch.Tensor, int], torch.Tensor],
                        fields: Sequence[str] = COVARIANCES, **changes: Any) -> Kernel:
        """The kernel with `rule(cov, batch_ndim)` applied to each covariance
        field in `fields` and the other fields in `changes` replaced (one
        copy): `nngp` and `ntk` have 2 leading batch axes, `cov1` and `cov2`
        `cov_batch_ndim`. Absent fields (`None`) stay absent, and a 0-dim
        field (the scalar zero NTK of the inputs) passes through: every linear
        map of a layer leaves that zero a zero."""
        cov_batch_ndim = self.cov_batch_ndim
        for name in fields:
            t = getattr(self, name)
            if t is not None and t.ndim != 0:
                changes[name] = rule(t, 2 if name in ('nngp', 'ntk') else cov_batch_ndim)
        return self.replace(**changes)

    def slice_examples(self, rows1: slice, rows2: slice) -> Kernel:
        """The kernel of the examples `x1[rows1]` and `x2[rows2]`. A mask whose
        batch axis broadcasts (size 1) keeps it while examples are left; the
        slices are the same inputs where the whole batches were and
        `rows1 == rows2`, else not."""
        n1, n2 = len(range(self.shape1[0])[rows1]), len(range(self.shape2[0])[rows2])

        def own(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
            return None if t is None else t[rows] if self.diagonal_batch else t[rows, rows]

        def side(mask: torch.Tensor | None, rows: slice, n: int) -> torch.Tensor | None:
            if mask is None:
                return None
            return mask[:min(n, 1)] if mask.shape[0] == 1 else mask[rows]

        same = rows1 == rows2
        pairs = self.map_covariances(lambda t, _: t[rows1, rows2], ('nngp', 'ntk'))
        cov2, mask2 = self.cov2, self.mask2
        if not same and cov2 is None:  # x2 is x1: its side is x1's
            cov2, mask2 = self.cov1, self.mask1
        return pairs.replace(cov1=own(self.cov1, rows1), cov2=own(cov2, rows2),
                             mask1=side(self.mask1, rows1, n1), mask2=side(mask2, rows2, n2),
                             shape1=(n1, *self.shape1[1:]), shape2=(n2, *self.shape2[1:]),
                             x1_is_x2=self.x1_is_x2 if same else torch.zeros_like(self.x1_is_x2))

    def transpose(self) -> Kernel:
        """The kernel of `(x2, x1)`: `nngp`/`ntk` by `transpose_pair`, and the
        fields of the two sides swapped (`cov2 = None` meant `cov1` for both)."""
        ntk = self.ntk if self.ntk is None or self.ntk.ndim == 0 else \
            transpose_pair(self.ntk, self.diagonal_spatial)
        return self.replace(
            nngp=transpose_pair(self.nngp, self.diagonal_spatial), ntk=ntk,
            cov1=self.cov1 if self.cov2 is None else self.cov2,
            cov2=None if self.cov2 is None else self.cov1,
            shape1=self.shape2, shape2=self.shape1,
            mask1=self.mask1 if self.mask2 is None else self.mask2,
            mask2=None if self.mask2 is None else self.mask1)

    @property
    def n_spatial(self) -> int:
        """Number of spatial dimensions of the activations."""
        return len(self.shape1) - 2

    @property
    def spatial1(self) -> Shape:
        return tuple(self.shape1[2:])

    @property
    def spatial2(self) -> Shape:
        return tuple(self.shape2[2:])

    def variances(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example, per-position variances `(N1, *S)` and `(N2, *S)`."""
        var1 = _variance(self.cov1, self.diagonal_batch, self.diagonal_spatial, self.n_spatial)
        cov2 = self.cov1 if self.cov2 is None else self.cov2
        var2 = _variance(cov2, self.diagonal_batch, self.diagonal_spatial, self.n_spatial)
        return var1, var2

    def outer(self, var1: torch.Tensor, var2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example quantities `(N1, *S)`, `(N2, *S)` made broadcastable
        against `nngp`/`ntk`: entry `[i, j, x, x', …]` sees `var1[i, x, …]` and
        `var2[j, x', …]`."""
        return (_spread(var1, 0, self.diagonal_spatial), _spread(var2, 1, self.diagonal_spatial))

    def outer_self(self, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example quantities `(N, *S)` made broadcastable against `cov1`
        (or `cov2`), in the same sense as `outer`."""
        if not self.diagonal_batch:
            return self.outer(var, var)
        if self.diagonal_spatial:
            return var, var
        return _spread_spatial(var, 0), _spread_spatial(var, 1)

    def position_masks(self, caller: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-example, per-position masks `(N1, *S)` and `(N2, *S)`, or `None`
        without masking (see `position_mask`)."""
        if self.mask1 is None:
            return None
        mask1 = position_mask(self.mask1, self.shape1, caller)
        mask2 = mask1 if self.mask2 is None else position_mask(self.mask2, self.shape2, caller)
        return mask1, mask2

    def masked(self, mask1: torch.Tensor | None, mask2: torch.Tensor | None,
               caller: str) -> Kernel:
        """The kernel with masks `mask1`, `mask2` and every covariance that
        involves a masked position set to zero (neural-tangents' `Kernel.mask`)."""
        k = self.replace(mask1=mask1, mask2=mask2)
        masks = k.position_masks(caller)
        if masks is None:
            return k
        mask1, mask2 = masks

        def zero(t: torch.Tensor | None, spread: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
            return None if t is None else torch.where(torch.logical_or(*spread), 0., t)

        return k.replace(nngp=zero(k.nngp, k.outer(mask1, mask2)),
                         ntk=zero(k.ntk, k.outer(mask1, mask2)),
                         cov1=zero(k.cov1, k.outer_self(mask1)),
                         cov2=zero(k.cov2, k.outer_self(mask2)))


def transpose_pair(t: torch.Tensor, diagonal_spatial: bool | None) -> torch.Tensor:
    """`K(x2, x1)` from a pair field `K(x1, x2)`: swap the batch axes and, in
    the full spatial layout `(N1, N2, X, X', Y, Y', …)`, each pair of spatial
    axes (`None` for `diagonal_spatial` is read as the full layout)."""
    order = [1, 0]
    n_spatial = t.ndim - 2
    if diagonal_spatial or not n_spatial:
        order += range(2, t.ndim)
    else:
        for d in range(n_spatial // 2):
            order += [3 + 2 * d, 2 + 2 * d]
    return t.permute(order)


def position_mask(mask: torch.Tensor, shape: Shape, caller: str) -> torch.Tensor:
    """The `(N, *S)` mask of positions of activations of `shape` `(N, C, *S)`.

    Covariances are averages over the infinitely many channels, so only a mask
    that is the same for every channel has a kernel. Affine layers give such
    masks (an output position is masked when all its input channels are).
    """
    if mask.shape[1] != 1:
        if not torch.equal(mask, mask[:, :1].expand_as(mask)):
            raise ValueError(f"{caller}: the mask differs between channels at some position; "
                             "the infinite-width kernel needs a position masked in all channels "
                             "or in none (an affine layer before this one gives that)")
        mask = mask[:, :1]
    return mask[:, 0].expand(shape[0], *shape[2:])


def input_mask(x: torch.Tensor, mask_constant: float | None) -> torch.Tensor | None:
    """`x == mask_constant` (`isnan(x)` for a NaN constant), or `None` for no constant."""
    if mask_constant is None:
        return None
    return torch.isnan(x) if math.isnan(mask_constant) else x == mask_constant


def _variance(cov: torch.Tensor, diagonal_batch: bool, diagonal_spatial: bool,
              n_spatial: int) -> torch.Tensor:
    """Extract the same-example, same-position entries of a covariance."""
    if not diagonal_batch:
        cov = torch.diagonal(cov, dim1=0, dim2=1).movedim(-1, 0)
    if not diagonal_spatial:
        for _ in range(n_spatial):
            # Take the diagonal of the leading pair of spatial axes, move it last.
            cov = torch.diagonal(cov, dim1=1, dim2=2)
    return cov


def _spread_spatial(var: torch.Tensor, side: int) -> torch.Tensor:
    """`(N, X, Y, …) -> (N, X, 1, Y, 1, …)` (side 0) or `(N, 1, X, 1, Y, …)` (side 1)."""
    n_spatial = var.ndim - 1
    shape = [var.shape[0]]
    for size in var.shape[1:]:
        shape += [size, 1] if side == 0 else [1, size]
    return var.reshape(shape) if n_spatial else var


def _spread(var: torch.Tensor, side: int, diagonal_spatial: bool) -> torch.Tensor:
    """Place per-example variances on batch axis `side` of a pair layout."""
    var = var if diagonal_spatial else _spread_spatial(var, side)
    return var.unsqueeze(1) if side == 0 else var.unsqueeze(0)


def kernel_from_inputs(x1: torch.Tensor, x2: torch.Tensor | None, *, diagonal_batch: bool,
                       diagonal_spatial: bool, compute_ntk: bool,
                       mask_constant: float | None = None) -> Kernel:
    """The kernel of the inputs themselves: `nngp = x1·x2ᵀ / C` over channels.

    The NTK of the inputs is a scalar zero: they carry no parameters. Entries
    equal to `mask_constant` (NaN allowed) are masked: they count as zeros and
    their masks (`mask1`, and `mask2` when `x2` is given) go into the kernel.
    """
    mask1 = input_mask(x1, mask_constant)
    mask2 = None if x2 is None else input_mask(x2, mask_constant)
    if mask1 is not None:
        x1 = torch.where(mask1, 0., x1)
        x2 = None if x2 is None else torch.where(mask2, 0., x2)
    nngp = _gram(x1, x1 if x2 is None else x2, True, diagonal_spatial)
    if x2 is None:
        # The same numbers as nngp's own same-example entries, not a second rounding of them.
        cov1 = nngp if not diagonal_batch else torch.diagonal(nngp, 0, 0, 1).movedim(-1, 0)
    else:
        cov1 = _gram(x1, x1, not diagonal_batch, diagonal_spatial)
    cov2 = None if x2 is None else _gram(x2, x2, not diagonal_batch, diagonal_spatial)
    if x2 is None:
        x1_is_x2 = torch.ones((), dtype=torch.bool, device=x1.device)
    elif x1.shape == x2.shape:
        x1_is_x2 = _same_inputs(x1, x2)
    else:
        x1_is_x2 = torch.zeros((), dtype=torch.bool, device=x1.device)
    return Kernel(nngp=nngp,
                  ntk=torch.zeros((), dtype=nngp.dtype, device=nngp.device) if compute_ntk else None,
                  cov1=cov1, cov2=cov2, x1_is_x2=x1_is_x2, is_gaussian=False,
                  diagonal_batch=diagonal_batch, diagonal_spatial=diagonal_spatial,
                  shape1=tuple(x1.shape), shape2=tuple((x1 if x2 is None else x2).shape),
                  mask1=mask1, mask2=mask2, iid_channels=False)


def _same_inputs(x1: torch.Tensor, x2: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Whether `x1` and `x2` agree to `eps` everywhere (neural-tangents'
    `x1_is_x2`), as a 0-dim bool tensor. In pieces of 2¹⁶ entries or more, at
    most 64: the difference of whole large inputs would be a fresh tensor of
    their size, whose page faults cost more than the arithmetic."""
    a, b = x1.reshape(-1), x2.reshape(-1)
    pieces = max(1, min(64, a.numel() >> 16))
    largest = a.new_zeros(())
    for a_piece, b_piece in zip(a.chunk(pieces), b.chunk(pieces)):
        largest = torch.maximum(largest, torch.sub(a_piece, b_piece).abs_().max())
    return largest < eps


def _gram(xa: torch.Tensor, xb: torch.Tensor, pairwise: bool, diagonal_spatial: bool) -> torch.Tensor:
    """Channel-averaged products of `(N, C, *S)` inputs in the `Kernel` layout.

    `pairwise` gives all pairs of examples `(Na, Nb, …)`; otherwise only each
    example with itself `(N, …)`, which requires `xa is xb`.
    """
    spatial = xa.shape[2:]
    a = xa.reshape(xa.shape[0], xa.shape[1], -1)
    b = xb.reshape(xb.shape[0], xb.shape[1], -1)
    channels = xa.shape[1]
    if diagonal_spatial and pairwise and a.shape[-1] == 1 and not (
            torch.is_grad_enabled() and (xa.requires_grad or xb.requires_grad)):
        # Flat inputs: the N1 x N2 product straight into huge pages (its page
        # faults would cost a large fraction of the product itself).
        product = torch.mm(a[..., 0], b[..., 0].T, out=empty_huge_pages((len(a), len(b)), a))
        return product.div_(channels).reshape(len(a), len(b), *spatial)
    if diagonal_spatial:
        product = torch.einsum('nca,mca->nma' if pairwise else 'nca,nca->na', a, b)
        batch_shape = product.shape[:-1]
        # In place: the product is ours, and a second N1 x N2 tensor costs more
        # in fresh memory than the division.
        return product.reshape(*batch_shape, *spatial).div_(channels)
    product = torch.einsum('nca,mcb->nmab' if pairwise else 'nca,ncb->nab', a, b)
    batch_shape = product.shape[:-2]
    product = product.reshape(*batch_shape, *spatial, *spatial)
    return interleave(product, len(batch_shape)).div_(channels)


def interleave(t: torch.Tensor, n_batch: int) -> torch.Tensor:
    """`(B…, X, Y, X', Y') -> (B…, X, X', Y, Y')`: zip the spatial axes of a pair."""
    n_spatial = (t.ndim - n_batch) // 2
    order = list(range(n_batch))
    for d in range(n_spatial):
        order += [n_batch + d, n_batch + n_spatial + d]
    return t.permute(order)
