"""Gradient flow on the mean squared error in closed form: outputs, the
parameters of the linearized network, and the largest stable learning rate."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from ..checks import check_flag, check_nonnegative, check_positive, check_positive_int
from ..empirical import empirical_ntk_fn
from ..empirical.inputs import check_model, checked_params
from .arguments import (Targets, Times, broadcast_outputs, check_momentum, check_psd,
                        checked_kernel, checked_targets, checked_test_train_kernel, checked_times,
                        checked_train_matrix, shape_or_type)
from .layout import OutputAxes, kernel_matrix
from .linalg import CholeskyFactor, KernelSpectrum, regularized

Params = dict[str, torch.Tensor]


def gradient_descent_mse(k_train_train: torch.Tensor, y_train: torch.Tensor,
                         learning_rate: float = 1., diag_reg: float = 0.,
                         diag_reg_absolute_scale: bool = False,
                         trace_axes: Sequence[int] = (-1,)) -> Callable[..., Any]:
    r"""Outputs of a network trained by gradient flow on the MSE, in closed form.

    .. math::
        f_{train}(t) = f_{train}(0) - (I - e^{-ηΘt/n}) (f_{train}(0) - y)

        f_{test}(t) = f_{test}(0) - Θ_{test,train} Θ^{-1} (I - e^{-ηΘt/n}) (f_{train}(0) - y)

    evaluated in the eigenbasis of `Θ = k_train_train` (eigendecomposition cached
    on first use) for finite `t`, and with a cached Cholesky factorization for
    `t=None` (infinite time, where `f_train = y`).

    Args:
        k_train_train: the NTK (or NNGP, for training of the readout layer only)
            on the training inputs, in the layout of `y_train` without
            `trace_axes` (see `torchntk.predict`).
        y_train: targets `(N, *O)`.
        learning_rate: step size `η`; `t` counts steps of this size.
        diag_reg: strength of the diagonal regularizer, relative to
            `mean(diag k_train_train)` unless `diag_reg_absolute_scale`.
        diag_reg_absolute_scale: take `diag_reg` in the kernel's own units.
        trace_axes: output axes of `y_train` along which the kernel is `Θ ⊗ I`.

    Returns:
        `predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)`:
        `t` is `None` (infinity), a number or a tensor of times `≥ 0` (`inf`
        allowed); `fx_train_0`, `fx_test_0` are the outputs at `t = 0` (tensors
        or numbers, broadcast; `None` skips that set); `k_test_train` is the
        test-train kernel, needed for test outputs. Returns `fx_train_t`,
        `fx_test_t` (when `fx_train_0 is None`), or `(fx_train_t, fx_test_t)`.

    Shape:
        `k_train_train`: `(N, N)` for `trace_axes=(-1,)`, `(N, N, O, O)` for
        `trace_axes=()`. `k_test_train`: `(M, N)` or `(M, N, O, O)`.
        Outputs: `(*t.shape, N, *O)` and `(*t.shape, M, *O)`.
    """
    caller = 'gradient_descent_mse'
    k_train_train = checked_kernel(k_train_train, 'k_train_train', caller)
    y_train = checked_targets(y_train, k_train_train, caller)
    axes = OutputAxes(y_train.shape, trace_axes, caller)
    axes.check_kernel(k_train_train, 'k_train_train', axes.kept_shape, axes.kept_shape)
    check_positive(learning_rate, 'learning_rate', caller)
    check_nonnegative(diag_reg, 'diag_reg', caller)
    check_flag(diag_reg_absolute_scale, 'diag_reg_absolute_scale', caller)
    flow = MseFlow(checked_train_matrix(k_train_train, 'k_train_train', caller),
                   y_train.numel(), diag_reg, diag_reg_absolute_scale, caller, 'k_train_train')

    def predict_fn(t: Times = None, fx_train_0: Targets = 0., fx_test_0: Targets = None,
                   k_test_train: torch.Tensor | None = None) -> Any:
        if fx_train_0 is None and fx_test_0 is None:
            raise ValueError(f"{caller}: fx_train_0 and fx_test_0 are both None; nothing to "
                             "predict")
        residual = axes.to_matrix(broadcast_outputs(0. if fx_train_0 is None else fx_train_0,
                                                    y_train, y_train.shape, 'fx_train_0', caller)
                                  - y_train)
        fx_train_t = fx_test_t = None
        if fx_train_0 is not None:
            fx_train_0 = broadcast_outputs(fx_train_0, y_train, y_train.shape, 'fx_train_0', caller)
            if t is None:
                fx_train_t = y_train.clone()
            else:
                times, t_shape = checked_times(t, learning_rate, k_train_train, caller)
                change = axes.from_matrix(flow.train_change(times, residual),
                                          axes.kept_shape, t_shape)
                fx_train_t = fx_train_0 + change
        if fx_test_0 is not None:
            k_test_train = checked_test_train_kernel(k_test_train, k_train_train, axes, caller)
            test_shape = axes.outputs_shape(k_test_train.shape[::2])
            fx_test_0 = broadcast_outputs(fx_test_0, y_train, test_shape, 'fx_test_0', caller)
            times, t_shape = (None, ()) if t is None else checked_times(t, learning_rate,
                                                                        k_train_train, caller)
            change = -kernel_matrix(k_test_train) @ flow.coefficients(times, residual)
            fx_test_t = fx_test_0 + axes.from_matrix(change, k_test_train.shape[::2], t_shape)
        if fx_test_t is None:
            return fx_train_t
        if fx_train_t is None:
            return fx_test_t
        return fx_train_t, fx_test_t

    return predict_fn


def gradient_descent_mse_params(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
                                params_0: Params | None = None, learning_rate: float = 1.,
                                diag_reg: float = 0., diag_reg_absolute_scale: bool = False,
                                implementation: str = 'jacobian_contraction'
                                ) -> Callable[..., Params]:
    r"""Parameters of a linearized network after gradient flow on the MSE, in closed form.

    For `f_lin(x, θ) = f(x, θ_0) + J(x) (θ - θ_0)` trained by gradient flow on
    `0.5 · mean((f_lin(x_train) - y_train)²)` (eq. 8 of Lee et al. 2019,
    arXiv:1902.06720, with `torchntk.predict`'s time convention):

    .. math::
        θ_t = θ_0 - J(x_{train})^T\, Θ^{-1} (I - e^{-ηΘt/n}) (f(x_{train}, θ_0) - y_{train})

    with `Θ = J Jᵀ` the full empirical NTK of `model` at `θ_0` (every output
    axis kept, `trace_axes=()`). The coefficients `Θ⁻¹(I - e^{-ηΘt/n})(f_0 - y)`
    come from the same eigendecomposition as `gradient_descent_mse`, and
    `Jᵀ ·` is one vector-Jacobian product (`torch.func.vjp`, batched over times
    by `vmap`): the Jacobian is never formed. So
    `linearize(model, θ_0)(x, params_fn(t))` equals
    `gradient_descent_mse(Θ, y_train, trace_axes=())(t, f_0, ...)` on any `x`.

    Applying the nonlinear `model` to `θ_t` gives the same outputs only in the
    limit of infinite width, where the network stays in its linear regime; at
    finite width the difference shrinks with the width (as `1/√width` in NTK
    parameterization).

    Args:
        model: any `nn.Module` with one input; only parameters with
            `requires_grad=True` (or those in `params_0`) are trained.
        x_train: training inputs.
        y_train: targets, of the shape of `model(x_train)`.
        params_0: parameter name -> initial value (default: the model's own).
        learning_rate, diag_reg, diag_reg_absolute_scale: as in `gradient_descent_mse`.
        implementation: how the empirical NTK is computed (see `empirical_ntk_fn`).

    Returns:
        `params_fn(t=None)`: parameter name -> value at time `t` (`None` is
        infinite time, by Cholesky; `float('inf')` the pseudo-inverse limit).

    Shape:
        each parameter: `(*t.shape, *param.shape)`.
    """
    caller = 'gradient_descent_mse_params'
    check_model(model, caller)
    if not isinstance(x_train, torch.Tensor):
        raise TypeError(f"{caller}: x_train must be a tensor, got {type(x_train).__name__}")
    if params_0 is None:
        params_0 = {key: p.detach() for key, p in model.named_parameters() if p.requires_grad}
    else:  # names and shapes too: functional_call would ignore a misspelt name
        params_0 = checked_params(model, params_0, caller, 'params_0')
    params_0 = {key: p.detach() for key, p in params_0.items()}
    if not params_0:
        raise ValueError(f"{caller}: the model has no trainable parameters")
    check_positive(learning_rate, 'learning_rate', caller)
    check_nonnegative(diag_reg, 'diag_reg', caller)
    check_flag(diag_reg_absolute_scale, 'diag_reg_absolute_scale', caller)
    try:
        ntk_fn = empirical_ntk_fn(model, trace_axes=(), implementation=implementation)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{caller}: {error}") from error

    fx_train_0, vjp_fn = vjp(lambda p: functional_call(model, p, (x_train,)), params_0)
    if not isinstance(y_train, torch.Tensor) or y_train.shape != fx_train_0.shape:
        raise ValueError(f"{caller}: y_train must have the shape of model(x_train), "
                         f"{tuple(fx_train_0.shape)}, got {shape_or_type(y_train)}")
    ntk = ntk_fn(x_train, None, params_0)
    ntk = checked_kernel(ntk, 'the empirical NTK', caller)
    y_train = checked_targets(y_train, ntk, caller)
    axes = OutputAxes(y_train.shape, (), caller)
    flow = MseFlow(checked_train_matrix(ntk, 'the empirical NTK', caller), y_train.numel(),
                   diag_reg, diag_reg_absolute_scale, caller, 'the empirical NTK')
    residual = axes.to_matrix(fx_train_0.detach().to(ntk.dtype) - y_train)

    def params_fn(t: Times = None) -> Params:
        times, t_shape = (None, ()) if t is None else checked_times(t, learning_rate, ntk, caller)
        coefficients = axes.from_matrix(flow.coefficients(times, residual), axes.kept_shape,
                                        (-1,))
        coefficients = coefficients.to(fx_train_0.dtype)
        (changes,) = vmap(vjp_fn)(coefficients)
        return {key: (p - changes[key]).reshape(*t_shape, *p.shape) for key, p in params_0.items()}

    return params_fn


def max_learning_rate(ntk_train_train: torch.Tensor, y_train_size: int | None = None,
                      momentum: float = 0., eps: float = 1e-12) -> float:
    r"""Largest learning rate at which full-batch gradient descent on the MSE converges.

    .. math:: η_{max} = \frac{2 (1 + β)\, n}{λ_{max}(Θ) + ε}

    for the loss `0.5 · mean((f - y)²)` over `n = y_train_size` entries (the
    iteration `f ← f - η Θ (f - y)/n` contracts for `η < 2n/λ_max`; heavy-ball
    momentum `β` widens the range by `1 + β`, "Why Momentum Really Works", Goh 2017).

    Args:
        ntk_train_train: NTK on the training set, `(N, N)` or zipped `(N, N, O, O)`.
        y_train_size: `y_train.numel()`; `None` takes the kernel's side length
            (`N` for a `(N, N)` kernel: pass `N · O` when the output axis is traced).
        momentum: heavy-ball momentum `β` in `[0, 1]`.
        eps: added to `λ_max` to avoid dividing by zero.

    A kernel that is not symmetric and positive semi-definite (beyond rounding,
    `λ_min ≥ -√eps · max |λ|`) is refused: gradient descent diverges along a
    negative eigenvalue at any rate.
    """
    caller = 'max_learning_rate'
    kernel = checked_kernel(ntk_train_train, 'ntk_train_train', caller)
    matrix = checked_train_matrix(kernel, 'ntk_train_train', caller)
    check_momentum(momentum, caller)
    check_nonnegative(eps, 'eps', caller)
    if y_train_size is None:
        y_train_size = matrix.shape[0]
    else:
        check_positive_int(y_train_size, 'y_train_size', caller)
    evals = torch.linalg.eigvalsh(matrix.detach())
    check_psd(evals, 'ntk_train_train', caller)
    return 2. * (1. + momentum) * y_train_size / (float(evals[-1]) + eps)


class MseFlow:
    """Gradient flow `df/dt = -Θ (f - y)/n` on a train-train kernel matrix, in closed form."""

    def __init__(self, matrix: torch.Tensor, n: int, diag_reg: float, absolute: bool,
                 caller: str, arg: str):
        self.matrix = regularized(matrix, diag_reg, absolute)
        self.n, self.caller, self.arg = n, caller, arg
        self._spectrum: KernelSpectrum | None = None
        self._cholesky: CholeskyFactor | None = None

    @property
    def spectrum(self) -> KernelSpectrum:
        if self._spectrum is None:
            self._spectrum = KernelSpectrum(self.matrix, self.n, self.caller, self.arg)
        return self._spectrum

    def train_change(self, times: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`f_train(t) - f_train(0) = -(I - e^{-Θt/n}) (f_0 - y)`, `(T, D, M)`."""
        return -self.spectrum.apply(self.spectrum.one_minus_decay(times), residual)

    def coefficients(self, times: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
        """`Θ⁻¹ (I - e^{-Θt/n}) (f_0 - y)`: `(T, D, M)`, or `(D, M)` for `times=None` (t = ∞)."""
        if times is not None:
            return self.spectrum.apply(self.spectrum.integral(times), residual)
        if self._cholesky is None:
            self._cholesky = CholeskyFactor(self.matrix, self.caller, self.arg)
        return self._cholesky.solve(residual)
