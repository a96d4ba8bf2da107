"""Batch axes (`vmap_axes`): where the examples are in the inputs, outputs
and keyword arguments, for per-example Jacobians by `torch.func.vmap`."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree  # torch.func's own pytrees

from .model import PyTree

VmapAxes = Any  # None, an int, a pytree of ints matching the inputs, or (in_axes, out_axes, kwargs_axes)


def check_vmap_axes(vmap_axes: VmapAxes) -> None:
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


@dataclasses.dataclass(frozen=True)
class BatchAxes:
    """The batch axis of every input, output and keyword-argument tensor.

    A model called on one example sees that example's slice with the batch
    axis kept (of size 1): `per_example` turns a function of whole inputs into
    one `torch.func.vmap` can map over the batch axes (`in_dims`). Made from
    the inputs (`of_inputs`); the outputs' axes come once the outputs are
    known (`with_outputs`).
    """

    x_axes: list[int | None]
    x_tree: pytree.TreeSpec
    kwargs_axes: dict[str, list[int | None]]
    kwargs_trees: dict[str, pytree.TreeSpec]
    given_out_axes: PyTree
    out_axes: list[int] | None = None

    @classmethod
    def of_inputs(cls, vmap_axes: VmapAxes, x: PyTree, kwargs: dict[str, Any]) -> BatchAxes:
        if isinstance(vmap_axes, tuple) and len(vmap_axes) == 3:
            in_axes, out_axes, kwargs_axes = vmap_axes
        else:
            in_axes, out_axes, kwargs_axes = vmap_axes, vmap_axes, {}
        # Axes of keyword arguments not passed in this call do not apply.
        kwargs_axes = {name: axes for name, axes in (kwargs_axes or {}).items() if name in kwargs}
        return cls(x_axes=_axes_of(in_axes, x, 'the inputs'), x_tree=pytree.tree_structure(x),
                   kwargs_axes={name: _axes_of(axes, kwargs[name], f"keyword argument {name!r}")
                                for name, axes in kwargs_axes.items()},
                   kwargs_trees={name: pytree.tree_structure(kwargs[name])
                                 for name in kwargs_axes},
                   given_out_axes=out_axes)

    def with_outputs(self, out: PyTree) -> BatchAxes:
        """These axes with the output axes canonicalized for outputs like `out`."""
        out_axes = _axes_of(self.given_out_axes, out, 'the outputs')
        if None in out_axes:
            raise ValueError("empirical_ntk_fn: vmap_axes must give every output a batch axis, "
                             f"got {self.given_out_axes!r}")
        return dataclasses.replace(self, out_axes=out_axes)

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
