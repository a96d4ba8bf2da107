"""Kernels at scale: tiles, memory bounds, progress, checkpoints, several processes.

`batch(kernel_fn, batch_size)` computes `kernel_fn(x1, x2)` one tile of
`batch_size × batch_size` examples at a time and assembles the tiles into the
kernel the untiled call returns (neural-tangents' `nt.batch`):

    K[I, J] = kernel_fn(x1[I], x2[J])           for row block I, column block J.

This is exact when every entry `K[i, j]` depends on `x1[i]` and `x2[j]` only,
which holds for every stax layer except those that mix examples: `Dropout` in
training mode (its noise sits on the pairs of an example with itself) and
`LayerNorm` over the batch axis 0. `batch` finds them in the model and refuses
them (see `batch`). With `x2=None` the kernel is symmetric,
`K[J, I] = K[I, J]ᵀ`, so only the tiles on and above the diagonal are
computed, about half of the work; a diagonal tile is computed as
`kernel_fn(x1[I], None)`, which keeps the exact self-pair entries the untiled
call has there (see `torchntk.kernel.kernel_from_inputs`).

Finished tiles can go to a checkpoint directory (atomically: a temporary file,
fsync, then a rename), so that a run killed at any moment and started again
with the same arguments recomputes only the missing tiles; the tiles of one
computation can be shared among the processes of a `torch.distributed` group
(one per GPU, on one or several machines), and the assembled kernel can live in
memory-mapped `.npy` files when it is larger than RAM.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import pathlib
import shutil
import socket
import stat
import tempfile
import types
import weakref
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from ..empirical import _batch_mixing_modules
from ..kernel import Kernel
from ..ops.heap import reuse_heap
from ..stax.module import SHAPES_ONLY, Layer
from ..stax.normalization import LayerNorm

try:
    import fcntl
except ImportError:  # not POSIX: concurrent runs on one checkpoint are not detected
    fcntl = None

logger = logging.getLogger(__name__)

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]
Shape = tuple[int, ...]
PathLike = Union[str, os.PathLike]

#: The fraction of the available memory `batch_size='auto'` fills when no
#: `max_memory` is given: the rest is left to allocator rounding and to others.
AUTO_MEMORY_FRACTION = 0.8

_CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------- public API

@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Memory of a tiled kernel computation, before it runs.

    Attributes:
        batch_size: the tile size (examples per side of a tile).
        tile_bytes: the peak of the tensors alive at once while one tile is
            computed (its inputs and outputs included), measured by running
            the kernel function on shape-only `meta` tensors, which take the
            layers one at a time: the extension's fused Conv/ReLU runs
            (`torchntk.stax.fusion`) need less.
        output_bytes: the assembled kernel (every field of the result).
        tiles: the number of tiles (`kernel_fn` calls).
        extrapolated: `tile_bytes` was extrapolated from smaller tiles (see
            `_Estimator`), not measured.
        allocator_bytes: what the allocator holds beyond the tensors alive:
            freed blocks kept for reuse (glibc's heap under
            `torchntk.ops.heap.reuse_heap`, CUDA's cache) that are too small
            for the next array. Taken as `tile_bytes` again, which bounds the
            resident memory of the CNNs and MLPs of
            `tests/test_memory_estimate.py` on both backends (the CNNs'
            layers one at a time leave the most such blocks).
    """

    batch_size: int
    tile_bytes: int
    output_bytes: int
    tiles: int
    extrapolated: bool = False

    @property
    def allocator_bytes(self) -> int:
        return self.tile_bytes

    @property
    def total_bytes(self) -> int:
        """An upper bound of the memory of the computation."""
        return self.tile_bytes + self.allocator_bytes + self.output_bytes

    def __str__(self) -> str:
        how = ', extrapolated' if self.extrapolated else ''
        return (f"{_gib(self.total_bytes)} (output {_gib(self.output_bytes)} + one tile of "
                f"{self.batch_size} x {self.batch_size} examples {_gib(self.tile_bytes)}{how} + "
                f"allocator {_gib(self.allocator_bytes)}, {self.tiles} tiles)")


def batch(kernel_fn: Callable | Layer, batch_size: int | str = 0,
          device: torch.device | str | None = None, store_on_device: bool = True, *,
          progress: bool = True, checkpoint: PathLike | None = None,
          memmap_dir: PathLike | None = None, max_memory: int | None = None) -> Callable:
    """`kernel_fn` computed in tiles of `batch_size × batch_size` examples.

    The returned function has the signature of `kernel_fn`,
    `batched(x1, x2=None, *args, **kwargs)`, and returns what the untiled call
    returns (a tensor, a named tuple, a `Kernel`, or a list of those for a
    network with several outputs), equal to rounding: every `get`, both
    `diagonal_batch` and `diagonal_spatial` layouts, and empirical kernel
    functions, whose outputs are laid out the same way. Nothing is
    differentiated through it (tiles are computed under `torch.no_grad`).

    Tiling is exact only for a deterministic kernel whose entry `[i, j]`
    depends on `x1[i]` and `x2[j]` alone, and with `x2=None` the tiles below
    the diagonal are the transposed ones above. A kernel function for which
    this fails (one that draws new random networks on every call, or returns
    something other than one kernel) says so by an attribute
    `tileable = False`, and is refused with a `ValueError` naming it
    (`monte_carlo_kernel_fn` fixes its networks when it is made, so its tiles
    are entries of one estimate; with a list of `n_samples` it yields several
    estimates and declares `tileable = False`). The
    modules `kernel_fn` reaches (a stax model's `kernel_fn` is a bound method
    of the model; closures, `functools.partial` arguments and the globals a
    function names are followed too) are checked before every computation:
    `Dropout` in training mode, `LayerNorm` over the batch axis and, for
    empirical kernels, `BatchNorm` in training mode raise a `ValueError` naming
    the layer. A callable that hides its model some other way is not checked.

    Args:
        kernel_fn: `kernel_fn(x1, x2, *args, **kwargs)`, or a stax layer (its
            `kernel_fn`). `torch.compile(model.kernel_fn)` works: the
            one-example probes and the checks use the uncompiled function.
        batch_size: examples per side of a tile; `0` for one tile (no tiling);
            `'auto'` for the largest tile whose memory estimate (see
            `estimate_memory`) fits `max_memory`. The last tile of an axis may
            be smaller.
        device: where tiles are computed (default: the device of `x1`); inputs
            are moved there one tile at a time.
        store_on_device: keep the assembled kernel on `device`; `False` keeps
            it in CPU memory (neural-tangents' argument).
        progress: a tqdm bar of tiles done, with rate and remaining time.
        checkpoint: a directory for finished tiles. A run started again with
            the same arguments loads them (checking their checksums, and
            recomputing any that is corrupt or truncated) and computes only the
            rest. The directory belongs to one computation: its inputs, the
            model's configuration and parameters, the arguments, the tile size,
            and the torch and torchntk versions are hashed, and a directory
            made for another computation is refused. One run at a time: a
            second run on a directory in use raises a `RuntimeError` (an
            advisory `fcntl` lock, released by the system when a run dies).
            The tiles stay after the run; delete the directory to free the space.
            Links are never followed there: a symbolic or hard link, or
            anything but a regular file, under the name of a file of the
            checkpoint raises a `ValueError`, as does a damaged `meta.json`;
            a disk that fills up raises an `OSError` saying so, and the
            tiles saved until then are kept.
        memmap_dir: a directory where every tensor of the result is created as
            a `.npy` file (readable with `numpy.load(path, mmap_mode='r')`),
            named by its field (`nngp.npy`, `ntk.npy`, `kernel.npy` for a plain
            tensor, `0.nngp.npy`, … for several outputs); the returned tensors
            are views of those files, so a kernel larger than RAM is paged to
            disk. Every call makes new files: a file (or link) of that name is
            unlinked first, never written to, so an earlier result keeps its
            own file for as long as it is in use. The space of the files is
            checked and reserved before any tile is computed (an `OSError`
            with the numbers where the disk cannot hold them).
        max_memory: bytes the computation may use on `device` (the tile, and
            the result when it is kept there); default: what is free on the
            device (CPU: `MemAvailable`). A computation whose estimate exceeds
            it raises a `MemoryError` with the numbers before any tile is
            computed (checked by rank 0 with several processes).
            `batch_size='auto'` aims at `max_memory`, or at
            `AUTO_MEMORY_FRACTION` of what is free, and resumes a checkpoint
            with the tile size it was made with.

    Several processes: when `torch.distributed` is initialized, every process
    of the default group calls the batched function with the same arguments;
    the tiles not yet finished are dealt out among them, and their results are
    gathered to rank 0, which alone writes the checkpoint and returns the
    kernel (other ranks return `None`). Each process computes on its own
    `device` (e.g. `f'cuda:{local_rank}'`). See the README for `torchrun`.
    An error on one rank (in its tile, or in the checks before) reaches
    every rank at the next exchange, once each has finished its current
    tile: that rank raises it, the others a `RuntimeError` with its rank and
    message, so that none waits for the failed one.

    Returns:
        `batched(x1, x2=None, *args, **kwargs)`.
    """
    kernel_fn = _checked_kernel_fn(kernel_fn, 'batch')
    _check_tileable(kernel_fn)
    settings = _Settings(batch_size=_checked_batch_size(batch_size, 'batch'),
                         device=_checked_device(device),
                         store_on_device=bool(store_on_device), progress=bool(progress),
                         checkpoint=_checked_folder(checkpoint, 'checkpoint'),
                         memmap_dir=_checked_folder(memmap_dir, 'memmap_dir'),
                         max_memory=_checked_max_memory(max_memory))

    @functools.wraps(kernel_fn)
    def batched_kernel_fn(x1: Inputs, x2: Inputs | None = None, *args: Any, **kwargs: Any) -> Any:
        with reuse_heap():  # across tiles: their temporaries reuse one another's memory
            return _run(settings, _Call(kernel_fn, args, kwargs), x1, x2)

    return batched_kernel_fn


