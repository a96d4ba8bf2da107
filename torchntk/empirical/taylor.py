"""Linearization and Taylor expansions of a model in its parameters."""

from __future__ import annotations

import math
from typing import Callable

from torch import nn
from torch.func import jvp
from torch.utils import _pytree as pytree  # torch.func's own pytrees

from ..checks import check_int
from .inputs import check_inputs, check_model, checked_params
from .model import Params, PyTree, apply_model


def linearize(model: nn.Module, params0: Params) -> Callable[..., PyTree]:
    r"""`f_lin(x, params=None, **kwargs)`: the first-order Taylor expansion of `model` around `params0`.

    .. math:: f_{lin}(x, θ) = f(θ_0, x) + J(θ_0, x)\,(θ - θ_0),\quad J = ∂f/∂θ

    computed by one Jacobian-vector product (`torch.func.jvp`), never a Jacobian.
    Note the argument order: `f_lin(x, params)`, input first as in `model(x)`
    (neural-tangents' is `f_lin(params, x)`).

    Args:
        model: any `nn.Module`, called as `model(x, **kwargs)`.
        params0: parameter name -> tensor, the expansion point, e.g.
            `{k: v.detach().clone() for k, v in model.named_parameters()}`.
            Parameters of `model` not named here stay fixed at their current values;
            a name that is not a parameter of `model` raises a `ValueError`.
            The tensors are used as given (clone them if the model trains in place).

    `params` in `f_lin(x, params)` maps the same names to tensors (may be
    `nn.Parameter`s with gradients; `f_lin` is differentiable in them); `None`
    means `params0`, where `f_lin(x) = model(x)` with `params0`.

    Shape:
        `f_lin(x, params)`: the shape (pytree) of `model(x)`.
    """
    return _taylor_expansion(model, params0, 1, 'linearize')


def taylor_expand(model: nn.Module, params0: Params, degree: int) -> Callable[..., PyTree]:
    r"""`f_taylor(x, params=None, **kwargs)`: the Taylor expansion of `model` in its parameters.

    .. math:: f_{taylor}(x, θ) = \sum_{k=0}^{degree} \frac{1}{k!}\, D^k_θ f(θ_0, x)[Δθ, …, Δθ],
              \quad Δθ = θ - θ_0

    The directional derivatives come from `degree` nested `torch.func.jvp`s
    (cost ∝ 2^degree forward passes). `degree=1` is `linearize`. Arguments and
    call signature as in `linearize`.
    """
    check_int(degree, 'degree', 'taylor_expand', minimum=0)
    return _taylor_expansion(model, params0, degree, 'taylor_expand')


def _taylor_expansion(model: nn.Module, params0: Params, degree: int,
                      caller: str) -> Callable[..., PyTree]:
    check_model(model, caller)
    params0 = checked_params(model, params0, caller, 'params0')

    def f_taylor(x: PyTree, params: Params | None = None, **kwargs) -> PyTree:
        check_inputs(x, None, caller, 'x')
        if params is None:
            return apply_model(model, params0, x, kwargs)
        params = checked_params(model, params, caller)
        if set(params) != set(params0):
            raise ValueError(f"{caller}: params must have the keys of params0; missing "
                             f"{sorted(set(params0) - set(params))}, unexpected "
                             f"{sorted(set(params) - set(params0))}")
        delta = {name: params[name] - params0[name] for name in params0}
        terms = _directional_derivatives(lambda p: apply_model(model, p, x, kwargs), params0, delta,
                                         degree)
        return pytree.tree_map(lambda *orders: sum(term / math.factorial(k)
                                                   for k, term in enumerate(orders)), *terms)

    return f_taylor


def _directional_derivatives(f: Callable, primal: Params, tangent: Params,
                             degree: int) -> tuple[PyTree, ...]:
    """`(f(p), Df(p)[t], D²f(p)[t, t], …)` up to `degree`, by nested `jvp`.

    The derivative of order `k - 1` is a function of `p`; its `jvp` along `t` is order `k`.
    """
    if degree == 0:
        return (f(primal),)
    lower = lambda p: _directional_derivatives(f, p, tangent, degree - 1)
    values, derivatives = jvp(lower, (primal,), (tangent,))
    return (*values, derivatives[-1])
