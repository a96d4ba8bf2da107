"""The model's forward pass with given parameters (`functional_call`):
applied, traced (output tensors, module calls, FLOPs), probed (cotangents of
module outputs), watched for random draws, and its failures explained."""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.utils import _pytree as pytree  # torch.func's own pytrees
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


Params = dict[str, torch.Tensor]
PyTree = Any
#: `{module name: [(input shape, output shape), …]}`, one entry per call of the module.
Calls = dict[str, list[tuple[tuple[int, ...] | None, tuple[int, ...] | None]]]


def shape_signature(modules: dict[str, nn.Module], params: Params, x: PyTree,
                     kwargs: dict[str, Any]) -> tuple:
    """What the model's forward passes find out (output shapes, module calls,
    FLOPs) depends on: the parameters', inputs' and keyword tensors' shapes,
    dtypes and devices, other keyword values, and which modules there are and
    are in training mode."""
    def key(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return tuple(leaf.shape), leaf.dtype, leaf.device
        return leaf if isinstance(leaf, (int, float, bool, str, type(None))) else id(leaf)

    leaves, tree = pytree.tree_flatten((x, kwargs))
    return (str(tree), tuple(map(key, leaves)),
            tuple((name, key(p)) for name, p in params.items()),
            tuple((id(m), m.training) for m in modules.values()))


def apply_model(model: nn.Module, params: Params, x: PyTree, kwargs: dict[str, Any]) -> PyTree:
    """`model(x, **kwargs)` with `params` in place of (some of) its own parameters.

    Buffers are copied inside the call: BatchNorm's running statistics are not
    updated, and transforms do not see in-place updates of captured tensors.
    """
    return functional_call(model, (params, _buffer_copies(model)), (x,), kwargs)


def _buffer_copies(model: nn.Module) -> Params:
    return {name: b.clone() for name, b in model.named_buffers()}


def rng_devices(x: PyTree) -> list:
    return list({leaf.device for leaf in pytree.tree_leaves(x)
                 if isinstance(leaf, torch.Tensor) and leaf.is_cuda})


def output_tensors(out: PyTree, caller: str, tree1: pytree.TreeSpec | None = None
                   ) -> tuple[list[torch.Tensor], pytree.TreeSpec]:
    """The output tensors (with at least one axis each), in the structure
    `tree1` of the outputs on `x1` if given."""
    leaves, tree = pytree.tree_flatten(out)
    if tree1 is not None and tree != tree1:
        raise ValueError(f"{caller}: the outputs on x1 and x2 differ in structure: {tree1} and {tree}")
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{caller}: the model must return a tensor or a pytree of tensors, "
                            f"got a {type(leaf).__name__} in its output")
        if not leaf.ndim:
            raise ValueError(f"{caller}: every model output must have a batch axis, got a scalar")
    return leaves, tree


@contextlib.contextmanager
def failures_explained(caller: str, name: str, model: nn.Module, params: Params, x: PyTree,
                        kwargs: dict[str, Any], cut: bool = False) -> Iterator[None]:
    """The model runs on input `name` (`x`, or with `cut` its examples cut
    along `vmap_axes`): a failure becomes a `ValueError` saying what is wrong,
    the input's device or dtype against the parameters', else `vmap_axes` if
    the model runs on the whole batch `x`, else the input's shape."""
    try:
        yield
    except RuntimeError as error:
        own = {**dict(model.named_parameters()), **params}
        leaves = pytree.tree_leaves(x)
        devices = sorted({str(p.device) for p in own.values()})
        dtypes = {p.dtype for p in own.values() if p.is_floating_point()}
        for leaf in leaves:
            if devices and str(leaf.device) not in devices:
                raise ValueError(f"{caller}: {name} is on {leaf.device} but the model's "
                                 f"parameters are on {', '.join(devices)}; move one to the "
                                 f"other's device ({error})") from error
            if leaf.is_floating_point() and dtypes and leaf.dtype not in dtypes:
                raise ValueError(f"{caller}: {name} has dtype {leaf.dtype} but the model's "
                                 f"parameters have {', '.join(sorted(map(str, dtypes)))}; "
                                 f"convert one to the other's dtype ({error})") from error
        if cut and _runs(model, params, x, kwargs):
            raise ValueError(f"{caller}: the model runs on {name} but fails on its examples cut "
                             f"along vmap_axes ({error}); check vmap_axes or pass "
                             "vmap_axes=None") from error
        shapes = [tuple(leaf.shape) for leaf in leaves]
        raise ValueError(f"{caller}: the model fails on {name} of shape "
                         f"{shapes[0] if len(shapes) == 1 else shapes} ({error}); check that "
                         f"{name} has the shape and dtype the model expects") from error


def _runs(model: nn.Module, params: Params, x: PyTree, kwargs: dict[str, Any]) -> bool:
    """Whether the model runs on `x` (without gradients, the random state restored)."""
    try:
        with torch.no_grad(), torch.random.fork_rng(rng_devices(x)):
            apply_model(model, params, x, kwargs)
    except RuntimeError:
        return False
    return True


def zeros(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def forward_with_probes(model: nn.Module, params: Params, probes: Params,
                         modules: dict[str, nn.Module], x: PyTree, kwargs: dict[str, Any]
                         ) -> tuple[PyTree, Params]:
    """`model(x, **kwargs)` with `probes[name]` added to the output of module `name`.

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
        out = apply_model(model, params, x, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out, inputs


def traced_forward(model: nn.Module, params: Params, x: PyTree, kwargs: dict[str, Any],
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
    counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
    try:
        with torch.no_grad(), torch.random.fork_rng(rng_devices(x)), counter:
            out = apply_model(model, params, x, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out, counter.get_total_flops() if count_flops else 0, dict(calls)


def draws_random_numbers(model: nn.Module, params: Params, x: PyTree,
                         kwargs: dict[str, Any]) -> bool:
    """Whether `model(x, **kwargs)` calls a random operation (one tagged
    `nondeterministic_seeded`, as dropout's `bernoulli_`), in a forward pass
    without gradients that leaves the random state as it was."""
    with torch.no_grad(), torch.random.fork_rng(rng_devices(x)), _RandomDraws() as draws:
        apply_model(model, params, x, kwargs)
    return draws.seen


class _RandomDraws(TorchDispatchMode):
    """Notes whether an operation that draws random numbers runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen = self.seen or torch.Tag.nondeterministic_seeded in func.tags
        return func(*args, **(kwargs or {}))


def global_hooks() -> bool:
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks
                or m._global_backward_hooks or m._global_backward_pre_hooks)
