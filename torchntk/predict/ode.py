"""Gradient descent on any loss, by integrating the function-space ODE of the kernel."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..checks import check_callable, check_flag, check_positive
from .arguments import (Targets, Times, broadcast_outputs, check_momentum, check_psd,
                        checked_kernel, checked_targets, checked_test_train_kernel, checked_times,
                        checked_train_matrix, shape_or_type)
from .layout import OutputAxes, kernel_matrix


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
    caller = 'gradient_descent'
    check_callable(loss, 'loss', caller)
    k_train_train = checked_kernel(k_train_train, 'k_train_train', caller)
    y_train = checked_targets(y_train, k_train_train, caller)
    axes = OutputAxes(y_train.shape, trace_axes, caller)
    axes.check_kernel(k_train_train, 'k_train_train', axes.kept_shape, axes.kept_shape)
    check_positive(learning_rate, 'learning_rate', caller)
    if momentum is not None:
        check_momentum(momentum, caller)
    if not isinstance(method, str):
        raise TypeError(f"{caller}: method must be a torchdiffeq method name, got "
                        f"{type(method).__name__}")
    try:  # torchdiffeq lists its solvers in a private module; without it, torchdiffeq says
        from torchdiffeq._impl.odeint import SOLVERS
    except ImportError:
        SOLVERS = None
    if SOLVERS is not None and method not in SOLVERS:
        raise ValueError(f"{caller}: method must be one of {tuple(SOLVERS)}, got {method!r}")
    check_positive(rtol, 'rtol', caller, allow_none=True)
    check_positive(atol, 'atol', caller, allow_none=True)
    check_flag(progress, 'progress', caller)
    float64 = k_train_train.dtype == torch.float64
    rtol = (1e-8 if float64 else 1e-5) if rtol is None else rtol
    atol = (1e-10 if float64 else 1e-7) if atol is None else atol
    time_scale = learning_rate if momentum is None else math.sqrt(learning_rate)
    damping = None if momentum is None else (momentum - 1.) / math.sqrt(learning_rate)
    k_train = checked_train_matrix(k_train_train, 'k_train_train', caller)
    check_psd(torch.linalg.eigvalsh(k_train.detach()), 'k_train_train', caller)
    # Why there is no t = ∞ here: the flow of a general loss need not settle.
    no_limit = ("the flow of a general loss need not reach a limit (on separable data "
                "cross-entropy's outputs grow without bound); pass finite times, or for the "
                "MSE use gradient_descent_mse, whose t=None and t=float('inf') are its limit")

    def grad_loss(fx: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            fx = fx.detach().requires_grad_(True)
            value = loss(fx, y_train)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise ValueError(f"{caller}: loss(fx, y) must return a scalar tensor, got "
                                 f"{shape_or_type(value)}")
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
            raise ValueError(f"{caller}: t=None (infinite time) cannot be integrated: {no_limit}")
        as_state = isinstance(fx_train_or_state_0, ODEState)
        if as_state:
            if fx_test_0 is not None:
                raise ValueError(f"{caller}: with an ODEState, pass fx_test_0 in the state and "
                                 "leave the fx_test_0 argument None")
            state_0 = fx_train_or_state_0
        else:
            state_0 = ODEState(fx_train_or_state_0, fx_test_0)
        if momentum is None and (state_0.qx_train is not None or state_0.qx_test is not None):
            raise ValueError(f"{caller}: the state has momentum variables but momentum is None")
        if state_0.fx_train is None and state_0.fx_test is None:
            raise ValueError(f"{caller}: fx_train_0 and fx_test_0 are both None; nothing to "
                             "predict")
        with_test = state_0.fx_test is not None
        k_test, test_kept, test_shape = None, (), ()
        if with_test:
            k_test_train = checked_test_train_kernel(k_test_train, k_train_train, axes, caller)
            k_test, test_kept = kernel_matrix(k_test_train), tuple(k_test_train.shape[::2])
            test_shape = axes.outputs_shape(test_kept)
        fx = [broadcast_outputs(0. if state_0.fx_train is None else state_0.fx_train, y_train,
                                y_train.shape, 'fx_train_0', caller)]
        if with_test:
            fx.append(broadcast_outputs(state_0.fx_test, y_train, test_shape, 'fx_test_0', caller))
        qx = []
        if momentum is not None:
            qx.append(broadcast_outputs(0. if state_0.qx_train is None else state_0.qx_train,
                                        y_train, y_train.shape, 'qx_train', caller))
            if with_test:
                qx.append(broadcast_outputs(0. if state_0.qx_test is None else state_0.qx_test,
                                            y_train, test_shape, 'qx_test', caller))

        times, t_shape = checked_times(t, time_scale, k_train_train, caller, no_limit)
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
