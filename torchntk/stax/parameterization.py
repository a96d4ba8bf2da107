"""The parameterizations of an affine layer: how its weights are scaled.

An affine layer computes `z = w·L(x) + b` from weights and bias stored as
`W`, `B`, with `L` the unit linear map over `fan_in` inputs. The two
parameterizations differ in where `σ_W/√fan_in` sits (Jacot et al. 2018,
arXiv:1806.07572; Sohl-Dickstein et al. 2020, arXiv:2001.07301):

    'ntk':       W, B ~ N(0, 1),                    z = σ_W/√fan_in·L_W(x) + σ_b·B,
    'standard':  W ~ N(0, σ_W²·s_in/fan_in), B ~ N(0, σ_b²),   z = L_W(x)/√s_in + B.

Both give the same NNGP, `nngp' = σ_W²·A(nngp) + σ_b²`; the NTK is

    ntk' = γ·A(nngp) + σ_W²·A(ntk) + δ,

`(γ, δ) = (σ_W², σ_b²)` for 'ntk' and `(fan_in/s_in, 1 if there is a bias
else 0)` for 'standard', with `A` the covariance map of `L`. The layer, the
fused chain and the empirical structured rules all read these numbers here;
`ntk` is the same rule on tensors, reusing `nngp'` in the NTK parameterization.
"""

from __future__ import annotations

import abc
import dataclasses
import math

import torch

from ..checks import Scalar, check_choice, check_positive_int


class Parameterization(abc.ABC):
    """How an affine layer scales its weights; see the module docstring."""

    name: str

    @abc.abstractmethod
    def width(self, out_chan: int) -> int:
        """Output channels of the finite layer for `out_chan` of the kernel."""

    @abc.abstractmethod
    def weight_init_std(self, W_std: Scalar, fan_in: int) -> float:
        """Standard deviation of the stored weights `W` at initialization."""

    @abc.abstractmethod
    def bias_init_std(self, b_std: Scalar) -> float:
        """Standard deviation of the stored bias `B` at initialization."""

    @abc.abstractmethod
    def weight_multiplier(self, W_std: Scalar, fan_in: int) -> Scalar:
        """The factor `w` of `L_W(x)` in the forward pass."""

    @abc.abstractmethod
    def bias_multiplier(self, b_std: Scalar) -> Scalar:
        """The factor of `B` in the forward pass."""

    @abc.abstractmethod
    def ntk_coefficients(self, W_var: Scalar, b_var: Scalar, fan_in: int,
                         has_bias: bool) -> tuple[Scalar, Scalar]:
        """`(γ, δ)` of `ntk' = γ·A(nngp) + σ_W²·A(ntk) + δ`."""

    @abc.abstractmethod
    def ntk(self, nngp_out: torch.Tensor, nngp_linear: torch.Tensor, ntk_linear: torch.Tensor,
            W_var: torch.Tensor, fan_in: int, has_bias: bool) -> torch.Tensor:
        """`ntk' = γ·A(nngp) + σ_W²·A(ntk) + δ` from `nngp' = σ_W²·A(nngp) + σ_b²`,
        `A(nngp)` and `A(ntk)` (the `γ`, `δ` of `ntk_coefficients`)."""

    def extra_repr(self) -> str:
        """What `repr` of the layer adds for this parameterization."""
        return ''


@dataclasses.dataclass(frozen=True)
class NTKParameterization(Parameterization):
    """Unit-variance weights, scaled by `σ_W/√fan_in` in the forward pass."""

    name = 'ntk'

    def width(self, out_chan: int) -> int:
        return out_chan

    def weight_init_std(self, W_std: Scalar, fan_in: int) -> float:
        return 1.

    def bias_init_std(self, b_std: Scalar) -> float:
        return 1.

    def weight_multiplier(self, W_std: Scalar, fan_in: int) -> Scalar:
        return W_std / math.sqrt(fan_in)

    def bias_multiplier(self, b_std: Scalar) -> Scalar:
        return b_std

    def ntk_coefficients(self, W_var: Scalar, b_var: Scalar, fan_in: int,
                         has_bias: bool) -> tuple[Scalar, Scalar]:
        return W_var, b_var

    def ntk(self, nngp_out: torch.Tensor, nngp_linear: torch.Tensor, ntk_linear: torch.Tensor,
            W_var: torch.Tensor, fan_in: int, has_bias: bool) -> torch.Tensor:
        # γ·A(nngp) + δ is nngp' itself.
        return torch.addcmul(nngp_out, W_var, ntk_linear)


@dataclasses.dataclass(frozen=True)
class StandardParameterization(Parameterization):
    """Weights of variance `σ_W²·s_in/fan_in`, scaled by `1/√s_in`; a
    finite layer has `s_out·out_chan` channels (`s = (s_in, s_out)` are the
    width multipliers of Sohl-Dickstein et al.)."""

    s_in: int = 1
    s_out: int = 1
    name = 'standard'

    def width(self, out_chan: int) -> int:
        return out_chan * self.s_out

    def weight_init_std(self, W_std: Scalar, fan_in: int) -> float:
        return float(W_std) / math.sqrt(fan_in / self.s_in)

    def bias_init_std(self, b_std: Scalar) -> float:
        return float(b_std)

    def weight_multiplier(self, W_std: Scalar, fan_in: int) -> Scalar:
        return 1 / math.sqrt(self.s_in)

    def bias_multiplier(self, b_std: Scalar) -> Scalar:
        return 1.

    def ntk_coefficients(self, W_var: Scalar, b_var: Scalar, fan_in: int,
                         has_bias: bool) -> tuple[Scalar, Scalar]:
        return fan_in / self.s_in, (1. if has_bias else 0.)

    def ntk(self, nngp_out: torch.Tensor, nngp_linear: torch.Tensor, ntk_linear: torch.Tensor,
            W_var: torch.Tensor, fan_in: int, has_bias: bool) -> torch.Tensor:
        gamma = torch.as_tensor(fan_in / self.s_in, dtype=nngp_linear.dtype,
                                device=nngp_linear.device)
        ntk = torch.addcmul(W_var * ntk_linear, gamma, nngp_linear)
        return ntk + 1. if has_bias else ntk

    def extra_repr(self) -> str:
        return f", parameterization='standard', s={(self.s_in, self.s_out)}"


PARAMETERIZATIONS = ('ntk', 'standard')


def make_parameterization(name: str, s: tuple[int, int], caller: str) -> Parameterization:
    """The parameterization called `name` (`'ntk'` or `'standard'`) with
    width multipliers `s = (s_in, s_out)`, checked for `caller`."""
    name = check_choice(name, 'parameterization', caller, PARAMETERIZATIONS)
    if not isinstance(s, (tuple, list)):
        raise TypeError(f"{caller}: s must be a pair (s_in, s_out), got {s!r}")
    if len(s) != 2:
        raise ValueError(f"{caller}: s must be a pair (s_in, s_out), got {s!r}")
    for value in s:
        check_positive_int(value, 's', caller)
    return NTKParameterization() if name == 'ntk' else StandardParameterization(*s)
