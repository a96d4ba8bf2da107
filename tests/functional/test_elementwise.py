"""Closed-form elementwise kernel maps against independent numerical integrals.

Every map `kernel_map(cov12, var1, var2) = (E[φ(u)φ(v)], E[φ'(u)φ'(v)])` is
checked against an integral of the layer's own `forward` (φ) and of its
autograd derivative (φ'):

* smooth φ: 2-D Gauss–Hermite quadrature of degree 120 (converges
  exponentially for these entire functions, so the tolerance is tight;
  degree 80 is not enough for the oscillating Gabor);
* kinked, positively homogeneous φ (ReLU family, Sign, rectified monomials):
  polar coordinates, where the radial integral is a χ₂ moment in closed form
  and the angular one is split at the kinks and done by Gauss–Legendre,
  again to near machine precision.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from torchntk import stax
from torchntk.functional import elementwise as maps

# Smooth activations: closed forms, checked to quadrature precision.
SMOOTH = {
    "erf": lambda: stax.Erf(1.3, 0.7, 0.2),
    "sigmoid_like": stax.Sigmoid_like,
    "gelu": stax.Gelu,
    "sin": lambda: stax.Sin(1.2, 0.9, 0.3),
    "cos": lambda: stax.Cos(0.8, 1.1, -0.4),
    "rbf": lambda: stax.Rbf(0.7),
    "gabor": stax.Gabor,
    "exp": lambda: stax.Exp(0.8, 0.6),
    "gaussian": lambda: stax.Gaussian(1.5, -0.7),
    "monomial0": lambda: stax.Monomial(0),
    "monomial3": lambda: stax.Monomial(3),
    "monomial5": lambda: stax.Monomial(5),
    "polynomial": lambda: stax.Polynomial([0.1, 1.0, -0.5, 0.2, 0.05]),
}

# Kinked activations, positively homogeneous of the given degree: φ(r·x) = rⁿ·φ(x), r > 0.
HOMOGENEOUS = {
    "relu": (stax.Relu, 1),
    "abs": (stax.Abs, 1),
    "leaky_relu": (lambda: stax.LeakyRelu(0.1), 1),
    "abrelu": (lambda: stax.ABRelu(-0.3, 1.2), 1),
    "sign": (stax.Sign, 0),
    **{f"rectified_monomial{n}": (lambda n=n: stax.RectifiedMonomial(n), n) for n in range(5)},
}

# Kernels by the layers' own quadrature (not closed forms): a looser tolerance.
# At the default deg=25 tanh (poles at ±iπ/2) is off by ~2e-4; deg=60 checks the rule.
NUMERICAL = {name: lambda layer=layer: layer(deg=60) for name, layer in
             {"tanh": stax.Tanh, "sigmoid": stax.Sigmoid, "softplus": stax.Softplus,
              "silu": stax.SiLU, "mish": stax.Mish}.items()}

ALL = {**SMOOTH, **{name: factory for name, (factory, _) in HOMOGENEOUS.items()},
       **NUMERICAL, "exp_normalized": stax.ExpNormalized, "hermite3": lambda: stax.Hermite(3)}


def random_covariances(seed: int = 0, n: int = 8) -> tuple[torch.Tensor, ...]:
    """`(cov12, var1, var2)` with `|cov12| ≤ sqrt(var1·var2)`, the last two at `ρ = ±1`."""
    rng = np.random.default_rng(seed)
    var1, var2 = rng.uniform(0.1, 2., (2, n))
    rho = np.concatenate([rng.uniform(-0.99, 0.99, n - 2), [1., -1.]])
    return tuple(torch.from_numpy(t) for t in (rho * np.sqrt(var1 * var2), var1, var2))


def phi_and_derivative(layer: stax.Layer, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = torch.tensor(x, requires_grad=True)
    y = layer(x)
    if not y.requires_grad:  # a constant φ
        return y.numpy(), np.zeros_like(y.numpy())
    (dy,) = torch.autograd.grad(y.sum(), x)
    return y.detach().numpy(), dy.numpy()


def gauss_hermite_expectations(layer, cov12, var1, var2, deg: int = 120):
    """`E[φ(u)φ(v)]`, `E[φ'(u)φ'(v)]` by 2-D Gauss–Hermite quadrature, using
    `u = √var1·z1`, `v = (cov12/√var1)·z1 + sqrt(var2 − cov12²/var1)·z2`."""
    nodes, weights = np.polynomial.hermite.hermgauss(deg)
    z, w = nodes * math.sqrt(2), weights / math.sqrt(math.pi)
    cov12, var1, var2 = (t.numpy()[:, None, None] for t in (cov12, var1, var2))
    slope = cov12 / np.sqrt(var1)
    u = np.sqrt(var1) * z[:, None]                                   # (n, deg, 1)
    v = slope * z[:, None] + np.sqrt(np.maximum(var2 - slope**2, 0)) * z
    (fu, dfu), (fv, dfv) = phi_and_derivative(layer, u), phi_and_derivative(layer, v)
    w2 = w[:, None] * w
    return (torch.from_numpy((fu * fv * w2).sum((1, 2))),
            torch.from_numpy((dfu * dfv * w2).sum((1, 2))))


def polar_expectations(layer, degree: int, cov12, var1, var2, deg: int = 60):
    """The same expectations for φ homogeneous of `degree`, in polar coordinates
    `(z1, z2) = r·(cos t, sin t)`: `E[r^{2n}] = 2ⁿ·n!` for the χ₂ radius, and the
    angular mean is split where `u` or `v` changes sign."""
    nodes, weights = np.polynomial.legendre.leggauss(deg)
    nngp, d_nngp = [], []
    for c, s1, s2 in zip(cov12.tolist(), var1.tolist(), var2.tolist()):
        alpha = c / math.sqrt(s1)
        beta = math.sqrt(max(s2 - alpha**2, 0.))
        kink = math.atan2(-alpha, beta) % math.pi
        edges = np.unique(np.array([0., math.pi / 2, 3 * math.pi / 2, kink, kink + math.pi,
                                    2 * math.pi]) % (2 * math.pi + 1e-300))
        edges = np.unique(np.append(edges, 2 * math.pi))
        lo, hi = edges[:-1, None], edges[1:, None]
        t = (lo + hi) / 2 + (hi - lo) / 2 * nodes
        wt = ((hi - lo) / 2 * weights) / (2 * math.pi)
        (fu, dfu), (fv, dfv) = (phi_and_derivative(layer, x) for x in
                                (math.sqrt(s1) * np.cos(t), alpha * np.cos(t) + beta * np.sin(t)))
        nngp.append(2**degree * math.factorial(degree) * (fu * fv * wt).sum())
        radial = 0. if degree == 0 else 2**(degree - 1) * math.factorial(degree - 1)
        d_nngp.append(radial * (dfu * dfv * wt).sum())
    return torch.tensor(nngp), torch.tensor(d_nngp)


@pytest.mark.parametrize("name", SMOOTH)
def test_smooth_kernel_map_matches_gauss_hermite_quadrature(name):
    layer, points = SMOOTH[name](), random_covariances()
    nngp, d_nngp = layer.kernel_map(*points, True)
    expected_nngp, expected_d_nngp = gauss_hermite_expectations(layer, *points)
    torch.testing.assert_close(nngp, expected_nngp, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(d_nngp, expected_d_nngp, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("name", HOMOGENEOUS)
def test_kinked_kernel_map_matches_polar_integral(name):
    factory, degree = HOMOGENEOUS[name]
    layer, points = factory(), random_covariances(seed=1)
    nngp, d_nngp = layer.kernel_map(*points, True)
    expected_nngp, expected_d_nngp = polar_expectations(layer, degree, *points)
    # ρ = ±1 puts a kink on a quadrature edge only up to rounding, which costs
    # the polar rule a few 1e-9 there (the closed form is exact: checked with mpmath).
    torch.testing.assert_close(nngp, expected_nngp, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(d_nngp, expected_d_nngp, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", NUMERICAL)
def test_numerical_kernel_map_matches_high_degree_quadrature(name):
    layer, points = NUMERICAL[name](), random_covariances(seed=2)
    nngp, d_nngp = layer.kernel_map(*points, True)
    expected_nngp, expected_d_nngp = gauss_hermite_expectations(layer, *points)
    torch.testing.assert_close(nngp, expected_nngp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_nngp, expected_d_nngp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("degree", range(5))
def test_hermite_kernel_matches_quadrature_at_unit_variance(degree):
    layer = stax.Hermite(degree)
    cov12 = torch.linspace(-1, 1, 7, dtype=torch.float64)
    points = (cov12, torch.ones_like(cov12), torch.ones_like(cov12))
    nngp, d_nngp = layer.kernel_map(*points, True)
    expected_nngp, expected_d_nngp = gauss_hermite_expectations(layer, *points)
    torch.testing.assert_close(nngp, expected_nngp, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(d_nngp, expected_d_nngp, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("name", [n for n in ALL if n not in NUMERICAL])
def test_d_nngp_is_derivative_of_nngp_in_cov12(name):
    # Price's theorem: E[φ'(u)φ'(v)] = ∂E[φ(u)φ(v)]/∂cov12 (away from ρ = ±1,
    # where the kinked kernels are singular).
    layer = ALL[name]()
    cov12, var1, var2 = (t[:-2] for t in random_covariances(seed=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, d_nngp = layer.kernel_map(cov12, var1, var2, True)
        _, tangent = torch.func.jvp(lambda c: layer.kernel_map(c, var1, var2, False)[0],
                                    (cov12,), (torch.ones_like(cov12),))
    if name in ("sign", "rectified_monomial0"):  # φ' = 0 a.e.: the Dirac mass at 0 is dropped
        assert torch.all(d_nngp == 0)
    else:
        torch.testing.assert_close(d_nngp, tangent, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("var2", [0., 1.3])
@pytest.mark.parametrize("name", ALL)
def test_kernel_map_and_its_gradients_are_finite_at_zero_variance(name, var2):
    layer = ALL[name]()
    cov12, var1, var2 = (torch.tensor(v, dtype=torch.float64, requires_grad=True)
                         for v in (0., 0., var2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nngp, d_nngp = layer.kernel_map(cov12, var1, var2, True)
    for out in (nngp, d_nngp):
        assert torch.isfinite(out)
        if out.requires_grad:
            grads = torch.autograd.grad(out, (cov12, var1, var2), retain_graph=True,
                                        allow_unused=True, materialize_grads=True)
            assert all(torch.isfinite(g) for g in grads)


def test_gaussian_kernel_is_inf_only_where_the_expectation_diverges():
    # b = 1/2: E[e^{(u² + v²)/2}] is finite iff I − Σ is positive definite. Both
    # variances 2 make (1 − 2b·var1)(1 − 2b·var2) = 1 > 0 although I − Σ = −I.
    var = torch.tensor([2., 0.6, 0.6], dtype=torch.float64)
    cov12 = torch.tensor([0., 0.1, 0.], dtype=torch.float64)
    nngp, d_nngp = maps.gaussian(cov12, var, var, 1.5, 0.5, True)
    assert torch.isinf(nngp[0]) and torch.isinf(d_nngp[0])
    # Convergent with 1 − b·(var1 + var2) < 0: det(I − Σ) = 0.4² − cov12².
    det = torch.sqrt(0.4**2 - cov12[1:]**2)
    torch.testing.assert_close(nngp[1:], 1.5**2 / det)
    torch.testing.assert_close(d_nngp[1:], 1.5**2 * cov12[1:] / det**3)


def test_sign_kernel_is_zero_where_a_variance_is_zero():
    # u = 0 almost surely, and sign(0) = 0.
    nngp, _ = maps.sign(torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                        torch.tensor([0., 2.], dtype=torch.float64), False)
    assert torch.all(nngp == 0)


def test_rbf_nngp_is_rbf_kernel_of_the_inputs():
    x1 = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x2 = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model = stax.serial(stax.Dense(1, W_std=1., b_std=None), stax.Rbf(0.7))
    nngp = model.kernel_fn(x1, x2, get="nngp")
    torch.testing.assert_close(nngp, torch.exp(-0.7 * torch.cdist(x1, x2)**2 / 5))


def test_cos_kernel_is_its_product_to_sum_closed_form():
    # cos(x)cos(y) = (cos(x − y) + cos(x + y))/2 and E[cos(w)] = cos(E w)·exp(−Var w/2).
    a, b, c = 0.8, 1.1, -0.4
    cov12, var1, var2 = random_covariances(seed=4)
    apart = torch.exp(-b**2 * (var1 + var2 - 2 * cov12) / 2)
    together = math.cos(2 * c) * torch.exp(-b**2 * (var1 + var2 + 2 * cov12) / 2)
    nngp, d_nngp = stax.Cos(a, b, c).kernel_map(cov12, var1, var2, True)
    torch.testing.assert_close(nngp, a**2 / 2 * (apart + together), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(d_nngp, (a * b)**2 / 2 * (apart - together), rtol=1e-13, atol=1e-15)


def test_monomial_kernel_is_the_isserlis_moment():
    # Isserlis (Wick): E[u⁴v⁴] = 9·var1²var2² + 72·var1·var2·cov12² + 24·cov12⁴ and
    # E[u³v³] = 9·var1·var2·cov12 + 6·cov12³, so E[φ'φ'] = 16·E[u³v³].
    cov12, var1, var2 = random_covariances(seed=5)
    nngp, d_nngp = stax.Monomial(4).kernel_map(cov12, var1, var2, True)
    torch.testing.assert_close(nngp, 9 * var1**2 * var2**2 + 72 * var1 * var2 * cov12**2
                               + 24 * cov12**4, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(d_nngp, 16 * (9 * var1 * var2 * cov12 + 6 * cov12**3),
                               rtol=1e-13, atol=1e-15)


def test_gelu_approximate_changes_forward_only():
    x = torch.linspace(-3, 3, 11, dtype=torch.float64)
    exact, approximate = stax.Gelu(), stax.Gelu(approximate=True)
    assert not torch.equal(exact(x), approximate(x))
    torch.testing.assert_close(approximate(x), torch.nn.functional.gelu(x, approximate="tanh"))
    points = random_covariances(seed=6)
    assert all(torch.equal(a, b) for a, b in zip(exact.kernel_map(*points, True),
                                                  approximate.kernel_map(*points, True)))


def test_hyperparameters_may_be_tensors_with_gradients():
    a = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    nngp, _ = stax.Sin(a, 0.9, c).kernel_map(*random_covariances(seed=7), False)
    grad_a, grad_c = torch.autograd.grad(nngp.sum(), (a, c))
    assert torch.isfinite(grad_a) and torch.isfinite(grad_c) and grad_a != 0


def test_hermite_warns_only_for_non_unit_variances():
    layer, cov12 = stax.Hermite(2), torch.tensor([0.3], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.kernel_map(cov12, torch.ones(1, dtype=torch.float64),
                         torch.ones(1, dtype=torch.float64), True)
    with pytest.warns(UserWarning, match="unit variance"):
        layer.kernel_map(cov12, torch.full((1,), 2., dtype=torch.float64),
                         torch.ones(1, dtype=torch.float64), True)


def test_exp_normalized_has_no_finite_network():
    with pytest.raises(ValueError, match="ExpNormalized"):
        stax.ExpNormalized()(torch.zeros(2, 3))


@pytest.mark.parametrize("build, message", [
    (lambda: stax.Monomial(6), "Monomial: degree must be an integer in 0..5"),
    (lambda: stax.Monomial(-1), "Monomial: degree"),
    (lambda: stax.RectifiedMonomial(-2), "RectifiedMonomial: degree"),
    (lambda: stax.Polynomial([]), "Polynomial: coef must be a non-empty"),
    (lambda: stax.Polynomial([1., float("nan")]), r"Polynomial: coef\[1\] must be finite"),
    (lambda: stax.Rbf(-1.), "Rbf: gamma must be finite and >= 0"),
    (lambda: stax.Sin(a=float("inf")), "Sin: a must be finite"),
    (lambda: stax.Gaussian(b=torch.ones(2)), "Gaussian: b must be a scalar"),
    (lambda: stax.ExpNormalized(shift=float("nan")), "ExpNormalized: shift must be finite"),
])
def test_invalid_constructor_arguments_raise_naming_layer_and_argument(build, message):
    with pytest.raises(ValueError, match=message):
        build()
