"""Nonlinearities inside networks: exact identities between them, agreement with
quadrature of their own finite function, and convergence of finite networks
to the analytic kernels (property tests over random architectures).

Finite-width fluctuations of the empirical NTK and of the Monte Carlo NNGP
are O(1/sqrt(width)) (Jacot et al. 2018; Hanin & Nica 2019), so tolerances are
`width_tolerance(width, CONSTANT, depth)`; the constant was calibrated on a few
hundred random architectures (errors at most ~0.4 of the tolerance), so that
random examples of the 'dev' profile do not fail by chance.
"""

import pytest
import torch
from hypothesis import given, settings

import torchntk
from torchntk import stax

from tests.strategies import (KERNEL_ONLY, UNIT_VARIANCE, Architecture, Nonlinearity,
                              all_nonlinearities, architectures, average_over_inits, gaussian,
                              inputs, relative_error, width_tolerance)

CONSTANT = 8.
# Heavy-tailed φ (polynomials, Exp; `Nonlinearity.tame` false) fluctuate more.
HEAVY_TAIL_FACTOR = 2.
# Hidden widths by depth: depth-1 networks are cheap (width·C parameters), deep
# ones cost width² per layer.
WIDTHS = {1: 32768, 2: 2048, 3: 1024, 4: 1024}
NTK_SEEDS = 2
NNGP_READOUT, NNGP_SEEDS = 1024, 4
# The Monte Carlo NNGP's accuracy is bounded by the readout width: hidden layers
# wider than twice that only cost time.
NNGP_WIDTHS = {depth: min(width, 2 * NNGP_READOUT) for depth, width in WIDTHS.items()}
# The property tests build wide networks: keep the number of examples small.
PROPERTY_EXAMPLES = min(settings().max_examples, 6)


def with_dense(phi, W_std=1.3, b_std=0.2):
    """`Dense → φ → Dense(1)`: φ's kernel on a generic Gaussian input kernel."""
    return stax.serial(stax.Dense(8, W_std=W_std, b_std=b_std), phi,
                       stax.Dense(1, W_std=0.9, b_std=0.1))


def assert_kernels_close(actual, expected, rtol=1e-13, atol=1e-13):
    for name in ('nngp', 'ntk', 'cov1', 'cov2'):
        a, e = getattr(actual, name), getattr(expected, name)
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# --- exact identities -------------------------------------------------------------------------

def arc_cosine_kernels(pre, a, b):
    """Kernels of `φ(u) = a·min(u, 0) + b·max(u, 0)` after the Gaussian layer
    `pre`, written out from Cho & Saul (2009): with `θ` the angle between the
    pre-activations and `s = sqrt(var1·var2 − cov12²)`, `φ = b·relu(u) −
    a·relu(−u)`, `E[relu(u)relu(v)] = (s + (π − θ)·cov12)/2π`, `E[relu(u)relu(−v)]
    = (s − θ·cov12)/2π`, and `P(u > 0, v > 0) = (π − θ)/2π`."""
    var1, var2 = pre.cov1[:, None], pre.cov2[None, :]
    s = torch.sqrt(torch.clamp(var1 * var2 - pre.nngp**2, min=0))
    theta = torch.atan2(s, pre.nngp)
    nngp = ((a**2 + b**2) * (s + (torch.pi - theta) * pre.nngp)
            - 2 * a * b * (s - theta * pre.nngp)) / (2 * torch.pi)
    d_nngp = ((a**2 + b**2) * (torch.pi - theta) + 2 * a * b * theta) / (2 * torch.pi)
    return nngp, d_nngp * pre.ntk, (a**2 + b**2) * pre.cov1 / 2, (a**2 + b**2) * pre.cov2 / 2