def estimate_memory(kernel_fn: Callable | Layer, x1_shape: Shape | Sequence[Shape],
                    x2_shape: Shape | Sequence[Shape] | None = None, *args: Any,
                    batch_size: int = 0, dtype: torch.dtype = torch.float32,
                    **kwargs: Any) -> MemoryEstimate:
    """Memory of `batch(kernel_fn, batch_size)(x1, x2, *args, **kwargs)`
    for inputs of the given shapes, without computing anything.

    `kernel_fn` (or the stax layer whose `kernel_fn` it is) runs on `meta`
    tensors, which have shapes and no values, while every tensor it creates is
    counted until it is freed (`MemoryEstimate.tile_bytes`). `batch_size=0`
    gives the memory of the untiled call. The call is counted in the grad mode
    `estimate_memory` is called in: `batch` runs its tiles under
    `torch.no_grad()`, while a call with gradients enabled on a model with
    hyperparameters that require them keeps the tensors its backward pass
    needs (and runs the layers one at a time, see `torchntk.stax.fusion`).
    Raises a `ValueError` if `kernel_fn` cannot run on meta tensors (e.g.
    empirical kernels, which compare values).

    Example::

        estimate_memory(model, (20000, 784), None, get='nngp', batch_size=2000)
    """
    kernel_fn = _checked_kernel_fn(kernel_fn, 'estimate_memory')
    batch_size = _checked_batch_size(batch_size, 'estimate_memory')
    if batch_size == 'auto':
        raise ValueError("estimate_memory: batch_size must be an int >= 0 (0: untiled)")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"estimate_memory: dtype must be a floating torch.dtype such as "
                        f"torch.float32, got {dtype!r}")
    call = _Call(kernel_fn, args, kwargs)
    x1 = _MetaInputs.of_shape(x1_shape, dtype, 'x1_shape')
    x2 = None if x2_shape is None else _MetaInputs.of_shape(x2_shape, dtype, 'x2_shape')
    grad = torch.is_grad_enabled()
    with torch.no_grad(), _LiveBytes():  # answers the value queries of meta tensors
        plan = _Plan.build(call, x1.rows(0, 1), None if x2 is None else x2.rows(0, 1),
                           x1.n, x1.n if x2 is None else x2.n)
    with torch.set_grad_enabled(grad):
        return _Estimator(call, plan, x1, x2).estimate(batch_size or max(plan.n1, plan.n2))


# --------------------------------------------------------------------------- arguments

@dataclasses.dataclass(frozen=True)
class _Settings:
    batch_size: int | str
    device: torch.device | None
    store_on_device: bool
    progress: bool
    checkpoint: pathlib.Path | None
    memmap_dir: pathlib.Path | None
    max_memory: int | None


def _checked_kernel_fn(kernel_fn: Any, caller: str) -> Callable:
    """The kernel function of a stax layer, or `kernel_fn` itself if callable."""
    if isinstance(kernel_fn, Layer):
        return kernel_fn.kernel_fn
    if not callable(kernel_fn):
        raise TypeError(f"{caller}: kernel_fn must be callable or a stax layer, got "
                        f"{type(kernel_fn).__name__}")
    return kernel_fn


def _checked_device(value: Any) -> torch.device | None:
    if value is None or isinstance(value, torch.device):
        return value
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise TypeError(f"batch: device must be a torch.device, a device string such as 'cuda:0' "
                        f"or None, got {type(value).__name__}")
    try:
        return torch.device(value)
    except RuntimeError as error:
        raise ValueError(f"batch: device must name a device such as 'cpu' or 'cuda:0', got "
                         f"{value!r} ({error})") from None


def _checked_folder(value: Any, arg: str) -> pathlib.Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"batch: {arg} must be a folder path (str or os.PathLike) or None, got "
                        f"{type(value).__name__}")
    return pathlib.Path(value)


def _checked_batch_size(value: Any, caller: str) -> int | str:
    if value == 'auto' and isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{caller}: batch_size must be an int >= 0 (0: one tile) or 'auto', "
                         f"got {value!r}")
    return value


def _checked_max_memory(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"batch: max_memory must be a number of bytes > 0, got {value!r}")
    return int(value)


class _Call:
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


def _check_tileable(kernel_fn: Callable) -> None:
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


# --------------------------------------------------------------------------- inputs

def _n_examples(x: Any, name: str) -> int:
    if isinstance(x, Kernel) or (isinstance(x, (list, tuple)) and x and isinstance(x[0], Kernel)):
        raise TypeError(f"batch: {name} must be inputs, not a Kernel (batching a kernel that is "
                        "propagated further is not supported)")
    tensors = [x] if isinstance(x, torch.Tensor) else list(x) if isinstance(x, (list, tuple)) else []
    if not tensors or not all(isinstance(t, torch.Tensor) and t.ndim >= 1 for t in tensors):
        raise TypeError(f"batch: {name} must be a tensor (N, ...) or a list of such tensors, got "
                        f"{type(x).__name__}")
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"batch: the tensors of {name} have different batch sizes {sorted(sizes)}")
    return sizes.pop()


def _rows(x: Inputs, start: int, stop: int, device: torch.device | None = None) -> Inputs:
    if isinstance(x, torch.Tensor):
        return x[start:stop].to(device) if device is not None else x[start:stop]
    return type(x)(_rows(t, start, stop, device) for t in x)


