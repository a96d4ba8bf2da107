"""Containers: `serial`, `parallel`, `repeat`."""

from __future__ import annotations

import copy
import functools
import operator
from typing import Sequence

import torch

from ..checks import check_positive_int
from ..kernel import Kernel
from .module import Kernels, Layer, Masks, Shapes
from .fusion import fused_runs
from .requirements import Requirements


class Serial(Layer):
    """Composition `f_n ∘ … ∘ f_1`; kernel rules compose the same way."""

    def __init__(self, *layers: Layer) -> None:
        super().__init__()
        _check_layers(layers, 'serial')
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)

    @property
    def requirements(self) -> Requirements:
        return functools.reduce(operator.rshift, (l.requirements for l in self.children()),
                                Requirements())

    def __getitem__(self, index: int | slice) -> Layer:
        layers = list(self.children())
        return Serial(*layers[index]) if isinstance(index, slice) else layers[index]

    def __len__(self) -> int:
        return len(self._modules)

    def forward(self, x):
        for layer in self.children():
            x = layer(x)
        return x

    def kernel_rule(self, k: Kernels) -> Kernels:
        # Runs of layers that describe a chain step (affine, pooling, ReLU-like)
        # go through the extension's fused chain where it applies
        # (stax/fusion.py); it falls back to the layers.
        for item in fused_runs(list(self.children())):
            k = item.propagate(k)
        return k

    def propagate(self, k: Kernels) -> Kernels:
        # A container has no needs of its own: each layer checks its own
        # requirements and propagates the masks.
        return self.kernel_rule(k)

    def forward_with_mask(self, x, mask: Masks) -> tuple:
        for layer in self.children():
            x, mask = layer.forward_with_mask(x, mask)
        return x, mask

    def output_shape(self, input_shape: Shapes) -> Shapes:
        for layer in self.children():
            input_shape = layer.output_shape(input_shape)
        return input_shape

    def init_parameters(self, input_shape: Shapes, generator: torch.Generator | None = None,
                        dtype: torch.dtype | None = None, device=None) -> Shapes:
        for layer in self.children():
            input_shape = layer.init_parameters(input_shape, generator, dtype, device)
        return input_shape


class Parallel(Layer):
    """Applies the i-th layer to the i-th of a sequence of inputs (or kernels)."""

    def __init__(self, *layers: Layer) -> None:
        super().__init__()
        if not layers:
            raise ValueError("parallel: expected at least one layer")
        _check_layers(layers, 'parallel')
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)

    @property
    def requirements(self) -> Requirements:
        return functools.reduce(operator.and_, (l.requirements for l in self.children()))

    def _zip(self, inputs: Sequence, what: str) -> zip:
        layers = list(self.children())
        if not isinstance(inputs, (list, tuple)) or len(inputs) != len(layers):
            got = f"{len(inputs)} {what}s" if isinstance(inputs, (list, tuple)) else f"one {what}"
            raise ValueError(f"parallel: expected a list of {len(layers)} {what}s (one per branch, "
                             f"e.g. from FanOut({len(layers)})), got {got}")
        return zip(layers, inputs)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(x) for layer, x in self._zip(xs, 'input')]

    def kernel_rule(self, ks: Sequence[Kernel]) -> list[Kernel]:
        return [layer.propagate(k) for layer, k in self._zip(ks, 'kernel')]

    def propagate(self, ks: Sequence[Kernel]) -> list[Kernel]:
        return self.kernel_rule(ks)  # each branch checks its needs and propagates its masks

    def forward_with_mask(self, xs: Sequence[torch.Tensor], masks: Masks) -> tuple[list, list]:
        masks = [None] * len(xs) if masks is None else masks
        outputs = [layer.forward_with_mask(x, mask)
                   for (layer, x), mask in zip(self._zip(xs, 'input'), masks)]
        return [y for y, _ in outputs], [mask for _, mask in outputs]

    def output_shape(self, input_shapes: Sequence) -> list:
        return [layer.output_shape(s) for layer, s in self._zip(input_shapes, 'input shape')]

    def init_parameters(self, input_shapes: Sequence, generator: torch.Generator | None = None,
                        dtype: torch.dtype | None = None, device=None) -> list:
        return [layer.init_parameters(s, generator, dtype, device)
                for layer, s in self._zip(input_shapes, 'input shape')]


def serial(*layers: Layer) -> Serial:
    """Compose layers in sequence: `serial(f, g)(x) = g(f(x))`, for networks and kernels."""
    return Serial(*layers)


def parallel(*layers: Layer) -> Parallel:
    """Apply layers side by side to a list of inputs (e.g. after `FanOut`)."""
    return Parallel(*layers)


def repeat(layer: Layer, n: int) -> Serial:
    """`serial` of `n` independent copies of `layer` (parameters are not shared).

    The infinite-width kernels assume independent weights in every layer, so
    each copy gets its own parameters, as in neural-tangents' `repeat`: they
    are uninitialized and drawn on first use (or by `init_parameters`).
    """
    check_positive_int(n, 'n', 'repeat')
    return Serial(*(_uninitialized_copy(layer) for _ in range(n)))


def _uninitialized_copy(layer: Layer) -> Layer:
    clone = copy.deepcopy(layer)
    for module in clone.modules():
        for name, _ in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.parameter.UninitializedParameter())
    return clone


def _check_layers(layers: Sequence, combinator: str) -> None:
    """Layers must be torchntk layers, and no parameterized layer may appear twice:
    shared weights have a different infinite-width kernel."""
    seen: set[int] = set()
    for layer in layers:
        if not isinstance(layer, Layer):
            raise TypeError(f"{combinator}: expected torchntk layers, got {type(layer).__name__}")
        for module in layer.modules():
            if id(module) in seen and any(True for _ in module.parameters(recurse=False)):
                raise ValueError(f"{combinator}: the same {type(module).__name__} instance is used "
                                 "twice; weight sharing has no kernel rule here — use separate "
                                 "layers or repeat(layer, n)")
            seen.add(id(module))
