"""The public functions: `empirical_nngp_fn`, `empirical_ntk_fn`, `empirical_kernel_fn`."""

from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

from torch import nn
from torch.utils import _pytree as pytree  # torch.func's own pytrees

from ..checks import check_choice, check_positive_int
from ..ops.heap import reuse_heap
from ..outputs import Outputs, namedtuple_type
from .contraction import output_contractions
from .cost import flops
from .implementations import IMPLEMENTATIONS, Unsupported, compute_ntk
from .inputs import (check_inputs, check_model, checked_axes, checked_params, split_kwargs,
                     trainable_params)
from .model import Params, PyTree, apply_model, failures_explained, output_tensors
from .task import prepare_ntk
from .vmap_axes import VmapAxes, check_vmap_axes

logger = logging.getLogger(__name__)

#: Default bound on the bytes of the Jacobians held at once by 'jacobian_contraction'.
DEFAULT_CHUNK_BYTES = 2**30
#: What `get` selects from `empirical_kernel_fn` (and Monte Carlo estimates of it).
EMPIRICAL_KERNELS = Outputs('EmpiricalKernel', ('nngp', 'ntk'), 'kernel', default=('nngp', 'ntk'),
                            prebuilt=('nngp', 'ntk'))
EmpiricalKernel = namedtuple_type('EmpiricalKernel', ('nngp', 'ntk'))


def empirical_nngp_fn(model: nn.Module, trace_axes: Sequence[int] = (-1,),
                      diagonal_axes: Sequence[int] = ()) -> Callable[..., PyTree]:
    """`nngp_fn(x1, x2=None, params=None, **kwargs)`: the outer product of the outputs, contracted.

    `params` maps names of the model's parameters to the tensors used in
    their place (default: none, the model's own; parameters not named keep
    their values); a name that is not a parameter raises a `ValueError`.
    `kwargs` go to `model(x, **kwargs)`, a pair `(value1, value2)` giving one
    value for `x1` and one for `x2` (neural-tangents' rule). Output shapes as
    in the module docstring; a pytree output gives the same pytree of kernels.
    """
    caller = 'empirical_nngp_fn'
    check_model(model, caller)
    trace_axes, diagonal_axes = checked_axes(trace_axes, diagonal_axes, caller)

    def nngp_fn(x1: PyTree, x2: PyTree | None = None, params: Params | None = None,
                **kwargs) -> PyTree:
        check_inputs(x1, x2, caller)
        params = {} if params is None else checked_params(model, params, caller)
        kwargs1, kwargs2 = split_kwargs(kwargs)
        with failures_explained(caller, 'x1', model, params, x1, kwargs1):
            out1 = apply_model(model, params, x1, kwargs1)
        if x2 is None:
            out2 = out1
        else:
            with failures_explained(caller, 'x2', model, params, x2, kwargs2):
                out2 = apply_model(model, params, x2, kwargs2)
        outputs1, tree = output_tensors(out1, caller)
        outputs2 = output_tensors(out2, caller, tree)[0]
        contractions = output_contractions([o.shape for o in outputs1],
                                           [o.shape for o in outputs2], trace_axes,
                                           diagonal_axes, caller)
        return pytree.tree_unflatten(
            [contraction.normalized(contraction.contract(f1, f2, n_param_dims=0), f1.shape)
             for contraction, f1, f2 in zip(contractions, outputs1, outputs2)], tree)
    return nngp_fn