def _first_tensor(x: Inputs) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x[0]


class _MetaInputs:
    """Inputs of given shapes as `meta` tensors (shapes, no values)."""

    def __init__(self, shapes: list[Shape], dtype: torch.dtype, several: bool) -> None:
        sizes = {shape[0] for shape in shapes}
        if len(sizes) != 1:
            raise ValueError(f"estimate_memory: inputs with different batch sizes {sorted(sizes)}")
        self.shapes, self.dtype, self.several, self.n = shapes, dtype, several, sizes.pop()

    @classmethod
    def of_shape(cls, shape: Shape | Sequence[Shape], dtype: torch.dtype,
                 arg: str) -> _MetaInputs:
        expected = f"estimate_memory: {arg} must be an input shape (N, ...) or a list of them"
        if not isinstance(shape, (tuple, list, torch.Size)):
            raise TypeError(f"{expected}, got {type(shape).__name__}")
        several = bool(shape) and not isinstance(shape[0], int)
        if several and not all(isinstance(s, (tuple, list, torch.Size)) for s in shape):
            raise TypeError(f"{expected}, got {shape!r}")
        shapes = [tuple(s) for s in shape] if several else [tuple(shape)]
        if not all(s and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s)
                   for s in shapes):
            raise ValueError(f"{expected} of sizes >= 0, got {shape!r}")
        return cls(shapes, dtype, several)

    @classmethod
    def like(cls, x: Inputs) -> _MetaInputs:
        tensors = [x] if isinstance(x, torch.Tensor) else list(x)
        return cls([tuple(t.shape) for t in tensors], tensors[0].dtype,
                   not isinstance(x, torch.Tensor))

    def rows(self, start: int, stop: int) -> Inputs:
        """Rows `start:stop`, freshly allocated (so that a memory count sees them)."""
        stop = min(stop, self.n)
        tensors = [torch.empty((stop - start, *s[1:]), dtype=self.dtype, device='meta')
                   for s in self.shapes]
        return tensors if self.several else tensors[0]


# --------------------------------------------------------------------------- output layout

# How each field of a Kernel (or of a named tuple of its fields) is assembled.
# 'pair': (N1, N2, ...) blocks; 'cov1'/'cov2': per example or, with
# diagonal_batch=False, pairs of x1 (x2) with itself; 'side1'/'side2': per
# example (N, ...); 'same_inputs': x1_is_x2; 'shape1'/'shape2': the shapes with
# the whole batch; 'const': the same on every tile.
_FIELD_ROLES = {'nngp': 'pair', 'ntk': 'pair', 'cov1': 'cov1', 'cov2': 'cov2',
                'x1_is_x2': 'same_inputs', 'is_gaussian': 'const', 'diagonal_batch': 'const',
                'diagonal_spatial': 'const', 'iid_channels': 'const', 'shape1': 'shape1',
                'shape2': 'shape2', 'mask1': 'side1', 'mask2': 'side2'}


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, '_fields')


def _split_outputs(out: Any) -> tuple[list, Callable[[list], Any]]:
    """The kernels of an output (several for a network with several outputs)
    and the function that puts them back the same way."""
    if isinstance(out, (list, tuple)) and not _is_namedtuple(out):
        return list(out), lambda nodes: type(out)(nodes)
    return [out], lambda nodes: nodes[0]


def _fields(node: Any) -> dict[str, Any]:
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


def _flatten(out: Any) -> list[Any]:
    return [value for node in _split_outputs(out)[0] for value in _fields(node).values()]


