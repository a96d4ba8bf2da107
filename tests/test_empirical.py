"""`torchntk.empirical`: empirical NTK and NNGP of finite networks.

The reference is the definition, computed the slow way: one
`torch.autograd.grad` call per output entry, parameters flattened and
concatenated, `Θ = J1 J2ᵀ`.
"""

import re

import pytest
import torch

import torchntk
from torchntk import stax
from torchntk.empirical import (analysis as empirical_analysis,
                                contraction as empirical_contraction, cost as empirical_cost,
                                inputs as empirical_inputs, model as empirical_model)
from torchntk.empirical.task import prepare_ntk

IMPLEMENTATIONS = ('jacobian_contraction', 'ntk_vector_products', 'structured_derivatives',
                   'auto')
ATOL = 1e-12


def tiny_models():
    return {
        'erf_ntk': lambda: stax.serial(stax.Dense(7, W_std=1.3, b_std=0.2), stax.Erf(),
                                       stax.Dense(3, W_std=0.9, b_std=0.1)),
        'relu_standard': lambda: stax.serial(
            stax.Dense(6, W_std=1.4, parameterization='standard'), stax.Relu(),
            stax.Dense(5, W_std=1.1, b_std=0.3, parameterization='standard', s=(2, 1)),
            stax.Tanh(), stax.Dense(2, b_std=0., parameterization='standard')),
    }


def initialized(name, seed):
    model = tiny_models()[name]()
    model.init_parameters((1, 4), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64)
    return model


@pytest.fixture(params=sorted(tiny_models()))
def model_name(request):
    return request.param


@pytest.fixture
def model(model_name):
    return initialized(model_name, seed=0)


@pytest.fixture
def x1():
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.fixture
def x2():
    return torch.randn(2, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def jacobian_by_loop(model, x):
    """`(N, O, P)`: the gradient of every output entry, parameters concatenated."""
    params = list(model.parameters())
    out = model(x)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i, o], params,
                                                                  retain_graph=True)])
            for i in range(out.shape[0]) for o in range(out.shape[1])]
    return torch.stack(rows).reshape(out.shape[0], out.shape[1], -1)


