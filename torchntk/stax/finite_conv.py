"""The finite network's side of the windowed layers (convolutions, pooling):
padding its activations, the transposed convolution at neural-tangents'
output sizes, and the masks of its outputs. The padding amounts themselves
come from `torchntk.functional.conv` (`conv_padding`, `transpose_padding`),
which the kernel rules use too.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..functional import conv as conv_maps
from ..kernel import Shape

_CONV_TRANSPOSE_FNS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def pad_input(x: torch.Tensor, window: Sequence[int], strides: Sequence[int],
              padding: str) -> torch.Tensor:
    """Pad the spatial axes of `(N, C, *S)` inputs as `padding` prescribes for a VALID window."""
    for d, (k, stride) in enumerate(zip(window, strides)):
        low, high = conv_maps.conv_padding(x.shape[2 + d], k, stride, padding)
        x = conv_maps.pad_axis(x, 2 + d, low, high, circular=padding == 'CIRCULAR')
    return x


def window_centre_mask(mask: torch.Tensor, spatial: Shape, window: Sequence[int],
                       strides: Sequence[int], padding: str) -> torch.Tensor:
    """Mask of a windowed layer's outputs `(N, 1, *S_out)` from the mask of its
    input positions `(N, 1, *S)` (size-1 axes broadcast to `spatial`): an
    output is masked when the centre of its window (the entry left of it for
    even windows) is, as in neural-tangents."""
    mask = mask.expand(*mask.shape[:2], *spatial)
    for d, (size, k, stride) in enumerate(zip(spatial, window, strides)):
        low, _ = conv_maps.conv_padding(size, k, stride, padding)
        out = conv_maps.conv_output_size(size, k, stride, padding)
        index = (k - 1) // 2 - low + stride * torch.arange(out, device=mask.device)
        mask = mask.index_select(2 + d, index)
    return mask


def conv_transpose(x: torch.Tensor, weight: torch.Tensor, strides: Sequence[int],
                   padding: str) -> torch.Tensor:
    """`F.conv_transpose{n}d` cropped or zero-padded to `jax.lax.conv_transpose`'s
    output (see `ConvTranspose`); `'CIRCULAR'` folds the `'VALID'` output."""
    n_spatial = x.ndim - 2
    z = _CONV_TRANSPOSE_FNS[n_spatial](x, weight, stride=tuple(strides))
    apply_padding = 'VALID' if padding == 'CIRCULAR' else padding
    for d, (size, k, stride) in enumerate(zip(x.shape[2:], weight.shape[2:], strides)):
        # PyTorch's output is the full one, padded by k − 1 on both sides.
        low, high = conv_maps.transpose_padding(k, stride, apply_padding)
        z = conv_maps.pad_axis(z, 2 + d, low - (k - 1), high - (k - 1))
        if padding == 'CIRCULAR':
            z = conv_maps.fold_circular(z, 2 + d, size * stride)
    return z
