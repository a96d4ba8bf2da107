"""What a tiled computation computes: the kernel function and its arguments
(`Call`), the fields of its result and how tiles fill them (`Plan`), and the
tiles themselves (`Task`, `Plan.tasks`)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
from typing import Any, Callable

import torch

from ..kernel import FIELD_ROLES, Kernel
from ..stax.module import Layer
from ..stax.requirements import modules_mixing_examples, recorded_input_ranks
from .fingerprint import reachable_modules
from .inputs import Inputs

logger = logging.getLogger(__name__)


class Call:
    """`kernel_fn` with the caller's extra arguments, applied to one tile.

    `plain` is the uncompiled function (`torch.compile` keeps it), used for
    the one-example probes so that they do not compile a graph of their own.
    """

    def __init__(self, kernel_fn: Callable, args: tuple, kwargs: dict) -> None:
        self.fn, self.args, self.kwargs = kernel_fn, args, kwargs
        self.plain = getattr(kernel_fn, '_torchdynamo_orig_callable', kernel_fn)
        self.is_stax = inspect.ismethod(self.plain) and isinstance(self.plain.__self__, Layer)
        self.accepts_get = 'get' in inspect.signature(self.plain).parameters

    def __call__(self, xa: Inputs, xb: Inputs | None, plain: bool = False, **overrides: Any) -> Any:
        fn = self.plain if plain else self.fn
        if not overrides:
            return fn(xa, xb, *self.args, **self.kwargs)
        bound = inspect.signature(self.plain).bind(xa, xb, *self.args, **self.kwargs)
        bound.arguments.update(overrides)
        return fn(*bound.args, **bound.kwargs)


def check_tileable(kernel_fn: Callable) -> None:
    """Refuse a kernel function that declares `tileable = False` (looked for
    on it, on the function `torch.compile` wrapped, and on `functools.partial`'s)."""
    fn = kernel_fn
    while fn is not None:
        if getattr(fn, 'tileable', True) is False:
            name = getattr(fn, '__qualname__', type(fn).__name__)
            raise ValueError(f"batch: kernel_fn {name} declares tileable=False: its tiles would "
                             "not assemble into the kernel of one call; call it untiled")
        fn = fn.func if isinstance(fn, functools.partial) else \
            getattr(fn, '_torchdynamo_orig_callable', None)


# --------------------------------------------------------------------------- output layout

def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, '_fields')


def _split_outputs(out: Any) -> tuple[list, Callable[[list], Any]]:
    """The kernels of an output (several for a network with several outputs)
    and the function that puts them back the same way."""
    if isinstance(out, (list, tuple)) and not _is_namedtuple(out):
        return list(out), lambda nodes: type(out)(nodes)
    return [out], lambda nodes: nodes[0]


