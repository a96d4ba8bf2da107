"""`torchntk.empirical.functions`: `empirical_ntk_fn`, `empirical_nngp_fn` and
`empirical_kernel_fn` against the definition computed the slow way, closed
forms of small networks, and the infinite-width kernel.
"""

import pytest
import torch

import torchntk
from torchntk import stax

from tests.empirical.models import initialized
from tests.empirical.references import (ATOL, IMPLEMENTATIONS, agrees_with_jacobian_contraction,
                                        full_ntk_by_loop)


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


def test_wide_network_ntk_approaches_analytic_kernel():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = stax.serial(stax.Dense(4096, W_std=1.5, b_std=0.1), stax.Erf(),
                        stax.Dense(4096, W_std=1.5, b_std=0.1), stax.Erf(),
                        stax.Dense(1, W_std=1.5, b_std=0.1))
    model.init_parameters(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    analytic = model.kernel_fn(x, None, get='ntk')
    ntk = torchntk.empirical_ntk_fn(model)(x)
    assert (ntk - analytic).norm() / analytic.norm() < 0.05
