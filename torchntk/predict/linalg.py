"""Linear algebra of a train-train kernel: its eigendecomposition with the time
functions of gradient flow, its Cholesky factor, and the diagonal regularizer."""

from __future__ import annotations

import torch

from .arguments import check_psd


def regularized(matrix: torch.Tensor, diag_reg: float, absolute: bool) -> torch.Tensor:
    """`K + diag_reg · s · I`, `s = 1` if `absolute` else `mean(diag K)`."""
    if diag_reg == 0:
        return matrix
    scale = diag_reg if absolute else diag_reg * matrix.diagonal().mean()
    return matrix + scale * torch.eye(len(matrix), dtype=matrix.dtype, device=matrix.device)


class KernelSpectrum:
    """Eigendecomposition `V diag(λ) Vᵀ` of a train-train kernel matrix, and its time functions.

    Negative eigenvalues (round-off of a PSD kernel) count as zero; a kernel that
    is not positive semi-definite beyond round-off is refused. At `t = ∞`,
    eigenvalues up to `λ_max · D · eps` also count as zero, as in a pseudo-inverse:
    gradient flow never moves along the kernel's null space, and `1/λ` of a
    round-off eigenvalue is noise.
    """

    def __init__(self, matrix: torch.Tensor, n: int, caller: str, arg: str):
        evals, self.evecs = torch.linalg.eigh(matrix)
        check_psd(evals, arg, caller)
        self.evals = evals.clamp(min=0)
        self.cutoff = evals.abs().max() * len(evals) * torch.finfo(evals.dtype).eps
        self.n = n

    def _active(self, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which eigenvalues are nonzero at each time `(T, 1)`, and `λ` with 1 in place of zeros."""
        active = torch.where(torch.isinf(times), self.evals > self.cutoff, self.evals > 0)
        return active, torch.where(active, self.evals, 1.)

    def decay(self, times: torch.Tensor) -> torch.Tensor:
        """`e^{-λt/n}`, `(T, D)`."""
        active, evals = self._active(times)
        return torch.where(active, torch.exp(-evals * times / self.n), 1.)

    def one_minus_decay(self, times: torch.Tensor) -> torch.Tensor:
        """`1 - e^{-λt/n}`, `(T, D)`, through `expm1` for accuracy at small `λt`."""
        active, evals = self._active(times)
        return torch.where(active, -torch.expm1(-evals * times / self.n), 0.)

    def integral(self, times: torch.Tensor) -> torch.Tensor:
        """`(1 - e^{-λt/n}) / λ` (`→ t/n` at `λ = 0`, and `0` at `t = ∞`), `(T, D)`."""
        active, evals = self._active(times)
        null = torch.where(torch.isinf(times), 0., times) / self.n
        return torch.where(active, -torch.expm1(-evals * times / self.n) / evals, null)

    def apply(self, diagonal: torch.Tensor, rhs: torch.Tensor | None = None) -> torch.Tensor:
        """`V diag(d_t) Vᵀ rhs` for each row `d_t` of `diagonal`: `(T, D, M)` (`rhs=None`: `I`)."""
        # Batched products, never a (T, D, D) intermediate unless the result is one.
        if rhs is None:
            return (self.evecs * diagonal[:, None, :]) @ self.evecs.T
        return self.evecs @ (diagonal[:, :, None] * (self.evecs.T @ rhs))


class CholeskyFactor:
    """Cholesky factor of a train-train kernel matrix; raises if it is not positive definite."""

    def __init__(self, matrix: torch.Tensor, caller: str, arg: str):
        self.factor, info = torch.linalg.cholesky_ex(matrix)
        if int(info) > 0:
            check_psd(torch.linalg.eigvalsh(matrix), arg, caller)
            raise ValueError(
                f"{caller}: {arg} (+ diag_reg · I) is not positive definite (the Cholesky "
                f"factorization fails at row {int(info)}), so infinite-time predictions (t=None) "
                "are undefined; pass diag_reg > 0 (e.g. 1e-6, relative to mean(diag K)) or, "
                "where available, t=float('inf') for the limit of gradient flow")

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """`K⁻¹ rhs`."""
        return torch.cholesky_solve(rhs, self.factor)
