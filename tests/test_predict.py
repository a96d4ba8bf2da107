"""Tests of torchntk.predict: closed forms against explicit integration and linear algebra."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchntk
from torchntk import predict, stax
from torchntk.predict.layout import kernel_matrix

DTYPE = torch.float64
N_TRAIN, N_TEST, N_OUT = 12, 5, 3


def mse(fx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (fx - y).square().mean()


def cross_entropy(fx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -(y * fx.log_softmax(-1)).sum(-1).mean()


@pytest.fixture(scope='module')
def data() -> dict[str, torch.Tensor]:
    """Analytic NNGP/NTK of a ReLU network on random inputs, with targets and initial outputs."""
    generator = torch.Generator().manual_seed(0)
    x_train = torch.randn(N_TRAIN, 4, generator=generator, dtype=DTYPE)
    x_test = torch.randn(N_TEST, 4, generator=generator, dtype=DTYPE)
    model = stax.serial(stax.Dense(8, W_std=1.5, b_std=0.1), stax.Relu(), stax.Dense(N_OUT))
    get = ('nngp', 'ntk')
    return dict(
        model=model, x_train=x_train, x_test=x_test,
        k_train_train=model.kernel_fn(x_train, None, get=get),
        k_test_train=model.kernel_fn(x_test, x_train, get=get),
        k_test_test=model.kernel_fn(x_test, None, get=get),
        y_train=torch.randn(N_TRAIN, N_OUT, generator=generator, dtype=DTYPE),
        fx_train_0=0.3 * torch.randn(N_TRAIN, N_OUT, generator=generator, dtype=DTYPE),
        fx_test_0=0.3 * torch.randn(N_TEST, N_OUT, generator=generator, dtype=DTYPE),
    )


def mse_gradient(fx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (fx - y) / y.numel()


def cross_entropy_gradient(fx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (fx.softmax(-1) - y) / len(y)


def euler_gradient_descent(k_train: torch.Tensor, k_test: torch.Tensor, y: torch.Tensor,
                           fx_train: torch.Tensor, fx_test: torch.Tensor, gradient,
                           learning_rate: float, checkpoints: list[int]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient descent `f ← f - η Θ ∇_f loss` on (N, N) kernels, outputs at `checkpoints` steps."""
    train, test = [], []
    for step in range(max(checkpoints) + 1):
        if step in checkpoints:
            train.append(fx_train)
            test.append(fx_test)
        direction = gradient(fx_train, y)
        fx_train = fx_train - learning_rate * k_train @ direction
        fx_test = fx_test - learning_rate * k_test @ direction
    return torch.stack(train), torch.stack(test)


def richardson_euler(*args, learning_rate: float, checkpoints: list[int]) -> tuple[torch.Tensor, ...]:
    """Euler at steps `η` and `η/2`, extrapolated to cancel the first-order error: O(η²)."""
    coarse = euler_gradient_descent(*args, learning_rate, checkpoints)
    fine = euler_gradient_descent(*args, learning_rate / 2, [2 * c for c in checkpoints])
    return tuple(2 * f - c for f, c in zip(fine, coarse))