def full_ntk_by_loop(model, x1, x2):
    """`(N1, N2, O, O)`: `Θ[i, j, o, o'] = ∂f_o(x1_i)/∂θ · ∂f_o'(x2_j)/∂θ`."""
    return torch.einsum('iap,jbp->ijab', jacobian_by_loop(model, x1), jacobian_by_loop(model, x2))


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_traced_ntk_matches_per_parameter_jacobian_loop(model, x1, x2, implementation):
    expected = torch.diagonal(full_ntk_by_loop(model, x1, x2), dim1=2, dim2=3).mean(-1)
    ntk = torchntk.empirical_ntk_fn(model, trace_axes=(-1,), implementation=implementation)(x1, x2)
    assert ntk.shape == (3, 2)
    torch.testing.assert_close(ntk, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_untraced_ntk_matches_per_parameter_jacobian_loop(model, x1, x2, implementation):
    expected = full_ntk_by_loop(model, x1, x2)
    ntk = torchntk.empirical_ntk_fn(model, trace_axes=(), implementation=implementation)(x1, x2)
    torch.testing.assert_close(ntk, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize('trace_axes', [(-1,), ()])
@pytest.mark.parametrize('vmap_axes', [0, None])
def test_implementations_agree(model, x1, x2, trace_axes, vmap_axes):
    by_jacobians = torchntk.empirical_ntk_fn(model, trace_axes=trace_axes, vmap_axes=None,
                                             implementation='jacobian_contraction')(x1, x2)
    for implementation in IMPLEMENTATIONS:
        ntk = torchntk.empirical_ntk_fn(model, trace_axes=trace_axes, vmap_axes=vmap_axes,
                                        implementation=implementation)(x1, x2)
        torch.testing.assert_close(ntk, by_jacobians, rtol=0, atol=ATOL)


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_ntk_x2_none_equals_x2_x1(model, x1, implementation):
    ntk_fn = torchntk.empirical_ntk_fn(model, implementation=implementation)
    torch.testing.assert_close(ntk_fn(x1), ntk_fn(x1, x1), rtol=0, atol=ATOL)


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_ntk_is_symmetric_positive_semidefinite(model, x1, implementation):
    ntk = torchntk.empirical_ntk_fn(model, implementation=implementation)(x1)
    torch.testing.assert_close(ntk, ntk.T, rtol=0, atol=ATOL)
    assert torch.linalg.eigvalsh(ntk).min() > -1e-10


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_ntk_with_params_argument_uses_those_params(model_name, model, x1, x2, implementation):
    other = initialized(model_name, seed=5)
    params = {name: p.detach() for name, p in other.named_parameters()}
    ntk = torchntk.empirical_ntk_fn(model, implementation=implementation)(x1, x2, params=params)
    expected = torchntk.empirical_ntk_fn(other, implementation=implementation)(x1, x2)
    torch.testing.assert_close(ntk, expected, rtol=0, atol=ATOL)


def test_nngp_equals_output_outer_product(model, x1, x2):
    with torch.no_grad():
        f1, f2 = model(x1), model(x2)
    nngp = torchntk.empirical_nngp_fn(model, trace_axes=(-1,))(x1, x2)
    torch.testing.assert_close(nngp, f1 @ f2.T / f1.shape[1], rtol=0, atol=ATOL)


def test_untraced_nngp_equals_full_outer_product(model, x1, x2):
    with torch.no_grad():
        f1, f2 = model(x1), model(x2)
    nngp = torchntk.empirical_nngp_fn(model, trace_axes=())(x1, x2)
    torch.testing.assert_close(nngp, torch.einsum('ia,jb->ijab', f1, f2), rtol=0, atol=ATOL)


def test_nngp_x2_none_equals_x2_x1(model, x1):
    nngp_fn = torchntk.empirical_nngp_fn(model)
    torch.testing.assert_close(nngp_fn(x1), nngp_fn(x1, x1), rtol=0, atol=ATOL)


def test_ntk_of_linear_model_is_input_gram_plus_bias():
    # f(x) = σ_W/√C · W x + σ_b b: ∂f/∂W = σ_W x/√C, ∂f/∂b = σ_b, so Θ = σ_W² x·x'/C + σ_b².
    model = stax.Dense(4, W_std=1.7, b_std=0.6)
    x1 = torch.randn(3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x2 = torch.randn(2, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model.init_parameters(x1.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = 1.7**2 * x1 @ x2.T / 5 + 0.6**2
    for implementation in IMPLEMENTATIONS:
        ntk = torchntk.empirical_ntk_fn(model, implementation=implementation)(x1, x2)
        torch.testing.assert_close(ntk, expected, rtol=0, atol=ATOL)


def test_frozen_parameters_do_not_count():
    model = stax.serial(stax.Dense(5, b_std=0.5), stax.Relu(), stax.Dense(2, b_std=0.5))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model.init_parameters(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first, relu, _ = model.children()
    first.weight.requires_grad_(False)
    first.bias.requires_grad_(False)
    # Only the readout trains: Θ = σ_W² φ(h)·φ(h')/n + σ_b².
    with torch.no_grad():
        features = relu(first(x))
    expected = features @ features.T / 5 + 0.25
    for implementation in IMPLEMENTATIONS:
        ntk = torchntk.empirical_ntk_fn(model, implementation=implementation)(x)
        torch.testing.assert_close(ntk, expected, rtol=0, atol=ATOL)


def test_uninitialized_model_raises_value_error():
    model = stax.serial(stax.Dense(5), stax.Relu(), stax.Dense(1))
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match='not initialized'):
        torchntk.empirical_ntk_fn(model)(x)


def test_unknown_implementation_raises_value_error():
    with pytest.raises(ValueError, match='implementation'):
        torchntk.empirical_ntk_fn(stax.Dense(1), implementation='fast')


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_random_model_in_train_mode_gives_kernel_or_clear_error(implementation):
    # Dropout draws masks inside the model: an implementation must either handle
    # it or say so, not fail inside torch.func.vmap.
    model = stax.serial(stax.Dense(8), stax.Relu(), stax.Dropout(0.5), stax.Dense(1)).train()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model.init_parameters(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    try:
        ntk = torchntk.empirical_ntk_fn(model, implementation=implementation)(x)
    except ValueError as error:
        assert re.search(r'random|eval|Dropout', str(error)), str(error)
        return
    assert ntk.shape == (3, 3) and torch.isfinite(ntk).all()


# linearize and taylor_expand.

def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def perturbed(params, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    return {name: p + scale * torch.randn(p.shape, generator=generator, dtype=p.dtype)
            for name, p in params.items()}


def test_linearize_equals_model_at_params0(model, x1):
    params0 = snapshot(model)
    f_lin = torchntk.linearize(model, params0)
    with torch.no_grad():
        expected = model(x1)
    torch.testing.assert_close(f_lin(x1), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(f_lin(x1, params0), expected, rtol=0, atol=ATOL)


def test_linearize_jacobian_equals_model_jacobian_at_params0(model, x1):
    params0 = snapshot(model)
    f_lin = torchntk.linearize(model, params0)
    jac_lin = torch.func.jacrev(lambda p: f_lin(x1, p))(params0)
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x1,)))(params0)
    for name in params0:
        torch.testing.assert_close(jac_lin[name], jac[name], rtol=0, atol=ATOL)


def test_linearize_is_affine_in_params(model, x1):
    params0 = snapshot(model)
    f_lin = torchntk.linearize(model, params0)
    a, b = perturbed(params0, 0.3, seed=1), perturbed(params0, 0.3, seed=2)
    midpoint = {name: (a[name] + b[name]) / 2 for name in params0}
    torch.testing.assert_close(f_lin(x1, midpoint), (f_lin(x1, a) + f_lin(x1, b)) / 2,
                               rtol=0, atol=ATOL)


def test_training_linearized_model_moves_outputs_by_jacobian_times_step(model, x1, x2):
    # Gradient descent on f_lin: after any number of steps the outputs on fresh
    # inputs are f(θ0) + J(θ0)·(θ − θ0), with J the model's Jacobian at θ0.
    params0 = snapshot(model)
    f_lin = torchntk.linearize(model, params0)
    params = {name: torch.nn.Parameter(p.clone()) for name, p in params0.items()}
    optimizer = torch.optim.SGD(params.values(), lr=0.1)
    target = torch.ones(x1.shape[0], model(x1).shape[1], dtype=torch.float64)
    for _ in range(3):
        optimizer.zero_grad()
        ((f_lin(x1, params) - target)**2).sum().backward()
        optimizer.step()
    delta = {name: params[name].detach() - params0[name] for name in params0}
    assert max(d.abs().max() for d in delta.values()) > 1e-3
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x2,)))(params0)
    out_dims = model(x2).ndim
    expected = model(x2).detach() + sum(
        (jac[name].flatten(out_dims) * delta[name].flatten()).sum(-1) for name in params0)
    torch.testing.assert_close(f_lin(x2, {n: p.detach() for n, p in params.items()}), expected,
                               rtol=0, atol=1e-11)


def test_taylor_expand_degree_1_equals_linearize(model, x1):
    params0 = snapshot(model)
    params = perturbed(params0, 0.5, seed=3)
    torch.testing.assert_close(torchntk.taylor_expand(model, params0, 1)(x1, params),
                               torchntk.linearize(model, params0)(x1, params), rtol=0, atol=ATOL)


def test_taylor_expand_degree_0_is_constant(model, x1):
    params0 = snapshot(model)
    f0 = torchntk.taylor_expand(model, params0, 0)
    torch.testing.assert_close(f0(x1, perturbed(params0, 0.5, seed=3)), f0(x1), rtol=0, atol=0)


class Cubic(torch.nn.Module):
    """f(x) = (a x)² ⊙ (b x): quadratic in a, linear in b, cubic in (a, b) jointly."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(4, 3, generator=generator, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(4, 3, generator=generator, dtype=torch.float64))

    def forward(self, x):
        return (x @ self.a.T)**2 * (x @ self.b.T)


def test_taylor_expand_is_exact_at_the_polynomial_degree(x1):
    # Cubic in (a, b) jointly: degree 3 is exact, degree 2 is not.
    x = x1[:, :3]
    model = Cubic()
    params0 = snapshot(model)
    params = perturbed(params0, 0.7, seed=4)
    exact = torch.func.functional_call(model, params, (x,))
    torch.testing.assert_close(torchntk.taylor_expand(model, params0, 3)(x, params), exact,
                               rtol=0, atol=1e-11)
    assert (torchntk.taylor_expand(model, params0, 2)(x, params) - exact).abs().max() > 1e-3


def test_taylor_expand_degree_2_is_exact_for_quadratic_function(x1):
    model = SquaredLinear()
    params0 = snapshot(model)
    params = perturbed(params0, 0.7, seed=5)
    exact = torch.func.functional_call(model, params, (x1,))
    torch.testing.assert_close(torchntk.taylor_expand(model, params0, 2)(x1, params), exact,
                               rtol=0, atol=1e-11)


class SquaredLinear(torch.nn.Module):
    """f(x) = (W x + b)²: quadratic in (W, b)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3, dtype=torch.float64)

    def forward(self, x):
        return self.linear(x)**2


def test_taylor_expand_rejects_params_with_other_names(model, x1):
    params0 = snapshot(model)
    params = dict(params0)
    params.pop(next(iter(params)))
    with pytest.raises(ValueError, match='keys of params0'):
        torchntk.taylor_expand(model, params0, 1)(x1, params)


def test_taylor_expand_rejects_negative_degree(model):
    with pytest.raises(ValueError, match='degree'):
        torchntk.taylor_expand(model, snapshot(model), -1)


# torch.nn models: every implementation, with and without vmap, equals the
# Jacobian contraction of the whole batch.

class ResNetBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.conv2 = torch.nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.readout = torch.nn.Linear(3 * 5 * 5, 2)

    def forward(self, x):
        x = x + self.conv2(torch.relu(self.norm(self.conv1(x))))
        return self.readout(x.flatten(1))


def torch_models():
    return {
        'mlp': (lambda: torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                            torch.nn.Linear(7, 3)), (5,)),
        'cnn': (lambda: torch.nn.Sequential(
            torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(4, 3, 3, stride=2, dilation=2), torch.nn.Flatten(),
            torch.nn.Linear(3, 3)), (2, 6, 6)),
        'cnn1d': (lambda: torch.nn.Sequential(
            torch.nn.Conv1d(2, 4, 3, padding=2, dilation=2), torch.nn.ReLU(),
            torch.nn.Conv1d(4, 3, 2, stride=2), torch.nn.Flatten(), torch.nn.Linear(12, 2)),
            (2, 9)),
        'resnet_block': (ResNetBlock, (3, 5, 5)),
        # Training mode with dropout=0 avoids the fused inference kernel, which
        # has no derivative rules in torch.func.
        'transformer': (lambda: torch.nn.Sequential(
            torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.,
                                             batch_first=True),
            torch.nn.Flatten(), torch.nn.Linear(24, 2)).train(), (3, 8)),
    }


