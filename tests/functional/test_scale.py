"""Kernels at every scale (issue 16): closed forms that neither overflow nor cancel.

* A 70-layer ReLU network whose NTK (~1e23) fits float32 although the
  products `var1·var2` of its covariances do not, in both backends, against
  the arc-cosine recursion in 40-digit mpmath.
* Every closed-form map at variances from 1e-30 to 1e30 (float32) and
  1e-300 to 1e300 (float64), against its textbook formula in mpmath.
* Networks with each nonlinearity on inputs of size 1e-3 to 1e4: float32
  within 1e-4 of float64, relative to the kernel's largest entry.
"""

from __future__ import annotations

import math
import warnings

import mpmath
import pytest
import torch

from torchntk import stax
from torchntk.functional import elementwise as maps

from tests.strategies import Architecture, all_nonlinearities, gaussian

F32_MAX = torch.finfo(torch.float32).max


def scale_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """`max|actual − expected| / max|expected|` (inf where `actual` is not finite)."""
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def float32_errors(model: stax.Layer, x: torch.Tensor) -> list[float]:
    """`scale_error` of the float32 kernels (nngp and ntk) of `x` against the
    float64 ones of the same (float32) inputs; `[]` where the float64 kernel
    is beyond float32's range or not finite."""
    x = x.float()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        expected = model.kernel_fn(x.double(), get=('nngp', 'ntk'))
        actual = model.kernel_fn(x, get=('nngp', 'ntk'))
    if not all(torch.isfinite(k).all() and k.abs().max() <= F32_MAX for k in expected):
        return []
    return [scale_error(a, e) for a, e in zip(actual, expected)]


# -- the deep ReLU network of issue 16 --------------------------------------------------------

