"""`_Problem`: one kernel to compute, its shapes, Jacobians and FLOP estimates."""

from __future__ import annotations

import collections
import functools
import logging
import math
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.func import jacrev, vmap
from torch.utils import _pytree as pytree  # torch.func's own pytrees

from .contraction import output_contractions
from .cost import contraction_order
from .inputs import split_kwargs
from .model import (Params, PyTree, batch_mixing_modules, failures_explained,
                    forward_with_probes, global_hooks, output_tensors, shape_signature,
                    traced_forward, zeros)
from .structured import AffineRule, ConvRule, LinearRule, rule_for
from .vmap_axes import BatchAxes, VmapAxes

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = ('jacobian_contraction', 'ntk_vector_products', 'structured_derivatives')


class _Side:
    """One argument of the kernel: inputs, keyword arguments, the output
    tensors' shapes, and the shapes every module sees in one call of the
    model (one example's call with `vmap_axes`)."""

    def __init__(self, x: PyTree, kwargs: dict[str, Any], out_shapes: list[tuple[int, ...]],
                 calls: dict[str, list]):
        self.x, self.kwargs, self.out_shapes, self.calls = x, kwargs, out_shapes, calls

    def outputs(self) -> int:
        return sum(math.prod(shape) for shape in self.out_shapes)


