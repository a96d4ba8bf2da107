"""Monte Carlo estimates of NNGP and NTK kernels: empirical kernels averaged over random inits.

For a network with random parameters `θ ~ p(θ)`,

    nngp ≈ (1/n) Σ_s f(θ_s, x1) ⊗ f(θ_s, x2),    ntk ≈ (1/n) Σ_s J(θ_s, x1) J(θ_s, x2)ᵀ,

which converge at the rate `1/√n` to their expectations: the infinite-width
kernels of `stax` models for one hidden layer, and up to `O(1/width)` for
deeper ones (neural-tangents' `monte_carlo_kernel_fn`).
"""

from __future__ import annotations

import copy
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree
from tqdm import tqdm

from .checks import check_positive_int
from .empirical import empirical_nngp_fn, empirical_ntk_fn
from .empirical.functions import EMPIRICAL_KERNELS
from .empirical.inputs import check_inputs
from .empirical.model import rng_devices
from .stax.module import Layer

_NAME = 'monte_carlo_kernel_fn'


def monte_carlo_kernel_fn(model: nn.Module, n_samples: int | Sequence[int] = 1,
                          generator: torch.Generator | None = None,
                          trace_axes: Sequence[int] = (-1,), diagonal_axes: Sequence[int] = (),
                          vmap_axes: int | None = 0, implementation: str = 'auto',
                          progress: bool = True) -> Callable:
    """`kernel_fn(x1, x2=None, get=None)`: empirical kernels averaged over `n_samples` inits.

    The networks are fixed when `kernel_fn` is made (as neural-tangents fixes
    them by its PRNG key): network `s` is drawn from seed `s` of
    `torch.randint(2**62, (max(n_samples),), generator=generator)`, so every
    call, and every tile of `torchntk.batch(kernel_fn, ...)`, averages over the
    same networks, and pairs of examples computed in different calls are
    entries of one estimate. Each network re-initializes a copy of `model`
    (the model itself is left unchanged): a `stax` model by
    `init_parameters(x1.shape, generator=torch.Generator().manual_seed(seed), dtype=x1.dtype,
    device=x1.device)` (the list of shapes for a list of inputs); any other
    `nn.Module` by calling `reset_parameters()` of every submodule that has
    one, under a forked global RNG seeded with `seed` (the global random
    stream is not consumed), then moving it to the device of the inputs and
    the dtype of the floating ones (integer inputs, e.g. token ids, leave its
    dtype). Only parameters with `requires_grad=True` count in the NTK.

    Args:
        model: a `stax` layer or an `nn.Module` taking `x1` (a tensor or a
            pytree of them).
        n_samples: number of random networks; a list or tuple makes
            `kernel_fn` return a generator yielding the estimate after each
            count in increasing order (all from one sequence of networks;
            such a `kernel_fn` declares `tileable = False` for `batch`).
        generator: source of the seeds (the global RNG if `None`), drawn
            once, here.
        trace_axes, diagonal_axes, vmap_axes, implementation: as in
            `empirical_ntk_fn`; shapes as in `torchntk.empirical`.
        progress: show a tqdm progress bar over samples.

    `get` is `'nngp'`, `'ntk'`, a tuple of them, or `None` for
    `EmpiricalKernel(nngp, ntk)`. Inputs are checked as empirical kernels check
    them (finite, real, with values); a batch of no examples gives empty kernels.
    """
    counts = _checked_counts(n_samples)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_NAME}: model must be an nn.Module (a stax layer or a torch module), "
                        f"got {type(model).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{_NAME}: generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    try:  # the arguments empirical_ntk_fn checks when it is made
        empirical_ntk_fn(model, trace_axes, diagonal_axes, vmap_axes, implementation)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{_NAME}: {error}") from None
    seeds = torch.randint(2**62, (counts[-1],), generator=generator,
                          device=None if generator is None else generator.device).cpu()

    def estimates(x1: torch.Tensor, x2: torch.Tensor | None, names: tuple[str, ...],
                  get: str | Sequence[str] | None) -> Iterator:
        sample = copy.deepcopy(model)
        fns = {'nngp': empirical_nngp_fn(sample, trace_axes, diagonal_axes),
               'ntk': empirical_ntk_fn(sample, trace_axes, diagonal_axes, vmap_axes,
                                       implementation)}
        sums = dict.fromkeys(names)
        for i in tqdm(range(1, counts[-1] + 1), disable=not progress, desc=_NAME):
            _reinitialize(sample, x1, int(seeds[i - 1]))
            for name in names:
                value = fns[name](x1, x2).detach()
                sums[name] = value if sums[name] is None else sums[name] + value
            if i in counts:
                means = {name: total / i for name, total in sums.items()}
                yield EMPIRICAL_KERNELS.select(means, get, _NAME)

    def kernel_fn(x1: torch.Tensor, x2: torch.Tensor | None = None,
                  get: str | Sequence[str] | None = None):
        check_inputs(x1, x2, _NAME)  # before any network is drawn
        names = EMPIRICAL_KERNELS.names(get, _NAME)  # here, not when a generator is iterated
        if isinstance(n_samples, int):
            return next(estimates(x1, x2, names, get))
        return estimates(x1, x2, names, get)

    kernel_fn.tileable = isinstance(n_samples, int)  # a generator of estimates has no tiles
    return kernel_fn


def _checked_counts(n_samples: object) -> list[int]:
    """The sample counts of `n_samples`, increasing, without repeats."""
    if not isinstance(n_samples, (list, tuple)):
        return [check_positive_int(n_samples, 'n_samples', _NAME)]
    if not n_samples:
        raise ValueError(f"{_NAME}: n_samples must be a positive integer or a non-empty list of "
                         f"them, got {n_samples!r}")
    return sorted({check_positive_int(count, f'n_samples[{i}]', _NAME)
                   for i, count in enumerate(n_samples)})


def _reinitialize(model: nn.Module, x: torch.Tensor | list, seed: int) -> None:
    """Draw the network of `seed` into `model`, for inputs like `x` (a tensor,
    or a pytree of them: the parameters take the first one's device and the
    first floating one's dtype; integer inputs such as token ids set none)."""
    leaves = pytree.tree_leaves(x)
    dtype = next((t.dtype for t in leaves if t.is_floating_point()), None)
    device = leaves[0].device
    if isinstance(model, Layer):
        if dtype is None:
            raise TypeError(f"{_NAME}: the inputs of a stax model must be floating point, got "
                            f"{[t.dtype for t in leaves]}")
        shapes = tuple(x.shape) if isinstance(x, torch.Tensor) else [tuple(t.shape) for t in x]
        model.init_parameters(shapes, generator=torch.Generator().manual_seed(seed), dtype=dtype,
                              device=device)
        return
    with torch.random.fork_rng(rng_devices(x)):
        torch.manual_seed(seed)
        resettable = [m for m in model.modules() if callable(getattr(m, 'reset_parameters', None))]
        if not resettable:
            raise ValueError(f"{_NAME}: {type(model).__name__} has no submodule with "
                             "reset_parameters(); it cannot be re-initialized")
        for module in resettable:
            module.reset_parameters()
    model.to(device=device, dtype=dtype)
