"""The checks of arguments at the public boundary, one set for every layer and function.

A wrong type raises `TypeError`, a wrong value `ValueError`. Messages read
``"<caller>: <arg> must be …, got …"``, where `caller` is what the user called
(a layer's name, ``'Serial.kernel_fn'``, ``'batch'``), so that the error says
where to look. Checks that a value is usable return it in the form the caller
keeps (a float, a tuple of ints, the canonical spelling of a choice).
"""

from __future__ import annotations

import math
import threading
from typing import Any, Sequence, Union

import torch

from .kernel import input_mask

#: A scalar hyperparameter: a Python number or a one-element tensor (which may require grad).
Scalar = Union[float, torch.Tensor]

# Whether torchntk.batching's memory count runs kernel functions on meta tensors
# (shapes without values) in this thread: meta inputs are meant then.
SHAPES_ONLY = threading.local()


def type_name(value: Any) -> str:
    """`numpy.ndarray` for a numpy array, `list` for a list: what a user passed."""
    kind = type(value)
    if kind.__module__ == 'builtins':
        return kind.__name__
    return f"{kind.__module__}.{kind.__qualname__}"


def _number(value: Any, arg: str, caller: str) -> float:
    """`value` as a float: a Python int or float (not a bool) or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{caller}: {arg} must be a scalar, got shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{caller}: {arg} must be a real number, got a {value.dtype} tensor")
        return float(value.detach())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{caller}: {arg} must be a float or a scalar tensor, got {type_name(value)}")


def check_real(value: Scalar, arg: str, caller: str) -> float:
    """A finite real number (Python or a one-element tensor), as a float."""
    number = _number(value, arg, caller)
    if not math.isfinite(number):
        raise ValueError(f"{caller}: {arg} must be finite, got {number}")
    return number


def check_nonnegative(value: Scalar | None, arg: str, caller: str,
                      allow_none: bool = False) -> float | None:
    """A finite number ≥ 0 (or `None` where allowed), as a float."""
    if value is None and allow_none:
        return None
    if value is None:
        raise TypeError(f"{caller}: {arg} must be a number >= 0, got None")
    number = _number(value, arg, caller)
    if not (number >= 0 and number != math.inf):
        raise ValueError(f"{caller}: {arg} must be finite and >= 0, got {number}")
    return number


def check_positive(value: Scalar | None, arg: str, caller: str,
                   allow_none: bool = False) -> float | None:
    """A finite number > 0 (or `None` where allowed), as a float."""
    number = check_nonnegative(value, arg, caller, allow_none)
    if number == 0:
        raise ValueError(f"{caller}: {arg} must be > 0, got {number}")
    return number


def check_int(value: Any, arg: str, caller: str, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """A Python int (not a bool) in `minimum..maximum` (either bound may be absent)."""
    if minimum == 1 and maximum is None:
        expected = "a positive integer"
    elif maximum is None:
        expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    else:
        expected = (f"an integer <= {maximum}" if minimum is None
                    else f"an integer in {minimum}..{maximum}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{caller}: {arg} must be {expected}, got {value!r} ({type_name(value)})")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{caller}: {arg} must be {expected}, got {value!r}")
    return value


def check_positive_int(value: Any, arg: str, caller: str) -> int:
    """A Python int ≥ 1 (not a bool)."""
    return check_int(value, arg, caller, minimum=1)


def check_flag(value: Any, arg: str, caller: str, allow_none: bool = False) -> bool | None:
    """`True` or `False` (or `None` where allowed); truthy stand-ins such as 1 are refused."""
    if isinstance(value, bool) or (value is None and allow_none):
        return value
    expected = "True, False or None" if allow_none else "True or False"
    raise TypeError(f"{caller}: {arg} must be {expected}, got {value!r}")


def check_choice(value: Any, arg: str, caller: str, choices: Sequence[str]) -> str:
    """One of the strings `choices`, compared without case; returns its spelling in `choices`."""
    if not isinstance(value, str):
        raise TypeError(f"{caller}: {arg} must be one of {tuple(choices)}, got {value!r} "
                        f"({type_name(value)})")
    for choice in choices:
        if value.lower() == choice.lower():
            return choice
    raise ValueError(f"{caller}: {arg} must be one of {tuple(choices)}, got {value!r}")


def check_callable(value: Any, arg: str, caller: str, allow_none: bool = False) -> Any:
    """A function (anything callable), or `None` where allowed."""
    if callable(value) or (value is None and allow_none):
        return value
    raise TypeError(f"{caller}: {arg} must be a function{' or None' if allow_none else ''}, "
                    f"got {type_name(value)}")


def check_axes(axes: Any, arg: str, caller: str) -> tuple[int, ...]:
    """Axes given as one int or a sequence of ints, as a tuple. Their range
    depends on the tensor they index, which the caller knows."""
    if isinstance(axes, int) and not isinstance(axes, bool):
        return (axes,)
    if isinstance(axes, (str, bytes)) or not isinstance(axes, Sequence) or any(
            isinstance(a, bool) or not isinstance(a, int) for a in axes):
        raise TypeError(f"{caller}: {arg} must be a sequence of ints or one int, got {axes!r}")
    return tuple(axes)


def check_window(values: Any, arg: str, caller: str,
                 n_spatial: int | None = None) -> tuple[int, ...] | None:
    """Sizes per spatial dimension of a windowed layer (`filter_shape`,
    `window_shape`, `strides`): 1 to 3 positive ints in a tuple or list, as a
    tuple, `n_spatial` of them where given; `None` stays `None`."""
    if values is None:
        return None
    if not isinstance(values, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{caller}: {arg} must be a tuple of positive integers, one per "
                        f"spatial dimension, got {values!r}")
    values = tuple(values)
    if not 1 <= len(values) <= 3 or any(v < 1 for v in values):
        raise ValueError(f"{caller}: {arg} must hold 1 to 3 positive integers, got {values!r}")
    if n_spatial is not None and len(values) != n_spatial:
        raise ValueError(f"{caller}: {arg} {values} has {len(values)} entries but the "
                         f"window has {n_spatial} spatial dimensions")
    return values


def check_input_rank(shape: Sequence[int], n_spatial: int, caller: str) -> None:
    """Inputs `(N, C, *S)` with `n_spatial` spatial axes, as a window of that many needs."""
    if len(shape) != n_spatial + 2:
        raise ValueError(f"{caller}: a {n_spatial}-d window needs inputs of shape "
                         f"(N, C, {', '.join('XYZ'[:n_spatial])}), got shape {tuple(shape)}")


def check_mask_constant(value: Any, caller: str, allow_none: bool = True) -> float | None:
    """The value that marks masked input entries: a number (NaN and inf allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{caller}: mask_constant must be a float{' or None' if allow_none else ''}"
                        f", got {value!r}")
    return value


