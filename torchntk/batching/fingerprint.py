"""What identifies a computation: the inputs, and everything the kernel
function depends on (its model's configuration and parameters, closures, the
code of the caller's functions), hashed so that a checkpoint made for one
computation is never resumed by another."""

from __future__ import annotations

import functools
import hashlib
import types
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .inputs import Inputs, first_tensor

# Functions of these packages are named, not followed: their versions are hashed instead.
_LIBRARIES = frozenset({'torch', 'torchntk', 'numpy', 'tqdm', 'torchdiffeq', 'functools',
                        'builtins', 'typing', 'collections', 'math'})
_ATOMS = (str, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.layout)

Parts = Iterator[Any]


def dependencies(obj: Any, seen: set[int] | None = None) -> Parts:
    """What `obj` (a kernel function, its arguments, inputs) depends on, in a
    fixed order: tensors, modules, and strings describing everything else.

    The first rule of `_VALUE_RULES` or `_OBJECT_RULES` that matches `obj`
    describes it and follows what it holds. Values (atoms, tensors, tuples) are
    described wherever they are reached; any other object once, and as
    `<seen …>` where it is reached again (which also ends cycles).
    """
    seen = set() if seen is None else seen
    for matches, describe in _VALUE_RULES:
        if matches(obj):
            yield from describe(obj, seen)
            return
    if id(obj) in seen:
        yield f'<seen {type(obj).__qualname__}>'
        return
    seen.add(id(obj))
    for matches, describe in _OBJECT_RULES:
        if matches(obj):
            yield from describe(obj, seen)
            return
    yield _type_name(obj)


def _type_name(obj: Any) -> str:
    return f'object {type(obj).__module__}.{type(obj).__qualname__}'


def _atom(obj: Any, seen: set[int]) -> Parts:
    yield f'{type(obj).__name__}:{obj!r}'


def _uninitialized(obj: Any, seen: set[int]) -> Parts:
    yield 'uninitialized'  # lazy parameters of the finite network, not drawn yet


def _tensor(obj: torch.Tensor | np.ndarray, seen: set[int]) -> Parts:
    yield torch.as_tensor(obj)


def _sequence(obj: tuple | list, seen: set[int]) -> Parts:
    yield f'{type(obj).__name__}[{len(obj)}]'
    for value in obj:
        yield from dependencies(value, seen)


def _set(obj: set | frozenset, seen: set[int]) -> Parts:
    yield f'{type(obj).__name__}[{len(obj)}]'
    for value in sorted(obj, key=repr):
        yield from dependencies(value, seen)


def _dict(obj: dict, seen: set[int]) -> Parts:
    yield f'dict[{len(obj)}]'
    for key, value in obj.items():
        yield from dependencies(key, seen)
        yield from dependencies(value, seen)


def _module(obj: nn.Module, seen: set[int]) -> Parts:
    """The module, its public attributes, parameters, buffers and submodules."""
    yield obj
    for name, value in sorted(vars(obj).items()):
        if not name.startswith('_'):
            yield name
            yield from dependencies(value, seen)
    for group in (obj._parameters, obj._buffers, obj._modules):
        for name, value in group.items():
            yield name
            yield from dependencies(value, seen)


def _partial(obj: functools.partial, seen: set[int]) -> Parts:
    yield 'partial'
    for part in (obj.func, obj.args, obj.keywords):
        yield from dependencies(part, seen)


def _method(obj: types.MethodType, seen: set[int]) -> Parts:
    yield 'method'
    yield from dependencies(obj.__self__, seen)
    yield from dependencies(obj.__func__, seen)


def _function(obj: types.FunctionType, seen: set[int]) -> Parts:
    """Its defaults and closure; for a function outside `_LIBRARIES`, also its
    code and the globals that code names."""
    yield f'function {obj.__module__}.{obj.__qualname__}'
    cells = [cell.cell_contents for cell in obj.__closure__ or () if not _is_empty_cell(cell)]
    for part in (obj.__defaults__, obj.__kwdefaults__, cells):
        yield from dependencies(part, seen)
    if (obj.__module__ or '').split('.')[0] not in _LIBRARIES:
        yield _code_description(obj.__code__)
        names = sorted(_code_names(obj.__code__) & obj.__globals__.keys())
        yield from dependencies({name: obj.__globals__[name] for name in names}, seen)


def _named(obj: Any, seen: set[int]) -> Parts:
    name = getattr(obj, '__qualname__', getattr(obj, '__name__', ''))
    yield f'{type(obj).__name__} {getattr(obj, "__module__", "")}.{name}'


def _attributes(obj: Any, seen: set[int]) -> Parts:
    yield _type_name(obj)
    yield from dependencies(vars(obj), seen)


def _instance_of(*kinds: type) -> Callable[[Any], bool]:
    return lambda obj: isinstance(obj, kinds)


def _is_named_only(obj: Any) -> bool:
    """Classes, modules, builtins and other callables without state of their own."""
    return isinstance(obj, (type, types.ModuleType, types.BuiltinFunctionType)) or (
        callable(obj) and not hasattr(obj, '__dict__'))


Rule = tuple[Callable[[Any], bool], Callable[[Any, set[int]], Parts]]

# Immutable containers are values: no cycle runs through them, and whether two
# equal ones are one object is Python's choice, not the caller's.
_VALUE_RULES: list[Rule] = [
    (_instance_of(*_ATOMS), _atom),
    (_instance_of(nn.parameter.UninitializedTensorMixin), _uninitialized),
    (_instance_of(torch.Tensor, np.ndarray), _tensor),
    (_instance_of(tuple), _sequence),
    (_instance_of(frozenset), _set),
]

_OBJECT_RULES: list[Rule] = [
    (_instance_of(nn.Module), _module),
    (_instance_of(list), _sequence),
    (_instance_of(set), _set),
    (_instance_of(dict), _dict),
    (_instance_of(functools.partial), _partial),
    (_instance_of(types.MethodType), _method),
    (_instance_of(types.FunctionType), _function),
    (_is_named_only, _named),
    (lambda obj: hasattr(obj, '__dict__'), _attributes),
]


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
