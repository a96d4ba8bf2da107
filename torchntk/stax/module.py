"""`Layer`: the base of every torchntk module.

A layer is a `torch.nn.Module` whose `forward` is the finite-width network and
whose `kernel_rule` maps the `Kernel` of its inputs to the `Kernel` of its
outputs in the infinite-width limit. `kernel_fn` evaluates the rule of a whole
network on raw inputs or on a `Kernel`.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from torch import nn

from ..kernel import Kernel, Shape, canonical_get, get_fields, kernel_from_inputs
from .requirements import Requirements, resolve_layout

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]
Kernels = Union[Kernel, Sequence[Kernel]]
Shapes = Union[Shape, Sequence[Shape]]


class Layer(nn.Module):
    """Base class: a finite-width `forward` and an infinite-width `kernel_rule`.

    Subclasses implement `forward`, `kernel_rule`, and, when they change shapes
    or hold parameters, `output_shape` and `init_parameters`.
    """

    #: Set by layers (nonlinearities) whose rule needs Gaussian inputs, i.e. an
    #: affine layer right before them.
    requires_gaussian: bool = False

    @property
    def requirements(self) -> Requirements:
        """What this layer needs of its input kernel's layout."""
        return Requirements()

    def kernel_rule(self, k: Kernels) -> Kernels:
        """Map the input kernel to the output kernel (subclasses override)."""
        raise TypeError(f"{type(self).__name__} has no kernel rule")

    def output_shape(self, input_shape: Shapes) -> Shapes:
        """Shape of the finite-width output for an input of `input_shape`."""
        return input_shape

    def init_parameters(self, input_shape: Shapes, generator: torch.Generator | None = None,
                        dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> Shapes:
        """(Re)initialize parameters for inputs of `input_shape`, return the output shape.

        Draws come from `generator` (the global generator when `None`), so two
        calls with generators in the same state give the same network.
        """
        return self.output_shape(input_shape)

    def propagate(self, k: Kernels) -> Kernels:
        """Check `k` against this layer's needs and apply `kernel_rule`."""
        if self.requires_gaussian:
            for kernel in ([k] if isinstance(k, Kernel) else k):
                if not kernel.is_gaussian:
                    raise ValueError(
                        f"{self._name()}: the input kernel is not Gaussian; this layer needs "
                        "an affine layer (Dense, Conv) right before it")
        return self.kernel_rule(k)

    def kernel_fn(self, x1: Tensors | Kernels, x2: Tensors | None = None,
                  get: str | Sequence[str] | None = None, *,
                  diagonal_batch: bool | None = None,
                  diagonal_spatial: bool | None = None) -> Any:
        """NNGP and NTK kernels of the infinite-width limit of this network.

        Args:
            x1: inputs `(N1, C, *S)` (or a sequence of such for a network with
                several inputs), or a `Kernel` to propagate further.
            x2: inputs `(N2, C, *S)`, or `None` for `x2 = x1`.
            get: `'nngp'`, `'ntk'`, any other `Kernel` field, a tuple of names
                (returns a named tuple), or `None` (the whole `Kernel`).
            diagonal_batch, diagonal_spatial: `False` forces full covariances;
                `None` picks the cheapest layout the network allows.

        Shape:
            `nngp`, `ntk`: `(N1, N2)` for flat outputs, `(N1, N2, X, X', …)`
            for outputs with spatial axes.
        """
        names = canonical_get(get)
        if isinstance(x1, Kernel) or _is_kernel_sequence(x1):
            if x2 is not None or diagonal_batch is not None or diagonal_spatial is not None:
                raise ValueError(f"{self._name()}: x2, diagonal_batch and diagonal_spatial must be "
                                 "None when x1 is a Kernel (its layout is already fixed)")
            k = x1
        else:
            diagonal_batch, diagonal_spatial = resolve_layout(
                self.requirements, diagonal_batch, diagonal_spatial, self._name())
            compute_ntk = names is None or 'ntk' in names
            k = _inputs_to_kernels(x1, x2, self._name(), diagonal_batch=diagonal_batch,
                                   diagonal_spatial=diagonal_spatial, compute_ntk=compute_ntk)
        k = self.propagate(k)
        if isinstance(k, Kernel):
            return get_fields(k, get)
        return type(k)(get_fields(kernel, get) for kernel in k)

    def _name(self) -> str:
        return type(self).__name__


def _is_kernel_sequence(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(e, Kernel) for e in x)


def _inputs_to_kernels(x1: Tensors, x2: Tensors | None, layer_name: str, **layout: bool) -> Kernels:
    if isinstance(x1, torch.Tensor):
        if x2 is not None and not isinstance(x2, torch.Tensor):
            raise TypeError(f"{layer_name}: x1 is a tensor but x2 is {type(x2).__name__}")
        return kernel_from_inputs(*_checked_inputs(x1, x2, layer_name), **layout)
    x2s = [None] * len(x1) if x2 is None else list(x2)
    if len(x2s) != len(x1):
        raise ValueError(f"{layer_name}: x1 has {len(x1)} inputs but x2 has {len(x2s)}")
    return type(x1)(_inputs_to_kernels(a, b, layer_name, **layout) for a, b in zip(x1, x2s))


def _checked_inputs(x1: torch.Tensor, x2: torch.Tensor | None,
                    layer_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate inputs at the public boundary; integer inputs become floating."""
    for name, x in (('x1', x1), ('x2', x2)):
        if x is None:
            continue
        if x.ndim < 2:
            raise ValueError(f"{layer_name}: {name} must have shape (N, C, *spatial), got {tuple(x.shape)}")
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{layer_name}: {name} contains non-finite values (NaN or inf)")
    if x2 is not None:
        if x1.shape[1:] != x2.shape[1:]:
            raise ValueError(f"{layer_name}: x1 and x2 must agree in all but the batch axis, got "
                             f"x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)}")
        if x1.dtype != x2.dtype or x1.device != x2.device:
            raise ValueError(f"{layer_name}: x1 and x2 must have the same dtype and device, got "
                             f"{x1.dtype}/{x1.device} and {x2.dtype}/{x2.device}")
    if not x1.is_floating_point():
        x1 = x1.to(torch.get_default_dtype())
        x2 = None if x2 is None else x2.to(x1.dtype)
    return x1, x2


Scalar = Union[float, torch.Tensor]


def check_nonnegative(value: Scalar | None, arg: str, layer_name: str,
                      allow_none: bool = False) -> None:
    """Raise a `ValueError` naming the layer unless `value` is a finite number ≥ 0."""
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{layer_name}: {arg} must be a number >= 0, got None")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{layer_name}: {arg} must be a scalar, got shape {tuple(value.shape)}")
        number = float(value.detach())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise TypeError(f"{layer_name}: {arg} must be a float or a scalar tensor, got {type(value).__name__}")
    if not (number >= 0 and number != float('inf')):
        raise ValueError(f"{layer_name}: {arg} must be finite and >= 0, got {number}")


def check_positive_int(value: Any, arg: str, layer_name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{layer_name}: {arg} must be a positive integer, got {value!r}")