@dataclasses.dataclass
class _Leaf:
    """One field of the result and how tiles fill it.

    Attributes:
        name: file name stem with `memmap_dir`.
        role: see `_FIELD_ROLES`.
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
class _Plan:
    """What a tiled computation computes and how it assembles the tiles."""

    call: _Call
    n1: int
    n2: int
    x2_given: bool
    leaves: list[_Leaf]
    rebuild: Callable[[list], Any]
    symmetric: bool

    @classmethod
    def build(cls, call: _Call, probe1: Inputs, probe2: Inputs | None, n1: int, n2: int) -> _Plan:
        """Probe `kernel_fn` on one example (checking its modules on the way)."""
        named = _named_modules(call)
        mixing = _batch_mixing_modules(named, {})  # before a probe they may fail on
        if not mixing:
            with _recorded_layer_norm_inputs(named) as calls:
                template = call(probe1, probe2, plain=True)
            mixing = _batch_mixing_modules(named, calls)
        if mixing:
            raise ValueError(f"batch: {', '.join(mixing)} mix the examples of a batch (dropout or "
                             "batch normalization in training mode, LayerNorm over the batch "
                             "axis): a kernel computed in tiles would differ from the whole; "
                             "switch them to eval mode (model.eval()) or compute untiled")
        nodes, rebuild_nodes = _split_outputs(template)
        layouts = cls._layouts(call, nodes, probe1)
        leaves: list[_Leaf] = []
        for k, (node, (diagonal_batch, diagonal_spatial)) in enumerate(zip(nodes, layouts)):
            fields = _fields(node)
            offset = len(leaves)
            for field, value in fields.items():
                if isinstance(node, Kernel) and field not in _FIELD_ROLES:
                    raise TypeError(f"batch: cannot assemble the Kernel field {field!r} from tiles")
                name = (f'{k}.' if len(nodes) > 1 else '') + (field or 'kernel')
                leaf = _Leaf(name, _FIELD_ROLES.get(field, 'pair'), value, diagonal_spatial,
                             index=len(leaves))
                if leaf.role in ('cov1', 'cov2'):
                    cls._covariance(leaf, field, fields, diagonal_batch, probe2 is not None, offset, k)
                    if leaf.source != 'main' and not call.accepts_get:
                        raise TypeError(f"batch: {field} with diagonal_batch=False is computed as "
                                        "kernel_fn(x, x, get='nngp'), but kernel_fn has no get")
                if (not isinstance(value, torch.Tensor) or value.ndim == 0) and \
                        leaf.role in ('pair', 'side1', 'side2'):
                    leaf.role = 'const'
                elif leaf.role == 'pair' and value.ndim < 2:
                    raise TypeError(f"batch: kernel_fn returned {name} of shape "
                                    f"{tuple(value.shape)} for one example; expected (N1, N2, ...)")
                leaves.append(leaf)

        def rebuild(values: list) -> Any:
            it = iter(values)
            return rebuild_nodes([_rebuild(node, {f: next(it) for f in _fields(node)})
                                  for node in nodes])

        symmetric = all(leaf.template.ndim == 2 or leaf.diagonal_spatial is not None
                        for leaf in leaves if leaf.role == 'pair')
        if not symmetric:
            logger.info("batch: the layout of the spatial axes of the kernel is unknown, so with "
                        "x2=None the tiles below the diagonal are computed too")
        return cls(call, n1, n2, probe2 is not None, leaves, rebuild, symmetric)

    @staticmethod
    def _layouts(call: _Call, nodes: list, probe1: Inputs) -> list[tuple[bool | None, bool | None]]:
        """`(diagonal_batch, diagonal_spatial)` of each output kernel, where known."""
        if all(isinstance(node, Kernel) for node in nodes):
            return [(node.diagonal_batch, node.diagonal_spatial) for node in nodes]
        if call.is_stax and call.accepts_get:
            flags, _ = _split_outputs(call(probe1, None, plain=True,
                                           get=('diagonal_batch', 'diagonal_spatial')))
            return [tuple(f) for f in flags]
        return [(None, None)] * len(nodes)

    @staticmethod
    def _covariance(leaf: _Leaf, field: str, fields: dict, diagonal_batch: bool | None,
                    x2_given: bool, offset: int, node: int) -> None:
        """Where `cov1`/`cov2` come from: per example from any tile, or, as
        pairs (`diagonal_batch=False`), from the NNGP of x1 (x2) with itself."""
        side = field[-1]
        if fields[field] is None:
            leaf.role = 'const'
        elif diagonal_batch is None:
            raise TypeError(f"batch: cannot tell whether {field} of kernel_fn's output holds "
                            "pairs of examples; return a Kernel or use a stax kernel_fn")
        elif diagonal_batch:
            leaf.role = 'side' + side
        elif not x2_given and isinstance(fields.get('nngp'), torch.Tensor):
            leaf.role, leaf.index = 'pair', offset + list(fields).index('nngp')
        else:
            leaf.role, leaf.source, leaf.index = 'pair', 'cov' + side, node

    def sources(self) -> list[str]:
        return sorted({leaf.source for leaf in self.leaves}, key=['main', 'cov1', 'cov2'].index)

    def size(self, kind: str) -> tuple[int, int]:
        """Rows and columns of the kernel that tiles of `kind` cover."""
        if kind == 'main':
            return self.n1, self.n2
        return (self.n1, self.n1) if kind == 'cov1' else (self.n2, self.n2)

    def self_pairs(self, kind: str) -> bool:
        """Whether tiles of `kind` pair one input with itself (the symmetric case)."""
        return kind != 'main' or not self.x2_given


# --------------------------------------------------------------------------- tiles

@dataclasses.dataclass(frozen=True, order=True)
class _Task:
    """The tile of row block `i` and column block `j` of the kernel `kind`."""

    kind: str
    i: int
    j: int

    @property
    def name(self) -> str:
        return f'{self.kind}-{self.i:06d}-{self.j:06d}'


def _tasks(plan: _Plan, batch_size: int) -> list[_Task]:
    tasks = []
    for kind in plan.sources():
        rows, cols = (math.ceil(n / batch_size) for n in plan.size(kind))
        upper_only = plan.self_pairs(kind) and plan.symmetric
        tasks += [_Task(kind, i, j) for i in range(rows) for j in range(cols)
                  if j >= i or not upper_only]
    return tasks


class _Tiles:
    """Computes tiles and assembles them into the result."""

    def __init__(self, plan: _Plan, x1: Inputs, x2: Inputs | None, batch_size: int,
                 device: torch.device, out_device: torch.device,
                 memmap_dir: pathlib.Path | None) -> None:
        self.plan, self.x1, self.x2, self.b, self.device = plan, x1, x2, batch_size, device
        self.out_device, self.memmap_dir = out_device, memmap_dir
        self.out: list[Any] = []
        self.memmaps: list[np.memmap] = []

    def _block(self, kind: str, i: int, axis: int) -> slice:
        n = self.plan.size(kind)[axis]
        return slice(i * self.b, min((i + 1) * self.b, n))

    def compute(self, task: _Task) -> list[Any]:
        """`kernel_fn` on the tile, its output flattened."""
        plan = self.plan
        if task.kind == 'main':
            xa, xb = self.x1, self.x2
        else:
            xa, xb = (self.x1 if task.kind == 'cov1' else self.x2), None
        rows, cols = self._block(task.kind, task.i, 0), self._block(task.kind, task.j, 1)
        a = _rows(xa, rows.start, rows.stop, self.device)
        if xb is None:
            # On the diagonal, x2=None keeps the exact self-pair entries of the untiled call.
            b = None if task.i == task.j else _rows(xa, cols.start, cols.stop, self.device)
        else:
            b = _rows(xb, cols.start, cols.stop, self.device)
        out = plan.call(a, b) if task.kind == 'main' else plan.call(a, b, get='nngp')
        values = _flatten(out)
        expected = len(plan.leaves) if task.kind == 'main' else None
        if expected is not None and len(values) != expected:
            raise ValueError(f"batch: kernel_fn returned {len(values)} fields on tile "
                             f"{task.name}, {expected} on the one-example probe")
        return values

    def allocate(self) -> None:
        plan = self.plan
        for leaf in plan.leaves:
            t = leaf.template
            if leaf.role == 'pair':
                self.out.append(self._empty(leaf, (*plan.size(leaf.source), *t.shape[2:])))
            elif leaf.role in ('side1', 'side2'):
                n = plan.n1 if leaf.role == 'side1' else plan.n2
                self.out.append(self._empty(leaf, (n, *t.shape[1:])))
            elif leaf.role == 'same_inputs':
                same = plan.n1 == plan.n2 if plan.x2_given else True
                self.out.append(torch.tensor(same, device=self.out_device))
            elif leaf.role in ('shape1', 'shape2'):
                n = plan.n1 if leaf.role == 'shape1' or not plan.x2_given else plan.n2
                self.out.append((n, *t[1:]))
            else:
                self.out.append(t.to(self.out_device) if isinstance(t, torch.Tensor) else t)

    def _empty(self, leaf: _Leaf, shape: Shape) -> torch.Tensor:
        dtype = leaf.template.dtype
        if self.memmap_dir is None:
            return torch.empty(shape, dtype=dtype, device=self.out_device)
        self.memmap_dir.mkdir(parents=True, exist_ok=True)
        array = _new_npy(self.memmap_dir / f'{leaf.name}.npy', _numpy_dtype(dtype), shape)
        self.memmaps.append(array)
        return torch.from_numpy(array)

    def place(self, task: _Task, values: list[Any]) -> None:
        plan = self.plan
        rows, cols = self._block(task.kind, task.i, 0), self._block(task.kind, task.j, 1)
        self_pairs = plan.self_pairs(task.kind)
        for leaf, out in zip(plan.leaves, self.out):
            if leaf.source != task.kind:
                continue
            value = values[leaf.index]
            if leaf.role == 'pair':
                out[rows, cols] = value
                if self_pairs and plan.symmetric and task.i != task.j:
                    out[cols, rows] = _transpose_pair(value, leaf.diagonal_spatial)
            elif leaf.role == 'side1' and task.j == (task.i if self_pairs else 0):
                out[rows] = value
            elif leaf.role == 'side2' and task.i == 0:
                out[cols] = value
            elif leaf.role == 'same_inputs' and task.i == task.j:
                out &= value.to(out.device)

    def result(self) -> Any:
        for array in self.memmaps:
            array.flush()
        return self.plan.rebuild(self.out)


def _transpose_pair(t: torch.Tensor, diagonal_spatial: bool | None) -> torch.Tensor:
    """`K(x2, x1)` from `K(x1, x2)`: swap the batch axes and, in the full
    spatial layout `(N1, N2, X, X', Y, Y', …)`, each pair of spatial axes."""
    order = [1, 0]
    n_spatial = t.ndim - 2
    if diagonal_spatial or not n_spatial:
        order += range(2, t.ndim)
    else:
        for d in range(n_spatial // 2):
            order += [3 + 2 * d, 2 + 2 * d]
    return t.permute(order)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    try:
        return torch.empty((), dtype=dtype).numpy().dtype
    except TypeError as error:
        raise TypeError(f"batch: memmap_dir cannot hold {dtype} (no numpy dtype)") from error


def _new_npy(path: pathlib.Path, dtype: np.dtype, shape: Shape) -> np.memmap:
    """A new `.npy` file of `shape` at `path`, its space reserved, mapped.

    What was at `path` is unlinked, never opened: an earlier result that maps
    that file keeps it (rewriting it in place would change that result, and
    reading it would crash with SIGBUS where the new file is shorter), and a
    link there is not followed. The space is reserved (`posix_fallocate`)
    because a sparse file on a full disk fails only when a tile is written
    into the mapping, and then with SIGBUS.
    """
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NO_FOLLOW, 0o666)
    with os.fdopen(fd, 'w+b') as f:
        np.lib.format.write_array_header_1_0(f, {'descr': np.lib.format.dtype_to_descr(dtype),
                                                 'fortran_order': False, 'shape': shape})
        offset = f.tell()
        size = offset + dtype.itemsize * math.prod(shape)
        try:
            if hasattr(os, 'posix_fallocate'):
                os.posix_fallocate(fd, 0, size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # where it cannot reserve
                path.unlink()
                raise OSError(error.errno, f"batch: memmap_dir {path.parent}: cannot reserve "
                              f"{_gib(size)} for {path.name} ({error.strerror}); free some "
                              "space or pass a directory on another disk") from error
        return np.memmap(f, dtype=dtype, mode='r+', offset=offset, shape=shape)


def _check_disk_space(directory: pathlib.Path, needed: int) -> None:
    """Refuse a result of `needed` bytes that the disk of `directory` cannot hold."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"batch: memmap_dir {directory} needs {_gib(needed)} for the "
                      f"result, and {_gib(free)} are free on its disk; free some space or pass a "
                      "directory on another disk")


