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

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
from typing import Any, Callable, Union

import numpy as np
import torch
from tqdm import tqdm

from ..checks import check_flag, check_positive
from ..kernel import transpose_pair
from ..ops.heap import reuse_heap
from ..stax.module import Layer
from .arguments import checked_batch_size, checked_device, checked_folder, checked_kernel_fn
from .checkpoint import Checkpoint
from .distributed import Group
from .files import check_disk_space, new_npy, numpy_dtype
from .fingerprint import describe_computation
from .inputs import Inputs, Shape, examples, first_tensor, n_examples
from .memory import choose_batch_size, output_bytes
from .plan import Call, OutputField, Plan, Task, check_tileable, flatten

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class Settings:
    """The arguments of `batch`, checked."""

    batch_size: int | str
    device: torch.device | None
    store_on_device: bool
    progress: bool
    checkpoint: pathlib.Path | None
    memmap_dir: pathlib.Path | None
    max_memory: float | None  # bytes


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
    kernel_fn = checked_kernel_fn(kernel_fn, 'batch')
    check_tileable(kernel_fn)
    settings = Settings(batch_size=checked_batch_size(batch_size, 'batch'),
                        device=checked_device(device, 'batch'),
                        store_on_device=check_flag(store_on_device, 'store_on_device', 'batch'),
                        progress=check_flag(progress, 'progress', 'batch'),
                        checkpoint=checked_folder(checkpoint, 'checkpoint', 'batch'),
                        memmap_dir=checked_folder(memmap_dir, 'memmap_dir', 'batch'),
                        max_memory=check_positive(max_memory, 'max_memory', 'batch',
                                                  allow_none=True))

    @functools.wraps(kernel_fn)
    def batched_kernel_fn(x1: Inputs, x2: Inputs | None = None, *args: Any, **kwargs: Any) -> Any:
        with reuse_heap():  # across tiles: their temporaries reuse one another's memory
            return _run(settings, Call(kernel_fn, args, kwargs), x1, x2)

    return batched_kernel_fn


class Tiles:
    """Computes tiles and assembles them into the result."""

    def __init__(self, plan: Plan, x1: Inputs, x2: Inputs | None, batch_size: int,
                 device: torch.device, out_device: torch.device,
                 memmap_dir: pathlib.Path | None) -> None:
        self.plan, self.x1, self.x2, self.b, self.device = plan, x1, x2, batch_size, device
        self.out_device, self.memmap_dir = out_device, memmap_dir
        self.out: list[Any] = []
        self.memmaps: list[np.memmap] = []

    def _block(self, kind: str, i: int, axis: int) -> slice:
        n = self.plan.size(kind)[axis]
        return slice(i * self.b, min((i + 1) * self.b, n))

    def compute(self, task: Task) -> list[Any]:
        """`kernel_fn` on the tile, its output flattened."""
        plan = self.plan
        if task.kind == 'main':
            xa, xb = self.x1, self.x2
        else:
            xa, xb = (self.x1 if task.kind == 'cov1' else self.x2), None
        rows, cols = self._block(task.kind, task.i, 0), self._block(task.kind, task.j, 1)
        a = examples(xa, rows.start, rows.stop, self.device)
        if xb is None:
            # On the diagonal, x2=None keeps the exact self-pair entries of the untiled call.
            b = None if task.i == task.j else examples(xa, cols.start, cols.stop, self.device)
        else:
            b = examples(xb, cols.start, cols.stop, self.device)
        out = plan.call(a, b) if task.kind == 'main' else plan.call(a, b, get='nngp')
        values = flatten(out)
        expected = len(plan.fields) if task.kind == 'main' else None
        if expected is not None and len(values) != expected:
            raise ValueError(f"batch: kernel_fn returned {len(values)} fields on tile "
                             f"{task.name}, {expected} on the one-example probe")
        return values

    def allocate(self) -> None:
        plan = self.plan
        for field in plan.fields:
            t = field.template
            if field.role == 'pair':
                self.out.append(self._empty(field, (*plan.size(field.source), *t.shape[2:])))
            elif field.role in ('side1', 'side2'):
                n = plan.n1 if field.role == 'side1' else plan.n2
                self.out.append(self._empty(field, (n, *t.shape[1:])))
            elif field.role == 'same_inputs':
                same = plan.n1 == plan.n2 if plan.x2_given else True
                self.out.append(torch.tensor(same, device=self.out_device))
            elif field.role in ('shape1', 'shape2'):
                n = plan.n1 if field.role == 'shape1' or not plan.x2_given else plan.n2
                self.out.append((n, *t[1:]))
            else:
                self.out.append(t.to(self.out_device) if isinstance(t, torch.Tensor) else t)

    def _empty(self, field: OutputField, shape: Shape) -> torch.Tensor:
        dtype = field.template.dtype
        if self.memmap_dir is None:
            return torch.empty(shape, dtype=dtype, device=self.out_device)
        self.memmap_dir.mkdir(parents=True, exist_ok=True)
        array = new_npy(self.memmap_dir / f'{field.name}.npy', numpy_dtype(dtype), shape)
        self.memmaps.append(array)
        return torch.from_numpy(array)

    def place(self, task: Task, values: list[Any]) -> None:
        plan = self.plan
        rows, cols = self._block(task.kind, task.i, 0), self._block(task.kind, task.j, 1)
        self_pairs = plan.self_pairs(task.kind)
        for field, out in zip(plan.fields, self.out):
            if field.source != task.kind:
                continue
            value = values[field.index]
            if field.role == 'pair':
                out[rows, cols] = value
                if self_pairs and plan.symmetric and task.i != task.j:
                    out[cols, rows] = transpose_pair(value, field.diagonal_spatial)
            elif field.role == 'side1' and task.j == (task.i if self_pairs else 0):
                out[rows] = value
            elif field.role == 'side2' and task.i == 0:
                out[cols] = value
            elif field.role == 'same_inputs' and task.i == task.j:
                out &= value.to(out.device)

    def result(self) -> Any:
        for array in self.memmaps:
            array.flush()
        return self.plan.rebuild(self.out)


