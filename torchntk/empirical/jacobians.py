"""Jacobians of the model's outputs in parameters and in the outputs of
structured layers, on one batch or on both inputs of a kernel."""

from __future__ import annotations

from typing import Any

import torch
from torch.func import jacrev, vmap
from torch.utils import _pytree as pytree  # torch.func's own pytrees

from .analysis import Batch
from .layer_stack import StackLayer, layer_stack, stack_cotangents
from .model import Params, PyTree, forward_with_probes, zeros
from .structured import AffineRule
from .task import NtkTask

#: Per output tensor `{name: (*out, *θ)}`, per output tensor `{layer: (*out, *y)}`,
#: and the layers' inputs `{layer: a}` (`jacobians`).
Derivatives = tuple[list[Params], list[Params], Params]


def jacobians(task: NtkTask, batch: Batch, wrt: Params, rules: dict[str, AffineRule],
              stack: list[StackLayer] | None = None) -> Derivatives:
    """Jacobians of the outputs on `batch` w.r.t. `wrt` and the outputs of `rules`' layers.

    Returns, per output tensor, `{name: (*out, *θ)}` and `{layer: (*out, *y)}`
    (`y` the layer's output in one call of the model: one example's call
    with `vmap_axes`), and the layers' inputs `{layer: a}`, `a` of shape
    `(N, *a)` with `vmap_axes` (one call per example), else as seen. A model
    that is a layer `stack` gets the cotangents of `rules` (without `wrt`) by
    the sequential backward pass.
    """
    if stack is not None and not wrt and rules:
        return stack_cotangents(stack, task.params, batch, rules)
    fixed = {n: p for n, p in task.params.items() if n not in wrt}

    def f(wrt: Params, probes: Params, x: PyTree, kwargs: dict[str, Any]):
        out, inputs = forward_with_probes(task.model, {**fixed, **wrt}, probes, task.modules, x,
                                          kwargs)
        return tuple(pytree.tree_leaves(out)), inputs

    probes = {name: zeros(batch.calls[name][0][1], rule.weight(task.params))
              for name, rule in rules.items()}
    axes = task.axes
    if axes is None:
        jac, inputs = jacrev(f, argnums=(0, 1), has_aux=True)(wrt, probes, batch.x, batch.kwargs)
    else:
        example = axes.per_example(f, batch.kwargs)
        jac, inputs = vmap(jacrev(example, argnums=(0, 1), has_aux=True),
                           in_dims=(None, None, *axes.in_dims()))(
            wrt, probes, batch.x, axes.mapped(batch.kwargs))
        # vmap puts the examples first; move them to the outputs' batch axes.
        jac = [pytree.tree_map(lambda t: t.movedim(0, axis), j)
               for j, axis in zip(jac, axes.out_axes)]
    return [j[0] for j in jac], [j[1] for j in jac], inputs


def both_jacobians(task: NtkTask, wrt: Params, rules: dict[str, AffineRule]
                   ) -> tuple[Derivatives, Derivatives]:
    """`jacobians` on both inputs; one call on `x1` and `x2` joined along
    the batch axes where that is the same computation (bigger products,
    half the per-call overhead)."""
    stack = layer_stack(task) if rules and not wrt else None
    if task.same_inputs:
        derivatives = jacobians(task, task.batch1, wrt, rules, stack)
        return derivatives, derivatives
    joined = _joined_batch(task)
    if joined is None:
        return (jacobians(task, task.batch1, wrt, rules, stack),
                jacobians(task, task.batch2, wrt, rules, stack))
    d_params, d_probes, inputs = jacobians(task, joined, wrt, rules, stack)
    n1, n2 = task.batch_sizes()

    def examples(start: int, length: int) -> Derivatives:
        def cut(per_output: list[Params]) -> list[Params]:
            return [{name: t.narrow(axis, start, length) for name, t in d.items()}
                    for d, axis in zip(per_output, task.axes.out_axes)]
        return (cut(d_params), cut(d_probes),
                {name: a.narrow(0, start, length) for name, a in inputs.items()})

    return examples(0, n1), examples(n1, n2)


def _joined_batch(task: NtkTask) -> Batch | None:
    """`x1` and `x2` as one batch, if their examples differ in nothing but values."""
    batch1, batch2, axes = task.batch1, task.batch2, task.axes
    if axes is None or batch1.calls != batch2.calls or set(batch1.kwargs) != set(batch2.kwargs):
        return None
    if any(batch1.kwargs[k] is not batch2.kwargs[k] for k in batch1.kwargs
           if k not in axes.kwargs_axes):
        return None

    def join(tree1: PyTree, tree2: PyTree, tensor_axes: list[int | None]) -> PyTree | None:
        tensors1, tree = pytree.tree_flatten(tree1)
        tensors2 = pytree.tree_leaves(tree2)
        joined = []
        for a, b, axis in zip(tensors1, tensors2, tensor_axes):
            if axis is None:
                if a is not b:
                    return None
                joined.append(a)
            elif a.shape[:axis] + a.shape[axis + 1:] != b.shape[:axis] + b.shape[axis + 1:]:
                return None
            else:
                joined.append(torch.cat([a, b], axis))
        return pytree.tree_unflatten(joined, tree)

    x = join(batch1.x, batch2.x, axes.x_axes)
    mapped = {k: join(batch1.kwargs[k], batch2.kwargs[k], a) for k, a in axes.kwargs_axes.items()}
    if x is None or any(v is None for v in mapped.values()):
        return None
    n1, n2 = task.batch_sizes()
    shapes = [s[:a] + (n1 + n2,) + s[a + 1:] for s, a in zip(batch1.out_shapes, axes.out_axes)]
    return Batch(x, {**batch1.kwargs, **mapped}, shapes, batch1.calls)
