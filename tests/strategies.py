"""Hypothesis strategies shared by the test suite: nonlinearities, architectures, inputs.

An `Architecture` is a description, not a network: `build(width, out_dim)`
makes the same network at any width, so a test can compare widths and the
analytic kernel with the finite network's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
from hypothesis import strategies as st

from torchntk import stax


@dataclasses.dataclass(frozen=True)
class Nonlinearity:
    """An elementwise layer by name and constructor arguments.

    Attributes:
        name: attribute of `torchntk.stax`.
        kwargs: constructor arguments, as `(name, value)` pairs.
        closed_form: the kernel is a closed formula (not quadrature).
        tame: growth at most linear; others (`Exp`, polynomials) have
            heavy-tailed outputs, so finite networks converge slowly: they are
            drawn with one hidden layer, degree ≤ 2 and `W_std ≤ 1`.
    """

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    closed_form: bool = True
    tame: bool = True

    def build(self) -> stax.Layer:
        return getattr(stax, self.name)(**dict(self.kwargs))

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.kwargs)})"


def _floats(low: float, high: float) -> st.SearchStrategy[float]:
    # Rounded so that failing examples print short and reproduce exactly.
    return st.floats(low, high, allow_nan=False).map(lambda v: round(v, 3))


def _kwargs(**strategies: st.SearchStrategy) -> st.SearchStrategy[tuple[tuple[str, Any], ...]]:
    return st.fixed_dictionaries(strategies).map(lambda d: tuple(sorted(d.items())))


# name -> (constructor arguments, flags). Layers that do not exist (yet) in
# `torchntk.stax` are left out, so the strategies pick new ones up by themselves.
_CANDIDATES: dict[str, tuple[st.SearchStrategy, dict[str, bool]]] = {
    'Relu': (_kwargs(), {}),
    # b ≥ 0.3 keeps φ away from the zero function ABRelu(0, 0).
    'ABRelu': (_kwargs(a=_floats(-1.5, 1.5), b=_floats(0.3, 1.5)), {}),
    'LeakyRelu': (_kwargs(alpha=_floats(0., 0.5)), {}),
    'Abs': (_kwargs(), {}),
    'Erf': (_kwargs(a=_floats(0.5, 2.), b=_floats(0.3, 2.), c=_floats(-0.5, 0.5)), {}),
    'Sigmoid_like': (_kwargs(), {}),
    'Gelu': (_kwargs(), {}),
    'Sin': (_kwargs(a=_floats(0.5, 2.), b=_floats(0.3, 1.5), c=_floats(-1., 1.)), {}),
    'Cos': (_kwargs(a=_floats(0.5, 2.), b=_floats(0.3, 1.5), c=_floats(-1., 1.)), {}),
    'Rbf': (_kwargs(gamma=_floats(0.1, 1.)), {}),
    'Gabor': (_kwargs(), {}),
    'Gaussian': (_kwargs(a=_floats(0.5, 2.), b=_floats(-1., -0.1)), {}),
    'Exp': (_kwargs(a=_floats(0.5, 1.5), b=_floats(0.1, 0.5)), {'tame': False}),
    'Sign': (_kwargs(), {}),
    'Monomial': (_kwargs(degree=st.integers(0, 2)), {'tame': False}),
    'RectifiedMonomial': (_kwargs(degree=st.integers(0, 2)), {'tame': False}),
    'Polynomial': (_kwargs(coef=st.lists(_floats(-1., 1.), min_size=1, max_size=3).map(tuple)
                                .filter(lambda coef: any(abs(c) > 0.1 for c in coef))),
                   {'tame': False}),
}
# The one quadrature nonlinearity of the random architectures.
_QUADRATURE = {'Tanh': (_kwargs(), {'closed_form': False})}


def available(candidates: dict) -> dict:
    return {name: spec for name, spec in candidates.items() if hasattr(stax, name)}


def nonlinearities(closed_form_only: bool = False) -> st.SearchStrategy[Nonlinearity]:
    """Nonlinearities of `torchntk.stax` with random parameters."""
    candidates = dict(available(_CANDIDATES))
    if not closed_form_only:
        candidates.update(available(_QUADRATURE))
    options = []
    for name, (kwargs, flags) in candidates.items():
        flags = {'closed_form': True, 'tame': True, **flags}
        options.append(kwargs.map(lambda kw, name=name, flags=flags: Nonlinearity(name, kw, **flags)))
    return st.one_of(options)


# Not in random architectures: they need unit-variance inputs (`Hermite`), have
# no finite network (`ExpNormalized`), or are further quadrature layers.
_OTHERS = {
    'Hermite': (('degree', 3),),
    'ExpNormalized': (('gamma', 0.8), ('shift', -1.)),
    'Sigmoid': (), 'Softplus': (), 'SiLU': (), 'Mish': (),
}
UNIT_VARIANCE = {'Hermite'}
HEAVY_TAILED = {'Hermite'}
KERNEL_ONLY = {'ExpNormalized'}
QUADRATURE = {'Tanh', 'Sigmoid', 'Softplus', 'SiLU', 'Mish'}


def all_nonlinearities() -> list[Nonlinearity]:
    """One instance of every nonlinearity of `torchntk.stax`, with fixed generic
    parameters, for parametrized tests. `Hermite` needs unit-variance inputs
    (`UNIT_VARIANCE`: put a `LayerNorm` before it); `ExpNormalized` has no finite
    network (`KERNEL_ONLY`)."""
    defaults = {'ABRelu': (('a', -0.4), ('b', 1.3)), 'LeakyRelu': (('alpha', 0.2),),
                'Erf': (('a', 1.2), ('b', 0.7), ('c', 0.1)),
                'Sin': (('a', 1.1), ('b', 0.8), ('c', 0.3)),
                'Cos': (('a', 1.1), ('b', 0.8), ('c', 0.3)),
                'Rbf': (('gamma', 0.5),), 'Gaussian': (('a', 1.), ('b', -0.5)),
                'Exp': (('a', 1.), ('b', 0.3)), 'Monomial': (('degree', 2),),
                'RectifiedMonomial': (('degree', 2),), 'Polynomial': (('coef', (0.1, -0.5, 0.3)),)}
    result = []
    for name, (_, flags) in {**available(_CANDIDATES), **available(_QUADRATURE)}.items():
        flags = {'closed_form': True, 'tame': True, **flags}
        result.append(Nonlinearity(name, defaults.get(name, ()), **flags))
    for name, kwargs in available(_OTHERS).items():
        result.append(Nonlinearity(name, kwargs, closed_form=name not in QUADRATURE,
                                   tame=name not in HEAVY_TAILED))
    return result


@dataclasses.dataclass(frozen=True)
class Architecture:
    """`depth` blocks `Dense(width) → φ`, then a readout `Dense(out_dim)`
    (`Dense(width) → LayerNorm → φ` for φ in `UNIT_VARIANCE`).

    Attributes:
        nonlinearity: φ, the same in every block (fresh instances).
        hidden: `(W_std, b_std)` of each block's Dense layer.
        readout: `(W_std, b_std)` of the readout.
        parameterization: `'ntk'` or `'standard'`, for every Dense layer.
        s_in: the standard parameterization's `s = (s_in, 1)`.
    """

    nonlinearity: Nonlinearity
    hidden: tuple[tuple[float, float | None], ...]
    readout: tuple[float, float | None]
    parameterization: str = 'ntk'
    s_in: int = 1

    @property
    def depth(self) -> int:
        return len(self.hidden)

    def _dense(self, width: int, W_std: float, b_std: float | None) -> stax.Dense:
        return stax.Dense(width, W_std=W_std, b_std=b_std, parameterization=self.parameterization,
                          s=(self.s_in, 1))

    def build(self, width: int, out_dim: int = 1) -> stax.Serial:
        layers = []
        for W_std, b_std in self.hidden:
            layers.append(self._dense(width, W_std, b_std))
            if self.nonlinearity.name in UNIT_VARIANCE:
                layers.append(stax.LayerNorm())
            layers.append(self.nonlinearity.build())
        return stax.serial(*layers, self._dense(out_dim, *self.readout))


W_STDS = _floats(0.5, 2.)
B_STDS = st.one_of(st.none(), st.just(0.), _floats(0.05, 0.5))


@st.composite
def architectures(draw: Callable, max_depth: int = 4,
                  closed_form_only: bool = False) -> Architecture:
    """Random fully connected architectures (see `Architecture`).

    Heavy-tailed nonlinearities get depth 1 and `W_std ≤ 1`: the finite
    network's kernels converge slowly there, which is not what these tests probe.
    """
    phi = draw(nonlinearities(closed_form_only))
    depth = draw(st.integers(1, max_depth if phi.tame else 1))
    W_stds = W_STDS if phi.tame else _floats(0.5, 1.)
    hidden = tuple(draw(st.tuples(W_stds, B_STDS)) for _ in range(depth))
    readout = draw(st.tuples(W_STDS, B_STDS))
    parameterization = draw(st.sampled_from(('ntk', 'standard')))
    s_in = draw(st.sampled_from((1, 2))) if parameterization == 'standard' else 1
    return Architecture(phi, hidden, readout, parameterization, s_in)


@st.composite
def inputs(draw: Callable, n: tuple[int, int] = (4, 6), channels: tuple[int, int] = (5, 8),
           pair: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(x1, x2)` standard normal float64 inputs `(N, C)`; `x2` is `None` unless `pair`.

    Drawn from a seed, not element by element: hypothesis shrinks the seed and
    sizes, and every example has generic (distinct, nonzero) rows.
    """
    n1 = draw(st.integers(*n))
    c = draw(st.integers(*channels))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n1, c, generator=generator, dtype=torch.float64)
    if not pair:
        return x1, None
    n2 = draw(st.integers(*n))
    return x1, torch.randn(n2, c, generator=generator, dtype=torch.float64)


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    """Standard normal float64 tensor, reproducible from `seed`."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def average_over_inits(model: stax.Layer, kernel_fn_of: Callable, x: torch.Tensor,
                       seeds: int) -> torch.Tensor:
    """Mean of `kernel_fn_of(model)(x)` over `seeds` initializations of `model`
    (float64, generators seeded 0 … seeds − 1): e.g. an empirical NTK or a
    Monte Carlo NNGP estimate."""
    total = 0
    for seed in range(seeds):
        model.init_parameters(x.shape, generator=torch.Generator().manual_seed(seed),
                              dtype=torch.float64)
        total = total + kernel_fn_of(model)(x)
    return total / seeds


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error `‖actual − expected‖ / ‖expected‖`."""
    return (torch.linalg.norm(actual - expected) / torch.linalg.norm(expected)).item()


def width_tolerance(width: int, constant: float, depth: int = 1) -> float:
    """`constant·sqrt((depth + 1) / width)`: finite-width fluctuations of the
    kernels shrink as `1/sqrt(width)` and grow with depth."""
    return constant * math.sqrt((depth + 1) / width)
