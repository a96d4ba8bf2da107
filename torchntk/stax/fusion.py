"""Runs of `Conv`/`Dense`, pooling and `ABRelu` layers in a `Serial` computed by one fused call.

Deep kernels are mostly `[Conv, Relu] × depth` on full spatial covariances
(with `AvgPool`s between stages in Myrtle networks), or `[Dense, Relu] × depth`
on flat ones. `FusedRun` hands such a run to the
extension's fused chain (`torchntk.ops.conv_chain`), which keeps one pair of
examples (or one row of flat pairs) in cache through all its layers (with
`x2=None`, on the CPU, only the pairs i <= j, whose transposes are the others),
and falls back to the layers' own rules one at a time wherever
the chain does not apply or does not pay: no extension (or a GPU one not
built), large covariances on a GPU, diagonal layouts, masks, or gradients to be
taken (the chain has no backward; autograd goes through the layer rules). Both
give the same kernel to rounding (tests/stax/test_fusion.py).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from ..functional import conv as conv_maps
from ..kernel import Kernel
from ..ops import conv_chain
from .conv import Conv
from .elementwise import ABRelu, Abs, LeakyRelu, Relu
from .linear import Dense
from .module import Layer
from .pooling import AvgPool, SumPool


# On a GPU the chain gives each pair one thread block and its own buffers; they
# stay in the L2 cache only while a pair's covariance is small. Measured on an
# H100 (benchmarks/README.md): 3.5-4.3x faster than layer by layer at 16x16
# (65536 entries per pair), 1.5x slower at 32x32 (10⁶), where the layers
# stream whole tensors at full memory bandwidth instead.
# Flat kernels (one entry per pair) are left to torch's elementwise GPU kernels.
_GPU_MAX_PAIR_ENTRIES = 2**17

# Exact types: a subclass may change the kernel rule the chain computes.
_FUSED_NONLINEARITIES = (ABRelu, Relu, LeakyRelu, Abs)


# Affine layers the chain computes (Dense: a convolution with windows of 1).
_FUSED_AFFINE = (Conv, Dense)

# Pooling layers it computes, except averages normalized at 'SAME' edges.
_FUSED_POOLS = (AvgPool, SumPool)


def _fused_pool(layer: Layer) -> bool:
    return type(layer) in _FUSED_POOLS and not (layer.normalize_edges and layer.padding == 'SAME')


class FusedRun:
    """Two or more layers of a `Serial`, each an affine layer (`Conv`,
    `Dense`), a pooling layer (`AvgPool`, `SumPool`), or an ABRelu-family
    nonlinearity whose input is Gaussian (an affine layer comes before it,
    possibly through pooling layers)."""

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
        shape1, shape2, is_gaussian = k.shape1, k.shape2, k.is_gaussian
        for layer in self.layers:
            shape1, shape2 = layer.output_shape(shape1), layer.output_shape(shape2)
            is_gaussian = _output_is_gaussian(layer, is_gaussian)
        iid_channels = k.iid_channels or any(type(l) in _FUSED_AFFINE for l in self.layers)
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=is_gaussian,
                         iid_channels=iid_channels, shape1=shape1, shape2=shape2)

    def _steps(self, k: Kernel) -> list[conv_chain.Step] | None:
        """The chain's steps for kernel `k`, or `None` where it does not apply."""
        # From the activations' shape: with diagonal_spatial the covariances
        # have one axis per spatial dimension, not a pair.
        n_spatial = k.n_spatial
        if ((k.diagonal_spatial and n_spatial > 0) or not k.diagonal_batch
                or k.mask1 is not None or not conv_chain.available(k.nngp)
                or (torch.is_grad_enabled() and self._needs_gradient(k))):
            return None
        sizes = list(k.nngp.shape[2::2])
        if k.nngp.is_cuda and not 1 < math.prod(k.nngp.shape[2:]) <= _GPU_MAX_PAIR_ENTRIES:
            return None
        in_chan = k.shape1[1]
        steps = []
        for layer in self.layers:
            if isinstance(layer, ABRelu):
                steps.append(conv_chain.abrelu_step(float(layer.a), float(layer.b)))
                continue
            circular = not isinstance(layer, Dense) and layer.padding == 'CIRCULAR'
            if isinstance(layer, Dense):
                windows = [(1, 1, 0, 0)] * n_spatial
            elif n_spatial == 0 or layer.n_spatial != n_spatial:
                return None  # the layer's own rule raises the error
            else:
                shape = layer.window_shape if isinstance(layer, _FUSED_POOLS) else \
                    layer.filter_shape
                windows = []
                for d, (size, window, stride) in enumerate(zip(sizes, shape, layer.strides)):
                    low, high = conv_maps.conv_padding(size, window, stride, layer.padding)
                    windows.append((window, stride, low, high))
                    sizes[d] = conv_maps.conv_output_size(size, window, stride, layer.padding)
            if isinstance(layer, _FUSED_POOLS):
                scale = 1 / math.prod(shape)**2 if layer.average else 1.
                steps.append(conv_chain.pool_step(scale, circular, windows))
                continue
            W_var = _square(layer.W_std)
            b_var = 0. if layer.b_std is None else _square(layer.b_std)
            gamma, delta = layer.parameterization.ntk_coefficients(
                W_var, b_var, layer.fan_in(in_chan), layer.b_std is not None)
            steps.append(conv_chain.conv_step(W_var, b_var, gamma, delta, circular, windows))
            in_chan = layer.width
        return steps

    def _needs_gradient(self, k: Kernel) -> bool:
        tensors = [k.nngp, k.ntk, k.cov1, k.cov2]
        for layer in self.layers:
            tensors += [getattr(layer, name, None) for name in ('W_std', 'b_std', 'a', 'b')]
        return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _square(std: float | torch.Tensor) -> float:
    """`std²` as a Python float; inf where it overflows, as the layers' own
    tensor arithmetic gives (`float ** 2` would raise `OverflowError`)."""
    std = float(std)
    return std * std


def _output_is_gaussian(layer: Layer, input_is_gaussian: bool) -> bool:
    """Whether a fusable layer's output is Gaussian: after an affine layer
    yes, after a nonlinearity no, and pooling keeps what its input was."""
    if type(layer) in _FUSED_AFFINE:
        return True
    return input_is_gaussian and _fused_pool(layer)


def fused_runs(layers: Sequence[Layer]) -> list[Union[Layer, FusedRun]]:
    """`layers` with every maximal run of two or more fusable layers (see
    `FusedRun`) replaced by a `FusedRun`."""
    items: list[Union[Layer, FusedRun]] = []
    run: list[Layer] = []
    gaussian = False  # whether the run's output is Gaussian

    def close_run() -> None:
        items.extend([FusedRun(run)] if len(run) >= 2 else run)
        run.clear()

    for layer in layers:
        nonlinearity = type(layer) in _FUSED_NONLINEARITIES and not layer.do_stabilize
        if type(layer) in _FUSED_AFFINE or _fused_pool(layer) or (nonlinearity and run and gaussian):
            gaussian = _output_is_gaussian(layer, gaussian)
            run.append(layer)
        else:
            close_run()
            items.append(layer)
            gaussian = False
    close_run()
    return items
