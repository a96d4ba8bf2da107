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
from torchntk.functional import conv as conv_maps


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


# --- Random networks of every layer family (tests/test_properties.py) ------------------------

@dataclasses.dataclass(frozen=True)
class Spec:
    """A `torchntk.stax` layer or combinator by name and arguments; `Spec`s
    among `args` are built first. Its repr is the Python expression that builds
    it, so a failing example prints its own repro."""

    name: str
    args: tuple = ()
    kwargs: tuple[tuple[str, Any], ...] = ()

    def build(self) -> stax.Layer:
        args = [a.build() if isinstance(a, Spec) else a for a in self.args]
        return getattr(stax, self.name)(*args, **dict(self.kwargs))

    def names(self) -> set[str]:
        """The names of this spec and of every spec inside it."""
        inner = (a.names() for a in self.args if isinstance(a, Spec))
        return {self.name}.union(*inner)

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f'{k}={v!r}' for k, v in self.kwargs]
        return f"stax.{self.name}({', '.join(parts)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # hypothesis prints this, not the dataclass's fields


@dataclasses.dataclass(frozen=True)
class _Flow:
    """What the generator knows of the activations after the layers so far:
    spatial sizes, channels, and whether an affine layer made them Gaussian
    (possibly through linear layers after it), so that a nonlinearity may
    follow; the nonlinearities to draw from; and whether the channels are
    identically distributed (`Kernel.iid_channels`: not for the inputs, nor
    after Flatten or a channel FanInConcat, until an affine layer), which
    FanInProd needs."""

    spatial: tuple[int, ...]
    channels: int
    gaussian: bool
    nonlinearities: st.SearchStrategy[list[Spec]]
    iid_channels: bool = False

    def replace(self, **changes: Any) -> _Flow:
        return dataclasses.replace(self, **changes)


# Spatial sizes stay small: full covariances hold (N·X)² entries per spatial dimension.
_MAX_SIZE = 6


def _nonlinearity_layers() -> dict[str, st.SearchStrategy[list[Spec]]]:
    """Every nonlinearity of `torchntk.stax` by name, as the layers that make it
    with random parameters: Hermite after a LayerNorm (it needs unit-variance
    inputs), Gelu with or without the tanh approximation (the same kernel)."""
    candidates = {**available(_CANDIDATES), **available(_QUADRATURE)}
    options = {name: kwargs.map(lambda kw, name=name: [Spec(name, (), kw)])
               for name, (kwargs, _) in candidates.items()}
    for name in ('Sigmoid', 'Softplus', 'SiLU', 'Mish'):
        options[name] = st.just([Spec(name)])
    options['Gelu'] = st.booleans().map(lambda tanh: [Spec('Gelu', (), (('approximate', tanh),))])
    options['ExpNormalized'] = _kwargs(gamma=_floats(0.1, 1.), shift=_floats(-1., 0.),
                                       do_clip=st.booleans()).map(
        lambda kw: [Spec('ExpNormalized', (), kw)])
    options['Hermite'] = st.integers(1, 4).map(lambda n: [Spec('LayerNorm'), Spec('Hermite', (n,))])
    return {name: options[name] for name in sorted(options) if hasattr(stax, name)}


#: name -> strategy of the layers making that nonlinearity (see `_nonlinearity_layers`).
NONLINEARITY_LAYERS = _nonlinearity_layers()


def _nonlinearity(draw: Callable, flow: _Flow) -> tuple[list[Spec], _Flow]:
    return draw(flow.nonlinearities), flow.replace(gaussian=False)


def _affine_kwargs(draw: Callable) -> tuple[tuple[str, Any], ...]:
    kwargs = {'W_std': draw(W_STDS), 'b_std': draw(B_STDS)}
    if draw(st.booleans()):
        kwargs.update(parameterization='standard', s=(draw(st.sampled_from((1, 2))), 1))
    return tuple(kwargs.items())


