"""The three implementations of the empirical NTK; each returns one kernel per output tensor."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
from torch.func import jvp, vjp, vmap
from torch.utils import _pytree as pytree  # torch.func's own pytrees

from .contraction import cheapest_einsum
from .model import Params, PyTree, apply_model
from .problem import _Problem


class Unsupported(ValueError):
    """An implementation cannot handle this model ('auto' then tries the next cheapest)."""


# The three implementations; each returns one kernel per output tensor.

def _jacobian_contraction(problem: _Problem) -> list[torch.Tensor]:
    kernels = [None] * len(problem.specs)
    for chunk in problem.parameter_chunks():
        (j1, _, _), (j2, _, _) = problem.both_jacobians(chunk, {})
        for leaf, spec in enumerate(problem.specs):
            for name, p in chunk.items():
                kernels[leaf] = accumulate(kernels[leaf], spec.contract(
                    j1[leaf][name], j2[leaf][name], n_param_dims=p.ndim))
    return [spec.normalized(kernel, shape) for spec, kernel, shape
            in zip(problem.specs, kernels, problem.side1.out_shapes)]


def _ntk_vector_products(problem: _Problem) -> list[torch.Tensor]:
    try:
        full = _full_ntks_by_vector_products(problem)
    except NotImplementedError as error:
        if 'forward AD' not in str(error):
            raise
        raise Unsupported("empirical_ntk_fn: implementation='ntk_vector_products' needs "
                           f"forward-mode AD, which an operation of the model lacks ({error}); "
                           "use implementation='jacobian_contraction'") from error
    except RuntimeError as error:
        if 'random' not in str(error):
            raise
        raise Unsupported("empirical_ntk_fn: implementation='ntk_vector_products' needs a "
                           "deterministic model (random layers such as dropout in training mode "
                           "draw new values in every product); call model.eval() or use "
                           "implementation='jacobian_contraction'") from error
    return [spec.contract_full(kernel) for spec, kernel in zip(problem.specs, full)]


def _full_ntks_by_vector_products(problem: _Problem) -> list[torch.Tensor]:
    """The full NTK `(*out1, *out2)` of every output tensor, as `J1 (J2ᵀ v)` for
    every basis cotangent `v` of one call on `x2` (one example with `vmap_axes`)."""
    model, params, side1, side2 = problem.model, problem.params, problem.side1, problem.side2

    def call(p: Params, x: PyTree, kwargs: dict[str, Any]):
        return tuple(pytree.tree_leaves(apply_model(model, p, x, kwargs))), {}

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
            kernel = accumulate(kernel, spec.contract(side1[0][leaf][n], side2[0][leaf][n],
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
            kernel = cheapest_einsum(letters, result, operands, problem.max_entries(), into=kernel)
        kernels.append(spec.normalized(kernel, problem.side1.out_shapes[leaf]))
    return kernels


def accumulate(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    """`total + term`, in place in `total` (a result of ours) after the first term."""
    return term if total is None else total.add_(term)


COMPUTE = {'jacobian_contraction': _jacobian_contraction,
            'ntk_vector_products': _ntk_vector_products,
            'structured_derivatives': _structured_derivatives}
