"""Affine layers: `Identity` and `Dense`."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernel import Kernel, Shape
from .module import Layer, Scalar, check_nonnegative, check_positive_int
from .requirements import Diagonal, Requirements

PARAMETERIZATIONS = ('ntk', 'standard')


class Identity(Layer):
    """`f(x) = x`; the kernel passes through unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def kernel_rule(self, k: Kernel) -> Kernel:
        return k


class Dense(Layer):
    r"""Fully connected layer acting on the channel axis (axis 1).

    NTK parameterization (Jacot et al. 2018, arXiv:1806.07572), `W, b ~ N(0, 1)`:
    :math:`z = \sigma_W / \sqrt{C_{in}}\, W x + \sigma_b b`, with kernel rule

        nngp' = σ_W²·nngp + σ_b²,     ntk' = nngp' + σ_W²·ntk.

    Standard parameterization (Sohl-Dickstein et al. 2020, arXiv:2001.07301),
    `W ~ N(0, σ_W² s_in / C_in)`, `b ~ N(0, σ_b²)`, `W` of shape
    `(s_out·out_dim, C_in)`: :math:`z = W x / \sqrt{s_{in}} + b`, and

        nngp' = σ_W²·nngp + σ_b²,
        ntk'  = (C_in / s_in)·nngp + σ_W²·ntk (+ 1 if the layer has a bias).

    `b_std=None` means no bias, which differs from `b_std=0.` in the standard
    parameterization (the bias still trains there).

    Args:
        out_dim: output channels (`s_out·out_dim` in the standard
            parameterization); the NTK-parameterized kernel does not depend on it.
        W_std, b_std: weight and bias standard deviations; floats or scalar
            tensors (differentiable hyperparameters).
        parameterization: `'ntk'` or `'standard'`.
        s: `(s_in, s_out)` width multipliers of the standard parameterization.

    Shape:
        Input `(N, C_in, *S)`, output `(N, out_dim, *S)`.
    """

    def __init__(self, out_dim: int, W_std: Scalar = 1., b_std: Scalar | None = None,
                 parameterization: str = 'ntk', s: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        check_positive_int(out_dim, 'out_dim', 'Dense')
        check_nonnegative(W_std, 'W_std', 'Dense')
        check_nonnegative(b_std, 'b_std', 'Dense', allow_none=True)
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"Dense: parameterization must be one of {PARAMETERIZATIONS}, "
                             f"got {parameterization!r}")
        if len(s) != 2:
            raise ValueError(f"Dense: s must be a pair (s_in, s_out), got {s!r}")
        for value in s:
            check_positive_int(value, 's', 'Dense')
        self.out_dim, self.W_std, self.b_std = out_dim, W_std, b_std
        self.parameterization, self.s = parameterization, tuple(s)
        self.weight = nn.parameter.UninitializedParameter()
        self.bias = None if b_std is None else nn.parameter.UninitializedParameter()

    @property
    def requirements(self) -> Requirements:
        return Requirements(diagonal_spatial=Diagonal())

    @property
    def width(self) -> int:
        """Number of output channels of the finite network."""
        return self.out_dim * (self.s[1] if self.parameterization == 'standard' else 1)

    def output_shape(self, input_shape: Shape) -> Shape:
        return (input_shape[0], self.width, *input_shape[2:])

    def init_parameters(self, input_shape: Shape, generator: torch.Generator | None = None,
                        dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> Shape:
        in_dim = input_shape[1]
        sample_device = None if generator is None else generator.device
        weight = torch.randn(self.width, in_dim, generator=generator, device=sample_device,
                             dtype=dtype)
        bias = None if self.b_std is None else torch.randn(self.width, generator=generator,
                                                           device=sample_device, dtype=dtype)
        if self.parameterization == 'standard':
            weight = weight * float(self.W_std) / math.sqrt(in_dim / self.s[0])
            bias = None if bias is None else bias * float(self.b_std)
        self.weight = nn.Parameter(weight.to(device))
        self.bias = None if bias is None else nn.Parameter(bias.to(device))
        return self.output_shape(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if nn.parameter.is_lazy(self.weight):
            self.init_parameters(x.shape, dtype=x.dtype, device=x.device)
        if x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"Dense: expected {self.weight.shape[1]} input channels (axis 1), "
                             f"got input of shape {tuple(x.shape)}")
        z = torch.einsum('nc...,oc->no...', x, self.weight)
        bias = None if self.bias is None else self.bias.view(-1, *([1] * (x.ndim - 2)))
        if self.parameterization == 'ntk':
            z = z * (self.W_std / math.sqrt(x.shape[1]))
            return z if bias is None else z + self.b_std * bias
        z = z / math.sqrt(self.s[0])
        return z if bias is None else z + bias

    def kernel_rule(self, k: Kernel) -> Kernel:
        dtype, device = k.nngp.dtype, k.nngp.device
        W_var = torch.as_tensor(self.W_std, dtype=dtype, device=device)**2
        b_var = torch.as_tensor(0. if self.b_std is None else self.b_std, dtype=dtype,
                                device=device)**2

        def affine(cov: torch.Tensor | None) -> torch.Tensor | None:
            return None if cov is None else torch.addcmul(b_var, W_var, cov)

        nngp = affine(k.nngp)
        ntk = k.ntk
        if ntk is not None:
            if self.parameterization == 'ntk':
                ntk = torch.addcmul(nngp, W_var, ntk)
            else:
                ntk = torch.addcmul(W_var * ntk, torch.as_tensor(k.shape1[1] / self.s[0], dtype=dtype, device=device), k.nngp)
                ntk = ntk if self.b_std is None else ntk + 1.
        return k.replace(nngp=nngp, ntk=ntk, cov1=affine(k.cov1), cov2=affine(k.cov2),
                         is_gaussian=True, shape1=self.output_shape(k.shape1),
                         shape2=self.output_shape(k.shape2))

    def extra_repr(self) -> str:
        text = f"{self.out_dim}, W_std={self.W_std}, b_std={self.b_std}"
        if self.parameterization == 'standard':
            text += f", parameterization='standard', s={self.s}"
        return text