def empirical_ntk_fn(model: nn.Module, trace_axes: Sequence[int] = (-1,),
                     diagonal_axes: Sequence[int] = (), vmap_axes: VmapAxes = 0,
                     implementation: str = 'auto',
                     chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Callable[..., PyTree]:
    r"""`ntk_fn(x1, x2=None, params=None, **kwargs)`: the empirical NTK of `model`.

    .. math:: Θ(x_1, x_2) = \sum_p ∂f(θ, x_1)/∂θ_p ⊗ ∂f(θ, x_2)/∂θ_p

    contracted over output axes as in the module docstring (the table of
    shapes there). `params` maps names of the model's parameters to tensors,
    and those are the parameters differentiated (used in place of the
    model's; the others keep their values and are not differentiated); by
    default the model's parameters with `requires_grad=True` (frozen ones do
    not count). A name that is not a parameter of the model raises a
    `ValueError`. Inputs must be finite, real and hold values (not on the
    `meta` device). `kwargs` go to
    `model(x, **kwargs)`; a pair `(value1, value2)` gives one value for `x1`
    and one for `x2`, anything else is passed to both (neural-tangents' rule).

    The kernel is differentiable in the parameters, the inputs and stax
    hyperparameters that require gradients. Where no gradient is needed, call
    it under `torch.no_grad()`: no autograd graph is kept, and float32
    products on the CPU then run on oneDNN (`torchntk.ops.products`).

    Args:
        model: an `nn.Module` called as `model(x, **kwargs)`, `x` a tensor or
            a pytree of tensors, returning a tensor or a pytree of tensors.
        trace_axes: output axes summed (and divided by their size).
        diagonal_axes: output axes kept once (`x1[i]` paired with `x2[i]` only).
        vmap_axes: where the examples are, when they do not interact: then
            Jacobians are computed per example with `torch.func.vmap`, `N`
            times less work than differentiating the whole batch. As in
            neural-tangents, either

            * an int: the batch axis of every input and output tensor (`0`:
              PyTorch's batch-first layout);
            * a pytree of ints (or `None` for unbatched tensors) matching `x`,
              used for the inputs and the outputs alike;
            * a triple `(in_axes, out_axes, kwargs_axes)`: ints or pytrees
              for the inputs and the outputs, and a dict from keyword-argument
              names to their batch axes (keyword arguments not named there
              are passed whole to every example);
            * `None`: differentiate the whole batch.

            Models with modules that mix examples or draw random numbers
            (BatchNorm in training mode or without running statistics,
            dropout in training mode, a stax `LayerNorm` over axis 0) fall back
            to `vmap_axes=None` (logged at INFO level), which gives the exact
            kernel of the batched forward. Any other model is checked (on the
            first call with given shapes of the inputs and parameters): if its
            per-example outputs differ from the batched forward, a `ValueError`
            asks for `vmap_axes=None`. The kernel's shape does not depend on
            `vmap_axes`.
        implementation: from "Fast Finite Width NTK" (Novak et al. 2022):

            * `'jacobian_contraction'`: Jacobians by `jacrev`, contracted by
              `einsum`; parameters are taken in chunks whose Jacobians on
              `x1` and `x2` fit in `chunk_bytes` (one Jacobian-pass per chunk).
            * `'ntk_vector_products'`: `J1 (J2ᵀ v)` for every basis cotangent
              `v` of one `x2` example, by `vjp` then `jvp`; never a Jacobian.
            * `'structured_derivatives'`: a layer whose output is affine in
              its parameters, :math:`y[r, j] = s_W \sum_i W[j, i]\, a[r, i] + s_b b[j]`
              at rows `r` (positions of `nn.Linear`; image patches of
              `nn.Conv1d/2d/3d` with any padding, padding mode, stride,
              dilation and groups; stax `Dense` and `Conv`), contributes
              :math:`\sum_{r,s} (s_W^2\, a_1[r]·a_2[s] + s_b^2)\,(g_1[r]·g_2[s])`
              from its inputs `a` and output cotangents `g` (per group for
              grouped convolutions); the four factors are contracted in the
              cheapest order (the Gram matrices first, or the weight Jacobian
              :math:`\sum_r g[r]\, a[r]ᵀ` first). The cotangents come from
              one reverse pass per output through the activations only: in a
              layer stack (nested `nn.Sequential` of `nn.Linear`,
              zero-padded `nn.Conv`, elementwise activations, `nn.Flatten`),
              one batched pass of ours back through the layers, else
              `vmap(jacrev)`. An `nn.Linear` head, whose cotangents are the
              identity, contributes the Gram matrix of its inputs times
              :math:`δ(o, o')`. Other parameters (norms, attention, modules
              called more than once, weights shared between modules) use the
              Jacobian contraction.
            * `'auto'`: the cheapest by the FLOP estimate below.

        chunk_bytes: memory bound of the Jacobians of one parameter chunk
            ('jacobian_contraction'), of one batch of vector products, and of
            the intermediate results of structured contractions (an order
            within it is preferred where one exists).

    FLOP estimate of `'auto'`, with `F` the forward FLOPs per example (per
    batch with `vmap_axes=None`; counted by `torch.utils.flop_counter` on the
    first two examples of `x1`, or on `x1`, on the first call with given
    shapes of the inputs and parameters), `O` the outputs per example,
    `|θ|` the trainable parameter count,
    `K` the size of the contraction result times the size of the traced axes,
    and `B = 1` with `vmap_axes`, `B = N` without:

    * jacobian_contraction: `(N1 + N2)(F + 2 F O B) + 2 K |θ|`
    * ntk_vector_products: `N2 (F + 2 F O B) + 3 F O N1 N2`
    * structured_derivatives: `(N1 + N2)(F + F O B (1 + |θ_other|/|θ|)) + 2 K |θ_other|`
      plus twice the multiply-adds of the cheapest contraction order of
      every structured layer's four factors.

    Shape:
        As in the module docstring: `(N1, N2)` for `(N, O)` outputs and the
        default `trace_axes=(-1,)`, `(N1, N2, O, O)` for `trace_axes=()`; a
        pytree output gives the same pytree of kernels.
    """
    check_model(model, 'empirical_ntk_fn')
    trace_axes, diagonal_axes = checked_axes(trace_axes, diagonal_axes, 'empirical_ntk_fn')
    implementation = check_choice(implementation, 'implementation', 'empirical_ntk_fn',
                                  ('auto', *IMPLEMENTATIONS))
    check_vmap_axes(vmap_axes)
    check_positive_int(chunk_bytes, 'chunk_bytes', 'empirical_ntk_fn')

    analyses = {}   # what the forward passes find, per shapes (prepare_ntk)

    def ntk_fn(x1: PyTree, x2: PyTree | None = None, params: Params | None = None,
               **kwargs) -> PyTree:
        check_inputs(x1, x2, 'empirical_ntk_fn')
        if params is None:
            params = trainable_params(model)
            if not params:
                raise ValueError("empirical_ntk_fn: the model has no trainable parameters "
                                 "(all have requires_grad=False)")
        else:
            params = checked_params(model, params, 'empirical_ntk_fn')
            if not params:
                raise ValueError("empirical_ntk_fn: params is empty, so there is no parameter "
                                 "to differentiate")
        with reuse_heap():
            task, out_tree = prepare_ntk(model, params, x1, x2, kwargs, trace_axes, diagonal_axes,
                                         vmap_axes, chunk_bytes,
                                         count_flops=implementation == 'auto', analyses=analyses)
            if task.outputs_empty:
                return pytree.tree_unflatten(task.kernels_of_empty_outputs(), out_tree)
            if implementation != 'auto':
                return pytree.tree_unflatten(compute_ntk(task, implementation), out_tree)
            candidates = sorted(IMPLEMENTATIONS, key=functools.partial(flops, task))
            for choice in candidates:
                logger.debug("empirical_ntk_fn: implementation %s", choice)
                try:
                    return pytree.tree_unflatten(compute_ntk(task, choice), out_tree)
                except Unsupported as error:
                    if choice == candidates[-1]:
                        raise
                    logger.info("empirical_ntk_fn: %s", error)

    return ntk_fn


def empirical_kernel_fn(model: nn.Module, trace_axes: Sequence[int] = (-1,),
                        diagonal_axes: Sequence[int] = (), vmap_axes: VmapAxes = 0,
                        implementation: str = 'auto') -> Callable:
    """`kernel_fn(x1, x2=None, get=None, params=None, **kwargs)`: empirical NNGP and/or NTK.

    `get` is `'nngp'`, `'ntk'` (returns that kernel), a tuple of them (a named
    tuple in that order), or `None` (`EmpiricalKernel(nngp, ntk)`), as in
    neural-tangents. Other arguments as in `empirical_ntk_fn`; shapes as in
    the module docstring.
    """
    check_model(model, 'empirical_kernel_fn')
    checked_axes(trace_axes, diagonal_axes, 'empirical_kernel_fn')
    fns = {'nngp': empirical_nngp_fn(model, trace_axes, diagonal_axes),
           'ntk': empirical_ntk_fn(model, trace_axes, diagonal_axes, vmap_axes, implementation)}

    def kernel_fn(x1: PyTree, x2: PyTree | None = None,
                  get: str | Sequence[str] | None = None, params: Params | None = None,
                  **kwargs):
        names = EMPIRICAL_KERNELS.names(get, 'empirical_kernel_fn')
        values = {name: fns[name](x1, x2, params, **kwargs) for name in names}
        return EMPIRICAL_KERNELS.select(values, get, 'empirical_kernel_fn')

    return kernel_fn