@pytest.mark.parametrize('name', sorted(torch_models()))
@pytest.mark.parametrize('trace_axes, diagonal_axes', [((-1,), ()), ((), ()), ((), (-1,))])
def test_implementations_agree_on_torch_models(name, trace_axes, diagonal_axes):
    make, shape = torch_models()[name]
    torch.manual_seed(0)
    model = make().to(torch.float64)
    x1 = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x2 = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = torchntk.empirical_ntk_fn(model, trace_axes, diagonal_axes, vmap_axes=None,
                                         implementation='jacobian_contraction')(x1, x2)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        # The math attention backend has forward-mode derivatives, needed by
        # 'ntk_vector_products'.
        for vmap_axes in (0, None):
            for implementation in IMPLEMENTATIONS:
                ntk = torchntk.empirical_ntk_fn(model, trace_axes, diagonal_axes, vmap_axes,
                                                implementation)(x1, x2)
                torch.testing.assert_close(ntk, expected, rtol=0, atol=ATOL)


def test_auto_falls_back_when_forward_mode_is_missing():
    make, shape = torch_models()['transformer']
    model = make().to(torch.float64)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torchntk.empirical_ntk_fn(model, implementation='jacobian_contraction')(x)
    torch.testing.assert_close(torchntk.empirical_ntk_fn(model)(x), expected, rtol=0, atol=ATOL)


