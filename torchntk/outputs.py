"""`get`: which outputs a kernel function returns, with neural-tangents' semantics.

Every function with a `get` argument (`kernel_fn`, the empirical and Monte
Carlo kernels, the predictors) reads it through an `Outputs`:

- `None`: the whole record (`Kernel` for `kernel_fn`) or, for functions whose
  outputs are computed one by one, a named tuple of the default names;
- a string: that one output;
- a tuple (or list) of strings: a named tuple of those outputs in that order.

Names are case-insensitive. An unknown or repeated name, or an empty tuple,
raises `ValueError`; a `get` that is not a string or a sequence of strings
`TypeError`. The named-tuple classes are made once per (type name, fields):
torch.compile cannot create classes while it traces, and a class made anew per
call would give equal results of different types.

A function that computes only what is asked for reads the names first and
selects from a dict of its results::

    PAIR = Outputs('EmpiricalKernel', ('nngp', 'ntk'), 'kernel', default=('nngp', 'ntk'))
    names = PAIR.names(get, caller)                 # ('nngp', 'ntk') for get=None
    return PAIR.select({n: compute(n) for n in names}, get, caller)
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Any, Sequence, Union

import torch

from .checks import type_name
from .kernel import Kernel

Get = Union[str, Sequence[str], None]

_NAMEDTUPLES: dict[tuple[str, tuple[str, ...]], type] = {}


def namedtuple_type(name: str, fields: tuple[str, ...]) -> type:
    """The named-tuple class `name` with `fields`, made on first use and kept."""
    key = (name, fields)
    if key not in _NAMEDTUPLES:
        if torch.compiler.is_compiling():
            raise ValueError(f"get={fields}: under torch.compile, call the kernel function once "
                             "without compiling with this get first")
        _NAMEDTUPLES[key] = collections.namedtuple(name, fields)
    return _NAMEDTUPLES[key]


class Outputs:
    """The outputs a function can return, and its reading of `get`.

    Args:
        tuple_name: the class name of the named tuples it returns.
        names: the names `get` may ask for, lower case.
        noun: what a name denotes, for error messages (`'kernel field'`).
        default: the names `get=None` returns, as a named tuple; `None` when
            `get=None` returns the whole record given to `select`.
        prebuilt: names whose named tuples (every ordered selection of them)
            are made now, so that they are there when torch.compile traces.
    """

    def __init__(self, tuple_name: str, names: Sequence[str], noun: str,
                 default: tuple[str, ...] | None = None, prebuilt: Sequence[str] = ()) -> None:
        self.tuple_name, self.allowed, self.noun, self.default = (
            tuple_name, tuple(names), noun, default)
        for r in range(1, len(prebuilt) + 1):
            for fields in itertools.permutations(prebuilt, r):
                namedtuple_type(tuple_name, fields)

    def names(self, get: Get, caller: str) -> tuple[str, ...] | None:
        """The lower-cased names `get` asks for: `default` for `None`; errors name `caller`."""
        if get is None:
            return self.default
        if not isinstance(get, (str, list, tuple)):
            raise TypeError(f"{caller}: get must be a string or a tuple of strings, got "
                            f"{type_name(get)} ({get!r}); pass None, a {self.noun} name or a "
                            "tuple of names")
        names = (get,) if isinstance(get, str) else tuple(get)
        if not names:
            raise ValueError(f"{caller}: get must be a {self.noun} name or a non-empty tuple of "
                             "names, got ()")
        lowered = []
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"{caller}: get must hold {self.noun} names as strings, got "
                                f"{name!r} in {get!r}")
            if name.lower() not in self.allowed:
                raise ValueError(f"{caller}: get must be one of {self.allowed} or a tuple of "
                                 f"them, got unknown {self.noun} {name!r}")
            lowered.append(name.lower())
        if len(set(lowered)) != len(lowered):
            raise ValueError(f"{caller}: get must name each {self.noun} once, got duplicate names "
                             f"in {get!r}")
        return tuple(lowered)

    def select(self, values: dict[str, Any] | Any, get: Get, caller: str) -> Any:
        """What `get` asks for out of `values`: a dict from names to outputs, or
        a record whose attributes they are (returned whole for `get=None`
        without a `default`)."""
        names = self.names(get, caller)
        if names is None:
            return values
        picked = ([values[name] for name in names] if isinstance(values, dict)
                  else [getattr(values, name) for name in names])
        if isinstance(get, str):
            return picked[0]
        return namedtuple_type(self.tuple_name, names)(*picked)


#: `kernel_fn`'s `get`: any field of `Kernel`; `None` for the whole `Kernel`.
#: The selections of the covariance fields are made up front for torch.compile.
KERNEL_FIELDS = Outputs('AnalyticKernel', [field.name for field in dataclasses.fields(Kernel)],
                        'kernel field', prebuilt=('nngp', 'ntk', 'cov1', 'cov2'))