def all_finite(x: torch.Tensor, mask_constant: float | None = None) -> bool:
    """Whether `x` is finite where it is not masked. Unmasked, its extremes say
    so (NaN propagates through min and max) in one pass without a mask tensor."""
    if x.numel() == 0:
        return True
    if mask_constant is None:
        # Compared as Python numbers: torch.isfinite on the 0-dim extremes would be two more
        # operator calls, most of the check's time on small inputs.
        return all(-math.inf < extreme.item() < math.inf for extreme in torch.aminmax(x))
    return bool((torch.isfinite(x) | input_mask(x, mask_constant)).all())


def check_real_tensor(x: torch.Tensor, arg: str, caller: str) -> None:
    """A tensor of real values that can be read (kernels, targets, times and
    variances of the predictors and of signal): not complex or bool, not on the
    `meta` device."""
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{caller}: {arg} must be a real tensor, got {x.dtype}")
    if x.is_meta:
        raise ValueError(f"{caller}: {arg} is on the meta device, which holds no values")


def check_input_values(x: torch.Tensor, arg: str, caller: str,
                       mask_constant: float | None = None) -> None:
    """The one check of an input tensor's values at a public boundary (kernel_fn,
    the empirical kernels, Monte Carlo): real, not on the `meta` device (but
    while `estimate_memory` counts shapes), and finite where floating and not
    masked — not while torch.compile traces or torch.func transforms run,
    where values cannot be read."""
    if x.is_complex():
        raise TypeError(f"{caller}: {arg} must be real, got a {x.dtype} tensor")
    if x.is_meta:
        if getattr(SHAPES_ONLY, 'active', False):
            return
        raise ValueError(f"{caller}: {arg} is on the meta device, which holds no values; "
                         "kernels need the inputs' values (a CPU or GPU tensor)")
    if (x.is_floating_point() and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()
            and not all_finite(x, mask_constant)):
        raise ValueError(f"{caller}: {arg} contains non-finite values (NaN or inf)"
                         + ("" if mask_constant is None else " that are not the mask_constant"))
