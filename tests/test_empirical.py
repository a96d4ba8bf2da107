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

IMPLEMENTATIONS = ('jacobian_contraction', 'ntk_vector_products')
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
def test_implementations_agree(model, x1, x2, trace_axes):
    by_jacobians = torchntk.empirical_ntk_fn(model, trace_axes=trace_axes,
                                             implementation='jacobian_contraction')(x1, x2)
    by_products = torchntk.empirical_ntk_fn(model, trace_axes=trace_axes,
                                            implementation='ntk_vector_products')(x1, x2)
    torch.testing.assert_close(by_jacobians, by_products, rtol=0, atol=ATOL)


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