def explicit_mse_flow(k_train: torch.Tensor, k_test: torch.Tensor, y: torch.Tensor,
                      fx_train: torch.Tensor, fx_test: torch.Tensor, time: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient flow on full (N·O, N·O) matrices, by matrix_exp and a dense solve."""
    n = y.numel()
    residual = (fx_train - y).reshape(-1)
    decay = torch.linalg.matrix_exp(-k_train * time / n)
    train = fx_train.reshape(-1) - (torch.eye(n, dtype=DTYPE) - decay) @ residual
    test = fx_test.reshape(-1) - k_test @ torch.linalg.solve(
        k_train, (torch.eye(n, dtype=DTYPE) - decay) @ residual)
    return train.reshape(fx_train.shape), test.reshape(fx_test.shape)


# ---------------------------------------------------------------------------
# gradient_descent_mse


def test_mse_closed_form_matches_euler_gradient_descent(data):
    k_train, k_test = data['k_train_train'].ntk, data['k_test_train'].ntk
    y, n = data['y_train'], data['y_train'].numel()
    learning_rate = 2e-3 * predict.max_learning_rate(k_train, n)
    steps = [0, 100, 500, 2000]
    euler_train, euler_test = richardson_euler(
        k_train, k_test, y, data['fx_train_0'], data['fx_test_0'], mse_gradient,
        learning_rate=learning_rate, checkpoints=steps)
    predict_fn = predict.gradient_descent_mse(k_train, y, learning_rate=learning_rate)
    train, test = predict_fn(torch.tensor(steps, dtype=DTYPE), data['fx_train_0'],
                             data['fx_test_0'], k_test)
    assert train.shape == (len(steps), N_TRAIN, N_OUT) and test.shape == (len(steps), N_TEST, N_OUT)
    torch.testing.assert_close(train, euler_train, rtol=0, atol=1e-6)
    torch.testing.assert_close(test, euler_test, rtol=0, atol=1e-6)
    assert (train[-1] - train[0]).abs().max() > 0.1  # it did train


def test_mse_zipped_kernel_of_coupled_outputs_matches_matrix_exponential():
    generator = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).to(DTYPE)
    x_train = torch.randn(7, 3, generator=generator, dtype=DTYPE)
    x_test = torch.randn(4, 3, generator=generator, dtype=DTYPE)
    ntk_fn = torchntk.empirical_ntk_fn(model, trace_axes=())
    k_train, k_test = ntk_fn(x_train), ntk_fn(x_test, x_train)           # (N, N, 2, 2)
    y = torch.randn(7, 2, generator=generator, dtype=DTYPE)
    with torch.no_grad():
        fx_train, fx_test = model(x_train), model(x_test)
    predict_fn = predict.gradient_descent_mse(k_train, y, learning_rate=0.5, trace_axes=())
    for t in (0.3, 4., 50.):
        train, test = predict_fn(t, fx_train, fx_test, k_test)
        expected = explicit_mse_flow(kernel_matrix(k_train), kernel_matrix(k_test), y,
                                     fx_train, fx_test, 0.5 * t)
        torch.testing.assert_close((train, test), expected, rtol=1e-9, atol=1e-9)


def test_mse_traced_kernel_equals_full_kernel_with_identity_outputs(data):
    k_train, k_test, y = data['k_train_train'].ntk, data['k_test_train'].ntk, data['y_train']
    eye = torch.eye(N_OUT, dtype=DTYPE)
    full = lambda k: torch.einsum('ij,ab->iajb', k, eye).permute(0, 2, 1, 3)   # (N, N, O, O)
    t = torch.tensor([[1., 10.], [100., 1e4]], dtype=DTYPE)
    traced = predict.gradient_descent_mse(k_train, y, diag_reg=1e-3)(
        t, data['fx_train_0'], data['fx_test_0'], k_test)
    zipped = predict.gradient_descent_mse(full(k_train), y, diag_reg=1e-3, trace_axes=())(
        t, data['fx_train_0'], data['fx_test_0'], full(k_test))
    assert traced[0].shape == (2, 2, N_TRAIN, N_OUT)
    torch.testing.assert_close(traced, zipped, rtol=1e-10, atol=1e-12)


def test_mse_trace_axes_move_the_traced_axis_back(data):
    """A traced axis that is not last: y (N, O, 2) traced on axis 1."""
    k_train, k_test = data['k_train_train'].ntk, data['k_test_train'].ntk
    kernel_of_pairs = lambda k: torch.einsum('ij,ab->ijab', k, torch.eye(2, dtype=DTYPE))
    y = data['y_train'].unsqueeze(-1).expand(-1, -1, 2) * torch.tensor([1., -2.], dtype=DTYPE)
    predicted = predict.gradient_descent_mse(kernel_of_pairs(k_train), y, trace_axes=(1,))(
        7., 0., 0., kernel_of_pairs(k_test))
    # Twice as many outputs in the mean loss: time runs at half the speed.
    reference = predict.gradient_descent_mse(k_train, data['y_train'])(3.5, 0., 0., k_test)
    torch.testing.assert_close(predicted[1], reference[1].unsqueeze(-1)
                               * torch.tensor([1., -2.], dtype=DTYPE))


def test_mse_infinite_time_interpolates_and_solves(data):
    k_train, k_test, y = data['k_train_train'].ntk, data['k_test_train'].ntk, data['y_train']
    fx_train_0, fx_test_0 = data['fx_train_0'], data['fx_test_0']
    predict_fn = predict.gradient_descent_mse(k_train, y)
    train, test = predict_fn(None, fx_train_0, fx_test_0, k_test)
    torch.testing.assert_close(train, y)
    torch.testing.assert_close(test, fx_test_0 + k_test @ torch.linalg.solve(k_train, y - fx_train_0))
    train_inf, test_inf = predict_fn(math.inf, fx_train_0, fx_test_0, k_test)
    torch.testing.assert_close((train_inf, test_inf), (train, test), rtol=1e-8, atol=1e-8)
    assert predict_fn(None, None, fx_test_0, k_test).shape == (N_TEST, N_OUT)


def singular_kernels(negative_eigenvalue: float) -> tuple[torch.Tensor, ...]:
    """Rank-3 kernels of 10 train points (one repeated) from 3 features, shifted by `-ε I`."""
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(10, 3, generator=generator, dtype=DTYPE)
    features[9] = features[0]
    test_features = torch.randn(4, 3, generator=generator, dtype=DTYPE)
    k_train = features @ features.T - negative_eigenvalue * torch.eye(10, dtype=DTYPE)
    return k_train, test_features @ features.T, features, test_features


def test_mse_singular_kernel_gives_finite_limits_and_clamps_negative_eigenvalues():
    k_train, k_test, features, test_features = singular_kernels(negative_eigenvalue=1e-9)
    assert torch.linalg.eigvalsh(k_train)[0] < 0
    y = torch.randn(10, 2, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    predict_fn = predict.gradient_descent_mse(k_train, y)
    train, test = predict_fn(torch.tensor([1., 1e3, 1e14, math.inf], dtype=DTYPE), 0., 0., k_test)
    assert torch.isfinite(train).all() and torch.isfinite(test).all()
    # Gradient flow converges to the least-squares fit of the 3 features: linear regression.
    weights = torch.linalg.lstsq(features, y).solution
    torch.testing.assert_close(train[-1], features @ weights, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(test[-1], test_features @ weights, rtol=1e-6, atol=1e-6)
    # A clamped -1e-9 eigenvalue would otherwise grow as e^{1e-9 · 1e14 / n}.
    torch.testing.assert_close(train[-2], train[-1], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match='not positive definite.*diag_reg'):
        predict_fn(None, 0., 0., k_test)
    regularized = predict.gradient_descent_mse(k_train, y, diag_reg=1e-6)(None, 0., 0., k_test)
    assert torch.isfinite(regularized[1]).all()
    torch.testing.assert_close(regularized[1], test[-1], rtol=1e-3, atol=1e-3)


def test_mse_accepts_float32_targets_for_float64_kernel(data):
    predict_fn = predict.gradient_descent_mse(data['k_train_train'].ntk, data['y_train'].float())
    assert predict_fn(1.).dtype == DTYPE


# ---------------------------------------------------------------------------
# gradient_descent (ODE)


def test_ode_with_mse_loss_matches_closed_form(data):
    k_train, k_test, y = data['k_train_train'].ntk, data['k_test_train'].ntk, data['y_train']
    learning_rate = 0.5 * predict.max_learning_rate(k_train, y.numel())
    t = torch.tensor([[30., 0.], [3., 300.]], dtype=DTYPE)  # any order, 0 included
    args = (t, data['fx_train_0'], data['fx_test_0'], k_test)
    ode = predict.gradient_descent(mse, k_train, y, learning_rate, progress=False)(*args)
    closed = predict.gradient_descent_mse(k_train, y, learning_rate)(*args)
    assert ode[0].shape == (2, 2, N_TRAIN, N_OUT)
    torch.testing.assert_close(ode, closed, rtol=1e-6, atol=1e-7)


def test_ode_with_cross_entropy_matches_euler_gradient_descent(data):
    k_train, k_test = data['k_train_train'].ntk, data['k_test_train'].ntk
    labels = torch.nn.functional.one_hot(data['y_train'].argmax(-1), N_OUT).to(DTYPE)
    learning_rate, steps = 4e-3, [0, 250, 1500]
    euler = richardson_euler(k_train, k_test, labels, data['fx_train_0'], data['fx_test_0'],
                             cross_entropy_gradient, learning_rate=learning_rate,
                             checkpoints=steps)
    ode = predict.gradient_descent(cross_entropy, k_train, labels, learning_rate, progress=False)(
        torch.tensor(steps, dtype=DTYPE), data['fx_train_0'], data['fx_test_0'], k_test)
    torch.testing.assert_close(ode, euler, rtol=0, atol=1e-6)
    assert cross_entropy(ode[0][-1], labels) < 0.75 * cross_entropy(ode[0][0], labels)


def test_ode_with_momentum_matches_heavy_ball_iteration(data):
    k_train, k_test, y = data['k_train_train'].ntk, data['k_test_train'].ntk, data['y_train']
    learning_rate, momentum, steps = 1e-3 * predict.max_learning_rate(k_train, y.numel()), 0.9, 2000
    fx_train, fx_test = data['fx_train_0'].clone(), data['fx_test_0'].clone()
    v_train, v_test = torch.zeros_like(fx_train), torch.zeros_like(fx_test)
    for _ in range(steps):
        gradient = (fx_train - y) / y.numel()
        v_train = momentum * v_train - learning_rate * k_train @ gradient
        v_test = momentum * v_test - learning_rate * k_test @ gradient
        fx_train, fx_test = fx_train + v_train, fx_test + v_test
    predict_fn = predict.gradient_descent(mse, k_train, y, learning_rate, momentum, progress=False)
    train, test = predict_fn(float(steps), data['fx_train_0'], data['fx_test_0'], k_test)
    change = (fx_train - data['fx_train_0']).abs().max()
    assert change > 0.1
    # The continuous limit is first order in √η: 1e-4 of the change here.
    torch.testing.assert_close(train, fx_train, rtol=0, atol=1e-3 * change)
    torch.testing.assert_close(test, fx_test, rtol=0, atol=1e-3 * change)


def test_ode_state_resumes_momentum_integration(data):
    k_train, k_test, y = data['k_train_train'].ntk, data['k_test_train'].ntk, data['y_train']
    predict_fn = predict.gradient_descent(mse, k_train, y, 1., momentum=0.5, progress=False)
    start = predict.ODEState(data['fx_train_0'], data['fx_test_0'])
    halfway = predict_fn(20., start, None, k_test)
    assert isinstance(halfway, predict.ODEState) and halfway.qx_test.shape == (N_TEST, N_OUT)
    resumed = predict_fn(20., halfway, None, k_test)
    direct = predict_fn(40., start, None, k_test)
    for field in ('fx_train', 'fx_test', 'qx_train', 'qx_test'):
        torch.testing.assert_close(getattr(resumed, field), getattr(direct, field),
                                   rtol=1e-6, atol=1e-8)


def exact_mse_flow_train(k_train: torch.Tensor, y: torch.Tensor, fx_train: torch.Tensor,
                         time: float, damping: float | None = None) -> torch.Tensor:
    """Training outputs of `f' = -K (f - y)/n` (or, with `damping = d`, of
    `f'' = -K (f - y)/n + d f'` from rest) at absolute time `time`, by one
    matrix exponential of the linear system in `(f - y, f')`."""
    n, N = y.numel(), len(y)
    if damping is None:
        system = -k_train / n
        state = fx_train - y
    else:
        eye, zero = torch.eye(N, dtype=DTYPE), torch.zeros(N, N, dtype=DTYPE)
        system = torch.cat([torch.cat([zero, eye], 1), torch.cat([-k_train / n, damping * eye], 1)])
        state = torch.cat([fx_train - y, torch.zeros_like(y)])
    return y + (torch.linalg.matrix_exp(system * time) @ state)[:N]


@pytest.mark.parametrize('momentum', [None, 0.5])
def test_ode_predicts_the_training_set_alone(data, momentum):
    """The documented default call, `predict_fn(t, fx_train_0)` and `predict_fn(t)`."""
    k_train, y, fx_train_0 = data['k_train_train'].ntk, data['y_train'], data['fx_train_0']
    learning_rate = 0.5 * predict.max_learning_rate(k_train, y.numel())
    predict_fn = predict.gradient_descent(mse, k_train, y, learning_rate, momentum,
                                          progress=False)
    t = torch.tensor([3., 30., 300.], dtype=DTYPE)
    time_scale = learning_rate if momentum is None else math.sqrt(learning_rate)
    damping = None if momentum is None else (momentum - 1) / math.sqrt(learning_rate)
    for start, got in ((fx_train_0, predict_fn(t, fx_train_0)),
                       (torch.zeros_like(y), predict_fn(t))):
        expected = torch.stack([exact_mse_flow_train(k_train, y, start, time_scale * s, damping)
                                for s in t.tolist()])
        assert got.shape == (len(t), N_TRAIN, N_OUT)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
        assert (got[-1] - start).abs().max() > 0.1   # it did train


def test_single_training_example_decays_by_the_scalar_exponential(data):
    """One example: `f(t) = y + e^{-k t/n} (f_0 - y)`, `n` the number of outputs."""
    k, y, fx_0 = data['k_train_train'].ntk[:1, :1], data['y_train'][:1], data['fx_train_0'][:1]
    t = torch.tensor([0.5, 5., 50.], dtype=DTYPE)
    expected = y + torch.exp(-k[0, 0] * t / N_OUT)[:, None, None] * (fx_0 - y)
    closed = predict.gradient_descent_mse(k, y)(t, fx_0)
    ode = predict.gradient_descent(mse, k, y, progress=False)(t, fx_0)
    torch.testing.assert_close(closed, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ode, expected, rtol=1e-7, atol=1e-9)


def test_ode_refuses_infinite_time(data):
    predict_fn = predict.gradient_descent(mse, data['k_train_train'].ntk, data['y_train'])
    with pytest.raises(ValueError, match='gradient_descent: t=None'):
        predict_fn(None)


@pytest.mark.parametrize('t', [math.inf, torch.tensor([1., math.inf], dtype=DTYPE)])
def test_ode_refuses_t_inf_instead_of_integrating_forever(data, t):
    predict_fn = predict.gradient_descent(mse, data['k_train_train'].ntk, data['y_train'],
                                          progress=False)
    with pytest.raises(ValueError, match=r'gradient_descent: times t must be >= 0 and finite, '
                                         r'got inf.*gradient_descent_mse'):
        predict_fn(t, data['fx_train_0'], data['fx_test_0'], data['k_test_train'].ntk)


# ---------------------------------------------------------------------------
# gp_inference and gradient_descent_mse_ensemble


def test_gp_inference_matches_explicit_posteriors(data):
    k_dd, k_td, k_tt, y = (data['k_train_train'], data['k_test_train'], data['k_test_test'],
                           data['y_train'])
    out = predict.gp_inference(k_dd, y)(('nngp', 'ntk', 'ntkgp'), k_td, k_tt)
    for g, kernel in (('nngp', 'nngp'), ('ntkgp', 'ntk')):
        k = getattr(k_dd, kernel)
        torch.testing.assert_close(getattr(out, g).mean, getattr(k_td, kernel) @ torch.linalg.solve(k, y))
        expected = getattr(k_tt, kernel) - getattr(k_td, kernel) @ torch.linalg.solve(
            k, getattr(k_td, kernel).T)
        torch.testing.assert_close(getattr(out, g).covariance, expected)
    theta_inv_theta_dt = torch.linalg.solve(k_dd.ntk, k_td.ntk.T)
    cross = k_td.nngp @ theta_inv_theta_dt
    expected_ntk = (k_tt.nngp + theta_inv_theta_dt.T @ k_dd.nngp @ theta_inv_theta_dt
                    - cross - cross.T)
    torch.testing.assert_close(out.ntk.covariance, expected_ntk)
    train = predict.gp_inference(k_dd, y)('nngp', None, True)
    torch.testing.assert_close(train.mean, y)
    assert (train.covariance == 0).all()


def test_predictions_of_equal_get_have_one_named_tuple_type(data):
    """Two calls with the same `get` return instances of one `Gaussians` class (a class
    made anew per call gave equal results of different types)."""
    gp = predict.gp_inference(data['k_train_train'], data['y_train'])
    ensemble = predict.gradient_descent_mse_ensemble(data['model'].kernel_fn, data['x_train'],
                                                     data['y_train'])
    for predict_fn in (lambda: gp(('nngp', 'ntk'), data['k_test_train']),
                       lambda: ensemble(1., data['x_test'], ('nngp', 'ntk'))):
        first, second = predict_fn(), predict_fn()
        assert type(first).__name__ == 'Gaussians' and type(first)._fields == ('nngp', 'ntk')
        assert type(first) is type(second)


def test_ensemble_mean_equals_gradient_descent_mse_from_zero(data):
    ensemble = predict.gradient_descent_mse_ensemble(data['model'].kernel_fn, data['x_train'],
                                                     data['y_train'], learning_rate=2.)
    t = torch.tensor([0., 5., 50.], dtype=DTYPE)
    means = ensemble(t, data['x_test'])
    for g in ('nngp', 'ntk'):
        train, test = predict.gradient_descent_mse(
            getattr(data['k_train_train'], g), data['y_train'], learning_rate=2.)(
                t, 0., 0., getattr(data['k_test_train'], g))
        torch.testing.assert_close(getattr(means, g), test)
        torch.testing.assert_close(ensemble(t, None, g), train)


def test_ensemble_covariance_is_the_linear_map_of_the_prior(data):
    """`f(t) = f_0 + A f_0 + b` exactly: cov = [I, A] K_joint [I, A]ᵀ for the NTK ensemble."""
    k_dd, k_td, k_tt = data['k_train_train'], data['k_test_train'], data['k_test_test']
    n, t = data['y_train'].numel(), 30.
    ensemble = predict.gradient_descent_mse_ensemble(data['model'].kernel_fn, data['x_train'],
                                                     data['y_train'])
    decay = torch.linalg.matrix_exp(-k_dd.ntk * t / n)
    maps = {'test': torch.cat([-k_td.ntk @ torch.linalg.solve(k_dd.ntk, torch.eye(N_TRAIN, dtype=DTYPE) - decay),
                               torch.eye(N_TEST, dtype=DTYPE)], dim=1),
            'train': torch.cat([decay, torch.zeros(N_TRAIN, N_TEST, dtype=DTYPE)], dim=1)}
    joint = torch.cat([torch.cat([k_dd.nngp, k_td.nngp.T], 1), torch.cat([k_td.nngp, k_tt.nngp], 1)])
    for where, x_test in (('test', data['x_test']), ('train', None)):
        got = ensemble(t, x_test, 'ntk', compute_cov=True).covariance
        torch.testing.assert_close(got, maps[where] @ joint @ maps[where].T, rtol=1e-9, atol=1e-10)


def test_ensemble_covariances_are_symmetric_psd(data):
    ensemble = predict.gradient_descent_mse_ensemble(data['model'].kernel_fn, data['x_train'],
                                                     data['y_train'], diag_reg=1e-4)
    t = torch.tensor([0., 1., 100., 1e5, math.inf], dtype=DTYPE)
    for x_test in (data['x_test'], None):
        for g, gaussian in ensemble(t, x_test, compute_cov=True)._asdict().items():
            covariance = gaussian.covariance
            assert covariance.shape == (len(t),) + (2 * (N_TRAIN if x_test is None else N_TEST,))
            assert torch.equal(covariance, covariance.mT), g
            scale = covariance.diagonal(dim1=-2, dim2=-1).abs().max()
            assert torch.linalg.eigvalsh(covariance).min() > -1e-10 * scale, g


def test_ensemble_nngp_covariance_at_infinite_time_is_the_gp_posterior(data):
    k_dd, k_td, k_tt = data['k_train_train'], data['k_test_train'], data['k_test_test']
    ensemble = predict.gradient_descent_mse_ensemble(data['model'].kernel_fn, data['x_train'],
                                                     data['y_train'])
    posterior = k_tt.nngp - k_td.nngp @ torch.linalg.solve(k_dd.nngp, k_td.nngp.T)
    for t in (math.inf, None):
        gaussian = ensemble(t, data['x_test'], 'nngp', compute_cov=True)
        torch.testing.assert_close(gaussian.covariance, posterior, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(gaussian.mean, k_td.nngp @ torch.linalg.solve(
            k_dd.nngp, data['y_train']), rtol=1e-7, atol=1e-9)
    ntk_inf = ensemble(math.inf, data['x_test'], 'ntk', compute_cov=True)
    ntk_none = ensemble(None, data['x_test'], 'ntk', compute_cov=True)
    torch.testing.assert_close(ntk_inf, ntk_none, rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------------------
# max_learning_rate


def test_max_learning_rate_is_the_stability_edge_of_gradient_descent(data):
    k_train, y = data['k_train_train'].ntk, data['y_train']
    largest = torch.linalg.eigvalsh(k_train)[-1]
    edge = predict.max_learning_rate(k_train, y.numel())
    assert edge == pytest.approx(2 * y.numel() / largest.item())
    assert predict.max_learning_rate(k_train, y.numel(), momentum=0.9) == pytest.approx(1.9 * edge)

    def final_error(learning_rate: float) -> float:
        fx = torch.zeros_like(y)
        for _ in range(300):
            fx = fx - learning_rate * k_train @ (fx - y) / y.numel()
        return (fx - y).abs().max().item()

    assert final_error(0.98 * edge) < 10 and final_error(1.02 * edge) > 1e3


# ---------------------------------------------------------------------------
# weight space


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Conv2d(3, 2, 2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(2 * 3 * 3, 2))


@pytest.mark.parametrize('architecture', ['mlp', 'cnn'])
def test_weight_space_prediction_reproduces_function_space_through_linearize(architecture):
    generator = torch.Generator().manual_seed(4)
    if architecture == 'mlp':
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(),
                              nn.Linear(32, 3)).to(DTYPE)
        x_train, x_test = (torch.randn(n, 5, generator=generator, dtype=DTYPE) for n in (10, 4))
    else:
        torch.manual_seed(4)
        model = small_cnn().to(DTYPE)
        x_train, x_test = (torch.randn(n, 1, 6, 6, generator=generator, dtype=DTYPE) for n in (8, 3))
    params_0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    f_lin = torchntk.linearize(model, params_0)
    with torch.no_grad():
        fx_train_0, fx_test_0 = model(x_train), model(x_test)
    y_train = torch.randn(fx_train_0.shape, generator=generator, dtype=DTYPE)
    ntk_fn = torchntk.empirical_ntk_fn(model, trace_axes=())
    k_train, k_test = ntk_fn(x_train), ntk_fn(x_test, x_train)
    learning_rate = 0.5 * predict.max_learning_rate(k_train)
    function_space = predict.gradient_descent_mse(k_train, y_train, learning_rate, trace_axes=())
    params_fn = predict.gradient_descent_mse_params(model, x_train, y_train, params_0,
                                                    learning_rate)

    t = torch.tensor([0., 1., 30., 1e3, 1e7, math.inf], dtype=DTYPE)
    params_t = params_fn(t)
    assert params_t['0.weight'].shape == (len(t), *params_0['0.weight'].shape)
    train, test = function_space(t, fx_train_0, fx_test_0, k_test)
    with torch.no_grad():
        for i in range(len(t)):
            params = {name: p[i] for name, p in params_t.items()}
            torch.testing.assert_close(f_lin(x_train, params), train[i], rtol=0, atol=1e-12)
            torch.testing.assert_close(f_lin(x_test, params), test[i], rtol=0, atol=1e-12)
        torch.testing.assert_close(train[-1], y_train, rtol=0, atol=1e-9)   # interpolates
        limit = params_fn(None)
        torch.testing.assert_close(f_lin(x_test, limit), function_space(None, fx_train_0, fx_test_0,
                                                                        k_test)[1],
                                   rtol=0, atol=1e-10)
    assert (params_t['0.weight'][-1] - params_0['0.weight']).abs().max() > 1e-3


def test_nonlinear_network_at_predicted_weights_approaches_linear_with_width():
    """Only the linearization follows params_t exactly; the network itself does as width grows."""
    generator = torch.Generator().manual_seed(6)
    x_train, x_test = (torch.randn(n, 4, generator=generator, dtype=DTYPE) for n in (8, 3))
    y_train = torch.randn(8, 2, generator=generator, dtype=DTYPE)
    gaps = []
    for width in (32, 2048):
        model = stax.serial(stax.Dense(width), stax.Erf(), stax.Dense(2))
        model.init_parameters(x_train.shape, generator=torch.Generator().manual_seed(7), dtype=DTYPE)
        params_0 = {name: p.detach().clone() for name, p in model.named_parameters()}
        params_t = predict.gradient_descent_mse_params(model, x_train, y_train, params_0)(100.)
        linear = torchntk.linearize(model, params_0)(x_test, params_t)
        nonlinear = torch.func.functional_call(model, params_t, (x_test,))
        gaps.append((nonlinear - linear).abs().max().item())
    assert gaps[1] < 0.25 * gaps[0], gaps


def test_weight_space_prediction_takes_the_model_parameters_by_default():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(DTYPE)
    x, y = torch.randn(6, 3, dtype=DTYPE), torch.randn(6, 1, dtype=DTYPE)
    params = predict.gradient_descent_mse_params(model, x, y)(0.)
    for name, p in model.named_parameters():
        torch.testing.assert_close(params[name], p.detach(), rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------
# validation


@pytest.mark.parametrize('call, error, message', [
    (lambda k, y: predict.gradient_descent_mse(k, y, learning_rate=-1.), ValueError,
     'gradient_descent_mse: learning_rate must be finite and >= 0'),
    (lambda k, y: predict.gradient_descent_mse(k, y, learning_rate=0.), ValueError,
     'gradient_descent_mse: learning_rate must be > 0'),
    (lambda k, y: predict.gradient_descent_mse(k, y[:5]), ValueError,
     r'gradient_descent_mse: k_train_train must have shape \(5, 5\)'),
    (lambda k, y: predict.gradient_descent_mse(k * math.nan, y), ValueError,
     'k_train_train contains non-finite'),
    (lambda k, y: predict.gradient_descent_mse(k, y, diag_reg=-1.), ValueError, 'diag_reg'),
    (lambda k, y: predict.gradient_descent_mse(k, y, trace_axes=(2,)), ValueError, 'trace_axes'),
    (lambda k, y: predict.gradient_descent_mse(k, y)(-1.), ValueError, 't must be >= 0'),
    (lambda k, y: predict.gradient_descent_mse(k, y)(math.nan), ValueError,
     r't must be >= 0 \(inf allowed\), got NaN'),
    (lambda k, y: predict.gradient_descent_mse(k, y)(1., 0., 0.), ValueError, 'need k_test_train'),
    (lambda k, y: predict.gradient_descent_mse(k, y)(1., None), ValueError, 'both None'),
    (lambda k, y: predict.gradient_descent_mse(k, y)(1., torch.zeros(3, 3)), ValueError,
     'fx_train_0 must broadcast'),
    (lambda k, y: predict.gradient_descent_mse(k, y)(1., 0., 0., k[:, :4]), ValueError,
     r'k_test_train must have shape \(12, 12\)'),
    (lambda k, y: predict.gp_inference(k, y)('nngq', k), ValueError, 'gp_inference: get must be'),
    (lambda k, y: predict.gradient_descent(mse, k, y, momentum=1.5), ValueError, 'momentum'),
    (lambda k, y: predict.max_learning_rate(k, 0), ValueError, 'y_train_size'),
])
def test_errors_name_the_function_and_argument(data, call, error, message):
    with pytest.raises(error, match=message):
        call(data['k_train_train'].ntk, data['y_train'])


def test_kernel_record_passed_as_tensor_says_which_field(data):
    with pytest.raises(TypeError, match=r'pass its \.ntk or \.nngp field'):
        predict.gradient_descent_mse(data['k_train_train'], data['y_train'])


def negated_kernel_fn(model: nn.Module):
    """`model.kernel_fn` with every kernel negated: not positive semi-definite."""
    def kernel_fn(x1, x2=None, get=('nngp', 'ntk'), **kwargs):
        record = model.kernel_fn(x1, x2, get=get, **kwargs)
        return type(record)(*(-k for k in record)) if isinstance(record, tuple) else -record
    return kernel_fn


def shifted_to_indefinite(k: torch.Tensor) -> torch.Tensor:
    """`k - λ_max/2 · I`: half its spectrum below zero."""
    return k - 0.5 * torch.linalg.eigvalsh(k)[-1] * torch.eye(len(k), dtype=k.dtype)


EMPTY_KERNEL, EMPTY_TARGETS = torch.zeros(0, 0, dtype=DTYPE), torch.zeros(0, N_OUT, dtype=DTYPE)


@pytest.mark.parametrize('call, error, message', [
    # kernels that are not kernels: negative, indefinite, asymmetric
    (lambda d: predict.max_learning_rate(-d['k']), ValueError,
     'max_learning_rate: ntk_train_train must be positive semi-definite'),
    (lambda d: predict.max_learning_rate(shifted_to_indefinite(d['k'])), ValueError,
     'max_learning_rate: ntk_train_train must be positive semi-definite'),
    (lambda d: predict.max_learning_rate(d['k'] + torch.triu(d['k'])), ValueError,
     'max_learning_rate: ntk_train_train must be symmetric'),
    (lambda d: predict.gradient_descent_mse(-d['k'], d['y'])(1.), ValueError,
     'gradient_descent_mse: k_train_train must be positive semi-definite'),
    (lambda d: predict.gradient_descent_mse(d['k'] + torch.triu(d['k']), d['y']), ValueError,
     'gradient_descent_mse: k_train_train must be symmetric'),
    (lambda d: predict.gradient_descent(mse, -d['k'], d['y']), ValueError,
     'gradient_descent: k_train_train must be positive semi-definite'),
    (lambda d: predict.gp_inference(-d['k'], d['y'])('nngp', d['k_test']), ValueError,
     r'gp_inference: k_train_train.nngp must be positive semi-definite'),
    (lambda d: predict.gradient_descent_mse_ensemble(negated_kernel_fn(d['model']), d['x_train'],
                                                     d['y'])(1.), ValueError,
     r'gradient_descent_mse_ensemble: kernel_fn\(x_train\).nngp must be positive semi-definite'),
    # training sets without examples
    (lambda d: predict.max_learning_rate(EMPTY_KERNEL), ValueError,
     'max_learning_rate: ntk_train_train must be a square train-train kernel of at least one'),
    (lambda d: predict.gradient_descent_mse(EMPTY_KERNEL, EMPTY_TARGETS)(1.), ValueError,
     'gradient_descent_mse: y_train must have .* at least one training example'),
    (lambda d: predict.gradient_descent(mse, EMPTY_KERNEL, EMPTY_TARGETS, progress=False)(1.),
     ValueError, 'gradient_descent: y_train must have .* at least one training example'),
    (lambda d: predict.gp_inference(EMPTY_KERNEL, EMPTY_TARGETS)('nngp', d['k_test'][:, :0]),
     ValueError, 'gp_inference: y_train must have .* at least one training example'),
    (lambda d: predict.gradient_descent_mse_ensemble(d['model'].kernel_fn, d['x_train'][:0],
                                                     EMPTY_TARGETS)(1.), ValueError,
     'gradient_descent_mse_ensemble: y_train must have .* at least one training example'),
    (lambda d: predict.gradient_descent_mse_params(nn.Linear(4, N_OUT).to(DTYPE),
                                                   d['x_train'][:0], EMPTY_TARGETS)(1.),
     ValueError, 'gradient_descent_mse_params: y_train must have .* at least one training'),
    # wrong types
    (lambda d: predict.max_learning_rate(d['k'], 12.), TypeError,
     r'max_learning_rate: y_train_size must be a positive integer, got 12.0 \(float\)'),
    (lambda d: predict.gradient_descent_mse(d['k'], d['y'].to(torch.complex128)), TypeError,
     'gradient_descent_mse: y_train must be a real tensor'),
    (lambda d: predict.gradient_descent_mse(d['k'], d['y'])(torch.tensor([1 + 1j])), TypeError,
     'gradient_descent_mse: t must be a real tensor'),
    (lambda d: predict.gradient_descent_mse(d['k'], d['y'])(1., 'zeros'), TypeError,
     'gradient_descent_mse: fx_train_0 must be a tensor or a number, got str'),
    (lambda d: predict.gradient_descent_mse(d['k'], d['y'], trace_axes=None), TypeError,
     'gradient_descent_mse: trace_axes must be a sequence of ints or one int, got None'),
    (lambda d: predict.gradient_descent_mse(d['k'], d['y'], trace_axes=(1.,)), TypeError,
     r'gradient_descent_mse: trace_axes must be a sequence of ints or one int, got \(1.0,\)'),
    (lambda d: predict.gradient_descent_mse(d['k'], d['y'], diag_reg_absolute_scale='no'),
     TypeError, "gradient_descent_mse: diag_reg_absolute_scale must be True or False, got 'no'"),
    (lambda d: predict.gradient_descent(mse, d['k'], d['y'], progress='no'), TypeError,
     "gradient_descent: progress must be True or False, got 'no'"),
    (lambda d: predict.gradient_descent_mse_ensemble(d['model'].kernel_fn, d['x_train'], d['y'])(
        1., None, 'nngp', 'no'), TypeError,
     "gradient_descent_mse_ensemble: compute_cov must be True or False, got 'no'"),
    (lambda d: predict.gp_inference(d['k'], d['y'])(123), TypeError,
     'gp_inference: get must be a string or a tuple of strings, got int'),
    (lambda d: predict.gradient_descent_mse_params(nn.Linear(4, N_OUT), 'x', d['y']), TypeError,
     'gradient_descent_mse_params: x_train must be a tensor, got str'),
    (lambda d: predict.gradient_descent_mse_params(nn.Linear(4, N_OUT), d['x_train'], d['y'],
                                                   [torch.zeros(3)]), TypeError,
     'gradient_descent_mse_params: params_0 must be a dict'),
    (lambda d: predict.gradient_descent_mse_params(nn.Linear(4, N_OUT).to(DTYPE), d['x_train'],
                                                   d['y'], {'weight': 3}), TypeError,
     r"gradient_descent_mse_params: params_0\['weight'\] must be a tensor, got int"),
    # wrong values
    (lambda d: predict.max_learning_rate(d['k'], momentum=2.), ValueError,
     r'max_learning_rate: momentum must be in \[0, 1\], got 2.0'),
    (lambda d: predict.gradient_descent(mse, d['k'], d['y'], method='dopri55'), ValueError,
     "gradient_descent: method must be one of .*'dopri5'.*, got 'dopri55'"),
    (lambda d: predict.gradient_descent(mse, d['k'], d['y'], rtol=-1e-6), ValueError,
     'gradient_descent: rtol must be finite and >= 0'),
    (lambda d: predict.gradient_descent_mse(d['k'].to('meta'), d['y']), ValueError,
     'gradient_descent_mse: k_train_train is on the meta device'),
    (lambda d: predict.gradient_descent_mse_params(nn.Linear(4, N_OUT).to(DTYPE), d['x_train'],
                                                   d['y'], {'wieght': torch.zeros(N_OUT, 4)}),
     ValueError, "gradient_descent_mse_params: params_0 has names that are not parameters of "
                 r"the model: \['wieght'\] \(did you mean 'weight'"),
    (lambda d: predict.gradient_descent_mse_params(nn.Linear(4, N_OUT).to(DTYPE), d['x_train'],
                                                   d['y'], {'weight': torch.zeros(N_OUT)}),
     ValueError, r"gradient_descent_mse_params: params_0\['weight'\] must have the parameter's "
                 r"shape \(3, 4\), got \(3,\)"),
    # a wrong type is a TypeError everywhere, also where a number or a name is expected
    (lambda d: predict.gradient_descent_mse(d['k'], d['y'], diag_reg=None), TypeError,
     'gradient_descent_mse: diag_reg must be a number >= 0, got None'),
    (lambda d: predict.gp_inference(d['k'], d['y'])(('nngp', 5)), TypeError,
     'gp_inference: get must hold prediction names as strings, got 5'),
])
def test_bad_inputs_raise_errors_naming_function_argument_and_value(data, call, error, message):
    inputs = dict(data, k=data['k_train_train'].nngp, k_test=data['k_test_train'].nngp,
                  y=data['y_train'])
    with pytest.raises(error, match=message):
        call(inputs)
