"""`torchntk.signal`: fixed points, slopes and depth scales of kernel maps; phase diagrams."""

import math

import mpmath
import numpy as np
import pytest
import torch

from torchntk import signal, stax
from torchntk.kernel import kernel_from_inputs
from torchntk.stax.elementwise import Elementwise

Status = signal.Status


def fixed_points(block, W_var, b_var, **kwargs):
    return signal.fixed_points(block, torch.as_tensor(W_var, dtype=torch.float64),
                               torch.as_tensor(b_var, dtype=torch.float64), progress=False,
                               **kwargs)


# --- an independent scalar reference: Gauss–Hermite quadrature of the fully connected maps ---

_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(120)
_WEIGHTS = _WEIGHTS / math.sqrt(2 * math.pi)


def _erf(x):
    return torch.special.erf(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


ACTIVATIONS = {  # φ, φ'
    'erf': (_erf, lambda x: 2 / math.sqrt(math.pi) * np.exp(-x * x)),
    'tanh': (np.tanh, lambda x: 1 / np.cosh(x)**2),
}


def _expectation(f, g, q, c):
    """E[f(u) g(v)] for (u, v) centred Gaussian with variances q, correlation c."""
    if c == 1:
        return float(np.sum(_WEIGHTS * f(math.sqrt(q) * _NODES) * g(math.sqrt(q) * _NODES)))
    z1, z2 = _NODES[:, None], _NODES[None, :]
    u, v = math.sqrt(q) * z1, math.sqrt(q) * (c * z1 + math.sqrt(1 - c * c) * z2)
    return float(np.sum(_WEIGHTS[:, None] * _WEIGHTS[None, :] * f(u) * g(v)))


def _q_star(phi, W_var, b_var, layers):
    q = 1.
    for _ in range(layers):
        q = W_var * _expectation(phi, phi, q, 1.) + b_var
    return q


def reference(activation, W_var, b_var):
    """q*, c*, χ_q, χ₁, χ_c of the pre-activation maps of Schoenholz et al. 2017
    (`q ↦ σ_w² E[φ(√q z)²] + σ_b²`): q* by iteration of the scalar map, c* = 1
    in the ordered phase, else by bisection of `C(c) − c` on [0, 1)."""
    phi, dphi = ACTIVATIONS[activation]
    q = _q_star(phi, W_var, b_var, 2000)
    # d/dq E[φ(√q z)²] = E[φ(√q z) φ'(√q z) z] / √q by Gaussian integration by parts.
    z = math.sqrt(q) * _NODES
    chi_q = W_var * float(np.sum(_WEIGHTS * phi(z) * dphi(z) * _NODES)) / math.sqrt(q)
    chi_1 = W_var * _expectation(dphi, dphi, q, 1.)
    c = 1.
    if chi_1 > 1:
        low, high = 0., 1 - 1e-6
        for _ in range(45):
            c = (low + high) / 2
            low, high = (c, high) if W_var * _expectation(phi, phi, q, c) + b_var > c * q \
                else (low, c)
    chi_c = W_var * _expectation(dphi, dphi, q, c)
    return dict(q_star=q, c_star=c, chi_q=chi_q, chi_1=chi_1, chi_c=chi_c)


def critical_W_var(activation, b_var):
    """σ_w² with χ₁ = σ_w² E[φ'(√q* z)²] = 1 at this σ_b², by bisection."""
    phi, dphi = ACTIVATIONS[activation]
    low, high = 0.5, 4.
    for _ in range(45):
        middle = (low + high) / 2
        q = _q_star(phi, middle, b_var, 500)
        low, high = (middle, high) if middle * _expectation(dphi, dphi, q, 1.) < 1 \
            else (low, middle)
    return (low + high) / 2


# --- fully connected networks against the quadrature reference ---

@pytest.mark.parametrize('W_var, b_var', [(1.5, 0.05), (2.5, 0.05), (1.2, 0.2), (3.5, 0.3)])
def test_erf_network_matches_gauss_hermite_reference(W_var, b_var):
    res = fixed_points(stax.serial(stax.Erf(), stax.Dense(1)), W_var, b_var)
    expected = reference('erf', W_var, b_var)
    assert res.status.item() == Status.FINITE
    for name, value in expected.items():
        assert getattr(res, name).item() == pytest.approx(value, rel=1e-9, abs=1e-9), name
    assert res.depth_scale.item() == pytest.approx(-1 / math.log(expected['chi_c']), rel=1e-8)
    assert res.depth_scale_q.item() == pytest.approx(-1 / math.log(expected['chi_q']), rel=1e-8)


# --- q* to full precision: mpmath at 50 digits, for the binary W_var, b_var given ---

def _mp_erf_variance(v):
    """E[erf(u)²] for u ~ N(0, v)."""
    return 2 / mpmath.pi * mpmath.asin(2 * v / (1 + 2 * v))


def _mp_post_activation_fixed_point(variance, W_var, b_var):
    """The q > 0 with `q = variance(W_var·q + b_var)` (the map of `serial(Dense, φ)`,
    |φ| < 1), by bisection of log q between a point where the map rises above q
    (`V(0) > 0`, or 1e-6 without bias) and 1: 200 halvings, every digit of float64."""
    with mpmath.workdps(50):
        W, b = mpmath.mpf(W_var), mpmath.mpf(b_var)
        rises = lambda q: variance(W * q + b) > q
        low, high = (variance(b) if b else mpmath.mpf('1e-6')), mpmath.mpf(1)
        assert rises(low) and not rises(high)
        for _ in range(200):
            middle = mpmath.sqrt(low * high)
            low, high = (middle, high) if rises(middle) else (low, middle)
        return float(low)


@pytest.mark.parametrize('W_var, b_var', [
    (0.78, 1e-6),     # near the critical σ_w² = π/4; q* ≈ 1.78e-4
    (0.5, 1e-14),     # tiny variances: q* ≈ 3.5e-14, not the 0 of a bias-free network
    (0.5, 1e-100),
])
def test_erf_fixed_point_is_exact_for_small_variances(W_var, b_var):
    res = fixed_points(stax.serial(stax.Dense(1), stax.Erf()), W_var, b_var)
    expected = _mp_post_activation_fixed_point(_mp_erf_variance, W_var, b_var)
    assert res.status.item() == Status.FINITE
    assert res.q_star.item() == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize('W_var, b_var', [(3., 10.), (0.5, 1e5), (100., 0.), (1e4, 1e3)])
def test_erf_fixed_point_is_exact_for_large_variances(W_var, b_var):
    res = fixed_points(stax.serial(stax.Dense(1), stax.Erf()), W_var, b_var)
    expected = _mp_post_activation_fixed_point(_mp_erf_variance, W_var, b_var)
    assert res.q_star.item() == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize('layer, slope', [(stax.Relu(), 1 / 2), (stax.LeakyRelu(0.1), 1.01 / 2),
                                          (stax.ABRelu(-0.5, 2.), 4.25 / 2)])
@pytest.mark.parametrize('W_fraction, b_var', [(0.5, 1e-14), (0.5, 1e-100), (0.9995, 1.),
                                               (0.3, 1e8)])
def test_relu_family_fixed_point_is_the_closed_form(layer, slope, W_fraction, b_var):
    """`serial(Dense, φ)` with `φ = a·min(u, 0) + b·max(u, 0)` maps
    `q ↦ s·(σ_w² q + σ_b²)`, `s = (a² + b²)/2`, so `q* = s σ_b² / (1 − s σ_w²)`
    below `σ_w² = 1/s`."""
    W_var = W_fraction / slope
    res = fixed_points(stax.serial(stax.Dense(1), layer), W_var, b_var)
    assert res.status.item() == Status.FINITE
    assert res.q_star.item() == pytest.approx(slope * b_var / (1 - slope * W_var), rel=1e-12, abs=0)


@pytest.mark.parametrize('activation, layer, tolerance', [
    ('erf', stax.Erf(), 1e-9),
    ('tanh', stax.Tanh(), 2e-4),   # stax.Tanh is itself a quadrature (deg 100)
])
def test_critical_line_matches_quadrature(activation, layer, tolerance):
    b_var = torch.tensor([0.01, 0.05, 0.2], dtype=torch.float64)
    W_crit = torch.tensor([critical_W_var(activation, float(b)) for b in b_var],
                          dtype=torch.float64)
    res = fixed_points(stax.serial(layer, stax.Dense(1)), W_crit[:, None], b_var)
    chi_1 = torch.diagonal(res.chi_1[:, 0])
    torch.testing.assert_close(chi_1, torch.ones_like(chi_1), rtol=0, atol=tolerance)


def test_critical_line_interpolates_where_chi_1_crosses_one():
    b_var = [0.05, 0.2, 2.]
    res = fixed_points(stax.serial(stax.Erf(), stax.Dense(1)), torch.linspace(1., 2.5, 31), b_var)
    line = res.critical_line()
    assert line[:2].tolist() == pytest.approx([critical_W_var('erf', b) for b in b_var[:2]],
                                              abs=2e-3)
    assert line[2].isnan()   # beyond the swept σ_w²


def test_tanh_critical_line_passes_published_points():
    # Schoenholz et al. 2017, Fig. 1 (σ_w², σ_b²): the transition starts at
    # (1, 0), where tanh'(0) = 1, and passes σ_w² ≈ 1.76 at σ_b² = 0.05, the
    # critical initialization used in their experiments.
    W_var = torch.linspace(1.7, 1.82, 13)
    res = fixed_points(stax.serial(stax.Tanh(), stax.Dense(1)), W_var, 0.05)
    crossing = W_var[torch.nonzero(res.chi_1 > 1)[0]].item()
    assert crossing == pytest.approx(1.76, abs=0.015)
    at_origin = fixed_points(stax.serial(stax.Tanh(), stax.Dense(1)), [0.9, 1.1], 0.)
    assert at_origin.chi_1.tolist() == pytest.approx(
        [0.9, reference('tanh', 1.1, 0.)['chi_1']], abs=1e-5)
    assert at_origin.ordered.tolist() == [True, False]


def test_pre_and_post_activation_blocks_share_slopes_and_depth_scales():
    # serial(φ, Dense) and serial(Dense, φ) are conjugate maps: different q*,
    # the same Jacobian spectra.
    W_var, b_var = [0.7, 1.5, 2.5, 3.5], [0., 0.05, 0.4]
    pre = fixed_points(stax.serial(stax.Erf(), stax.Dense(1)), W_var, b_var)
    post = fixed_points(stax.serial(stax.Dense(1), stax.Erf()), W_var, b_var)
    for name in ('chi_q', 'chi_1', 'chi_c'):
        torch.testing.assert_close(getattr(post, name), getattr(pre, name), rtol=1e-9, atol=1e-9,
                                   equal_nan=True)
    # q*_pre = σ_w² q*_post + σ_b².
    W_var, b_var = torch.tensor(W_var, dtype=torch.float64), torch.tensor(b_var, dtype=torch.float64)
    torch.testing.assert_close(pre.q_star, W_var[:, None] * post.q_star + b_var,
                               rtol=1e-10, atol=1e-12)


def test_results_are_grids_over_W_var_and_b_var():
    W_grid, b_grid = torch.tensor([0.5, 2., 3., 4.]), torch.linspace(0, 0.5, 3)
    res = fixed_points(stax.serial(stax.Dense(1), stax.Erf()), W_grid, b_grid)
    for name in ('q_star', 'c_star', 'chi_q', 'chi_1', 'chi_c', 'status', 'depth_scale'):
        assert getattr(res, name).shape == (4, 3), name
    single = fixed_points(stax.serial(stax.Dense(1), stax.Erf()), 2., b_grid)
    assert single.q_star.shape == (3,)
    torch.testing.assert_close(single.chi_1, res.chi_1[1], rtol=1e-12, atol=0)
    for i, j in ((0, 0), (2, 1), (3, 2)):
        one = fixed_points(stax.serial(stax.Dense(1), stax.Erf()), W_grid[i], b_grid[j])
        assert one.chi_1.item() == pytest.approx(res.chi_1[i, j].item(), rel=1e-12)


def test_grid_is_evaluated_in_one_vectorised_pass(monkeypatch):
    calls = []
    rule = Elementwise.kernel_rule
    monkeypatch.setattr(Elementwise, 'kernel_rule', lambda self, k: calls.append(1) or rule(self, k))
    block = stax.serial(stax.Dense(1), stax.Erf())
    counts = []
    for size in (2, 12):
        calls.clear()
        fixed_points(block, torch.linspace(2., 2.5, size), torch.linspace(0.1, 0.2, size))
        counts.append(len(calls))
    # A finer grid may need a Newton step more for its hardest point, not a
    # pass per point.
    assert counts[1] <= counts[0] + 3 < 12 * 12


def test_float32_sweeps_give_float32_results_close_to_float64():
    block = stax.serial(stax.Dense(1), stax.Erf())
    single = signal.fixed_points(block, torch.linspace(0.5, 4, 5), torch.linspace(0, .5, 4),
                                 progress=False)
    double = fixed_points(block, torch.linspace(0.5, 4, 5), torch.linspace(0, .5, 4))
    assert single.chi_1.dtype == torch.float32
    torch.testing.assert_close(single.chi_1.double(), double.chi_1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single.q_star.double(), double.q_star, rtol=1e-4, atol=1e-4)


# --- convolutional networks (Xiao et al. 2018) ---

@pytest.mark.parametrize('parameterization', ['ntk', 'standard'])
def test_circular_cnn_phase_diagram_equals_fully_connected(parameterization):
    W_var, b_var = [0.7, 1.5, 2.5], [0., 0.05, 0.3]
    fc = fixed_points(stax.serial(stax.Dense(1, parameterization=parameterization), stax.Erf()),
                      W_var, b_var)
    cnn = fixed_points(stax.serial(stax.Conv(1, (3, 3), padding='CIRCULAR',
                                             parameterization=parameterization), stax.Erf()),
                       W_var, b_var, spatial_shape=(5, 6))
    assert cnn.q_star.shape == (3, 3, 5, 6)
    for name in ('q_star', 'c_star'):
        expected = getattr(fc, name)[..., None, None].expand_as(getattr(cnn, name))
        torch.testing.assert_close(getattr(cnn, name), expected, rtol=1e-12, atol=1e-12,
                                   equal_nan=True)
    for name in ('chi_q', 'chi_1', 'chi_c'):
        torch.testing.assert_close(getattr(cnn, name), getattr(fc, name), rtol=1e-12, atol=1e-12,
                                   equal_nan=True)


def test_same_padding_cnn_approaches_fully_connected_away_from_the_border():
    W_var, b_var = [1.2, 1.8, 2.5], [0.05, 0.2]
    fc = fixed_points(stax.serial(stax.Dense(1), stax.Erf()), W_var, b_var)
    gaps = []
    for size in (16, 64):
        cnn = fixed_points(stax.serial(stax.Conv(1, (3,), padding='SAME'), stax.Erf()),
                           W_var, b_var, spatial_shape=(size,))
        assert (cnn.status == Status.FINITE).all()
        # The zero border lowers the variances near the edges only.
        torch.testing.assert_close(cnn.q_star[..., size // 2], fc.q_star, rtol=1e-5, atol=1e-5)
        assert (cnn.q_star[..., 0] < fc.q_star).all()
        gaps.append((cnn.chi_1 - fc.chi_1).abs().max().item())
    assert 1e-4 < gaps[0] < 1e-2 and gaps[1] < 1e-3 and gaps[1] < gaps[0] / 4


def test_one_by_one_convolution_works_and_equals_fully_connected():
    fc = fixed_points(stax.serial(stax.Dense(1), stax.Erf()), [0.7, 2.5], [0., 0.1])
    cnn = fixed_points(stax.serial(stax.Conv(1, (1, 1), padding='SAME'), stax.Erf()),
                       [0.7, 2.5], [0., 0.1], spatial_shape=(3, 3))
    torch.testing.assert_close(cnn.chi_1, fc.chi_1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cnn.c_star[..., 1, 1], fc.c_star, rtol=1e-12, atol=1e-12,
                               equal_nan=True)


def _iterate(block, kernel, depth):
    kernels = [kernel]
    for _ in range(depth):
        kernels.append(block.kernel_fn(kernels[-1]))
    return kernels


def _pair(q0, c0, channels=2):
    """Two inputs of variance q0 per position and correlation c0, `(2, C)`."""
    basis = torch.tensor([[1., 0.], [c0, math.sqrt(1 - c0**2)]], dtype=torch.float64)
    return math.sqrt(channels * q0) * torch.cat([basis, torch.zeros(2, channels - 2)], 1)


@pytest.mark.parametrize('W_var, b_var', [(2.5, 0.05), (1.2, 0.2)])   # chaotic, ordered
def test_iterating_the_block_converges_to_the_fixed_point_at_the_depth_scale(W_var, b_var):
    block = stax.serial(stax.Dense(1, W_std=math.sqrt(W_var), b_std=math.sqrt(b_var)), stax.Erf())
    res = fixed_points(block, W_var, b_var)
    q_star, c_star = res.q_star.item(), res.c_star.item()
    depth = 80
    kernels = _iterate(block, kernel_from_inputs(_pair(0.3, 0.6), None, diagonal_batch=True,
                                                 diagonal_spatial=True, compute_ntk=False), depth)
    q = np.array([k.nngp[0, 0].item() for k in kernels])
    c = np.array([(k.nngp[0, 1] / k.nngp[0, 0].sqrt() / k.nngp[1, 1].sqrt()).item()
                  for k in kernels])
    assert q[-1] == pytest.approx(q_star, abs=1e-12)
    assert c[-1] == pytest.approx(c_star, abs=1e-4)
    # |c_l − c*| ∝ exp(−l/ξ_c) and |q_l − q*| ∝ exp(−l/ξ_q), measured over 20 layers.
    layers = np.arange(40, 60)
    slope_c = np.polyfit(layers, np.log(np.abs(c[layers] - c_star)), 1)[0]
    assert -1 / slope_c == pytest.approx(res.depth_scale.item(), rel=2e-3)
    layers = np.arange(3, 10)
    slope_q = np.polyfit(layers, np.log(np.abs(q[layers] - q_star)), 1)[0]
    assert -1 / slope_q == pytest.approx(res.depth_scale_q.item(), rel=2e-2)


def test_iterating_a_same_padding_cnn_converges_per_position_at_the_depth_scale():
    # The network runs with full spatial covariances, as it would by default;
    # its same-position entries converge to the reported per-position q*, c*.
    W_var, b_var, size = 3.0, 0.1, 10
    block = stax.serial(stax.Conv(1, (3,), padding='SAME', W_std=math.sqrt(W_var),
                                  b_std=math.sqrt(b_var)), stax.Erf())
    res = fixed_points(block, W_var, b_var, spatial_shape=(size,))
    x = torch.randn(2, 4, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kernels = _iterate(block, kernel_from_inputs(x, None, diagonal_batch=True,
                                                 diagonal_spatial=False, compute_ntk=False), 120)
    q = torch.stack([torch.diagonal(k.nngp[0, 0]) for k in kernels])
    c = torch.stack([torch.diagonal(k.nngp[0, 1]) / torch.diagonal(k.nngp[0, 0]).sqrt()
                     / torch.diagonal(k.nngp[1, 1]).sqrt() for k in kernels])
    torch.testing.assert_close(q[-1], res.q_star, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(c[-1], res.c_star, rtol=0, atol=1e-6)
    distance = (c - res.c_star).norm(dim=-1).log().numpy()
    layers = np.arange(30, 60)
    slope = np.polyfit(layers, distance[layers], 1)[0]
    assert -1 / slope == pytest.approx(res.depth_scale.item(), rel=1e-2)


# --- maps without a finite fixed point ---

def test_relu_flags_divergence_and_reports_the_boundary_at_W_var_2():
    W_var = torch.tensor([1., 1.5, 2.5, 3.], dtype=torch.float64)
    b_var = torch.tensor([0., 0.1], dtype=torch.float64)
    res = fixed_points(stax.serial(stax.Dense(1), stax.Relu()), W_var, b_var, max_iter=30)
    W = W_var[:, None].expand(4, 2)
    # K ↦ (σ_w² K + σ_b²)/2: K* = σ_b²/(2 − σ_w²) below σ_w² = 2, none above.
    below = W < 2
    assert (res.status == torch.where(below, Status.FINITE, Status.DIVERGES)).all()
    assert (res.q_diverges == ~below).all()
    torch.testing.assert_close(res.q_star[below], (b_var / (2 - W))[below],
                               rtol=1e-12, atol=1e-12)
    assert res.q_star[~below].isnan().all()
    # χ₁ = σ_w²/2 everywhere; c* = 1, and correlations converge exponentially
    # (χ_c = χ₁) only with a finite q* > 0, otherwise polynomially (χ_c = 1).
    torch.testing.assert_close(res.chi_1, W / 2, rtol=1e-12, atol=0)
    assert (res.ordered == below).all()
    torch.testing.assert_close(res.c_star, torch.ones_like(W), rtol=1e-12, atol=0)
    regular = below & (b_var > 0)
    torch.testing.assert_close(res.chi_c, torch.where(regular, W / 2, 1.), rtol=1e-12, atol=1e-12)
    assert torch.isinf(res.depth_scale[~regular]).all()


def test_relu_cnn_boundary_is_where_the_variance_stops_converging():
    res = fixed_points(stax.serial(stax.Conv(1, (3, 3), padding='CIRCULAR'), stax.Relu()),
                       [1.5, 2.5], [0.1], spatial_shape=(4, 4), max_iter=30)
    assert res.status[:, 0].tolist() == [Status.FINITE, Status.DIVERGES]
    torch.testing.assert_close(res.chi_1[:, 0], torch.tensor([0.75, 1.25], dtype=torch.float64))


def test_exp_network_has_a_fixed_point_only_for_small_weights():
    # K ↦ exp(2(σ_w² K + σ_b²)) has a finite fixed point iff 2σ_w²·e^{1 + 2σ_b²} ≤ 1.
    W_var, b_var = [0.05, 0.1, 0.2, 1.], [0., 0.1]
    res = fixed_points(stax.serial(stax.Dense(1), stax.Exp()), W_var, b_var)
    for i, W in enumerate(W_var):
        for j, b in enumerate(b_var):
            if 2 * W * math.exp(1 + 2 * b) <= 1:
                K = 1.                 # the stable root, by iteration of the scalar map
                for _ in range(2000):
                    K = math.exp(2 * (W * K + b))
                assert res.status[i, j] == Status.FINITE
                assert res.q_star[i, j].item() == pytest.approx(K, rel=1e-10)
            else:
                assert res.status[i, j] == Status.DIVERGES
                for name in ('q_star', 'c_star', 'chi_1', 'chi_c', 'depth_scale'):
                    assert getattr(res, name)[i, j].isnan(), name


def test_plain_residual_block_diverges_and_layer_norm_restores_a_fixed_point():
    def residual(*after):   # on inputs of 2 channels
        return stax.serial(stax.FanOut(2), stax.parallel(
            stax.serial(stax.Dense(3), stax.Erf(), stax.Dense(2)), stax.Identity()),
            stax.FanInSum(), *after)
    W_var, b_var = [0.8, 2.5], [0.05]
    plain = fixed_points(residual(), W_var, b_var, max_iter=30)
    assert (plain.status == Status.DIVERGES).all()
    normalized = residual(stax.LayerNorm())
    res = fixed_points(normalized, W_var, b_var)
    assert (res.status == Status.FINITE).all()
    torch.testing.assert_close(res.q_star, torch.ones_like(res.q_star), rtol=1e-12, atol=0)
    # The reported fixed point is one of the block's own kernel rule, applied
    # to Gaussian inputs of that covariance (the state of the mean-field map).
    for i, W in enumerate(W_var):
        block = residual(stax.LayerNorm())
        for layer in block.modules():
            if isinstance(layer, stax.Dense):
                layer.W_std, layer.b_std = math.sqrt(W), math.sqrt(b_var[0])
        inputs = kernel_from_inputs(_pair(1., res.c_star[i, 0].item()), None,
                                    diagonal_batch=True, diagonal_spatial=True, compute_ntk=False)
        kernel = block.propagate(inputs.replace(is_gaussian=True)).nngp
        assert kernel[0, 1].item() == pytest.approx(res.c_star[i, 0].item(), abs=1e-12)


def test_blocks_with_pooling_use_full_spatial_covariances():
    block = stax.serial(stax.Conv(1, (3,), padding='CIRCULAR'), stax.Erf(),
                        stax.AvgPool((3,), strides=(1,), padding='SAME'))
    res = fixed_points(block, [2.5], [0.1], spatial_shape=(5,))
    assert not res.diagonal_spatial and res.q_star.shape == (1, 1, 5, 5)
    assert res.status.item() == Status.FINITE
    # Fixed point of the block's own kernel rule on two inputs with that covariance.
    q, c = res.q_star[0, 0], res.c_star[0, 0]
    q12 = c * torch.sqrt(torch.diagonal(q)[:, None] * torch.diagonal(q)[None, :])
    joint = torch.cat([torch.cat([q, q12], 1), torch.cat([q12.T, q], 1)])
    values, vectors = torch.linalg.eigh(joint)
    x = (vectors * values.clamp_min(0).sqrt()).T.reshape(10, 2, 5).permute(1, 0, 2) * math.sqrt(10)
    for layer in block.modules():
        if isinstance(layer, stax.Conv):
            layer.W_std, layer.b_std = math.sqrt(2.5), math.sqrt(0.1)
    kernel = block.kernel_fn(x, get='nngp')
    torch.testing.assert_close(kernel[0, 0], q, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(kernel[0, 1], q12, rtol=1e-10, atol=1e-10)


def test_full_spatial_layout_keeps_the_same_position_fixed_point():
    # Same-position covariances evolve on their own (Xiao et al. 2018), so the
    # full layout has the diagonal layout's q* and c* on its diagonal; a run of
    # Conv and Relu layers goes through the fused extension chain outside the
    # vectorised solve and layer by layer inside it.
    block = stax.serial(stax.Conv(1, (3,), padding='SAME'), stax.Relu(),
                        stax.Conv(1, (3,), padding='SAME'), stax.Erf())
    full = fixed_points(block, [1.5, 3.], [0.1], spatial_shape=(4,), diagonal_spatial=False)
    diagonal = fixed_points(block, [1.5, 3.], [0.1], spatial_shape=(4,))
    assert full.q_star.shape == (2, 1, 4, 4) and diagonal.q_star.shape == (2, 1, 4)
    for name in ('q_star', 'c_star'):
        torch.testing.assert_close(torch.diagonal(getattr(full, name), dim1=-2, dim2=-1),
                                   getattr(diagonal, name), rtol=1e-10, atol=1e-10)


# --- gradients ---

def _outputs(block, **kwargs):
    def fn(W_var, b_var):
        res = signal.fixed_points(block, W_var, b_var, progress=False, **kwargs)
        return res.q_star, res.c_star, res.chi_q, res.chi_1, res.chi_c
    return fn


@pytest.mark.parametrize('block, kwargs', [
    (stax.serial(stax.Dense(1), stax.Erf()), {}),
    (stax.serial(stax.Conv(1, (3,), padding='SAME'), stax.Erf()), {'spatial_shape': (4,)}),
])
def test_gradients_with_respect_to_the_variances_match_finite_differences(block, kwargs):
    # Ordered and chaotic points.
    W_var = torch.tensor([1.2, 2.5], dtype=torch.float64, requires_grad=True)
    b_var = torch.tensor([0.05, 0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_outputs(block, **kwargs), (W_var, b_var), atol=1e-6,
                                    rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize('W_var', [0.6, 2.5])   # q* = 0 and q* > 0
def test_gradients_at_zero_bias_are_finite_and_one_sided(W_var):
    block = stax.serial(stax.Dense(1), stax.Erf())
    W = torch.tensor([W_var], dtype=torch.float64)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    res = signal.fixed_points(block, W, b, progress=False)
    outputs = [res.q_star, res.chi_q, res.chi_1]
    grads = [torch.autograd.grad(out.sum(), b, retain_graph=True)[0].item() for out in outputs]
    h = 1e-6
    shifted = [signal.fixed_points(block, W, torch.tensor([step], dtype=torch.float64),
                                   progress=False) for step in (h, 2 * h)]
    for index, grad in enumerate(grads):
        values = [outputs[index].item()] + [
            (s.q_star, s.chi_q, s.chi_1)[index].item() for s in shifted]
        forward_difference = (-3 * values[0] + 4 * values[1] - values[2]) / (2 * h)
        assert math.isfinite(grad) and grad == pytest.approx(forward_difference, rel=1e-4)


# --- arguments ---

def test_bad_arguments_raise_clear_errors():
    block = stax.serial(stax.Dense(1), stax.Erf())
    with pytest.raises(ValueError, match='W_var must be finite and >= 0'):
        fixed_points(block, [-1., 1.], 0.)
    with pytest.raises(TypeError, match='b_var must be a float or a tensor'):
        signal.fixed_points(block, 1., 'zero')
    with pytest.raises(ValueError, match='no affine layer'):
        fixed_points(stax.serial(stax.Erf()), 1., 0.)
    with pytest.raises(ValueError, match='must keep the kernel'):
        fixed_points(stax.serial(stax.Conv(1, (3, 3)), stax.Erf()), 1., 0.)
    with pytest.raises(ValueError, match='not one kernel'):
        fixed_points(stax.serial(stax.Dense(1), stax.FanOut(2)), 1., 0.)
    with pytest.raises(ValueError, match='diagonal_spatial=True is not possible'):
        fixed_points(stax.serial(stax.Conv(1, (3,), padding='SAME'), stax.Erf(),
                                 stax.AvgPool((3,), padding='SAME')), 1., 0.,
                     diagonal_spatial=True)
    with pytest.raises(ValueError, match='q0 must be'):
        fixed_points(block, 1., 0., q0=0.)
    with pytest.raises(TypeError, match='torchntk layer'):
        fixed_points(torch.nn.Linear(2, 2), 1., 0.)


ERF_BLOCK = stax.serial(stax.Dense(1), stax.Erf())
CONV_1D_BLOCK = stax.serial(stax.Conv(1, (3,), padding='SAME'), stax.Erf())


@pytest.mark.parametrize('call, error, message', [
    (lambda: signal.fixed_points(ERF_BLOCK, torch.tensor([1 + 1j]), 0.1), TypeError,
     'fixed_points: W_var must be a real tensor, got torch.complex64'),
    (lambda: signal.fixed_points(ERF_BLOCK, torch.tensor([True]), 0.1), TypeError,
     'fixed_points: W_var must be a real tensor, got torch.bool'),
    (lambda: signal.fixed_points(ERF_BLOCK, 1., torch.tensor(0.1, device='meta')), ValueError,
     'fixed_points: b_var is on the meta device'),
    (lambda: signal.fixed_points(ERF_BLOCK, 1e300, 0.1), ValueError,
     r'fixed_points: W_var=1e\+300 overflows torch.float32 \(the default dtype\)'),
    (lambda: signal.fixed_points(ERF_BLOCK, 1., 0.1, q0='1'), TypeError,
     'fixed_points: q0 must be a float or a scalar tensor, got str'),
    (lambda: signal.fixed_points(ERF_BLOCK, 1., 0.1, max_iter=10.), TypeError,
     r'fixed_points: max_iter must be a positive integer, got 10.0 \(float\)'),
    (lambda: signal.fixed_points(ERF_BLOCK, 1., 0.1, max_iter=None), TypeError,
     r'fixed_points: max_iter must be a positive integer, got None \(NoneType\)'),
    (lambda: signal.fixed_points(ERF_BLOCK, 1., 0.1, diagonal_spatial='no'), TypeError,
     "fixed_points: diagonal_spatial must be True, False or None, got 'no'"),
    (lambda: signal.fixed_points(ERF_BLOCK, 1., 0.1, progress='no'), TypeError,
     "fixed_points: progress must be True or False, got 'no'"),
    (lambda: signal.fixed_points(CONV_1D_BLOCK, 1., 0.1, spatial_shape=5), TypeError,
     'fixed_points: spatial_shape must be a sequence of ints, got 5'),
    (lambda: signal.fixed_points(CONV_1D_BLOCK, 1., 0.1, spatial_shape=(5.,)), TypeError,
     r'fixed_points: spatial_shape\[0\] must be a positive integer, got 5.0 \(float\)'),
    (lambda: signal.fixed_points(CONV_1D_BLOCK, 1., 0.1, spatial_shape=(0,)), ValueError,
     r'fixed_points: spatial_shape\[0\] must be a positive integer, got 0'),
    (lambda: signal.fixed_points(CONV_1D_BLOCK, 1., 0.1, spatial_shape=(5, 5)), ValueError,
     r"fixed_points: spatial_shape=\(5, 5\) has 2 dimensions but the block's convolutions "
     r"have \[1\]"),
    (lambda: signal.phase_diagram('result'), TypeError,
     'phase_diagram: result must be the FixedPoints of fixed_points, got str'),
    (lambda: signal.phase_diagram(fixed_points(ERF_BLOCK, [1., 2.], [0.1, 0.2]), title=3),
     TypeError, 'phase_diagram: title must be a string, got int'),
])
def test_bad_inputs_raise_errors_naming_function_argument_and_value(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_the_block_passed_in_is_not_modified():
    conv = stax.Conv(1, (3,), padding='SAME', W_std=1.3, b_std=None)
    fixed_points(stax.serial(conv, stax.Erf()), [1., 2.], [0.1])
    assert (conv.W_std, conv.b_std) == (1.3, None)


# --- the figure ---

def test_phase_diagram_draws_three_panels_with_the_critical_line():
    pytest.importorskip('matplotlib')
    res = fixed_points(stax.serial(stax.Dense(1), stax.Relu()), torch.linspace(1, 3, 5),
                       torch.linspace(0, 0.2, 3), max_iter=30)
    fig = signal.phase_diagram(res, title='ReLU')
    assert len(fig.axes) == 6   # three panels and their colour bars
    with pytest.raises(ValueError, match='1-D W_var and b_var'):
        signal.phase_diagram(fixed_points(stax.serial(stax.Dense(1), stax.Relu()), 1., 0.))