def _window(draw: Callable, spatial: tuple[int, ...], transpose: bool = False
            ) -> tuple[tuple[int, ...], tuple[int, ...], str, tuple[int, ...]]:
    """A window, strides and padding that fit `spatial`, and the output sizes."""
    padding = draw(st.sampled_from(('VALID', 'SAME', 'CIRCULAR')))
    window, strides, out = [], [], []
    for size in spatial:
        k = draw(st.integers(1, min(3, size) if padding == 'VALID' and not transpose else 3))
        stride = draw(st.integers(1, 2))
        if transpose:
            # A transposed convolution enlarges: smaller strides and windows keep it small.
            if conv_maps.transpose_output_size(size, k, stride, padding) > _MAX_SIZE:
                stride = 1
            if conv_maps.transpose_output_size(size, k, stride, padding) > _MAX_SIZE:
                k = 1
            new = conv_maps.transpose_output_size(size, k, stride, padding)
        else:
            new = conv_maps.conv_output_size(size, k, stride, padding)
        window.append(k), strides.append(stride), out.append(new)
    return tuple(window), tuple(strides), padding, tuple(out)


def _affine(draw: Callable, flow: _Flow, same_shape: bool = False) -> tuple[list[Spec], _Flow]:
    """`Dense` or (spatial inputs) a convolution; `same_shape` keeps channels and sizes."""
    kinds = ['Dense'] + (['Conv'] * 3 + ['ConvTranspose', 'ConvLocal'] if flow.spatial else [])
    kind = draw(st.sampled_from(kinds if not same_shape else kinds[:4]))
    width = flow.channels if same_shape else draw(st.integers(1, 3))
    kwargs = _affine_kwargs(draw)
    if kind == 'Dense':
        return [Spec('Dense', (width,), kwargs)], flow.replace(channels=width, gaussian=True,
                                                              iid_channels=True)
    if same_shape:
        window = tuple(draw(st.integers(1, 3)) for _ in flow.spatial)
        layer = Spec(kind, (width, window), kwargs + (('padding', 'SAME'),))
        return [layer], flow.replace(gaussian=True, iid_channels=True)
    window, strides, padding, spatial = _window(draw, flow.spatial, kind == 'ConvTranspose')
    layer = Spec(kind, (width, window), kwargs + (('strides', strides), ('padding', padding)))
    return [layer], flow.replace(spatial=spatial, channels=width, gaussian=True, iid_channels=True)


def _pool(draw: Callable, flow: _Flow) -> tuple[list[Spec], _Flow]:
    window, strides, padding, spatial = _window(draw, flow.spatial)
    kwargs = (('strides', strides), ('padding', padding))
    if draw(st.booleans()):
        kwargs += (('normalize_edges', draw(st.booleans())),)
        return [Spec('AvgPool', (window,), kwargs)], flow.replace(spatial=spatial)
    return [Spec('SumPool', (window,), kwargs)], flow.replace(spatial=spatial)


def _resize(draw: Callable, flow: _Flow) -> tuple[list[Spec], _Flow]:
    spatial = tuple(draw(st.sampled_from((-1, 2, 3, 5))) for _ in flow.spatial)
    method = draw(st.sampled_from(('linear', 'nearest')))
    layer = Spec('ImageResize', ((-1, -1, *spatial), method), (('antialias', draw(st.booleans())),))
    new = tuple(old if size == -1 else size for old, size in zip(flow.spatial, spatial))
    return [layer], flow.replace(spatial=new)


def _layer_norm(draw: Callable, flow: _Flow) -> tuple[list[Spec], _Flow]:
    axes = draw(st.sampled_from([1] + ([tuple(range(1, 2 + len(flow.spatial)))]
                                       if flow.spatial else [])))
    return [Spec('LayerNorm', (), (('axis', axes),))], flow


def _dropout(draw: Callable, flow: _Flow) -> tuple[list[Spec], _Flow]:
    # Training mode (a fresh module's): the kernel gains dropout's noise and
    # is no longer Gaussian.
    return [Spec('Dropout', (draw(st.sampled_from((0.1, 0.5))),))], flow.replace(gaussian=False)


def _readout(draw: Callable, flow: _Flow) -> tuple[list[Spec], _Flow]:
    name = draw(st.sampled_from(('GlobalAvgPool', 'GlobalSumPool', 'Flatten')))
    if name == 'Flatten':
        channels = flow.channels * math.prod(flow.spatial)
        return [Spec(name)], flow.replace(spatial=(), channels=channels, gaussian=False,
                                          iid_channels=False)
    return [Spec(name)], flow.replace(spatial=())


