"""Memory of a tiled computation before it runs: the bytes alive at once while
a kernel function runs on shape-only (`meta`) tensors (`LiveBytes`), bounds for
tiles too large to count (`Estimator`), and the tile size that fits
(`choose_batch_size`)."""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..checks import SHAPES_ONLY
from ..stax.module import Layer
from .arguments import checked_batch_size, checked_kernel_fn
from .inputs import Inputs, MetaInputs, Shape
from .plan import Call, Plan

logger = logging.getLogger(__name__)

#: The fraction of the available memory `batch_size='auto'` fills when no
#: `max_memory` is given: the rest is left to allocator rounding and to others.
AUTO_MEMORY_FRACTION = 0.8


def gib(n: int) -> str:
    """`n` bytes in GiB, for messages."""
    return f"{n / 2**30:.3g} GiB"


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
            `Estimator`), not measured.
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
        return (f"{gib(self.total_bytes)} (output {gib(self.output_bytes)} + one tile of "
                f"{self.batch_size} x {self.batch_size} examples {gib(self.tile_bytes)}{how} + "
                f"allocator {gib(self.allocator_bytes)}, {self.tiles} tiles)")


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
    kernel_fn = checked_kernel_fn(kernel_fn, 'estimate_memory')
    batch_size = checked_batch_size(batch_size, 'estimate_memory')
    if batch_size == 'auto':
        raise ValueError("estimate_memory: batch_size must be an int >= 0 (0: untiled)")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"estimate_memory: dtype must be a floating torch.dtype such as "
                        f"torch.float32, got {dtype!r}")
    call = Call(kernel_fn, args, kwargs)
    x1 = MetaInputs.of_shape(x1_shape, dtype, 'x1_shape')
    x2 = None if x2_shape is None else MetaInputs.of_shape(x2_shape, dtype, 'x2_shape')
    grad = torch.is_grad_enabled()
    with torch.no_grad(), LiveBytes():  # answers the value queries of meta tensors
        plan = Plan.build(call, x1.rows(0, 1), None if x2 is None else x2.rows(0, 1),
                          x1.n, x1.n if x2 is None else x2.n)
    with torch.set_grad_enabled(grad):
        return Estimator(plan, x1, x2).estimate(batch_size or max(plan.n1, plan.n2))


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors alive at once while active; `peak` is the most.

    Every tensor an operation returns is followed until its last Python
    reference dies (views share their base's storage, counted once); more
    than `max_operations` operations raise `TooManyOperations`. On `meta`
    tensors nothing is computed; the values Python asks of them (`bool(t)`,
    `t.item()`, `torch.equal`, as in input validation) are answered `True`.
    """

    def __init__(self, max_operations: int | None = None) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage -> [tensors alive, bytes]
        self.current = self.peak = self.operations = 0
        self.max_operations = max_operations
        self._outer_shapes_only = False

    def __enter__(self) -> LiveBytes:
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
            raise TooManyOperations
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


class TooManyOperations(Exception):
    """A measured call ran past `LiveBytes.max_operations`."""


_VALUE_QUERIES = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
                  torch.ops.aten.is_nonzero.default)


def output_bytes(plan: Plan) -> int:
    """The bytes of the assembled result of `plan` (every field)."""
    total = 0
    for field in plan.fields:
        if field.role in ('pair', 'side1', 'side2'):
            per_example = field.template.element_size() * field.template.numel()
            if field.role == 'pair':
                rows, cols = plan.size(field.source)
                total += per_example * rows * cols
            else:
                total += per_example * (plan.n1 if field.role == 'side1' else plan.n2)
    return total


class Estimator:
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

    def __init__(self, plan: Plan, x1: MetaInputs, x2: MetaInputs | None) -> None:
        self.plan, self.x1, self.x2 = plan, x1, x2
        self._measured: dict[int, int | None] = {}
        self._anchor: int | None = None

    def _peak(self, kind: str, b: int, diagonal: bool, limit: int | None) -> int:
        x = self.x2 if kind == 'cov2' else self.x1
        with LiveBytes(limit) as counter:
            xa = x.rows(0, b)
            if kind == 'main' and self.x2 is not None:
                xb = self.x2.rows(0, b)
            else:
                xb = None if diagonal else x.rows(b, 2 * b)
            extra = {} if kind == 'main' else {'get': 'nngp'}
            out = self.plan.call(xa, xb, plain=True, **extra)
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
            except TooManyOperations:
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

    def estimate(self, b: int, result_bytes: int | None = None) -> MemoryEstimate:
        """The estimate of tiles of `b` examples, counting `result_bytes` for
        the result (default: all of it)."""
        b = min(b, max(self.plan.n1, self.plan.n2))
        try:
            tile, extrapolated = self.tile_bytes(b)
        except Exception as error:
            raise ValueError(f"estimate_memory: kernel_fn cannot run on meta tensors, so its "
                             f"memory is not estimated ({type(error).__name__}: {error})") from error
        return MemoryEstimate(b, tile, output_bytes(self.plan) if result_bytes is None else
                              result_bytes, len(self.plan.tasks(b)), extrapolated)

    def largest_fitting(self, budget: int, result_bytes: int, where: str) -> MemoryEstimate:
        """The estimate of the largest tile with `tile + result_bytes <= budget`."""
        def fits(b: int) -> bool:
            return self.estimate(b, result_bytes).total_bytes <= budget

        low, high = 1, max(self.plan.n1, self.plan.n2)
        if not fits(low):
            raise MemoryError(f"batch: even a tile of one example does not fit: "
                              f"{self.estimate(1, result_bytes)} > {gib(budget)} on {where}")
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(middle) else (low, middle - 1)
        return self.estimate(low, result_bytes)


def available_bytes(device: torch.device) -> int | None:
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


def choose_batch_size(plan: Plan, x1: Inputs, x2: Inputs | None, requested: int | str,
                      max_memory: float | None, device: torch.device,
                      result_device: torch.device | None) -> int:
    """The tile size of `plan` on `device`: `requested`, after checking that
    the computation fits in `max_memory` (default: the memory free there), or
    with `'auto'` the largest that fits. `result_device` is where the
    assembled result is kept (`None`: not in memory, in memory-mapped files)."""
    estimator = Estimator(plan, MetaInputs.like(x1), None if x2 is None else MetaInputs.like(x2))
    result_bytes = output_bytes(plan)
    result_here = result_bytes if result_device == device else 0
    available = available_bytes(device)
    where = f"{device} ({'max_memory' if max_memory else 'free memory'})"
    if requested == 'auto':
        budget = max_memory or (None if available is None else
                                int(AUTO_MEMORY_FRACTION * available))
        if budget is None:
            raise ValueError(f"batch: batch_size='auto' needs max_memory: the free memory of "
                             f"{device} is unknown")
        estimate = estimator.largest_fitting(budget, result_here, where)
        logger.info("batch: batch_size='auto' chose %d: %s", estimate.batch_size, estimate)
        batch_size = estimate.batch_size
    else:
        batch_size = min(requested or max(plan.n1, plan.n2), max(plan.n1, plan.n2))
        budget = max_memory or available
        if budget is None:
            return batch_size
        try:
            estimate = estimator.estimate(batch_size, result_here)
        except ValueError as error:  # kernel functions that need values, e.g. empirical ones
            logger.info("batch: memory not checked: %s", error)
            return batch_size
        if estimate.total_bytes > budget:
            raise MemoryError(f"batch: the computation needs about {estimate}, more than the "
                              f"{gib(budget)} of {where}; use a smaller batch_size, "
                              "store_on_device=False or memmap_dir")
    if result_device is not None and result_device != device and result_device.type == 'cpu':
        host = available_bytes(result_device)
        if host is not None and result_bytes > host:
            raise MemoryError(f"batch: the result needs {gib(result_bytes)} of CPU memory, "
                              f"{gib(host)} are available; use memmap_dir")
    return batch_size
