"""Empirical kernels of finite `nn.Module`s, through `torch.func`.

For a network `f(θ, x)` with outputs of shape `(N, *O)`:

    empirical NNGP:  f(θ, x1) ⊗ f(θ, x2)
    empirical NTK:   Σ_p ∂f(θ, x1)/∂θ_p ⊗ ∂f(θ, x2)/∂θ_p

contracted over output axes as in neural-tangents ("Fast Finite Width Neural
Tangent Kernel", Novak et al. 2022, arXiv:2206.08720):

===============================  ===================================
output axes                      result axes
===============================  ===================================
in `trace_axes`                  summed and divided by their size
in `diagonal_axes`               appear once
all others                       appear twice, zipped: `(N1, N2, O, O')`
===============================  ===================================

For `f(x)` of shape `(N, O)`: `trace_axes=(-1,)` gives `(N1, N2)`,
`trace_axes=()` gives `(N1, N2, O, O)`, and `diagonal_axes=(0,)` with
`trace_axes=(-1,)` gives `(N,)` (requires `x2 = x1`).
"""

from __future__ import annotations

import math
import string
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

Params = dict[str, torch.Tensor]
IMPLEMENTATIONS = ('jacobian_contraction', 'ntk_vector_products')


def empirical_nngp_fn(model: nn.Module, trace_axes: Sequence[int] = (-1,),
                      diagonal_axes: Sequence[int] = ()) -> Callable[..., torch.Tensor]:
    """`nngp_fn(x1, x2=None, params=None)`: the outer product of the outputs, contracted.

    `params` maps parameter names to tensors (default: the model's own).
    """
    def nngp_fn(x1: torch.Tensor, x2: torch.Tensor | None = None,
                params: Params | None = None) -> torch.Tensor:
        f1 = _apply(model, params or {}, x1)
        f2 = f1 if x2 is None else _apply(model, params or {}, x2)
        spec = _OutputContraction(f1.ndim, trace_axes, diagonal_axes)
        return spec.contract(f1, f2, n_param_dims=0)
    return nngp_fn


