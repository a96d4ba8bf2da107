"""Structured derivatives: rules of layers whose output is affine in their
parameters (`nn.Linear`, `nn.Conv1d/2d/3d`, stax `Dense` and `Conv`)."""

from __future__ import annotations

import abc
import collections
import math
from typing import TYPE_CHECKING, Collection, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.conv import same_padding
from ..ops.products import einsum_pair
from ..stax.conv import Conv as StaxConv
from ..stax.finite_conv import pad_input
from ..stax.linear import Dense as StaxDense
from .model import Params

if TYPE_CHECKING:
    from .analysis import Batch
    from .task import NtkTask


# Structured derivatives: layers whose output is affine in the weight.

class AffineRule(abc.ABC):
    r"""A layer computing :math:`y[r, g, j] = s_W \sum_i W[g, j, i]\, a[r, g, i] + s_b\, b[g, j]`
    at rows `r` (positions), in `G` groups of `J/G` outputs.

    Its parameter Jacobian is :math:`∂y[r, g, j]/∂W[g, j, i] = s_W a[r, g, i]`
    and :math:`∂y[r, g, j]/∂b[g, j] = s_b`: the bias is a weight on a constant
    input `s_b`, so `patches` appends that column to the (scaled) inputs of
    the trainable weight, and one contraction covers both parameters.
    Subclasses turn the layer's input into `a` and the cotangent of its output
    into `g`, rows in the same order.
    """

    groups = 1
    #: Order of rows (R), groups (G) and outputs (J) in `cotangents`.
    cotangent_layout = 'RGJ'

    def __init__(self, name: str, module: nn.Module, trainable: Collection[str]):
        prefix = f"{name}." if name else ''
        self.name, self.module = name, module
        self.weight_name, self.bias_name = prefix + 'weight', prefix + 'bias'
        self.trains_weight = self.weight_name in trainable
        self.trains_bias = module.bias is not None and self.bias_name in trainable

    def param_names(self) -> list[str]:
        return ([self.weight_name] if self.trains_weight else []) + \
            ([self.bias_name] if self.trains_bias else [])

    def weight(self, params: Params) -> torch.Tensor:
        return params.get(self.weight_name, self.module.weight)

    def bias(self, params: Params) -> torch.Tensor | None:
        return params.get(self.bias_name, self.module.bias)

    def outputs(self) -> int:
        """Outputs `J/G` per group."""
        return self.module.weight.shape[0] // self.groups

    def columns(self) -> int:
        """Columns of `patches`: the weight's inputs per output, and one for the bias."""
        return self.module.weight[0].numel() * self.trains_weight + self.trains_bias

    def rows(self, output_shape: Sequence[int]) -> int:
        """Rows of one call whose output has `output_shape`."""
        return math.prod(output_shape) // self.module.weight.shape[0]

    #: Axes of the inputs one output sees, at the end of `windows`.
    column_ndim = 1
    #: Whether `patches` holds the rows last in memory.
    rows_last = False

    @abc.abstractmethod
    def windows(self, x: torch.Tensor, n_lead: int) -> torch.Tensor:
        """Inputs `(*lead, *x)` as the inputs each output sees, a view (no copy)
        `(*lead, *rows, G, *columns)` with `column_ndim` column axes."""

    @abc.abstractmethod
    def cotangents(self, g: torch.Tensor, n_lead: int) -> torch.Tensor:
        """Output cotangents `(*lead, *y)` as `(*lead, rows, G, J/G)`, the last
        three axes in the order of `cotangent_layout`."""

    def weight_scale(self) -> float | torch.Tensor:
        return 1.

    def bias_scale(self) -> float | torch.Tensor:
        return 1.

    def patches(self, x: torch.Tensor, n_lead: int) -> torch.Tensor:
        r"""The layer's parameter Jacobian per row: :math:`(s_W a, s_b)`, `(*lead, rows, G, columns)`.

        Written into one new tensor: the windows are copied once, with the
        rows last in memory where `rows_last` (convolutions: the copy then runs
        along the image's rows, not along the few entries of a kernel row,
        about twice as fast; the products take either layout without a copy).
        """
        windows = self.windows(x, n_lead)
        lead, k = windows.shape[:n_lead], self.column_ndim
        rows, window = windows.shape[n_lead:-k - 1], windows.shape[-k:]
        inputs = math.prod(window) * self.trains_weight
        columns = inputs + self.trains_bias
        if self.rows_last:
            patches = windows.new_empty(*lead, self.groups, columns, math.prod(rows))
            patches = patches.movedim(-1, n_lead)
        else:
            patches = windows.new_empty(*lead, math.prod(rows), self.groups, columns)
        if self.trains_weight:
            patches[..., :inputs].unflatten(-1, window).unflatten(n_lead, rows).copy_(windows)
            scale = self.weight_scale()
            if not isinstance(scale, (int, float)) or scale != 1:
                patches[..., :inputs] *= scale
        if self.trains_bias:
            patches[..., inputs] = self.bias_scale()
        return patches


