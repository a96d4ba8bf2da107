"""Declared requirements of layers on the layout of the incoming `Kernel`.

A layer states once what it needs (`Requirements`); containers fold their
children's requirements, and `kernel_fn` picks the cheapest layout that every
layer accepts (neural-tangents' `requires`/`Diagonal` system).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, Iterable


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
    """What a layer (or a whole network) needs of its input kernel.

    Attributes:
        diagonal_spatial: whether spatial covariances may be diagonal-only;
            `None` for a layer that works in either layout.
        diagonal_batch: whether `cov1`/`cov2` may hold only per-example
            variances (`False` when the layer mixes examples).
    """

    diagonal_spatial: Diagonal | None = None
    diagonal_batch: bool = True

    def __rshift__(self, other: Requirements) -> Requirements:
        """Requirements of `other(self(.))`."""
        return Requirements(_fold(self.diagonal_spatial, other.diagonal_spatial, Diagonal.__rshift__),
                            self.diagonal_batch and other.diagonal_batch)

    def __and__(self, other: Requirements) -> Requirements:
        """Requirements of two parallel branches."""
        return Requirements(_fold(self.diagonal_spatial, other.diagonal_spatial, Diagonal.__and__),
                            self.diagonal_batch and other.diagonal_batch)


def _fold(a: Diagonal | None, b: Diagonal | None, op) -> Diagonal | None:
    if a is None or b is None:
        return b if a is None else a
    return op(a, b)


def resolve_layout(requirements: Requirements, diagonal_batch: bool | None,
                   diagonal_spatial: bool | None, layer_name: str,
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
        raise ValueError(f"{layer_name}: diagonal_batch=True is not possible: a layer in this "
                         "network mixes examples and needs the full batch covariance"
                         + _named(layers, lambda r: not r.diagonal_batch))
    if diagonal_spatial and not (spatial is None or spatial.input == Bool.YES):
        raise ValueError(
            f"{layer_name}: diagonal_spatial=True is not possible: a layer in this network mixes "
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
