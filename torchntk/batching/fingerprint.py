"""What identifies a computation: the inputs, and everything the kernel
function depends on (its model's configuration and parameters, closures, the
code of the caller's functions), hashed so that a checkpoint made for one
computation is never resumed by another."""

from __future__ import annotations

import functools
import hashlib
import inspect
import types
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .inputs import Inputs, first_tensor

_LIBRARIES = frozenset({'torch', 'torchntk', 'numpy', 'tqdm', 'torchdiffeq', 'functools',
                        'builtins', 'typing', 'collections', 'math'})
_ATOMS = (str, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.layout)


def dependencies(obj: Any, seen: set[int] | None = None) -> Iterator[Any]:
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
            yield from dependencies(value, seen)
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
                yield from dependencies(value, seen)
        for group in (obj._parameters, obj._buffers, obj._modules):
            for name, value in group.items():
                yield name
                yield from dependencies(value, seen)
    elif isinstance(obj, (list, set)):
        yield f'{type(obj).__name__}[{len(obj)}]'
        for value in (sorted(obj, key=repr) if isinstance(obj, set) else obj):
            yield from dependencies(value, seen)
    elif isinstance(obj, dict):
        yield f'dict[{len(obj)}]'
        for key, value in obj.items():
            yield from dependencies(key, seen)
            yield from dependencies(value, seen)
    elif isinstance(obj, functools.partial):
        yield 'partial'
        for part in (obj.func, obj.args, obj.keywords):
            yield from dependencies(part, seen)
    elif inspect.ismethod(obj):
        yield 'method'
        yield from dependencies(obj.__self__, seen)
        yield from dependencies(obj.__func__, seen)
    elif isinstance(obj, types.FunctionType):
        yield f'function {obj.__module__}.{obj.__qualname__}'
        cells = [cell.cell_contents for cell in obj.__closure__ or ()
                 if not _is_empty_cell(cell)]
        for part in (obj.__defaults__, obj.__kwdefaults__, cells):
            yield from dependencies(part, seen)
        if (obj.__module__ or '').split('.')[0] not in _LIBRARIES:
            yield _code_description(obj.__code__)
            names = sorted(_code_names(obj.__code__) & obj.__globals__.keys())
            yield from dependencies({name: obj.__globals__[name] for name in names}, seen)
    elif isinstance(obj, (type, types.ModuleType, types.BuiltinFunctionType)) or (
            callable(obj) and not hasattr(obj, '__dict__')):
        name = getattr(obj, '__qualname__', getattr(obj, '__name__', ''))
        yield f'{type(obj).__name__} {getattr(obj, "__module__", "")}.{name}'
    elif hasattr(obj, '__dict__'):
        yield f'object {type(obj).__module__}.{type(obj).__qualname__}'
        yield from dependencies(vars(obj), seen)
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


def hash_tensor(h: Any, t: torch.Tensor) -> None:
    """Feed `t`'s dtype, shape and bytes to the hash `h`."""
    t = t.detach().cpu().contiguous()
    h.update(f'tensor {t.dtype} {tuple(t.shape)}'.encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())


def fingerprint(obj: Any) -> str:
    """sha256 of `dependencies(obj)`."""
    h = hashlib.sha256()
    for part in dependencies(obj):
        if isinstance(part, torch.Tensor):
            hash_tensor(h, part)
        elif isinstance(part, nn.Module):
            h.update(f'module {type(part).__module__}.{type(part).__qualname__}'.encode())
        else:
            h.update(part.encode())
        h.update(b'\0')
    return h.hexdigest()


def reachable_modules(obj: Any) -> dict[str, nn.Module]:
    """The modules among `obj`'s dependencies and their submodules, by name
    (`Root.sub.layer`; each root named by its type)."""
    modules = [p for p in dependencies(obj) if isinstance(p, nn.Module)]
    inner = {id(m) for root in modules for m in root.modules() if m is not root}
    named = {}
    for root in modules:
        if id(root) not in inner:
            for name, module in root.named_modules():
                named[f'{type(root).__name__}.{name}' if name else type(root).__name__] = module
    return named


def describe_computation(kernel_fn: Callable, arguments: Any, x1: Inputs, x2: Inputs | None,
                         batch_size: int) -> dict[str, str]:
    """What identifies `batch`'s computation of `kernel_fn(x1, x2, *arguments)`
    in tiles of `batch_size`, by part (so that a mismatch can say which)."""
    from .. import __version__
    shapes = [tuple(first_tensor(x).shape) for x in (x1, x2) if x is not None]
    return {'x1': fingerprint(x1), 'x2': 'None' if x2 is None else fingerprint(x2),
            'kernel_fn': fingerprint(kernel_fn), 'arguments': fingerprint(arguments),
            'tiles': f'batch_size {batch_size}, inputs {shapes}',
            'versions': f'torchntk {__version__}, torch {torch.__version__}'}
