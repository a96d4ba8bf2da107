"""Affine layers: `Identity`, `Dense`, and `Affine`, the base of `Dense` and the convolutions."""

from __future__ import annotations

import abc
import math
from typing import Sequence

import torch
from torch import nn

from ..checks import Scalar, check_nonnegative, check_positive_int
from ..kernel import Kernel, Shape
from ..ops import conv_chain
from .module import Layer
from .parameterization import Parameterization, make_parameterization
from .requirements import Diagonal, Requirements


class Identity(Layer):
    """`f(x) = x`; the kernel passes through unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def kernel_rule(self, k: Kernel) -> Kernel:
        return k


class Affine(Layer, abc.ABC):
    """What `Dense` and the convolutions share: a linear map `L` of the inputs
    with i.i.d. weights plus a bias, in the NTK or standard parameterization.

    Subclasses give the weight shape, the fan-in, the finite-width map `L`
    (`linear`) and its covariance map `A` (`cov_map`, with unit-variance
    weights); the kernel rule is then, in the NTK parameterization
    (Jacot et al. 2018, arXiv:1806.07572),

        nngp' = σ_W²·A(nngp) + σ_b²,     ntk' = nngp' + σ_W²·A(ntk),

    and in the standard one (Sohl-Dickstein et al. 2020, arXiv:2001.07301)

        ntk' = (fan_in / s_in)·A(nngp) + σ_W²·A(ntk) (+ 1 if the layer has a bias).

    Masks: an output position of `Dense` is masked when its input position is
    masked in every channel (convolutions: see `Conv`, `ConvTranspose`), and
    its covariances are zeroed (the bias would make them nonzero).
    """

    remask = True
    # The name of the width argument (`out_chan`) in a subclass's signature, for errors.
    width_arg = 'out_chan'

    def __init__(self, out_chan: int, W_std: Scalar = 1., b_std: Scalar | None = None,
                 parameterization: str = 'ntk', s: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        name = self._name()
        check_positive_int(out_chan, self.width_arg, name)
        check_nonnegative(W_std, 'W_std', name)
        check_nonnegative(b_std, 'b_std', name, allow_none=True)
        for arg, std in (('W_std', W_std), ('b_std', b_std)):
            _check_finite_variance(std, arg, name)
        self.parameterization: Parameterization = make_parameterization(parameterization, s, name)
        self.out_chan, self.W_std, self.b_std, self.s = out_chan, W_std, b_std, tuple(s)
        self.weight = nn.parameter.UninitializedParameter()
        self.bias = None if b_std is None else nn.parameter.UninitializedParameter()

    @property
    def width(self) -> int:
        """Number of output channels of the finite network."""
        return self.parameterization.width(self.out_chan)

    @abc.abstractmethod
    def fan_in(self, in_chan: int) -> int:
        """Number of inputs each output sums over."""

    @abc.abstractmethod
    def weight_shape(self, input_shape: Shape) -> Shape:
        """Shape of the weight for inputs of `input_shape`."""

    def bias_shape(self, input_shape: Shape) -> Shape:
        return (self.width,)

    @abc.abstractmethod
    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """The unscaled linear map `L(x)` of the finite layer."""

    @abc.abstractmethod
    def cov_map(self, cov: torch.Tensor, batch_ndim: int, diagonal_spatial: bool) -> torch.Tensor:
        """The covariance map `A` of `linear` with unit-variance weights, on a
        covariance tensor with `batch_ndim` leading batch axes."""

    @property
    def requirements(self) -> Requirements:
        return Requirements(diagonal_spatial=Diagonal())

    def init_parameters(self, input_shape: Shape, generator: torch.Generator | None = None,
                        dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> Shape:
        output_shape = self.output_shape(input_shape)
        sample_device = None if generator is None else generator.device
        weight = torch.randn(self.weight_shape(input_shape), generator=generator,
                             device=sample_device, dtype=dtype)
        bias = None if self.b_std is None else torch.randn(
            self.bias_shape(input_shape), generator=generator, device=sample_device, dtype=dtype)
        weight = weight * self.parameterization.weight_init_std(self.W_std,
                                                                self.fan_in(input_shape[1]))
        bias = None if bias is None else bias * self.parameterization.bias_init_std(self.b_std)
        self.weight = nn.Parameter(weight.to(device))
        self.bias = None if bias is None else nn.Parameter(bias.to(device))
        return output_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.output_shape(x.shape)  # validates the input's rank
        if nn.parameter.is_lazy(self.weight):
            self.init_parameters(x.shape, dtype=x.dtype, device=x.device)
        expected = self.weight_shape(x.shape)
        if tuple(self.weight.shape) != expected:
            raise ValueError(f"{self._name()}: the weight of shape {tuple(self.weight.shape)} was "
                             f"made for other inputs than {tuple(x.shape)} (expected {expected})")
        z = self.linear(x)
        bias = None if self.bias is None else \
            self.bias.view(*self.bias.shape, *[1] * (z.ndim - 1 - self.bias.ndim))
        z = z * self.parameterization.weight_multiplier(self.W_std, self.fan_in(x.shape[1]))
        return z if bias is None else z + self.parameterization.bias_multiplier(self.b_std) * bias

    def kernel_rule(self, k: Kernel) -> Kernel:
        self.output_shape(k.shape1)
        dtype, device = k.nngp.dtype, k.nngp.device
        W_var = torch.as_tensor(self.W_std, dtype=dtype, device=device)**2
        b_var = torch.as_tensor(0. if self.b_std is None else self.b_std, dtype=dtype,
                                device=device)**2
        linear = k.map_covariances(
            lambda cov, batch_ndim: self.cov_map(cov, batch_ndim, k.diagonal_spatial))
        nngp = torch.addcmul(b_var, W_var, linear.nngp)
        ntk = None if linear.ntk is None else self.parameterization.ntk(
            nngp, linear.nngp, linear.ntk, W_var, self.fan_in(k.shape1[1]),
            self.b_std is not None)
        return linear.map_covariances(
            lambda cov, _: torch.addcmul(b_var, W_var, cov), ('cov1', 'cov2'), nngp=nngp, ntk=ntk,
            is_gaussian=True, iid_channels=True, shape1=self.output_shape(k.shape1),
            shape2=self.output_shape(k.shape2))

    def _affine_chain_step(self, in_chan: int, circular: bool,
                           windows: Sequence[conv_chain.Window]) -> conv_chain.AffineStep | None:
        """This layer's rule as a fused chain's step (`chain_step`), `A` summing
        over `windows`; `None` where autograd is to reach W_std or b_std (the
        chain has no backward)."""
        if conv_chain.needs_gradient(self.W_std, self.b_std):
            return None
        W_std, b_std = float(self.W_std), 0. if self.b_std is None else float(self.b_std)
        W_var, b_var = W_std * W_std, b_std * b_std   # inf where they overflow, as in kernel_rule
        gamma, delta = self.parameterization.ntk_coefficients(
            W_var, b_var, self.fan_in(in_chan), self.b_std is not None)
        return conv_chain.AffineStep(W_var, b_var, float(gamma), float(delta), circular,
                                     tuple(windows))

    def hyperparameters_repr(self) -> str:
        return f"W_std={self.W_std}, b_std={self.b_std}" + self.parameterization.extra_repr()


def _check_finite_variance(std: Scalar | None, arg: str, caller: str) -> None:
    """Raise a `ValueError` unless the variance `std²` is finite in float64:
    the kernels scale with it, and past ~1.3e154 every kernel would be inf."""
    if std is None:
        return
    value = float(std.detach()) if isinstance(std, torch.Tensor) else float(std)
    if not math.isfinite(value * value):
        raise ValueError(f"{caller}: {arg} must be below ~1.34e154 (its square, the "
                         f"variance, overflows float64 and every kernel would be inf), "
                         f"got {value:g}")


class Dense(Affine):
    r"""Fully connected layer acting on the channel axis (axis 1).

    NTK parameterization, `W, b ~ N(0, 1)`:
    :math:`z = \sigma_W / \sqrt{C_{in}}\, W x + \sigma_b b`, with kernel rule

        nngp' = σ_W²·nngp + σ_b²,     ntk' = nngp' + σ_W²·ntk.

    Standard parameterization, `W ~ N(0, σ_W² s_in / C_in)`, `b ~ N(0, σ_b²)`,
    `W` of shape `(s_out·out_dim, C_in)`: :math:`z = W x / \sqrt{s_{in}} + b`, and

        ntk' = (C_in / s_in)·nngp + σ_W²·ntk (+ 1 if the layer has a bias).

    `b_std=None` means no bias, which differs from `b_std=0.` in the standard
    parameterization (the bias still trains there). See `Affine`.

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

    width_arg = 'out_dim'

    def __init__(self, out_dim: int, W_std: Scalar = 1., b_std: Scalar | None = None,
                 parameterization: str = 'ntk', s: tuple[int, int] = (1, 1)) -> None:
        super().__init__(out_dim, W_std, b_std, parameterization, s)

    @property
    def out_dim(self) -> int:
        return self.out_chan

    def fan_in(self, in_chan: int) -> int:
        return in_chan

    def weight_shape(self, input_shape: Shape) -> Shape:
        return (self.width, input_shape[1])

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) < 2:
            raise ValueError(f"Dense: inputs must have shape (N, C, *spatial), got {tuple(input_shape)}")
        return (input_shape[0], self.width, *input_shape[2:])

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum('nc...,oc->no...', x, self.weight)

    def mask_rule(self, mask: torch.Tensor, input_shape: Shape) -> torch.Tensor:
        return mask.all(dim=1, keepdim=True)

    def cov_map(self, cov: torch.Tensor, batch_ndim: int, diagonal_spatial: bool) -> torch.Tensor:
        return cov

    @property
    def chain_step_kind(self) -> type[conv_chain.AffineStep] | None:
        # The exact type: a subclass may change the rule.
        return conv_chain.AffineStep if type(self) is Dense else None

    def chain_step(self, input_shape: Shape) -> conv_chain.AffineStep | None:
        position = conv_chain.Window(size=1, stride=1, pad_low=0, pad_high=0)
        return self._affine_chain_step(input_shape[1], False,
                                       (position,) * (len(input_shape) - 2))

    def extra_repr(self) -> str:
        return f"{self.out_dim}, {self.hyperparameters_repr()}"