def _branch(draw: Callable, flow: _Flow, gaussian_out: bool) -> tuple[list[Spec], _Flow]:
    """One branch of a `parallel`, keeping the shape; Gaussian at the end if `gaussian_out`."""
    kinds = ['affine', 'affine-phi-affine']
    if flow.gaussian or not gaussian_out:
        kinds.append('identity')
    if flow.gaussian and not gaussian_out:
        kinds.append('phi')
    kind = draw(st.sampled_from(kinds))
    if kind == 'identity':
        return [Spec('Identity')], flow
    if kind == 'phi':
        return _nonlinearity(draw, flow)
    layers, out = _affine(draw, flow, same_shape=True)
    if kind == 'affine-phi-affine':
        more, out = _nonlinearity(draw, out)
        last, out = _affine(draw, out, same_shape=True)
        layers += more + last
    return layers, out


def _repeat(draw: Callable, flow: _Flow) -> tuple[list[Spec], _Flow]:
    """`repeat` of a block that keeps the shape: an affine layer and a nonlinearity."""
    layers, out = _affine(draw, flow, same_shape=True)
    more, out = _nonlinearity(draw, out)
    return [Spec('repeat', (Spec('serial', tuple(layers + more)), draw(st.integers(2, 3))))], out


def _branching(draw: Callable, flow: _Flow) -> tuple[list[Spec], _Flow]:
    """`FanOut(n)`, `parallel` of n branches and a fan-in layer."""
    n = draw(st.integers(2, 3))
    fan_ins = ['FanInSum', 'FanInConcat'] + ['FanInProd'] * flow.iid_channels + \
        ['FanInConcat-spatial'] * bool(flow.spatial)
    fan_in = draw(st.sampled_from(fan_ins))
    gaussian_out = fan_in in ('FanInSum', 'FanInConcat-spatial')  # they need Gaussian branches
    branches = [_branch(draw, flow, gaussian_out) for _ in range(n)]
    specs = [Spec('serial', tuple(layers)) for layers, _ in branches]
    if fan_in == 'FanInConcat-spatial':
        axis = draw(st.integers(2, 1 + len(flow.spatial)))
        size = n * flow.spatial[axis - 2]
        spatial = flow.spatial[:axis - 2] + (size,) + flow.spatial[axis - 1:]
        out, last = flow.replace(spatial=spatial, gaussian=True), Spec('FanInConcat', (axis,))
    elif fan_in == 'FanInConcat':
        out = flow.replace(channels=n * flow.channels, gaussian=False, iid_channels=False)
        last = Spec('FanInConcat', (1,))
    else:
        out = flow.replace(gaussian=fan_in == 'FanInSum')
        last = Spec(fan_in)
    return [Spec('FanOut', (n,)), Spec('parallel', tuple(specs)), last], out


@st.composite
def networks(draw: Callable, spatial: tuple[int, ...], channels: int, max_blocks: int = 3,
             nonlinearity: str | None = None) -> Spec:
    """A random `serial` network for inputs `(N, channels, *spatial)`, from
    every layer family of `torchntk.stax`: Dense and convolutions (shared,
    transposed, local), pooling, resizing, every nonlinearity with random
    parameters, LayerNorm, Dropout, branches (FanOut, parallel, FanInSum,
    FanInConcat, FanInProd), repeat, global pooling or Flatten, and a Dense
    readout.

    Blocks are an affine layer, at most one linear layer (pooling, resizing,
    LayerNorm), then mostly a nonlinearity; or a branching, or a `repeat`. Every nonlinearity
    and LayerNorm follows an affine layer (through linear layers only): the
    infinite-width limit needs Gaussian inputs. Fan-in layers that need
    Gaussian branches get them. With `nonlinearity` (a name of
    `NONLINEARITY_LAYERS`), every nonlinearity is that one, and the first block
    has one.
    """
    # Quadrature costs ~10⁶ evaluations per kernel entry: on flat inputs only,
    # where there are few entries (its rule is elementwise, the same on any layout).
    phis = NONLINEARITY_LAYERS[nonlinearity] if nonlinearity is not None else st.one_of(
        [layers for name, layers in NONLINEARITY_LAYERS.items()
         if not (spatial and name in QUADRATURE)])
    flow = _Flow(spatial, channels, gaussian=False, nonlinearities=phis)
    layers: list[Spec] = []
    for block in range(draw(st.integers(1, max_blocks))):
        if block and draw(st.integers(0, 3)) == 0:
            more, flow = draw(st.sampled_from([_branching, _branching, _repeat]))(draw, flow)
            layers += more
            continue
        more, flow = _affine(draw, flow)
        layers += more
        linear = [None, None, _layer_norm] + ([_pool, _resize] if flow.spatial else [])
        between = draw(st.sampled_from(linear))
        if between is not None:
            more, flow = between(draw, flow)
            layers += more
        afters = [_nonlinearity] if nonlinearity and not block else \
            [_nonlinearity] * 4 + [_dropout, None]
        after = draw(st.sampled_from(afters))
        if after is not None:
            more, flow = after(draw, flow)
            layers += more
        if flow.spatial and draw(st.integers(0, 4)) == 0:
            more, flow = _readout(draw, flow)
            layers += more
    if flow.spatial and draw(st.booleans()):
        more, flow = _readout(draw, flow)
        layers += more
    if draw(st.integers(0, 3)):
        layers += _affine(draw, flow)[0]
    return Spec('serial', tuple(layers))


