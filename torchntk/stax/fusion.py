"""Runs of layers in a `Serial` that the extension's fused chain computes in one call.

Deep kernels are mostly `[Conv, Relu] × depth` on full spatial covariances
(with `AvgPool`s between stages in Myrtle networks), or `[Dense, Relu] × depth`
on flat ones. `FusedRun` hands such a run to the extension's fused chain
(`torchntk.ops.conv_chain`), which keeps one pair of examples (or one row of
flat pairs) in cache through all its layers (with `x2=None`, on the CPU, only
the pairs i <= j, whose transposes are the others). Each layer describes its
own step (`Layer.chain_step_kind`, `Layer.chain_step`: affine layers, pooling
and the ABRelu family do); a run falls back to the layers' own rules one at a
time wherever the chain does not apply or does not pay: no extension (or a GPU
one not built), large covariances on a GPU, diagonal layouts, masks, or
gradients to be taken (the chain has no backward; autograd goes through the
layer rules). Both give the same kernel to rounding (tests/stax/test_fusion.py).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from ..kernel import Kernel
from ..ops import conv_chain
from .module import Layer

# On a GPU the chain gives each pair one thread block and its own buffers,
# which stay in the L2 cache only while a pair's covariance is small; beyond
# that the layers, streaming whole tensors at full memory bandwidth, are
# faster (benchmarks/README.md, bench_conv.py --device cuda). Flat kernels (one
# entry per pair) are left to torch's elementwise GPU kernels.
_GPU_MAX_PAIR_ENTRIES = 2**17


class FusedRun:
    """Two or more layers of a `Serial` that each have a chain step, the first
    of those that need a Gaussian input (the nonlinearities) preceded by one
    whose output is (an affine layer, possibly through pooling layers)."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.layers = tuple(layers)

    def propagate(self, k: Kernel) -> Kernel:
        steps = self._steps(k)
        if steps is None:
            for layer in self.layers:
                k = layer.propagate(k)
            return k
        # With x2 = None the pairs (i, i) are the examples themselves, so their
        # variances are read from nngp's own same-example entries: cov1 may be
        # an ulp away from them (e.g. after GlobalAvgPool), which the ReLU NTK's
        # slope ∝ 1/sqrt(1 − ρ) would turn into ~sqrt(ulp) (the layers' rule
        # copies the same entries for the same reason, stax/elementwise.py).
        own = k.cov1 if k.cov2 is not None else torch.diagonal(k.nngp, 0, 0, 1).movedim(-1, 0)
        cov1, variances1 = conv_chain.chain_self(own.contiguous(), steps,
                                                 with_covariance=k.cov2 is not None)
        cov2, variances2 = (None, variances1) if k.cov2 is None else \
            conv_chain.chain_self(k.cov2, steps)
        nngp, ntk = conv_chain.chain_pairs(k.nngp, k.ntk, variances1, variances2, steps,
                                           symmetric=k.cov2 is None)
        if cov1 is None:
            cov1 = torch.diagonal(nngp, 0, 0, 1).movedim(-1, 0)
        shape1, shape2 = k.shape1, k.shape2
        is_gaussian, iid_channels = k.is_gaussian, k.iid_channels
        for layer, step in zip(self.layers, steps):
            shape1, shape2 = layer.output_shape(shape1), layer.output_shape(shape2)
            is_gaussian = step.output_is_gaussian(is_gaussian)
            iid_channels = step.output_iid_channels(iid_channels)
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=is_gaussian,
                         iid_channels=iid_channels, shape1=shape1, shape2=shape2)

    def _steps(self, k: Kernel) -> list[conv_chain.ChainStep] | None:
        """The layers' steps for kernel `k`, or `None` where the chain does not apply."""
        if ((k.diagonal_spatial and k.n_spatial > 0) or not k.diagonal_batch
                or k.mask1 is not None or not conv_chain.available(k.nngp)
                or conv_chain.needs_gradient(k.nngp, k.ntk, k.cov1, k.cov2)):
            return None
        if k.nngp.is_cuda and not 1 < math.prod(k.nngp.shape[2:]) <= _GPU_MAX_PAIR_ENTRIES:
            return None
        steps, shape = [], k.shape1
        for layer in self.layers:
            step = layer.chain_step(shape)
            if step is None:
                return None
            steps.append(step)
            shape = layer.output_shape(shape)
        return steps


def fused_runs(layers: Sequence[Layer]) -> list[Union[Layer, FusedRun]]:
    """`layers` with every maximal run of two or more layers that can form a
    fused chain (see `FusedRun`) replaced by a `FusedRun`."""
    items: list[Union[Layer, FusedRun]] = []
    run: list[Layer] = []
    gaussian = False  # whether the run's output is Gaussian

    def close_run() -> None:
        items.extend([FusedRun(run)] if len(run) >= 2 else run)
        run.clear()

    for layer in layers:
        kind = layer.chain_step_kind
        if kind is not None and (gaussian or not layer.requirements.gaussian_input):
            gaussian = kind.output_is_gaussian(gaussian)
            run.append(layer)
        else:
            close_run()
            items.append(layer)
            gaussian = False
    close_run()
    return items
