"""The three implementations of the empirical NTK ("Fast Finite Width Neural
Tangent Kernel", Novak, Sohl-Dickstein and Schoenholz, 2022); each returns
one kernel per output tensor."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterator

import torch
from torch.func import jvp, vjp, vmap
from torch.utils import _pytree as pytree  # torch.func's own pytrees

from . import structured
from .contraction import cheapest_einsum
from .jacobians import both_jacobians
from .model import Params, PyTree, apply_model, draws_random_numbers
from .task import NtkTask


class Unsupported(ValueError):
    """An implementation cannot handle this model ('auto' then tries the next cheapest)."""


def _jacobian_contraction(task: NtkTask) -> list[torch.Tensor]:
    kernels = [None] * len(task.contractions)
    for chunk in _parameter_chunks(task):
        (j1, _, _), (j2, _, _) = both_jacobians(task, chunk, {})
        for output, contraction in enumerate(task.contractions):
            for name, p in chunk.items():
                kernels[output] = _accumulate(kernels[output], contraction.contract(
                    j1[output][name], j2[output][name], n_param_dims=p.ndim))
    return [contraction.normalized(kernel, shape) for contraction, kernel, shape
            in zip(task.contractions, kernels, task.batch1.out_shapes)]


def _parameter_chunks(task: NtkTask) -> Iterator[Params]:
    """The parameters in chunks whose Jacobians on both inputs fit in `chunk_bytes`."""
    rows = task.batch1.outputs() + (0 if task.same_inputs else task.batch2.outputs())
    chunk, size = {}, 0
    for name, p in task.params.items():
        nbytes = rows * p.numel() * p.element_size()
        if chunk and size + nbytes > task.chunk_bytes:
            yield chunk
            chunk, size = {}, 0
        chunk[name], size = p, size + nbytes
    if chunk:
        yield chunk


def _ntk_vector_products(task: NtkTask) -> list[torch.Tensor]:
    try:
        full = _full_ntks_by_vector_products(task)
    except RuntimeError as error:
        # vmap refuses random operations; whether the model draws any is asked
        # of its forward pass, not read from the error's text.
        if not draws_random_numbers(task.model, task.params, task.batch1.x, task.batch1.kwargs):
            raise
        raise Unsupported("empirical_ntk_fn: implementation='ntk_vector_products' needs a "
                          "deterministic model (random layers such as dropout in training mode "
                          "draw new values in every product); call model.eval() or use "
                          "implementation='jacobian_contraction'") from error
    return [contraction.contract_full(kernel)
            for contraction, kernel in zip(task.contractions, full)]


def _full_ntks_by_vector_products(task: NtkTask) -> list[torch.Tensor]:
    """The full NTK `(*out1, *out2)` of every output tensor, as `J1 (J2ᵀ v)` for
    every basis cotangent `v` of one call on `x2` (one example with `vmap_axes`)."""
    model, params, batch1, batch2 = task.model, task.params, task.batch1, task.batch2

    def call(p: Params, x: PyTree, kwargs: dict[str, Any]):
        return tuple(pytree.tree_leaves(apply_model(model, p, x, kwargs))), {}

    def outputs1(p: Params) -> tuple[torch.Tensor, ...]:
        return call(p, batch1.x, batch1.kwargs)[0]

    def columns(output: int, call2: Callable, *inputs2) -> torch.Tensor:
        """`(|out2 of one call|, *out1)` for output tensor `output`."""
        out2, vjp_fn, _ = vjp(lambda p: call2(p, *inputs2), params, has_aux=True)
        n_out = out2[output].numel()
        basis = torch.eye(n_out, dtype=out2[output].dtype, device=out2[output].device)

        def column(cotangent: torch.Tensor) -> torch.Tensor:
            cotangents = tuple(cotangent.reshape(o.shape) if i == output else torch.zeros_like(o)
                               for i, o in enumerate(out2))
            (tangent,) = vjp_fn(cotangents)
            try:
                return jvp(outputs1, (params,), (tangent,))[1][output]
            except NotImplementedError as error:
                # The model's forward ran in the analysis and in vjp: what an
                # operation lacks here is its forward-mode derivative.
                raise Unsupported("empirical_ntk_fn: implementation='ntk_vector_products' "
                                  "needs forward-mode AD, which an operation of the model lacks "
                                  f"({error}); use implementation='jacobian_contraction'"
                                  ) from error

        return vmap(column)(basis)

    kernels = []
    for output, (shape1, shape2) in enumerate(zip(batch1.out_shapes, batch2.out_shapes)):
        if task.axes is None:
            cols = columns(output, call, batch2.x, batch2.kwargs).reshape(*shape2, *shape1)
            kernels.append(cols.movedim(tuple(range(len(shape2))),
                                        tuple(range(len(shape1), len(shape1) + len(shape2)))))
            continue
        axis = task.axes.out_axes[output]
        example = task.axes.per_example(call, batch2.kwargs)
        n_out = math.prod(shape2) // shape2[axis]
        param_bytes = sum(p.numel() * p.element_size() for p in params.values())
        chunk = max(1, task.chunk_bytes // max(1, 4 * n_out * param_bytes))
        cols = vmap(functools.partial(columns, output, example), in_dims=task.axes.in_dims(),
                    chunk_size=chunk)(batch2.x, task.axes.mapped(batch2.kwargs))
        example_shape = shape2[:axis] + shape2[axis + 1:]
        cols = cols.reshape(shape2[axis], *example_shape, *shape1)    # (N2, *rest2, *out1)
        n1, n2 = len(shape1), len(shape2)
        cols = cols.movedim(tuple(range(n2)), tuple(range(n1, n1 + n2)))
        kernels.append(cols.movedim(n1, n1 + axis))
    return kernels


def _structured_derivatives(task: NtkTask) -> list[torch.Tensor]:
    rules = task.structured_layers
    by_rules = {n for rule in rules.values() for n in rule.param_names()}
    other = {n: p for n, p in task.params.items() if n not in by_rules}
    derivatives1, derivatives2 = both_jacobians(task, other, rules)
    n_lead = 0 if task.axes is None else 1
    inputs = (derivatives1,) if task.same_inputs else (derivatives1, derivatives2)
    patches = {name: [rule.patches(d[2][name], n_lead) for d in inputs]
               for name, rule in rules.items()}
    kernels = []
    for output, contraction in enumerate(task.contractions):
        kernel = None
        for n, p in other.items():
            kernel = _accumulate(kernel, contraction.contract(
                derivatives1[0][output][n], derivatives2[0][output][n], n_param_dims=p.ndim))
        for name, rule in rules.items():
            (a1, a2), g = (patches[name][0], patches[name][-1]), [d[1][output][name]
                                                                  for d in inputs]
            if all(structured.is_identity_head(task, output, rule, cotangents)
                   for cotangents in g):
                letters, result, operands = structured.linear_head_operands(task, output, a1, a2)
            else:
                g1, g2 = (rule.cotangents(cotangents, contraction.ndim)
                          for cotangents in (g[0], g[-1]))
                letters, result, _ = structured.affine_operands(task, output, rule)
                operands = (g1, a1, g2, a2)
            kernel = cheapest_einsum(letters, result, operands, task.max_entries(), into=kernel)
        kernels.append(contraction.normalized(kernel, task.batch1.out_shapes[output]))
    return kernels


def _accumulate(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    """`total + term`, in place in `total` (a result of ours) after the first term."""
    return term if total is None else total.add_(term)


_BY_NAME = {'jacobian_contraction': _jacobian_contraction,
            'ntk_vector_products': _ntk_vector_products,
            'structured_derivatives': _structured_derivatives}
#: The implementations' names.
IMPLEMENTATIONS = tuple(_BY_NAME)


def compute_ntk(task: NtkTask, implementation: str) -> list[torch.Tensor]:
    """The kernels of `task`, one per output tensor, by `implementation`; an
    `Unsupported` where it cannot handle the model."""
    return _BY_NAME[implementation](task)
