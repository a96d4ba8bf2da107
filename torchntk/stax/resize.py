"""`ImageResize`: linear or nearest-neighbour resizing of the spatial axes."""

from __future__ import annotations

from typing import Sequence

import torch

from ..checks import check_choice, check_int
from ..functional import conv as conv_maps
from ..kernel import Kernel, Shape
from .module import Layer
from .requirements import Bool, Diagonal, Requirements

METHODS = ('linear', 'nearest')
_METHOD_ALIASES = {'linear': 'linear', 'bilinear': 'linear', 'trilinear': 'linear',
                   'triangle': 'linear', 'nearest': 'nearest'}


class ImageResize(Layer):
    r"""Resize the spatial axes as `jax.image.resize` (neural-tangents' `ImageResize`).

    Along each resized axis the layer is linear, `z = M x` with `M` from
    `functional.conv.resize_matrix` (`'linear'`: triangle filter at half-pixel
    centres, widened when downsampling if `antialias`; `'nearest'`:
    `x[floor((p + ½)·X / X_out)]`, PyTorch's `'nearest-exact'`), so the kernel
    is `M K Mᵀ` on each pair of spatial axes. Upsampling with `'linear'` equals
    `F.interpolate(mode='bilinear', align_corners=False)`.

    With masks, an output is masked only when every input it is made of is
    (as neural-tangents: content wins over the mask).

    Args:
        shape: the output shape in PyTorch layout `(N, C, *S)`, `-1` keeping an
            axis; the batch and channel entries must be `-1`.
        method: `'linear'` (aliases `'bilinear'`, `'trilinear'`, `'triangle'`)
            or `'nearest'`.
        antialias: widen the linear filter when downsampling.

    Shape:
        Input `(N, C, *S)`, output `(N, C, *S_out)`.
    """

    remask = True

    def __init__(self, shape: Sequence[int], method: str, antialias: bool = True) -> None:
        super().__init__()
        if not isinstance(shape, Sequence) or isinstance(shape, str):
            raise TypeError(f"ImageResize: shape must be the output shape (N, C, *spatial), got "
                            f"{shape!r}")
        shape = tuple(check_int(size, f'shape[{i}]', 'ImageResize') for i, size in enumerate(shape))
        if len(shape) < 3 or not all(s == -1 or s >= 1 for s in shape):
            raise ValueError(f"ImageResize: shape must be the output shape (N, C, *spatial) with "
                             f"positive sizes or -1 (keep), got {shape!r}")
        if shape[:2] != (-1, -1):
            raise ValueError(f"ImageResize: only spatial axes can be resized; shape[0] (batch) "
                             f"and shape[1] (channels) must be -1, got {shape!r}")
        method = check_choice(method, 'method', 'ImageResize', tuple(_METHOD_ALIASES))
        self.shape, self.method, self.antialias = shape, _METHOD_ALIASES[method], antialias

    @property
    def requirements(self) -> Requirements:
        resizes = any(size != -1 for size in self.shape[2:])
        return Requirements(diagonal_spatial=Diagonal(input=Bool.NO if resizes else Bool.YES))

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != len(self.shape):
            raise ValueError(f"ImageResize: shape {self.shape} has {len(self.shape)} axes but the "
                             f"input has shape {tuple(input_shape)}")
        return tuple(old if new == -1 else new for old, new in zip(input_shape, self.shape))

    def _matrices(self, input_shape: Shape, like: torch.Tensor) -> list[torch.Tensor | None]:
        out_shape = self.output_shape(input_shape)
        return [None if old == new else
                conv_maps.resize_matrix(old, new, self.method, self.antialias, like)
                for old, new in zip(input_shape[2:], out_shape[2:])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for d, matrix in enumerate(self._matrices(x.shape, x)):
            if matrix is not None:
                x = conv_maps.apply_along(x, 2 + d, matrix)
        return x

    def mask_rule(self, mask: torch.Tensor, input_shape: Shape) -> torch.Tensor:
        unmasked = (~mask).expand(*mask.shape[:2], *input_shape[2:]).to(torch.float32)
        for d, matrix in enumerate(self._matrices(input_shape, unmasked)):
            if matrix is not None:
                unmasked = conv_maps.apply_along(unmasked, 2 + d, (matrix != 0).to(unmasked.dtype))
        return unmasked == 0

    def kernel_rule(self, k: Kernel) -> Kernel:
        matrices = self._matrices(k.shape1, k.nngp)
        return k.map_covariances(
            lambda cov, batch_ndim: conv_maps.resize(cov, batch_ndim, k.diagonal_spatial, matrices),
            shape1=self.output_shape(k.shape1), shape2=self.output_shape(k.shape2))

    def extra_repr(self) -> str:
        return f"shape={self.shape}, method={self.method!r}, antialias={self.antialias}"
