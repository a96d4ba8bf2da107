"""Empirical kernels of finite `nn.Module`s, through `torch.func`.

For a network `f(θ, x)` with outputs of shape `(N, *O)`:

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

Besides the kernels, `linearize` and `taylor_expand` give the Taylor
expansions of a model in its parameters.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import logging
import math
import string
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap
from torch.utils.flop_counter import FlopCounterMode

from .stax.dropout import Dropout as StaxDropout
from .stax.linear import Dense as StaxDense
from .stax.normalization import LayerNorm as StaxLayerNorm

logger = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]
IMPLEMENTATIONS = ('jacobian_contraction', 'ntk_vector_products', 'structured_derivatives')
#: Default bound on the bytes of the Jacobians held at once by 'jacobian_contraction'.
DEFAULT_CHUNK_BYTES = 2**30
EmpiricalKernel = collections.namedtuple('EmpiricalKernel', ('nngp', 'ntk'))


def empirical_nngp_fn(model: nn.Module, trace_axes: Sequence[int] = (-1,),
                      diagonal_axes: Sequence[int] = ()) -> Callable[..., torch.Tensor]:
    """`nngp_fn(x1, x2=None, params=None)`: the outer product of the outputs, contracted.

    `params` maps parameter names to tensors (default: the model's own).
    Output shapes as in the module docstring.
    """
    def nngp_fn(x1: torch.Tensor, x2: torch.Tensor | None = None,
                params: Params | None = None) -> torch.Tensor:
        _check_inputs(x1, x2, 'empirical_nngp_fn')
        f1 = _apply(model, params or {}, x1)
        f2 = f1 if x2 is None else _apply(model, params or {}, x2)
        spec = _OutputContraction(f1.ndim, trace_axes, diagonal_axes)
        return spec.contract(f1, f2, n_param_dims=0)
    return nngp_fn


def empirical_ntk_fn(model: nn.Module, trace_axes: Sequence[int] = (-1,),
                     diagonal_axes: Sequence[int] = (), vmap_axes: int | None = 0,
                     implementation: str = 'auto',
                     chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Callable[..., torch.Tensor]:
    r"""`ntk_fn(x1, x2=None, params=None)`: the empirical NTK of `model`.

    .. math:: Θ(x_1, x_2) = \sum_p ∂f(θ, x_1)/∂θ_p ⊗ ∂f(θ, x_2)/∂θ_p

    contracted over output axes as in the module docstring (the table of
    shapes there). `params` maps parameter names to tensors, and those are the
    parameters differentiated; by default the model's parameters with
    `requires_grad=True` (frozen ones do not count).

    Args:
        model: an `nn.Module` taking one tensor and returning one tensor.
        trace_axes: output axes summed (and divided by their size).
        diagonal_axes: output axes kept once (`x1[i]` paired with `x2[i]` only).
        vmap_axes: `0` when batch elements do not interact (axis 0 of inputs
            and outputs): Jacobians are computed per example with
            `torch.func.vmap`, `N` times less work than differentiating the
            whole batch. Models with modules that mix examples or draw random
            numbers (BatchNorm in training mode or without running statistics,
            dropout in training mode, a stax `LayerNorm` over axis 0) fall back
            to `vmap_axes=None` (logged at INFO level), which gives the exact
            kernel of the batched forward. Any other model is checked: if its
            per-example outputs differ from the batched forward, a `ValueError`
            asks for `vmap_axes=None`. `None`: differentiate the whole batch.
        implementation: from "Fast Finite Width NTK" (Novak et al. 2022):

            * `'jacobian_contraction'`: Jacobians by `jacrev`, contracted by
              `einsum`; parameters are taken in chunks whose Jacobians on
              `x1` and `x2` fit in `chunk_bytes` (one Jacobian-pass per chunk).
            * `'ntk_vector_products'`: `J1 (J2ᵀ v)` for every basis cotangent
              `v` of one `x2` example, by `vjp` then `jvp`; never a Jacobian.
            * `'structured_derivatives'`: `nn.Linear`, `nn.Conv1d`, `nn.Conv2d`
              (`groups=1`, zero padding) and `stax.Dense` contribute
              :math:`\sum_{p,q} (a_1[p]·a_2[q])\,(g_1[p]·g_2[q])` from their
              inputs `a` (image patches for conv) and output cotangents `g`,
              or, when cheaper, the weight Jacobian :math:`\sum_p g[p] a[p]ᵀ`
              formed from them; the cotangents come from one reverse pass per
              output through the activations only. Other parameters (norms,
              attention, Conv3d, shared modules) use the Jacobian contraction.
            * `'auto'`: the cheapest by the FLOP estimate below.

        chunk_bytes: memory bound of the Jacobians of one parameter chunk
            ('jacobian_contraction') and of one batch of vector products.

    FLOP estimate of `'auto'`, with `F` the forward FLOPs per example (counted
    by `torch.utils.flop_counter` on `x1`), `O` the outputs per example, `|θ|`
    the trainable parameter count, `K` the size of the contraction result times
    the size of the traced axes, and `B = 1` with `vmap_axes=0`, `B = N` without:

    * jacobian_contraction: `(N1 + N2)(F + 2 F O B) + 2 K |θ|`
    * ntk_vector_products: `N2 (F + 2 F O B) + 3 F O N1 N2`
    * structured_derivatives: `(N1 + N2)(F + F O B (1 + |θ_other|/|θ|)) + 2 K |θ_other|`
      plus, per structured layer with `P` positions, `I` inputs and `J` outputs,
      `min(2 (N1 + N2) O P I J + 2 K I J,  2 N1 N2 P² I + 2 K P² J)`.

    Shape:
        As in the module docstring: `(N1, N2)` for `(N, O)` outputs and the
        default `trace_axes=(-1,)`, `(N1, N2, O, O)` for `trace_axes=()`.
    """
    if implementation not in IMPLEMENTATIONS + ('auto',):
        raise ValueError(f"empirical_ntk_fn: implementation must be 'auto' or one of "
                         f"{IMPLEMENTATIONS}, got {implementation!r}")
    if vmap_axes not in (0, None):
        raise ValueError(f"empirical_ntk_fn: vmap_axes must be 0 (batch axis 0 of inputs and "
                         f"outputs) or None, got {vmap_axes!r}")
    if not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"empirical_ntk_fn: chunk_bytes must be a positive int, got {chunk_bytes!r}")

    def ntk_fn(x1: torch.Tensor, x2: torch.Tensor | None = None,
               params: Params | None = None) -> torch.Tensor:
        _check_inputs(x1, x2, 'empirical_ntk_fn')
        params = _trainable(model) if params is None else dict(params)
        if not params:
            raise ValueError("empirical_ntk_fn: the model has no trainable parameters "
                             "(all have requires_grad=False)")
        problem = _Problem(model, params, x1, x2, trace_axes, diagonal_axes, vmap_axes,
                           chunk_bytes, count_flops=implementation == 'auto')
        if implementation != 'auto':
            return _COMPUTE[implementation](problem)
        candidates = sorted(IMPLEMENTATIONS, key=problem.flops)
        for choice in candidates:
            logger.debug("empirical_ntk_fn: implementation %s", choice)
            try:
                return _COMPUTE[choice](problem)
            except _Unsupported as error:
                if choice == candidates[-1]:
                    raise
                logger.info("empirical_ntk_fn: %s", error)

    return ntk_fn


def empirical_kernel_fn(model: nn.Module, trace_axes: Sequence[int] = (-1,),
                        diagonal_axes: Sequence[int] = (), vmap_axes: int | None = 0,
                        implementation: str = 'auto') -> Callable:
    """`kernel_fn(x1, x2=None, get=None, params=None)`: empirical NNGP and/or NTK.

    `get` is `'nngp'`, `'ntk'` (returns that tensor), a tuple of them (a named
    tuple in that order), or `None` (`EmpiricalKernel(nngp, ntk)`), as in
    neural-tangents. Other arguments as in `empirical_ntk_fn`; shapes as in
    the module docstring.
    """
    fns = {'nngp': empirical_nngp_fn(model, trace_axes, diagonal_axes),
           'ntk': empirical_ntk_fn(model, trace_axes, diagonal_axes, vmap_axes, implementation)}

    def kernel_fn(x1: torch.Tensor, x2: torch.Tensor | None = None,
                  get: str | Sequence[str] | None = None, params: Params | None = None):
        names = _canonical_get(get, 'empirical_kernel_fn')
        values = {name: fns[name](x1, x2, params) for name in names}
        return _select(values, get)

    return kernel_fn


def _canonical_get(get: str | Sequence[str] | None, caller: str) -> tuple[str, ...]:
    names = ('nngp', 'ntk') if get is None else (get,) if isinstance(get, str) else tuple(get)
    lowered = tuple(str(name).lower() for name in names)
    if not lowered or len(set(lowered)) != len(lowered) or not set(lowered) <= {'nngp', 'ntk'}:
        raise ValueError(f"{caller}: get must be 'nngp', 'ntk', a tuple of those without "
                         f"repeats, or None, got {get!r}")
    return lowered


def _select(values: dict[str, torch.Tensor], get: str | Sequence[str] | None):
    """neural-tangents' `get` semantics on a dict of computed kernels."""
    if get is None:
        return EmpiricalKernel(values['nngp'], values['ntk'])
    if isinstance(get, str):
        return values[get.lower()]
    names = tuple(name.lower() for name in get)
    return collections.namedtuple('EmpiricalKernel', names)(*(values[n] for n in names))


def linearize(model: nn.Module, params0: Params) -> Callable[..., torch.Tensor]:
    r"""`f_lin(x, params=None)`: the first-order Taylor expansion of `model` around `params0`.

    .. math:: f_{lin}(x, θ) = f(θ_0, x) + J(θ_0, x)\,(θ - θ_0),\quad J = ∂f/∂θ

    computed by one Jacobian-vector product (`torch.func.jvp`), never a Jacobian.
    Note the argument order: `f_lin(x, params)`, input first as in `model(x)`
    (neural-tangents' is `f_lin(params, x)`).

    Args:
        model: any `nn.Module` taking one input tensor.
        params0: parameter name -> tensor, the expansion point, e.g.
            `{k: v.detach().clone() for k, v in model.named_parameters()}`.
            Parameters of `model` not named here stay fixed at their current values.
            The tensors are used as given (clone them if the model trains in place).

    `params` in `f_lin(x, params)` maps the same names to tensors (may be
    `nn.Parameter`s with gradients; `f_lin` is differentiable in them); `None`
    means `params0`, where `f_lin(x) = model(x)` with `params0`.

    Shape:
        `f_lin(x, params)`: the shape of `model(x)`.
    """
    return taylor_expand(model, params0, degree=1)


def taylor_expand(model: nn.Module, params0: Params, degree: int) -> Callable[..., torch.Tensor]:
    r"""`f_taylor(x, params=None)`: the Taylor expansion of `model` in its parameters.

    .. math:: f_{taylor}(x, θ) = \sum_{k=0}^{degree} \frac{1}{k!}\, D^k_θ f(θ_0, x)[Δθ, …, Δθ],
              \quad Δθ = θ - θ_0

    The directional derivatives come from `degree` nested `torch.func.jvp`s
    (cost ∝ 2^degree forward passes). `degree=1` is `linearize`. Arguments and
    call signature as in `linearize`.
    """
    if not isinstance(degree, int) or degree < 0:
        raise ValueError(f"taylor_expand: degree must be a non-negative int, got {degree!r}")
    params0 = dict(params0)

    def f_taylor(x: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        if params is None:
            return _apply(model, params0, x)
        if set(params) != set(params0):
            raise ValueError(f"taylor_expand: params must have the keys of params0; missing "
                             f"{sorted(set(params0) - set(params))}, unexpected "
                             f"{sorted(set(params) - set(params0))}")
        delta = {name: params[name] - params0[name] for name in params0}
        terms = _directional_derivatives(lambda p: _apply(model, p, x), params0, delta, degree)
        return sum(term / math.factorial(k) for k, term in enumerate(terms))

    return f_taylor


def _directional_derivatives(f: Callable, primal: Params, tangent: Params,
                             degree: int) -> tuple[torch.Tensor, ...]:
    """`(f(p), Df(p)[t], D²f(p)[t, t], …)` up to `degree`, by nested `jvp`.

    The derivative of order `k - 1` is a function of `p`; its `jvp` along `t` is order `k`.
    """
    if degree == 0:
        return (f(primal),)
    lower = lambda p: _directional_derivatives(f, p, tangent, degree - 1)
    values, derivatives = jvp(lower, (primal,), (tangent,))
    return (*values, derivatives[-1])


class _Unsupported(ValueError):
    """An implementation cannot handle this model ('auto' then tries the next cheapest)."""


def _trainable(model: nn.Module) -> Params:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if any(nn.parameter.is_lazy(p) for p in params.values()):
        raise ValueError(f"{type(model).__name__}: parameters are not initialized yet; call the "
                         "model once or model.init_parameters(input_shape) first")
    return params


def _check_inputs(x1: torch.Tensor, x2: torch.Tensor | None, caller: str) -> None:
    for name, x in (('x1', x1), ('x2', x2)):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{caller}: {name} must be a tensor, got {type(x).__name__}")
    if x2 is not None and (x1.shape[1:] != x2.shape[1:] or x1.dtype != x2.dtype
                           or x1.device != x2.device):
        raise ValueError(f"{caller}: x1 and x2 must agree in all but the batch axis, dtype and "
                         f"device, got {tuple(x1.shape)} {x1.dtype} {x1.device} and "
                         f"{tuple(x2.shape)} {x2.dtype} {x2.device}")


def _apply(model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """`model` on `x` with `params` in place of (some of) its own parameters.

    Buffers are copied inside the call: BatchNorm's running statistics are not
    updated, and transforms do not see in-place updates of captured tensors.
    """
    return functional_call(model, (params, _buffer_copies(model)), (x,))


def _buffer_copies(model: nn.Module) -> Params:
    return {name: b.clone() for name, b in model.named_buffers()}


def _rng_devices(x: torch.Tensor) -> list:
    return [x.device] if x.is_cuda else []


class _Problem:
    """One kernel to compute: model, parameters, inputs, contraction, and their sizes.

    A forward pass on `x1` (no gradients, buffers copied, RNG state restored,
    so the model and the random stream are left as they were) records the
    output shape, the forward FLOPs and every module's calls.
    """

    def __init__(self, model: nn.Module, params: Params, x1: torch.Tensor,
                 x2: torch.Tensor | None, trace_axes: Sequence[int],
                 diagonal_axes: Sequence[int], vmap_axes: int | None, chunk_bytes: int,
                 count_flops: bool = True):
        self.model, self.params, self.x1, self.x2 = model, params, x1, x2
        self.chunk_bytes = chunk_bytes
        self.modules = dict(model.named_modules())
        out, self.forward_flops, self.calls = _traced_forward(model, params, x1, self.modules,
                                                              count_flops)
        self.out_shape = tuple(out.shape)
        if not out.shape:
            raise ValueError("empirical_ntk_fn: the model output must have a batch axis, got a scalar")
        self.spec = _OutputContraction(out.ndim, trace_axes, diagonal_axes)
        self.n1, self.n2 = x1.shape[0], (x1 if x2 is None else x2).shape[0]
        mixing = _batch_mixing_modules(self.modules, self.calls)
        if vmap_axes == 0 and mixing:
            logger.info("empirical_ntk_fn: %s mix batch elements or draw random numbers; "
                        "differentiating whole batches (vmap_axes=None)", ', '.join(mixing))
        self.batched = vmap_axes == 0 and not mixing
        if self.batched:
            self._check_per_example_outputs(out)
        self.rules = self._structured_rules()

    def _check_per_example_outputs(self, out: torch.Tensor) -> None:
        """The per-example forward must equal the batched one, or vmap is wrong."""
        examples = self.x1[:min(self.n1, 2)]
        with torch.no_grad():
            per_example = vmap(lambda x: _apply(self.model, self.params, x[None])[0])(examples)
        scale = out[:len(examples)].abs().max().clamp_min(1)
        tolerance = 1e3 * torch.finfo(out.dtype).eps * scale
        if (per_example - out[:len(examples)]).abs().max() > tolerance:
            raise ValueError("empirical_ntk_fn: with vmap_axes=0 the model's outputs per example "
                             "differ from its batched outputs, so its batch elements interact; "
                             "pass vmap_axes=None")

    def _structured_rules(self) -> dict[str, _AffineRule]:
        owners = collections.Counter(id(p) for m in self.modules.values()
                                     for p in m.parameters(recurse=False))
        rules = {}
        for name, module in self.modules.items():
            rule = _rule_for(name, module)
            if rule is None or len(self.calls.get(name, ())) != 1:
                continue
            names = rule.param_names()
            own = [p for p in module.parameters(recurse=False)]
            if (all(n in self.params for n in names) and len(own) == len(names)
                    and all(owners[id(p)] == 1 for p in own)):
                rule.input_shape, rule.output_shape = self.calls[name][0]
                rules[name] = rule
        return rules

    # Sizes for the FLOP estimates.

    @property
    def outputs_per_example(self) -> int:
        return math.prod(self.out_shape[1:])

    @property
    def contraction_size(self) -> int:
        """Result entries times traced entries: the multiply-adds per parameter."""
        shape1 = (self.n1,) + self.out_shape[1:]
        shape2 = (self.n2,) + self.out_shape[1:]
        return self.spec.multiply_adds(shape1, shape2)

    def _jacobian_pass_flops(self, reverse_flops: float) -> float:
        """FLOPs of one forward and `O` reverse passes per example, on both inputs."""
        forward = self.forward_flops / self.n1
        per_row = reverse_flops * (1 if self.batched else 1)
        total = 0.
        for n in (self.n1, self.n2):
            rows = self.outputs_per_example * (1 if self.batched else n)
            total += n * forward + n * rows * per_row
        return total

    def flops(self, implementation: str) -> float:
        forward = max(self.forward_flops / self.n1, 1.)
        n_params = sum(p.numel() for p in self.params.values())
        o = self.outputs_per_example
        b2 = 1 if self.batched else self.n2
        if implementation == 'jacobian_contraction':
            return self._jacobian_pass_flops(2 * forward) + 2 * self.contraction_size * n_params
        if implementation == 'ntk_vector_products':
            return self.n2 * (forward + 2 * forward * o * b2) + 3 * forward * o * self.n1 * self.n2
        structured = {n for rule in self.rules.values() for n in rule.param_names()}
        other = sum(p.numel() for n, p in self.params.items() if n not in structured)
        passes = self._jacobian_pass_flops(forward * (1 + other / n_params))
        return (passes + 2 * self.contraction_size * other
                + sum(min(self.route_flops(rule)) for rule in self.rules.values()))

    def route_flops(self, rule: _AffineRule) -> tuple[float, float]:
        """FLOPs of (weight Jacobian route, Gram route) of one structured layer."""
        positions, inputs, outputs = rule.sizes()
        o = self.outputs_per_example
        k = self.contraction_size
        if self.batched:
            jacobian = 2 * (self.n1 + self.n2) * o * positions * inputs * outputs
            pair_positions = positions**2
        else:
            jacobian = 2 * (self.n1**2 + self.n2**2) * o * positions * inputs * outputs
            pair_positions = self.n1 * self.n2 * positions**2
        gram = 2 * self.n1 * self.n2 * positions**2 * inputs + 2 * k * pair_positions * outputs
        return jacobian + 2 * k * inputs * outputs, gram

    def cheapest(self) -> str:
        return min(IMPLEMENTATIONS, key=self.flops)

    # Jacobians.

    def jacobians(self, x: torch.Tensor, wrt: Params, rules: dict[str, _AffineRule]
                  ) -> tuple[Params, Params, Params]:
        """Jacobians of the outputs on `x` w.r.t. `wrt` and the outputs of `rules`' layers.

        Returns `(∂f/∂θ per name in wrt, ∂f/∂y per layer, inputs a per layer)`.
        Batched: `(N, *O, *θ)`, `(N, *O, 1, *y)`, `(N, 1, *a)` (every layer sees
        one example); whole batch: `(N, *O, *θ)`, `(N, *O, *y)`, `a`.
        """
        fixed = {n: p for n, p in self.params.items() if n not in wrt}

        def f(wrt: Params, probes: Params, x: torch.Tensor):
            return _forward_with_probes(self.model, {**fixed, **wrt}, probes, self.modules, x)

        if self.batched:
            probes = {name: _zeros((1,) + rule.output_shape[1:], x)
                      for name, rule in rules.items()}
            per_example = lambda wrt, probes, x: _squeeze_output(f(wrt, probes, x[None]))
            jac = jacrev(per_example, argnums=(0, 1), has_aux=True)
            (d_params, d_probes), inputs = vmap(jac, in_dims=(None, None, 0))(wrt, probes, x)
        else:
            shapes = ({n: r.output_shape for n, r in rules.items()} if x is self.x1
                      else {n: c[0][1] for n, c in _traced_forward(
                          self.model, self.params, x, self.modules)[2].items() if n in rules})
            probes = {name: _zeros(shapes[name], x) for name in rules}
            (d_params, d_probes), inputs = jacrev(f, argnums=(0, 1), has_aux=True)(wrt, probes, x)
        return d_params, d_probes, inputs

    def parameter_chunks(self) -> Iterator[Params]:
        rows = (self.n1 + (0 if self.x2 is None else self.n2)) * self.outputs_per_example
        chunk, size = {}, 0
        for name, p in self.params.items():
            nbytes = rows * p.numel() * p.element_size()
            if chunk and size + nbytes > self.chunk_bytes:
                yield chunk
                chunk, size = {}, 0
            chunk[name], size = p, size + nbytes
        if chunk:
            yield chunk


def _zeros(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def _squeeze_output(result: tuple[torch.Tensor, Params]) -> tuple[torch.Tensor, Params]:
    out, inputs = result
    return out[0], inputs


def _forward_with_probes(model: nn.Module, params: Params, probes: Params,
                         modules: dict[str, nn.Module], x: torch.Tensor
                         ) -> tuple[torch.Tensor, Params]:
    """`model(x)` with `probes[name]` added to the output of module `name`.

    The derivative w.r.t. a probe at zero is the cotangent of that module's
    output. Returns the output and the probed modules' inputs.
    """
    inputs = {}

    def hook(name: str):
        def add_probe(module, args, output):
            inputs[name] = args[0]
            return output + probes[name]
        return add_probe

    handles = [modules[name].register_forward_hook(hook(name)) for name in probes]
    try:
        out = functional_call(model, (params, _buffer_copies(model)), (x,))
    finally:
        for handle in handles:
            handle.remove()
    return out, inputs


def _traced_forward(model: nn.Module, params: Params, x: torch.Tensor,
                    modules: dict[str, nn.Module], count_flops: bool = False):
    """Output, forward FLOPs, and `{module name: [(input shape, output shape), …]}`.

    Runs without gradients on copies of the buffers (BatchNorm statistics are
    not updated) and restores the random state afterwards.
    """
    calls = collections.defaultdict(list)

    def hook(name: str):
        def record(module, args, output):
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            calls[name].append((None if first is None else tuple(first.shape),
                                tuple(output.shape) if isinstance(output, torch.Tensor) else None))
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    buffers = _buffer_copies(model)
    counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
    try:
        with torch.no_grad(), torch.random.fork_rng(_rng_devices(x)), counter:
            out = functional_call(model, (params, buffers), (x,))
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"empirical_ntk_fn: the model must return one tensor, "
                        f"got {type(out).__name__}")
    return out, counter.get_total_flops() if count_flops else 0, dict(calls)


def _batch_mixing_modules(modules: dict[str, nn.Module], calls) -> list[str]:
    """Names of modules whose output for one example depends on the others (or on RNG)."""
    mixing = []
    for name, module in modules.items():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training or module.running_mean is None:
                mixing.append(name or type(module).__name__)
        elif isinstance(module, (nn.modules.dropout._DropoutNd, StaxDropout)):
            if module.training and module.p > 0:
                mixing.append(name or type(module).__name__)
        elif isinstance(module, StaxLayerNorm):
            ndims = {len(shape) for shape, _ in calls.get(name, ()) if shape is not None}
            if any(a % ndim == 0 for a in module.axis for ndim in ndims):
                mixing.append(name or type(module).__name__)
    return mixing


# Structured derivatives: layers whose output is affine in the weight.

class _AffineRule(abc.ABC):
    """A layer computing `y[p, j] = Σ_i W[j, i] a[p, i] + bias_scale · b[j]` at positions `p`.

    Subclasses turn the layer's input `(M, …)` into `a` of shape `(M·P, I)`
    (scaled as the layer scales its weight) and the cotangent of its output
    `(*lead, M, …)` into `g` of shape `(*lead, M·P, J)`.
    """

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self.input_shape = self.output_shape = None

    def param_names(self) -> list[str]:
        prefix = f"{self.name}." if self.name else ''
        return [prefix + 'weight'] + ([prefix + 'bias'] if self.module.bias is not None else [])

    def sizes(self) -> tuple[int, int, int]:
        """Positions per example, inputs `I` and outputs `J`."""
        out_features, in_features = self.module.weight.shape[0], self.module.weight[0].numel()
        return math.prod(self.output_shape[1:]) // out_features, in_features, out_features

    @abc.abstractmethod
    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The module's inputs as rows of patches `(positions, I)`."""

    @abc.abstractmethod
    def cotangents(self, g: torch.Tensor, n_lead: int) -> torch.Tensor:
        """Output cotangents `(*lead, M, …)` as `(*lead, M·P, J)`."""

    def bias_scale(self):
        return 1.


class _LinearRule(_AffineRule):
    """`nn.Linear`: features last, every leading axis a position."""

    def patches(self, x):
        return x.reshape(-1, x.shape[-1])

    def cotangents(self, g, n_lead):
        return g.reshape(*g.shape[:n_lead], -1, g.shape[-1])


class _DenseRule(_AffineRule):
    """`stax.Dense`: channels on axis 1, scaled by `W_std/√C` (NTK parameterization)."""

    def patches(self, x):
        module = self.module
        scale = (module.W_std / math.sqrt(x.shape[1]) if module.parameterization == 'ntk'
                 else 1 / math.sqrt(module.s[0]))
        return x.movedim(1, -1).reshape(-1, x.shape[1]) * scale

    def cotangents(self, g, n_lead):
        return g.movedim(n_lead + 1, -1).reshape(*g.shape[:n_lead], -1, g.shape[n_lead + 1])

    def bias_scale(self):
        return self.module.b_std if self.module.parameterization == 'ntk' else 1.


class _ConvRule(_AffineRule):
    """`nn.Conv1d`, `nn.Conv2d` with `groups=1` and zero padding: image patches by `unfold`."""

    def patches(self, x):
        m = self.module
        if x.ndim == 3:   # Conv1d as a Conv2d of height 1
            x = x[:, :, None]
            kwargs = dict(kernel_size=(1, *m.kernel_size), dilation=(1, *m.dilation),
                          padding=(0, 0) if m.padding == 'valid' else (0, *m.padding),
                          stride=(1, *m.stride))
        else:
            kwargs = dict(kernel_size=m.kernel_size, dilation=m.dilation,
                          padding=0 if m.padding == 'valid' else m.padding, stride=m.stride)
        columns = F.unfold(x, **kwargs)                       # (M, C·k, P)
        return columns.transpose(1, 2).reshape(-1, columns.shape[1])

    def cotangents(self, g, n_lead):
        g = g.flatten(n_lead + 2).movedim(n_lead + 1, -1)     # (*lead, M, P, J)
        return g.reshape(*g.shape[:n_lead], -1, g.shape[-1])


def _rule_for(name: str, module: nn.Module) -> _AffineRule | None:
    if type(module) is StaxDense or (isinstance(module, nn.Linear)
                                     and type(module).forward is nn.Linear.forward):
        return (_DenseRule if isinstance(module, StaxDense) else _LinearRule)(name, module)
    if (isinstance(module, (nn.Conv1d, nn.Conv2d))
            and type(module).forward in (nn.Conv1d.forward, nn.Conv2d.forward)
            and module.groups == 1 and module.padding_mode == 'zeros'
            and module.padding != 'same'):
        return _ConvRule(name, module)
    return None


# The three implementations.

def _jacobian_contraction(problem: _Problem) -> torch.Tensor:
    total = None
    for chunk in problem.parameter_chunks():
        j1 = problem.jacobians(problem.x1, chunk, {})[0]
        j2 = j1 if problem.x2 is None else problem.jacobians(problem.x2, chunk, {})[0]
        for name, p in chunk.items():
            term = problem.spec.contract(j1[name], j2[name], n_param_dims=p.ndim)
            total = term if total is None else total + term
    return total


def _ntk_vector_products(problem: _Problem) -> torch.Tensor:
    f = lambda p, x: _apply(problem.model, p, x)
    x1 = problem.x1
    x2 = x1 if problem.x2 is None else problem.x2
    try:
        if problem.batched:
            full = _ntk_by_vector_products_per_example(f, problem.params, x1, x2,
                                                       problem.chunk_bytes)
        else:
            full = _ntk_by_vector_products(f, problem.params, x1, x2)
    except NotImplementedError as error:
        if 'forward AD' not in str(error):
            raise
        raise _Unsupported("empirical_ntk_fn: implementation='ntk_vector_products' needs "
                           f"forward-mode AD, which an operation of the model lacks ({error}); "
                           "use implementation='jacobian_contraction'") from error
    except RuntimeError as error:
        if 'random' not in str(error):
            raise
        raise _Unsupported("empirical_ntk_fn: implementation='ntk_vector_products' needs a "
                           "deterministic model (random layers such as dropout in training mode "
                           "draw new values in every product); call model.eval() or use "
                           "implementation='jacobian_contraction'") from error
    return problem.spec.contract_full(full)


def _ntk_by_vector_products(f: Callable, params: Params, x1: torch.Tensor,
                            x2: torch.Tensor) -> torch.Tensor:
    """The full NTK `(*out1, *out2)` as `J1 J2ᵀ` applied to the basis of `f(x2)`."""
    out2, vjp_fn = vjp(lambda p: f(p, x2), params)
    out1 = f(params, x1)

    def column(cotangent: torch.Tensor) -> torch.Tensor:
        (tangent,) = vjp_fn(cotangent)
        return jvp(lambda p: f(p, x1), (params,), (tangent,))[1]

    basis = torch.eye(out2.numel(), dtype=out2.dtype, device=out2.device).reshape(-1, *out2.shape)
    columns = vmap(column)(basis)                 # (|out2|, *out1)
    return columns.reshape(out2.numel(), out1.numel()).T.reshape(*out1.shape, *out2.shape)


def _ntk_by_vector_products_per_example(f: Callable, params: Params, x1: torch.Tensor,
                                        x2: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """As `_ntk_by_vector_products`, with the `vjp` on one `x2` example at a time."""
    out1 = f(params, x1)
    example_shape = out1.shape[1:]
    n_outputs = math.prod(example_shape)
    basis = torch.eye(n_outputs, dtype=out1.dtype, device=out1.device).reshape(-1, *example_shape)

    def columns(x: torch.Tensor) -> torch.Tensor:
        _, vjp_fn = vjp(lambda p: f(p, x[None])[0], params)

        def column(cotangent: torch.Tensor) -> torch.Tensor:
            (tangent,) = vjp_fn(cotangent)
            return jvp(lambda p: f(p, x1), (params,), (tangent,))[1]

        return vmap(column)(basis)                # (O, *out1)

    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    chunk = max(1, chunk_bytes // max(1, 4 * n_outputs * param_bytes))
    cols = vmap(columns, chunk_size=chunk)(x2)    # (N2, O, *out1)
    cols = cols.reshape(x2.shape[0] * n_outputs, out1.numel()).T
    return cols.reshape(*out1.shape, x2.shape[0], *example_shape)


def _structured_derivatives(problem: _Problem) -> torch.Tensor:
    rules = problem.rules
    structured = {n for rule in rules.values() for n in rule.param_names()}
    other = {n: p for n, p in problem.params.items() if n not in structured}
    side1 = problem.jacobians(problem.x1, other, rules)
    side2 = side1 if problem.x2 is None else problem.jacobians(problem.x2, other, rules)
    spec = problem.spec
    total = sum(spec.contract(side1[0][n], side2[0][n], n_param_dims=p.ndim)
                for n, p in other.items())
    n_lead = len(problem.out_shape)
    for name, rule in rules.items():
        a1, a2 = (rule.patches(side[2][name].flatten(0, 1) if problem.batched else side[2][name])
                  for side in (side1, side2))
        g1, g2 = (rule.cotangents(side[1][name], n_lead) for side in (side1, side2))
        if problem.batched:
            a1, a2 = (a.reshape(n, -1, a.shape[-1]) for a, n in ((a1, problem.n1), (a2, problem.n2)))
        jacobian_flops, gram_flops = problem.route_flops(rule)
        if jacobian_flops <= gram_flops:
            j1, j2 = (_weight_jacobian(a, g, problem.batched) for a, g in ((a1, g1), (a2, g2)))
            total = total + spec.contract(j1, j2, n_param_dims=2)
        else:
            total = total + spec.contract_gram(g1, g2, a1, a2, problem.batched)
        if rule.module.bias is not None:
            scale = rule.bias_scale()
            total = total + spec.contract(g1.sum(-2) * scale, g2.sum(-2) * scale, n_param_dims=1)
    return total


def _weight_jacobian(a: torch.Tensor, g: torch.Tensor, batched: bool) -> torch.Tensor:
    """`Σ_p g[…, p, j] a[p, i]`: `(*out, J, I)`."""
    if batched:
        return torch.einsum('n...pj,npi->n...ji', g, a)
    return torch.einsum('...pj,pi->...ji', g, a)


_COMPUTE = {'jacobian_contraction': _jacobian_contraction,
            'ntk_vector_products': _ntk_vector_products,
            'structured_derivatives': _structured_derivatives}


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

    def multiply_adds(self, shape1: Sequence[int], shape2: Sequence[int]) -> int:
        """Entries of the result times entries of the traced axes."""
        trace_or_diagonal = set(self.trace) | {i for i, (a, b) in enumerate(
            zip(self.side1, self.side2)) if a == b}
        return math.prod(shape1[i] if i in trace_or_diagonal else shape1[i] * shape2[i]
                         for i in range(len(self.side1)))

    def contract_gram(self, g1: torch.Tensor, g2: torch.Tensor, a1: torch.Tensor,
                      a2: torch.Tensor, batched: bool) -> torch.Tensor:
        """`Σ_{p,q} (a1[p]·a2[q]) (g1[…, p]·g2[…, q])` over positions, contracted.

        `g`: `(*out, P, J)`; `a`: `(N, P, I)` when batched (positions of one
        example, axis 0 of `out` is the example), else `(P, I)`.
        """
        side1, side2, result = ''.join(self.side1), ''.join(self.side2), ''.join(self.result)
        if batched:
            gram = torch.einsum('nPI,mQI->nmPQ', a1, a2)
            gram_letters = self.side1[0] + self.side2[0]
        else:
            gram, gram_letters = a1 @ a2.T, ''
        spec = f"{side1}PJ,{side2}QJ,{gram_letters}PQ->{result}"
        return torch.einsum(spec, g1, g2, gram) / self._divisor(g1.shape)

    def contract_full(self, full: torch.Tensor) -> torch.Tensor:
        """Apply the traces and diagonals to a full `(*out1, *out2)` kernel."""
        spec = f"{''.join(self.side1)}{''.join(self.side2)}->{''.join(self.result)}"
        return torch.einsum(spec, full) / self._divisor(full.shape)
