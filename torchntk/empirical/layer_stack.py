"""The sequential backward pass: a model that is a stack of layers (nested
`nn.Sequential`) gets the output cotangents of its structured layers from one
batched reverse pass of ours through the layers, in place of `vmap(jacrev)`."""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING

import torch
from torch import nn

from .analysis import Batch
from .model import Params, global_hooks
from .structured import AffineRule, ConvRule, LinearRule, rule_for

if TYPE_CHECKING:
    from .task import NtkTask

#: Elementwise activations without parameters that a layer stack may hold.
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh,
               nn.Hardsigmoid, nn.Hardswish, nn.LogSigmoid, nn.Tanhshrink)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class StackLayer(typing.NamedTuple):
    """One layer of a stack: its module name, its `kind` ('affine',
    'elementwise' or 'reshape') and its rule ('affine') or module."""

    name: str
    kind: str
    layer: nn.Module | AffineRule


def layer_stack(task: NtkTask) -> list[StackLayer] | None:
    """The model as a stack of layers `stack_cotangents` differentiates, if it is one.

    That is nested `nn.Sequential`s of `nn.Linear`, zero-padded `nn.Conv`,
    elementwise activations without parameters (not in place), `nn.Flatten`
    of the example's axes, `nn.Identity` and dropout that is off, without
    hooks, called on one tensor with batch axis 0 (`vmap_axes`) and no
    keyword arguments.
    """
    axes, batch1, batch2 = task.axes, task.batch1, task.batch2
    if (axes is None or axes.x_axes != [0] or axes.out_axes != [0] or batch1.kwargs
            or batch2.kwargs or not isinstance(batch1.x, torch.Tensor)
            or len(batch1.out_shapes) != 1 or global_hooks()):
        return None
    stack = []
    for name, module in task.modules.items():   # in the order nested Sequentials run them
        if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks):
            return None
        if type(module) is nn.Sequential:
            continue
        calls = [batch.calls.get(name, ()) for batch in (batch1, batch2)]
        if any(len(c) != 1 for c in calls):
            return None
        rule = rule_for(name, module, task.params)
        if type(rule) is LinearRule or (type(rule) is ConvRule
                                        and rule.zero_padding() is not None):
            stack.append(StackLayer(name, 'affine', rule))
        elif type(module) in ELEMENTWISE and not getattr(module, 'inplace', False):
            stack.append(StackLayer(name, 'elementwise', module))
        elif type(module) is nn.Identity or (isinstance(module, _DROPOUTS) and not (
                module.training and module.p > 0)):
            stack.append(StackLayer(name, 'reshape', module))
        elif type(module) is nn.Flatten and module.start_dim % len(calls[0][0][0]) >= 1:
            stack.append(StackLayer(name, 'reshape', module))
        else:
            return None
    return stack


def stack_cotangents(stack: list[StackLayer], params: Params, batch: Batch,
                     rules: dict[str, AffineRule]
                     ) -> tuple[list[Params], list[Params], Params]:
    """`jacobians.jacobians` of the layers `rules` of a `stack`, without
    parameters: one batched forward pass through the stack's layers (keeping
    their inputs and the activations' derivatives), then the output's
    cotangents (the identity per example) taken back through the stack, layer
    by layer, as batches `(N, *out, *y)`: by `W` (`nn.Linear`; the first, on
    the identity, is `W` itself), a transposed convolution, or the
    activations' derivatives. The same cotangents as `jacrev`'s, without its
    per-call overhead and broadcast products."""
    names = [layer.name for layer in stack]
    out, inputs, derivatives = batch.x, {}, {}
    for name, kind, layer in stack:
        inputs[name] = out
        if kind == 'affine':
            out = layer.forward(out, params)
        elif kind == 'elementwise':
            out, derivatives[name] = _with_derivative(layer, out)
        else:
            out = layer(out)
    n, out_shape = out.shape[0], out.shape[1:]
    size = out_shape.numel()
    g = torch.eye(size, dtype=out.dtype, device=out.device).view(*out_shape, *out_shape)
    g = g.expand(n, *g.shape)
    owned = False   # whether g is a tensor of ours nothing else refers to
    first = min(names.index(name) for name in rules)
    cotangents = {}
    for name, kind, layer in reversed(stack[first:]):
        x = inputs[name]
        if kind == 'affine':
            if name in rules:
                cotangents[name] = g.unsqueeze(1 + len(out_shape))
            if name == names[first]:
                break
            weight = layer.weight(params)
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


def _with_derivative(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`σ(x)` and `σ'(x)` of an elementwise `layer`, the latter as the gradient
    of `Σ σ(x)` (itself differentiable where a gradient flows through `x`)."""
    create_graph = torch.is_grad_enabled() and x.requires_grad
    with torch.enable_grad():
        x = x if create_graph else x.detach().requires_grad_()
        y = layer(x)
        derivative = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=create_graph)[0]
    return (y if create_graph else y.detach()), derivative
