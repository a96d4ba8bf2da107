"""Checks of the arguments of the empirical kernels: model, axes, parameters, inputs."""

from __future__ import annotations

import difflib
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils import _pytree as pytree  # torch.func's own pytrees

from ..checks import check_axes, check_input_values
from .model import Params, PyTree


def check_model(model: Any, caller: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")


def checked_axes(trace_axes: Any, diagonal_axes: Any, caller: str
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The axes as tuples of ints (an int is one axis, as in neural-tangents);
    their range depends on the outputs, which `OutputContraction` checks."""
    return (check_axes(trace_axes, 'trace_axes', caller),
            check_axes(diagonal_axes, 'diagonal_axes', caller))


def trainable_params(model: nn.Module) -> Params:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if any(nn.parameter.is_lazy(p) for p in params.values()):
        raise ValueError(f"{type(model).__name__}: parameters are not initialized yet; call the "
                         "model once or model.init_parameters(input_shape) first")
    return params


def checked_params(model: nn.Module, params: Any, caller: str, arg: str = 'params') -> Params:
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


def check_inputs(x1: PyTree, x2: PyTree | None, caller: str, name1: str = 'x1') -> None:
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


def split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """neural-tangents' rule: a pair `(value1, value2)` is split between `x1` and `x2`."""
    pairs = {k: v for k, v in kwargs.items() if isinstance(v, tuple) and len(v) == 2}
    return ({**kwargs, **{k: v[0] for k, v in pairs.items()}},
            {**kwargs, **{k: v[1] for k, v in pairs.items()}})