@dataclasses.dataclass(frozen=True)
class Case:
    """A network and inputs `scale·gaussian(shape, seed)`, rounded to float32 so
    that float32 and float64 kernels see the same inputs; `shape2` is `None` for
    `x2 = None`. Its repr is a runnable repro."""

    network: Spec
    shape1: tuple[int, ...]
    shape2: tuple[int, ...] | None
    seed: int
    scale: float

    def inputs(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        x1 = (self.scale * gaussian(*self.shape1, seed=self.seed)).float()
        x2 = None if self.shape2 is None else \
            (self.scale * gaussian(*self.shape2, seed=self.seed + 1)).float()
        return x1.to(dtype), None if x2 is None else x2.to(dtype)

    def __repr__(self) -> str:
        x2 = 'None' if self.shape2 is None else \
            f"({self.scale!r} * gaussian(*{self.shape2}, seed={self.seed + 1})).float()"
        return (f"\n    net = {self.network!r}\n"
                f"    x1 = ({self.scale!r} * gaussian(*{self.shape1}, seed={self.seed})).float()\n"
                f"    x2 = {x2}  # then .double() for float64; gaussian from tests.strategies\n")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # hypothesis prints this, not the dataclass's fields


#: Input scales 10^e: 1e-3 … 1e4, unnormalized pixel values included
#: (failing examples shrink towards 1).
SCALES = st.integers(-3, 4).map(lambda e: 10.**e)


@st.composite
def cases(draw: Callable, pair: bool | None = None, max_blocks: int = 3,
          nonlinearity: str | None = None, scale: float | None = None) -> Case:
    """A random network (`networks`, with `nonlinearity` if given) with flat,
    1-D or 2-D inputs (flat for a quadrature `nonlinearity`) of scale `scale`
    (`SCALES` if `None`); `x2` given or `None` at random unless `pair` says."""
    if nonlinearity in QUADRATURE:  # ~10⁶ evaluations per entry: few entries, one block
        max_blocks, n_spatial = 1, 0
    else:
        n_spatial = draw(st.integers(0, 2))
    spatial = tuple(draw(st.integers(3, 5 if n_spatial == 1 else 4)) for _ in range(n_spatial))
    # Two channels or more: with one, every two examples (and, under Dense,
    # positions) are collinear, correlation ±1 exactly, where the arc-cosine
    # maps (ReLU family, Sign) have infinite slope: one rounding of a
    # covariance (an ulp, 1e-16 or 6e-8) moves θ = arccos ρ by √ulp, ~1e-8 in
    # float64 and ~3e-4 in float32, whichever way it is computed.
    channels = draw(st.integers(2, 3))
    network = draw(networks(spatial, channels, max_blocks, nonlinearity))
    n1 = draw(st.integers(1, 3))
    pair = draw(st.booleans()) if pair is None else pair
    shape2 = (draw(st.integers(1, 3)), channels, *spatial) if pair else None
    return Case(network, (n1, channels, *spatial), shape2, draw(st.integers(0, 2**16)),
                draw(SCALES) if scale is None else scale)