@pytest.mark.parametrize('phi, a, b', [
    (stax.Relu(), 0., 1.), (stax.LeakyRelu(0.1), 0.1, 1.), (stax.LeakyRelu(-0.3), -0.3, 1.),
    (stax.Abs(), -1., 1.), (stax.ABRelu(-0.4, 1.3), -0.4, 1.3), (stax.ABRelu(0.7, 0.2), 0.7, 0.2)],
    ids=['Relu', 'LeakyRelu(0.1)', 'LeakyRelu(-0.3)', 'Abs', 'ABRelu(-0.4, 1.3)', 'ABRelu(0.7, 0.2)'])
def test_relu_family_kernels_are_the_arc_cosine_closed_form(x1, x2, phi, a, b):
    dense = stax.Dense(8, W_std=1.3, b_std=0.2)
    kernel = stax.serial(dense, phi).kernel_fn(x1, x2)
    expected = arc_cosine_kernels(dense.kernel_fn(x1, x2), a, b)
    for name, value in zip(('nngp', 'ntk', 'cov1', 'cov2'), expected):
        torch.testing.assert_close(getattr(kernel, name), value, rtol=1e-12, atol=1e-14,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize('a', [-1.3, 0.5, 2.])
def test_abrelu_a_a_is_linear_with_slope_a(x1, x2, a):
    # φ(x) = a·x scales the nngp and the ntk of its input by a².
    before = stax.Dense(8, W_std=1.3, b_std=0.2)
    after = stax.serial(stax.Dense(8, W_std=1.3, b_std=0.2), stax.ABRelu(a, a))
    k_before, k_after = before.kernel_fn(x1, x2), after.kernel_fn(x1, x2)
    for name in ('nngp', 'ntk', 'cov1', 'cov2'):
        torch.testing.assert_close(getattr(k_after, name), a**2 * getattr(k_before, name),
                                   rtol=1e-13, atol=1e-13)


def test_abrelu_a_a_network_equals_network_with_scaled_weights(x1, x2):
    linear = stax.serial(stax.Dense(8, W_std=1.3, b_std=0.2), stax.ABRelu(-0.7, -0.7),
                         stax.Dense(1, W_std=1.5, b_std=0.4))
    scaled = stax.serial(stax.Dense(8, W_std=1.3, b_std=0.2), stax.Dense(1, W_std=1.5 * 0.7,
                                                                         b_std=0.4))
    assert_kernels_close(linear.kernel_fn(x1, x2), scaled.kernel_fn(x1, x2))


def test_abs_kernels_are_four_relu_kernels_minus_linear(x1, x2):
    # |x| = 2·relu(x) − x, and relu(x)·x is half of x·x in expectation, so
    # E|u||v| = 4·E[relu(u)relu(v)] − E[uv]; likewise for E[φ'φ'] and hence the NTK.
    pre = stax.Dense(8, W_std=1.3, b_std=0.2).kernel_fn(x1, x2)
    relu = stax.serial(stax.Dense(8, W_std=1.3, b_std=0.2), stax.Relu()).kernel_fn(x1, x2)
    abs_ = stax.serial(stax.Dense(8, W_std=1.3, b_std=0.2), stax.Abs()).kernel_fn(x1, x2)
    torch.testing.assert_close(abs_.nngp, 4 * relu.nngp - pre.nngp, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(abs_.ntk, 4 * relu.ntk - pre.ntk, rtol=1e-13, atol=1e-13)


def test_relu_of_inputs_with_itself_is_half_the_variance(x1):
    # E[relu(u)²] = var/2, and the diagonal of E[relu'(u)²] is 1/2.
    pre = stax.Dense(8, W_std=1.3, b_std=0.2).kernel_fn(x1)
    relu = stax.serial(stax.Dense(8, W_std=1.3, b_std=0.2), stax.Relu()).kernel_fn(x1)
    torch.testing.assert_close(relu.cov1, pre.cov1 / 2, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(relu.nngp.diagonal(), pre.cov1 / 2, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(relu.ntk.diagonal(), pre.ntk.diagonal() / 2, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize('phi', [lambda s: stax.Relu(do_stabilize=s),
                                 lambda s: stax.ABRelu(-0.4, 1.3, do_stabilize=s),
                                 lambda s: stax.Abs(do_stabilize=s)], ids=['Relu', 'ABRelu', 'Abs'])
def test_abrelu_stabilization_does_not_change_kernels(x1, x2, phi):
    assert_kernels_close(with_dense(phi(True)).kernel_fn(x1, x2),
                         with_dense(phi(False)).kernel_fn(x1, x2), rtol=1e-14, atol=1e-14)


def test_abrelu_stabilization_keeps_huge_kernels_finite(x1, x2):
    # Variances ~(W_std²/2)^depth = 50^150 ≈ 1e255: var1·var2 overflows without rescaling.
    model = stax.serial(*[layer for _ in range(150)
                          for layer in (stax.Dense(8, W_std=10.), stax.Relu(do_stabilize=True))],
                        stax.Dense(1))
    kernel = model.kernel_fn(x1, x2)
    for name in ('nngp', 'ntk', 'cov1', 'cov2'):
        assert torch.isfinite(getattr(kernel, name)).all(), name
    assert kernel.nngp.min() > 1e250


def test_sigmoid_like_kernels_are_williams_arcsine_formula(x1, x2):
    # φ(u) = a·erf(b·u) + c (a = c = 1/2, b = 1/2.4020563531719796), Williams (1997):
    # E[φφ] = a²·(2/π)·asin(2b²·cov12 / sqrt((1 + 2b²var1)(1 + 2b²var2))) + c², and
    # E[φ'φ'] = a²·(4b²/π) / sqrt((1 + 2b²var1)(1 + 2b²var2) − 4b⁴cov12²).
    a, b, c = 0.5, 1 / 2.4020563531719796, 0.5
    dense = stax.Dense(8, W_std=1.3, b_std=0.2)
    kernel = stax.serial(dense, stax.Sigmoid_like()).kernel_fn(x1, x2)
    pre = dense.kernel_fn(x1, x2)
    product = (1 + 2 * b**2 * pre.cov1[:, None]) * (1 + 2 * b**2 * pre.cov2[None, :])
    nngp = a**2 * 2 / torch.pi * torch.asin(2 * b**2 * pre.nngp / torch.sqrt(product)) + c**2
    d_nngp = a**2 * 4 * b**2 / torch.pi / torch.sqrt(product - 4 * b**4 * pre.nngp**2)
    torch.testing.assert_close(kernel.nngp, nngp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kernel.ntk, d_nngp * pre.ntk, rtol=1e-12, atol=1e-14)


def test_sigmoid_like_forward_is_within_a_hundredth_of_the_logistic_sigmoid():
    x = torch.linspace(-20, 20, 4001, dtype=torch.float64)
    assert (stax.Sigmoid_like()(x) - torch.sigmoid(x)).abs().max() < 0.01


def test_rectified_monomial_of_degree_one_is_relu(x1, x2):
    assert_kernels_close(with_dense(stax.RectifiedMonomial(1)).kernel_fn(x1, x2),
                         with_dense(stax.Relu()).kernel_fn(x1, x2))


def test_monomial_of_degree_one_is_identity(x1, x2):
    assert_kernels_close(with_dense(stax.Monomial(1)).kernel_fn(x1, x2),
                         with_dense(stax.ABRelu(1., 1.)).kernel_fn(x1, x2))


def test_elementwise_with_autodiff_ntk_matches_closed_form(x1, x2):
    # Only the nngp map is given: the NTK's E[φ'φ'] = ∂nngp/∂cov12 comes from autograd.
    from torchntk.functional import elementwise as maps
    custom = stax.Elementwise(torch.special.erf,
                              lambda c, v1, v2: maps.erf(c, v1, v2, 1., 1., 0., False)[0])
    assert_kernels_close(with_dense(custom).kernel_fn(x1, x2),
                         with_dense(stax.Erf()).kernel_fn(x1, x2))


def test_elementwise_numerical_erf_matches_closed_form(x1, x2):
    numerical = stax.ElementwiseNumerical(torch.special.erf, deg=200)  # variances up to ~5
    assert_kernels_close(with_dense(numerical).kernel_fn(x1, x2),
                         with_dense(stax.Erf()).kernel_fn(x1, x2), rtol=1e-8, atol=1e-8)


def test_sign_nngp_is_limit_of_steep_erf(x1, x2):
    # erf(b·x) → sign(x) as b → ∞; the nngp converges at rate 1/(b²·var).
    steep = with_dense(stax.Erf(a=1., b=1e4, c=0.)).kernel_fn(x1, x2, get='nngp')
    torch.testing.assert_close(with_dense(stax.Sign()).kernel_fn(x1, x2, get='nngp'), steep,
                               rtol=1e-6, atol=1e-6)


def test_sign_ntk_has_no_contribution_from_before_sign(x1, x2):
    # sign' = 0 almost everywhere: only the readout's own term remains, ntk = nngp.
    kernel = with_dense(stax.Sign()).kernel_fn(x1, x2)
    torch.testing.assert_close(kernel.ntk, kernel.nngp, rtol=1e-14, atol=1e-14)


# Kinks make Gauss–Hermite quadrature converge slowly (jumps, `Sign`, worse still:
# it is checked against a steep Erf instead).
NON_SMOOTH = {'Relu', 'ABRelu', 'LeakyRelu', 'Abs', 'RectifiedMonomial'}
FINITE = [phi for phi in all_nonlinearities() if phi.name not in KERNEL_ONLY]


@pytest.mark.parametrize('phi', [p for p in FINITE if p.closed_form and p.name != 'Sign'], ids=repr)
def test_closed_form_kernels_match_quadrature_of_forward(phi, x1, x2):
    layer = phi.build()
    # Many nodes: narrow functions (Gabor, Gaussian) at variances ~3 need them.
    numerical = stax.ElementwiseNumerical(layer.forward, deg=150)
    if phi.name in UNIT_VARIANCE:
        model = lambda act: stax.serial(stax.Dense(8, W_std=1.3, b_std=0.2), stax.LayerNorm(), act,
                                        stax.Dense(1))
    else:
        model = with_dense
    closed = model(layer).kernel_fn(x1, x2, get=('nngp', 'ntk'))
    quadrature = model(numerical).kernel_fn(x1, x2, get=('nngp', 'ntk'))
    tolerance = 3e-2 if phi.name in NON_SMOOTH else 1e-7
    assert relative_error(closed.nngp, quadrature.nngp) < tolerance
    assert relative_error(closed.ntk, quadrature.ntk) < tolerance


# --- finite networks converge to the kernels --------------------------------------------------

def constant(architecture: Architecture) -> float:
    return CONSTANT * (1. if architecture.nonlinearity.tame else HEAVY_TAIL_FACTOR)


def empirical_ntk(architecture: Architecture, x: torch.Tensor, width: int, seeds: int):
    model = architecture.build(width, out_dim=1)
    return (average_over_inits(model, torchntk.empirical_ntk_fn, x, seeds),
            model.kernel_fn(x, get='ntk'))


def monte_carlo_nngp(architecture: Architecture, x: torch.Tensor, width: int, readout: int,
                     seeds: int):
    model = architecture.build(width, out_dim=readout)
    return (average_over_inits(model, torchntk.empirical_nngp_fn, x, seeds),
            model.kernel_fn(x, get='nngp'))


@settings(max_examples=PROPERTY_EXAMPLES)
@given(architecture=architectures(), xs=inputs())
def test_empirical_ntk_of_wide_network_approaches_analytic_ntk(architecture, xs):
    x, _ = xs
    width = WIDTHS[architecture.depth]
    empirical, analytic = empirical_ntk(architecture, x, width, NTK_SEEDS)
    tolerance = width_tolerance(width * NTK_SEEDS, constant(architecture), architecture.depth)
    assert relative_error(empirical, analytic) < tolerance


@settings(max_examples=PROPERTY_EXAMPLES)
@given(architecture=architectures(), xs=inputs())
def test_monte_carlo_nngp_of_wide_network_approaches_analytic_nngp(architecture, xs):
    x, _ = xs
    width = NNGP_WIDTHS[architecture.depth]
    monte_carlo, analytic = monte_carlo_nngp(architecture, x, width, NNGP_READOUT, NNGP_SEEDS)
    # The readout's width bounds the accuracy as much as the hidden width.
    tolerance = width_tolerance(min(width, NNGP_READOUT) * NNGP_SEEDS, constant(architecture),
                                architecture.depth)
    assert relative_error(monte_carlo, analytic) < tolerance


@pytest.mark.parametrize('phi', FINITE, ids=repr)
def test_every_nonlinearity_one_hidden_layer_network_converges(phi):
    # Deterministic coverage of every nonlinearity, next to the random architectures.
    W_std = 1.0 if phi.tame else 0.8
    architecture = Architecture(phi, hidden=((W_std, 0.2),), readout=(1.2, 0.1))
    x = gaussian(5, 6, seed=4)
    width = WIDTHS[1]
    ntk, analytic_ntk = empirical_ntk(architecture, x, width, NTK_SEEDS)
    assert relative_error(ntk, analytic_ntk) < width_tolerance(width * NTK_SEEDS,
                                                               constant(architecture))
    nngp, analytic_nngp = monte_carlo_nngp(architecture, x, NNGP_WIDTHS[1], NNGP_READOUT,
                                           NNGP_SEEDS)
    assert relative_error(nngp, analytic_nngp) < width_tolerance(NNGP_READOUT * NNGP_SEEDS,
                                                                 constant(architecture))


@pytest.mark.parametrize('phi', [Nonlinearity('Relu'),
                                 Nonlinearity('Erf', (('a', 1.), ('b', 1.), ('c', 0.2))),
                                 Nonlinearity('Tanh', closed_form=False)], ids=repr)
def test_empirical_ntk_error_shrinks_with_width(phi):
    # 16x wider: the error, averaged over seeds, should shrink ~4x; a wrong analytic
    # kernel would leave it at the size of the mistake.
    architecture = Architecture(phi, hidden=((1.4, 0.2), (1.2, 0.1)), readout=(1.1, 0.3))
    x = gaussian(5, 6, seed=5)

    def mean_error(width):
        errors = []
        for seed in range(3):
            model = architecture.build(width)
            model.init_parameters(x.shape, generator=torch.Generator().manual_seed(seed),
                                  dtype=torch.float64)
            errors.append(relative_error(torchntk.empirical_ntk_fn(model)(x),
                                         model.kernel_fn(x, get='ntk')))
        return sum(errors) / len(errors)

    narrow, wide = mean_error(64), mean_error(1024)
    assert wide < 0.5 * narrow
    assert wide < width_tolerance(1024, CONSTANT, depth=2) / 2


@pytest.mark.parametrize('dtype, rtol', [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_relu_kernel_diagonal_with_x2_none_is_exact(dtype, rtol):
    """An example paired with itself has angle 0 at every ReLU: nngp' = q/2 and
    d_nngp = 1/2 exactly. Rounding the correlation to 1 − ε instead costs the
    NTK ~sqrt(ε) (neural-tangents: 2e-8 in float64, 4e-4 in float32)."""
    W_var, b_var = 2.25, 0.0025
    model = stax.serial(stax.Dense(64, 1.5, 0.05), stax.Relu(), stax.Dense(64, 1.5, 0.05),
                        stax.Relu(), stax.Dense(1, 1.5, 0.05))
    x = torch.randn(200, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kernel = model.kernel_fn(x.to(dtype), None, get=('nngp', 'ntk'))
    nngp = W_var * (x * x).mean(1) + b_var
    ntk = nngp
    for _ in range(2):
        nngp = W_var * nngp / 2 + b_var
        ntk = nngp + W_var * ntk / 2
    torch.testing.assert_close(kernel.nngp.diagonal().double(), nngp, rtol=rtol, atol=0)
    torch.testing.assert_close(kernel.ntk.diagonal().double(), ntk, rtol=rtol, atol=0)