# --------------------------------------------------------------------------- memory

class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors alive at once while active; `peak` is the most.

    Every tensor an operation returns is followed until its last Python
    reference dies (views share their base's storage, counted once); more
    than `max_operations` operations raise `_TooManyOperations`. On `meta`
    tensors nothing is computed; the values Python asks of them (`bool(t)`,
    `t.item()`, `torch.equal`, as in input validation) are answered `True`.
    """

    def __init__(self, max_operations: int | None = None) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage -> [tensors alive, bytes]
        self.current = self.peak = self.operations = 0
        self.max_operations = max_operations
        self._outer_shapes_only = False

    def __enter__(self) -> _LiveBytes:
        self._outer_shapes_only = getattr(SHAPES_ONLY, 'active', False)
        SHAPES_ONLY.active = True  # kernel_fn takes the meta inputs it counts
        return super().__enter__()

    def __exit__(self, *exc_info: Any) -> None:
        SHAPES_ONLY.active = self._outer_shapes_only
        super().__exit__(*exc_info)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.operations += 1
        if self.max_operations is not None and self.operations > self.max_operations:
            raise _TooManyOperations
        if func in _VALUE_QUERIES and any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
            return True
        out = func(*args, **kwargs)
        for t in (out if isinstance(out, (list, tuple)) else [out]):
            if isinstance(t, torch.Tensor):
                self._follow(t)
        return out

    def _follow(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [0, storage.nbytes()]
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if not entry[0]:
            self.current -= entry[1]
            del self.live[key]


class _TooManyOperations(Exception):
    """A measured call ran past `_LiveBytes.max_operations`."""


_VALUE_QUERIES = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
                  torch.ops.aten.is_nonzero.default)


class _Estimator:
    """Memory estimates of tiles, by running `kernel_fn` on meta inputs.

    A meta operation costs a fraction of a millisecond however large its
    tensors, but kernel rules loop over cache-sized blocks, so the number of
    operations grows with the tile. A tile that needs more than
    `MAX_OPERATIONS` is not measured: its peak is the measured one of `b₀`
    examples times `(b / b₀)²`, `b₀` the largest power-of-two fraction of the
    tile that can be measured. Peaks are `α b² + γ b + c` with `γ, c ≥ 0`
    (pair arrays, per-example arrays, fixed-size blocks), so `peak / b²` does
    not grow with `b` and this bounds the peak from above (a secant through
    two measured tiles, which assumes more of that form, fell short for CNNs
    whose blocks change with the tile).
    """

    MAX_OPERATIONS = 1500

    def __init__(self, call: _Call, plan: _Plan, x1: _MetaInputs, x2: _MetaInputs | None) -> None:
        self.call, self.plan, self.x1, self.x2 = call, plan, x1, x2
        self._measured: dict[int, int | None] = {}
        self._anchor: int | None = None

    def _peak(self, kind: str, b: int, diagonal: bool, limit: int | None) -> int:
        x = self.x2 if kind == 'cov2' else self.x1
        with _LiveBytes(limit) as counter:
            xa = x.rows(0, b)
            if kind == 'main' and self.x2 is not None:
                xb = self.x2.rows(0, b)
            else:
                xb = None if diagonal else x.rows(b, 2 * b)
            extra = {} if kind == 'main' else {'get': 'nngp'}
            out = self.call(xa, xb, plain=True, **extra)
            del xa, xb, out
        return counter.peak

    def _measure(self, b: int) -> int | None:
        """The peak of a tile of `b` examples; `None` if it takes too many operations."""
        if b not in self._measured:
            limit = self.MAX_OPERATIONS if b > 2 else None
            try:
                peaks = []
                for kind in self.plan.sources():
                    peaks.append(self._peak(kind, b, True, limit))
                    if self.plan.self_pairs(kind) and self.plan.size(kind)[0] > b:
                        peaks.append(self._peak(kind, b, False, limit))
                self._measured[b] = max(peaks)
            except _TooManyOperations:
                self._measured[b] = None
        return self._measured[b]

    def tile_bytes(self, b: int) -> tuple[int, bool]:
        """The peak bytes of a tile of `b` examples, and whether it was extrapolated."""
        if self._anchor is None or b <= self._anchor:
            peak = self._measure(b)
            if peak is not None:
                return peak, False
        if self._anchor is None:
            anchor = b // 2
            while anchor > 2 and self._measure(anchor) is None:
                anchor //= 2
            self._anchor = max(anchor, 2)
        return math.ceil(self._measure(self._anchor) * b**2 / self._anchor**2), True

    def output_bytes(self) -> int:
        total = 0
        for leaf in self.plan.leaves:
            if leaf.role in ('pair', 'side1', 'side2'):
                per_example = leaf.template.element_size() * leaf.template.numel()
                if leaf.role == 'pair':
                    rows, cols = self.plan.size(leaf.source)
                    total += per_example * rows * cols
                else:
                    total += per_example * (self.plan.n1 if leaf.role == 'side1' else self.plan.n2)
        return total

    def estimate(self, b: int, output_bytes: int | None = None) -> MemoryEstimate:
        b = min(b, max(self.plan.n1, self.plan.n2))
        try:
            tile, extrapolated = self.tile_bytes(b)
        except Exception as error:
            raise ValueError(f"estimate_memory: kernel_fn cannot run on meta tensors, so its "
                             f"memory is not estimated ({type(error).__name__}: {error})") from error
        return MemoryEstimate(b, tile, self.output_bytes() if output_bytes is None else output_bytes,
                              len(_tasks(self.plan, b)), extrapolated)

    def largest_fitting(self, budget: int, output_bytes: int, where: str) -> MemoryEstimate:
        """The estimate of the largest tile with `tile + output_bytes <= budget`."""
        def fits(b: int) -> bool:
            return self.estimate(b, output_bytes).total_bytes <= budget

        low, high = 1, max(self.plan.n1, self.plan.n2)
        if not fits(low):
            raise MemoryError(f"batch: even a tile of one example does not fit: "
                              f"{self.estimate(1, output_bytes)} > {_gib(budget)} on {where}")
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(middle) else (low, middle - 1)
        return self.estimate(low, output_bytes)


def _available_bytes(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (`None` where unknown)."""
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == 'cpu':
        try:
            with open('/proc/meminfo') as meminfo:
                for line in meminfo:
                    if line.startswith('MemAvailable:'):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def _choose_batch_size(settings: _Settings, plan: _Plan, x1: Inputs, x2: Inputs | None,
                       device: torch.device, out_device: torch.device) -> int:
    """The tile size, after checking that the computation fits in memory
    (and the result on the disk of `memmap_dir`).
    `'auto'` resumes a checkpoint with the tile size it was made with."""
    requested = settings.batch_size
    if requested == 'auto' and settings.checkpoint is not None:
        requested = _Checkpoint.recorded_batch_size(settings.checkpoint) or 'auto'
    estimator = _Estimator(plan.call, plan, _MetaInputs.like(x1),
                           None if x2 is None else _MetaInputs.like(x2))
    output_bytes = estimator.output_bytes()
    if settings.memmap_dir is not None:
        _check_disk_space(settings.memmap_dir, output_bytes)
    output_here = settings.memmap_dir is None and out_device == device
    available = _available_bytes(device)
    where = f"{device} ({'max_memory' if settings.max_memory else 'free memory'})"
    if requested == 'auto':
        budget = settings.max_memory or (None if available is None else
                                         int(AUTO_MEMORY_FRACTION * available))
        if budget is None:
            raise ValueError(f"batch: batch_size='auto' needs max_memory: the free memory of "
                             f"{device} is unknown")
        estimate = estimator.largest_fitting(budget, output_bytes if output_here else 0, where)
        logger.info("batch: batch_size='auto' chose %d: %s", estimate.batch_size, estimate)
        batch_size = estimate.batch_size
    else:
        batch_size = min(requested or max(plan.n1, plan.n2), max(plan.n1, plan.n2))
        budget = settings.max_memory or available
        if budget is None:
            return batch_size
        try:
            estimate = estimator.estimate(batch_size, output_bytes if output_here else 0)
        except ValueError as error:  # kernel functions that need values, e.g. empirical ones
            logger.info("batch: memory not checked: %s", error)
            return batch_size
        if estimate.total_bytes > budget:
            raise MemoryError(f"batch: the computation needs about {estimate}, more than the "
                              f"{_gib(budget)} of {where}; use a smaller batch_size, "
                              "store_on_device=False or memmap_dir")
    if settings.memmap_dir is None and out_device != device and out_device.type == 'cpu':
        host = _available_bytes(out_device)
        if host is not None and output_bytes > host:
            raise MemoryError(f"batch: the result needs {_gib(output_bytes)} of CPU memory, "
                              f"{_gib(host)} are available; use memmap_dir")
    return batch_size


# --------------------------------------------------------------------------- model checks and hashes

_LIBRARIES = frozenset({'torch', 'torchntk', 'numpy', 'tqdm', 'torchdiffeq', 'functools',
                        'builtins', 'typing', 'collections', 'math'})
_ATOMS = (str, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.layout)


def _parts(obj: Any, seen: set[int] | None = None) -> Iterator[Any]:
    """What a kernel function depends on, in a fixed order: tensors, modules,
    and strings describing everything else.

    Followed: the instance of a bound method, `functools.partial` arguments,
    closure cells and defaults of functions, the code of a function and the
    globals it names (except for functions of torch, torchntk and other
    libraries, whose versions are hashed instead), containers, module
    attributes, parameters, buffers and submodules, and the attributes of other
    objects.
    """
    seen = set() if seen is None else seen
    if isinstance(obj, _ATOMS):
        yield f'{type(obj).__name__}:{obj!r}'
        return
    if isinstance(obj, nn.parameter.UninitializedTensorMixin):
        yield 'uninitialized'  # lazy parameters of the finite network, not drawn yet
        return
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        yield torch.as_tensor(obj)
        return
    if isinstance(obj, (tuple, frozenset)):  # immutable: no cycle, and sharing is Python's choice
        yield f'{type(obj).__name__}[{len(obj)}]'
        for value in (sorted(obj, key=repr) if isinstance(obj, frozenset) else obj):
            yield from _parts(value, seen)
        return
    if id(obj) in seen:
        yield f'<seen {type(obj).__qualname__}>'
        return
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        yield obj
        for name, value in sorted(vars(obj).items()):
            if not name.startswith('_'):
                yield name
                yield from _parts(value, seen)
        for group in (obj._parameters, obj._buffers, obj._modules):
            for name, value in group.items():
                yield name
                yield from _parts(value, seen)
    elif isinstance(obj, (list, set)):
        yield f'{type(obj).__name__}[{len(obj)}]'
        for value in (sorted(obj, key=repr) if isinstance(obj, set) else obj):
            yield from _parts(value, seen)
    elif isinstance(obj, dict):
        yield f'dict[{len(obj)}]'
        for key, value in obj.items():
            yield from _parts(key, seen)
            yield from _parts(value, seen)
    elif isinstance(obj, functools.partial):
        yield 'partial'
        for part in (obj.func, obj.args, obj.keywords):
            yield from _parts(part, seen)
    elif inspect.ismethod(obj):
        yield 'method'
        yield from _parts(obj.__self__, seen)
        yield from _parts(obj.__func__, seen)
    elif isinstance(obj, types.FunctionType):
        yield f'function {obj.__module__}.{obj.__qualname__}'
        cells = [cell.cell_contents for cell in obj.__closure__ or ()
                 if not _is_empty_cell(cell)]
        for part in (obj.__defaults__, obj.__kwdefaults__, cells):
            yield from _parts(part, seen)
        if (obj.__module__ or '').split('.')[0] not in _LIBRARIES:
            yield _code_description(obj.__code__)
            names = sorted(_code_names(obj.__code__) & obj.__globals__.keys())
            yield from _parts({name: obj.__globals__[name] for name in names}, seen)
    elif isinstance(obj, (type, types.ModuleType, types.BuiltinFunctionType)) or (
            callable(obj) and not hasattr(obj, '__dict__')):
        name = getattr(obj, '__qualname__', getattr(obj, '__name__', ''))
        yield f'{type(obj).__name__} {getattr(obj, "__module__", "")}.{name}'
    elif hasattr(obj, '__dict__'):
        yield f'object {type(obj).__module__}.{type(obj).__qualname__}'
        yield from _parts(vars(obj), seen)
    else:
        yield f'object {type(obj).__module__}.{type(obj).__qualname__}'


def _is_empty_cell(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return True
    return False


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _code_description(code: types.CodeType) -> str:
    """The bytecode and constants of a function (line numbers left out)."""
    consts = [_code_description(c) if isinstance(c, types.CodeType) else repr(c)
              for c in code.co_consts]
    return f'code {code.co_code.hex()} {code.co_names} {consts}'


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f'tensor {t.dtype} {tuple(t.shape)}'.encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())


def _fingerprint(obj: Any) -> str:
    """sha256 of `_parts(obj)`."""
    h = hashlib.sha256()
    for part in _parts(obj):
        if isinstance(part, torch.Tensor):
            _hash_tensor(h, part)
        elif isinstance(part, nn.Module):
            h.update(f'module {type(part).__module__}.{type(part).__qualname__}'.encode())
        else:
            h.update(part.encode())
        h.update(b'\0')
    return h.hexdigest()


def _named_modules(call: _Call) -> dict[str, nn.Module]:
    """The modules `kernel_fn` and its arguments reach, by name."""
    modules = [p for p in _parts((call.plain, call.args, call.kwargs)) if isinstance(p, nn.Module)]
    inner = {id(m) for root in modules for m in root.modules() if m is not root}
    named = {}
    for root in modules:
        if id(root) not in inner:
            for name, module in root.named_modules():
                named[f'{type(root).__name__}.{name}' if name else type(root).__name__] = module
    return named


@contextlib.contextmanager
def _recorded_layer_norm_inputs(named: dict[str, nn.Module]) -> Iterator[dict[str, list]]:
    """Record how many axes each stax `LayerNorm` normalizes its inputs over,
    in the `{name: [(input shape, output shape)]}` form `_batch_mixing_modules` reads."""
    calls: dict[str, list] = collections.defaultdict(list)
    norms = {name: m for name, m in named.items() if isinstance(m, LayerNorm)}

    def recording(name: str, module: LayerNorm) -> Callable:
        def axes(ndim: int) -> tuple[int, ...]:
            calls[name].append(((0,) * ndim, None))  # only the number of axes is read
            return type(module)._axes(module, ndim)
        return axes

    for name, module in norms.items():
        module._axes = recording(name, module)
    try:
        yield calls
    finally:
        for module in norms.values():
            del module._axes


# --------------------------------------------------------------------------- checkpoint

class _Checkpoint:
    """The finished tiles of one computation: a directory of one file per tile.

    `meta.json` holds the hash of the computation (`key`) and what it was made
    of; each `<tile>.pt` holds the key, the tile's name, its values and their
    sha256. Files are written to a temporary name, synced, and renamed, so a
    file under a tile's name is always whole; a run killed mid-write leaves
    only a temporary file, removed by the next run. Every file is opened
    without following links (`_open_own`), so nothing outside the directory
    is read or written.
    """

    def __init__(self, directory: pathlib.Path, key: str, description: dict[str, str],
                 batch_size: int) -> None:
        self.directory, self.key, self.description = directory, key, description
        self.batch_size = batch_size
        self._lock = None

    @staticmethod
    def recorded_batch_size(directory: pathlib.Path) -> int | None:
        """The tile size of the checkpoint in `directory`, if there is one."""
        meta = _Checkpoint.read_meta(directory)
        return None if meta is None else meta['batch_size']

    @staticmethod
    def read_meta(directory: pathlib.Path) -> dict | None:
        """The `meta.json` of `directory` (`None` if absent), or a `ValueError`
        saying what is wrong with it."""
        try:
            fd = _open_own(directory / 'meta.json', os.O_RDONLY, 'checkpoint folder')
        except FileNotFoundError:
            return None
        with os.fdopen(fd, 'rb') as f:
            text = f.read()
        try:
            meta = json.loads(text)
        except ValueError as error:  # UnicodeDecodeError too
            problem = f'not JSON: {error}'
        else:
            problem = _meta_problem(meta)
        if problem:
            raise ValueError(f"batch: checkpoint folder {directory}: meta.json is damaged "
                             f"({problem}); delete the folder to start over")
        return meta

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = _Lock(self.directory / 'lock')
        meta = self.read_meta(self.directory)
        if meta is not None:
            if meta['key'] != self.key:  # the lock goes in close()
                old = meta['description']
                changed = [k for k in self.description if old.get(k) != self.description[k]]
                raise ValueError(f"batch: checkpoint {self.directory} belongs to another "
                                 f"computation (different {', '.join(changed) or 'format'}); "
                                 "pass another directory or delete this one")
        else:
            self._write(self.directory / 'meta.json', lambda f: f.write(json.dumps(
                {'format': _CHECKPOINT_FORMAT, 'key': self.key, 'batch_size': self.batch_size,
                 'description': self.description}, indent=1).encode()))
        for stale in self.directory.glob('.tmp-*'):
            stale.unlink()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def path(self, task: _Task) -> pathlib.Path:
        return self.directory / f'{task.name}.pt'

    def load(self, task: _Task) -> list | None:
        """The values of a finished tile, or `None` if absent or damaged (then removed)."""
        path = self.path(task)
        try:
            fd = _open_own(path, os.O_RDONLY, 'checkpoint folder')
        except FileNotFoundError:
            return None
        try:
            with os.fdopen(fd, 'rb') as f:
                payload = torch.load(f, map_location='cpu', weights_only=True)
            if payload['key'] == self.key and payload['task'] == task.name and \
                    payload['digest'] == _digest(payload['values']):
                return payload['values']
            problem = 'its contents do not match their checksum'
        except Exception as error:  # truncated or corrupt files fail in many ways
            problem = f'{type(error).__name__}: {error}'
        logger.warning("batch: tile file %s is damaged (%s); computing it again", path, problem)
        path.unlink()
        return None

    def save(self, task: _Task, values: list) -> None:
        values = [v.detach().cpu() if isinstance(v, torch.Tensor) else None for v in values]
        payload = {'key': self.key, 'task': task.name, 'values': values, 'digest': _digest(values)}
        self._write(self.path(task), lambda f: torch.save(payload, f))

    def _write(self, path: pathlib.Path, write: Callable[[Any], None]) -> None:
        """`_write_atomically`, with an error that says what to do where it fails
        for the file system (a full disk shows in `torch.save` as a `RuntimeError`
        whose context holds the `OSError`)."""
        try:
            _write_atomically(path, write)
        except Exception as error:
            cause = error
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            full = cause.errno in (errno.ENOSPC, errno.EDQUOT)
            problem = (f"the disk is full while writing {path.name} "
                       f"({_gib(shutil.disk_usage(self.directory).free)} free)" if full else
                       f"writing {path.name} failed ({type(cause).__name__}: {cause})")
            raise OSError(cause.errno, f"batch: checkpoint folder {self.directory}: {problem}; "
                          f"{'free some space' if full else 'fix it'} or pass another folder (a "
                          "run started again with the same arguments resumes from the tiles "
                          "saved so far)") from error


_META_FIELDS = {'format': 'an int', 'key': 'a string', 'batch_size': 'an int >= 1',
                'description': 'an object of strings'}


def _meta_problem(meta: Any) -> str | None:
    """What is wrong with the contents of a checkpoint's `meta.json`, if anything."""
    if not isinstance(meta, dict):
        return f'a JSON {type(meta).__name__}, not an object'
    missing = [field for field in _META_FIELDS if field not in meta]
    if missing:
        return f"no {', '.join(missing)}"
    valid = {'format': isinstance(meta['format'], int), 'key': isinstance(meta['key'], str),
             'batch_size': type(meta['batch_size']) is int and meta['batch_size'] >= 1,
             'description': isinstance(meta['description'], dict) and
             all(isinstance(v, str) for v in meta['description'].values())}
    wrong = [f'{field} is {meta[field]!r}, expected {_META_FIELDS[field]}'
             for field, ok in valid.items() if not ok]
    if not wrong and meta['format'] != _CHECKPOINT_FORMAT:
        wrong = [f"format {meta['format']}, this torchntk reads format {_CHECKPOINT_FORMAT}"]
    return '; '.join(wrong) or None


_NO_FOLLOW = getattr(os, 'O_NOFOLLOW', 0)


def _open_own(path: pathlib.Path, flags: int, folder: str) -> int:
    """`os.open(path, flags)` where `path` must be a regular file with no other
    name: a symbolic link, a hard link or anything else planted there raises a
    `ValueError` instead of being followed (`FileNotFoundError` if absent)."""
    # O_NONBLOCK: opening a FIFO planted there returns at once, to be refused below.
    try:
        fd = os.open(path, flags | _NO_FOLLOW | getattr(os, 'O_NONBLOCK', 0), 0o666)
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.EISDIR):
            raise
        problem = 'is a symbolic link' if error.errno == errno.ELOOP else 'is not a regular file'
    else:
        info = os.fstat(fd)
        problem = ('is not a regular file' if not stat.S_ISREG(info.st_mode) else
                   f'has {info.st_nlink} hard links' if info.st_nlink > 1 else None)
        if problem is None:
            return fd
        os.close(fd)
    raise ValueError(f"batch: {folder} {path.parent}: {path.name} {problem}; batch uses only "
                     "files it made there and follows no link: remove it")