def _field_values(node: Any) -> dict[str, Any]:
    if isinstance(node, torch.Tensor):
        return {'': node}
    if isinstance(node, Kernel):
        return {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    if _is_namedtuple(node):
        return node._asdict()
    raise TypeError(f"batch: kernel_fn returned {type(node).__name__}; expected a tensor, a named "
                    "tuple, a Kernel, or a list of those")


def _rebuild(template: Any, values: dict[str, Any]) -> Any:
    if isinstance(template, torch.Tensor):
        return values['']
    if isinstance(template, Kernel):
        return template.replace(**values)
    return type(template)(**values)


def flatten(out: Any) -> list[Any]:
    """The values of every field of every output kernel of `out`, in order."""
    return [value for node in _split_outputs(out)[0] for value in _field_values(node).values()]


@dataclasses.dataclass(frozen=True, order=True)
class Task:
    """The tile of row block `i` and column block `j` of the kernel `kind`."""

    kind: str
    i: int
    j: int

    @property
    def name(self) -> str:
        return f'{self.kind}-{self.i:06d}-{self.j:06d}'


@dataclasses.dataclass
class OutputField:
    """One field of the result and how tiles fill it.

    Attributes:
        name: file name stem with `memmap_dir`.
        role: how it depends on the examples: its `torchntk.kernel.FIELD_ROLES`
            role ('pair' for a plain tensor), with 'cov1'/'cov2' resolved to
            'side1'/'side2' (per example) or 'pair', and scalars to 'const'.
        template: its value on a one-example probe (shape and dtype of the rest).
        diagonal_spatial: the layout of the spatial axes of a 'pair' (`None`: unknown).
        source: the tiles that fill it: 'main' (`kernel_fn(x1, x2)`), or, for
            the full covariances `cov1`/`cov2` when `x2` is given, 'cov1'/'cov2'
            (`kernel_fn(x1, x1, get='nngp')`, the same with `x2`).
        index: the position of its value in a tile's flattened output.
    """

    name: str
    role: str
    template: Any
    diagonal_spatial: bool | None = None
    source: str = 'main'
    index: int = 0


@dataclasses.dataclass
class Plan:
    """What a tiled computation computes and how it assembles the tiles."""

    call: Call
    n1: int
    n2: int
    x2_given: bool
    fields: list[OutputField]
    rebuild: Callable[[list], Any]
    symmetric: bool

    @classmethod
    def build(cls, call: Call, probe1: Inputs, probe2: Inputs | None, n1: int, n2: int) -> Plan:
        """Probe `kernel_fn` on one example (checking its modules on the way)."""
        modules = reachable_modules((call.plain, call.args, call.kwargs))
        mixing = modules_mixing_examples(modules)  # before a probe they may fail on
        if not mixing:
            with recorded_input_ranks(modules) as input_ranks:
                template = call(probe1, probe2, plain=True)
            mixing = modules_mixing_examples(modules, input_ranks)
        if mixing:
            raise ValueError(f"batch: {', '.join(mixing)} mix the examples of a batch (dropout or "
                             "batch normalization in training mode, LayerNorm over the batch "
                             "axis): a kernel computed in tiles would differ from the whole; "
                             "switch them to eval mode (model.eval()) or compute untiled")
        nodes, rebuild_nodes = _split_outputs(template)
        layouts = cls._layouts(call, nodes, probe1)
        fields: list[OutputField] = []
        for k, (node, (diagonal_batch, diagonal_spatial)) in enumerate(zip(nodes, layouts)):
            values = _field_values(node)
            offset = len(fields)
            for field, value in values.items():
                if isinstance(node, Kernel) and field not in FIELD_ROLES:
                    raise TypeError(f"batch: cannot assemble the Kernel field {field!r} from tiles")
                name = (f'{k}.' if len(nodes) > 1 else '') + (field or 'kernel')
                output = OutputField(name, FIELD_ROLES.get(field, 'pair'), value,
                                     diagonal_spatial, index=len(fields))
                if output.role in ('cov1', 'cov2'):
                    cls._covariance(output, field, values, diagonal_batch, probe2 is not None,
                                    offset, k)
                    if output.source != 'main' and not call.accepts_get:
                        raise TypeError(f"batch: {field} with diagonal_batch=False is computed as "
                                        "kernel_fn(x, x, get='nngp'), but kernel_fn has no get")
                if (not isinstance(value, torch.Tensor) or value.ndim == 0) and \
                        output.role in ('pair', 'side1', 'side2'):
                    output.role = 'const'
                elif output.role == 'pair' and value.ndim < 2:
                    raise TypeError(f"batch: kernel_fn returned {name} of shape "
                                    f"{tuple(value.shape)} for one example; expected (N1, N2, ...)")
                fields.append(output)

        def rebuild(values: list) -> Any:
            it = iter(values)
            return rebuild_nodes([_rebuild(node, {f: next(it) for f in _field_values(node)})
                                  for node in nodes])

        symmetric = all(field.template.ndim == 2 or field.diagonal_spatial is not None
                        for field in fields if field.role == 'pair')
        if not symmetric:
            logger.info("batch: the layout of the spatial axes of the kernel is unknown, so with "
                        "x2=None the tiles below the diagonal are computed too")
        return cls(call, n1, n2, probe2 is not None, fields, rebuild, symmetric)

    @staticmethod
    def _layouts(call: Call, nodes: list, probe1: Inputs) -> list[tuple[bool | None, bool | None]]:
        """`(diagonal_batch, diagonal_spatial)` of each output kernel, where known."""
        if all(isinstance(node, Kernel) for node in nodes):
            return [(node.diagonal_batch, node.diagonal_spatial) for node in nodes]
        if call.is_stax and call.accepts_get:
            flags, _ = _split_outputs(call(probe1, None, plain=True,
                                           get=('diagonal_batch', 'diagonal_spatial')))
            return [tuple(f) for f in flags]
        return [(None, None)] * len(nodes)

    @staticmethod
    def _covariance(output: OutputField, field: str, values: dict, diagonal_batch: bool | None,
                    x2_given: bool, offset: int, node: int) -> None:
        """Where `cov1`/`cov2` come from: per example from any tile, or, as
        pairs (`diagonal_batch=False`), from the NNGP of x1 (x2) with itself."""
        side = field[-1]
        if values[field] is None:
            output.role = 'const'
        elif diagonal_batch is None:
            raise TypeError(f"batch: cannot tell whether {field} of kernel_fn's output holds "
                            "pairs of examples; return a Kernel or use a stax kernel_fn")
        elif diagonal_batch:
            output.role = 'side' + side
        elif not x2_given and isinstance(values.get('nngp'), torch.Tensor):
            output.role, output.index = 'pair', offset + list(values).index('nngp')
        else:
            output.role, output.source, output.index = 'pair', 'cov' + side, node

    def sources(self) -> list[str]:
        return sorted({field.source for field in self.fields}, key=['main', 'cov1', 'cov2'].index)

    def size(self, kind: str) -> tuple[int, int]:
        """Rows and columns of the kernel that tiles of `kind` cover."""
        if kind == 'main':
            return self.n1, self.n2
        return (self.n1, self.n1) if kind == 'cov1' else (self.n2, self.n2)

    def self_pairs(self, kind: str) -> bool:
        """Whether tiles of `kind` pair one input with itself (the symmetric case)."""
        return kind != 'main' or not self.x2_given

    def tasks(self, batch_size: int) -> list[Task]:
        """The tiles of `batch_size` examples a side that make up the result
        (with `symmetric`, only those on and above the diagonal of a kernel of
        one input with itself)."""
        found = []
        for kind in self.sources():
            rows, cols = (math.ceil(n / batch_size) for n in self.size(kind))
            upper_only = self.self_pairs(kind) and self.symmetric
            found += [Task(kind, i, j) for i in range(rows) for j in range(cols)
                      if j >= i or not upper_only]
        return found

