"""Dispatch of `diagonal_conv` between the extension and the torch fallback."""

from __future__ import annotations

import importlib
import os

import torch
import torch.nn.functional as F

_BACKENDS = ('auto', 'extension', 'torch')


def _load_extension():
    choice = os.environ.get('TORCHNTK_BACKEND', 'auto')
    if choice not in _BACKENDS:
        raise ValueError(f"TORCHNTK_BACKEND must be one of {_BACKENDS}, got {choice!r}")
    if choice == 'torch':
        return None
    try:
        return importlib.import_module('torchntk._C')
    except ImportError as error:
        if choice == 'extension':
            raise ImportError("TORCHNTK_BACKEND=extension but the compiled extension torchntk._C "
                              "is not built (pip install --no-build-isolation -e .)") from error
        return None


_EXTENSION = _load_extension()


def backend() -> str:
    """`'extension'` when the compiled extension is in use, else `'torch'`."""
    return 'torch' if _EXTENSION is None else 'extension'


def same_padding(size: int, k: int, stride: int) -> tuple[int, int]:
    """(low, high) zero padding of 'SAME' convolutions (as TensorFlow, JAX and
    PyTorch's padding='same'): the output has ceil(size / stride) entries."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def diagonal_conv_output_size(size: int, k: int, stride: int, padding: tuple[int, int]) -> int:
    return (size + padding[0] + padding[1] - k) // stride + 1


def diagonal_conv(cov: torch.Tensor, k: int, stride: int, padding: tuple[int, int],
                  circular: bool) -> torch.Tensor:
    """`out[b, p, q] = (1/k) Σ_{i<k} cov_pad[b, s·p + i, s·q + i]` for `cov` of shape `(B, X, X)`.

    `cov_pad` pads both axes by `padding = (low, high)`, with zeros or, if
    `circular`, by wrapping around. Differentiable in both backends.
    """
    if cov.ndim != 3 or cov.shape[1] != cov.shape[2]:
        raise ValueError(f"diagonal_conv: expected cov of shape (B, X, X), got {tuple(cov.shape)}")
    if _EXTENSION is not None and not (torch.is_grad_enabled() and cov.requires_grad):
        return _EXTENSION.diagonal_conv(cov, k, stride, padding[0], padding[1], circular)
    return diagonal_conv_torch(cov, k, stride, padding, circular)


def diagonal_conv_torch(cov: torch.Tensor, k: int, stride: int, padding: tuple[int, int],
                        circular: bool) -> torch.Tensor:
    """The pure-torch implementation: `k` strided diagonal slices, summed."""
    low, high = padding
    if low or high:
        pad = (low, high, low, high)
        cov = F.pad(cov.unsqueeze(1), pad, mode='circular').squeeze(1) if circular else \
            F.pad(cov, pad)
    size = diagonal_conv_output_size(cov.shape[1] - low - high, k, stride, padding)
    span = stride * (size - 1) + 1
    out = cov[:, :span:stride, :span:stride].clone()
    for i in range(1, k):
        out += cov[:, i:i + span:stride, i:i + span:stride]
    return out / k
