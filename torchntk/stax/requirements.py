"""What each layer needs of its input, declared once (`Requirements`).

A layer states its needs in its `requirements` property: the layout of the
incoming `Kernel` (diagonal batch / spatial covariances), whether its rule
needs a Gaussian input kernel, and which axes of its input its finite forward
pass couples (so whether it mixes the examples of a batch). Containers fold
their children's layout needs and `kernel_fn` picks the cheapest layout every
layer accepts (neural-tangents' `requires`/`Diagonal` system);
`Layer.propagate` checks a Gaussian input layer by layer; and
`modules_mixing_examples` tells the empirical kernels (vmap over examples) and
`batch` (tiling) which modules make an example's output depend on its batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import threading
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Sequence

from torch import nn


class Bool(enum.IntEnum):
    """Three-valued logic: NO < MAYBE < YES."""

    NO = 0
    MAYBE = 1
    YES = 2


@dataclasses.dataclass(frozen=True)
class Diagonal:
    """Whether a kernel may store only its diagonal (same example / position).

    Attributes:
        input: whether this layer accepts a diagonal-only input kernel (`MAYBE`:
            only if the off-diagonal entries are zero).
        output: whether the kernels after this layer, up to the network output,
            may be diagonal-only (`MAYBE`: yes after this layer, but a later
            layer may say no).
    """

    input: Bool = Bool.YES
    output: Bool = Bool.NO

    def __rshift__(self, other: Diagonal) -> Diagonal:
        """The requirement of `other(self(.))`: composition, associative."""
        if self.output == Bool.YES:
            return self
        if self.output > Bool.NO and other.input > Bool.NO:
            input_ = self.input
        elif self.output == Bool.NO and other.input < Bool.YES:
            input_ = Bool.NO
        else:
            input_ = min(self.input, other.input)
        return Diagonal(input=input_, output=other.output)

    def __and__(self, other: Diagonal) -> Diagonal:
        """The requirement of two parallel branches: the largest both allow."""
        return Diagonal(input=min(self.input, other.input), output=min(self.output, other.output))

    @property
    def allows_diagonal(self) -> bool:
        """Whether the whole network can run diagonal-only (a named property
        rather than `__bool__`, which torch.compile cannot trace on a dataclass
        before torch 2.13)."""
        return self.input == Bool.YES and self.output > Bool.NO


@dataclasses.dataclass(frozen=True)
class Requirements:
    """What a layer (or a whole network) needs of its input.

    Attributes:
        diagonal_spatial: whether spatial covariances may be diagonal-only;
            `None` for a layer that works in either layout.
        diagonal_batch: whether `cov1`/`cov2` may hold only per-example
            variances (`False` for a rule that needs the covariances between
            the examples of one side).
        gaussian_input: whether the layer's rule needs a Gaussian input
            kernel (nonlinearities, `LayerNorm`): an affine layer right before
            it. The network's inputs are fixed values, not Gaussian: their
            kernel after φ is not a function of their Gram matrix.
        coupled_axes: axes of the layer's input (negative ones counted from
            the end) whose entries its finite forward pass couples beyond the
            channel axis: those `LayerNorm` takes its statistics over, or the
            batch axis 0 for a layer that draws its random numbers for a whole
            batch (`Dropout` in training). Coupling along axis 0 mixes the
            examples of a batch (`mixes_examples`).

    `gaussian_input` and `coupled_axes` are a layer's own: `Layer.propagate`
    reads each layer's as it runs, and `modules_mixing_examples` asks each
    module; so the requirements of a composition (`>>`) or of parallel
    branches (`&`) fold only the layout fields and carry none of them.
    """

    diagonal_spatial: Diagonal | None = None
    diagonal_batch: bool = True
    gaussian_input: bool = False
    coupled_axes: tuple[int, ...] = ()

    def __rshift__(self, other: Requirements) -> Requirements:
        """Layout requirements of `other(self(.))`."""
        return Requirements(_fold(self.diagonal_spatial, other.diagonal_spatial, Diagonal.__rshift__),
                            self.diagonal_batch and other.diagonal_batch)

    def __and__(self, other: Requirements) -> Requirements:
        """Layout requirements of two parallel branches."""
        return Requirements(_fold(self.diagonal_spatial, other.diagonal_spatial, Diagonal.__and__),
                            self.diagonal_batch and other.diagonal_batch)

    def mixes_examples(self, input_ranks: Collection[int] = ()) -> bool:
        """Whether the output for one example depends on the other examples of
        its batch: a coupled axis is the batch axis 0 for inputs of one of
        `input_ranks` dimensions (those the layer was called on). Axis 0
        itself needs no rank; a negative axis is 0 only for a rank it names."""
        return any(axis == 0 or any(axis == -rank for rank in input_ranks)
                   for axis in self.coupled_axes)


def _fold(a: Diagonal | None, b: Diagonal | None, op) -> Diagonal | None:
    if a is None or b is None:
        return b if a is None else a
    return op(a, b)


def resolve_layout(requirements: Requirements, diagonal_batch: bool | None,
                   diagonal_spatial: bool | None, caller: str,
                   layers: Iterable[Any] = ()) -> tuple[bool, bool]:
    """The `(diagonal_batch, diagonal_spatial)` flags a network runs with.

    `None` picks the cheapest layout whose output holds the whole kernel:
    same-position covariances only where the output needs no others (after
    `Flatten` or global pooling, or where the others are zero). A user may
    relax a flag to `False` (always correct, just slower), and may ask for
    `diagonal_spatial=True` wherever every layer maps same-position
    covariances from same-position covariances alone (`input` is `YES`): a
    network whose output keeps its spatial axes then returns only the
    same-position kernel `(N1, N2, X, Y, …)`, as in neural-tangents. Asking
    for `True` where a layer needs more is an error naming the layers
    (`layers`, the network's modules) that may need it.
    """
    allowed_batch = requirements.diagonal_batch
    spatial = requirements.diagonal_spatial
    allowed_spatial = spatial is not None and spatial.allows_diagonal
    if diagonal_batch and not allowed_batch:
        raise ValueError(f"{caller}: diagonal_batch=True is not possible: a layer in this "
                         "network mixes examples and needs the full batch covariance"
                         + _named(layers, lambda r: not r.diagonal_batch))
    if diagonal_spatial and not (spatial is None or spatial.input == Bool.YES):
        raise ValueError(
            f"{caller}: diagonal_spatial=True is not possible: a layer in this network mixes "
            "spatial positions and needs covariances between different positions"
            + _named(layers, lambda r: r.diagonal_spatial is not None
                     and r.diagonal_spatial.input < Bool.YES))
    return (allowed_batch if diagonal_batch is None else diagonal_batch,
            allowed_spatial if diagonal_spatial is None else diagonal_spatial)


def _named(layers: Iterable[Any], needs: Callable[[Requirements], bool]) -> str:
    """`' (A, B)'`: the names of the layers (not containers) whose own
    requirements `needs` flags, or `''` if none is."""
    names: list[str] = []
    for layer in layers:
        if any(True for _ in layer.children()) or not needs(layer.requirements):
            continue
        if type(layer).__name__ not in names:
            names.append(type(layer).__name__)
    return f" ({', '.join(names)})" if names else ""


def modules_mixing_examples(modules: Mapping[str, nn.Module],
                            input_ranks: Mapping[str, Collection[int]] | None = None) -> list[str]:
    """Names of `modules` whose output for one example depends on the other
    examples of its batch, or on random numbers drawn per batch.

    These are the stax layers whose `Requirements.mixes_examples` (given the
    ranks of the inputs the module was called on, `input_ranks[name]`, see
    `recorded_input_ranks`) says so, torch's batch normalization in training
    mode or without running statistics, and torch's dropout in training mode
    with `p > 0`. A module named `''` (a model's root) is named by its type.
    """
    input_ranks = input_ranks or {}
    mixing = []
    for name, module in modules.items():
        requirements = getattr(module, 'requirements', None)
        if isinstance(requirements, Requirements):
            mixes = requirements.mixes_examples(input_ranks.get(name, ()))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            mixes = module.training or module.running_mean is None
        elif isinstance(module, nn.modules.dropout._DropoutNd):
            mixes = module.training and module.p > 0
        else:
            mixes = False
        if mixes:
            mixing.append(name or type(module).__name__)
    return mixing


# The recorders `recorded_input_ranks` has open in this thread; `Layer.propagate`
# reports the kernels it is given to them (a kernel rule runs no forward hooks).
_RECORDERS = threading.local()


@contextlib.contextmanager
def recorded_input_ranks(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, set[int]]]:
    """Within the block, `{name: ranks}`: the numbers of dimensions of the
    inputs each of `modules` is called on, in its forward (the first tensor
    argument, through a forward pre-hook) or, for a stax layer, in its kernel
    rule (its input kernel's activations `(N, C, *S)`), as
    `modules_mixing_examples` reads them."""
    ranks: dict[str, set[int]] = {name: set() for name in modules}
    names_by_id: dict[int, list[str]] = {}
    for name, module in modules.items():
        names_by_id.setdefault(id(module), []).append(name)

    def record(module: nn.Module, ndims: Iterable[int]) -> None:
        for name in names_by_id.get(id(module), ()):
            ranks[name].update(ndims)

    def pre_hook(module: nn.Module, args: tuple) -> None:
        if args and hasattr(args[0], 'ndim'):
            record(module, (args[0].ndim,))

    handles = [module.register_forward_pre_hook(pre_hook)
               for module in {id(m): m for m in modules.values()}.values()]
    recorders = getattr(_RECORDERS, 'active', ())
    _RECORDERS.active = (*recorders, record)
    try:
        yield ranks
    finally:
        _RECORDERS.active = recorders
        for handle in handles:
            handle.remove()


def report_input_kernels(layer: nn.Module, kernels: Sequence[Any]) -> None:
    """Tell the open `recorded_input_ranks` blocks the ranks of the
    activations whose kernels `layer`'s rule is given (`Layer.propagate`)."""
    for record in getattr(_RECORDERS, 'active', ()):
        record(layer, [len(k.shape1) for k in kernels])
