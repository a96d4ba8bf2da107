"""`torchntk.monte_carlo`: averages of empirical kernels over random initializations.

For one hidden layer the expected empirical NNGP and NTK equal the analytic
kernels at any width, so the error of the average falls as 1/√n_samples.
"""

import functools
import math
import statistics

import pytest
import torch

import torchntk
from torchntk import stax

from tests.test_batching import assert_same


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


def test_one_sample_is_the_empirical_kernel_of_the_network_of_its_seed(x):
    model = one_hidden_layer()
    estimate = torchntk.monte_carlo_kernel_fn(model, 1, generator=torch.Generator().manual_seed(5),
                                              progress=False)(x)
    seed = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(5)))
    model.init_parameters(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
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




def test_a_stax_model_with_several_inputs_is_drawn_for_their_shapes():
    model = stax.serial(stax.parallel(stax.Dense(8), stax.Dense(8)), stax.FanInSum(), stax.Relu(),
                        stax.Dense(1))
    xs = [torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)]
    estimate = torchntk.monte_carlo_kernel_fn(model, 1, generator=torch.Generator().manual_seed(4),
                                              progress=False)(xs, get='ntk')
    seed = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(4)))
    model.init_parameters([(3, 4), (3, 5)], generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64)
    torch.testing.assert_close(estimate, torchntk.empirical_ntk_fn(model)(xs), rtol=0, atol=1e-12)


def test_token_ids_are_fed_to_a_model_that_keeps_its_floating_dtype():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    tokens = torch.randint(10, (3, 2), generator=torch.Generator().manual_seed(1))
    estimate = torchntk.monte_carlo_kernel_fn(model, 1, generator=torch.Generator().manual_seed(2),
                                              progress=False)(tokens, get='nngp')
    seed = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(2)))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in model.modules():   # the documented draw: reset_parameters() in module order
            if hasattr(module, 'reset_parameters'):
                module.reset_parameters()
    out = model(tokens)
    assert estimate.dtype == torch.float32
    torch.testing.assert_close(estimate, out @ out.T / 2)


# ----------------------------------------------------------------------------- fixed networks

def test_every_call_averages_over_the_networks_fixed_when_it_was_made(x):
    kernel_fn = torchntk.monte_carlo_kernel_fn(one_hidden_layer(), 2,
                                               generator=torch.Generator().manual_seed(6),
                                               progress=False)
    whole = kernel_fn(x, None, 'ntk')
    assert_same(kernel_fn(x, None, 'ntk'), whole)
    assert_same(kernel_fn(x[:2], x[2:], 'ntk'), whole[:2, 2:])   # entries of one estimate


def plain_module():
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


@pytest.mark.parametrize('with_x2', [False, True])
@pytest.mark.parametrize('make_model', [one_hidden_layer, plain_module])
def test_batched_estimate_equals_the_untiled_one(with_x2, make_model):
    x1 = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x2 = torch.randn(4, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64) \
        if with_x2 else None
    kernel_fn = torchntk.monte_carlo_kernel_fn(make_model(), 3,
                                               generator=torch.Generator().manual_seed(9),
                                               progress=False)
    untiled = kernel_fn(x1, x2)
    for batch_size in (1, 2, 3):
        assert_same(torchntk.batch(kernel_fn, batch_size, progress=False)(x1, x2), untiled)


def test_batch_refuses_a_kernel_fn_that_yields_several_estimates():
    kernel_fn = torchntk.monte_carlo_kernel_fn(one_hidden_layer(), [1, 2], progress=False)
    with pytest.raises(ValueError, match=r'batch: kernel_fn monte_carlo_kernel_fn.* tileable=False'):
        torchntk.batch(kernel_fn, 2, progress=False)


def test_batch_refuses_a_kernel_fn_declared_not_tileable_also_through_partial():
    def resampled(x1, x2=None, get=None):   # new networks on every call
        return torchntk.empirical_nngp_fn(one_hidden_layer())(x1, x2)
    resampled.tileable = False
    for kernel_fn in (resampled, functools.partial(resampled, get='nngp')):
        with pytest.raises(ValueError, match=r'batch: kernel_fn .*resampled declares tileable=False'):
            torchntk.batch(kernel_fn, 2, progress=False)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize('kwargs, error, message', [
    (dict(n_samples=0), ValueError, 'n_samples'),
    (dict(n_samples=-3), ValueError, 'n_samples'),
    (dict(n_samples=[]), ValueError, 'n_samples'),
    (dict(n_samples=2.0), TypeError, 'n_samples'),
    (dict(n_samples='3'), TypeError, 'n_samples'),
    (dict(n_samples=True), TypeError, 'n_samples'),
    (dict(n_samples=[1, 2.5]), TypeError, 'n_samples'),
    (dict(generator=7), TypeError, 'generator'),
    (dict(model=42), TypeError, 'model'),
    (dict(implementation='fastest'), ValueError, 'implementation'),
    (dict(vmap_axes='first'), ValueError, 'vmap_axes'),
], ids=str)
def test_bad_arguments_are_refused_naming_the_argument(kwargs, error, message):
    arguments = dict(model=one_hidden_layer(), n_samples=1, progress=False) | kwargs
    with pytest.raises(error, match=rf'^monte_carlo_kernel_fn: .*{message}'):
        torchntk.monte_carlo_kernel_fn(**arguments)


@pytest.mark.parametrize('name', ['x1', 'x2'])
@pytest.mark.parametrize('value', [math.nan, math.inf])
def test_non_finite_inputs_are_refused(x, name, value):
    bad = x.clone()
    bad[1, 2] = value
    inputs = dict(x1=x, x2=x) | {name: bad}
    kernel_fn = torchntk.monte_carlo_kernel_fn(one_hidden_layer(), 1, progress=False)
    with pytest.raises(ValueError, match=f'^monte_carlo_kernel_fn: {name} contains non-finite'):
        kernel_fn(**inputs)


@pytest.mark.parametrize('make_model', [one_hidden_layer, plain_module])
@pytest.mark.parametrize('n1, n2', [(0, None), (0, 3), (4, 0)])
def test_a_batch_of_no_examples_gives_empty_kernels(x, make_model, n1, n2):
    kernel_fn = torchntk.monte_carlo_kernel_fn(make_model().double(), 2, progress=False)
    estimate = kernel_fn(x[:n1], None if n2 is None else x[:n2])
    for kernel in estimate:   # as kernel_fn and the empirical kernels: (N1, N2) with a zero
        assert kernel.shape == (n1, n1 if n2 is None else n2) and kernel.dtype == x.dtype


def test_a_bad_get_is_refused_when_called_even_for_a_generator_of_estimates(x):
    kernel_fn = torchntk.monte_carlo_kernel_fn(one_hidden_layer(), [1, 2], progress=False)
    with pytest.raises(ValueError, match="^monte_carlo_kernel_fn: get must be"):
        kernel_fn(x, get='kernel')
