"""The checks of the arguments of `batch` and `estimate_memory`."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable

import torch

from ..stax.module import Layer


def checked_kernel_fn(kernel_fn: Any, caller: str) -> Callable:
    """The kernel function of a stax layer, or `kernel_fn` itself if callable."""
    if isinstance(kernel_fn, Layer):
        return kernel_fn.kernel_fn
    if not callable(kernel_fn):
        raise TypeError(f"{caller}: kernel_fn must be callable or a stax layer, got "
                        f"{type(kernel_fn).__name__}")
    return kernel_fn


def checked_device(value: Any) -> torch.device | None:
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


def checked_folder(value: Any, arg: str) -> pathlib.Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"batch: {arg} must be a folder path (str or os.PathLike) or None, got "
                        f"{type(value).__name__}")
    return pathlib.Path(value)


def checked_batch_size(value: Any, caller: str) -> int | str:
    if value == 'auto' and isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{caller}: batch_size must be an int >= 0 (0: one tile) or 'auto', "
                         f"got {value!r}")
    return value


def checked_max_memory(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"batch: max_memory must be a number of bytes > 0, got {value!r}")
    return int(value)
