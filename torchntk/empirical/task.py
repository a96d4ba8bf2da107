"""`NtkTask`: one empirical NTK to compute, as the implementations read it."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree  # torch.func's own pytrees

from .analysis import Batch, ForwardAnalysis, analyze_forward
from .contraction import OutputContraction, output_contractions
from .inputs import split_kwargs
from .model import Params, PyTree, shape_signature, zeros
from .structured import AffineRule, structured_rules
from .vmap_axes import BatchAxes, VmapAxes

#: Shapes whose forward analyses an `empirical_ntk_fn` keeps at most.
_CACHED_ANALYSES = 64


@dataclasses.dataclass(frozen=True)
class NtkTask:
    """The model and the parameters differentiated, the two input batches
    (`batch2 is batch1` without `x2`), the batch axes of per-example Jacobians
    (`None`: whole batches), the output contractions, the forward FLOPs of
    `x1`, the layers with a structured rule, and the memory bound."""

    model: nn.Module
    modules: dict[str, nn.Module]
    params: Params
    axes: BatchAxes | None
    batch1: Batch
    batch2: Batch
    contractions: list[OutputContraction]
    forward_flops: float
    structured_layers: dict[str, AffineRule]
    chunk_bytes: int

    @property
    def same_inputs(self) -> bool:
        return self.batch2 is self.batch1

    @property
    def outputs_empty(self) -> bool:
        """Whether every output has no entries on one side (no examples): no
        Jacobian has entries either."""
        return all(0 in shape1 or 0 in shape2
                   for shape1, shape2 in zip(self.batch1.out_shapes, self.batch2.out_shapes))

    def kernels_of_empty_outputs(self) -> list[torch.Tensor]:
        """The kernels when `outputs_empty`: contractions of empty outputs, of
        the shapes the outputs give."""
        like = next(iter(self.params.values()))
        return [contraction.normalized(contraction.contract(
                    zeros(shape1, like), zeros(shape2, like), n_param_dims=0), shape1)
                for contraction, shape1, shape2 in zip(self.contractions, self.batch1.out_shapes,
                                                       self.batch2.out_shapes)]

    def batch_sizes(self) -> tuple[int, int]:
        """Examples on each side (with `vmap_axes`), else 1: the number of model calls."""
        if self.axes is None:
            return 1, 1
        axis = self.axes.out_axes[0]
        return self.batch1.out_shapes[0][axis], self.batch2.out_shapes[0][axis]

    def batch_axis(self, output: int) -> int | None:
        """The batch axis of output tensor `output` with `vmap_axes`, else `None`."""
        return None if self.axes is None else self.axes.out_axes[output]

    def max_entries(self) -> int:
        """Entries of an intermediate result within `chunk_bytes`."""
        element_size = max(p.element_size() for p in self.params.values())
        return self.chunk_bytes // element_size


def prepare_ntk(model: nn.Module, params: Params, x1: PyTree, x2: PyTree | None,
                kwargs: dict[str, Any], trace_axes: Sequence[int], diagonal_axes: Sequence[int],
                vmap_axes: VmapAxes, chunk_bytes: int, count_flops: bool = True,
                analyses: dict | None = None) -> tuple[NtkTask, pytree.TreeSpec]:
    """The task of the NTK of `model` in `params` on `x1` and `x2`, and the
    structure of the model's outputs (that of the kernels).

    The forward passes run once per shapes of the inputs and parameters (and
    training modes) where `analyses` keeps their findings (`empirical_ntk_fn`
    keeps one dict).
    """
    modules = dict(model.named_modules())
    kwargs1, kwargs2 = split_kwargs(kwargs)
    key = None if analyses is None else shape_signature(modules, params, (x1, x2), kwargs)
    found: ForwardAnalysis | None = None if key is None else analyses.get(key)
    if found is None:
        found = analyze_forward(model, modules, params, x1, x2, kwargs1, kwargs2, vmap_axes,
                                count_flops)
        if key is not None:
            if len(analyses) >= _CACHED_ANALYSES:
                analyses.clear()
            analyses[key] = found
    batch1 = Batch(x1, kwargs1, found.out_shapes[0], found.calls[0])
    batch2 = batch1 if x2 is None else Batch(x2, kwargs2, found.out_shapes[1], found.calls[1])
    contractions = output_contractions(batch1.out_shapes, batch2.out_shapes, trace_axes,
                                       diagonal_axes, 'empirical_ntk_fn')
    task = NtkTask(model, modules, params, found.axes, batch1, batch2, contractions,
                   found.forward_flops, structured_rules(modules, params, batch1, batch2),
                   chunk_bytes)
    return task, found.out_tree
