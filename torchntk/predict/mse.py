r"""Predictions of wide networks trained by gradient descent, from their kernels.

Given the NTK (or NNGP) on the training set, the outputs of an infinitely wide
network (or of the linearization of a finite one) follow a linear ODE in
function space under gradient flow, solved here in closed form for the mean
squared error and numerically for any other loss ("Wide Neural Networks of Any
Depth Evolve as Linear Models Under Gradient Descent", Lee et al. 2019,
arXiv:1902.06720). The semantics are those of neural-tangents' `predict`:

* the loss is `0.5 · mean((f - y)²)` over all `n = y_train.numel()` entries,
  so gradient flow is `df/dt = -η Θ (f - y) / n`;
* times `t` count steps of size `learning_rate = η` (continuous: the
  absolute time is `η t`), so `t` and `learning_rate` are interchangeable;
* `t=None` is infinite time, solved by a Cholesky factorization; a finite `t`
  (any shape: the outputs get leading axes `t.shape`) by an
  eigendecomposition. Both are computed on first use and cached.

Kernel layout. For targets `y_train` of shape `(N, *O)`, a kernel lacks the
output axes in `trace_axes` (it is read as `Θ ⊗ I` along them) and has every
other axis twice, zipped: `trace_axes=(-1,)` (the default, and the layout of
`model.kernel_fn` and of `empirical_ntk_fn`'s default) gives `(N1, N2)`;
`trace_axes=()` gives `(N1, N2, O, O')`, the full kernel of a finite network
(`empirical_ntk_fn(model, trace_axes=())`).

Regularization. `diag_reg` adds `diag_reg · mean(diag K) · I` to the train-train
kernel (`diag_reg · I` with `diag_reg_absolute_scale=True`) before it is
factorized. With `diag_reg=0` a singular kernel cannot be Cholesky-factorized:
`t=None` then raises and asks for `diag_reg > 0`, while `t=float('inf')` goes
through the eigendecomposition and takes the limit of gradient flow, which never
moves along the kernel's null space (a pseudo-inverse with the cutoff
`λ ≤ λ_max · n · eps`). Negative eigenvalues, which a PSD kernel gets only from
round-off, are treated as zero; a train-train kernel that is not symmetric or
not positive semi-definite beyond round-off (`λ_min < -√eps · max |λ|`) is refused.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from tqdm.auto import tqdm

from ..empirical import empirical_ntk_fn
from ..stax.module import check_nonnegative

Params = dict[str, torch.Tensor]
Times = Any  # None, a number, or a tensor of any shape
Targets = Any  # a tensor, a number (broadcast), or None


class Gaussian(NamedTuple):
    """Mean `(N, *O)` and covariance (the kernel's layout) of a Gaussian over outputs."""

    mean: torch.Tensor
    covariance: torch.Tensor


@dataclasses.dataclass
class ODEState:
    """State of `gradient_descent`'s ODE: outputs and, with momentum, their velocities.

    Pass one as `fx_train_or_state_0` to resume an integration (momentum included);
    the predictor then returns `ODEState`s.
    """

    fx_train: torch.Tensor | None = None
    fx_test: torch.Tensor | None = None
    qx_train: torch.Tensor | None = None
    qx_test: torch.Tensor | None = None


# ---------------------------------------------------------------------------
# Closed-form gradient descent on the MSE


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
            `trace_axes` (see the module docstring).
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
    name = 'gradient_descent_mse'
    k_train_train = _checked_kernel(k_train_train, 'k_train_train', name)
    y_train = _checked_targets(y_train, k_train_train, name)
    axes = _OutputAxes(y_train.shape, trace_axes, name)
    axes.check_kernel(k_train_train, 'k_train_train', axes.kept_shape, axes.kept_shape)
    _check_number(learning_rate, 'learning_rate', name, positive=True)
    _check_number(diag_reg, 'diag_reg', name)
    _check_flag(diag_reg_absolute_scale, 'diag_reg_absolute_scale', name)
    flow = _MseFlow(_train_matrix(k_train_train, 'k_train_train', name), y_train.numel(),
                    diag_reg, diag_reg_absolute_scale, name, 'k_train_train')

    def predict_fn(t: Times = None, fx_train_0: Targets = 0., fx_test_0: Targets = None,
                   k_test_train: torch.Tensor | None = None) -> Any:
        if fx_train_0 is None and fx_test_0 is None:
            raise ValueError(f"{name}: fx_train_0 and fx_test_0 are both None; nothing to predict")
        residual = axes.to_matrix(_broadcast(0. if fx_train_0 is None else fx_train_0, y_train,
                                             y_train.shape, 'fx_train_0', name) - y_train)
        fx_train_t = fx_test_t = None
        if fx_train_0 is not None:
            fx_train_0 = _broadcast(fx_train_0, y_train, y_train.shape, 'fx_train_0', name)
            if t is None:
                fx_train_t = y_train.clone()
            else:
                times, t_shape = _times(t, learning_rate, k_train_train, name)
                change = axes.from_matrix(flow.train_change(times, residual),
                                          axes.kept_shape, t_shape)
                fx_train_t = fx_train_0 + change
        if fx_test_0 is not None:
            k_test_train = _test_train_kernel(k_test_train, k_train_train, axes, name)
            test_shape = axes.outputs_shape(k_test_train.shape[::2])
            fx_test_0 = _broadcast(fx_test_0, y_train, test_shape, 'fx_test_0', name)
            times, t_shape = (None, ()) if t is None else _times(t, learning_rate,
                                                                  k_train_train, name)
            change = -_matrix(k_test_train) @ flow.coefficients(times, residual)
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
    arXiv:1902.06720, with this module's time convention):

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
    name = 'gradient_descent_mse_params'
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x_train, torch.Tensor):
        raise TypeError(f"{name}: x_train must be a tensor, got {type(x_train).__name__}")
    if params_0 is not None and not isinstance(params_0, Mapping):
        raise TypeError(f"{name}: params_0 must be a dict of parameter name -> tensor, got "
                        f"{type(params_0).__name__}")
    if params_0 is None:
        params_0 = {key: p.detach() for key, p in model.named_parameters() if p.requires_grad}
    params_0 = {key: p.detach() for key, p in params_0.items()}
    if not params_0:
        raise ValueError(f"{name}: the model has no trainable parameters")
    _check_number(learning_rate, 'learning_rate', name, positive=True)
    _check_number(diag_reg, 'diag_reg', name)
    _check_flag(diag_reg_absolute_scale, 'diag_reg_absolute_scale', name)
    try:
        ntk_fn = empirical_ntk_fn(model, trace_axes=(), implementation=implementation)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{name}: {error}") from error

    fx_train_0, vjp_fn = vjp(lambda p: functional_call(model, p, (x_train,)), params_0)
    if not isinstance(y_train, torch.Tensor) or y_train.shape != fx_train_0.shape:
        raise ValueError(f"{name}: y_train must have the shape of model(x_train), "
                         f"{tuple(fx_train_0.shape)}, got {_shape_or_type(y_train)}")
    ntk = ntk_fn(x_train, None, params_0)
    ntk = _checked_kernel(ntk, 'the empirical NTK', name)
    y_train = _checked_targets(y_train, ntk, name)
    axes = _OutputAxes(y_train.shape, (), name)
    flow = _MseFlow(_train_matrix(ntk, 'the empirical NTK', name), y_train.numel(), diag_reg,
                    diag_reg_absolute_scale, name, 'the empirical NTK')
    residual = axes.to_matrix(fx_train_0.detach().to(ntk.dtype) - y_train)

    def params_fn(t: Times = None) -> Params:
        times, t_shape = (None, ()) if t is None else _times(t, learning_rate, ntk, name)
        coefficients = axes.from_matrix(flow.coefficients(times, residual), axes.kept_shape,
                                        (-1,))
        coefficients = coefficients.to(fx_train_0.dtype)
        (changes,) = vmap(vjp_fn)(coefficients)
        return {key: (p - changes[key]).reshape(*t_shape, *p.shape) for key, p in params_0.items()}

    return params_fn


