"""The compiled extension `torchntk._C` (csrc/), and which tensors it takes.

`TORCHNTK_BACKEND=torch|extension` forces the torch fallback or the
extension at import (the default, `auto`, uses the extension where it was
built). An extension that was built but does not load (e.g. built against
another torch) is reported by a warning, and `auto` falls back to torch.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Sequence

import torch

_BACKENDS = ('auto', 'extension', 'torch')
_DTYPES = (torch.float32, torch.float64)


def _load() -> ModuleType | None:
    choice = os.environ.get('TORCHNTK_BACKEND', 'auto')
    if choice not in _BACKENDS:
        raise ValueError(f"TORCHNTK_BACKEND must be one of {_BACKENDS}, got {choice!r}")
    if choice == 'torch':
        return None
    try:
        return importlib.import_module('torchntk._C')
    except ImportError as error:
        # Never built (TORCHNTK_BUILD_EXTENSION=0 at install) is a choice, not a fault.
        not_built = isinstance(error, ModuleNotFoundError) and error.name == 'torchntk._C'
        problem = ("is not built" if not_built else f"failed to load ({error})")
        if choice == 'extension':
            raise ImportError(f"TORCHNTK_BACKEND=extension but the compiled extension torchntk._C "
                              f"{problem}; rebuild it for this torch (pip install "
                              "--no-build-isolation -e .)") from error
        if not not_built:
            warnings.warn(f"torchntk: the compiled extension torchntk._C {problem}; using the "
                          "slower pure-torch backend. Rebuild it for this torch (pip install "
                          "--no-build-isolation -e .), or set TORCHNTK_BACKEND=torch to use "
                          "torch without this warning.", RuntimeWarning, stacklevel=2)
        return None


#: The loaded extension module, or `None` (not built, or TORCHNTK_BACKEND=torch).
EXTENSION = _load()


def backend() -> str:
    """`'extension'` when the compiled extension is in use, else `'torch'`."""
    return 'torch' if EXTENSION is None else 'extension'


def takes(tensor: torch.Tensor) -> bool:
    """Whether the extension computes on `tensor`: float32/float64, on the CPU
    or (built with CUDA) a GPU. torch.compile cannot trace into it (it fuses
    the torch version itself), nor can torch.func transforms (vmap, jvp) batch
    or differentiate it."""
    if (EXTENSION is None or tensor.dtype not in _DTYPES or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()):
        return False
    return tensor.device.type == 'cpu' or (tensor.device.type == 'cuda' and EXTENSION.with_cuda)


def empty_huge_pages(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """An uninitialized tensor of `like`'s dtype and device whose whole 2 MiB
    pages are advised as transparent huge pages (Linux, where the extension
    takes `like`; else `torch.empty`): a large output written once faults in
    512 times fewer pages."""
    if takes(like):
        return EXTENSION.empty_huge_pages(list(shape), like)
    return like.new_empty(tuple(shape))
