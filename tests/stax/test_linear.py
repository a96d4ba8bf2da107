"""`stax.Dense` and `stax.Identity`: kernel rules, finite forward, initialization."""

import pytest
import torch

import torchntk
from torchntk import stax

from tests.strategies import gaussian


# --- kernel rules -----------------------------------------------------------------------------

@pytest.mark.parametrize('b_std', [None, 0., 0.4])
def test_dense_ntk_parameterization_on_inputs_gives_affine_gram(x1, x2, b_std):
    # nngp' = σ_W² x·x'/C + σ_b², and with a zero input NTK, ntk' = nngp'.
    kernel = stax.Dense(5, W_std=1.7, b_std=b_std).kernel_fn(x1, x2)
    expected = 1.7**2 * x1 @ x2.T / 6 + (b_std or 0.)**2
    torch.testing.assert_close(kernel.nngp, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(kernel.ntk, expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize('s_in', [1, 3])
def test_dense_standard_parameterization_on_inputs(x1, x2, s_in):
    # ntk' = (C / s_in)·nngp_in + σ_W²·0 + 1 (bias).
    kernel = stax.Dense(5, W_std=1.7, b_std=0.4, parameterization='standard',
                        s=(s_in, 2)).kernel_fn(x1, x2)
    torch.testing.assert_close(kernel.nngp, 1.7**2 * x1 @ x2.T / 6 + 0.16, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(kernel.ntk, x1 @ x2.T / s_in + 1, rtol=1e-14, atol=1e-14)


def test_dense_ntk_parameterization_kernel_does_not_depend_on_out_dim(x1, x2):
    narrow = stax.serial(stax.Dense(3, W_std=1.2, b_std=0.1), stax.Relu(), stax.Dense(2))
    wide = stax.serial(stax.Dense(300, W_std=1.2, b_std=0.1), stax.Relu(), stax.Dense(7))
    torch.testing.assert_close(narrow.kernel_fn(x1, x2, get='ntk'), wide.kernel_fn(x1, x2, get='ntk'),
                               rtol=0, atol=0)


def test_dense_standard_ntk_scales_with_hidden_width(x1, x2):
    # The readout's weight term is (width / s_in)·nngp of its inputs.
    def ntk(width):
        return stax.serial(stax.Dense(width, parameterization='standard'), stax.Relu(),
                           stax.Dense(1, parameterization='standard')).kernel_fn(x1, x2, get=None)
    small, large = ntk(10), ntk(20)
    torch.testing.assert_close(small.nngp, large.nngp, rtol=0, atol=0)
    relu_nngp = small.nngp  # σ_W = 1, no bias: the readout nngp is relu's nngp.
    torch.testing.assert_close(large.ntk - small.ntk, 10 * relu_nngp, rtol=1e-12, atol=1e-12)


def test_b_std_none_and_zero_agree_in_ntk_parameterization(x1, x2):
    without = stax.serial(stax.Dense(8, b_std=None), stax.Relu(), stax.Dense(1, b_std=None))
    zero = stax.serial(stax.Dense(8, b_std=0.), stax.Relu(), stax.Dense(1, b_std=0.))
    torch.testing.assert_close(without.kernel_fn(x1, x2, get='ntk'), zero.kernel_fn(x1, x2, get='ntk'),
                               rtol=0, atol=0)


def test_b_std_none_and_zero_differ_by_exactly_the_bias_term_in_standard_parameterization(x1, x2):
    # A zero-initialized bias still trains: it adds ∂f/∂b · ∂f/∂b = 1 to the NTK.
    def model(b_std):
        return stax.serial(stax.Dense(8, W_std=1.3, b_std=0.2, parameterization='standard'),
                           stax.Erf(), stax.Dense(1, W_std=0.9, b_std=b_std,
                                                  parameterization='standard'))
    without, zero = model(None).kernel_fn(x1, x2), model(0.).kernel_fn(x1, x2)
    torch.testing.assert_close(zero.nngp, without.nngp, rtol=0, atol=0)
    torch.testing.assert_close(zero.ntk - without.ntk, torch.ones(4, 3, dtype=torch.float64),
                               rtol=0, atol=1e-13)


@pytest.mark.parametrize('parameterization', ['ntk', 'standard'])
def test_single_dense_empirical_ntk_equals_analytic_exactly(x1, x2, parameterization):
    # A linear model's NTK does not depend on its weights: finite = infinite width.
    model = stax.Dense(3, W_std=1.4, b_std=0.3, parameterization=parameterization, s=(2, 1))
    model.init_parameters(x1.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    empirical = torchntk.empirical_ntk_fn(model)(x1, x2)
    torch.testing.assert_close(empirical, model.kernel_fn(x1, x2, get='ntk'), rtol=1e-13, atol=1e-13)


def test_w_std_and_b_std_may_be_tensors(x1, x2):
    as_floats = stax.serial(stax.Dense(8, W_std=1.3, b_std=0.2), stax.Relu(), stax.Dense(1))
    as_tensors = stax.serial(stax.Dense(8, W_std=torch.tensor(1.3, dtype=torch.float64),
                                        b_std=torch.tensor(0.2, dtype=torch.float64)),
                             stax.Relu(), stax.Dense(1))
    torch.testing.assert_close(as_tensors.kernel_fn(x1, x2, get='ntk'),
                               as_floats.kernel_fn(x1, x2, get='ntk'), rtol=1e-15, atol=1e-15)


def test_identity_kernel_is_input_kernel(x1, x2):
    identity = stax.Identity().kernel_fn(x1, x2, get=('nngp', 'cov1', 'cov2'))
    torch.testing.assert_close(identity.nngp, x1 @ x2.T / 6, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(identity.cov1, (x1**2).mean(1), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(identity.cov2, (x2**2).mean(1), rtol=1e-14, atol=1e-14)


def test_identity_forward_returns_input(x1):
    assert stax.Identity()(x1) is x1


def test_dense_after_identity_equals_dense(x1, x2):
    with_identity = stax.serial(stax.Identity(), stax.Dense(4, W_std=1.1, b_std=0.2), stax.Erf(),
                                stax.Identity(), stax.Dense(1))
    without = stax.serial(stax.Dense(4, W_std=1.1, b_std=0.2), stax.Erf(), stax.Dense(1))
    torch.testing.assert_close(with_identity.kernel_fn(x1, x2, get='ntk'),
                               without.kernel_fn(x1, x2, get='ntk'), rtol=0, atol=0)


# --- finite forward ---------------------------------------------------------------------------

@pytest.mark.parametrize('parameterization, s', [('ntk', (1, 1)), ('standard', (1, 1)),
                                                  ('standard', (2, 4))])
def test_dense_forward_output_covariance_matches_nngp(parameterization, s):
    # Over the output units of one wide layer, z·z'/width estimates σ_W² x·x'/C + σ_b².
    x = gaussian(3, 40, seed=2)
    model = stax.Dense(2**14 // s[1], W_std=1.6, b_std=0.5, parameterization=parameterization, s=s)
    model.init_parameters(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        z = model(x)
    assert z.shape == (3, 2**14)
    nngp = model.kernel_fn(x, get='nngp')
    # Entry-wise standard error ≤ sqrt(2/width)·max variance ≈ 0.011·max variance.
    torch.testing.assert_close(z @ z.T / z.shape[1], nngp, rtol=0, atol=0.06 * nngp.diagonal().max())


def test_dense_standard_parameterization_parameter_scales():
    # W ~ N(0, σ_W² s_in / C_in), b ~ N(0, σ_b²).
    model = stax.Dense(500, W_std=1.6, b_std=0.5, parameterization='standard', s=(4, 2))
    model.init_parameters((1, 64), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert model.weight.shape == (1000, 64) and model.bias.shape == (1000,)
    assert abs(model.weight.std().item() / (1.6 * (4 / 64)**0.5) - 1) < 0.02
    assert abs(model.bias.std().item() / 0.5 - 1) < 0.1


def test_dense_ntk_parameterization_parameters_are_standard_normal():
    model = stax.Dense(500, W_std=1.6, b_std=0.5)
    model.init_parameters((1, 64), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert abs(model.weight.std().item() - 1) < 0.02
    assert abs(model.weight.mean().item()) < 0.01
    assert abs(model.bias.std().item() - 1) < 0.1


def test_dense_without_bias_has_no_bias_parameter():
    model = stax.Dense(5, b_std=None)
    model.init_parameters((2, 3), dtype=torch.float64)
    assert model.bias is None
    assert [name for name, _ in model.named_parameters()] == ['weight']


# --- initialization ---------------------------------------------------------------------------

def network():
    return stax.serial(stax.Dense(16, W_std=1.5, b_std=0.2), stax.Relu(),
                       stax.Dense(8, b_std=0.1, parameterization='standard'), stax.Tanh(),
                       stax.Dense(2))


def test_init_parameters_with_same_seed_gives_identical_parameters_and_outputs(x1):
    first, second = network(), network()
    first.init_parameters(x1.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    second.init_parameters(x1.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for (name, p), (_, q) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(p, q), name
    with torch.no_grad():
        assert torch.equal(first(x1), second(x1))


def test_init_parameters_with_different_seeds_gives_different_parameters(x1):
    first, second = network(), network()
    first.init_parameters(x1.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    second.init_parameters(x1.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert not torch.equal(next(first.parameters()), next(second.parameters()))


def test_init_parameters_reinitializes(x1):
    model = network()
    model.init_parameters(x1.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        before = model(x1)
    model.init_parameters(x1.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    model.init_parameters(x1.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model(x1), before)


def test_init_parameters_returns_output_shape_and_sets_dtype():
    model = network()
    assert tuple(model.init_parameters((4, 6), dtype=torch.float64)) == (4, 2)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert [tuple(p.shape) for p in model.parameters()] == [(16, 6), (16,), (8, 16), (8,), (2, 8)]


def test_lazy_parameters_are_inferred_on_first_call(x1):
    model = network()
    assert all(torch.nn.parameter.is_lazy(p) for p in model.parameters())
    out = model(x1)
    assert out.shape == (4, 2) and out.dtype == torch.float64
    assert not any(torch.nn.parameter.is_lazy(p) for p in model.parameters())
    assert next(model.parameters()).shape == (16, 6)


def test_lazy_parameters_follow_the_global_generator(x1):
    torch.manual_seed(11)
    first = network()(x1)
    torch.manual_seed(11)
    assert torch.equal(network()(x1), first)


def test_dense_rejects_input_of_another_size_after_initialization(x1):
    model = stax.Dense(4)
    model(x1)
    with pytest.raises(ValueError, match=r'Dense: the weight of shape \(4, 6\) was made for other inputs'):
        model(gaussian(2, 5))


def test_dense_extra_repr():
    assert repr(stax.Dense(4, W_std=1.5, b_std=0.1)) == 'Dense(4, W_std=1.5, b_std=0.1)'
    assert "parameterization='standard'" in repr(stax.Dense(4, parameterization='standard'))
