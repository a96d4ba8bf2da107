"""Declared requirements of layers on the layout of the incoming `Kernel`.

A layer states once what it needs (`Requirements`); containers fold their
children's requirements, and `kernel_fn` picks the cheapest layout that every
layer accepts (neural-tangents' `requires`/`Diagonal` system).
"""

from __future__ import annotations

import dataclasses
import enum


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
                   diagonal_spatial: bool | None, layer_name: str) -> tuple[bool, bool]:
    """The `(diagonal_batch, diagonal_spatial)` flags a network runs with.

    A user may relax a flag to `False` (always correct, just slower); asking for
    `True` where a layer needs the full kernel is an error.
    """
    allowed_batch = requirements.diagonal_batch
    allowed_spatial = (requirements.diagonal_spatial is not None
                       and requirements.diagonal_spatial.allows_diagonal)
    if diagonal_batch and not allowed_batch:
        raise ValueError(f"{layer_name}: diagonal_batch=True is not possible: a layer in this "
                         "network mixes examples and needs the full batch covariance")
    if diagonal_spatial and not allowed_spatial:
        raise ValueError(f"{layer_name}: diagonal_spatial=True is not possible: this network "
                         "needs covariances between different spatial positions")
    return (allowed_batch if diagonal_batch is None else diagonal_batch,
            allowed_spatial if diagonal_spatial is None else diagonal_spatial)