class LinearRule(AffineRule):
    """`nn.Linear`: features last, every other axis a position."""

    def windows(self, x, n_lead):
        return x.unsqueeze(-2)

    def cotangents(self, g, n_lead):
        return g.reshape(*g.shape[:n_lead], -1, 1, g.shape[-1])

    def forward(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """The layer's output with `params`."""
        return F.linear(x, self.weight(params), self.bias(params))

    def input_cotangents(self, g: torch.Tensor, weight: torch.Tensor,
                         input_shape: Sequence[int]) -> torch.Tensor:
        """Cotangents `(B, *input_shape)` of the input from those `(B, *y)` of
        the output: `g W`, one matrix product over all rows (oneDNN's where
        `einsum_pair` sends it)."""
        rows = g.reshape(-1, g.shape[-1])
        return einsum_pair('rj,ji->ri', rows, weight).reshape(len(g), *input_shape)


class StaxRule(AffineRule):
    """stax `Dense` and `Conv`: scaled as their parameterization says
    (`torchntk.stax.parameterization`)."""

    def weight_scale(self):
        module = self.module
        return module.parameterization.weight_multiplier(module.W_std, module.weight[0].numel())

    def bias_scale(self):
        return self.module.parameterization.bias_multiplier(self.module.b_std)


class ChannelsRule(StaxRule):
    """stax `Dense`: channels on axis 1, every other axis a position."""

    def windows(self, x, n_lead):
        return x.movedim(n_lead + 1, -1).unsqueeze(-2)

    def cotangents(self, g, n_lead):
        return g.movedim(n_lead + 1, -1).reshape(*g.shape[:n_lead], -1, 1, g.shape[n_lead + 1])


class ConvRule(AffineRule):
    """`nn.Conv1d/2d/3d`, any padding (mode, 'same', 'valid'), stride, dilation
    and groups: the patches of the padded input by strided views."""

    @property
    def groups(self) -> int:
        return self.module.groups

    @property
    def n_spatial(self) -> int:
        return len(self.module.kernel_size)

    @property
    def column_ndim(self) -> int:
        return 1 + self.n_spatial

    def padding_pairs(self) -> list[tuple[int, int]]:
        """`(before, after)` padding per spatial axis."""
        m = self.module
        if m.padding == 'valid':
            return [(0, 0)] * self.n_spatial
        if m.padding == 'same':
            # torch takes 'same' at stride 1 only, where the amounts do not depend on the size.
            return [same_padding(1, dilation * (k - 1) + 1, 1)
                    for k, dilation in zip(m.kernel_size, m.dilation)]
        return [(p, p) for p in m.padding]

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, C, *S)` inputs padded as the layer pads them."""
        m = self.module
        flat = [p for pair in reversed(self.padding_pairs()) for p in pair]  # last axis first
        if not any(flat):
            return x
        mode = 'constant' if m.padding_mode == 'zeros' else m.padding_mode
        return F.pad(x, flat, mode=mode)

    def geometry(self) -> tuple[Sequence[int], Sequence[int], Sequence[int]]:
        """Kernel size, stride and dilation per spatial axis."""
        return self.module.kernel_size, self.module.stride, self.module.dilation

    def zero_padding(self) -> tuple[int, ...] | None:
        """The layer's padding per spatial axis if it pads both sides with as many zeros."""
        pairs = self.padding_pairs()
        if self.module.padding_mode != 'zeros' or any(a != b for a, b in pairs):
            return None
        return tuple(a for a, _ in pairs)

    def forward(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """The layer's output with `params`; for zero padding (`zero_padding`)."""
        m = self.module
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.n_spatial - 1]
        return conv(x, self.weight(params), self.bias(params), m.stride, m.padding, m.dilation,
                     m.groups)

    def input_cotangents(self, g: torch.Tensor, weight: torch.Tensor,
                         input_shape: Sequence[int]) -> torch.Tensor:
        """Cotangents `(B, *input_shape)` of the input from those `(B, *y)` of
        the output (a transposed convolution); for zero padding (`zero_padding`)."""
        m = self.module
        conv_input = (torch.nn.grad.conv1d_input, torch.nn.grad.conv2d_input,
                      torch.nn.grad.conv3d_input)[self.n_spatial - 1]
        return conv_input((len(g), *input_shape), weight, g, m.stride, self.zero_padding(),
                          m.dilation, m.groups)

    def windows(self, x, n_lead):
        lead, n = x.shape[:n_lead], self.n_spatial
        x = self.padded(x.reshape(-1, *x.shape[-n - 1:]))             # (B, C, *S)
        kernel_size, stride, dilation = self.geometry()
        for d, k in enumerate(kernel_size):
            span = dilation[d] * (k - 1) + 1
            x = x.unfold(2 + d, span, stride[d])[..., ::dilation[d]]  # window axis appended
        x = x.permute(0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))  # (B, *S_out, C, *k)
        return x.unflatten(0, (*lead, -1)).unflatten(n_lead + 1 + n, (self.groups, -1))

    # Channels before positions, as the layer's output is laid out.
    cotangent_layout = 'GJR'
    rows_last = True

    def cotangents(self, g, n_lead):
        n, channels = self.n_spatial, self.module.weight.shape[0]
        g = g.reshape(*g.shape[:n_lead], -1, self.groups, channels // self.groups,
                      math.prod(g.shape[-n:]))                         # (*lead, M, G, J/G, P)
        return g.movedim(n_lead, -2).flatten(-2)                       # (*lead, G, J/G, M·P)


class StaxConvRule(StaxRule, ConvRule):
    """stax `Conv`: its own padding ('VALID', 'SAME', 'CIRCULAR'), no dilation or groups."""

    groups = 1

    @property
    def n_spatial(self) -> int:
        return len(self.module.filter_shape)

    def padded(self, x):
        m = self.module
        return pad_input(x, m.filter_shape, m.strides, m.padding)

    def geometry(self):
        return self.module.filter_shape, self.module.strides, (1,) * self.n_spatial


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def rule_for(name: str, module: nn.Module, trainable: Collection[str]) -> AffineRule | None:
    """The structured rule of `module`, if its forward is one we know exactly.

    Forward hooks may change the output the rule knows, so modules with any
    (their own or global ones) get none.
    """
    if module._forward_hooks or nn.modules.module._global_forward_hooks:
        return None
    kind = type(module)
    if kind is StaxDense:
        return ChannelsRule(name, module, trainable)
    if kind is StaxConv:
        return StaxConvRule(name, module, trainable)
    if isinstance(module, nn.Linear) and kind.forward is nn.Linear.forward:
        return LinearRule(name, module, trainable)
    if isinstance(module, _CONVS) and kind.forward in (c.forward for c in _CONVS):
        return ConvRule(name, module, trainable)
    return None


def structured_rules(modules: dict[str, nn.Module], params: Params, batch1: Batch,
                     batch2: Batch) -> dict[str, AffineRule]:
    """The layers whose parameters the structured rule differentiates: a rule
    of ours, called once per call of the model, training a parameter, and
    holding its own weight and bias, shared with no other module."""
    owners = collections.Counter(id(p) for m in modules.values()
                                 for p in m.parameters(recurse=False))
    rules = {}
    for name, module in modules.items():
        rule = rule_for(name, module, params)
        calls = (batch1.calls.get(name, ()), batch2.calls.get(name, ()))
        if rule is None or any(len(c) != 1 for c in calls) or not rule.param_names():
            continue
        own = dict(module.named_parameters(recurse=False))
        if set(own) <= {'weight', 'bias'} and all(owners[id(p)] == 1 for p in own.values()):
            rules[name] = rule
    return rules


def affine_operands(task: NtkTask, output: int, rule: AffineRule
                    ) -> tuple[list[str], str, dict[str, int]]:
    """Einsum terms, result and sizes of `rule`'s contribution to output tensor `output`."""
    shapes = []
    for batch in (task.batch1, task.batch2):
        rows = rule.rows(batch.calls[rule.name][0][1])
        shapes.append((batch.out_shapes[output], rows))
    return task.contractions[output].affine_terms(shapes, rule.groups, rule.columns(),
                                                  rule.outputs(), rule.cotangent_layout,
                                                  task.batch_axis(output))


def is_identity_head(task: NtkTask, output: int, rule: AffineRule,
                     cotangents: torch.Tensor) -> bool:
    """Whether the cotangents `(*out, *y)` of `rule`'s layer are exactly the
    identity between one call's outputs and `y`, with no gradient through
    them: the layer's output is the model's output (an `nn.Linear` head)."""
    ndim, axis = task.contractions[output].ndim, task.batch_axis(output)
    one_call = tuple(1 if i == axis else n for i, n in enumerate(cotangents.shape[:ndim]))
    if (not isinstance(rule, LinearRule) or cotangents.requires_grad or axis == ndim - 1
            or one_call != cotangents.shape[ndim:]):
        return False
    size = cotangents.shape[ndim:].numel()
    square = cotangents if axis is None else cotangents.movedim(axis, 0)
    square = square.reshape(-1, size, size)
    return torch.equal(square, torch.eye(size, dtype=square.dtype, device=square.device)
                       .expand_as(square))


def linear_head_operands(task: NtkTask, output: int, a1: torch.Tensor, a2: torch.Tensor
                         ) -> tuple[list[str], str, tuple[torch.Tensor, ...]]:
    r"""Einsum terms, result and operands of the contribution of an `nn.Linear`
    head (`is_identity_head`) to output tensor `output`:

    .. math:: Θ[(r, o), (s, o')] = (a_1[r] · a_2[s])\, δ(o, o')

    at output positions `r` and `s` and features `o` and `o'`: the rows of
    `a1 ([N1], R, 1, I)` (one call's positions, less the batch axis of a
    call on one example) take the letters of the output axes they are, and
    `δ(o, o')` is the identity between the two outputs' feature axes (a
    size-`O` vector of ones where they share a letter, traced or diagonal).
    No cotangent enters: `O²` times fewer multiply-adds than the general
    rule.
    """
    contraction, axis = task.contractions[output], task.batch_axis(output)
    per_call = [i for i in range(contraction.ndim) if i != axis]
    terms, operands = [], []
    for batch, letters, a in ((task.batch1, contraction.letters1, a1),
                              (task.batch2, contraction.letters2, a2)):
        batch_letter = '' if axis is None else letters[axis]
        rows = [batch.out_shapes[output][i] for i in per_call[:-1]]
        terms.append(batch_letter + ''.join(letters[i] for i in per_call[:-1]) + 'yx')
        operands.append(a.reshape(*a.shape[:len(batch_letter)], *rows,
                                  *a.shape[len(batch_letter) + 1:]))
    features = task.batch1.out_shapes[output][per_call[-1]]
    eye = torch.eye(features, dtype=a1.dtype, device=a1.device)
    delta = ''.join(dict.fromkeys(contraction.letters1[per_call[-1]]
                                  + contraction.letters2[per_call[-1]]))
    terms.append(delta)
    operands.append(eye if len(delta) == 2 else eye.new_ones(features))
    return terms, contraction.result, tuple(operands)
