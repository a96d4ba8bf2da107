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
from tqdm import tqdm

from .empirical import (_canonical_get, _rng_devices, _select, empirical_nngp_fn,
                        empirical_ntk_fn)
from .stax.module import Layer


def monte_carlo_kernel_fn(model: nn.Module, n_samples: int | Sequence[int] = 1,
                          generator: torch.Generator | None = None,
                          trace_axes: Sequence[int] = (-1,), diagonal_axes: Sequence[int] = (),
                          vmap_axes: int | None = 0, implementation: str = 'auto',
                          progress: bool = True) -> Callable:
    """`kernel_fn(x1, x2=None, get=None)`: empirical kernels averaged over `n_samples` inits.

    Each sample re-initializes a copy of `model` (the model itself is left
    unchanged): a `stax` model by
    `init_parameters(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)`;
    any other `nn.Module` by calling `reset_parameters()` of every submodule
    that has one, under a forked global RNG seeded from `generator` (so the
    global random stream is not consumed and one generator state gives one
    sequence of networks). Only parameters with `requires_grad=True` count in the NTK.

    Args:
        model: a `stax` layer or an `nn.Module` taking one tensor.
        n_samples: number of random networks; a list or tuple makes
            `kernel_fn` return a generator yielding the estimate after each
            count in increasing order (all from one sequence of networks).
        generator: source of the random initializations (global RNG if `None`).
        trace_axes, diagonal_axes, vmap_axes, implementation: as in
            `empirical_ntk_fn`; shapes as in `torchntk.empirical`.
        progress: show a tqdm progress bar over samples.

    `get` is `'nngp'`, `'ntk'`, a tuple of them, or `None` for
    `EmpiricalKernel(nngp, ntk)`.
    """
    counts = [n_samples] if isinstance(n_samples, int) else list(n_samples)
    if not counts or any(not isinstance(n, int) or n <= 0 for n in counts):
        raise ValueError(f"monte_carlo_kernel_fn: n_samples must be a positive int or a "
                         f"sequence of them, got {n_samples!r}")
    counts = sorted(set(counts))

    def estimates(x1: torch.Tensor, x2: torch.Tensor | None,
                  get: str | Sequence[str] | None) -> Iterator:
        names = _canonical_get(get, 'monte_carlo_kernel_fn')
        sample = copy.deepcopy(model)
        fns = {'nngp': empirical_nngp_fn(sample, trace_axes, diagonal_axes),
               'ntk': empirical_ntk_fn(sample, trace_axes, diagonal_axes, vmap_axes,
                                       implementation)}
        sums = dict.fromkeys(names)
        for i in tqdm(range(1, counts[-1] + 1), disable=not progress,
                      desc='monte_carlo_kernel_fn'):
            _reinitialize(sample, x1, generator)
            for name in names:
                value = fns[name](x1, x2).detach()
                sums[name] = value if sums[name] is None else sums[name] + value
            if i in counts:
                yield _select({name: total / i for name, total in sums.items()}, get)

    def kernel_fn(x1: torch.Tensor, x2: torch.Tensor | None = None,
                  get: str | Sequence[str] | None = None):
        if isinstance(n_samples, int):
            return next(estimates(x1, x2, get))
        return estimates(x1, x2, get)

    return kernel_fn


def _reinitialize(model: nn.Module, x: torch.Tensor, generator: torch.Generator | None) -> None:
    if isinstance(model, Layer):
        model.init_parameters(tuple(x.shape), generator=generator, dtype=x.dtype, device=x.device)
        return
    seed = int(torch.randint(2**62, (), generator=generator))
    with torch.random.fork_rng(_rng_devices(x)):
        torch.manual_seed(seed)
        resettable = [m for m in model.modules() if callable(getattr(m, 'reset_parameters', None))]
        if not resettable:
            raise ValueError(f"monte_carlo_kernel_fn: {type(model).__name__} has no submodule "
                             "with reset_parameters(); it cannot be re-initialized")
        for module in resettable:
            module.reset_parameters()
    model.to(device=x.device, dtype=x.dtype)
