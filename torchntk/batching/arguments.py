"""The checks of the arguments of `batch` and `estimate_memory` that are theirs
alone (a kernel function or stax layer, a device, a folder, a tile size); the
others go through `torchntk.checks`."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable

import torch

from ..checks import check_int, type_name
from ..stax.module import Layer


def checked_kernel_fn(kernel_fn: Any, caller: str) -> Callable:
    """The kernel function of a stax layer, or `kernel_fn` itself if callable."""
    if isinstance(kernel_fn, Layer):
        return kernel_fn.kernel_fn
    if not callable(kernel_fn):
        raise TypeError(f"{caller}: kernel_fn must be callable or a stax layer, got "
                        f"{type_name(kernel_fn)}")
    return kernel_fn


def checked_device(value: Any, caller: str) -> torch.device | None:
    """A `torch.device`, a device string or index torch knows, or `None`."""
    if value is None or isinstance(value, torch.device):
        return value
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise TypeError(f"{caller}: device must be a torch.device, a device string such as "
                        f"'cuda:0' or None, got {type_name(value)}")
    try:
        return torch.device(value)
    except RuntimeError as error:
        raise ValueError(f"{caller}: device must name a device such as 'cpu' or 'cuda:0', got "
                         f"{value!r} ({error})") from None


def checked_folder(value: Any, arg: str, caller: str) -> pathlib.Path | None:
    """A folder path (`str` or `os.PathLike`), or `None`."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{caller}: {arg} must be a folder path (str or os.PathLike) or None, "
                        f"got {type_name(value)}")
    return pathlib.Path(value)


def checked_batch_size(value: Any, caller: str) -> int | str:
    """A tile size: an int >= 0 (0: one tile) or 'auto'."""
    if isinstance(value, str):
        if value == 'auto':
            return value
        raise ValueError(f"{caller}: batch_size must be an int >= 0 (0: one tile) or 'auto', "
                         f"got {value!r}")
    return check_int(value, 'batch_size', caller, minimum=0)