def _tile_size(settings: Settings, plan: Plan, x1: Inputs, x2: Inputs | None,
               device: torch.device, result_device: torch.device) -> int:
    """The tile size (`choose_batch_size`), after checking that the result fits
    on the disk of `memmap_dir`. `'auto'` resumes a checkpoint with the tile
    size it was made with."""
    requested = settings.batch_size
    if requested == 'auto' and settings.checkpoint is not None:
        requested = Checkpoint.recorded_batch_size(settings.checkpoint) or 'auto'
    if settings.memmap_dir is not None:
        check_disk_space(settings.memmap_dir, output_bytes(plan))
        result_device = None
    return choose_batch_size(plan, x1, x2, requested, settings.max_memory, device, result_device)


def _run(settings: Settings, call: Call, x1: Inputs, x2: Inputs | None) -> Any:
    n1 = n_examples(x1, 'x1')
    n2 = n1 if x2 is None else n_examples(x2, 'x2')
    device = settings.device or first_tensor(x1).device
    out_device = device if settings.store_on_device else torch.device('cpu')
    if settings.memmap_dir is not None:
        out_device = torch.device('cpu')
    group = Group()
    with torch.no_grad():
        plan = group.run(lambda: Plan.build(call, examples(x1, 0, 1, device),
                                            None if x2 is None else examples(x2, 0, 1, device),
                                            n1, n2))
        batch_size = group.broadcast(group.run(  # chosen by rank 0, which holds the result
            lambda: None if group.rank else _tile_size(settings, plan, x1, x2, device, out_device)))
        tasks = plan.tasks(batch_size)
        checkpoint = None
        if settings.checkpoint is not None or group.size > 1:
            description = group.run(lambda: describe_computation(
                call.plain, (call.args, call.kwargs), x1, x2, batch_size))
            if len({json.dumps(d, sort_keys=True) for d in group.all_gather(description)}) > 1:
                raise ValueError("batch: the processes of the torch.distributed group were given "
                                 "different inputs, models or arguments")
            if settings.checkpoint is not None:  # rank 0's; every rank learns if it is refused
                checkpoint = group.run(lambda: None if group.rank else Checkpoint(
                    settings.checkpoint, description, batch_size))
        tiles = Tiles(plan, x1, x2, batch_size, device, out_device, settings.memmap_dir)
        try:
            pending = _resume(tiles, tasks, checkpoint, group)
            _compute(tiles, tasks, pending, checkpoint, group, settings.progress)
        finally:
            if checkpoint is not None:
                checkpoint.close()
        return tiles.result() if group.rank == 0 else None


def _resume(tiles: Tiles, tasks: list[Task], checkpoint: Checkpoint | None,
            group: Group) -> list[Task]:
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


def _compute(tiles: Tiles, tasks: list[Task], pending: list[Task],
             checkpoint: Checkpoint | None, group: Group, progress: bool) -> None:
    """Deal the pending tiles out to the ranks, one round at a time; rank 0
    places every result and writes it to the checkpoint."""
    mine = pending[group.rank::group.size]
    rounds = math.ceil(len(pending) / group.size)
    with tqdm(total=len(tasks), initial=len(tasks) - len(pending), unit='tile', desc='batch',
              disable=not progress or group.rank != 0) as bar:
        def computed(task: Task | None) -> list | None:
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