def mlp_with_tangent_error(error):
    """Linear-Tanh-(2·)-Linear in float64 whose doubling raises `error` in forward mode."""
    class Doubling(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return 2 * x

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return 2 * g

        @staticmethod
        def jvp(ctx, tangent):
            raise error

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden, self.head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(Doubling.apply(torch.tanh(self.hidden(x))))

    torch.manual_seed(0)
    return Model().double()


def test_vector_products_name_an_operation_without_forward_mode():
    model = mlp_with_tangent_error(NotImplementedError('no tangent rule'))
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"ntk_vector_products' needs forward-mode AD.*no tangent"):
        torchntk.empirical_ntk_fn(model, implementation='ntk_vector_products')(x)


def test_vector_products_let_a_deterministic_model_s_own_error_through():
    # The error's text mentions randomness, but the model draws no random numbers.
    model = mlp_with_tangent_error(RuntimeError('a random failure of the tangent'))
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(RuntimeError, match='a random failure of the tangent'):
        torchntk.empirical_ntk_fn(model, implementation='ntk_vector_products')(x)


def test_forward_passes_and_flop_counts_run_once_per_shapes(monkeypatch):
    """The shape analysis (forward passes, FLOP count, per-example check) runs on
    the first call with given shapes and training modes, not on every call."""
    passes, counters = [], []

    class CountingFlopCounterMode(empirical_model.FlopCounterMode):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            counters.append(self)

    traced_forward = empirical_analysis.traced_forward
    monkeypatch.setattr(empirical_model, 'FlopCounterMode', CountingFlopCounterMode)
    monkeypatch.setattr(empirical_analysis, 'traced_forward',
                        lambda *args, **kwargs: passes.append(1) or traced_forward(*args, **kwargs))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3)).double()
    ntk_fn = torchntk.empirical_ntk_fn(model)
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first = ntk_fn(x)
    analysis_passes = len(passes)
    assert analysis_passes > 0 and len(counters) == 1 and counters[0].get_total_flops() > 0
    again = ntk_fn(x + 1)                    # the same shapes: nothing rerun
    assert len(passes) == analysis_passes and len(counters) == 1
    ntk_fn(x[:4])                            # new shapes
    ntk_fn(x, x[:2])                         # an x2
    model.eval()                             # other training modes
    ntk_fn(x)
    assert len(counters) == 4 and len(passes) > 3 * analysis_passes
    for value, inputs in ((first, x), (again, x + 1)):
        expected = torchntk.empirical_ntk_fn(model, implementation='jacobian_contraction')(inputs)
        torch.testing.assert_close(value, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize('trace_axes, diagonal_axes, shape', [
    ((-1,), (), (3, 2)), ((), (), (3, 2, 4, 4)), ((), (-1,), (3, 2, 4)),
    ((-1,), (0,), (3,)), ((1,), (), (3, 2, 5, 5))])
def test_output_shapes_follow_neural_tangents(trace_axes, diagonal_axes, shape):
    model = torch.nn.Linear(6, 4).double() if len(shape) != 4 or shape[-1] != 5 else None
    x1 = torch.randn(3, 6, dtype=torch.float64)
    x2 = None if 0 in diagonal_axes else torch.randn(2, 6, dtype=torch.float64)
    if model is None:   # (N, C, H) outputs, channels traced
        model = torch.nn.Sequential(torch.nn.Unflatten(1, (1, 6)), torch.nn.Conv1d(1, 4, 2)).double()
    for implementation in IMPLEMENTATIONS:
        ntk = torchntk.empirical_ntk_fn(model, trace_axes, diagonal_axes,
                                        implementation=implementation)(x1, x2)
        assert ntk.shape == (shape if x2 is not None else shape[:1] + shape[2:]
                             if 0 in diagonal_axes else shape)


def test_parameter_chunks_give_the_same_kernel(model, x1, x2):
    whole = torchntk.empirical_ntk_fn(model, implementation='jacobian_contraction')(x1, x2)
    chunked = torchntk.empirical_ntk_fn(model, implementation='jacobian_contraction',
                                        chunk_bytes=1)(x1, x2)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=ATOL)


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_batchnorm_in_training_mode_falls_back_to_whole_batch(implementation):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6),
                                torch.nn.Tanh(), torch.nn.Linear(6, 2)).double().train()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.diagonal(full_ntk_by_loop(model, x, x), dim1=2, dim2=3).mean(-1)
    running_mean = model[1].running_mean.clone()
    ntk = torchntk.empirical_ntk_fn(model, vmap_axes=0, implementation=implementation)(x)
    torch.testing.assert_close(ntk, expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(model[1].running_mean, running_mean, rtol=0, atol=0)


class CentreBatch(torch.nn.Module):
    """Subtracts the batch mean: examples interact, and no known module says so."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


def test_undetected_batch_interaction_with_vmap_raises_value_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), CentreBatch(), torch.nn.Linear(6, 2))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match='vmap_axes=None'):
        torchntk.empirical_ntk_fn(model, vmap_axes=0)(x)
    assert torchntk.empirical_ntk_fn(model, vmap_axes=None)(x).shape == (5, 5)


def test_stax_layernorm_over_batch_axis_falls_back_to_whole_batch():
    model = stax.serial(stax.Dense(6), stax.LayerNorm(axis=(0, 1)), stax.Dense(2))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model.init_parameters(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.diagonal(full_ntk_by_loop(model, x, x), dim1=2, dim2=3).mean(-1)
    ntk = torchntk.empirical_ntk_fn(model, vmap_axes=0)(x)
    torch.testing.assert_close(ntk, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize('vmap_axes', ['0', 1.5, (0, 0, [0])])
def test_invalid_vmap_axes_raises_value_error(vmap_axes):
    with pytest.raises(ValueError, match='vmap_axes'):
        torchntk.empirical_ntk_fn(stax.Dense(1), vmap_axes=vmap_axes)


def test_kernel_fn_get_follows_neural_tangents(model, x1, x2):
    kernel_fn = torchntk.empirical_kernel_fn(model)
    both = kernel_fn(x1, x2)
    torch.testing.assert_close(both.nngp, torchntk.empirical_nngp_fn(model)(x1, x2))
    torch.testing.assert_close(both.ntk, torchntk.empirical_ntk_fn(model)(x1, x2))
    torch.testing.assert_close(kernel_fn(x1, x2, get='ntk'), both.ntk)
    assert kernel_fn(x1, x2, get=('ntk', 'nngp'))._fields == ('ntk', 'nngp')
    with pytest.raises(ValueError, match='get'):
        kernel_fn(x1, x2, get='cov1')


def test_kernel_fn_returns_one_named_tuple_type_per_selection(model, x1, x2):
    # A class made anew per call gave equal results of different types.
    kernel_fn = torchntk.empirical_kernel_fn(model)
    first, again = (kernel_fn(x1, x2, get=('ntk', 'nngp')) for _ in range(2))
    assert type(first) is type(again) and type(first).__name__ == 'EmpiricalKernel'
    assert type(kernel_fn(x1, x2)) is torchntk.empirical.EmpiricalKernel
    torch.testing.assert_close(first.ntk, torchntk.empirical_ntk_fn(model)(x1, x2))


def test_wide_network_ntk_approaches_analytic_kernel():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = stax.serial(stax.Dense(4096, W_std=1.5, b_std=0.1), stax.Erf(),
                        stax.Dense(4096, W_std=1.5, b_std=0.1), stax.Erf(),
                        stax.Dense(1, W_std=1.5, b_std=0.1))
    model.init_parameters(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    analytic = model.kernel_fn(x, None, get='ntk')
    ntk = torchntk.empirical_ntk_fn(model)(x)
    assert (ntk - analytic).norm() / analytic.norm() < 0.05


# Structured rules: every layer they cover gets one, and the kernel equals the
# Jacobian contraction.

def agrees_with_jacobian_contraction(model, x1, x2, trace_axes, vmap_axes=0,
                                     implementations=IMPLEMENTATIONS, **kwargs):
    expected = torchntk.empirical_ntk_fn(model, trace_axes, vmap_axes=None,
                                         implementation='jacobian_contraction')(x1, x2, **kwargs)
    for axes in (vmap_axes, None):
        for implementation in implementations:
            ntk = torchntk.empirical_ntk_fn(model, trace_axes, vmap_axes=axes,
                                            implementation=implementation)(x1, x2, **kwargs)
            torch.testing.assert_close(ntk, expected, rtol=0, atol=ATOL)


def structured_layers(model, x):
    task, _ = prepare_ntk(model, empirical_inputs.trainable_params(model), x, None, {}, (-1,), (),
                          0, torchntk.empirical.DEFAULT_CHUNK_BYTES)
    return set(task.structured_layers)


def convolutions():
    nn = torch.nn
    return {
        'conv3d': (lambda: nn.Sequential(nn.Conv3d(2, 3, (2, 3, 2), padding=1, stride=(1, 2, 1)),
                                         nn.Tanh(), nn.Flatten(), nn.Linear(225, 2)), (2, 4, 5, 4)),
        'groups_same_dilated': (lambda: nn.Sequential(
            nn.Conv2d(4, 6, 3, groups=2, padding='same', dilation=2), nn.Tanh(),
            nn.Conv2d(6, 6, 2, groups=3, padding=1, padding_mode='reflect'), nn.Flatten(),
            nn.Linear(216, 2)), (4, 5, 5)),
        'depthwise_circular_replicate': (lambda: nn.Sequential(
            nn.Conv1d(3, 6, 3, groups=3, padding='same', padding_mode='circular'), nn.Tanh(),
            nn.Conv1d(6, 2, 2, padding=1, padding_mode='replicate', dilation=3), nn.Flatten(),
            nn.Linear(12, 2)), (3, 7)),
        'same_even_kernel': (lambda: nn.Sequential(
            nn.Conv2d(2, 3, (2, 4), padding='same', dilation=(1, 3), bias=False), nn.Tanh(),
            nn.Conv2d(3, 2, 3, stride=2, padding='valid'), nn.Flatten(), nn.Linear(8, 2)),
            (2, 5, 6)),
    }


@pytest.mark.filterwarnings('ignore:Using padding=.same. with even kernel')
@pytest.mark.parametrize('name', sorted(convolutions()))
@pytest.mark.parametrize('trace_axes', [(-1,), ()])
def test_structured_rules_of_convolutions_match_jacobian_contraction(name, trace_axes):
    make, shape = convolutions()[name]
    torch.manual_seed(0)
    model = make().to(torch.float64)
    x1 = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x2 = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert structured_layers(model, x1) == {str(i) for i, m in enumerate(model)
                                            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d,
                                                              torch.nn.Conv2d, torch.nn.Conv3d))}
    agrees_with_jacobian_contraction(model, x1, x2, trace_axes,
                                     implementations=('structured_derivatives',))


@pytest.mark.parametrize('padding', ['VALID', 'SAME', 'CIRCULAR'])
@pytest.mark.parametrize('parameterization', ['ntk', 'standard'])
def test_structured_rule_of_stax_conv_matches_jacobian_contraction(padding, parameterization):
    model = stax.serial(
        stax.Conv(3, (3, 2), strides=(2, 1), padding=padding, W_std=1.3, b_std=0.4,
                  parameterization=parameterization), stax.Relu(),
        stax.Conv(2, (2, 2), padding=padding, parameterization=parameterization),
        stax.Flatten(), stax.Dense(2, b_std=0.1, parameterization=parameterization))
    x1 = torch.randn(3, 2, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x2 = torch.randn(2, 2, 6, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model.init_parameters(x1.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert len(structured_layers(model, x1)) == 3
    agrees_with_jacobian_contraction(model, x1, x2, trace_axes=(),
                                     implementations=('structured_derivatives',))


def test_structured_rule_with_frozen_weight_or_bias_uses_the_trainable_one():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.Linear(12, 2)).double()
    model[0].weight.requires_grad_(False)
    model[3].bias.requires_grad_(False)
    x1 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x2 = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert structured_layers(model, x1) == {'0', '3'}
    agrees_with_jacobian_contraction(model, x1, x2, trace_axes=())


def test_module_called_twice_falls_back_to_generic_rule():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.linear(torch.tanh(self.linear(x)))

    model = Twice().double()
    x1 = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x2 = torch.randn(2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert structured_layers(model, x1) == set()
    agrees_with_jacobian_contraction(model, x1, x2, trace_axes=())


def test_contraction_order_is_cheapest_and_exact():
    # (1000 x 2) (2 x 1000) (1000 x 3): multiplying the last two first costs
    # 2·1000·3 + 1000·2·3 multiply-adds, the first two first 1000·1000·2 + 1000·1000·3.
    sizes = {'i': 1000, 'j': 2, 'k': 1000, 'l': 3}
    cost, plan = empirical_cost.contraction_order(['ij', 'jk', 'kl'], 'il', sizes)
    assert cost == 2 * 1000 * 3 + 1000 * 2 * 3
    assert plan[0] == 0 and plan[1][:2] == (1, 2)
    a, b, c = (torch.randn(m, n, dtype=torch.float64) for m, n in ((7, 2), (2, 9), (9, 3)))
    einsum = empirical_contraction.cheapest_einsum
    torch.testing.assert_close(einsum(['ij', 'jk', 'kl'], 'il', (a, b, c)), a @ b @ c, rtol=0,
                               atol=ATOL)


# Pytree inputs and outputs, keyword arguments, vmap_axes.

class TwoInputsTwoHeads(torch.nn.Module):
    """`{'u': (N, 4), 'v': (N, 3)}` -> `((N, 2), {'z': (N, 3)})`, optionally scaled by `gate`."""

    def __init__(self):
        super().__init__()
        self.u, self.v = torch.nn.Linear(4, 5), torch.nn.Linear(3, 5)
        self.head1, self.head2 = torch.nn.Linear(5, 2), torch.nn.Linear(5, 3)

    def forward(self, x, gate=None):
        h = torch.tanh(self.u(x['u']) + self.v(x['v']))
        if gate is not None:
            h = h * gate
        return self.head1(h), {'z': self.head2(h)}


def pytree_inputs(n, seed):
    generator = torch.Generator().manual_seed(seed)
    return {'u': torch.randn(n, 4, generator=generator, dtype=torch.float64),
            'v': torch.randn(n, 3, generator=generator, dtype=torch.float64)}


def jacobian_by_loop_of(fn, params):
    """`(*out, P)` of one output tensor `fn()`."""
    out = fn()
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        o, params, retain_graph=True, allow_unused=True, materialize_grads=True)])
        for o in out.reshape(-1)]
    return torch.stack(rows).reshape(*out.shape, -1)


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
@pytest.mark.parametrize('vmap_axes', [0, None])
def test_pytree_inputs_and_outputs_give_a_pytree_of_kernels(implementation, vmap_axes):
    torch.manual_seed(0)
    model = TwoInputsTwoHeads().double()
    x1, x2 = pytree_inputs(3, seed=1), pytree_inputs(2, seed=2)
    ntk = torchntk.empirical_ntk_fn(model, trace_axes=(), vmap_axes=vmap_axes,
                                    implementation=implementation)(x1, x2)
    params = list(model.parameters())
    for head, select in ((0, lambda out: out[0]), (1, lambda out: out[1]['z'])):
        j1 = jacobian_by_loop_of(lambda: select(model(x1)), params)
        j2 = jacobian_by_loop_of(lambda: select(model(x2)), params)
        expected = torch.einsum('iap,jbp->ijab', j1, j2)
        kernel = ntk[0] if head == 0 else ntk[1]['z']
        torch.testing.assert_close(kernel, expected, rtol=0, atol=ATOL)
    assert isinstance(ntk, tuple) and set(ntk[1]) == {'z'}


def test_pytree_nngp_is_a_pytree_of_output_products():
    torch.manual_seed(0)
    model = TwoInputsTwoHeads().double()
    x1, x2 = pytree_inputs(3, seed=1), pytree_inputs(2, seed=2)
    nngp = torchntk.empirical_nngp_fn(model)(x1, x2)
    with torch.no_grad():
        (a1, b1), (a2, b2) = model(x1), model(x2)
    torch.testing.assert_close(nngp[0], a1 @ a2.T / 2, rtol=0, atol=ATOL)
    torch.testing.assert_close(nngp[1]['z'], b1['z'] @ b2['z'].T / 3, rtol=0, atol=ATOL)


def test_keyword_arguments_with_batch_axes_and_pairs():
    # gate is batched along axis 0 (kwargs_axes) and given per side as a pair.
    torch.manual_seed(0)
    model = TwoInputsTwoHeads().double()
    x1, x2 = pytree_inputs(3, seed=1), pytree_inputs(2, seed=2)
    gate1 = torch.rand(3, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gate2 = torch.rand(2, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    agrees_with_jacobian_contraction(model, x1, x2, trace_axes=(), vmap_axes=(0, 0, {'gate': 0}),
                                     gate=(gate1, gate2))
    # Each side's kernel uses its own gate: the gated NTK differs from the ungated one.
    ntk_fn = torchntk.empirical_ntk_fn(model, vmap_axes=(0, 0, {'gate': 0}))
    gated, plain = ntk_fn(x1, x2, gate=(gate1, gate2)), ntk_fn(x1, x2)
    assert (gated[0] - plain[0]).abs().max() > 1e-3


class BatchLast(torch.nn.Module):
    """`(C, N)` -> `(O, N)`: the examples are the last axis."""

    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))

    def forward(self, x):
        return self.mlp(x.T).T


@pytest.mark.parametrize('vmap_axes', [1, -1, (1, 1, {})])
def test_vmap_axes_along_a_non_leading_axis(vmap_axes):
    torch.manual_seed(0)
    model = BatchLast().double()
    x1 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x2 = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    agrees_with_jacobian_contraction(model, x1, x2, trace_axes=(), vmap_axes=vmap_axes)
    ntk = torchntk.empirical_ntk_fn(model, trace_axes=(), vmap_axes=vmap_axes)(x1, x2)
    expected = full_ntk_by_loop(model.mlp, x1.T, x2.T).permute(2, 3, 0, 1)   # (O, O, N1, N2)
    torch.testing.assert_close(ntk, expected, rtol=0, atol=ATOL)


def test_vmap_axes_pytree_with_unbatched_input():
    # x = {'u': (N, 4) batched on axis 0, 'v': (1, 3) shared by every example}.
    torch.manual_seed(0)
    model = TwoInputsTwoHeads().double()
    x1, x2 = pytree_inputs(3, seed=1), pytree_inputs(2, seed=2)
    x2['v'] = x1['v'] = x1['v'][:1]
    agrees_with_jacobian_contraction(model, x1, x2, trace_axes=(),
                                     vmap_axes=({'u': 0, 'v': None}, 0, {}))


def test_vmap_axes_on_the_wrong_axis_raises_value_error():
    model = BatchLast().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match='vmap_axes'):
        torchntk.empirical_ntk_fn(model, vmap_axes=0)(x)
    with pytest.raises(ValueError, match='vmap_axes'):
        torchntk.empirical_ntk_fn(TwoInputsTwoHeads().double(),
                                  vmap_axes=({'u': 0}, 0, {}))(pytree_inputs(3, seed=1))


def test_inputs_of_different_structure_raise_value_error():
    model = TwoInputsTwoHeads().double()
    x1 = pytree_inputs(3, seed=1)
    with pytest.raises(ValueError, match='structure'):
        torchntk.empirical_ntk_fn(model)(x1, (x1['u'], x1['v']))


def test_outputs_differing_on_a_traced_axis_raise_value_error():
    model = torch.nn.Conv1d(1, 2, 2).double()
    with pytest.raises(ValueError, match='axis 2'):
        torchntk.empirical_ntk_fn(model, trace_axes=(-1,))(torch.randn(3, 1, 5, dtype=torch.float64),
                                                           torch.randn(2, 1, 6, dtype=torch.float64))


def test_linearize_of_pytree_model_is_pytree_and_exact_at_params0():
    torch.manual_seed(0)
    model = TwoInputsTwoHeads().double()
    x = pytree_inputs(3, seed=1)
    gate = torch.rand(3, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    params0 = snapshot(model)
    f_lin = torchntk.linearize(model, params0)
    with torch.no_grad():
        expected = model(x, gate=gate)
    for params in (None, params0):
        out = f_lin(x, params, gate=gate)
        torch.testing.assert_close(out[0], expected[0], rtol=0, atol=ATOL)
        torch.testing.assert_close(out[1]['z'], expected[1]['z'], rtol=0, atol=ATOL)


def test_ntk_gradient_in_stax_hyperparameters_agrees_across_implementations():
    W_std = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    b_std = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    model = stax.serial(stax.Conv(3, (2, 2), W_std=W_std, b_std=b_std), stax.Relu(),
                        stax.Flatten(), stax.Dense(2, W_std=W_std, b_std=b_std))
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model.init_parameters(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gradients = [torch.autograd.grad(torchntk.empirical_ntk_fn(model, implementation=name)(x).sum(),
                                     (W_std, b_std)) for name in IMPLEMENTATIONS]
    assert all(g.abs() > 1e-3 for g in gradients[0])
    for other in gradients[1:]:
        torch.testing.assert_close(other, gradients[0], rtol=0, atol=ATOL)


def test_forward_hook_changing_the_output_disables_the_structured_rule():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    model[0].register_forward_hook(lambda module, args, output: 2 * output**2)
    x1 = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x2 = torch.randn(2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert structured_layers(model, x1) == {'2'}
    agrees_with_jacobian_contraction(model, x1, x2, trace_axes=())


def test_contraction_order_keeps_intermediates_within_max_size():
    # Cheapest: (ij)(jk) first, 2·10·100 + 2·100·10 multiply-adds through a 2 x 100
    # intermediate; within 100 entries: (jk)(kl) first, 10·100·10 + 2·10·10 through 10 x 10.
    sizes = {'i': 2, 'j': 10, 'k': 100, 'l': 10}
    order = empirical_cost.contraction_order
    assert order(['ij', 'jk', 'kl'], 'il', sizes) == (4000, ((0, 1, 'ik'), 2, 'il'))
    assert order(['ij', 'jk', 'kl'], 'il', sizes, max_size=100) == (10200, (0, (1, 2, 'jl'), 'il'))
    a, b, c = (torch.randn(m, n, dtype=torch.float64) for m, n in ((2, 10), (10, 100), (100, 10)))
    einsum = empirical_contraction.cheapest_einsum
    torch.testing.assert_close(einsum(['ij', 'jk', 'kl'], 'il', (a, b, c), max_size=100),
                               a @ b @ c, rtol=0, atol=ATOL)


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
@pytest.mark.parametrize('vmap_axes', [0, None])
def test_diagonal_over_the_batch_axis_is_the_diagonal_of_the_kernel(implementation, vmap_axes):
    make, shape = torch_models()['cnn']
    torch.manual_seed(0)
    model = make().to(torch.float64)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = torchntk.empirical_ntk_fn(model, trace_axes=(), vmap_axes=None,
                                     implementation='jacobian_contraction')(x)   # (N, N, O, O)
    diagonal = torchntk.empirical_ntk_fn(model, trace_axes=(), diagonal_axes=(0,),
                                         vmap_axes=vmap_axes, implementation=implementation)(x)
    torch.testing.assert_close(diagonal, torch.diagonal(full, dim1=0, dim2=1).permute(2, 0, 1),
                               rtol=0, atol=ATOL)


def test_examples_of_different_shapes_on_the_two_sides():
    # x1 and x2 cannot be joined into one batch: Jacobians are taken side by side.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 2), torch.nn.Tanh(),
                                torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten(),
                                torch.nn.Linear(3, 2)).double()
    x1 = torch.randn(3, 2, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x2 = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    agrees_with_jacobian_contraction(model, x1, x2, trace_axes=())
    expected = full_ntk_by_loop(model, x1, x2)
    ntk = torchntk.empirical_ntk_fn(model, trace_axes=())(x1, x2)
    torch.testing.assert_close(ntk, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize('implementation', ['jacobian_contraction', 'structured_derivatives'])
@pytest.mark.parametrize('trace_axes', [(-1,), ()])
def test_float32_kernel_without_gradients_matches_float64(onednn_calls, implementation,
                                                          trace_axes):
    """Under `torch.no_grad()` float32 products go to oneDNN (ops.products):
    the kernel stays within float32 rounding of the float64 one."""
    from torchntk.ops import products
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(16 * 8 * 8, 10))
    x1, x2 = torch.randn(12, 3, 8, 8), torch.randn(10, 3, 8, 8)
    with torch.no_grad():
        ntk = torchntk.empirical_ntk_fn(model, trace_axes, implementation=implementation)(x1, x2)
    assert ntk.grad_fn is None
    expected = torchntk.empirical_ntk_fn(model.double(), trace_axes,
                                         implementation=implementation)(x1.double(), x2.double())
    assert onednn_calls or not products._onednn_available()
    torch.testing.assert_close(ntk.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
