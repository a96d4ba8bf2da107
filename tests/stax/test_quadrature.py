"""The quadrature nonlinearities (`ElementwiseNumerical`: Tanh, Sigmoid, Softplus,
SiLU, Mish) against scipy's adaptive quadrature, at every input scale.

A Dense layer of inputs of scale `s` gives variances ~`s²`: φ's transition
around 0 (width ~1) is then a small part of the Gaussian, which a rule scaled
to the Gaussian alone misses (the NTK of Tanh at `s = 100` came out 1e-26).
"""

import math

import pytest
import torch
from scipy.integrate import quad
from torch.autograd import gradcheck

from torchntk import stax

from tests.strategies import gaussian


def _sigmoid(x):
    return 0.5 * (1 + math.tanh(x / 2))


def _softplus(x):
    return max(x, 0.) + math.log1p(math.exp(-abs(x)))


def _silu(x):
    return x * _sigmoid(x)


def _mish(x):
    return x * math.tanh(_softplus(x))


# φ and φ' in plain floats, independent of the torch functions the layers use.
PHIS = {
    'Tanh': (math.tanh, lambda x: 1 - math.tanh(x)**2),
    'Sigmoid': (_sigmoid, lambda x: _sigmoid(x) * _sigmoid(-x)),
    'Softplus': (_softplus, _sigmoid),
    'SiLU': (_silu, lambda x: _sigmoid(x) * (1 + x * _sigmoid(-x))),
    'Mish': (_mish, lambda x: math.tanh(_softplus(x))
             + x * _sigmoid(x) * (1 - math.tanh(_softplus(x))**2)),
}
SCALES = [1e-3, 1., 10., 100., 1e4]


def _gaussian_mean(g, mean: float, sd: float) -> float:
    """`E[g(mean + sd·z)]` by scipy.integrate.quad, in `x = mean + sd·z`, cut at
    φ's transition (0, ±1, ±4, ±16, ±64) inside ±12 sd."""
    if sd == 0:
        return g(mean)
    lo, hi = mean - 12 * sd, mean + 12 * sd
    cuts = sorted({lo, hi} | {c for c in (0., 1., -1., 4., -4., 16., -16., 64., -64.) if lo < c < hi})
    density = lambda x: g(x) * math.exp(-((x - mean) / sd)**2 / 2) / (sd * math.sqrt(2 * math.pi))
    return sum(quad(density, a, b, epsabs=0, epsrel=1e-12, limit=200)[0]
               for a, b in zip(cuts, cuts[1:]))


def _expectation(f, g, cov12: float, var1: float, var2: float) -> float:
    """`E[f(u) g(v)]`, `(u, v)` centred Gaussian, as `E_u[f(u)·E[g(v) | u]]` by nested quad."""
    sd1 = math.sqrt(var1)
    rho = cov12 / math.sqrt(var1 * var2)
    sd_given = math.sqrt(var2 * max(0., 1 - rho**2))
    return _gaussian_mean(lambda u: f(u) * _gaussian_mean(g, rho * math.sqrt(var2) * u / sd1,
                                                          sd_given), 0., sd1)


def _relative_error(actual: float, expected: float) -> float:
    return abs(actual - expected) / abs(expected)


@pytest.mark.parametrize('scale', SCALES)
@pytest.mark.parametrize('name', PHIS)
def test_diagonal_kernels_match_scipy_at_every_input_scale(name, scale):
    # One example: the kernel of an example with itself, ρ = 1 exactly.
    x = scale * gaussian(1, 2, seed=0)
    k = stax.serial(stax.Dense(1), getattr(stax, name)()).kernel_fn(x, get=('nngp', 'ntk'))
    var = float((x**2).mean())
    f, df = PHIS[name]
    assert _relative_error(float(k.nngp), _gaussian_mean(lambda u: f(u)**2, 0., math.sqrt(var))) \
        < 1e-6
    # ntk' = E[φ'(u)²]·ntk, and the NTK of Dense(1) is var.
    assert _relative_error(float(k.ntk), var * _gaussian_mean(lambda u: df(u)**2, 0.,
                                                              math.sqrt(var))) < 1e-6


PAIRS = [  # (var1, var2, ρ): equal and unequal variances, ρ = -1 exactly
    (1., 1e4, 0.7), (1e4, 1e4, -1.),
]


@pytest.mark.parametrize('var1, var2, rho', PAIRS)
def test_tanh_kernel_map_of_pairs_matches_scipy(var1, var2, rho):
    cov12 = rho * math.sqrt(var1 * var2)
    nngp, d_nngp = stax.Tanh().kernel_map(
        *(torch.tensor([t], dtype=torch.float64) for t in (cov12, var1, var2)), True)
    f, df = PHIS['Tanh']
    d_scale = math.sqrt(_gaussian_mean(lambda u: df(u)**2, 0., math.sqrt(var1)) *
                        _gaussian_mean(lambda u: df(u)**2, 0., math.sqrt(var2)))
    assert abs(float(nngp) - _expectation(f, f, cov12, var1, var2)) < 1e-6  # |tanh| < 1
    assert abs(float(d_nngp) - _expectation(df, df, cov12, var1, var2)) < 1e-6 * d_scale


@pytest.mark.parametrize('name', PHIS)
def test_zero_variances_give_phi_of_zero(name):
    zero = torch.zeros(1, dtype=torch.float64)
    nngp, d_nngp = getattr(stax, name)().kernel_map(zero, zero, zero, True)
    f, df = PHIS[name]
    assert float(nngp) == pytest.approx(f(0.)**2, abs=1e-15)
    assert float(d_nngp) == pytest.approx(df(0.)**2, rel=1e-12)


@pytest.mark.parametrize('scale', SCALES)
@pytest.mark.parametrize('name', PHIS)
def test_float32_within_1e_4_of_float64(name, scale):
    x1, x2 = scale * gaussian(3, 4, seed=1), scale * gaussian(2, 4, seed=2)
    net = stax.serial(stax.Dense(4, b_std=0.1), getattr(stax, name)(), stax.Dense(3),
                      getattr(stax, name)(), stax.Dense(1))
    for get in ('nngp', 'ntk'):
        exact = net.kernel_fn(x1, x2, get=get)
        single = net.kernel_fn(x1.float(), x2.float(), get=get).double()
        assert (single - exact).abs().max() <= 1e-4 * exact.abs().max()


@pytest.mark.parametrize('scale', [1., 30.])
@pytest.mark.parametrize('name', ['Tanh', 'SiLU'])
def test_gradients_wrt_inputs_match_finite_differences(name, scale):
    # A zero input row gives zero variances; a repeated row gives ρ = 1 between examples.
    x1 = scale * gaussian(3, 2, seed=3)
    x1[0] = 0.
    x2 = torch.cat([x1[1:2], scale * gaussian(1, 2, seed=4)])
    net = stax.serial(stax.Dense(2), getattr(stax, name)(deg=4), stax.Dense(1))

    def kernels(a, b):
        return tuple(net.kernel_fn(a, b, get=('nngp', 'ntk')))
    assert gradcheck(kernels, (x1.requires_grad_(), x2.requires_grad_()), eps=1e-6, atol=1e-5,
                     rtol=1e-4)
