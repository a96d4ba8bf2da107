"""Empirical kernels of finite `nn.Module`s, through `torch.func`.

For a network `f(θ, x)`:

    empirical NNGP:  f(θ, x1) ⊗ f(θ, x2)
    empirical NTK:   Σ_p ∂f(θ, x1)/∂θ_p ⊗ ∂f(θ, x2)/∂θ_p

contracted over output axes as in neural-tangents ("Fast Finite Width Neural
Tangent Kernel", Novak, Sohl-Dickstein and Schoenholz, ICML 2022,
arXiv:2206.08720):

===============================  ===================================
output axes                      result axes
===============================  ===================================
in `trace_axes`                  summed and divided by their size
in `diagonal_axes`               appear once
all others                       appear twice, zipped: `(N1, N2, O, O')`
===============================  ===================================

For `f(x)` of shape `(N, O)`:

=======================================  ==================
arguments                                kernel shape
=======================================  ==================
`trace_axes=(-1,)` (default)             `(N1, N2)`
`trace_axes=()`                          `(N1, N2, O, O)`
`trace_axes=(), diagonal_axes=(-1,)`     `(N1, N2, O)`
`trace_axes=(-1,), diagonal_axes=(0,)`   `(N,)` (`x2=None`)
=======================================  ==================

and for `(N, C, H, W)` outputs with `trace_axes=(1,)`: `(N1, N2, H, H, W, W)`.
The batch axis is an output axis like the others: outputs `(O, N)` with
`trace_axes=()` give `(O, O, N1, N2)`.

Inputs and outputs may be pytrees (tuples, lists, dicts of tensors, as
`torch.func` understands them): the model is called as `model(x, **kwargs)`
with `x` one pytree, and the kernel of a pytree output is the same pytree of
kernels, one per output tensor (cross terms between different outputs are
not computed, as in neural-tangents). `trace_axes` and `diagonal_axes` apply
to every output tensor.

Besides the kernels, `linearize` and `taylor_expand` give the Taylor
expansions of a model in its parameters.

The files: `functions` (the kernel functions), `taylor` (the expansions),
`inputs` (argument checks), `model` (the model's forward with given
parameters: traced, probed, failures explained), `vmap_axes` (where the
examples are), `analysis` (what forward passes find on the two inputs),
`task` (`NtkTask`, the kernel to compute, as the implementations read it),
`implementations` (the three), `jacobians`, `structured` (rules of layers
affine in their parameters), `layer_stack` (the reverse pass through an
`nn.Sequential` stack), `contraction` (output contractions and einsum
plans), `cost` (FLOP estimates and the contraction-order search).
"""

from .functions import (DEFAULT_CHUNK_BYTES, EmpiricalKernel, empirical_kernel_fn,
                        empirical_nngp_fn, empirical_ntk_fn)
from .implementations import IMPLEMENTATIONS
from .taylor import linearize, taylor_expand

__all__ = ['DEFAULT_CHUNK_BYTES', 'IMPLEMENTATIONS', 'EmpiricalKernel', 'empirical_kernel_fn',
           'empirical_nngp_fn', 'empirical_ntk_fn', 'linearize', 'taylor_expand']
