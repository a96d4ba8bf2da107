"""Convolutions: `Conv`, `ConvTranspose` and `ConvLocal` (unshared weights).

Images are channels-first, `(N, C, *S)` with 1, 2 or 3 spatial axes, as in
PyTorch. The kernel rules are in `torchntk.functional.conv`; a shared-weight
convolution needs covariances between different positions (full-spatial
kernels) whenever a later layer mixes positions (pooling), and only the
same-position ones when the network ends with `Flatten`; `kernel_fn` picks the
layout from the layers' `requirements`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..checks import Scalar, check_choice, check_input_rank, check_window
from ..functional import conv as conv_maps
from ..kernel import Kernel, Shape
from ..ops import conv_chain
from .finite_conv import conv_transpose, pad_input, window_centre_mask
from .linear import Affine
from .requirements import Bool, Diagonal, Requirements

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _Conv(Affine):
    """What `Conv`, `ConvTranspose` and `ConvLocal` share: the window arguments
    on top of `Affine` (fan-in `C_in·prod(filter_shape)`)."""

    def __init__(self, out_chan: int, filter_shape: Sequence[int],
                 strides: Sequence[int] | None = None, padding: str = 'VALID',
                 W_std: Scalar = 1., b_std: Scalar | None = None,
                 parameterization: str = 'ntk', s: tuple[int, int] = (1, 1)) -> None:
        super().__init__(out_chan, W_std, b_std, parameterization, s)
        name = self._name()
        self.filter_shape = check_window(filter_shape, 'filter_shape', name)
        self.strides = check_window(strides, 'strides', name, len(self.filter_shape)) or \
            (1,) * len(self.filter_shape)
        self.padding = check_choice(padding, 'padding', name, conv_maps.PADDINGS)

    @property
    def n_spatial(self) -> int:
        return len(self.filter_shape)

    def fan_in(self, in_chan: int) -> int:
        return in_chan * math.prod(self.filter_shape)

    def output_spatial(self, spatial: Shape) -> Shape:
        return tuple(conv_maps.conv_output_size(size, k, stride, self.padding)
                     for size, k, stride in zip(spatial, self.filter_shape, self.strides))

    def output_shape(self, input_shape: Shape) -> Shape:
        check_input_rank(input_shape, self.n_spatial, self._name())
        return (input_shape[0], self.width, *self.output_spatial(input_shape[2:]))

    def weight_shape(self, input_shape: Shape) -> Shape:
        return (self.width, input_shape[1], *self.filter_shape)

    def mask_rule(self, mask: torch.Tensor, input_shape: Shape) -> torch.Tensor:
        return window_centre_mask(mask.all(dim=1, keepdim=True), input_shape[2:],
                                  self.filter_shape, self.strides, self.padding)

    def extra_repr(self) -> str:
        text = f"{self.out_chan}, filter_shape={self.filter_shape}"
        if self.strides != (1,) * self.n_spatial:
            text += f", strides={self.strides}"
        if self.padding != 'VALID':
            text += f", padding={self.padding!r}"
        return f"{text}, {self.hyperparameters_repr()}"


class Conv(_Conv):
    r"""Convolution with weights shared across positions (`torch.nn.Conv{1,2,3}d`).

    NTK parameterization, `W, b ~ N(0, 1)`, `W` of shape `(out_chan, C_in, *filter_shape)`:
    :math:`z = \sigma_W / \sqrt{C_{in} k}\; W \star x + \sigma_b b` with `k = prod(filter_shape)`,
    and the kernel rule (Novak et al. 2019, arXiv:1810.05148), per spatial dimension,

        nngp'[p, q] = σ_W² (1/k) Σ_i nngp_pad[s·p + i, s·q + i] + σ_b²,
        ntk'[p, q]  = nngp'[p, q] + σ_W² (1/k) Σ_i ntk_pad[s·p + i, s·q + i].

    Standard parameterization as `Dense`, with fan-in `C_in·k`. With masks,
    an output is masked when the centre of its window (the left one of an
    even window) is masked in every channel, as in neural-tangents.

    Args:
        out_chan: output channels; the NTK-parameterized kernel does not depend on it.
        filter_shape: filter size per spatial dimension, e.g. `(3, 3)`.
        strides: stride per spatial dimension; `None` for 1.
        padding: `'VALID'`, `'SAME'` (zeros; output size `ceil(X / stride)`) or
            `'CIRCULAR'` (periodic, `'SAME'` sizes).
        W_std, b_std: weight and bias standard deviations (`b_std=None`: no bias).
        parameterization: `'ntk'` or `'standard'`.
        s: `(s_in, s_out)` width multipliers of the standard parameterization.

    Shape:
        Input `(N, C_in, *S)`, output `(N, out_chan, *S_out)` with
        `S_out = (S + pads − filter_shape) // strides + 1`.
    """

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_input(x, self.filter_shape, self.strides, self.padding)
        return _CONV_FNS[self.n_spatial](x, self.weight, stride=self.strides)

    def cov_map(self, cov: torch.Tensor, batch_ndim: int, diagonal_spatial: bool) -> torch.Tensor:
        return conv_maps.conv(cov, batch_ndim, diagonal_spatial, self.filter_shape, self.strides,
                              self.padding)

    @property
    def chain_step_kind(self) -> type[conv_chain.AffineStep] | None:
        # The exact type: a subclass may change the rule.
        return conv_chain.AffineStep if type(self) is Conv else None

    def chain_step(self, input_shape: Shape) -> conv_chain.AffineStep | None:
        if len(input_shape) != self.n_spatial + 2:
            return None   # the layer's own rule raises the error
        windows = conv_maps.chain_windows(input_shape[2:], self.filter_shape, self.strides,
                                          self.padding)
        return self._affine_chain_step(input_shape[1], self.padding == 'CIRCULAR', windows)


class ConvTranspose(_Conv):
    r"""Transposed convolution with shared weights (`torch.nn.ConvTranspose{1,2,3}d`).

    The finite layer is `F.conv_transpose{n}d(x, W, stride)`, `W` of shape
    `(C_in, out_chan, *filter_shape)`, scaled like `Conv` (fan-in
    `C_in·prod(filter_shape)`, as neural-tangents), then cropped or zero-padded
    to neural-tangents' (`jax.lax.conv_transpose`) output: `'VALID'` gives
    `X·s + max(k − s, 0)` positions (PyTorch's `(X − 1)·s + k` when `k ≥ s`),
    `'SAME'` gives `X·s`, and `'CIRCULAR'` folds the `'VALID'` output
    periodically onto `X·s` positions. The kernel rule is the convolution
    rule with stride 1 on the stride-dilated covariance
    (`functional.conv.conv_transpose`).

    Args: as `Conv`.

    Shape:
        Input `(N, C_in, *S)`, output `(N, out_chan, *S_out)` as above.
    """

    def weight_shape(self, input_shape: Shape) -> Shape:
        return (input_shape[1], self.width, *self.filter_shape)

    def output_spatial(self, spatial: Shape) -> Shape:
        return tuple(conv_maps.transpose_output_size(size, k, stride, self.padding)
                     for size, k, stride in zip(spatial, self.filter_shape, self.strides))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return conv_transpose(x, self.weight, self.strides, self.padding)

    def mask_rule(self, mask: torch.Tensor, input_shape: Shape) -> torch.Tensor:
        # As neural-tangents: masked where any input of the (transposed) window
        # is, with 'SAME' windows for 'CIRCULAR'.
        mask = mask.all(dim=1, keepdim=True)
        mask = mask.expand(*mask.shape[:2], *input_shape[2:]).to(torch.float32)
        ones = mask.new_ones(1, 1, *self.filter_shape)
        padding = 'SAME' if self.padding == 'CIRCULAR' else self.padding
        return conv_transpose(mask, ones, self.strides, padding) > 0

    def cov_map(self, cov: torch.Tensor, batch_ndim: int, diagonal_spatial: bool) -> torch.Tensor:
        return conv_maps.conv_transpose(cov, batch_ndim, diagonal_spatial, self.filter_shape,
                                        self.strides, self.padding)


class ConvLocal(_Conv):
    r"""Locally connected layer: a convolution with different weights at each
    output position (Novak et al. 2019, "LCN").

    `W` has shape `(out_chan, C_in, *filter_shape, *S_out)` and the bias
    `(out_chan, *S_out)`. Weights at different positions are independent, so
    the outputs at different positions are uncorrelated: the kernel is the
    same-position convolution rule of `Conv` on the spatial diagonal and zero
    off it. It therefore needs only the same-position input covariances and
    lets later pooling run diagonal-spatial (requirement `Diagonal(YES, MAYBE)`).

    Args: as `Conv`.

    Shape:
        As `Conv`.
    """

    @property
    def requirements(self) -> Requirements:
        return Requirements(diagonal_spatial=Diagonal(input=Bool.YES, output=Bool.MAYBE))

    def weight_shape(self, input_shape: Shape) -> Shape:
        return (self.width, input_shape[1], *self.filter_shape,
                *self.output_spatial(input_shape[2:]))

    def bias_shape(self, input_shape: Shape) -> Shape:
        return (self.width, *self.output_spatial(input_shape[2:]))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_input(x, self.filter_shape, self.strides, self.padding)
        for d, (k, stride) in enumerate(zip(self.filter_shape, self.strides)):
            x = x.unfold(2 + d, k, stride)  # (N, C, *S_out, *filter)
        out, window = 'xyz'[:self.n_spatial], 'ijk'[:self.n_spatial]
        return torch.einsum(f'nc{out}{window},wc{window}{out}->nw{out}', x, self.weight)

    def cov_map(self, cov: torch.Tensor, batch_ndim: int, diagonal_spatial: bool) -> torch.Tensor:
        if not diagonal_spatial:
            raise ValueError("ConvLocal: cov_map works on same-position covariances only")
        return conv_maps.conv(cov, batch_ndim, True, self.filter_shape, self.strides,
                              self.padding)

    def kernel_rule(self, k: Kernel) -> Kernel:
        if k.diagonal_spatial:
            return super().kernel_rule(k)
        # The bias too is independent across positions: the whole rule runs on
        # the spatial diagonal, and the off-diagonal covariances are zero.
        on_diagonal = super().kernel_rule(
            k.map_covariances(conv_maps.spatial_diagonal, diagonal_spatial=True))
        return on_diagonal.map_covariances(conv_maps.embed_spatial_diagonal,
                                           diagonal_spatial=False)
