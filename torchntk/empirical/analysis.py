"""What forward passes of the model show about the two inputs of a kernel:
the batch axes that apply, the output shapes, every module's calls and the
forward FLOPs (`ForwardAnalysis`); and each input with what was found on it
(`Batch`)."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
from torch import nn
from torch.func import vmap
from torch.utils import _pytree as pytree  # torch.func's own pytrees

from ..stax.requirements import modules_mixing_examples
from .model import Calls, Params, PyTree, failures_explained, output_tensors, traced_forward
from .vmap_axes import BatchAxes, VmapAxes

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One input of the kernel (`x1` or `x2`): the inputs and keyword
    arguments, the shapes of the model's output tensors on them, and the
    shapes every module sees in one call of the model (one example's call with
    `vmap_axes`)."""

    x: PyTree
    kwargs: dict[str, Any]
    out_shapes: list[tuple[int, ...]]
    calls: Calls

    def outputs(self) -> int:
        """Output entries on this batch."""
        return sum(math.prod(shape) for shape in self.out_shapes)


@dataclasses.dataclass(frozen=True)
class ForwardAnalysis:
    """What the forward passes on `x1` (and `x2`) find. It depends on the
    shapes of the inputs and parameters and on which modules train alone
    (`model.shape_signature`), so `empirical_ntk_fn` keeps it per shapes.

    `axes` are the batch axes the Jacobians are computed per example along
    (`None`: whole batches); `out_shapes` and `calls` hold one entry per input,
    the second `None` without `x2`.
    """

    axes: BatchAxes | None
    out_tree: pytree.TreeSpec
    forward_flops: float
    out_shapes: tuple[list[tuple[int, ...]], list[tuple[int, ...]] | None]
    calls: tuple[Calls, Calls | None]


def analyze_forward(model: nn.Module, modules: dict[str, nn.Module], params: Params,
                    x1: PyTree, x2: PyTree | None, kwargs1: dict[str, Any],
                    kwargs2: dict[str, Any], vmap_axes: VmapAxes,
                    count_flops: bool) -> ForwardAnalysis:
    """Forward passes (no gradients, buffers copied, the random state restored,
    so the model and the random stream are left as they were) on `x1` and
    `x2`; checks that per-example outputs equal the batched ones.

    With `vmap_axes`, the modules' calls are those of one example, and the
    batch axes are dropped (whole batches differentiated) where there is no
    example to call the model on or modules mix the examples of a batch.
    """
    axes = None if vmap_axes is None else BatchAxes.of_inputs(vmap_axes, x1, kwargs1)
    if axes is not None and not axes.maps_something:
        axes = None
    if axes is not None:
        n1 = axes.batch_size(x1, kwargs1)
        if n1 == 0 or (x2 is not None and axes.batch_size(x2, kwargs2) == 0):
            # No example to call the model on: the batched forward gives
            # the output shapes, and the kernels are empty.
            axes = None
    if axes is not None:
        # The first two examples stand for the batch (their batch is
        # checked against their per-example calls below).
        x, mapped = axes.examples(x1, kwargs1, 0, min(n1, 2))
        with failures_explained('empirical_ntk_fn', 'x1', model, params, x1, kwargs1, cut=True):
            out1, flops, calls1 = traced_forward(model, params, x, {**kwargs1, **mapped},
                                                 modules, count_flops)
        forward_flops = flops * n1 / min(n1, 2)
        input_ranks = {name: {len(shape) for shape, _ in module_calls if shape is not None}
                       for name, module_calls in calls1.items()}
        mixing = modules_mixing_examples(modules, input_ranks)
        if mixing:
            logger.info("empirical_ntk_fn: %s mix batch elements or draw random numbers; "
                        "differentiating whole batches (vmap_axes=None)", ', '.join(mixing))
            axes = None
    if axes is None:
        with failures_explained('empirical_ntk_fn', 'x1', model, params, x1, kwargs1):
            out1, forward_flops, calls1 = traced_forward(model, params, x1, kwargs1, modules,
                                                         count_flops)
    outputs1, out_tree = output_tensors(out1, 'empirical_ntk_fn')
    if axes is None:
        shapes1, shapes2, calls2 = [tuple(o.shape) for o in outputs1], None, None
        if x2 is not None:
            with failures_explained('empirical_ntk_fn', 'x2', model, params, x2, kwargs2):
                out2, _, calls2 = traced_forward(model, params, x2, kwargs2, modules)
            outputs2 = output_tensors(out2, 'empirical_ntk_fn', out_tree)[0]
            shapes2 = [tuple(o.shape) for o in outputs2]
        return ForwardAnalysis(axes, out_tree, forward_flops, (shapes1, shapes2), (calls1, calls2))
    # Modules record their shapes in one example's call (what the Jacobians see).
    axes = axes.with_outputs(out1)
    per_example = _PerExampleForward(model, modules, params, axes, out_tree)
    examples, calls1 = per_example('x1', x1, kwargs1, min(n1, 2))
    per_example.check_equal(outputs1, examples)
    shapes1, shapes2, calls2 = per_example.batch_shapes(examples, n1), None, None
    if x2 is not None:
        examples, calls2 = per_example('x2', x2, kwargs2, 1)
        shapes2 = per_example.batch_shapes(examples, axes.batch_size(x2, kwargs2))
    return ForwardAnalysis(axes, out_tree, forward_flops, (shapes1, shapes2), (calls1, calls2))


@dataclasses.dataclass(frozen=True)
class _PerExampleForward:
    """The model called on examples one by one, along `axes` (by `vmap`)."""

    model: nn.Module
    modules: dict[str, nn.Module]
    params: Params
    axes: BatchAxes
    out_tree: pytree.TreeSpec

    def __call__(self, name: str, batch: PyTree, kwargs: dict[str, Any], n: int
                 ) -> tuple[list[torch.Tensor], Calls]:
        """Outputs `(n, *example)` of the first `n` examples of input `name`,
        each in its own call, and the modules' calls in one of them."""
        x, mapped = self.axes.examples(batch, kwargs, 0, n)
        calls = {}

        def call(x: PyTree, kwargs: dict[str, Any]):
            out, _, recorded = traced_forward(self.model, self.params, x, kwargs, self.modules)
            calls.update(recorded)   # under vmap, modules see one example's shapes
            return output_tensors(out, 'empirical_ntk_fn', self.out_tree)[0], {}

        example = self.axes.per_example(call, kwargs)
        with failures_explained('empirical_ntk_fn', name, self.model, self.params, batch, kwargs,
                                cut=True):
            outputs = vmap(example, in_dims=self.axes.in_dims())(x, mapped)[0]
        return list(outputs), calls

    def check_equal(self, outputs: list[torch.Tensor], examples: list[torch.Tensor]) -> None:
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

    def batch_shapes(self, examples: list[torch.Tensor], n: int) -> list[tuple[int, ...]]:
        """Output shapes of `n` examples from outputs `(k, *example)` of `k` examples."""
        return [tuple(o.shape[1:axis + 1]) + (n,) + tuple(o.shape[axis + 1:])
                for o, axis in zip(examples, self.axes.out_axes)]
