"""The processes that share a tiled computation: the default `torch.distributed`
group, or this process alone."""

from __future__ import annotations

from typing import Any, Callable


class Group:
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