def _digest(values: list) -> str:
    h = hashlib.sha256()
    for value in values:
        if isinstance(value, torch.Tensor):
            _hash_tensor(h, value)
        else:
            h.update(b'none')
    return h.hexdigest()


def _write_atomically(path: pathlib.Path, write: Callable[[Any], None]) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix='.tmp-', suffix=path.suffix)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if hasattr(os, 'O_DIRECTORY'):  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class _Lock:
    """An exclusive advisory lock on a file (`fcntl.flock`), or a refusal."""

    def __init__(self, path: pathlib.Path) -> None:
        self.file = os.fdopen(_open_own(path, os.O_RDWR | os.O_CREAT, 'checkpoint folder'), 'r+')
        if fcntl is None:
            logger.warning("batch: no fcntl here; concurrent runs on %s are not detected", path.parent)
            return
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or 'another process'
            self.file.close()
            raise RuntimeError(f"batch: checkpoint {path.parent} is in use by another run "
                               f"({holder}); wait for it to finish or use another directory")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f'pid {os.getpid()} on {socket.gethostname()}')
        self.file.flush()

    def release(self) -> None:
        if fcntl is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def _description(call: _Call, x1: Inputs, x2: Inputs | None, batch_size: int) -> dict[str, str]:
    from .. import __version__
    shapes = [tuple(_first_tensor(x).shape) for x in (x1, x2) if x is not None]
    return {'x1': _fingerprint(x1), 'x2': 'None' if x2 is None else _fingerprint(x2),
            'kernel_fn': _fingerprint(call.plain),
            'arguments': _fingerprint((call.args, call.kwargs)),
            'tiles': f'batch_size {batch_size}, inputs {shapes}',
            'versions': f'torchntk {__version__}, torch {torch.__version__}'}


