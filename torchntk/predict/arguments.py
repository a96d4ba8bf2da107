"""The argument checks of the predictors: kernels, targets, times, outputs at
`t = 0`, and the kernel fields of records."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..checks import check_nonnegative, check_real_tensor
from .layout import OutputAxes, kernel_matrix

Times = Any  # None, a number, or a tensor of any shape
Targets = Any  # a tensor, a number (broadcast), or None


def checked_kernel(kernel: Any, arg: str, caller: str) -> torch.Tensor:
    """A finite floating-point kernel tensor with pairs of zipped axes."""
    if not isinstance(kernel, torch.Tensor):
        hint = (" (a kernel record: pass its .ntk or .nngp field)"
                if hasattr(kernel, 'ntk') or hasattr(kernel, 'nngp') else "")
        raise TypeError(f"{caller}: {arg} must be a tensor, got {type(kernel).__name__}{hint}")
    check_real_tensor(kernel, arg, caller)
    if not kernel.is_floating_point():
        raise TypeError(f"{caller}: {arg} must be a floating-point tensor, got {kernel.dtype}")
    if kernel.ndim < 2 or kernel.ndim % 2:
        raise ValueError(f"{caller}: {arg} must have pairs of zipped axes, (N1, N2, …), got shape "
                         f"{tuple(kernel.shape)}")
    if not bool(torch.isfinite(kernel).all()):
        raise ValueError(f"{caller}: {arg} contains non-finite values (NaN or inf)")
    return kernel


def checked_train_matrix(kernel: torch.Tensor, arg: str, caller: str) -> torch.Tensor:
    """The matrix of a train-train kernel, which must be square and symmetric (to rounding)."""
    matrix = kernel_matrix(kernel)
    if matrix.shape[0] != matrix.shape[1] or matrix.numel() == 0:
        raise ValueError(f"{caller}: {arg} must be a square train-train kernel of at least one "
                         f"example, got shape {tuple(kernel.shape)}")
    asymmetry, scale = (matrix - matrix.mT).abs().max(), matrix.abs().max()
    if asymmetry > math.sqrt(torch.finfo(matrix.dtype).eps) * scale:
        raise ValueError(f"{caller}: {arg} must be symmetric (a train-train kernel), but max "
                         f"|K - Kᵀ| = {float(asymmetry):.3g} against max |K| = {float(scale):.3g}")
    return matrix


def check_psd(evals: torch.Tensor, arg: str, caller: str) -> None:
    """Refuse a kernel matrix (ascending eigenvalues `evals`) with `λ_min < -√eps · max |λ|`:
    not positive semi-definite beyond rounding."""
    largest = evals.abs().max()
    if evals[0] < -math.sqrt(torch.finfo(evals.dtype).eps) * largest:
        raise ValueError(f"{caller}: {arg} must be positive semi-definite (a kernel), but its "
                         f"smallest eigenvalue is {float(evals[0]):.3g} against a largest |λ| "
                         f"of {float(largest):.3g}")


def checked_targets(y: Any, kernel: torch.Tensor | None, caller: str) -> torch.Tensor:
    """`y` as a tensor of the kernel's dtype (so float32 targets suit float64 kernels)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{caller}: y_train must be a tensor, got {type(y).__name__}")
    check_real_tensor(y, 'y_train', caller)
    if y.ndim < 1 or y.numel() == 0:
        raise ValueError(f"{caller}: y_train must have a batch axis and at least one training "
                         f"example and output, got shape {tuple(y.shape)}")
    if kernel is None:
        return y
    if y.device != kernel.device:
        raise ValueError(f"{caller}: y_train is on {y.device} but the kernel on {kernel.device}")
    y = y.to(kernel.dtype)
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{caller}: y_train contains non-finite values (NaN or inf)")
    return y


def checked_test_train_kernel(k_test_train: Any, k_train_train: torch.Tensor, axes: OutputAxes,
                              caller: str, arg: str = 'k_test_train') -> torch.Tensor:
    """A test-train kernel of the train-train kernel's dtype, device and training axes."""
    if k_test_train is None:
        raise ValueError(f"{caller}: test predictions need {arg}")
    k_test_train = checked_kernel(k_test_train, arg, caller)
    if k_test_train.dtype != k_train_train.dtype or k_test_train.device != k_train_train.device:
        raise ValueError(f"{caller}: {arg} is {k_test_train.dtype} on {k_test_train.device} but "
                         f"the train-train kernel {k_train_train.dtype} on "
                         f"{k_train_train.device}")
    axes.check_kernel(k_test_train, arg, k_test_train.shape[::2], k_train_train.shape[1::2])
    return k_test_train


def broadcast_outputs(value: Any, like: torch.Tensor, shape: Sequence[int], arg: str,
                      caller: str) -> torch.Tensor:
    """Outputs (or velocities) `value`, a tensor or a number, broadcast to `shape` in
    `like`'s dtype and device."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{caller}: {arg} must be a tensor or a number, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        check_real_tensor(value, arg, caller)
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    try:
        value = torch.broadcast_to(value, tuple(shape))
    except RuntimeError:
        raise ValueError(f"{caller}: {arg} must broadcast to {tuple(shape)}, got shape "
                         f"{tuple(value.shape)}") from None
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{caller}: {arg} contains non-finite values (NaN or inf)")
    return value


def checked_times(t: Times, scale: float, like: torch.Tensor, caller: str,
                  no_limit: str | None = None) -> tuple[torch.Tensor, tuple]:
    """`t · scale` as a column `(T, 1)` in `like`'s dtype and device, and `t`'s shape.

    `no_limit`: why `t = inf` is refused (`None`: it is allowed).
    """
    if isinstance(t, bool) or not isinstance(t, (int, float, torch.Tensor)):
        raise TypeError(f"{caller}: t must be None, a number or a tensor, got {type(t).__name__}")
    if isinstance(t, torch.Tensor):
        check_real_tensor(t, 't', caller)
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    expected = "times t must be >= 0" + (" (inf allowed)" if no_limit is None else " and finite")
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{caller}: {expected}, got NaN")
    if bool((t < 0).any()):
        raise ValueError(f"{caller}: {expected}, got min(t) = {float(t.min())}")
    if no_limit is not None and bool(torch.isinf(t).any()):
        raise ValueError(f"{caller}: {expected}, got inf: {no_limit}")
    return (t * scale).reshape(-1, 1), tuple(t.shape)


def check_momentum(momentum: Any, caller: str) -> None:
    """Heavy-ball momentum: a number in `[0, 1]`."""
    if check_nonnegative(momentum, 'momentum', caller) > 1:
        raise ValueError(f"{caller}: momentum must be in [0, 1], got {momentum}")


def kernel_field(record: Any, field: str, arg: str, caller: str) -> torch.Tensor:
    """`record.field`, or `record` itself when it is a bare tensor."""
    if isinstance(record, torch.Tensor):
        return record
    value = getattr(record, field, None)
    if value is None:
        raise ValueError(f"{caller}: {arg} has no {field!r} kernel; compute it with "
                         f"get=('nngp', 'ntk') or pass a tensor")
    return value


def first_kernel_field(record: Any, arg: str, caller: str) -> torch.Tensor:
    """`record` itself when it is a tensor, else its `nngp` or (without one) its `ntk`."""
    if isinstance(record, torch.Tensor):
        return record
    for field in ('nngp', 'ntk'):
        value = getattr(record, field, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"{caller}: {arg} must be a tensor or a record with nngp/ntk tensors, "
                    f"got {type(record).__name__}")


def shape_or_type(x: Any) -> str:
    """What an error message says `x` was: its shape if a tensor, else its type."""
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
