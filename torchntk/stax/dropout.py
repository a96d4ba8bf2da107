"""`Dropout`, whose kernel follows the module's train/eval mode."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_real
from ..kernel import Kernel
from .module import Layer
from .requirements import Requirements


class Dropout(Layer):
    """Zero each entry with probability `p` and scale the rest by `1/(1 − p)` (PyTorch's `p`).

    In training mode the kernel gains the dropout noise on its diagonal:
    entries pairing an example with itself at the same position are multiplied
    by `1/(1 − p)` (the NNGP/NTK only when `x1` is `x2`); the outputs are no
    longer Gaussian. In eval mode dropout is the identity, and so is its kernel.
    neural-tangents' `Dropout(rate)` keeps with probability `rate = 1 − p`.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        p = check_real(p, 'p (the drop probability)', 'Dropout')
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p (the drop probability) must be in [0, 1), got {p!r}")
        self.p = p

    @property
    def requirements(self) -> Requirements:
        # In training its masks are drawn for a whole batch at once.
        return Requirements(coupled_axes=(0,) if self.training and self.p > 0 else ())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, self.training)

    def kernel_rule(self, k: Kernel) -> Kernel:
        if not self.training or self.p == 0:
            return k
        factor = 1 / (1 - self.p)
        same_pair = _same_example_and_position(k, k.shape1[0], k.shape2[0], pairwise=True)
        nngp_factor = _where_factor(same_pair & k.x1_is_x2, factor, k.nngp.dtype)

        def scale_cov(cov: torch.Tensor, batch_ndim: int) -> torch.Tensor:
            mask = _same_example_and_position(k, len(cov), len(cov), pairwise=batch_ndim == 2)
            return cov * _where_factor(mask, factor, cov.dtype)

        # The scalar NTK of the inputs becomes a full (N1, N2, …) kernel here, as nngp's factor.
        return k.map_covariances(
            scale_cov, ('cov1', 'cov2'), nngp=k.nngp * nngp_factor,
            ntk=None if k.ntk is None else k.ntk * nngp_factor, is_gaussian=False)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _same_example_and_position(k: Kernel, n1: int, n2: int, pairwise: bool) -> torch.Tensor:
    """Boolean mask, in the kernel layout, of entries of one example at one position."""
    device = k.nngp.device
    mask = torch.eye(n1, n2, dtype=torch.bool, device=device) if pairwise else \
        torch.ones(n1, dtype=torch.bool, device=device)
    for size in k.spatial1:
        if k.diagonal_spatial:
            mask = mask.unsqueeze(-1)
        else:
            mask = mask[..., None, None] & torch.eye(size, dtype=torch.bool, device=device)
    return mask


def _where_factor(mask: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """`factor` where `mask`, 1 elsewhere, in `dtype` (not the default float dtype)."""
    return torch.where(mask, torch.tensor(factor, dtype=dtype, device=mask.device),
                       torch.tensor(1., dtype=dtype, device=mask.device))