def relu_network_reference(x: torch.Tensor, depth: int, W_std: float, b_std: float,
                           out_W_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NNGP and NTK of `depth × [Dense(W_std, b_std), Relu] + Dense(out_W_std)`
    (NTK parameterization) by the arc-cosine recursion (Cho & Saul 2009; Jacot
    et al. 2018), with angles from `acos`, in 40-digit mpmath."""
    with mpmath.workdps(40):
        rows = [[mpmath.mpf(v) for v in row] for row in x.tolist()]
        n, width = len(rows), len(rows[0])
        nngp = [[W_std**2 * mpmath.fsum(a * b for a, b in zip(rows[i], rows[j])) / width
                 + b_std**2 for j in range(n)] for i in range(n)]
        ntk = [row[:] for row in nngp]
        for layer in range(depth):
            norms = [mpmath.sqrt(nngp[i][i]) for i in range(n)]
            after, slope = [[None] * n for _ in range(n)], [[None] * n for _ in range(n)]
            for i in range(n):
                for j in range(n):
                    r = norms[i] * norms[j]
                    theta = mpmath.acos(max(-1, min(1, nngp[i][j] / r)))
                    after[i][j] = r * (mpmath.sin(theta) + (mpmath.pi - theta)
                                       * mpmath.cos(theta)) / (2 * mpmath.pi)
                    slope[i][j] = (mpmath.pi - theta) / (2 * mpmath.pi)
            w2, b2 = (out_W_std**2, 0) if layer == depth - 1 else (W_std**2, b_std**2)
            nngp = [[w2 * after[i][j] + b2 for j in range(n)] for i in range(n)]
            ntk = [[nngp[i][j] + w2 * slope[i][j] * ntk[i][j] for j in range(n)]
                   for i in range(n)]
        return (torch.tensor([[float(v) for v in row] for row in nngp], dtype=torch.float64),
                torch.tensor([[float(v) for v in row] for row in ntk], dtype=torch.float64))


def relu_network(depth: int) -> stax.Layer:
    layers = [layer for _ in range(depth)
              for layer in (stax.Dense(64, W_std=2., b_std=0.1), stax.Relu())]
    return stax.serial(*layers, stax.Dense(1, W_std=2.))


@pytest.fixture(scope='module')
def deep_inputs():
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return x, relu_network_reference(x, 70, 2., 0.1, 2.)


@pytest.mark.parametrize('dtype, tolerance', [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_deep_relu_network_matches_the_arc_cosine_recursion(backend, chain_calls, deep_inputs,
                                                             dtype, tolerance):
    # The NTK is ~1e23, representable in float32; var1·var2 (~1e43) is not.
    x, (nngp_expected, ntk_expected) = deep_inputs
    assert ntk_expected.max() > 1e22
    nngp, ntk = relu_network(70).kernel_fn(x.to(dtype), get=('nngp', 'ntk'))
    assert chain_calls['chain_pairs'] == (1 if backend == 'extension' else 0)
    assert scale_error(nngp, nngp_expected) < tolerance
    assert scale_error(ntk, ntk_expected) < tolerance


def test_overflowing_deep_relu_kernel_is_not_finite(backend, deep_inputs):
    # 140 layers: the kernel exceeds float32's range; no entry may come out finite.
    x, _ = deep_inputs
    nngp, ntk = relu_network(140).kernel_fn(x.float(), get=('nngp', 'ntk'))
    assert not torch.isfinite(nngp).any() and not torch.isfinite(ntk).any()


# -- every closed-form map at extreme variances, against mpmath -------------------------------

def _angle(c, v1, v2):
    """`(r, s, θ)`: `r = sqrt(v1·v2)`, `s = r·sin θ`, `c = r·cos θ`."""
    s = mpmath.sqrt(max(v1 * v2 - c**2, 0))
    return mpmath.sqrt(v1 * v2), s, mpmath.atan2(s, c)


def _abrelu(a, b):
    a, b = mpmath.mpf(a), mpmath.mpf(b)

    def kernel(c, v1, v2):
        _, s, theta = _angle(c, v1, v2)
        k1 = (a - b)**2 / (2 * mpmath.pi)
        return k1 * (s - theta * c) + (a**2 + b**2) / 2 * c, (a**2 + b**2) / 2 - k1 * theta
    return kernel


def _rectified_monomial(n):
    # Cho & Saul (2009): K_n = r^n·J_n(θ)/(2π), and d_nngp = n²·K_{n−1}.
    def arc_cosine(degree, c, v1, v2):
        r, s, theta = _angle(c, v1, v2)
        rest = mpmath.pi - theta
        return [rest, s + rest * c, 3 * s * c + rest * (r**2 + 2 * c**2)][degree] / (2 * mpmath.pi)

    def kernel(c, v1, v2):
        return arc_cosine(n, c, v1, v2), n**2 * arc_cosine(n - 1, c, v1, v2) if n else 0
    return kernel


def _sign(c, v1, v2):
    return 1 - 2 * _angle(c, v1, v2)[2] / mpmath.pi, 0


def _erf(a, b, shift):
    a, b, shift = mpmath.mpf(a), mpmath.mpf(b), mpmath.mpf(shift)

    def kernel(c, v1, v2):
        prod = (1 + 2 * b**2 * v1) * (1 + 2 * b**2 * v2)
        return (a**2 * 2 / mpmath.pi * mpmath.asin(2 * b**2 * c / mpmath.sqrt(prod)) + shift**2,
                a**2 * 4 * b**2 / mpmath.pi / mpmath.sqrt(prod - 4 * b**4 * c**2))
    return kernel


def _gelu(c, v1, v2):
    prod = (1 + v1) * (1 + v2)
    delta = mpmath.sqrt(prod - c**2)
    alpha = mpmath.asin(c / mpmath.sqrt(prod))
    return (c / 4 + (c * alpha + (v1 * v2 * delta**2 + c**2) / (prod * delta)) / (2 * mpmath.pi),
            mpmath.mpf(1) / 4 + alpha / (2 * mpmath.pi)
            + c * (1 + 1 / delta**2 + (1 - v1 * v2) / prod) / (2 * mpmath.pi * delta))


def _sin(a, b, shift):
    a, b, shift = mpmath.mpf(a), mpmath.mpf(b), mpmath.mpf(shift)

    def kernel(c, v1, v2):
        minus = mpmath.exp(-b**2 * (v1 + v2 - 2 * c) / 2)
        plus = mpmath.cos(2 * shift) * mpmath.exp(-b**2 * (v1 + v2 + 2 * c) / 2)
        return a**2 / 2 * (minus - plus), a**2 * b**2 / 2 * (minus + plus)
    return kernel


def _rbf(gamma):
    gamma = mpmath.mpf(gamma)

    def kernel(c, v1, v2):
        nngp = mpmath.exp(-gamma * (v1 + v2 - 2 * c))
        return nngp, 2 * gamma * nngp
    return kernel


def _gabor(c, v1, v2):
    total, delta = v1 + v2, 4 * (v1 * v2 - c**2)
    det = 1 + 2 * total + delta
    minus = mpmath.exp(-(total + delta - 2 * c) / (2 * det))
    plus = mpmath.exp(-(total + delta + 2 * c) / (2 * det))
    g = 4 * c * (det + 1 + total)
    return ((minus - plus) / (2 * mpmath.sqrt(det)),
            (minus * (det + 8 * c**2 + g) - plus * (g - det - 8 * c**2)) / (2 * det**2.5))


def _exp(a, b):
    a, b = mpmath.mpf(a), mpmath.mpf(b)

    def kernel(c, v1, v2):
        nngp = a**2 * mpmath.exp(b**2 * ((v1 + v2) / 2 + c))
        return nngp, b**2 * nngp
    return kernel


def _gaussian(a, b):
    a, b = mpmath.mpf(a), mpmath.mpf(b)

    def kernel(c, v1, v2):
        det = mpmath.sqrt((1 - 2 * b * v1) * (1 - 2 * b * v2) - 4 * b**2 * c**2)
        return a**2 / det, 4 * a**2 * b**2 * c / det**3
    return kernel


def _exp_normalized(gamma, shift):
    gamma, shift = mpmath.mpf(gamma), mpmath.mpf(shift)

    def kernel(c, v1, v2):
        r = max(mpmath.sqrt(v1 * v2), mpmath.mpf(1e-15))
        scale = mpmath.exp(gamma * (c / r + shift))
        return r * scale, gamma * scale
    return kernel


# name: (the map, its mpmath reference)
CLOSED_FORMS = {
    'relu': (lambda *p: maps.abrelu(*p, 0., 1., True), _abrelu(0, 1)),
    'abrelu': (lambda *p: maps.abrelu(*p, -0.3, 1.2, True), _abrelu(-0.3, 1.2)),
    'sign': (lambda *p: maps.sign(*p, True), _sign),
    **{f'rectified_monomial{n}': (lambda *p, n=n: maps.rectified_monomial(*p, n, True),
                                  _rectified_monomial(n)) for n in range(3)},
    'erf': (lambda *p: maps.erf(*p, 1.3, 0.7, 0.2, True), _erf(1.3, 0.7, 0.2)),
    'gelu': (lambda *p: maps.gelu(*p, True), _gelu),
    'sin': (lambda *p: maps.sin(*p, 1.2, 0.9, 0.3, True), _sin(1.2, 0.9, 0.3)),
    # Phases where E₋ ∓ cos(2c)·E₊ cancels at small variances: Sin(c=0)'s NNGP, Cos's NTK.
    'sin_zero_phase': (lambda *p: maps.sin(*p, 1., 1., 0., True), _sin(1., 1., 0.)),
    'cos': (lambda *p: maps.sin(*p, 1.1, 0.8, math.pi / 2, True), _sin(1.1, 0.8, math.pi / 2)),
    'rbf': (lambda *p: maps.rbf(*p, 0.7, True), _rbf(0.7)),
    'gabor': (lambda *p: maps.gabor(*p, True), _gabor),
    'exp': (lambda *p: maps.exp(*p, 0.8, 0.6, True), _exp(0.8, 0.6)),
    'gaussian': (lambda *p: maps.gaussian(*p, 1.5, -0.7, True), _gaussian(1.5, -0.7)),
    'exp_normalized': (lambda *p: maps.exp_normalized(*p, 1., -1., False, True),
                       _exp_normalized(1., -1.)),
}

EXTREMES = {torch.float32: (1e-30, 1e-10, 1., 1e10, 1e30),
            torch.float64: (1e-300, 1e-100, 1., 1e100, 1e300)}


def extreme_points(dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    """Per pair of variance scales, `(cov12, var1, var2)` in `dtype`: correlations
    in (−0.95, 0.95), and each example with itself and with its negation."""
    generator = torch.Generator().manual_seed(0)
    groups = []
    for scale1 in EXTREMES[dtype]:
        for scale2 in EXTREMES[dtype]:
            var1 = scale1 * (0.5 + 1.5 * torch.rand(6, dtype=torch.float64, generator=generator))
            var2 = scale2 * (0.5 + 1.5 * torch.rand(6, dtype=torch.float64, generator=generator))
            rho = 1.9 * torch.rand(6, dtype=torch.float64, generator=generator) - 0.95
            cov12 = rho * var1.sqrt() * var2.sqrt()
            if scale1 == scale2:
                var2[-2:], cov12[-2:] = var1[-2:], var1[-2:] * torch.tensor([1., -1.])
            groups.append(tuple(t.to(dtype) for t in (cov12, var1, var2)))
    return groups


@pytest.mark.parametrize('dtype, tolerance', [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize('name', CLOSED_FORMS)
def test_closed_form_is_accurate_at_extreme_variances(name, dtype, tolerance):
    # Relative to the largest entry of a group of like variances; entries beyond
    # the dtype's range must come out inf or NaN, and groups whose scale is
    # below its normal range are not checked.
    kernel_map, reference = CLOSED_FORMS[name]
    info = torch.finfo(dtype)
    for cov12, var1, var2 in extreme_points(dtype):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            actual = kernel_map(cov12, var1, var2)
        # Digits enough for the textbook forms' cancellation (products of 1e±300s).
        with mpmath.workdps(100 if dtype == torch.float32 else 700):
            expected = [reference(*(mpmath.mpf(float(v)) for v in point))
                        for point in zip(cov12, var1, var2)]
        for which, out in enumerate(actual):
            exact = torch.tensor([float(e[which]) for e in expected], dtype=torch.float64)
            beyond = exact.abs() > info.max
            assert not torch.isfinite(out[beyond]).any()
            scale = exact[~beyond].abs().max() if (~beyond).any() else 0.
            if scale < info.tiny / info.eps:
                continue
            error = ((out[~beyond].double() - exact[~beyond]).abs() / scale).max()
            assert error < tolerance, (which, var1[0].item(), var2[0].item(), error.item())


# -- networks on inputs of every size: float32 against float64 ---------------------------------

SCALES = (1e-3, 1e-2, 1e-1, 1., 1e1, 1e2, 1e3, 1e4)
NONLINEARITIES = {phi.name: phi for phi in all_nonlinearities()}
FUSED = {'Relu', 'LeakyRelu', 'Abs', 'ABRelu'}   # the fused chain's nonlinearities


@pytest.mark.parametrize('name', NONLINEARITIES)
def test_float32_kernel_is_within_1e_4_of_float64_at_every_input_scale(name, backend,
                                                                       chain_calls):
    # Dense → φ → Dense(1) and three blocks deep; only kernels beyond float32's
    # range (Exp at large inputs, Monomial and RectifiedMonomial deep) are exempt.
    x = gaussian(5, 7)
    checked = 0
    for hidden in (((1.5, 0.1),), ((1.5, 0.1),) * 3):
        model = Architecture(NONLINEARITIES[name], hidden, (1.5, None)).build(16)
        for scale in SCALES:
            errors = float32_errors(model, scale * x)
            assert all(error < 1e-4 for error in errors), (len(hidden), scale, errors)
            checked += bool(errors)
    assert checked >= 8
    if name in FUSED:
        assert (chain_calls['chain_pairs'] > 0) == (backend == 'extension')


def test_float32_conv_relu_kernel_is_within_1e_4_of_float64_at_every_input_scale(backend,
                                                                                 chain_calls):
    conv = lambda: stax.Conv(8, (3, 3), padding='SAME', W_std=1.5, b_std=0.1)
    model = stax.serial(conv(), stax.Relu(), conv(), stax.LeakyRelu(0.1), stax.GlobalAvgPool(),
                        stax.Dense(1, W_std=1.5))
    x = gaussian(3, 2, 5, 4)
    for scale in SCALES:
        errors = float32_errors(model, scale * x)
        assert errors and all(error < 1e-4 for error in errors), (scale, errors)
    assert (chain_calls['chain_pairs'] > 0) == (backend == 'extension')