class _Problem:
    """One kernel to compute: model, parameters, inputs, contraction, and their sizes.

    A forward pass on `x1` (no gradients, buffers copied, RNG state restored,
    so the model and the random stream are left as they were) records the
    output shapes, the forward FLOPs and every module's calls; with a `cache`
    (`empirical_ntk_fn` keeps one), once per shapes of the inputs and
    parameters.
    """

    def __init__(self, model: nn.Module, params: Params, x1: PyTree, x2: PyTree | None,
                 kwargs: dict[str, Any], trace_axes: Sequence[int],
                 diagonal_axes: Sequence[int], vmap_axes: VmapAxes, chunk_bytes: int,
                 count_flops: bool = True, cache: dict | None = None):
        self.model, self.params, self.chunk_bytes = model, params, chunk_bytes
        self.modules = dict(model.named_modules())
        kwargs1, kwargs2 = split_kwargs(kwargs)
        # What the forward passes find depends on the shapes (and on which
        # modules train) alone: with a `cache`, they run once per shapes.
        key = None if cache is None else shape_signature(self.modules, params, (x1, x2), kwargs)
        if key is None or key not in cache:
            found = self._analyze(x1, x2, kwargs1, kwargs2, vmap_axes, count_flops)
            if key is not None:
                if len(cache) >= 64:
                    cache.clear()
                cache[key] = found
        else:
            found = cache[key]
        self.axes, self.out_tree, self.forward_flops, shapes, calls = found
        self.side1 = _Side(x1, kwargs1, shapes[0], calls[0])
        self.side2 = self.side1 if x2 is None else _Side(x2, kwargs2, shapes[1], calls[1])
        self.specs = output_contractions(self.side1.out_shapes, self.side2.out_shapes,
                                          trace_axes, diagonal_axes, 'empirical_ntk_fn')
        self.rules = self._structured_rules()

    def _analyze(self, x1: PyTree, x2: PyTree | None, kwargs1: dict[str, Any],
                 kwargs2: dict[str, Any], vmap_axes: VmapAxes, count_flops: bool) -> tuple:
        """`(axes, output tree, forward FLOPs, output shapes of each side, module
        calls of each side)` from forward passes (the second side's `None` when
        `x2` is); checks that per-example outputs equal the batched ones."""
        model, params = self.model, self.params
        self.axes = None if vmap_axes is None else BatchAxes(vmap_axes, x1, kwargs1)
        if self.axes is not None and not self.axes.maps_something:
            self.axes = None
        if self.axes is not None:
            n1 = self.axes.batch_size(x1, kwargs1)
            if n1 == 0 or (x2 is not None and self.axes.batch_size(x2, kwargs2) == 0):
                # No example to call the model on: the batched forward gives
                # the output shapes, and the kernels are empty.
                self.axes = None
        if self.axes is not None:
            # The first two examples stand for the batch (their batch is
            # checked against their per-example calls below).
            x, mapped = self.axes.examples(x1, kwargs1, 0, min(n1, 2))
            with failures_explained('empirical_ntk_fn', 'x1', model, params, x1, kwargs1,
                                     cut=True):
                out1, flops, calls1 = traced_forward(model, params, x, {**kwargs1, **mapped},
                                                      self.modules, count_flops)
            forward_flops = flops * n1 / min(n1, 2)
            mixing = batch_mixing_modules(self.modules, calls1)
            if mixing:
                logger.info("empirical_ntk_fn: %s mix batch elements or draw random numbers; "
                            "differentiating whole batches (vmap_axes=None)", ', '.join(mixing))
                self.axes = None
        if self.axes is None:
            with failures_explained('empirical_ntk_fn', 'x1', model, params, x1, kwargs1):
                out1, forward_flops, calls1 = traced_forward(model, params, x1, kwargs1,
                                                              self.modules, count_flops)
        leaves1, self.out_tree = output_tensors(out1, 'empirical_ntk_fn')
        shapes, calls = [None, None], [None, None]
        if self.axes is None:
            shapes[0], calls[0] = [tuple(o.shape) for o in leaves1], calls1
            if x2 is not None:
                with failures_explained('empirical_ntk_fn', 'x2', model, params, x2, kwargs2):
                    out2, _, calls[1] = traced_forward(model, params, x2, kwargs2, self.modules)
                leaves2 = output_tensors(out2, 'empirical_ntk_fn', self.out_tree)[0]
                shapes[1] = [tuple(o.shape) for o in leaves2]
        else:
            # Modules record their shapes in one example's call (what the Jacobians see).
            self.axes.set_outputs(out1)
            examples, calls[0] = self._example_forward('x1', x1, kwargs1, min(n1, 2))
            self._check_per_example_outputs(leaves1, examples)
            shapes[0] = self._batch_shapes(examples, n1)
            if x2 is not None:
                examples, calls[1] = self._example_forward('x2', x2, kwargs2, 1)
                shapes[1] = self._batch_shapes(examples, self.axes.batch_size(x2, kwargs2))
        return self.axes, self.out_tree, forward_flops, shapes, calls

    def _batch_shapes(self, examples: list[torch.Tensor], n: int) -> list[tuple[int, ...]]:
        """Output shapes of `n` examples from outputs `(k, *example)` of `k` examples."""
        return [tuple(o.shape[1:axis + 1]) + (n,) + tuple(o.shape[axis + 1:])
                for o, axis in zip(examples, self.axes.out_axes)]

    @property
    def outputs_empty(self) -> bool:
        """Whether every output has no entries on one side (no examples): no
        Jacobian has entries either."""
        return all(0 in shape1 or 0 in shape2
                   for shape1, shape2 in zip(self.side1.out_shapes, self.side2.out_shapes))

    def kernels_of_empty_outputs(self) -> list[torch.Tensor]:
        """The kernels when `outputs_empty`: contractions of empty outputs, of
        the shapes the outputs give."""
        like = next(iter(self.params.values()))
        return [spec.normalized(spec.contract(zeros(shape1, like), zeros(shape2, like),
                                              n_param_dims=0), shape1)
                for spec, shape1, shape2 in zip(self.specs, self.side1.out_shapes,
                                                self.side2.out_shapes)]

    @property
    def same_inputs(self) -> bool:
        return self.side2 is self.side1

    def unflatten(self, kernels: list[torch.Tensor]) -> PyTree:
        return pytree.tree_unflatten(kernels, self.out_tree)

    def batch_sizes(self) -> tuple[int, int]:
        """Examples on each side (with `vmap_axes`), else 1: the number of model calls."""
        if self.axes is None:
            return 1, 1
        axis = self.axes.out_axes[0]
        return self.side1.out_shapes[0][axis], self.side2.out_shapes[0][axis]

    def _example_forward(self, name: str, batch: PyTree, kwargs: dict[str, Any], n: int
                         ) -> tuple[list[torch.Tensor], dict[str, list]]:
        """Outputs `(n, *example)` of the first `n` examples of input `name`,
        each in its own call, and `{module: [(input shape, output shape)]}` of one call."""
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

    def _check_per_example_outputs(self, outputs: list[torch.Tensor],
                                   examples: list[torch.Tensor]) -> None:
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

    def _structured_rules(self) -> dict[str, AffineRule]:
        owners = collections.Counter(id(p) for m in self.modules.values()
                                     for p in m.parameters(recurse=False))
        rules = {}
        for name, module in self.modules.items():
            rule = rule_for(name, module, self.params)
            calls = (self.side1.calls.get(name, ()), self.side2.calls.get(name, ()))
            if rule is None or any(len(c) != 1 for c in calls) or not rule.param_names():
                continue
            own = dict(module.named_parameters(recurse=False))
            if set(own) <= {'weight', 'bias'} and all(owners[id(p)] == 1 for p in own.values()):
                rules[name] = rule
        return rules

    # Sizes for the FLOP estimates.

    def contraction_size(self) -> int:
        """Result entries times traced entries: the multiply-adds per parameter."""
        return sum(spec.multiply_adds(shape1, shape2) for spec, shape1, shape2
                   in zip(self.specs, self.side1.out_shapes, self.side2.out_shapes))

    def _per_call(self) -> list[tuple[int, float, float]]:
        """`(calls, forward FLOPs per call, outputs per call)` of each side."""
        calls1, calls2 = self.batch_sizes()
        forward = self.forward_flops / calls1
        ratio = self.side2.outputs() / self.side1.outputs()
        return [(calls1, forward, self.side1.outputs() / calls1),
                (calls2, forward * (1 if self.axes else ratio), self.side2.outputs() / calls2)]

    def _jacobian_pass_flops(self, reverse_per_forward: float) -> float:
        """FLOPs of one forward and one reverse pass per output entry, on both sides."""
        sides = self._per_call()[:1 if self.same_inputs else 2]
        return sum(calls * forward * (1 + outputs * reverse_per_forward)
                   for calls, forward, outputs in sides)

    def flops(self, implementation: str) -> float:
        n_params = sum(p.numel() for p in self.params.values())
        k = self.contraction_size()
        if implementation == 'jacobian_contraction':
            return self._jacobian_pass_flops(2.) + 2 * k * n_params
        if implementation == 'ntk_vector_products':
            calls2, forward2, outputs2 = self._per_call()[1]
            return calls2 * forward2 * (1 + 2 * outputs2) + 3 * self.forward_flops * calls2 * outputs2
        structured = {n for rule in self.rules.values() for n in rule.param_names()}
        other = sum(p.numel() for n, p in self.params.items() if n not in structured)
        passes = self._jacobian_pass_flops(1 + other / n_params)
        return passes + 2 * k * other + 2 * sum(
            contraction_order(*self.structured_operands(leaf, rule), self.max_entries())[0]
            for leaf in range(len(self.specs)) for rule in self.rules.values())

    def structured_operands(self, leaf: int, rule: AffineRule
                            ) -> tuple[list[str], str, dict[str, int]]:
        """Einsum terms, result and sizes of `rule`'s contribution to output `leaf`."""
        shapes = []
        for side in (self.side1, self.side2):
            rows = rule.rows(side.calls[rule.name][0][1])
            shapes.append((side.out_shapes[leaf], rows))
        return self.specs[leaf].affine_terms(shapes, rule.groups, rule.columns(), rule.outputs(),
                                             rule.cotangent_layout, self.batch_axis(leaf))

    def is_output_identity(self, leaf: int, rule: AffineRule, cotangents: torch.Tensor) -> bool:
        """Whether the cotangents `(*out, *y)` of `rule`'s layer are exactly the
        identity between one call's outputs and `y`, with no gradient through
        them: the layer's output is the model's output (an `nn.Linear` head)."""
        ndim, axis = self.specs[leaf].ndim, self.batch_axis(leaf)
        one_call = tuple(1 if i == axis else n for i, n in enumerate(cotangents.shape[:ndim]))
        if (not isinstance(rule, LinearRule) or cotangents.requires_grad or axis == ndim - 1
                or one_call != cotangents.shape[ndim:]):
            return False
        size = cotangents.shape[ndim:].numel()
        square = cotangents if axis is None else cotangents.movedim(axis, 0)
        square = square.reshape(-1, size, size)
        return torch.equal(square, torch.eye(size, dtype=square.dtype, device=square.device)
                           .expand_as(square))

    def output_layer_operands(self, leaf: int, a1: torch.Tensor, a2: torch.Tensor
                              ) -> tuple[list[str], str, tuple[torch.Tensor, ...]]:
        r"""Einsum terms, result and operands of the contribution of an `nn.Linear`
        head (`is_output_identity`) to output `leaf`:

        .. math:: Θ[(r, o), (s, o')] = (a_1[r] · a_2[s])\, δ(o, o')

        at output positions `r` and `s` and features `o` and `o'`: the rows of
        `a1 ([N1], R, 1, I)` (one call's positions, less the batch axis of a
        call on one example) take the letters of the output axes they are, and
        `δ(o, o')` is the identity between the two outputs' feature axes (a
        size-`O` vector of ones where they share a letter, traced or diagonal).
        No cotangent enters: `O²` times fewer multiply-adds than the general
        rule.
        """
        spec, axis = self.specs[leaf], self.batch_axis(leaf)
        per_call = [i for i in range(spec.ndim) if i != axis]
        terms, operands = [], []
        for side, letters, a in ((self.side1, spec.side1, a1), (self.side2, spec.side2, a2)):
            batch = '' if axis is None else letters[axis]
            rows = [side.out_shapes[leaf][i] for i in per_call[:-1]]
            terms.append(batch + ''.join(letters[i] for i in per_call[:-1]) + 'yx')
            operands.append(a.reshape(*a.shape[:len(batch)], *rows, *a.shape[len(batch) + 1:]))
        features = self.side1.out_shapes[leaf][per_call[-1]]
        eye = torch.eye(features, dtype=a1.dtype, device=a1.device)
        delta = ''.join(dict.fromkeys(spec.side1[per_call[-1]] + spec.side2[per_call[-1]]))
        terms.append(delta)
        operands.append(eye if len(delta) == 2 else eye.new_ones(features))
        return terms, spec.result, tuple(operands)

    def max_entries(self) -> int:
        """Entries of an intermediate result within `chunk_bytes`."""
        element_size = max(p.element_size() for p in self.params.values())
        return self.chunk_bytes // element_size

    def batch_axis(self, leaf: int) -> int | None:
        return None if self.axes is None else self.axes.out_axes[leaf]

    def cheapest(self) -> str:
        return min(IMPLEMENTATIONS, key=self.flops)

    # Jacobians.

    def jacobians(self, side: _Side, wrt: Params, rules: dict[str, AffineRule]
                  ) -> tuple[list[Params], list[Params], Params]:
        """Jacobians of the outputs on `side` w.r.t. `wrt` and the outputs of `rules`' layers.

        Returns, per output tensor, `{name: (*out, *θ)}` and `{layer: (*out, *y)}`
        (`y` the layer's output in one call of the model: one example's call
        with `vmap_axes`), and the layers' inputs `{layer: a}`, `a` of shape
        `(N, *a)` with `vmap_axes` (one call per example), else as seen.
        """
        if not wrt and rules and self.chain is not None:
            return self.chain_jacobians(side, rules)
        fixed = {n: p for n, p in self.params.items() if n not in wrt}

        def f(wrt: Params, probes: Params, x: PyTree, kwargs: dict[str, Any]):
            out, inputs = forward_with_probes(self.model, {**fixed, **wrt}, probes,
                                               self.modules, x, kwargs)
            return tuple(pytree.tree_leaves(out)), inputs

        probes = {name: zeros(side.calls[name][0][1], rule.weight(self.params))
                  for name, rule in rules.items()}
        if self.axes is None:
            jac, inputs = jacrev(f, argnums=(0, 1), has_aux=True)(wrt, probes, side.x, side.kwargs)
        else:
            example = self.axes.per_example(f, side.kwargs)
            jac, inputs = vmap(jacrev(example, argnums=(0, 1), has_aux=True),
                               in_dims=(None, None, *self.axes.in_dims()))(
                wrt, probes, side.x, self.axes.mapped(side.kwargs))
            # vmap puts the examples first; move them to the outputs' batch axes.
            jac = [pytree.tree_map(lambda t: t.movedim(0, axis), j)
                   for j, axis in zip(jac, self.axes.out_axes)]
        return [j[0] for j in jac], [j[1] for j in jac], inputs

    @functools.cached_property
    def chain(self) -> list[tuple[str, str, nn.Module | AffineRule]] | None:
        """The model as a chain of layers `chain_jacobians` differentiates, if it is one.

        That is nested `nn.Sequential`s of `nn.Linear`, zero-padded `nn.Conv`,
        elementwise activations without parameters (not in place), `nn.Flatten`
        of the example's axes, `nn.Identity` and dropout that is off, without
        hooks, called on one tensor with batch axis 0 (`vmap_axes`) and no
        keyword arguments. Entries `(name, kind, rule or module)`, `kind` one
        of 'affine', 'elementwise', 'reshape'.
        """
        axes = self.axes
        if (axes is None or axes.x_axes != [0] or axes.out_axes != [0] or self.side1.kwargs
                or self.side2.kwargs or not isinstance(self.side1.x, torch.Tensor)
                or len(self.side1.out_shapes) != 1 or global_hooks()):
            return None
        chain = []
        for name, module in self.modules.items():   # in the order nested Sequentials run them
            if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                    or module._backward_pre_hooks):
                return None
            if type(module) is nn.Sequential:
                continue
            calls = [side.calls.get(name, ()) for side in (self.side1, self.side2)]
            if any(len(c) != 1 for c in calls):
                return None
            rule = rule_for(name, module, self.params)
            if type(rule) is LinearRule or (type(rule) is ConvRule
                                             and rule.zero_padding() is not None):
                chain.append((name, 'affine', rule))
            elif type(module) in ELEMENTWISE and not getattr(module, 'inplace', False):
                chain.append((name, 'elementwise', module))
            elif type(module) is nn.Identity or (isinstance(module, DROPOUTS) and not (
                    module.training and module.p > 0)):
                chain.append((name, 'reshape', module))
            elif type(module) is nn.Flatten and module.start_dim % len(calls[0][0][0]) >= 1:
                chain.append((name, 'reshape', module))
            else:
                return None
        return chain

    def chain_jacobians(self, side: _Side, rules: dict[str, AffineRule]
                        ) -> tuple[list[Params], list[Params], Params]:
        """`jacobians` of the layers `rules` of a `chain`, without parameters:
        one batched forward pass through the chain's layers (keeping their
        inputs and the activations' derivatives), then the output's cotangents
        (the identity per example) taken back through the chain, layer by
        layer, as batches `(N, *out, *y)`: by `W` (`nn.Linear`; the first, on
        the identity, is `W` itself), a transposed convolution, or the
        activations' derivatives. The same cotangents as `jacrev`'s, without
        its per-call overhead and broadcast products."""
        names = [name for name, _, _ in self.chain]
        out, inputs, derivatives = side.x, {}, {}
        for name, kind, layer in self.chain:
            inputs[name] = out
            if kind == 'affine':
                out = layer.forward(out, self.params)
            elif kind == 'elementwise':
                out, derivatives[name] = with_derivative(layer, out)
            else:
                out = layer(out)
        n, out_shape = out.shape[0], out.shape[1:]
        size = out_shape.numel()
        g = torch.eye(size, dtype=out.dtype, device=out.device).view(*out_shape, *out_shape)
        g = g.expand(n, *g.shape)
        owned = False   # whether g is a tensor of ours nothing else refers to
        first = min(names.index(name) for name in rules)
        cotangents = {}
        for name, kind, layer in reversed(self.chain[first:]):
            x = inputs[name]
            if kind == 'affine':
                if name in rules:
                    cotangents[name] = g.unsqueeze(1 + len(out_shape))
                if name == names[first]:
                    break
                weight = layer.weight(self.params)
                if name == names[-1] and isinstance(layer, LinearRule) and len(out_shape) == 1:
                    g, owned = weight.expand(n, *weight.shape), False
                else:
                    y_shape = g.shape[1 + len(out_shape):]
                    g = layer.input_cotangents(g.reshape(-1, *y_shape), weight, x.shape[1:])
                    g, owned = g.view(n, *out_shape, *x.shape[1:]), True
            elif kind == 'elementwise':
                derivative = derivatives[name].view(n, *(1,) * len(out_shape), *x.shape[1:])
                if owned and not (torch.is_grad_enabled()
                                  and (g.requires_grad or derivative.requires_grad)):
                    g = g.mul_(derivative)
                else:
                    g, owned = g * derivative, True
            else:
                g = g.reshape(n, *out_shape, *x.shape[1:])
        return [{}], [cotangents], {name: inputs[name].unsqueeze(1) for name in rules}

    def both_jacobians(self, wrt: Params, rules: dict[str, AffineRule]) -> tuple[tuple, tuple]:
        """`jacobians` on both sides; one call on `x1` and `x2` joined along
        the batch axes where that is the same computation (bigger products,
        half the per-call overhead)."""
        if self.same_inputs:
            derivatives = self.jacobians(self.side1, wrt, rules)
            return derivatives, derivatives
        joined = self._joined_side()
        if joined is None:
            return self.jacobians(self.side1, wrt, rules), self.jacobians(self.side2, wrt, rules)
        d_params, d_probes, inputs = self.jacobians(joined, wrt, rules)
        n1, n2 = self.batch_sizes()

        def part(start: int, length: int) -> tuple[list[Params], list[Params], Params]:
            def cut(per_output: list[Params]) -> list[Params]:
                return [{name: t.narrow(axis, start, length) for name, t in d.items()}
                        for d, axis in zip(per_output, self.axes.out_axes)]
            return (cut(d_params), cut(d_probes),
                    {name: a.narrow(0, start, length) for name, a in inputs.items()})

        return part(0, n1), part(n1, n2)

    def _joined_side(self) -> _Side | None:
        """`x1` and `x2` as one batch, if their examples differ in nothing but values."""
        side1, side2, axes = self.side1, self.side2, self.axes
        if axes is None or side1.calls != side2.calls or set(side1.kwargs) != set(side2.kwargs):
            return None
        if any(side1.kwargs[k] is not side2.kwargs[k] for k in side1.kwargs
               if k not in axes.kwargs_axes):
            return None

        def join(tree1: PyTree, tree2: PyTree, leaf_axes: list[int | None]) -> PyTree | None:
            leaves1, tree = pytree.tree_flatten(tree1)
            leaves2 = pytree.tree_leaves(tree2)
            joined = []
            for a, b, axis in zip(leaves1, leaves2, leaf_axes):
                if axis is None:
                    if a is not b:
                        return None
                    joined.append(a)
                elif a.shape[:axis] + a.shape[axis + 1:] != b.shape[:axis] + b.shape[axis + 1:]:
                    return None
                else:
                    joined.append(torch.cat([a, b], axis))
            return pytree.tree_unflatten(joined, tree)

        x = join(side1.x, side2.x, axes.x_axes)
        mapped = {k: join(side1.kwargs[k], side2.kwargs[k], a) for k, a in axes.kwargs_axes.items()}
        if x is None or any(v is None for v in mapped.values()):
            return None
        n1, n2 = self.batch_sizes()
        shapes = [s[:a] + (n1 + n2,) + s[a + 1:] for s, a in zip(side1.out_shapes, axes.out_axes)]
        return _Side(x, {**side1.kwargs, **mapped}, shapes, side1.calls)

    def parameter_chunks(self) -> Iterator[Params]:
        rows = self.side1.outputs() + (0 if self.same_inputs else self.side2.outputs())
        chunk, size = {}, 0
        for name, p in self.params.items():
            nbytes = rows * p.numel() * p.element_size()
            if chunk and size + nbytes > self.chunk_bytes:
                yield chunk
                chunk, size = {}, 0
            chunk[name], size = p, size + nbytes
        if chunk:
            yield chunk


#: Elementwise activations without parameters (`_Problem.chain`).
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh,
                nn.Hardsigmoid, nn.Hardswish, nn.LogSigmoid, nn.Tanhshrink)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def with_derivative(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`σ(x)` and `σ'(x)` of an elementwise `layer`, the latter as the gradient
    of `Σ σ(x)` (itself differentiable where a gradient flows through `x`)."""
    create_graph = torch.is_grad_enabled() and x.requires_grad
    with torch.enable_grad():
        x = x if create_graph else x.detach().requires_grad_()
        y = layer(x)
        derivative = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=create_graph)[0]
    return (y if create_graph else y.detach()), derivative