# ---------------------------------------------------------------------------
# Gradient descent on any loss, by an ODE solver


def gradient_descent(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     k_train_train: torch.Tensor, y_train: torch.Tensor,
                     learning_rate: float = 1., momentum: float | None = None,
                     trace_axes: Sequence[int] = (-1,), *, method: str = 'dopri5',
                     rtol: float | None = None, atol: float | None = None,
                     progress: bool = True) -> Callable[..., Any]:
    r"""Outputs of a network trained by gradient flow (or heavy-ball momentum) on any loss.

    Integrates the function-space ODE

    .. math:: \dot f_{train} = -Θ\, ∇_f \mathrm{loss}(f_{train}, y),\qquad
              \dot f_{test} = -Θ_{test,train}\, ∇_f \mathrm{loss}(f_{train}, y)

    in time `η t` with `torchdiffeq.odeint` (default: `dopri5`, the adaptive
    Dormand–Prince 5(4) Runge–Kutta method, with `rtol=1e-8, atol=1e-10` in
    float64 and `rtol=1e-5, atol=1e-7` otherwise). `loss(fx, y)` must be a
    differentiable scalar function of `fx` (`torch.autograd.grad` takes its
    gradient), e.g. `lambda fx, y: -(y * fx.log_softmax(-1)).sum(-1).mean()`;
    `0.5 * ((fx - y) ** 2).mean()` reproduces `gradient_descent_mse`.

    With `momentum = β` this is the continuous limit of heavy-ball gradient
    descent `v ← β v - η ∇θ loss`, `θ ← θ + v` at small `η`: in time `√η t`,
    `f̈ = -Θ ∇_f loss + (β - 1)/√η · ḟ` (state `(f, q = ḟ)`). Time is then in units
    of `√η`, so `t` still counts steps but `t` and `learning_rate` are no longer
    interchangeable.

    Explicit solvers take steps of at most about `3 n / (η λ_max(Θ))` in absolute
    time, so the cost grows with `t · λ_max`; `method` takes any
    `torchdiffeq` method name for stiff problems.

    Args:
        loss: `loss(fx_train, y_train) -> scalar`.
        k_train_train, y_train, learning_rate, trace_axes: as in `gradient_descent_mse`.
        momentum: heavy-ball momentum `β` in `[0, 1]`, or `None` for plain gradient flow.
        method, rtol, atol: passed to `torchdiffeq.odeint`.
        progress: show a tqdm bar over the requested times when integrating takes long.

    Returns:
        `predict_fn(t, fx_train_or_state_0=0., fx_test_0=None, k_test_train=None)`
        like `gradient_descent_mse`'s, for finite `t` (any order, any shape;
        `t=None` and `inf` are refused: the flow of a general loss need not
        converge, e.g. cross-entropy on separable data).
        Passing an `ODEState` as `fx_train_or_state_0` (with `fx_test_0=None`)
        returns `ODEState`s, with the momentum variables.
    """
    name = 'gradient_descent'
    if not callable(loss):
        raise TypeError(f"{name}: loss must be callable as loss(fx, y), got {type(loss).__name__}")
    k_train_train = _checked_kernel(k_train_train, 'k_train_train', name)
    y_train = _checked_targets(y_train, k_train_train, name)
    axes = _OutputAxes(y_train.shape, trace_axes, name)
    axes.check_kernel(k_train_train, 'k_train_train', axes.kept_shape, axes.kept_shape)
    _check_number(learning_rate, 'learning_rate', name, positive=True)
    if momentum is not None:
        _check_momentum(momentum, name)
    if not isinstance(method, str):
        raise TypeError(f"{name}: method must be a torchdiffeq method name, got "
                        f"{type(method).__name__}")
    try:  # torchdiffeq lists its solvers in a private module; without it, torchdiffeq says
        from torchdiffeq._impl.odeint import SOLVERS
    except ImportError:
        SOLVERS = None
    if SOLVERS is not None and method not in SOLVERS:
        raise ValueError(f"{name}: method must be one of {tuple(SOLVERS)}, got {method!r}")
    for arg, value in (('rtol', rtol), ('atol', atol)):
        if value is not None:
            _check_number(value, arg, name, positive=True)
    _check_flag(progress, 'progress', name)
    float64 = k_train_train.dtype == torch.float64
    rtol = (1e-8 if float64 else 1e-5) if rtol is None else rtol
    atol = (1e-10 if float64 else 1e-7) if atol is None else atol
    time_scale = learning_rate if momentum is None else math.sqrt(learning_rate)
    damping = None if momentum is None else (momentum - 1.) / math.sqrt(learning_rate)
    k_train = _train_matrix(k_train_train, 'k_train_train', name)
    _check_psd(torch.linalg.eigvalsh(k_train.detach()), 'k_train_train', name)
    # Why there is no t = ∞ here: the flow of a general loss need not settle.
    no_limit = ("the flow of a general loss need not reach a limit (on separable data "
                "cross-entropy's outputs grow without bound); pass finite times, or for the "
                "MSE use gradient_descent_mse, whose t=None and t=float('inf') are its limit")

    def grad_loss(fx: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            fx = fx.detach().requires_grad_(True)
            value = loss(fx, y_train)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise ValueError(f"{name}: loss(fx, y) must return a scalar tensor, got "
                                 f"{_shape_or_type(value)}")
            (gradient,) = torch.autograd.grad(value.reshape(()), fx, allow_unused=True)
        return torch.zeros_like(fx) if gradient is None else gradient

    def derivative(k_test: torch.Tensor | None, test_kept: tuple[int, ...]) -> Callable:
        def rhs(_: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            gradient = axes.to_matrix(grad_loss(state[0]))
            force = [-axes.from_matrix(k_train @ gradient, axes.kept_shape)]
            if k_test is not None:
                force.append(-axes.from_matrix(k_test @ gradient, test_kept))
            if damping is None:
                return tuple(force)
            velocities = state[len(force):]
            return (*velocities, *(f + damping * q for f, q in zip(force, velocities)))
        return rhs

    def predict_fn(t: Times = None, fx_train_or_state_0: Targets | ODEState = 0.,
                   fx_test_0: Targets = None, k_test_train: torch.Tensor | None = None) -> Any:
        if t is None:
            raise ValueError(f"{name}: t=None (infinite time) cannot be integrated: {no_limit}")
        as_state = isinstance(fx_train_or_state_0, ODEState)
        if as_state:
            if fx_test_0 is not None:
                raise ValueError(f"{name}: with an ODEState, pass fx_test_0 in the state and "
                                 "leave the fx_test_0 argument None")
            state_0 = fx_train_or_state_0
        else:
            state_0 = ODEState(fx_train_or_state_0, fx_test_0)
        if momentum is None and (state_0.qx_train is not None or state_0.qx_test is not None):
            raise ValueError(f"{name}: the state has momentum variables but momentum is None")
        if state_0.fx_train is None and state_0.fx_test is None:
            raise ValueError(f"{name}: fx_train_0 and fx_test_0 are both None; nothing to predict")
        with_test = state_0.fx_test is not None
        k_test, test_kept, test_shape = None, (), ()
        if with_test:
            k_test_train = _test_train_kernel(k_test_train, k_train_train, axes, name)
            k_test, test_kept = _matrix(k_test_train), tuple(k_test_train.shape[::2])
            test_shape = axes.outputs_shape(test_kept)
        fx = [_broadcast(0. if state_0.fx_train is None else state_0.fx_train, y_train,
                         y_train.shape, 'fx_train_0', name)]
        if with_test:
            fx.append(_broadcast(state_0.fx_test, y_train, test_shape, 'fx_test_0', name))
        qx = []
        if momentum is not None:
            qx.append(_broadcast(0. if state_0.qx_train is None else state_0.qx_train, y_train,
                                 y_train.shape, 'qx_train', name))
            if with_test:
                qx.append(_broadcast(0. if state_0.qx_test is None else state_0.qx_test, y_train,
                                     test_shape, 'qx_test', name))

        times, t_shape = _times(t, time_scale, k_train_train, name, no_limit)
        trajectory = _integrate(derivative(k_test, test_kept), (*fx, *qx), times[:, 0],
                                dict(method=method, rtol=rtol, atol=atol), progress)
        trajectory = [x.reshape(*t_shape, *x.shape[1:]) for x in trajectory]
        fx_t, qx_t = trajectory[:len(fx)], trajectory[len(fx):]
        state_t = ODEState(fx_t[0], fx_t[1] if with_test else None,
                           qx_t[0] if qx_t else None, qx_t[1] if with_test and qx_t else None)
        if as_state:
            return state_t
        if not with_test:
            return state_t.fx_train
        if fx_train_or_state_0 is None:
            return state_t.fx_test
        return state_t.fx_train, state_t.fx_test

    return predict_fn


def _integrate(rhs: Callable, state_0: tuple[torch.Tensor, ...], times: torch.Tensor,
               options: dict[str, Any], progress: bool) -> list[torch.Tensor]:
    """States at `times` (any order, repeats allowed), integrating from time 0.

    The solver needs strictly increasing times starting at the initial one: it
    runs over the sorted distinct times, in up to 100 pieces so that a bar can
    report progress (each piece restarts the adaptive step size, a few extra
    evaluations).
    """
    from torchdiffeq import odeint  # imported here: only this solver needs it

    grid, index = torch.unique(torch.cat([times.new_zeros(1), times]), sorted=True,
                               return_inverse=True)
    states = [[x] for x in state_0]
    pieces = torch.arange(1, len(grid)).tensor_split(min(100, max(len(grid) - 1, 1)))
    pieces = [piece for piece in pieces if len(piece)]
    with tqdm(total=len(grid) - 1, desc='gradient_descent ODE', unit='time',
              disable=not progress or not pieces, delay=2., leave=False) as bar:
        for piece in pieces:
            start = int(piece[0]) - 1
            solution = odeint(rhs, tuple(x[-1] for x in states), grid[start:int(piece[-1]) + 1],
                              **options)
            for x, path in zip(states, solution):
                x.extend(path[1:])
            bar.update(len(piece))
    return [torch.stack(x)[index[1:]] for x in states]


# ---------------------------------------------------------------------------
# Exact Gaussian-process inference and infinite ensembles


def gp_inference(k_train_train: Any, y_train: torch.Tensor, diag_reg: float = 0.,
                 diag_reg_absolute_scale: bool = False,
                 trace_axes: Sequence[int] = (-1,)) -> Callable[..., Any]:
    r"""Posterior of the NNGP, the NTK ensemble at infinite time, and the NTK-GP.

    * `'nngp'`: the exact posterior of an infinitely wide Bayesian network,
      mean `K_{*d} K^{-1} y`, covariance `K_{**} - K_{*d} K^{-1} K_{d*}` with `K` the NNGP;
    * `'ntk'`: the distribution of an infinite ensemble of infinitely wide networks
      trained by gradient flow to `t = ∞`: mean `Θ_{*d} Θ^{-1} y`, covariance
      `K_{**} + Θ_{*d} Θ^{-1} K_{dd} Θ^{-1} Θ_{d*} - (Θ_{*d} Θ^{-1} K_{d*} + transpose)`;
    * `'ntkgp'`: the GP posterior with the NTK as prior covariance ("Bayesian Deep
      Ensembles via the Neural Tangent Kernel", He et al. 2020, arXiv:2007.05864).

    `K + diag_reg·…·I` is Cholesky-factorized once per kernel on first use; a
    kernel that is not positive definite raises (pass `diag_reg > 0`).

    Args:
        k_train_train: train-train kernels: a record with `nngp` and/or `ntk`
            fields (`torchntk.Kernel`, or the named tuple of `kernel_fn(..., get=...)`),
            or a tensor used for every `get`. `'ntk'` with covariances needs both.
        y_train, diag_reg, diag_reg_absolute_scale, trace_axes: as in `gradient_descent_mse`.

    Returns:
        `predict_fn(get=None, k_test_train=None, k_test_test=None)`. `get` is
        `'nngp'`, `'ntk'`, `'ntkgp'` or a tuple of them (`None`: `('nngp', 'ntk')`).
        `k_test_train=None` predicts the training set (`N(y_train, 0)`); with
        `k_test_test` (the NNGP on the test set; the NTK for `'ntkgp'`) each
        prediction is a `Gaussian(mean, covariance)`, else the mean. A string
        `get` gives one prediction, a tuple a named tuple `Gaussians` of them.

    Shape:
        mean: `(M, *O)`; covariance: `(M, M)` for `trace_axes=(-1,)`, in general
        the kernel's zipped layout.
    """
    name = 'gp_inference'
    first = _first_field(k_train_train, 'k_train_train', name)
    y_train = _checked_targets(y_train, first, name)
    axes = _OutputAxes(y_train.shape, trace_axes, name)
    _check_number(diag_reg, 'diag_reg', name)
    _check_flag(diag_reg_absolute_scale, 'diag_reg_absolute_scale', name)
    factors: dict[str, _Cholesky] = {}

    def train_kernel(field: str) -> torch.Tensor:
        kernel = _checked_kernel(_field(k_train_train, field, 'k_train_train', name),
                                 f'k_train_train.{field}', name)
        axes.check_kernel(kernel, f'k_train_train.{field}', axes.kept_shape, axes.kept_shape)
        return kernel

    def solve(field: str, rhs: torch.Tensor) -> torch.Tensor:
        if field not in factors:
            matrix = _train_matrix(train_kernel(field), f'k_train_train.{field}', name)
            factors[field] = _Cholesky(_regularized(matrix, diag_reg, diag_reg_absolute_scale),
                                       name, f'k_train_train.{field}')
        return factors[field].solve(rhs)

    def predict_fn(get: str | Sequence[str] | None = None, k_test_train: Any = None,
                   k_test_test: Any = None) -> Any:
        names, single = _canonical_get(get, ('nngp', 'ntk', 'ntkgp'), name)
        y_matrix = axes.to_matrix(y_train)
        out = {}
        for g in names:
            field = 'ntk' if g == 'ntkgp' else g
            k_dd = train_kernel(field)
            if k_test_train is None:
                out[g] = (y_train.clone() if k_test_test is None
                          else Gaussian(y_train.clone(), torch.zeros_like(k_dd)))
                continue
            k_td = _field(k_test_train, field, 'k_test_train', name)
            k_td = _test_train_kernel(k_td, k_dd, axes, name, f'k_test_train.{field}')
            test_kept = tuple(k_td.shape[::2])
            k_td = _matrix(k_td)
            mean = axes.from_matrix(k_td @ solve(field, y_matrix), test_kept)
            if k_test_test is None:
                out[g] = mean
                continue
            prior = 'ntk' if g == 'ntkgp' else 'nngp'
            k_tt = _field(k_test_test, prior, 'k_test_test', name)
            k_tt = _checked_kernel(k_tt, f'k_test_test.{prior}', name)
            axes.check_kernel(k_tt, f'k_test_test.{prior}', test_kept, test_kept)
            k_tt = _matrix(k_tt)
            if g == 'ntk':
                nngp_dd = _matrix(train_kernel('nngp'))
                nngp_td = _field(k_test_train, 'nngp', 'k_test_train', name)
                nngp_td = _matrix(_test_train_kernel(nngp_td, k_dd, axes, name,
                                                     'k_test_train.nngp'))
                weights = solve('ntk', k_td.T)            # Θ⁻¹ Θ_d*
                cross = nngp_td @ weights                 # K_*d Θ⁻¹ Θ_d*
                covariance = k_tt + weights.T @ nngp_dd @ weights - cross - cross.T
            else:
                covariance = k_tt - k_td @ solve(field, k_td.T)
            out[g] = Gaussian(mean, _unmatrix(_symmetric(covariance), test_kept))
        return _selection(out, single)

    return predict_fn


def gradient_descent_mse_ensemble(kernel_fn: Callable[..., Any], x_train: torch.Tensor,
                                  y_train: torch.Tensor, learning_rate: float = 1.,
                                  diag_reg: float = 0., diag_reg_absolute_scale: bool = False,
                                  trace_axes: Sequence[int] = (-1,),
                                  **kernel_fn_kwargs: Any) -> Callable[..., Any]:
    r"""Mean and covariance of an infinite ensemble of infinitely wide networks trained on the MSE.

    Marginalizing over the initialization `f_0 ~ N(0, K)` (`K` the NNGP), the
    outputs at time `t` of gradient flow with kernel `Θ` are Gaussian:

    .. math::
        μ_*(t) = Θ_{*d} Θ^{-1} (I - e^{-ηΘt/n})\, y

    * `'ntk'`: training of all layers, covariance
      `K_{**} + A_t^T K_{dd} A_t - (K_{*d} A_t + transpose)` with
      `A_t = Θ^{-1}(I - e^{-ηΘt/n}) Θ_{d*}`;
    * `'nngp'`: `Θ = K` (training of the readout layer only, or the Bayesian
      posterior at `t = ∞`), covariance `K_{**} - K_{*d} K^{-1}(I - e^{-2ηKt/n}) K_{d*}`.

    On the training set (`x_test=None`) the covariances are
    `e^{-ηΘt/n} K e^{-ηΘt/n}` (`'ntk'`) and `K e^{-2ηKt/n}` (`'nngp'`). At
    `t=None` this is `gp_inference`. Kernels, eigendecompositions and Cholesky
    factors of the training set are computed on first use and cached.

    Args:
        kernel_fn: `kernel_fn(x1, x2, get=('nngp', 'ntk'), **kernel_fn_kwargs)`
            returning a record with the requested fields, e.g. `model.kernel_fn`.
        x_train, y_train: training inputs and targets.
        learning_rate, diag_reg, diag_reg_absolute_scale, trace_axes: as in
            `gradient_descent_mse`.
        **kernel_fn_kwargs: passed to every call of `kernel_fn`.

    Returns:
        `predict_fn(t=None, x_test=None, get=None, compute_cov=False)`:
        `get` is `'nngp'`, `'ntk'` or a tuple (`None`: both); `x_test=None`
        predicts the training set. Returns means, or `Gaussian(mean, covariance)`
        with `compute_cov`; one for a string `get`, a named tuple `Gaussians` for a tuple.

    Shape:
        mean: `(*t.shape, M, *O)`; covariance: `(*t.shape, M, M)` for
        `trace_axes=(-1,)`, in general the kernel's zipped layout.
    """
    name = 'gradient_descent_mse_ensemble'
    if not callable(kernel_fn):
        raise TypeError(f"{name}: kernel_fn must be callable, got {type(kernel_fn).__name__}")
    _checked_targets(y_train, None, name)
    axes = _OutputAxes(y_train.shape, trace_axes, name)
    _check_number(learning_rate, 'learning_rate', name, positive=True)
    _check_number(diag_reg, 'diag_reg', name)
    _check_flag(diag_reg_absolute_scale, 'diag_reg_absolute_scale', name)
    train_kernels: dict[str, torch.Tensor] = {}
    spectra: dict[str, _Spectrum] = {}
    posteriors: dict[tuple[str, ...], Callable] = {}

    def train_kernel(fields: tuple[str, ...]) -> dict[str, torch.Tensor]:
        missing = tuple(f for f in fields if f not in train_kernels)
        if missing:
            computed = kernel_fn(x_train, None, get=missing, **kernel_fn_kwargs)
            for field in missing:
                kernel = _checked_kernel(_field(computed, field, 'kernel_fn(x_train)', name),
                                         f'kernel_fn(x_train).{field}', name)
                axes.check_kernel(kernel, f'kernel_fn(x_train).{field}', axes.kept_shape,
                                  axes.kept_shape)
                train_kernels[field] = kernel
        return {f: train_kernels[f] for f in fields}

    def spectrum(field: str) -> _Spectrum:
        if field not in spectra:
            arg = f'kernel_fn(x_train).{field}'
            matrix = _train_matrix(train_kernel((field,))[field], arg, name)
            spectra[field] = _Spectrum(_regularized(matrix, diag_reg, diag_reg_absolute_scale),
                                       y_train.numel(), name, arg)
        return spectra[field]

    def predict_fn(t: Times = None, x_test: torch.Tensor | None = None,
                   get: str | Sequence[str] | None = None, compute_cov: bool = False) -> Any:
        names, single = _canonical_get(get, ('nngp', 'ntk'), name)
        _check_flag(compute_cov, 'compute_cov', name)
        fields = tuple(f for f in ('nngp', 'ntk')
                       if f in names or (f == 'nngp' and compute_cov))
        k_dd = train_kernel(fields)
        target = _checked_targets(y_train, k_dd[fields[0]], name)
        k_td = nngp_tt = None
        if x_test is not None:
            computed = kernel_fn(x_test, x_train, get=fields, **kernel_fn_kwargs)
            k_td = {f: _test_train_kernel(_field(computed, f, 'kernel_fn(x_test, x_train)', name),
                                          k_dd[f], axes, name, f'kernel_fn(x_test, x_train).{f}')
                    for f in fields}
            if compute_cov:
                nngp_tt = _field(kernel_fn(x_test, None, get=('nngp',), **kernel_fn_kwargs),
                                 'nngp', 'kernel_fn(x_test)', name)
                nngp_tt = _checked_kernel(nngp_tt, 'kernel_fn(x_test).nngp', name)

        if t is None:
            if fields not in posteriors:
                record = collections.namedtuple('TrainKernels', fields)(**k_dd)
                posteriors[fields] = gp_inference(record, target, diag_reg,
                                                  diag_reg_absolute_scale, trace_axes)
            test_test = (True if x_test is None else nngp_tt) if compute_cov else None
            test_train = None if k_td is None else collections.namedtuple(
                'TestTrainKernels', fields)(**k_td)
            return posteriors[fields](tuple(names) if not single else names[0],
                                      test_train, test_test)

        times, t_shape = _times(t, learning_rate, k_dd[fields[0]], name)
        y_matrix = axes.to_matrix(target)
        kept = axes.kept_shape if k_td is None else tuple(k_td[fields[0]].shape[::2])
        out = {}
        for g in names:
            spec = spectrum(g)
            if k_td is None:
                mean = spec.apply(spec.one_minus_decay(times), y_matrix)
            else:
                mean = _matrix(k_td[g]) @ spec.apply(spec.integral(times), y_matrix)
            mean = axes.from_matrix(mean, kept, t_shape)
            if not compute_cov:
                out[g] = mean
                continue
            nngp_dd = _matrix(k_dd['nngp'])
            if k_td is None and g == 'nngp':
                covariance = spec.apply(spec.evals * spec.decay(2 * times))
            elif k_td is None:
                decay = spec.apply(spec.decay(times))                 # e^{-ηΘt/n}
                covariance = decay @ nngp_dd @ decay
            elif g == 'nngp':
                k_dt = _matrix(k_td['nngp']).T
                covariance = _matrix(nngp_tt) - k_dt.T @ spec.apply(spec.integral(2 * times), k_dt)
            else:
                weights = spec.apply(spec.integral(times), _matrix(k_td['ntk']).T)   # A_t
                cross = _matrix(k_td['nngp']) @ weights
                covariance = (_matrix(nngp_tt) + weights.mT @ nngp_dd @ weights
                              - cross - cross.mT)
            covariance = _symmetric(covariance).reshape(*t_shape, *covariance.shape[-2:])
            out[g] = Gaussian(mean, _unmatrix(covariance, kept))
        return _selection(out, single)

    return predict_fn


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
    name = 'max_learning_rate'
    kernel = _checked_kernel(ntk_train_train, 'ntk_train_train', name)
    matrix = _train_matrix(kernel, 'ntk_train_train', name)
    _check_momentum(momentum, name)
    _check_number(eps, 'eps', name)
    if y_train_size is None:
        y_train_size = matrix.shape[0]
    elif isinstance(y_train_size, bool) or not isinstance(y_train_size, int):
        raise TypeError(f"{name}: y_train_size must be an int, got {type(y_train_size).__name__}")
    elif y_train_size < 1:
        raise ValueError(f"{name}: y_train_size must be >= 1, got {y_train_size}")
    evals = torch.linalg.eigvalsh(matrix.detach())
    _check_psd(evals, 'ntk_train_train', name)
    return 2. * (1. + momentum) * y_train_size / (float(evals[-1]) + eps)


# ---------------------------------------------------------------------------
# Linear algebra shared by the predictors


class _Spectrum:
    """Eigendecomposition `V diag(λ) Vᵀ` of a train-train kernel matrix, and its time functions.

    Negative eigenvalues (round-off of a PSD kernel) count as zero; a kernel that
    is not positive semi-definite beyond round-off is refused. At `t = ∞`,
    eigenvalues up to `λ_max · D · eps` also count as zero, as in a pseudo-inverse:
    gradient flow never moves along the kernel's null space, and `1/λ` of a
    round-off eigenvalue is noise.
    """

    def __init__(self, matrix: torch.Tensor, n: int, fn: str, arg: str):
        evals, self.evecs = torch.linalg.eigh(matrix)
        _check_psd(evals, arg, fn)
        self.evals = evals.clamp(min=0)
        self.cutoff = evals.abs().max() * len(evals) * torch.finfo(evals.dtype).eps
        self.n = n

    def _active(self, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which eigenvalues are nonzero at each time `(T, 1)`, and `λ` with 1 in place of zeros."""
        active = torch.where(torch.isinf(times), self.evals > self.cutoff, self.evals > 0)
        return active, torch.where(active, self.evals, 1.)

    def decay(self, times: torch.Tensor) -> torch.Tensor:
        """`e^{-λt/n}`, `(T, D)`."""
        active, evals = self._active(times)
        return torch.where(active, torch.exp(-evals * times / self.n), 1.)

    def one_minus_decay(self, times: torch.Tensor) -> torch.Tensor:
        """`1 - e^{-λt/n}`, `(T, D)`, through `expm1` for accuracy at small `λt`."""
        active, evals = self._active(times)
        return torch.where(active, -torch.expm1(-evals * times / self.n), 0.)

    def integral(self, times: torch.Tensor) -> torch.Tensor:
        """`(1 - e^{-λt/n}) / λ` (`→ t/n` at `λ = 0`, and `0` at `t = ∞`), `(T, D)`."""
        active, evals = self._active(times)
        null = torch.where(torch.isinf(times), 0., times) / self.n
        return torch.where(active, -torch.expm1(-evals * times / self.n) / evals, null)

    def apply(self, diagonal: torch.Tensor, rhs: torch.Tensor | None = None) -> torch.Tensor:
        """`V diag(d_t) Vᵀ rhs` for each row `d_t` of `diagonal`: `(T, D, M)` (`rhs=None`: `I`)."""
        # Batched products, never a (T, D, D) intermediate unless the result is one.
        if rhs is None:
            return (self.evecs * diagonal[:, None, :]) @ self.evecs.T
        return self.evecs @ (diagonal[:, :, None] * (self.evecs.T @ rhs))


class _Cholesky:
    """Cholesky factor of a train-train kernel matrix; raises if it is not positive definite."""

    def __init__(self, matrix: torch.Tensor, fn: str, arg: str):
        self.factor, info = torch.linalg.cholesky_ex(matrix)
        if int(info) > 0:
            _check_psd(torch.linalg.eigvalsh(matrix), arg, fn)
            raise ValueError(
                f"{fn}: {arg} (+ diag_reg · I) is not positive definite (the Cholesky "
                f"factorization fails at row {int(info)}), so infinite-time predictions (t=None) "
                "are undefined; pass diag_reg > 0 (e.g. 1e-6, relative to mean(diag K)) or, "
                "where available, t=float('inf') for the limit of gradient flow")

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(rhs, self.factor)


class _MseFlow:
    """Gradient flow `df/dt = -Θ (f - y)/n` on a train-train kernel matrix, in closed form."""

    def __init__(self, matrix: torch.Tensor, n: int, diag_reg: float, absolute: bool,
                 fn: str, arg: str):
        self.matrix = _regularized(matrix, diag_reg, absolute)
        self.n, self.fn, self.arg = n, fn, arg
        self._spectrum: _Spectrum | None = None
        self._cholesky: _Cholesky | None = None

    @property
    def spectrum(self) -> _Spectrum:
        if self._spectrum is None:
            self._spectrum = _Spectrum(self.matrix, self.n, self.fn, self.arg)
        return self._spectrum

    def train_change(self, times: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`f_train(t) - f_train(0) = -(I - e^{-Θt/n}) (f_0 - y)`, `(T, D, M)`."""
        return -self.spectrum.apply(self.spectrum.one_minus_decay(times), residual)

    def coefficients(self, times: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
        """`Θ⁻¹ (I - e^{-Θt/n}) (f_0 - y)`: `(T, D, M)`, or `(D, M)` for `times=None` (t = ∞)."""
        if times is not None:
            return self.spectrum.apply(self.spectrum.integral(times), residual)
        if self._cholesky is None:
            self._cholesky = _Cholesky(self.matrix, self.fn, self.arg)
        return self._cholesky.solve(residual)


def _regularized(matrix: torch.Tensor, diag_reg: float, absolute: bool) -> torch.Tensor:
    """`K + diag_reg · s · I`, `s = 1` if `absolute` else `mean(diag K)`."""
    if diag_reg == 0:
        return matrix
    scale = diag_reg if absolute else diag_reg * matrix.diagonal().mean()
    return matrix + scale * torch.eye(len(matrix), dtype=matrix.dtype, device=matrix.device)


def _matrix(kernel: torch.Tensor) -> torch.Tensor:
    """Zipped `(A1, A1', B1, B1', …)` -> matrix `(A1·B1·…, A1'·B1'·…)`."""
    rows, cols = kernel.shape[::2], kernel.shape[1::2]
    order = list(range(0, kernel.ndim, 2)) + list(range(1, kernel.ndim, 2))
    return kernel.permute(order).reshape(math.prod(rows), math.prod(cols))


def _unmatrix(matrix: torch.Tensor, kept: tuple[int, ...]) -> torch.Tensor:
    """Covariance `(*lead, D, D)` -> zipped `(*lead, A, A', B, B', …)` with `kept = (A, B, …)`."""
    lead = matrix.shape[:-2]
    split = matrix.reshape(*lead, *kept, *kept)
    order = list(range(len(lead)))
    for axis in range(len(kept)):
        order += [len(lead) + axis, len(lead) + len(kept) + axis]
    return split.permute(order)


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """Remove the round-off asymmetry of a covariance."""
    return 0.5 * (matrix + matrix.mT)


class _OutputAxes:
    """Where the output axes of `y (N, *O)` go: kept axes index kernel rows, traced ones columns."""

    def __init__(self, y_shape: Sequence[int], trace_axes: Sequence[int], fn: str):
        self.ndim, self.fn, self.y_shape = len(y_shape), fn, tuple(y_shape)
        if isinstance(trace_axes, int) and not isinstance(trace_axes, bool):
            trace_axes = (trace_axes,)
        if not isinstance(trace_axes, Sequence) or isinstance(trace_axes, str) or any(
                isinstance(a, bool) or not isinstance(a, int) for a in trace_axes):
            raise TypeError(f"{fn}: trace_axes must be an int or a sequence of ints, got "
                            f"{trace_axes!r}")
        trace = set()
        for axis in trace_axes:
            if not -self.ndim <= axis < self.ndim:
                raise ValueError(f"{fn}: trace_axes must be axes of y_train (ndim {self.ndim}), "
                                 f"got {tuple(trace_axes)}")
            trace.add(axis % self.ndim)
        self.trace = tuple(sorted(trace))
        self.kept = tuple(a for a in range(self.ndim) if a not in trace)
        self.trace_shape = tuple(y_shape[a] for a in self.trace)
        self.kept_shape = tuple(y_shape[a] for a in self.kept)

    def outputs_shape(self, kept_shape: Sequence[int]) -> tuple[int, ...]:
        shape = dict(zip(self.kept, kept_shape)) | dict(zip(self.trace, self.trace_shape))
        return tuple(shape[a] for a in range(self.ndim))

    def to_matrix(self, f: torch.Tensor) -> torch.Tensor:
        """`(N, *O)` -> `(kept size, traced size)`."""
        return f.permute(self.kept + self.trace).reshape(-1, math.prod(self.trace_shape))

    def from_matrix(self, matrix: torch.Tensor, kept_shape: Sequence[int],
                    lead: Sequence[int] = ()) -> torch.Tensor:
        """`(*lead, kept size, traced size)` -> `(*lead, N, *O)`."""
        split = matrix.reshape(*lead, *kept_shape, *self.trace_shape)
        n_lead = split.ndim - self.ndim
        inverse = [0] * self.ndim
        for position, axis in enumerate(self.kept + self.trace):
            inverse[axis] = position
        return split.permute(*range(n_lead), *(n_lead + p for p in inverse))

    def check_kernel(self, kernel: torch.Tensor, arg: str, rows: Sequence[int],
                     cols: Sequence[int]) -> None:
        expected = tuple(size for pair in zip(rows, cols) for size in pair)
        if tuple(kernel.shape) != expected:
            raise ValueError(
                f"{self.fn}: {arg} must have shape {expected} (the axes of y_train, of shape "
                f"{self.y_shape}, not in trace_axes={self.trace}, each twice, zipped), got "
                f"{tuple(kernel.shape)}")


# ---------------------------------------------------------------------------
# Validation at the public boundary


def _check_values(x: torch.Tensor, arg: str, fn: str) -> None:
    """A real tensor with values: not complex, not bool, not on the meta device."""
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{fn}: {arg} must be a real tensor, got {x.dtype}")
    if x.is_meta:
        raise ValueError(f"{fn}: {arg} is on the meta device, which holds no values")


def _checked_kernel(kernel: Any, arg: str, fn: str) -> torch.Tensor:
    if not isinstance(kernel, torch.Tensor):
        hint = (" (a kernel record: pass its .ntk or .nngp field)"
                if hasattr(kernel, 'ntk') or hasattr(kernel, 'nngp') else "")
        raise TypeError(f"{fn}: {arg} must be a tensor, got {type(kernel).__name__}{hint}")
    _check_values(kernel, arg, fn)
    if not kernel.is_floating_point():
        raise TypeError(f"{fn}: {arg} must be a floating-point tensor, got {kernel.dtype}")
    if kernel.ndim < 2 or kernel.ndim % 2:
        raise ValueError(f"{fn}: {arg} must have pairs of zipped axes, (N1, N2, …), got shape "
                         f"{tuple(kernel.shape)}")
    if not bool(torch.isfinite(kernel).all()):
        raise ValueError(f"{fn}: {arg} contains non-finite values (NaN or inf)")
    return kernel


def _train_matrix(kernel: torch.Tensor, arg: str, fn: str) -> torch.Tensor:
    """The matrix of a train-train kernel, which must be square and symmetric (to rounding)."""
    matrix = _matrix(kernel)
    if matrix.shape[0] != matrix.shape[1] or matrix.numel() == 0:
        raise ValueError(f"{fn}: {arg} must be a square train-train kernel of at least one "
                         f"example, got shape {tuple(kernel.shape)}")
    asymmetry, scale = (matrix - matrix.mT).abs().max(), matrix.abs().max()
    if asymmetry > math.sqrt(torch.finfo(matrix.dtype).eps) * scale:
        raise ValueError(f"{fn}: {arg} must be symmetric (a train-train kernel), but max "
                         f"|K - Kᵀ| = {float(asymmetry):.3g} against max |K| = {float(scale):.3g}")
    return matrix


def _check_psd(evals: torch.Tensor, arg: str, fn: str) -> None:
    """Refuse a kernel matrix (ascending eigenvalues `evals`) with `λ_min < -√eps · max |λ|`:
    not positive semi-definite beyond rounding."""
    largest = evals.abs().max()
    if evals[0] < -math.sqrt(torch.finfo(evals.dtype).eps) * largest:
        raise ValueError(f"{fn}: {arg} must be positive semi-definite (a kernel), but its "
                         f"smallest eigenvalue is {float(evals[0]):.3g} against a largest |λ| "
                         f"of {float(largest):.3g}")


def _checked_targets(y: Any, kernel: torch.Tensor | None, fn: str) -> torch.Tensor:
    """`y` as a tensor of the kernel's dtype (so float32 targets suit float64 kernels)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{fn}: y_train must be a tensor, got {type(y).__name__}")
    _check_values(y, 'y_train', fn)
    if y.ndim < 1 or y.numel() == 0:
        raise ValueError(f"{fn}: y_train must have a batch axis and at least one training "
                         f"example and output, got shape {tuple(y.shape)}")
    if kernel is None:
        return y
    if y.device != kernel.device:
        raise ValueError(f"{fn}: y_train is on {y.device} but the kernel on {kernel.device}")
    y = y.to(kernel.dtype)
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{fn}: y_train contains non-finite values (NaN or inf)")
    return y


def _test_train_kernel(k_test_train: Any, k_train_train: torch.Tensor, axes: _OutputAxes, fn: str,
                       arg: str = 'k_test_train') -> torch.Tensor:
    if k_test_train is None:
        raise ValueError(f"{fn}: test predictions need {arg}")
    k_test_train = _checked_kernel(k_test_train, arg, fn)
    if k_test_train.dtype != k_train_train.dtype or k_test_train.device != k_train_train.device:
        raise ValueError(f"{fn}: {arg} is {k_test_train.dtype} on {k_test_train.device} but the "
                         f"train-train kernel {k_train_train.dtype} on {k_train_train.device}")
    axes.check_kernel(k_test_train, arg, k_test_train.shape[::2], k_train_train.shape[1::2])
    return k_test_train


def _broadcast(value: Any, like: torch.Tensor, shape: Sequence[int], arg: str,
               fn: str) -> torch.Tensor:
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{fn}: {arg} must be a tensor or a number, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        _check_values(value, arg, fn)
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    try:
        value = torch.broadcast_to(value, tuple(shape))
    except RuntimeError:
        raise ValueError(f"{fn}: {arg} must broadcast to {tuple(shape)}, got shape "
                         f"{tuple(value.shape)}") from None
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{fn}: {arg} contains non-finite values (NaN or inf)")
    return value


def _times(t: Times, scale: float, like: torch.Tensor, fn: str,
           no_limit: str | None = None) -> tuple[torch.Tensor, tuple]:
    """`t · scale` as a column `(T, 1)` in `like`'s dtype and device, and `t`'s shape.

    `no_limit`: why `t = inf` is refused (`None`: it is allowed).
    """
    if isinstance(t, bool) or not isinstance(t, (int, float, torch.Tensor)):
        raise TypeError(f"{fn}: t must be None, a number or a tensor, got {type(t).__name__}")
    if isinstance(t, torch.Tensor):
        _check_values(t, 't', fn)
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    expected = "times t must be >= 0" + (" (inf allowed)" if no_limit is None else " and finite")
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{fn}: {expected}, got NaN")
    if bool((t < 0).any()):
        raise ValueError(f"{fn}: {expected}, got min(t) = {float(t.min())}")
    if no_limit is not None and bool(torch.isinf(t).any()):
        raise ValueError(f"{fn}: {expected}, got inf: {no_limit}")
    return (t * scale).reshape(-1, 1), tuple(t.shape)


def _check_number(value: Any, arg: str, fn: str, positive: bool = False) -> None:
    """A finite number `>= 0` (`> 0` if `positive`)."""
    check_nonnegative(value, arg, fn)
    if positive and float(value) == 0:
        raise ValueError(f"{fn}: {arg} must be > 0, got {value}")


def _check_momentum(momentum: Any, fn: str) -> None:
    _check_number(momentum, 'momentum', fn)
    if float(momentum) > 1:
        raise ValueError(f"{fn}: momentum must be in [0, 1], got {momentum}")


def _check_flag(value: Any, arg: str, fn: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {arg} must be True or False, got {value!r}")


def _field(record: Any, field: str, arg: str, fn: str) -> torch.Tensor:
    """`record.field`, or `record` itself when it is a bare tensor."""
    if isinstance(record, torch.Tensor):
        return record
    value = getattr(record, field, None)
    if value is None:
        raise ValueError(f"{fn}: {arg} has no {field!r} kernel; compute it with "
                         f"get=('nngp', 'ntk') or pass a tensor")
    return value


def _first_field(record: Any, arg: str, fn: str) -> torch.Tensor:
    if isinstance(record, torch.Tensor):
        return record
    for field in ('nngp', 'ntk'):
        value = getattr(record, field, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"{fn}: {arg} must be a tensor or a record with nngp/ntk tensors, "
                    f"got {type(record).__name__}")


def _canonical_get(get: Any, allowed: tuple[str, ...], fn: str) -> tuple[tuple[str, ...], bool]:
    """The requested predictions and whether one (a string) was asked for."""
    if get is None:
        return ('nngp', 'ntk'), False
    single = isinstance(get, str)
    if not single and not isinstance(get, Sequence):
        raise TypeError(f"{fn}: get must be a string or a tuple of strings, got "
                        f"{type(get).__name__}")
    names = (get,) if single else tuple(get)
    if not names or any(not isinstance(g, str) or g.lower() not in allowed for g in names):
        raise ValueError(f"{fn}: get must be one of {allowed} or a tuple of them, got {get!r}")
    names = tuple(g.lower() for g in names)
    if len(set(names)) != len(names):
        raise ValueError(f"{fn}: get has duplicates: {get!r}")
    return names, single


def _selection(out: dict[str, Any], single: bool) -> Any:
    if single:
        return next(iter(out.values()))
    return collections.namedtuple('Gaussians', tuple(out))(**out)


def _shape_or_type(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