# --------------------------------------------------------------------------- processes

class _Group:
    """The processes sharing the work: the default `torch.distributed` group, or this one."""

    def __init__(self) -> None:
        import torch.distributed as dist
        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.size = self.dist.get_world_size() if self.dist else 1

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list:
        if self.size == 1:
            return [obj]
        gathered = [None] * self.size
        self.dist.all_gather_object(gathered, obj)
        return gathered

    def gather(self, obj: Any) -> list | None:
        """Every rank's `obj` on rank 0 (`None` elsewhere)."""
        if self.size == 1:
            return [obj]
        gathered = [None] * self.size if self.rank == 0 else None
        self.dist.gather_object(obj, gathered, dst=0)
        return gathered

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed, so that none waits forever in a
        collective the failed one never reaches: the failed rank raises its
        own error, the others a `RuntimeError` with its rank and message
        (a message pickles where an exception object may not)."""
        report = None if error is None else f"{type(error).__name__}: {error}"
        reports = self.all_gather(report)
        if error is not None:
            raise error
        failed = [(rank, text) for rank, text in enumerate(reports) if text is not None]
        if failed:
            rank, text = failed[0]
            raise RuntimeError(f"batch: rank {rank} of {self.size} failed: {text}")

    def run(self, fn: Callable[[], Any]) -> Any:
        """`fn()` on this rank; if it raises on any rank, every rank raises (`agree`)."""
        error, result = None, None
        try:
            result = fn()
        except Exception as e:  # raised on every rank, below
            error = e
        self.agree(error)
        return result


# --------------------------------------------------------------------------- the run

def _run(settings: _Settings, call: _Call, x1: Inputs, x2: Inputs | None) -> Any:
    n1 = _n_examples(x1, 'x1')
    n2 = n1 if x2 is None else _n_examples(x2, 'x2')
    device = settings.device or _first_tensor(x1).device
    out_device = device if settings.store_on_device else torch.device('cpu')
    if settings.memmap_dir is not None:
        out_device = torch.device('cpu')
    group = _Group()
    with torch.no_grad():
        plan = group.run(lambda: _Plan.build(call, _rows(x1, 0, 1, device),
                                             None if x2 is None else _rows(x2, 0, 1, device),
                                             n1, n2))
        batch_size = group.broadcast(group.run(  # chosen by rank 0, which holds the result
            lambda: None if group.rank else _choose_batch_size(settings, plan, x1, x2, device,
                                                               out_device)))
        tasks = _tasks(plan, batch_size)
        checkpoint = None
        if settings.checkpoint is not None or group.size > 1:
            description = group.run(lambda: _description(call, x1, x2, batch_size))
            if len({json.dumps(d, sort_keys=True) for d in group.all_gather(description)}) > 1:
                raise ValueError("batch: the processes of the torch.distributed group were given "
                                 "different inputs, models or arguments")
            if settings.checkpoint is not None:  # rank 0's; every rank learns if it is refused
                key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
                checkpoint = group.run(lambda: None if group.rank else _Checkpoint(
                    settings.checkpoint, key, description, batch_size))
        tiles = _Tiles(plan, x1, x2, batch_size, device, out_device, settings.memmap_dir)
        try:
            pending = _resume(tiles, tasks, checkpoint, group)
            _compute(tiles, tasks, pending, checkpoint, group, settings.progress)
        finally:
            if checkpoint is not None:
                checkpoint.close()
        return tiles.result() if group.rank == 0 else None


def _resume(tiles: _Tiles, tasks: list[_Task], checkpoint: _Checkpoint | None,
            group: _Group) -> list[_Task]:
    """On rank 0: allocate the result, place the finished tiles of the
    checkpoint; on every rank: the tasks left to compute."""
    error, pending = None, None
    if group.rank == 0:
        try:
            tiles.allocate()
            if checkpoint is not None:
                checkpoint.open()
            pending = []
            for task in tasks:
                values = None if checkpoint is None else checkpoint.load(task)
                if values is None:
                    pending.append(task)
                else:
                    tiles.place(task, values)
            if checkpoint is not None:
                logger.info("batch: %d of %d tiles loaded from %s", len(tasks) - len(pending),
                            len(tasks), checkpoint.directory)
        except Exception as e:  # raised on every rank, below
            error = e
    group.agree(error)
    return group.broadcast(pending)


def _compute(tiles: _Tiles, tasks: list[_Task], pending: list[_Task],
             checkpoint: _Checkpoint | None, group: _Group, progress: bool) -> None:
    """Deal the pending tiles out to the ranks, one round at a time; rank 0
    places every result and writes it to the checkpoint."""
    mine = pending[group.rank::group.size]
    rounds = math.ceil(len(pending) / group.size)
    with tqdm(total=len(tasks), initial=len(tasks) - len(pending), unit='tile', desc='batch',
              disable=not progress or group.rank != 0) as bar:
        def computed(task: _Task | None) -> list | None:
            if task is None:
                return None
            values = tiles.compute(task)
            return values if group.size == 1 else \
                [v.cpu() if isinstance(v, torch.Tensor) else v for v in values]

        def place(gathered: list | None) -> None:
            for done, done_values in gathered or ():
                if done is None:
                    continue
                tiles.place(done, done_values)
                if checkpoint is not None:
                    checkpoint.save(done, done_values)
                bar.update()

        # Every rank takes part in every exchange, and one that fails (in its
        # tile, or rank 0 in placing or saving) says so at the next one.
        for r in range(rounds):
            task = mine[r] if r < len(mine) else None
            values = group.run(functools.partial(computed, task))
            group.run(functools.partial(place, group.gather((task, values))))
            del values  # placed: not kept while the next tile is computed (the estimate)
