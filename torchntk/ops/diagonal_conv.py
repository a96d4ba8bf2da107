"""Dispatch of `diagonal_conv` and its adjoint between the extension and the torch fallback."""

from __future__ import annotations

import torch

from .extension import EXTENSION, takes


def diagonal_conv_output_size(size: int, k: int, stride: int, padding: tuple[int, int]) -> int:
    return (size + padding[0] + padding[1] - k) // stride + 1


def _check(caller: str, tensor: torch.Tensor, size: int, k: int, stride: int,
           padding: tuple[int, int]) -> None:
    if tensor.ndim not in (3, 4) or tensor.shape[1] != tensor.shape[2]:
        raise ValueError(f"{caller}: expected a tensor of shape (B, X, X) or (B, X, X, R), "
                         f"got {tuple(tensor.shape)}")
    if k < 1 or stride < 1 or min(padding) < 0:
        raise ValueError(f"{caller}: expected k >= 1, stride >= 1 and padding >= 0, got k={k}, "
                         f"stride={stride}, padding={tuple(padding)}")
    if size + padding[0] + padding[1] < k:
        raise ValueError(f"{caller}: window k={k} is larger than the padded size "
                         f"{size + padding[0] + padding[1]} (size {size}, padding {tuple(padding)})")


def diagonal_conv(cov: torch.Tensor, k: int, stride: int, padding: tuple[int, int],
                  circular: bool) -> torch.Tensor:
    """`out[b, p, q] = (1/k) Σ_{i<k} cov_pad[b, s·p + i, s·q + i]` for `cov` of shape `(B, X, X)`.

    `cov_pad` pads both axes by `padding = (low, high)`, with zeros or, if
    `circular`, by wrapping around. Differentiable in both backends (the
    extension's gradient is `diagonal_conv_transpose`).

    Shape:
        - cov: `(B, X, X)`, or `(B, X, X, R)`: every one of the `R` trailing
          entries is convolved alike, so a `(B, H, H', W·W')` covariance is
          convolved along `H` in place of a permuted copy.
        - output: `(B, Xo, Xo)` or `(B, Xo, Xo, R)`, `Xo = (X + low + high - k) // stride + 1`.
    """
    _check('diagonal_conv', cov, cov.shape[1] if cov.ndim >= 2 else 0, k, stride, padding)
    if not takes(cov):
        return diagonal_conv_torch(cov, k, stride, padding, circular)
    low, high = int(padding[0]), int(padding[1])
    if torch.is_grad_enabled() and cov.requires_grad:
        return _DiagonalConv.apply(cov, k, stride, low, high, circular)
    return EXTENSION.diagonal_conv(cov, k, stride, low, high, circular)


def diagonal_conv_transpose(grad: torch.Tensor, size: int, k: int, stride: int,
                            padding: tuple[int, int], circular: bool) -> torch.Tensor:
    """The adjoint of `diagonal_conv` on inputs of size `size`: for every `grad`,
    `<diagonal_conv(cov), grad> = <cov, diagonal_conv_transpose(grad)>`.

    It is the backward of `diagonal_conv` (its gradient), not the rule of a
    transposed convolution, which dilates the covariance and calls
    `diagonal_conv` (`torchntk.functional.conv.conv_transpose`).
    Differentiable in both backends.

    Shape:
        - grad: `(B, Xo, Xo)` or `(B, Xo, Xo, R)`, `Xo` as in `diagonal_conv`.
        - output: `(B, size, size)` or `(B, size, size, R)`.
    """
    _check('diagonal_conv_transpose', grad, size, k, stride, padding)
    out_size = diagonal_conv_output_size(size, k, stride, padding)
    if grad.shape[1] != out_size:
        raise ValueError(f"diagonal_conv_transpose: grad must have size {out_size} along "
                         f"dimensions 1 and 2 for size={size}, k={k}, stride={stride}, "
                         f"padding={tuple(padding)}, got {tuple(grad.shape)}")
    if not takes(grad):
        return diagonal_conv_transpose_torch(grad, size, k, stride, padding, circular)
    low, high = int(padding[0]), int(padding[1])
    if torch.is_grad_enabled() and grad.requires_grad:
        return _DiagonalConvTranspose.apply(grad, size, k, stride, low, high, circular)
    return EXTENSION.diagonal_conv_transpose(grad, size, k, stride, low, high, circular)


class _DiagonalConv(torch.autograd.Function):
    """The extension's `diagonal_conv`; its backward is the extension's adjoint,
    itself differentiable, so higher derivatives work too."""

    @staticmethod
    def forward(ctx, cov, k, stride, low, high, circular):
        ctx.arguments = (cov.shape[1], k, stride, low, high, circular)
        return EXTENSION.diagonal_conv(cov, k, stride, low, high, circular)

    @staticmethod
    def backward(ctx, grad):
        size, k, stride, low, high, circular = ctx.arguments
        grad_cov = _DiagonalConvTranspose.apply(grad, size, k, stride, low, high, circular)
        return grad_cov, None, None, None, None, None


class _DiagonalConvTranspose(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, size, k, stride, low, high, circular):
        ctx.arguments = (k, stride, low, high, circular)
        return EXTENSION.diagonal_conv_transpose(grad, size, k, stride, low, high, circular)

    @staticmethod
    def backward(ctx, grad_grad):
        k, stride, low, high, circular = ctx.arguments
        return _DiagonalConv.apply(grad_grad, k, stride, low, high, circular), *(None,) * 6


def _padding_index(size: int, padding: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Source index of every padded position under circular padding."""
    return torch.arange(-padding[0], size + padding[1], device=device) % size


def diagonal_conv_torch(cov: torch.Tensor, k: int, stride: int, padding: tuple[int, int],
                        circular: bool) -> torch.Tensor:
    """The pure-torch implementation: `k` strided diagonal slices, summed."""
    low, high = padding
    size = cov.shape[1]
    if circular and (low or high):
        index = _padding_index(size, padding, cov.device)
        cov = cov.index_select(1, index).index_select(2, index)
    elif low or high:
        padded = cov.new_zeros((cov.shape[0], size + low + high, size + low + high,
                                *cov.shape[3:]))
        padded[:, low:low + size, low:low + size] = cov
        cov = padded
    out_size = diagonal_conv_output_size(size, k, stride, padding)
    span = stride * (out_size - 1) + 1
    out = cov[:, :span:stride, :span:stride].clone()
    for i in range(1, k):
        out += cov[:, i:i + span:stride, i:i + span:stride]
    return out / k


def diagonal_conv_transpose_torch(grad: torch.Tensor, size: int, k: int, stride: int,
                                  padding: tuple[int, int], circular: bool) -> torch.Tensor:
    """The pure-torch adjoint: `grad / k` added onto `k` strided diagonal slices
    of the padded input, then the padding folded back (circular) or cut off."""
    low, high = padding
    out_size = grad.shape[1]
    span = stride * (out_size - 1) + 1
    padded_size = size + low + high
    padded = grad.new_zeros((grad.shape[0], padded_size, padded_size, *grad.shape[3:]))
    for i in range(k):
        padded[:, i:i + span:stride, i:i + span:stride] += grad
    padded = padded / k
    if circular and (low or high):
        index = _padding_index(size, padding, grad.device)
        shape = (grad.shape[0], size, padded_size, *grad.shape[3:])
        folded = padded.new_zeros(shape).index_add(1, index, padded)
        return folded.new_zeros((grad.shape[0], size, size, *grad.shape[3:])).index_add(
            2, index, folded)
    return padded[:, low:low + size, low:low + size]