def empirical_ntk_fn(model: nn.Module, trace_axes: Sequence[int] = (-1,),
                     diagonal_axes: Sequence[int] = (),
                     implementation: str = 'jacobian_contraction') -> Callable[..., torch.Tensor]:
    """`ntk_fn(x1, x2=None, params=None)`: the empirical NTK of `model`.

    Only parameters with `requires_grad=True` count. Implementations:

    * `'jacobian_contraction'`: per-parameter Jacobians by `jacrev`, contracted
      by `einsum`; memory ∝ (N1 + N2)·O·|θ|.
    * `'ntk_vector_products'`: `J1 (J2ᵀ v)` for every basis cotangent `v` of
      `f(x2)` through `vjp` then `jvp`, vectorized by `vmap`; memory ∝ N2·O
      Jacobian-vector products, never a Jacobian.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"empirical_ntk_fn: implementation must be one of {IMPLEMENTATIONS}, "
                         f"got {implementation!r}")

    def ntk_fn(x1: torch.Tensor, x2: torch.Tensor | None = None,
               params: Params | None = None) -> torch.Tensor:
        params = _trainable(model) if params is None else params
        f = lambda p, x: _apply(model, p, x)
        x2_ = x1 if x2 is None else x2
        if implementation == 'jacobian_contraction':
            j1 = jacrev(f)(params, x1)
            j2 = j1 if x2 is None else jacrev(f)(params, x2_)
            out_ndim = next(iter(j1.values())).ndim - next(iter(params.values())).ndim
            spec = _OutputContraction(out_ndim, trace_axes, diagonal_axes)
            return sum(spec.contract(j1[name], j2[name], n_param_dims=p.ndim)
                       for name, p in params.items())
        full = _ntk_by_vector_products(f, params, x1, x2_)
        out_ndim = full.ndim // 2
        return _OutputContraction(out_ndim, trace_axes, diagonal_axes).contract_full(full)

    return ntk_fn


def _trainable(model: nn.Module) -> Params:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if any(nn.parameter.is_lazy(p) for p in params.values()):
        raise ValueError(f"{type(model).__name__}: parameters are not initialized yet; call the "
                         "model once or model.init_parameters(input_shape) first")
    return params


def _apply(model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """`model` on `x` with `params` in place of (some of) its own parameters."""
    return functional_call(model, params, (x,))


def _ntk_by_vector_products(f: Callable, params: Params, x1: torch.Tensor,
                            x2: torch.Tensor) -> torch.Tensor:
    """The full NTK `(*out1, *out2)` as `J1 J2ᵀ` applied to the basis of `f(x2)`."""
    out2, vjp_fn = vjp(lambda p: f(p, x2), params)
    out1 = f(params, x1)

    def column(cotangent: torch.Tensor) -> torch.Tensor:
        (tangent,) = vjp_fn(cotangent)
        return jvp(lambda p: f(p, x1), (params,), (tangent,))[1]

    basis = torch.eye(out2.numel(), dtype=out2.dtype, device=out2.device).reshape(-1, *out2.shape)
    try:
        columns = vmap(column)(basis)                 # (|out2|, *out1)
    except RuntimeError as error:
        if 'random' not in str(error):
            raise
        raise ValueError("empirical_ntk_fn: implementation='ntk_vector_products' needs a "
                         "deterministic model (random layers such as dropout in training mode "
                         "draw new values in every product); call model.eval() or use "
                         "implementation='jacobian_contraction'") from error
    return columns.reshape(out2.numel(), out1.numel()).T.reshape(*out1.shape, *out2.shape)


class _OutputContraction:
    """The einsum that turns two output-shaped tensors into a kernel.

    Output axis `i` gets letter `a_i` on side 1 and `b_i` on side 2; a traced
    or diagonal axis uses one letter on both sides (summed, or kept once).
    """

    def __init__(self, out_ndim: int, trace_axes: Sequence[int], diagonal_axes: Sequence[int]):
        trace = {a % out_ndim for a in trace_axes}
        diagonal = {a % out_ndim for a in diagonal_axes}
        if trace & diagonal:
            raise ValueError(f"trace_axes {tuple(trace_axes)} and diagonal_axes "
                             f"{tuple(diagonal_axes)} must not overlap")
        letters = iter(string.ascii_letters)
        self.side1, self.side2, self.result = [], [], []
        for axis in range(out_ndim):
            a = next(letters)
            b = a if axis in trace | diagonal else next(letters)
            self.side1.append(a)
            self.side2.append(b)
            if axis in diagonal:
                self.result.append(a)
            elif axis not in trace:
                self.result += [a, b]
        self.trace = sorted(trace)

    def _divisor(self, shape: Sequence[int]) -> int:
        return math.prod(shape[a] for a in self.trace)

    def contract(self, t1: torch.Tensor, t2: torch.Tensor, n_param_dims: int) -> torch.Tensor:
        """Contract `(*out1, *P)` with `(*out2, *P)` over `P` and the traced axes."""
        # Parameter axes take letters from the end of the alphabet, outputs from the start.
        params = string.ascii_letters[len(string.ascii_letters) - n_param_dims:]
        spec = (f"{''.join(self.side1)}{params},{''.join(self.side2)}{params}"
                f"->{''.join(self.result)}")
        return torch.einsum(spec, t1, t2) / self._divisor(t1.shape)

    def contract_full(self, full: torch.Tensor) -> torch.Tensor:
        """Apply the traces and diagonals to a full `(*out1, *out2)` kernel."""
        spec = f"{''.join(self.side1)}{''.join(self.side2)}->{''.join(self.result)}"
        return torch.einsum(spec, full) / self._divisor(full.shape)
