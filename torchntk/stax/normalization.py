"""Normalization layers: `LayerNorm`."""

from __future__ import annotations

from typing import Sequence

import torch

from ..checks import check_axes, check_nonnegative
from ..kernel import Kernel
from .module import Layer
from .requirements import Requirements


class LayerNorm(Layer):
    """`(x − mean(x)) / sqrt(var(x) + eps)` over `axis` (must include channels, axis 1).

    With infinitely many channels the mean of a Gaussian input is zero and its
    variance is the kernel's diagonal, so (neural-tangents' LayerNorm rule)

        nngp' = nngp / sqrt(v1 v2),   ntk' = ntk / sqrt(v1 v2),

    where `v1`, `v2` are `eps` plus the variances averaged over the
    non-channel axes in `axis` (batch axis 0 and spatial axes allowed); with
    masks, over the unmasked positions (masked ones count as zeros).
    """

    def __init__(self, axis: int | Sequence[int] = 1, eps: float = 1e-12) -> None:
        super().__init__()
        axes = check_axes(axis, 'axis', 'LayerNorm')
        if not axes:
            raise ValueError("LayerNorm: axis must name at least one axis, got ()")
        check_nonnegative(eps, 'eps', 'LayerNorm')
        self.axis, self.eps = axes, eps

    @property
    def requirements(self) -> Requirements:
        # Over the batch axis its statistics couple the examples of a batch.
        return Requirements(gaussian_input=True, coupled_axes=self.axis)

    def _axes(self, ndim: int) -> tuple[int, ...]:
        axes = tuple(sorted({a % ndim for a in self.axis if -ndim <= a < ndim}))
        if len(axes) != len(set(self.axis)):
            raise ValueError(f"LayerNorm: axis={self.axis} out of range for {ndim}-d inputs")
        if 1 not in axes:
            raise ValueError(f"LayerNorm: axis must include the channel axis 1 (the infinite-width "
                             f"limit normalizes over channels), got axis={self.axis}")
        return axes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = self._axes(x.ndim)
        mean = x.mean(dim=axes, keepdim=True)
        var = x.var(dim=axes, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + self.eps)

    def forward_with_mask(self, x: torch.Tensor,
                          mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Statistics over the unmasked entries; masked entries stay masked."""
        if mask is None:
            return self(x), None
        axes = self._axes(x.ndim)
        mask = mask.expand_as(x)
        mean = _masked_mean(x, axes, mask)
        var = _masked_mean(torch.where(mask, 0., x - mean)**2, axes, mask)
        return (x - mean) / torch.sqrt(var + self.eps), mask

    def kernel_rule(self, k: Kernel) -> Kernel:
        # Axes of the per-example variances (N, *S): activation axis a ≥ 2 is a - 1.
        var_axes = tuple(0 if a == 0 else a - 1 for a in self._axes(len(k.shape1)) if a != 1)
        var1, var2 = (v + self.eps for v in k.variances())
        if var_axes:
            masks = k.position_masks(self._name()) or (None, None)
            var1, var2 = (_masked_mean(v, var_axes, m).expand_as(v)
                          for v, m in zip((var1, var2), masks))
        norm12 = torch.sqrt(torch.mul(*k.outer(var1, var2)))
        norm1 = torch.sqrt(torch.mul(*k.outer_self(var1)))
        norm2 = torch.sqrt(torch.mul(*k.outer_self(var2)))
        return k.replace(nngp=k.nngp / norm12,
                         ntk=None if k.ntk is None else k.ntk / norm12,
                         cov1=k.cov1 / norm1,
                         cov2=None if k.cov2 is None else k.cov2 / norm2)

    def extra_repr(self) -> str:
        return f"axis={self.axis[0] if len(self.axis) == 1 else self.axis}, eps={self.eps}"


def _masked_mean(t: torch.Tensor, axes: tuple[int, ...], mask: torch.Tensor | None) -> torch.Tensor:
    """Sum over `axes` divided by the number of unmasked entries there (at
    least 1), as neural-tangents' `mean_and_var`; the plain mean without a mask."""
    if mask is None:
        return t.mean(dim=axes, keepdim=True)
    count = (~mask).expand_as(t).sum(dim=axes, keepdim=True).clamp_min(1)
    return t.sum(dim=axes, keepdim=True) / count
