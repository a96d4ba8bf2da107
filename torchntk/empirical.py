"""Empirical kernels of finite `nn.Module`s, through `torch.func`.

For a network `f(θ, x)`:

    empirical NNGP:  f(θ, x1) ⊗ f(θ, x2)
    empirical NTK:   Σ_p ∂f(θ, x1)/∂θ_p ⊗ ∂f(θ, x2)/∂θ_p

contracted over output axes as in neural-tangents ("Fast Finite Width Neural
Tangent Kernel", Novak, Sohl-Dickstein and Schoenholz, ICML 2022,
arXiv:2206.08720):

===============================  ===================================
output axes                      result axes
===============================  ===================================
in `trace_axes`                  summed and divided by their size
in `diagonal_axes`               appear once
all others                       appear twice, zipped: `(N1, N2, O, O')`
===============================  ===================================

For `f(x)` of shape `(N, O)`:

=======================================  ==================
arguments                                kernel shape
=======================================  ==================
`trace_axes=(-1,)` (default)             `(N1, N2)`
`trace_axes=()`                          `(N1, N2, O, O)`
`trace_axes=(), diagonal_axes=(-1,)`     `(N1, N2, O)`
`trace_axes=(-1,), diagonal_axes=(0,)`   `(N,)` (`x2=None`)
=======================================  ==================

and for `(N, C, H, W)` outputs with `trace_axes=(1,)`: `(N1, N2, H, H, W, W)`.
The batch axis is an output axis like the others: outputs `(O, N)` with
`trace_axes=()` give `(O, O, N1, N2)`.

Inputs and outputs may be pytrees (tuples, lists, dicts of tensors, as
`torch.func` understands them): the model is called as `model(x, **kwargs)`
with `x` one pytree, and the kernel of a pytree output is the same pytree of
kernels, one per output tensor (cross terms between different outputs are
not computed, as in neural-tangents). `trace_axes` and `diagonal_axes` apply
to every output tensor.

Besides the kernels, `linearize` and `taylor_expand` give the Taylor
expansions of a model in its parameters.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import difflib
import functools
import logging
import math
import string
from typing import Any, Callable, Collection, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap
from torch.utils import _pytree as pytree  # torch.func's own pytrees
from torch.utils.flop_counter import FlopCounterMode

from .ops.heap import reuse_heap
from .ops.products import einsum_pair
from .stax.conv import Conv as StaxConv
from .stax.finite_conv import pad_input
from .stax.dropout import Dropout as StaxDropout
from .stax.linear import Dense as StaxDense
from .stax.module import check_input_values
from .stax.normalization import LayerNorm as StaxLayerNorm

logger = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]
PyTree = Any
VmapAxes = Any  # None, an int, a pytree of ints matching the inputs, or (in_axes, out_axes, kwargs_axes)
IMPLEMENTATIONS = ('jacobian_contraction', 'ntk_vector_products', 'structured_derivatives')
#: Default bound on the bytes of the Jacobians held at once by 'jacobian_contraction'.
DEFAULT_CHUNK_BYTES = 2**30
EmpiricalKernel = collections.namedtuple('EmpiricalKernel', ('nngp', 'ntk'))


def empirical_nngp_fn(model: nn.Module, trace_axes: Sequence[int] = (-1,),
                      diagonal_axes: Sequence[int] = ()) -> Callable[..., PyTree]:
    """`nngp_fn(x1, x2=None, params=None, **kwargs)`: the outer product of the outputs, contracted.

    `params` maps names of the model's parameters to the tensors used in
    their place (default: none, the model's own; parameters not named keep
    their values); a name that is not a parameter raises a `ValueError`.
    `kwargs` go to `model(x, **kwargs)`, a pair `(value1, value2)` giving one
    value for `x1` and one for `x2` (neural-tangents' rule). Output shapes as
    in the module docstring; a pytree output gives the same pytree of kernels.
    """
    caller = 'empirical_nngp_fn'
    _check_model(model, caller)
    trace_axes, diagonal_axes = _checked_axes(trace_axes, diagonal_axes, caller)

    def nngp_fn(x1: PyTree, x2: PyTree | None = None, params: Params | None = None,
                **kwargs) -> PyTree:
        _check_inputs(x1, x2, caller)
        params = {} if params is None else _checked_params(model, params, caller)
        kwargs1, kwargs2 = _split_kwargs(kwargs)
        with _failures_explained(caller, 'x1', model, params, x1, kwargs1):
            out1 = _apply(model, params, x1, kwargs1)
        if x2 is None:
            out2 = out1
        else:
            with _failures_explained(caller, 'x2', model, params, x2, kwargs2):
                out2 = _apply(model, params, x2, kwargs2)
        leaves1, tree = _output_leaves(out1, 'empirical_nngp_fn')
        leaves2 = _output_leaves(out2, 'empirical_nngp_fn', tree)[0]
        specs = _output_contractions([o.shape for o in leaves1], [o.shape for o in leaves2],
                                     trace_axes, diagonal_axes, caller)
        return pytree.tree_unflatten([spec.normalized(spec.contract(f1, f2, n_param_dims=0),
                                                      f1.shape)
                                      for spec, f1, f2 in zip(specs, leaves1, leaves2)], tree)
    return nngp_fn


def empirical_ntk_fn(model: nn.Module, trace_axes: Sequence[int] = (-1,),
                     diagonal_axes: Sequence[int] = (), vmap_axes: VmapAxes = 0,
                     implementation: str = 'auto',
                     chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Callable[..., PyTree]:
    r"""`ntk_fn(x1, x2=None, params=None, **kwargs)`: the empirical NTK of `model`.

    .. math:: Θ(x_1, x_2) = \sum_p ∂f(θ, x_1)/∂θ_p ⊗ ∂f(θ, x_2)/∂θ_p

    contracted over output axes as in the module docstring (the table of
    shapes there). `params` maps names of the model's parameters to tensors,
    and those are the parameters differentiated (used in place of the
    model's; the others keep their values and are not differentiated); by
    default the model's parameters with `requires_grad=True` (frozen ones do
    not count). A name that is not a parameter of the model raises a
    `ValueError`. Inputs must be finite, real and hold values (not on the
    `meta` device). `kwargs` go to
    `model(x, **kwargs)`; a pair `(value1, value2)` gives one value for `x1`
    and one for `x2`, anything else is passed to both (neural-tangents' rule).

    The kernel is differentiable in the parameters, the inputs and stax
    hyperparameters that require gradients. Where no gradient is needed, call
    it under `torch.no_grad()`: no autograd graph is kept, and float32
    products on the CPU then run on oneDNN (`torchntk.ops.products`).

    Args:
        model: an `nn.Module` called as `model(x, **kwargs)`, `x` a tensor or
            a pytree of tensors, returning a tensor or a pytree of tensors.
        trace_axes: output axes summed (and divided by their size).
        diagonal_axes: output axes kept once (`x1[i]` paired with `x2[i]` only).
        vmap_axes: where the examples are, when they do not interact: then
            Jacobians are computed per example with `torch.func.vmap`, `N`
            times less work than differentiating the whole batch. As in
            neural-tangents, either

            * an int: the batch axis of every input and output tensor (`0`:
              PyTorch's batch-first layout);
            * a pytree of ints (or `None` for unbatched tensors) matching `x`,
              used for the inputs and the outputs alike;
            * a triple `(in_axes, out_axes, kwargs_axes)`: ints or pytrees
              for the inputs and the outputs, and a dict from keyword-argument
              names to their batch axes (keyword arguments not named there
              are passed whole to every example);
            * `None`: differentiate the whole batch.

            Models with modules that mix examples or draw random numbers
            (BatchNorm in training mode or without running statistics,
            dropout in training mode, a stax `LayerNorm` over axis 0) fall back
            to `vmap_axes=None` (logged at INFO level), which gives the exact
            kernel of the batched forward. Any other model is checked (on the
            first call with given shapes of the inputs and parameters): if its
            per-example outputs differ from the batched forward, a `ValueError`
            asks for `vmap_axes=None`. The kernel's shape does not depend on
            `vmap_axes`.
        implementation: from "Fast Finite Width NTK" (Novak et al. 2022):

            * `'jacobian_contraction'`: Jacobians by `jacrev`, contracted by
              `einsum`; parameters are taken in chunks whose Jacobians on
              `x1` and `x2` fit in `chunk_bytes` (one Jacobian-pass per chunk).
            * `'ntk_vector_products'`: `J1 (J2ᵀ v)` for every basis cotangent
              `v` of one `x2` example, by `vjp` then `jvp`; never a Jacobian.
            * `'structured_derivatives'`: a layer whose output is affine in
              its parameters, :math:`y[r, j] = s_W \sum_i W[j, i]\, a[r, i] + s_b b[j]`
              at rows `r` (positions of `nn.Linear`; image patches of
              `nn.Conv1d/2d/3d` with any padding, padding mode, stride,
              dilation and groups; stax `Dense` and `Conv`), contributes
              :math:`\sum_{r,s} (s_W^2\, a_1[r]·a_2[s] + s_b^2)\,(g_1[r]·g_2[s])`
              from its inputs `a` and output cotangents `g` (per group for
              grouped convolutions); the four factors are contracted in the
              cheapest order (the Gram matrices first, or the weight Jacobian
              :math:`\sum_r g[r]\, a[r]ᵀ` first). The cotangents come from
              one reverse pass per output through the activations only: in a
              chain of layers (nested `nn.Sequential` of `nn.Linear`,
              zero-padded `nn.Conv`, elementwise activations, `nn.Flatten`),
              one batched pass of ours back through the layers, else
              `vmap(jacrev)`. An `nn.Linear` head, whose cotangents are the
              identity, contributes the Gram matrix of its inputs times
              :math:`δ(o, o')`. Other parameters (norms, attention, modules
              called more than once, weights shared between modules) use the
              Jacobian contraction.
            * `'auto'`: the cheapest by the FLOP estimate below.

        chunk_bytes: memory bound of the Jacobians of one parameter chunk
            ('jacobian_contraction'), of one batch of vector products, and of
            the intermediate results of structured contractions (an order
            within it is preferred where one exists).

    FLOP estimate of `'auto'`, with `F` the forward FLOPs per example (per
    batch with `vmap_axes=None`; counted by `torch.utils.flop_counter` on the
    first two examples of `x1`, or on `x1`, on the first call with given
    shapes of the inputs and parameters), `O` the outputs per example,
    `|θ|` the trainable parameter count,
    `K` the size of the contraction result times the size of the traced axes,
    and `B = 1` with `vmap_axes`, `B = N` without:

    * jacobian_contraction: `(N1 + N2)(F + 2 F O B) + 2 K |θ|`
    * ntk_vector_products: `N2 (F + 2 F O B) + 3 F O N1 N2`
    * structured_derivatives: `(N1 + N2)(F + F O B (1 + |θ_other|/|θ|)) + 2 K |θ_other|`
      plus twice the multiply-adds of the cheapest contraction order of
      every structured layer's four factors.

    Shape:
        As in the module docstring: `(N1, N2)` for `(N, O)` outputs and the
        default `trace_axes=(-1,)`, `(N1, N2, O, O)` for `trace_axes=()`; a
        pytree output gives the same pytree of kernels.
    """
    _check_model(model, 'empirical_ntk_fn')
    trace_axes, diagonal_axes = _checked_axes(trace_axes, diagonal_axes, 'empirical_ntk_fn')
    if implementation not in IMPLEMENTATIONS + ('auto',):
        raise ValueError(f"empirical_ntk_fn: implementation must be 'auto' or one of "
                         f"{IMPLEMENTATIONS}, got {implementation!r}")
    _check_vmap_axes(vmap_axes)
    if not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"empirical_ntk_fn: chunk_bytes must be a positive int, got {chunk_bytes!r}")

    analyses = {}   # what _Problem's forward passes find, per _shape_signature

    def ntk_fn(x1: PyTree, x2: PyTree | None = None, params: Params | None = None,
               **kwargs) -> PyTree:
        _check_inputs(x1, x2, 'empirical_ntk_fn')
        if params is None:
            params = _trainable(model)
            if not params:
                raise ValueError("empirical_ntk_fn: the model has no trainable parameters "
                                 "(all have requires_grad=False)")
        else:
            params = _checked_params(model, params, 'empirical_ntk_fn')
            if not params:
                raise ValueError("empirical_ntk_fn: params is empty, so there is no parameter "
                                 "to differentiate")
        with reuse_heap():
            problem = _Problem(model, params, x1, x2, kwargs, trace_axes, diagonal_axes,
                               vmap_axes, chunk_bytes, count_flops=implementation == 'auto',
                               cache=analyses)
            if problem.outputs_empty:
                return problem.unflatten(problem.kernels_of_empty_outputs())
            if implementation != 'auto':
                return problem.unflatten(_COMPUTE[implementation](problem))
            candidates = sorted(IMPLEMENTATIONS, key=problem.flops)
            for choice in candidates:
                logger.debug("empirical_ntk_fn: implementation %s", choice)
                try:
                    return problem.unflatten(_COMPUTE[choice](problem))
                except _Unsupported as error:
                    if choice == candidates[-1]:
                        raise
                    logger.info("empirical_ntk_fn: %s", error)

    return ntk_fn


def empirical_kernel_fn(model: nn.Module, trace_axes: Sequence[int] = (-1,),
                        diagonal_axes: Sequence[int] = (), vmap_axes: VmapAxes = 0,
                        implementation: str = 'auto') -> Callable:
    """`kernel_fn(x1, x2=None, get=None, params=None, **kwargs)`: empirical NNGP and/or NTK.

    `get` is `'nngp'`, `'ntk'` (returns that kernel), a tuple of them (a named
    tuple in that order), or `None` (`EmpiricalKernel(nngp, ntk)`), as in
    neural-tangents. Other arguments as in `empirical_ntk_fn`; shapes as in
    the module docstring.
    """
    _check_model(model, 'empirical_kernel_fn')
    _checked_axes(trace_axes, diagonal_axes, 'empirical_kernel_fn')
    fns = {'nngp': empirical_nngp_fn(model, trace_axes, diagonal_axes),
           'ntk': empirical_ntk_fn(model, trace_axes, diagonal_axes, vmap_axes, implementation)}

    def kernel_fn(x1: PyTree, x2: PyTree | None = None,
                  get: str | Sequence[str] | None = None, params: Params | None = None,
                  **kwargs):
        names = _canonical_get(get, 'empirical_kernel_fn')
        values = {name: fns[name](x1, x2, params, **kwargs) for name in names}
        return _select(values, get)

    return kernel_fn


def _canonical_get(get: str | Sequence[str] | None, caller: str) -> tuple[str, ...]:
    names = ('nngp', 'ntk') if get is None else (get,) if isinstance(get, str) else tuple(get)
    lowered = tuple(str(name).lower() for name in names)
    if not lowered or len(set(lowered)) != len(lowered) or not set(lowered) <= {'nngp', 'ntk'}:
        raise ValueError(f"{caller}: get must be 'nngp', 'ntk', a tuple of those without "
                         f"repeats, or None, got {get!r}")
    return lowered


def _select(values: dict[str, PyTree], get: str | Sequence[str] | None):
    """neural-tangents' `get` semantics on a dict of computed kernels."""
    if get is None:
        return EmpiricalKernel(values['nngp'], values['ntk'])
    if isinstance(get, str):
        return values[get.lower()]
    names = tuple(name.lower() for name in get)
    return collections.namedtuple('EmpiricalKernel', names)(*(values[n] for n in names))


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
    if isinstance(degree, bool) or not isinstance(degree, int):
        raise TypeError(f"taylor_expand: degree must be an int, got {type(degree).__name__}")
    if degree < 0:
        raise ValueError(f"taylor_expand: degree must be a non-negative int, got {degree!r}")
    return _taylor_expansion(model, params0, degree, 'taylor_expand')


def _taylor_expansion(model: nn.Module, params0: Params, degree: int,
                      caller: str) -> Callable[..., PyTree]:
    _check_model(model, caller)
    params0 = _checked_params(model, params0, caller, 'params0')

    def f_taylor(x: PyTree, params: Params | None = None, **kwargs) -> PyTree:
        _check_inputs(x, None, caller, 'x')
        if params is None:
            return _apply(model, params0, x, kwargs)
        params = _checked_params(model, params, caller)
        if set(params) != set(params0):
            raise ValueError(f"{caller}: params must have the keys of params0; missing "
                             f"{sorted(set(params0) - set(params))}, unexpected "
                             f"{sorted(set(params) - set(params0))}")
        delta = {name: params[name] - params0[name] for name in params0}
        terms = _directional_derivatives(lambda p: _apply(model, p, x, kwargs), params0, delta,
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


class _Unsupported(ValueError):
    """An implementation cannot handle this model ('auto' then tries the next cheapest)."""


def _check_model(model: Any, caller: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")


def _checked_axes(trace_axes: Any, diagonal_axes: Any, caller: str
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The axes as tuples of ints (an int is one axis, as in neural-tangents);
    their range depends on the outputs, which `_OutputContraction` checks."""
    checked = []
    for arg, axes in (('trace_axes', trace_axes), ('diagonal_axes', diagonal_axes)):
        axes = (axes,) if isinstance(axes, int) and not isinstance(axes, bool) else axes
        if isinstance(axes, str) or not isinstance(axes, Sequence) or any(
                isinstance(a, bool) or not isinstance(a, int) for a in axes):
            raise TypeError(f"{caller}: {arg} must be a sequence of ints (output axes), got "
                            f"{axes!r}")
        checked.append(tuple(axes))
    return checked[0], checked[1]


def _trainable(model: nn.Module) -> Params:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if any(nn.parameter.is_lazy(p) for p in params.values()):
        raise ValueError(f"{type(model).__name__}: parameters are not initialized yet; call the "
                         "model once or model.init_parameters(input_shape) first")
    return params


def _shape_signature(modules: dict[str, nn.Module], params: Params, x: PyTree,
                     kwargs: dict[str, Any]) -> tuple:
    """What the model's forward passes find out (output shapes, module calls,
    FLOPs) depends on: the parameters', inputs' and keyword tensors' shapes,
    dtypes and devices, other keyword values, and which modules there are and
    are in training mode."""
    def key(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return tuple(leaf.shape), leaf.dtype, leaf.device
        return leaf if isinstance(leaf, (int, float, bool, str, type(None))) else id(leaf)

    leaves, tree = pytree.tree_flatten((x, kwargs))
    return (str(tree), tuple(map(key, leaves)),
            tuple((name, key(p)) for name, p in params.items()),
            tuple((id(m), m.training) for m in modules.values()))


def _checked_params(model: nn.Module, params: Any, caller: str, arg: str = 'params') -> Params:
    """`params` as a dict, its names and shapes checked against the model's
    parameters: `functional_call` ignores names it does not know, so a misspelt
    one would silently leave that parameter at the model's value."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{caller}: {arg} must be a dict from parameter names to tensors, got "
                        f"{type(params).__name__}")
    own = {name: _parameter(model, name) for name in params}
    unknown = [name for name, p in own.items() if p is None]
    if unknown:
        own = dict(model.named_parameters(remove_duplicate=False))
        guesses = {name: difflib.get_close_matches(str(name), own, n=1) for name in unknown}
        hint = '; '.join(f"did you mean {guess[0]!r} for {name!r}?"
                         for name, guess in guesses.items() if guess)
        if not hint:
            hint = "its parameters are " + ', '.join(map(repr, list(own)[:8])) + \
                (', ...' if len(own) > 8 else '')
        raise ValueError(f"{caller}: {arg} has names that are not parameters of the model: "
                         f"{unknown!r} ({hint})")
    for name, value in params.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{caller}: {arg}[{name!r}] must be a tensor, got "
                            f"{type(value).__name__}")
        if value.shape != own[name].shape and not nn.parameter.is_lazy(own[name]):
            raise ValueError(f"{caller}: {arg}[{name!r}] must have the parameter's shape "
                             f"{tuple(own[name].shape)}, got {tuple(value.shape)}")
    return dict(params)


def _parameter(model: nn.Module, name: Any) -> nn.Parameter | None:
    """The parameter `model.get_parameter(name)` if there is one, else `None`;
    by the modules' own dictionaries (a few lookups, not a walk of the model)."""
    if not isinstance(name, str):
        return None
    *path, leaf = name.split('.')
    module = model
    for part in path:
        module = module._modules.get(part)
        if module is None:
            return None
    return module._parameters.get(leaf)


def _check_inputs(x1: PyTree, x2: PyTree | None, caller: str, name1: str = 'x1') -> None:
    """Inputs are tensors (pytrees of them) with values: real, finite where
    floating (not checked while torch.compile traces or torch.func transforms
    run, where values cannot be read), not on the `meta` device; `x2` like `x1`."""
    leaves1, tree1 = pytree.tree_flatten(x1)
    sides = ((name1, leaves1), ('x2', [] if x2 is None else pytree.tree_leaves(x2)))
    for name, leaves in sides:
        others = sorted({type(leaf).__name__ for leaf in leaves
                         if not isinstance(leaf, torch.Tensor)})
        if others:
            raise TypeError(f"{caller}: {name} must be a tensor or a pytree of tensors, got "
                            f"{', '.join(others)} in it")
    if not leaves1:
        raise ValueError(f"{caller}: {name1} holds no tensor")
    for name, leaves in sides:
        for leaf in leaves:
            check_input_values(leaf, name, caller)
    if x2 is None:
        return
    leaves2, tree2 = pytree.tree_flatten(x2)
    if tree1 != tree2:
        raise ValueError(f"{caller}: x1 and x2 must have the same structure, got {tree1} and {tree2}")
    for a, b in zip(leaves1, leaves2):
        if a.ndim != b.ndim or a.dtype != b.dtype or a.device != b.device:
            raise ValueError(f"{caller}: x1 and x2 must agree in the number of axes, dtype and "
                             f"device, got {tuple(a.shape)} {a.dtype} {a.device} and "
                             f"{tuple(b.shape)} {b.dtype} {b.device}")


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """neural-tangents' rule: a pair `(value1, value2)` is split between `x1` and `x2`."""
    pairs = {k: v for k, v in kwargs.items() if isinstance(v, tuple) and len(v) == 2}
    return ({**kwargs, **{k: v[0] for k, v in pairs.items()}},
            {**kwargs, **{k: v[1] for k, v in pairs.items()}})


def _apply(model: nn.Module, params: Params, x: PyTree, kwargs: dict[str, Any]) -> PyTree:
    """`model(x, **kwargs)` with `params` in place of (some of) its own parameters.

    Buffers are copied inside the call: BatchNorm's running statistics are not
    updated, and transforms do not see in-place updates of captured tensors.
    """
    return functional_call(model, (params, _buffer_copies(model)), (x,), kwargs)


def _buffer_copies(model: nn.Module) -> Params:
    return {name: b.clone() for name, b in model.named_buffers()}


def _rng_devices(x: PyTree) -> list:
    return list({leaf.device for leaf in pytree.tree_leaves(x)
                 if isinstance(leaf, torch.Tensor) and leaf.is_cuda})


def _output_leaves(out: PyTree, caller: str, tree1: pytree.TreeSpec | None = None
                   ) -> tuple[list[torch.Tensor], pytree.TreeSpec]:
    """The output tensors (with at least one axis each), in the structure
    `tree1` of the outputs on `x1` if given."""
    leaves, tree = pytree.tree_flatten(out)
    if tree1 is not None and tree != tree1:
        raise ValueError(f"{caller}: the outputs on x1 and x2 differ in structure: {tree1} and {tree}")
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{caller}: the model must return a tensor or a pytree of tensors, "
                            f"got a {type(leaf).__name__} in its output")
        if not leaf.ndim:
            raise ValueError(f"{caller}: every model output must have a batch axis, got a scalar")
    return leaves, tree


def _output_contractions(shapes1: Sequence[Sequence[int]], shapes2: Sequence[Sequence[int]],
                         trace_axes: Sequence[int], diagonal_axes: Sequence[int], caller: str
                         ) -> list[_OutputContraction]:
    specs = []
    for shape1, shape2 in zip(shapes1, shapes2):
        spec = _OutputContraction(len(shape1), trace_axes, diagonal_axes, caller)
        for axis in spec.paired_axes():
            if len(shape1) != len(shape2) or shape1[axis] != shape2[axis]:
                raise ValueError(f"{caller}: outputs of shapes {tuple(shape1)} and {tuple(shape2)} "
                                 f"differ on axis {axis}, which is in trace_axes "
                                 f"{tuple(trace_axes)} or diagonal_axes {tuple(diagonal_axes)}")
        specs.append(spec)
    return specs


# Batch axes (vmap_axes).

def _check_vmap_axes(vmap_axes: VmapAxes) -> None:
    def valid(axes) -> bool:
        return all(a is None or (isinstance(a, int) and not isinstance(a, bool))
                   for a in pytree.tree_leaves(axes))
    if isinstance(vmap_axes, tuple) and len(vmap_axes) == 3:
        ok = valid(vmap_axes[:2]) and isinstance(vmap_axes[2], (dict, type(None))) and \
            valid(vmap_axes[2])
    else:
        ok = valid(vmap_axes)
    if not ok:
        raise ValueError(f"empirical_ntk_fn: vmap_axes must be None, an int, a pytree of ints "
                         f"matching the inputs, or a triple (in_axes, out_axes, kwargs_axes) "
                         f"with kwargs_axes a dict, got {vmap_axes!r}")


def _axes_of(axes: PyTree, tree: PyTree, what: str) -> list[int | None]:
    """One canonical (non-negative) axis or `None` per tensor of `tree`."""
    leaves, spec = pytree.tree_flatten(tree)
    if axes is None or isinstance(axes, int):
        axes = [axes] * len(leaves)
    else:
        axes, axes_spec = pytree.tree_flatten(axes)
        if axes_spec != spec:
            raise ValueError(f"empirical_ntk_fn: vmap_axes gives {what} the structure "
                             f"{axes_spec}, but they have {spec}")
    canonical = []
    for axis, leaf in zip(axes, leaves):
        if axis is not None and not -leaf.ndim <= axis < leaf.ndim:
            raise ValueError(f"empirical_ntk_fn: vmap_axes gives {what} of shape "
                             f"{tuple(leaf.shape)} the batch axis {axis}")
        canonical.append(None if axis is None else axis % leaf.ndim)
    return canonical


class _VmapAxes:
    """The batch axis of every input, output and keyword-argument tensor.

    A model called on one example sees that example's slice with the batch
    axis kept (of size 1): `per_example` turns a function of whole inputs into
    one `torch.func.vmap` can map over the batch axes (`in_dims`).
    """

    def __init__(self, vmap_axes: VmapAxes, x: PyTree, kwargs: dict[str, Any]):
        if isinstance(vmap_axes, tuple) and len(vmap_axes) == 3:
            in_axes, self.given_out_axes, kwargs_axes = vmap_axes
        else:
            in_axes, self.given_out_axes, kwargs_axes = vmap_axes, vmap_axes, {}
        # Axes of keyword arguments not passed in this call do not apply.
        kwargs_axes = {name: axes for name, axes in (kwargs_axes or {}).items() if name in kwargs}
        self.x_tree = pytree.tree_structure(x)
        self.x_axes = _axes_of(in_axes, x, 'the inputs')
        self.kwargs_axes = {name: _axes_of(axes, kwargs[name], f"keyword argument {name!r}")
                            for name, axes in kwargs_axes.items()}
        self.kwargs_trees = {name: pytree.tree_structure(kwargs[name]) for name in kwargs_axes}
        self.out_axes = None

    def set_outputs(self, out: PyTree) -> None:
        """Canonicalize the output axes for outputs like `out`."""
        self.out_axes = _axes_of(self.given_out_axes, out, 'the outputs')
        if None in self.out_axes:
            raise ValueError("empirical_ntk_fn: vmap_axes must give every output a batch axis, "
                             f"got {self.given_out_axes!r}")

    @property
    def maps_something(self) -> bool:
        return any(a is not None for a in self.x_axes) or any(
            a is not None for axes in self.kwargs_axes.values() for a in axes)

    def in_dims(self) -> tuple[PyTree, dict[str, PyTree]]:
        """`vmap`'s `in_dims` for `(x, mapped keyword arguments)`."""
        return (pytree.tree_unflatten(self.x_axes, self.x_tree),
                {name: pytree.tree_unflatten(axes, self.kwargs_trees[name])
                 for name, axes in self.kwargs_axes.items()})

    def mapped(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {name: kwargs[name] for name in self.kwargs_axes}

    def per_example(self, fn: Callable, kwargs: dict[str, Any]) -> Callable:
        """`fn(*args, x, kwargs) -> (outputs, aux)` as a function of one example's
        `(*args, x, mapped kwargs)` without batch axes, outputs without them either."""
        def example_fn(*args):
            *args, x, mapped = args
            x = _expand(x, self.x_axes)
            mapped = {name: _expand(value, self.kwargs_axes[name])
                      for name, value in mapped.items()}
            outputs, aux = fn(*args, x, {**kwargs, **mapped})
            return tuple(_squeeze_batch(out, axis)
                         for out, axis in zip(outputs, self.out_axes)), aux
        return example_fn

    def batch_size(self, x: PyTree, kwargs: dict[str, Any]) -> int:
        """The common size of the batch axes."""
        sizes = {leaf.shape[a] for leaf, a in zip(pytree.tree_leaves(x), self.x_axes)
                 if a is not None}
        sizes |= {leaf.shape[a] for name, axes in self.kwargs_axes.items()
                  for leaf, a in zip(pytree.tree_leaves(kwargs[name]), axes) if a is not None}
        if len(sizes) != 1:
            raise ValueError(f"empirical_ntk_fn: the inputs' batch axes (vmap_axes) differ in "
                             f"size: {sorted(sizes)}")
        return sizes.pop()

    def examples(self, x: PyTree, kwargs: dict[str, Any], start: int, stop: int
                 ) -> tuple[PyTree, dict[str, Any]]:
        """Examples `start:stop` of the inputs and mapped keyword arguments."""
        def narrow(tree: PyTree, axes: list[int | None]) -> PyTree:
            leaves, spec = pytree.tree_flatten(tree)
            return pytree.tree_unflatten([leaf if a is None else leaf.narrow(a, start, stop - start)
                                          for leaf, a in zip(leaves, axes)], spec)
        return narrow(x, self.x_axes), {name: narrow(kwargs[name], axes)
                                        for name, axes in self.kwargs_axes.items()}


@contextlib.contextmanager
def _failures_explained(caller: str, name: str, model: nn.Module, params: Params, x: PyTree,
                        kwargs: dict[str, Any], cut: bool = False) -> Iterator[None]:
    """The model runs on input `name` (`x`, or with `cut` its examples cut
    along `vmap_axes`): a failure becomes a `ValueError` saying what is wrong,
    the input's device or dtype against the parameters', else `vmap_axes` if
    the model runs on the whole batch `x`, else the input's shape."""
    try:
        yield
    except RuntimeError as error:
        own = {**dict(model.named_parameters()), **params}
        leaves = pytree.tree_leaves(x)
        devices = sorted({str(p.device) for p in own.values()})
        dtypes = {p.dtype for p in own.values() if p.is_floating_point()}
        for leaf in leaves:
            if devices and str(leaf.device) not in devices:
                raise ValueError(f"{caller}: {name} is on {leaf.device} but the model's "
                                 f"parameters are on {', '.join(devices)}; move one to the "
                                 f"other's device ({error})") from error
            if leaf.is_floating_point() and dtypes and leaf.dtype not in dtypes:
                raise ValueError(f"{caller}: {name} has dtype {leaf.dtype} but the model's "
                                 f"parameters have {', '.join(sorted(map(str, dtypes)))}; "
                                 f"convert one to the other's dtype ({error})") from error
        if cut and _runs(model, params, x, kwargs):
            raise ValueError(f"{caller}: the model runs on {name} but fails on its examples cut "
                             f"along vmap_axes ({error}); check vmap_axes or pass "
                             "vmap_axes=None") from error
        shapes = [tuple(leaf.shape) for leaf in leaves]
        raise ValueError(f"{caller}: the model fails on {name} of shape "
                         f"{shapes[0] if len(shapes) == 1 else shapes} ({error}); check that "
                         f"{name} has the shape and dtype the model expects") from error


def _runs(model: nn.Module, params: Params, x: PyTree, kwargs: dict[str, Any]) -> bool:
    """Whether the model runs on `x` (without gradients, the random state restored)."""
    try:
        with torch.no_grad(), torch.random.fork_rng(_rng_devices(x)):
            _apply(model, params, x, kwargs)
    except RuntimeError:
        return False
    return True


def _expand(tree: PyTree, axes: list[int | None]) -> PyTree:
    leaves, spec = pytree.tree_flatten(tree)
    return pytree.tree_unflatten([leaf if a is None else leaf.unsqueeze(a)
                                  for leaf, a in zip(leaves, axes)], spec)


def _squeeze_batch(out: torch.Tensor, axis: int) -> torch.Tensor:
    if out.ndim <= axis or out.shape[axis] != 1:
        raise ValueError(f"empirical_ntk_fn: on one example the model returned shape "
                         f"{tuple(out.shape)}, not a batch of one along the vmap_axes output "
                         f"axis {axis}; check vmap_axes or pass vmap_axes=None")
    return out.squeeze(axis)


class _Side:
    """One argument of the kernel: inputs, keyword arguments, the output
    tensors' shapes, and the shapes every module sees in one call of the
    model (one example's call with `vmap_axes`)."""

    def __init__(self, x: PyTree, kwargs: dict[str, Any], out_shapes: list[tuple[int, ...]],
                 calls: dict[str, list]):
        self.x, self.kwargs, self.out_shapes, self.calls = x, kwargs, out_shapes, calls

    def outputs(self) -> int:
        return sum(math.prod(shape) for shape in self.out_shapes)


class _Problem:
    """One kernel to compute: model, parameters, inputs, contraction, and their sizes.

    A forward pass on `x1` (no gradients, buffers copied, RNG state restored,
    so the model and the random stream are left as they were) records the
    output shapes, the forward FLOPs and every module's calls; with a `cache`
    (`empirical_ntk_fn` keeps one), once per shapes of the inputs and
    parameters.
    """

    def __init__(self, model: nn.Module, params: Params, x1: PyTree, x2: PyTree | None,
                 kwargs: dict[str, Any], trace_axes: Sequence[int],
                 diagonal_axes: Sequence[int], vmap_axes: VmapAxes, chunk_bytes: int,
                 count_flops: bool = True, cache: dict | None = None):
        self.model, self.params, self.chunk_bytes = model, params, chunk_bytes
        self.modules = dict(model.named_modules())
        kwargs1, kwargs2 = _split_kwargs(kwargs)
        # What the forward passes find depends on the shapes (and on which
        # modules train) alone: with a `cache`, they run once per shapes.
        key = None if cache is None else _shape_signature(self.modules, params, (x1, x2), kwargs)
        if key is None or key not in cache:
            found = self._analyze(x1, x2, kwargs1, kwargs2, vmap_axes, count_flops)
            if key is not None:
                if len(cache) >= 64:
                    cache.clear()
                cache[key] = found
        else:
            found = cache[key]
        self.axes, self.out_tree, self.forward_flops, shapes, calls = found
        self.side1 = _Side(x1, kwargs1, shapes[0], calls[0])
        self.side2 = self.side1 if x2 is None else _Side(x2, kwargs2, shapes[1], calls[1])
        self.specs = _output_contractions(self.side1.out_shapes, self.side2.out_shapes,
                                          trace_axes, diagonal_axes, 'empirical_ntk_fn')
        self.rules = self._structured_rules()

    def _analyze(self, x1: PyTree, x2: PyTree | None, kwargs1: dict[str, Any],
                 kwargs2: dict[str, Any], vmap_axes: VmapAxes, count_flops: bool) -> tuple:
        """`(axes, output tree, forward FLOPs, output shapes of each side, module
        calls of each side)` from forward passes (the second side's `None` when
        `x2` is); checks that per-example outputs equal the batched ones."""
        model, params = self.model, self.params
        self.axes = None if vmap_axes is None else _VmapAxes(vmap_axes, x1, kwargs1)
        if self.axes is not None and not self.axes.maps_something:
            self.axes = None
        if self.axes is not None:
            n1 = self.axes.batch_size(x1, kwargs1)
            if n1 == 0 or (x2 is not None and self.axes.batch_size(x2, kwargs2) == 0):
                # No example to call the model on: the batched forward gives
                # the output shapes, and the kernels are empty.
                self.axes = None
        if self.axes is not None:
            # The first two examples stand for the batch (their batch is
            # checked against their per-example calls below).
            x, mapped = self.axes.examples(x1, kwargs1, 0, min(n1, 2))
            with _failures_explained('empirical_ntk_fn', 'x1', model, params, x1, kwargs1,
                                     cut=True):
                out1, flops, calls1 = _traced_forward(model, params, x, {**kwargs1, **mapped},
                                                      self.modules, count_flops)
            forward_flops = flops * n1 / min(n1, 2)
            mixing = _batch_mixing_modules(self.modules, calls1)
            if mixing:
                logger.info("empirical_ntk_fn: %s mix batch elements or draw random numbers; "
                            "differentiating whole batches (vmap_axes=None)", ', '.join(mixing))
                self.axes = None
        if self.axes is None:
            with _failures_explained('empirical_ntk_fn', 'x1', model, params, x1, kwargs1):
                out1, forward_flops, calls1 = _traced_forward(model, params, x1, kwargs1,
                                                              self.modules, count_flops)
        leaves1, self.out_tree = _output_leaves(out1, 'empirical_ntk_fn')
        shapes, calls = [None, None], [None, None]
        if self.axes is None:
            shapes[0], calls[0] = [tuple(o.shape) for o in leaves1], calls1
            if x2 is not None:
                with _failures_explained('empirical_ntk_fn', 'x2', model, params, x2, kwargs2):
                    out2, _, calls[1] = _traced_forward(model, params, x2, kwargs2, self.modules)
                leaves2 = _output_leaves(out2, 'empirical_ntk_fn', self.out_tree)[0]
                shapes[1] = [tuple(o.shape) for o in leaves2]
        else:
            # Modules record their shapes in one example's call (what the Jacobians see).
            self.axes.set_outputs(out1)
            examples, calls[0] = self._example_forward('x1', x1, kwargs1, min(n1, 2))
            self._check_per_example_outputs(leaves1, examples)
            shapes[0] = self._batch_shapes(examples, n1)
            if x2 is not None:
                examples, calls[1] = self._example_forward('x2', x2, kwargs2, 1)
                shapes[1] = self._batch_shapes(examples, self.axes.batch_size(x2, kwargs2))
        return self.axes, self.out_tree, forward_flops, shapes, calls

    def _batch_shapes(self, examples: list[torch.Tensor], n: int) -> list[tuple[int, ...]]:
        """Output shapes of `n` examples from outputs `(k, *example)` of `k` examples."""
        return [tuple(o.shape[1:axis + 1]) + (n,) + tuple(o.shape[axis + 1:])
                for o, axis in zip(examples, self.axes.out_axes)]

    @property
    def outputs_empty(self) -> bool:
        """Whether every output has no entries on one side (no examples): no
        Jacobian has entries either."""
        return all(0 in shape1 or 0 in shape2
                   for shape1, shape2 in zip(self.side1.out_shapes, self.side2.out_shapes))

    def kernels_of_empty_outputs(self) -> list[torch.Tensor]:
        """The kernels when `outputs_empty`: contractions of empty outputs, of
        the shapes the outputs give."""
        like = next(iter(self.params.values()))
        return [spec.normalized(spec.contract(_zeros(shape1, like), _zeros(shape2, like),
                                              n_param_dims=0), shape1)
                for spec, shape1, shape2 in zip(self.specs, self.side1.out_shapes,
                                                self.side2.out_shapes)]

    @property
    def same_inputs(self) -> bool:
        return self.side2 is self.side1

    def unflatten(self, kernels: list[torch.Tensor]) -> PyTree:
        return pytree.tree_unflatten(kernels, self.out_tree)

    def batch_sizes(self) -> tuple[int, int]:
        """Examples on each side (with `vmap_axes`), else 1: the number of model calls."""
        if self.axes is None:
            return 1, 1
        axis = self.axes.out_axes[0]
        return self.side1.out_shapes[0][axis], self.side2.out_shapes[0][axis]

    def _example_forward(self, name: str, batch: PyTree, kwargs: dict[str, Any], n: int
                         ) -> tuple[list[torch.Tensor], dict[str, list]]:
        """Outputs `(n, *example)` of the first `n` examples of input `name`,
        each in its own call, and `{module: [(input shape, output shape)]}` of one call."""
        x, mapped = self.axes.examples(batch, kwargs, 0, n)
        calls = {}

        def call(x: PyTree, kwargs: dict[str, Any]):
            out, _, recorded = _traced_forward(self.model, self.params, x, kwargs, self.modules)
            calls.update(recorded)   # under vmap, modules see one example's shapes
            return _output_leaves(out, 'empirical_ntk_fn', self.out_tree)[0], {}

        example = self.axes.per_example(call, kwargs)
        with _failures_explained('empirical_ntk_fn', name, self.model, self.params, batch, kwargs,
                                 cut=True):
            outputs = vmap(example, in_dims=self.axes.in_dims())(x, mapped)[0]
        return list(outputs), calls

    def _check_per_example_outputs(self, outputs: list[torch.Tensor],
                                   examples: list[torch.Tensor]) -> None:
        """The per-example forward must equal the batched one, or vmap is wrong."""
        for batched, alone, axis in zip(outputs, examples, self.axes.out_axes):
            batched = batched.narrow(axis, 0, alone.shape[0]).movedim(axis, 0)
            scale = batched.abs().max().clamp_min(1)
            tolerance = 1e3 * torch.finfo(batched.dtype).eps * scale
            if (alone - batched).abs().max() > tolerance:
                raise ValueError("empirical_ntk_fn: with vmap_axes the model's outputs per "
                                 "example differ from its batched outputs, so its batch elements "
                                 "interact (or vmap_axes names the wrong axes); pass "
                                 "vmap_axes=None")

    def _structured_rules(self) -> dict[str, _AffineRule]:
        owners = collections.Counter(id(p) for m in self.modules.values()
                                     for p in m.parameters(recurse=False))
        rules = {}
        for name, module in self.modules.items():
            rule = _rule_for(name, module, self.params)
            calls = (self.side1.calls.get(name, ()), self.side2.calls.get(name, ()))
            if rule is None or any(len(c) != 1 for c in calls) or not rule.param_names():
                continue
            own = dict(module.named_parameters(recurse=False))
            if set(own) <= {'weight', 'bias'} and all(owners[id(p)] == 1 for p in own.values()):
                rules[name] = rule
        return rules

    # Sizes for the FLOP estimates.

    def contraction_size(self) -> int:
        """Result entries times traced entries: the multiply-adds per parameter."""
        return sum(spec.multiply_adds(shape1, shape2) for spec, shape1, shape2
                   in zip(self.specs, self.side1.out_shapes, self.side2.out_shapes))

    def _per_call(self) -> list[tuple[int, float, float]]:
        """`(calls, forward FLOPs per call, outputs per call)` of each side."""
        calls1, calls2 = self.batch_sizes()
        forward = self.forward_flops / calls1
        ratio = self.side2.outputs() / self.side1.outputs()
        return [(calls1, forward, self.side1.outputs() / calls1),
                (calls2, forward * (1 if self.axes else ratio), self.side2.outputs() / calls2)]

    def _jacobian_pass_flops(self, reverse_per_forward: float) -> float:
        """FLOPs of one forward and one reverse pass per output entry, on both sides."""
        sides = self._per_call()[:1 if self.same_inputs else 2]
        return sum(calls * forward * (1 + outputs * reverse_per_forward)
                   for calls, forward, outputs in sides)

    def flops(self, implementation: str) -> float:
        n_params = sum(p.numel() for p in self.params.values())
        k = self.contraction_size()
        if implementation == 'jacobian_contraction':
            return self._jacobian_pass_flops(2.) + 2 * k * n_params
        if implementation == 'ntk_vector_products':
            calls2, forward2, outputs2 = self._per_call()[1]
            return calls2 * forward2 * (1 + 2 * outputs2) + 3 * self.forward_flops * calls2 * outputs2
        structured = {n for rule in self.rules.values() for n in rule.param_names()}
        other = sum(p.numel() for n, p in self.params.items() if n not in structured)
        passes = self._jacobian_pass_flops(1 + other / n_params)
        return passes + 2 * k * other + 2 * sum(
            _contraction_order(*self.structured_operands(leaf, rule), self.max_entries())[0]
            for leaf in range(len(self.specs)) for rule in self.rules.values())

    def structured_operands(self, leaf: int, rule: _AffineRule
                            ) -> tuple[list[str], str, dict[str, int]]:
        """Einsum terms, result and sizes of `rule`'s contribution to output `leaf`."""
        shapes = []
        for side in (self.side1, self.side2):
            rows = rule.rows(side.calls[rule.name][0][1])
            shapes.append((side.out_shapes[leaf], rows))
        return self.specs[leaf].affine_terms(shapes, rule.groups, rule.columns(), rule.outputs(),
                                             rule.cotangent_layout, self.batch_axis(leaf))

    def is_output_identity(self, leaf: int, rule: _AffineRule, cotangents: torch.Tensor) -> bool:
        """Whether the cotangents `(*out, *y)` of `rule`'s layer are exactly the
        identity between one call's outputs and `y`, with no gradient through
        them: the layer's output is the model's output (an `nn.Linear` head)."""
        ndim, axis = self.specs[leaf].ndim, self.batch_axis(leaf)
        one_call = tuple(1 if i == axis else n for i, n in enumerate(cotangents.shape[:ndim]))
        if (not isinstance(rule, _LinearRule) or cotangents.requires_grad or axis == ndim - 1
                or one_call != cotangents.shape[ndim:]):
            return False
        size = cotangents.shape[ndim:].numel()
        square = cotangents if axis is None else cotangents.movedim(axis, 0)
        square = square.reshape(-1, size, size)
        return torch.equal(square, torch.eye(size, dtype=square.dtype, device=square.device)
                           .expand_as(square))

    def output_layer_operands(self, leaf: int, a1: torch.Tensor, a2: torch.Tensor
                              ) -> tuple[list[str], str, tuple[torch.Tensor, ...]]:
        r"""Einsum terms, result and operands of the contribution of an `nn.Linear`
        head (`is_output_identity`) to output `leaf`:

        .. math:: Θ[(r, o), (s, o')] = (a_1[r] · a_2[s])\, δ(o, o')

        at output positions `r` and `s` and features `o` and `o'`: the rows of
        `a1 ([N1], R, 1, I)` (one call's positions, less the batch axis of a
        call on one example) take the letters of the output axes they are, and
        `δ(o, o')` is the identity between the two outputs' feature axes (a
        size-`O` vector of ones where they share a letter, traced or diagonal).
        No cotangent enters: `O²` times fewer multiply-adds than the general
        rule.
        """
        spec, axis = self.specs[leaf], self.batch_axis(leaf)
        per_call = [i for i in range(spec.ndim) if i != axis]
        terms, operands = [], []
        for side, letters, a in ((self.side1, spec.side1, a1), (self.side2, spec.side2, a2)):
            batch = '' if axis is None else letters[axis]
            rows = [side.out_shapes[leaf][i] for i in per_call[:-1]]
            terms.append(batch + ''.join(letters[i] for i in per_call[:-1]) + 'yx')
            operands.append(a.reshape(*a.shape[:len(batch)], *rows, *a.shape[len(batch) + 1:]))
        features = self.side1.out_shapes[leaf][per_call[-1]]
        eye = torch.eye(features, dtype=a1.dtype, device=a1.device)
        delta = ''.join(dict.fromkeys(spec.side1[per_call[-1]] + spec.side2[per_call[-1]]))
        terms.append(delta)
        operands.append(eye if len(delta) == 2 else eye.new_ones(features))
        return terms, spec.result, tuple(operands)

    def max_entries(self) -> int:
        """Entries of an intermediate result within `chunk_bytes`."""
        element_size = max(p.element_size() for p in self.params.values())
        return self.chunk_bytes // element_size

    def batch_axis(self, leaf: int) -> int | None:
        return None if self.axes is None else self.axes.out_axes[leaf]

    def cheapest(self) -> str:
        return min(IMPLEMENTATIONS, key=self.flops)

    # Jacobians.

    def jacobians(self, side: _Side, wrt: Params, rules: dict[str, _AffineRule]
                  ) -> tuple[list[Params], list[Params], Params]:
        """Jacobians of the outputs on `side` w.r.t. `wrt` and the outputs of `rules`' layers.

        Returns, per output tensor, `{name: (*out, *θ)}` and `{layer: (*out, *y)}`
        (`y` the layer's output in one call of the model: one example's call
        with `vmap_axes`), and the layers' inputs `{layer: a}`, `a` of shape
        `(N, *a)` with `vmap_axes` (one call per example), else as seen.
        """
        if not wrt and rules and self.chain is not None:
            return self.chain_jacobians(side, rules)
        fixed = {n: p for n, p in self.params.items() if n not in wrt}

        def f(wrt: Params, probes: Params, x: PyTree, kwargs: dict[str, Any]):
            out, inputs = _forward_with_probes(self.model, {**fixed, **wrt}, probes,
                                               self.modules, x, kwargs)
            return tuple(pytree.tree_leaves(out)), inputs

        probes = {name: _zeros(side.calls[name][0][1], rule.weight(self.params))
                  for name, rule in rules.items()}
        if self.axes is None:
            jac, inputs = jacrev(f, argnums=(0, 1), has_aux=True)(wrt, probes, side.x, side.kwargs)
        else:
            example = self.axes.per_example(f, side.kwargs)
            jac, inputs = vmap(jacrev(example, argnums=(0, 1), has_aux=True),
                               in_dims=(None, None, *self.axes.in_dims()))(
                wrt, probes, side.x, self.axes.mapped(side.kwargs))
            # vmap puts the examples first; move them to the outputs' batch axes.
            jac = [pytree.tree_map(lambda t: t.movedim(0, axis), j)
                   for j, axis in zip(jac, self.axes.out_axes)]
        return [j[0] for j in jac], [j[1] for j in jac], inputs

    @functools.cached_property
    def chain(self) -> list[tuple[str, str, nn.Module | _AffineRule]] | None:
        """The model as a chain of layers `chain_jacobians` differentiates, if it is one.

        That is nested `nn.Sequential`s of `nn.Linear`, zero-padded `nn.Conv`,
        elementwise activations without parameters (not in place), `nn.Flatten`
        of the example's axes, `nn.Identity` and dropout that is off, without
        hooks, called on one tensor with batch axis 0 (`vmap_axes`) and no
        keyword arguments. Entries `(name, kind, rule or module)`, `kind` one
        of 'affine', 'elementwise', 'reshape'.
        """
        axes = self.axes
        if (axes is None or axes.x_axes != [0] or axes.out_axes != [0] or self.side1.kwargs
                or self.side2.kwargs or not isinstance(self.side1.x, torch.Tensor)
                or len(self.side1.out_shapes) != 1 or _global_hooks()):
            return None
        chain = []
        for name, module in self.modules.items():   # in the order nested Sequentials run them
            if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                    or module._backward_pre_hooks):
                return None
            if type(module) is nn.Sequential:
                continue
            calls = [side.calls.get(name, ()) for side in (self.side1, self.side2)]
            if any(len(c) != 1 for c in calls):
                return None
            rule = _rule_for(name, module, self.params)
            if type(rule) is _LinearRule or (type(rule) is _ConvRule
                                             and rule.zero_padding() is not None):
                chain.append((name, 'affine', rule))
            elif type(module) in _ELEMENTWISE and not getattr(module, 'inplace', False):
                chain.append((name, 'elementwise', module))
            elif type(module) is nn.Identity or (isinstance(module, _DROPOUTS) and not (
                    module.training and module.p > 0)):
                chain.append((name, 'reshape', module))
            elif type(module) is nn.Flatten and module.start_dim % len(calls[0][0][0]) >= 1:
                chain.append((name, 'reshape', module))
            else:
                return None
        return chain

    def chain_jacobians(self, side: _Side, rules: dict[str, _AffineRule]
                        ) -> tuple[list[Params], list[Params], Params]:
        """`jacobians` of the layers `rules` of a `chain`, without parameters:
        one batched forward pass through the chain's layers (keeping their
        inputs and the activations' derivatives), then the output's cotangents
        (the identity per example) taken back through the chain, layer by
        layer, as batches `(N, *out, *y)`: by `W` (`nn.Linear`; the first, on
        the identity, is `W` itself), a transposed convolution, or the
        activations' derivatives. The same cotangents as `jacrev`'s, without
        its per-call overhead and broadcast products."""
        names = [name for name, _, _ in self.chain]
        out, inputs, derivatives = side.x, {}, {}
        for name, kind, layer in self.chain:
            inputs[name] = out
            if kind == 'affine':
                out = layer.forward(out, self.params)
            elif kind == 'elementwise':
                out, derivatives[name] = _with_derivative(layer, out)
            else:
                out = layer(out)
        n, out_shape = out.shape[0], out.shape[1:]
        size = out_shape.numel()
        g = torch.eye(size, dtype=out.dtype, device=out.device).view(*out_shape, *out_shape)
        g = g.expand(n, *g.shape)
        owned = False   # whether g is a tensor of ours nothing else refers to
        first = min(names.index(name) for name in rules)
        cotangents = {}
        for name, kind, layer in reversed(self.chain[first:]):
            x = inputs[name]
            if kind == 'affine':
                if name in rules:
                    cotangents[name] = g.unsqueeze(1 + len(out_shape))
                if name == names[first]:
                    break
                weight = layer.weight(self.params)
                if name == names[-1] and isinstance(layer, _LinearRule) and len(out_shape) == 1:
                    g, owned = weight.expand(n, *weight.shape), False
                else:
                    y_shape = g.shape[1 + len(out_shape):]
                    g = layer.input_cotangents(g.reshape(-1, *y_shape), weight, x.shape[1:])
                    g, owned = g.view(n, *out_shape, *x.shape[1:]), True
            elif kind == 'elementwise':
                derivative = derivatives[name].view(n, *(1,) * len(out_shape), *x.shape[1:])
                if owned and not (torch.is_grad_enabled()
                                  and (g.requires_grad or derivative.requires_grad)):
                    g = g.mul_(derivative)
                else:
                    g, owned = g * derivative, True
            else:
                g = g.reshape(n, *out_shape, *x.shape[1:])
        return [{}], [cotangents], {name: inputs[name].unsqueeze(1) for name in rules}

    def both_jacobians(self, wrt: Params, rules: dict[str, _AffineRule]) -> tuple[tuple, tuple]:
        """`jacobians` on both sides; one call on `x1` and `x2` joined along
        the batch axes where that is the same computation (bigger products,
        half the per-call overhead)."""
        if self.same_inputs:
            derivatives = self.jacobians(self.side1, wrt, rules)
            return derivatives, derivatives
        joined = self._joined_side()
        if joined is None:
            return self.jacobians(self.side1, wrt, rules), self.jacobians(self.side2, wrt, rules)
        d_params, d_probes, inputs = self.jacobians(joined, wrt, rules)
        n1, n2 = self.batch_sizes()

        def part(start: int, length: int) -> tuple[list[Params], list[Params], Params]:
            def cut(per_output: list[Params]) -> list[Params]:
                return [{name: t.narrow(axis, start, length) for name, t in d.items()}
                        for d, axis in zip(per_output, self.axes.out_axes)]
            return (cut(d_params), cut(d_probes),
                    {name: a.narrow(0, start, length) for name, a in inputs.items()})

        return part(0, n1), part(n1, n2)

    def _joined_side(self) -> _Side | None:
        """`x1` and `x2` as one batch, if their examples differ in nothing but values."""
        side1, side2, axes = self.side1, self.side2, self.axes
        if axes is None or side1.calls != side2.calls or set(side1.kwargs) != set(side2.kwargs):
            return None
        if any(side1.kwargs[k] is not side2.kwargs[k] for k in side1.kwargs
               if k not in axes.kwargs_axes):
            return None

        def join(tree1: PyTree, tree2: PyTree, leaf_axes: list[int | None]) -> PyTree | None:
            leaves1, tree = pytree.tree_flatten(tree1)
            leaves2 = pytree.tree_leaves(tree2)
            joined = []
            for a, b, axis in zip(leaves1, leaves2, leaf_axes):
                if axis is None:
                    if a is not b:
                        return None
                    joined.append(a)
                elif a.shape[:axis] + a.shape[axis + 1:] != b.shape[:axis] + b.shape[axis + 1:]:
                    return None
                else:
                    joined.append(torch.cat([a, b], axis))
            return pytree.tree_unflatten(joined, tree)

        x = join(side1.x, side2.x, axes.x_axes)
        mapped = {k: join(side1.kwargs[k], side2.kwargs[k], a) for k, a in axes.kwargs_axes.items()}
        if x is None or any(v is None for v in mapped.values()):
            return None
        n1, n2 = self.batch_sizes()
        shapes = [s[:a] + (n1 + n2,) + s[a + 1:] for s, a in zip(side1.out_shapes, axes.out_axes)]
        return _Side(x, {**side1.kwargs, **mapped}, shapes, side1.calls)

    def parameter_chunks(self) -> Iterator[Params]:
        rows = self.side1.outputs() + (0 if self.same_inputs else self.side2.outputs())
        chunk, size = {}, 0
        for name, p in self.params.items():
            nbytes = rows * p.numel() * p.element_size()
            if chunk and size + nbytes > self.chunk_bytes:
                yield chunk
                chunk, size = {}, 0
            chunk[name], size = p, size + nbytes
        if chunk:
            yield chunk


def _zeros(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def _forward_with_probes(model: nn.Module, params: Params, probes: Params,
                         modules: dict[str, nn.Module], x: PyTree, kwargs: dict[str, Any]
                         ) -> tuple[PyTree, Params]:
    """`model(x, **kwargs)` with `probes[name]` added to the output of module `name`.

    The derivative w.r.t. a probe at zero is the cotangent of that module's
    output. Returns the output and the probed modules' inputs.
    """
    inputs = {}

    def hook(name: str):
        def add_probe(module, args, output):
            inputs[name] = args[0]
            return output + probes[name]
        return add_probe

    handles = [modules[name].register_forward_hook(hook(name)) for name in probes]
    try:
        out = _apply(model, params, x, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out, inputs


def _traced_forward(model: nn.Module, params: Params, x: PyTree, kwargs: dict[str, Any],
                    modules: dict[str, nn.Module], count_flops: bool = False):
    """Output, forward FLOPs, and `{module name: [(input shape, output shape), …]}`.

    Runs without gradients on copies of the buffers (BatchNorm statistics are
    not updated) and restores the random state afterwards.
    """
    calls = collections.defaultdict(list)

    def hook(name: str):
        def record(module, args, output):
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            calls[name].append((None if first is None else tuple(first.shape),
                                tuple(output.shape) if isinstance(output, torch.Tensor) else None))
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
    try:
        with torch.no_grad(), torch.random.fork_rng(_rng_devices(x)), counter:
            out = _apply(model, params, x, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out, counter.get_total_flops() if count_flops else 0, dict(calls)


def _batch_mixing_modules(modules: dict[str, nn.Module], calls) -> list[str]:
    """Names of modules whose output for one example depends on the others (or on RNG)."""
    mixing = []
    for name, module in modules.items():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training or module.running_mean is None:
                mixing.append(name or type(module).__name__)
        elif isinstance(module, (nn.modules.dropout._DropoutNd, StaxDropout)):
            if module.training and module.p > 0:
                mixing.append(name or type(module).__name__)
        elif isinstance(module, StaxLayerNorm):
            ndims = {len(shape) for shape, _ in calls.get(name, ()) if shape is not None}
            if any(a % ndim == 0 for a in module.axis for ndim in ndims):
                mixing.append(name or type(module).__name__)
    return mixing


# Structured derivatives: layers whose output is affine in the weight.

class _AffineRule(abc.ABC):
    r"""A layer computing :math:`y[r, g, j] = s_W \sum_i W[g, j, i]\, a[r, g, i] + s_b\, b[g, j]`
    at rows `r` (positions), in `G` groups of `J/G` outputs.

    Its parameter Jacobian is :math:`∂y[r, g, j]/∂W[g, j, i] = s_W a[r, g, i]`
    and :math:`∂y[r, g, j]/∂b[g, j] = s_b`: the bias is a weight on a constant
    input `s_b`, so `patches` appends that column to the (scaled) inputs of
    the trainable weight, and one contraction covers both parameters.
    Subclasses turn the layer's input into `a` and the cotangent of its output
    into `g`, rows in the same order.
    """

    groups = 1
    #: Order of rows (R), groups (G) and outputs (J) in `cotangents`.
    cotangent_layout = 'RGJ'

    def __init__(self, name: str, module: nn.Module, trainable: Collection[str]):
        prefix = f"{name}." if name else ''
        self.name, self.module = name, module
        self.weight_name, self.bias_name = prefix + 'weight', prefix + 'bias'
        self.trains_weight = self.weight_name in trainable
        self.trains_bias = module.bias is not None and self.bias_name in trainable

    def param_names(self) -> list[str]:
        return ([self.weight_name] if self.trains_weight else []) + \
            ([self.bias_name] if self.trains_bias else [])

    def weight(self, params: Params) -> torch.Tensor:
        return params.get(self.weight_name, self.module.weight)

    def bias(self, params: Params) -> torch.Tensor | None:
        return params.get(self.bias_name, self.module.bias)

    def outputs(self) -> int:
        """Outputs `J/G` per group."""
        return self.module.weight.shape[0] // self.groups

    def columns(self) -> int:
        """Columns of `patches`: the weight's inputs per output, and one for the bias."""
        return self.module.weight[0].numel() * self.trains_weight + self.trains_bias

    def rows(self, output_shape: Sequence[int]) -> int:
        """Rows of one call whose output has `output_shape`."""
        return math.prod(output_shape) // self.module.weight.shape[0]

    #: Axes of the inputs one output sees, at the end of `windows`.
    column_ndim = 1
    #: Whether `patches` holds the rows last in memory.
    rows_last = False

    @abc.abstractmethod
    def windows(self, x: torch.Tensor, n_lead: int) -> torch.Tensor:
        """Inputs `(*lead, *x)` as the inputs each output sees, a view (no copy)
        `(*lead, *rows, G, *columns)` with `column_ndim` column axes."""

    @abc.abstractmethod
    def cotangents(self, g: torch.Tensor, n_lead: int) -> torch.Tensor:
        """Output cotangents `(*lead, *y)` as `(*lead, rows, G, J/G)`, the last
        three axes in the order of `cotangent_layout`."""

    def weight_scale(self) -> float | torch.Tensor:
        return 1.

    def bias_scale(self) -> float | torch.Tensor:
        return 1.

    def patches(self, x: torch.Tensor, n_lead: int) -> torch.Tensor:
        r"""The layer's parameter Jacobian per row: :math:`(s_W a, s_b)`, `(*lead, rows, G, columns)`.

        Written into one new tensor: the windows are copied once, with the
        rows last in memory where `rows_last` (convolutions: the copy then runs
        along the image's rows, not along the few entries of a kernel row,
        about twice as fast; the products take either layout without a copy).
        """
        windows = self.windows(x, n_lead)
        lead, k = windows.shape[:n_lead], self.column_ndim
        rows, window = windows.shape[n_lead:-k - 1], windows.shape[-k:]
        inputs = math.prod(window) * self.trains_weight
        columns = inputs + self.trains_bias
        if self.rows_last:
            patches = windows.new_empty(*lead, self.groups, columns, math.prod(rows))
            patches = patches.movedim(-1, n_lead)
        else:
            patches = windows.new_empty(*lead, math.prod(rows), self.groups, columns)
        if self.trains_weight:
            patches[..., :inputs].unflatten(-1, window).unflatten(n_lead, rows).copy_(windows)
            scale = self.weight_scale()
            if not isinstance(scale, (int, float)) or scale != 1:
                patches[..., :inputs] *= scale
        if self.trains_bias:
            patches[..., inputs] = self.bias_scale()
        return patches


class _LinearRule(_AffineRule):
    """`nn.Linear`: features last, every other axis a position."""

    def windows(self, x, n_lead):
        return x.unsqueeze(-2)

    def cotangents(self, g, n_lead):
        return g.reshape(*g.shape[:n_lead], -1, 1, g.shape[-1])

    def forward(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """The layer's output with `params`."""
        return F.linear(x, self.weight(params), self.bias(params))

    def input_cotangents(self, g: torch.Tensor, weight: torch.Tensor,
                         input_shape: Sequence[int]) -> torch.Tensor:
        """Cotangents `(B, *input_shape)` of the input from those `(B, *y)` of
        the output: `g W`, one matrix product over all rows (oneDNN's where
        `einsum_pair` sends it)."""
        rows = g.reshape(-1, g.shape[-1])
        return einsum_pair('rj,ji->ri', rows, weight).reshape(len(g), *input_shape)


class _StaxRule(_AffineRule):
    """stax `Dense` and `Conv`: scaled as their parameterization says
    (`torchntk.stax.parameterization`)."""

    def weight_scale(self):
        module = self.module
        return module.parameterization.weight_multiplier(module.W_std, module.weight[0].numel())

    def bias_scale(self):
        return self.module.parameterization.bias_multiplier(self.module.b_std)


class _ChannelsRule(_StaxRule):
    """stax `Dense`: channels on axis 1, every other axis a position."""

    def windows(self, x, n_lead):
        return x.movedim(n_lead + 1, -1).unsqueeze(-2)

    def cotangents(self, g, n_lead):
        return g.movedim(n_lead + 1, -1).reshape(*g.shape[:n_lead], -1, 1, g.shape[n_lead + 1])


class _ConvRule(_AffineRule):
    """`nn.Conv1d/2d/3d`, any padding (mode, 'same', 'valid'), stride, dilation
    and groups: the patches of the padded input by strided views."""

    @property
    def groups(self) -> int:
        return self.module.groups

    @property
    def n_spatial(self) -> int:
        return len(self.module.kernel_size)

    @property
    def column_ndim(self) -> int:
        return 1 + self.n_spatial

    def padding_pairs(self) -> list[tuple[int, int]]:
        """`(before, after)` padding per spatial axis."""
        m = self.module
        if m.padding == 'valid':
            return [(0, 0)] * self.n_spatial
        if m.padding == 'same':
            totals = [dilation * (k - 1) for k, dilation in zip(m.kernel_size, m.dilation)]
            return [(total // 2, total - total // 2) for total in totals]
        return [(p, p) for p in m.padding]

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, C, *S)` inputs padded as the layer pads them."""
        m = self.module
        flat = [p for pair in reversed(self.padding_pairs()) for p in pair]  # last axis first
        if not any(flat):
            return x
        mode = 'constant' if m.padding_mode == 'zeros' else m.padding_mode
        return F.pad(x, flat, mode=mode)

    def geometry(self) -> tuple[Sequence[int], Sequence[int], Sequence[int]]:
        """Kernel size, stride and dilation per spatial axis."""
        return self.module.kernel_size, self.module.stride, self.module.dilation

    def zero_padding(self) -> tuple[int, ...] | None:
        """The layer's padding per spatial axis if it pads both sides with as many zeros."""
        pairs = self.padding_pairs()
        if self.module.padding_mode != 'zeros' or any(a != b for a, b in pairs):
            return None
        return tuple(a for a, _ in pairs)

    def forward(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """The layer's output with `params`; for zero padding (`zero_padding`)."""
        m = self.module
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.n_spatial - 1]
        return conv(x, self.weight(params), self.bias(params), m.stride, m.padding, m.dilation,
                     m.groups)

    def input_cotangents(self, g: torch.Tensor, weight: torch.Tensor,
                         input_shape: Sequence[int]) -> torch.Tensor:
        """Cotangents `(B, *input_shape)` of the input from those `(B, *y)` of
        the output (a transposed convolution); for zero padding (`zero_padding`)."""
        m = self.module
        conv_input = (torch.nn.grad.conv1d_input, torch.nn.grad.conv2d_input,
                      torch.nn.grad.conv3d_input)[self.n_spatial - 1]
        return conv_input((len(g), *input_shape), weight, g, m.stride, self.zero_padding(),
                          m.dilation, m.groups)

    def windows(self, x, n_lead):
        lead, n = x.shape[:n_lead], self.n_spatial
        x = self.padded(x.reshape(-1, *x.shape[-n - 1:]))             # (B, C, *S)
        kernel_size, stride, dilation = self.geometry()
        for d, k in enumerate(kernel_size):
            span = dilation[d] * (k - 1) + 1
            x = x.unfold(2 + d, span, stride[d])[..., ::dilation[d]]  # window axis appended
        x = x.permute(0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))  # (B, *S_out, C, *k)
        return x.unflatten(0, (*lead, -1)).unflatten(n_lead + 1 + n, (self.groups, -1))

    # Channels before positions, as the layer's output is laid out.
    cotangent_layout = 'GJR'
    rows_last = True

    def cotangents(self, g, n_lead):
        n, channels = self.n_spatial, self.module.weight.shape[0]
        g = g.reshape(*g.shape[:n_lead], -1, self.groups, channels // self.groups,
                      math.prod(g.shape[-n:]))                         # (*lead, M, G, J/G, P)
        return g.movedim(n_lead, -2).flatten(-2)                       # (*lead, G, J/G, M·P)


class _StaxConvRule(_StaxRule, _ConvRule):
    """stax `Conv`: its own padding ('VALID', 'SAME', 'CIRCULAR'), no dilation or groups."""

    groups = 1

    @property
    def n_spatial(self) -> int:
        return len(self.module.filter_shape)

    def padded(self, x):
        m = self.module
        return pad_input(x, m.filter_shape, m.strides, m.padding)

    def geometry(self):
        return self.module.filter_shape, self.module.strides, (1,) * self.n_spatial


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


#: Elementwise activations without parameters (`_Problem.chain`).
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh,
                nn.Hardsigmoid, nn.Hardswish, nn.LogSigmoid, nn.Tanhshrink)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def _with_derivative(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`σ(x)` and `σ'(x)` of an elementwise `layer`, the latter as the gradient
    of `Σ σ(x)` (itself differentiable where a gradient flows through `x`)."""
    create_graph = torch.is_grad_enabled() and x.requires_grad
    with torch.enable_grad():
        x = x if create_graph else x.detach().requires_grad_()
        y = layer(x)
        derivative = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=create_graph)[0]
    return (y if create_graph else y.detach()), derivative


def _global_hooks() -> bool:
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks
                or m._global_backward_hooks or m._global_backward_pre_hooks)


def _rule_for(name: str, module: nn.Module, trainable: Collection[str]) -> _AffineRule | None:
    """The structured rule of `module`, if its forward is one we know exactly.

    Forward hooks may change the output the rule knows, so modules with any
    (their own or global ones) get none.
    """
    if module._forward_hooks or nn.modules.module._global_forward_hooks:
        return None
    kind = type(module)
    if kind is StaxDense:
        return _ChannelsRule(name, module, trainable)
    if kind is StaxConv:
        return _StaxConvRule(name, module, trainable)
    if isinstance(module, nn.Linear) and kind.forward is nn.Linear.forward:
        return _LinearRule(name, module, trainable)
    if isinstance(module, _CONVS) and kind.forward in (c.forward for c in _CONVS):
        return _ConvRule(name, module, trainable)
    return None


# The three implementations; each returns one kernel per output tensor.

def _jacobian_contraction(problem: _Problem) -> list[torch.Tensor]:
    kernels = [None] * len(problem.specs)
    for chunk in problem.parameter_chunks():
        (j1, _, _), (j2, _, _) = problem.both_jacobians(chunk, {})
        for leaf, spec in enumerate(problem.specs):
            for name, p in chunk.items():
                kernels[leaf] = _accumulate(kernels[leaf], spec.contract(
                    j1[leaf][name], j2[leaf][name], n_param_dims=p.ndim))
    return [spec.normalized(kernel, shape) for spec, kernel, shape
            in zip(problem.specs, kernels, problem.side1.out_shapes)]


def _ntk_vector_products(problem: _Problem) -> list[torch.Tensor]:
    try:
        full = _full_ntks_by_vector_products(problem)
    except NotImplementedError as error:
        if 'forward AD' not in str(error):
            raise
        raise _Unsupported("empirical_ntk_fn: implementation='ntk_vector_products' needs "
                           f"forward-mode AD, which an operation of the model lacks ({error}); "
                           "use implementation='jacobian_contraction'") from error
    except RuntimeError as error:
        if 'random' not in str(error):
            raise
        raise _Unsupported("empirical_ntk_fn: implementation='ntk_vector_products' needs a "
                           "deterministic model (random layers such as dropout in training mode "
                           "draw new values in every product); call model.eval() or use "
                           "implementation='jacobian_contraction'") from error
    return [spec.contract_full(kernel) for spec, kernel in zip(problem.specs, full)]


def _full_ntks_by_vector_products(problem: _Problem) -> list[torch.Tensor]:
    """The full NTK `(*out1, *out2)` of every output tensor, as `J1 (J2ᵀ v)` for
    every basis cotangent `v` of one call on `x2` (one example with `vmap_axes`)."""
    model, params, side1, side2 = problem.model, problem.params, problem.side1, problem.side2

    def call(p: Params, x: PyTree, kwargs: dict[str, Any]):
        return tuple(pytree.tree_leaves(_apply(model, p, x, kwargs))), {}

    def outputs1(p: Params) -> tuple[torch.Tensor, ...]:
        return call(p, side1.x, side1.kwargs)[0]

    def columns(leaf: int, call2: Callable, *inputs2) -> torch.Tensor:
        """`(|out2 of one call|, *out1)` for output tensor `leaf`."""
        out2, vjp_fn, _ = vjp(lambda p: call2(p, *inputs2), params, has_aux=True)
        n_out = out2[leaf].numel()
        basis = torch.eye(n_out, dtype=out2[leaf].dtype, device=out2[leaf].device)

        def column(cotangent: torch.Tensor) -> torch.Tensor:
            cotangents = tuple(cotangent.reshape(o.shape) if i == leaf else torch.zeros_like(o)
                               for i, o in enumerate(out2))
            (tangent,) = vjp_fn(cotangents)
            return jvp(outputs1, (params,), (tangent,))[1][leaf]

        return vmap(column)(basis)

    kernels = []
    for leaf, (shape1, shape2) in enumerate(zip(side1.out_shapes, side2.out_shapes)):
        if problem.axes is None:
            cols = columns(leaf, call, side2.x, side2.kwargs).reshape(*shape2, *shape1)
            kernels.append(cols.movedim(tuple(range(len(shape2))),
                                        tuple(range(len(shape1), len(shape1) + len(shape2)))))
            continue
        axis = problem.axes.out_axes[leaf]
        example = problem.axes.per_example(call, side2.kwargs)
        n_out = math.prod(shape2) // shape2[axis]
        param_bytes = sum(p.numel() * p.element_size() for p in params.values())
        chunk = max(1, problem.chunk_bytes // max(1, 4 * n_out * param_bytes))
        cols = vmap(functools.partial(columns, leaf, example), in_dims=problem.axes.in_dims(),
                    chunk_size=chunk)(side2.x, problem.axes.mapped(side2.kwargs))
        example_shape = shape2[:axis] + shape2[axis + 1:]
        cols = cols.reshape(shape2[axis], *example_shape, *shape1)    # (N2, *rest2, *out1)
        n1, n2 = len(shape1), len(shape2)
        cols = cols.movedim(tuple(range(n2)), tuple(range(n1, n1 + n2)))
        kernels.append(cols.movedim(n1, n1 + axis))
    return kernels


def _structured_derivatives(problem: _Problem) -> list[torch.Tensor]:
    rules = problem.rules
    structured = {n for rule in rules.values() for n in rule.param_names()}
    other = {n: p for n, p in problem.params.items() if n not in structured}
    side1, side2 = problem.both_jacobians(other, rules)
    n_lead = 0 if problem.axes is None else 1
    sides = (side1,) if problem.same_inputs else (side1, side2)
    patches = {name: [rule.patches(side[2][name], n_lead) for side in sides]
               for name, rule in rules.items()}
    kernels = []
    for leaf, spec in enumerate(problem.specs):
        kernel = None
        for n, p in other.items():
            kernel = _accumulate(kernel, spec.contract(side1[0][leaf][n], side2[0][leaf][n],
                                                       n_param_dims=p.ndim))
        for name, rule in rules.items():
            (a1, a2), g = (patches[name][0], patches[name][-1]), [side[1][leaf][name]
                                                                  for side in sides]
            if all(problem.is_output_identity(leaf, rule, cotangents) for cotangents in g):
                letters, result, operands = problem.output_layer_operands(leaf, a1, a2)
            else:
                g1, g2 = (rule.cotangents(cotangents, spec.ndim) for cotangents in (g[0], g[-1]))
                letters, result, _ = problem.structured_operands(leaf, rule)
                operands = (g1, a1, g2, a2)
            kernel = _einsum(letters, result, operands, problem.max_entries(), into=kernel)
        kernels.append(spec.normalized(kernel, problem.side1.out_shapes[leaf]))
    return kernels


def _accumulate(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    """`total + term`, in place in `total` (a result of ours) after the first term."""
    return term if total is None else total.add_(term)


_COMPUTE = {'jacobian_contraction': _jacobian_contraction,
            'ntk_vector_products': _ntk_vector_products,
            'structured_derivatives': _structured_derivatives}


# Contractions.

def _contraction_order(terms: Sequence[str], result: str, sizes: Mapping[str, int],
                       max_size: float = math.inf) -> tuple[int, Any]:
    """The cheapest order of pairwise contractions for `einsum(terms -> result)`
    (`_search_contraction_order`), remembered across calls: the search costs
    milliseconds, as much as a small model's whole kernel."""
    return _search_contraction_order(tuple(terms), result, tuple(sizes.items()), max_size)


@functools.lru_cache(maxsize=4096)
def _search_contraction_order(terms: tuple[str, ...], result: str,
                              size_items: tuple[tuple[str, int], ...],
                              max_size: float) -> tuple[int, Any]:
    """The cheapest order of pairwise contractions for `einsum(terms -> result)`.

    Exhaustive over binary trees (a handful of operands); orders whose
    intermediate results stay within `max_size` entries come first, as
    opt_einsum's `memory_limit`. Returns the multiply-adds and the plan: an
    operand index, or `(plan, plan, letters)` for the contraction of two
    intermediate results into `letters` (the letters of `result` in another
    order at the root).
    """
    sizes = dict(size_items)
    everything = frozenset(range(len(terms)))

    @functools.cache
    def best(subset: frozenset) -> tuple[tuple[bool, int], Any, str]:
        """`((too large, multiply-adds), plan, letters)` of the best order for `subset`."""
        if len(subset) == 1:
            i = next(iter(subset))
            return (False, 0), i, terms[i]
        needed = set(result).union(*(terms[i] for i in everything - subset))
        first, rest = min(subset), sorted(subset - {min(subset)})
        options = []
        for mask in range(2**len(rest) - 1):   # the part holding `first` misses some of `rest`
            left = frozenset([first, *(i for b, i in enumerate(rest) if mask >> b & 1)])
            ((large1, cost1), plan1, letters1), ((large2, cost2), plan2, letters2) = \
                best(left), best(subset - left)
            # torch.einsum's own layout of a product (shared, left-only, right-only
            # kept axes): a result in it is not copied, and symmetric pairs agree.
            # A broadcast product (nothing summed) keeps the larger factor's layout.
            if all(sizes[c] == 1 for c in set(letters1) | set(letters2) if c not in needed):
                big, small = sorted((letters1, letters2),
                                    key=lambda term: -math.prod(sizes[c] for c in term))
                letters = ''.join(c for c in dict.fromkeys(big + small) if c in needed)
            else:
                letters = ''.join(
                    [c for c in letters1 if c in letters2 and c in needed]
                    + [c for c in letters1 if c not in letters2 and c in needed]
                    + [c for c in letters2 if c not in letters1 and c in needed])
            cost = cost1 + cost2 + math.prod(sizes[c] for c in set(letters1) | set(letters2))
            large = large1 or large2 or (subset != everything
                                         and math.prod(sizes[c] for c in letters) > max_size)
            options.append(((large, cost), (plan1, plan2, letters), letters))
        return min(options, key=lambda option: option[0])

    (_, cost), plan, _ = best(everything)
    return cost, plan


def _einsum(terms: Sequence[str], result: str, tensors: Sequence[torch.Tensor],
            max_size: float = math.inf, into: torch.Tensor | None = None) -> torch.Tensor:
    """`torch.einsum` of several operands, pairwise in the cheapest order
    (intermediate results of at most `max_size` entries where possible); with
    `into` (a result of ours), added to it in place, the last product fused
    with the addition where it sums nothing (`addcmul_`).

    A pair met twice (the same tensors, the same contraction up to the names
    of the letters, as both sides of a kernel with `x2=None`) is computed once.
    """
    sizes = {c: n for term, t in zip(terms, tensors) for c, n in zip(term, t.shape)}
    plan, done = _contraction_order(terms, result, sizes, max_size)[1], {}
    if isinstance(plan, int):
        out = tensors[plan].permute([terms[plan].index(c) for c in result])
        return out.clone() if into is None else into.add_(out)
    (left, left_letters), (right, right_letters) = (_run_plan(part, terms, tensors, done)
                                                    for part in plan[:2])
    if any(sizes[c] != 1 for c in left_letters + right_letters if c not in result):
        out = einsum_pair(f"{left_letters},{right_letters}->{result}", left, right)
        return out if into is None else into.add_(out)
    # The last product sums nothing: a broadcast multiplication, fused with the
    # addition, or done in place in a product of ours holding the whole result.
    left, right = _aligned(left, left_letters, result), _aligned(right, right_letters, result)
    if into is not None:
        return into.addcmul_(left, right)
    if not (torch.is_grad_enabled() and (left.requires_grad or right.requires_grad)):
        for own, other, part in ((left, right, plan[0]), (right, left, plan[1])):
            if (not isinstance(part, int) and own.shape == torch.Size(sizes[c] for c in result)
                    and own.untyped_storage().data_ptr() != other.untyped_storage().data_ptr()):
                return own.mul_(other)
    return left * right


def _run_plan(plan, terms: Sequence[str], tensors: Sequence[torch.Tensor],
              done: dict) -> tuple[torch.Tensor, str]:
    """The result of `plan` (`_search_contraction_order`) and its letters; the
    products made are kept in `done` by operands and contraction."""
    if isinstance(plan, int):
        return tensors[plan], terms[plan]
    (left, left_letters), (right, right_letters) = (_run_plan(part, terms, tensors, done)
                                                    for part in plan[:2])
    spec = f"{left_letters},{right_letters}->{plan[2]}"
    names = {c: string.ascii_letters[i]
             for i, c in enumerate(c for c in dict.fromkeys(spec) if c.isalpha())}
    key = (id(left), id(right), ''.join(names.get(c, c) for c in spec))
    if key not in done:
        done[key] = einsum_pair(spec, left, right)
    return done[key], plan[2]


def _aligned(t: torch.Tensor, letters: str, result: str) -> torch.Tensor:
    """`t` (axes named by `letters`; those not in `result` of size 1) as a view
    broadcasting to `result`'s axes."""
    t = t[tuple(slice(None) if c in result else 0 for c in letters)]
    kept = [c for c in letters if c in result]
    t = t.permute([kept.index(c) for c in result if c in kept])
    return t[tuple(slice(None) if c in kept else None for c in result)]


class _OutputContraction:
    """The einsum that turns two output-shaped tensors into a kernel.

    Output axis `i` gets letter `a_i` on side 1 and `b_i` on side 2; a traced
    or diagonal axis uses one letter on both sides (summed, or kept once).
    Output axes take upper-case letters, and lower-case ones from the end of
    the alphabet name the other axes (parameters, rows, groups, columns):
    `torch.einsum` orders summed axes by letter, so summed output axes come
    before the parameter axes that follow them in memory, and a Jacobian
    `(*out, *θ)` is contracted without being copied.
    """

    def __init__(self, out_ndim: int, trace_axes: Sequence[int], diagonal_axes: Sequence[int],
                 caller: str):
        for name, axes in (('trace_axes', trace_axes), ('diagonal_axes', diagonal_axes)):
            if any(not -out_ndim <= a < out_ndim for a in axes):
                raise ValueError(f"{caller}: {name} {tuple(axes)} are out of range for outputs "
                                 f"with {out_ndim} axes")
        trace = {a % out_ndim for a in trace_axes}
        diagonal = {a % out_ndim for a in diagonal_axes}
        if trace & diagonal:
            raise ValueError(f"{caller}: trace_axes {tuple(trace_axes)} and diagonal_axes "
                             f"{tuple(diagonal_axes)} must not overlap")
        self.ndim = out_ndim
        letters = iter(string.ascii_uppercase + string.ascii_lowercase[:10])
        self.side1, self.side2, self.result = '', '', ''
        for axis in range(out_ndim):
            a = next(letters)
            b = a if axis in trace | diagonal else next(letters)
            self.side1 += a
            self.side2 += b
            if axis in diagonal:
                self.result += a
            elif axis not in trace:
                self.result += a + b
        self.trace = sorted(trace)

    def paired_axes(self) -> list[int]:
        """Traced and diagonal axes: the two outputs must agree in size on them."""
        return [i for i, (a, b) in enumerate(zip(self.side1, self.side2)) if a == b]

    def normalized(self, kernel: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor:
        """`kernel` divided by the size of the traced axes of `out_shape`."""
        divisor = math.prod(out_shape[a] for a in self.trace)
        return kernel if divisor == 1 else kernel / divisor

    def contract(self, t1: torch.Tensor, t2: torch.Tensor, n_param_dims: int) -> torch.Tensor:
        """Contract `(*out1, *P)` with `(*out2, *P)` over `P` and the traced axes
        (summed, not yet `normalized`)."""
        params = string.ascii_lowercase[26 - n_param_dims:]
        spec = f"{self.side1}{params},{self.side2}{params}->{self.result}"
        return einsum_pair(spec, t1, t2)

    def multiply_adds(self, shape1: Sequence[int], shape2: Sequence[int]) -> int:
        """Entries of the result times entries of the traced axes."""
        paired = self.paired_axes()
        return math.prod(shape1[i] if i in paired else shape1[i] * shape2[i]
                         for i in range(self.ndim))

    def affine_terms(self, shapes: Sequence[tuple[Sequence[int], int]], groups: int,
                     columns: int, outputs: int, cotangent_layout: str, batch_axis: int | None
                     ) -> tuple[list[str], str, dict[str, int]]:
        r"""Einsum terms, result and letter sizes of a structured layer's contribution

        .. math:: \sum_{r, s, g} (a_1[r, g]·a_2[s, g])\,(g_1[…, r, g]·g_2[…, s, g])

        from `g1 (*out1, R, G, J)`, `a1 ([N1], R, G, I)`, `g2 (*out2, S, G, J)`,
        `a2 ([N2], S, G, I)` (the cotangents' last three axes in the order of
        `cotangent_layout`, e.g. `'RGJ'`); `shapes` holds `(output shape,
        rows R)` of each side. With a `batch_axis`, `a` holds the rows of one
        example's call per example of that output axis.
        """
        (out1, rows1), (out2, rows2) = shapes
        batch1, batch2 = ('', '') if batch_axis is None else \
            (self.side1[batch_axis], self.side2[batch_axis])
        g1, g2 = (cotangent_layout.replace('R', rows).replace('G', 'y').replace('J', 'w')
                  for rows in ('z', 'v'))
        terms = [self.side1 + g1, f"{batch1}zyx", self.side2 + g2, f"{batch2}vyx"]
        sizes = {**dict(zip(self.side1, out1)), **dict(zip(self.side2, out2)),
                 'z': rows1, 'v': rows2, 'y': groups, 'x': columns, 'w': outputs}
        return terms, self.result, sizes

    def contract_full(self, full: torch.Tensor) -> torch.Tensor:
        """Apply the traces and diagonals to a full `(*out1, *out2)` kernel."""
        return self.normalized(torch.einsum(f"{self.side1}{self.side2}->{self.result}", full),
                               full.shape)
