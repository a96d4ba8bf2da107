"""`torchntk.monte_carlo`: averages of empirical kernels over random initializations.

For one hidden layer the expected empirical NNGP and NTK equal the analytic
kernels at any width, so the error of the average falls as 1/√n_samples.
"""

import statistics

import pytest
import torch

import torchntk
from torchntk import stax


def one_hidden_layer():
    return stax.serial(stax.Dense(16, W_std=1.5, b_std=0.1), stax.Erf(),
                       stax.Dense(2, W_std=1.5, b_std=0.1))


@pytest.fixture
def x():
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_error_falls_at_inverse_square_root_rate(x):
    exact = one_hidden_layer().kernel_fn(x, None, get=('nngp', 'ntk'))
    errors = {name: {4: [], 64: []} for name in ('nngp', 'ntk')}
    for seed in range(8):
        kernel_fn = torchntk.monte_carlo_kernel_fn(
            one_hidden_layer(), [4, 64], generator=torch.Generator().manual_seed(seed),
            implementation='jacobian_contraction', progress=False)
        for n, estimate in zip([4, 64], kernel_fn(x)):
            for name in errors:
                error = getattr(estimate, name) - getattr(exact, name)
                errors[name][n].append(error.norm().item() / getattr(exact, name).norm().item())
    for name, by_n in errors.items():
        ratio = statistics.mean(by_n[4]) / statistics.mean(by_n[64])
        assert 2.2 < ratio < 7, (name, ratio)   # √(64/4) = 4


def test_single_count_returns_the_kernel_and_a_list_a_generator(x):
    def kernel_fn(n_samples):
        return torchntk.monte_carlo_kernel_fn(one_hidden_layer(), n_samples,
                                              generator=torch.Generator().manual_seed(0),
                                              progress=False)
    single = kernel_fn(3)(x, get='ntk')
    estimates = list(kernel_fn([1, 3])(x, get='ntk'))
    assert len(estimates) == 2
    torch.testing.assert_close(estimates[-1], single, rtol=0, atol=1e-12)


def test_same_generator_state_gives_same_estimate(x):
    def estimate():
        return torchntk.monte_carlo_kernel_fn(one_hidden_layer(), 2,
                                              generator=torch.Generator().manual_seed(3),
                                              progress=False)(x, get='nngp')
    torch.testing.assert_close(estimate(), estimate(), rtol=0, atol=0)


def test_one_sample_is_the_empirical_kernel_of_that_init(x):
    model = one_hidden_layer()
    estimate = torchntk.monte_carlo_kernel_fn(model, 1, generator=torch.Generator().manual_seed(5),
                                              progress=False)(x)
    model.init_parameters(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    torch.testing.assert_close(estimate.ntk, torchntk.empirical_ntk_fn(model)(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(estimate.nngp, torchntk.empirical_nngp_fn(model)(x), rtol=0, atol=0)


def test_plain_module_is_reinitialized_by_reset_parameters(x):
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    before = [p.detach().clone() for p in model.parameters()]
    kernel_fn = torchntk.monte_carlo_kernel_fn(model, [1, 2], generator=torch.Generator().manual_seed(0),
                                               progress=False)
    first, second = kernel_fn(x, get='nngp')
    assert not torch.allclose(first, second)
    for p, q in zip(model.parameters(), before):   # the model itself is untouched
        assert torch.equal(p, q)


def test_invalid_n_samples_raises_value_error():
    with pytest.raises(ValueError, match='n_samples'):
        torchntk.monte_carlo_kernel_fn(one_hidden_layer(), 0)
