"""`stax.LayerNorm`: the kernel rule, scale invariance, the finite network."""

import torch

import torchntk
from torchntk import stax

from tests.strategies import average_over_inits, gaussian, relative_error


def before():
    return stax.serial(stax.Dense(8, W_std=1.4, b_std=0.3), stax.Relu(),
                       stax.Dense(8, W_std=1.7, b_std=0.2))


def test_layer_norm_divides_kernels_by_root_variances(x1, x2):
    kernel = before().kernel_fn(x1, x2)
    normed = stax.serial(before(), stax.LayerNorm()).kernel_fn(x1, x2)
    var1, var2 = kernel.cov1 + 1e-12, kernel.cov2 + 1e-12
    norm = torch.sqrt(var1[:, None] * var2[None, :])
    torch.testing.assert_close(normed.nngp, kernel.nngp / norm, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(normed.ntk, kernel.ntk / norm, rtol=1e-14, atol=1e-14)


def test_layer_norm_gives_unit_variances(x1, x2):
    normed = stax.serial(before(), stax.LayerNorm()).kernel_fn(x1, x2, diagonal_batch=False)
    torch.testing.assert_close(torch.diagonal(normed.cov1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(torch.diagonal(normed.cov2), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(stax.serial(before(), stax.LayerNorm()).kernel_fn(x1, get='nngp')
                               .diagonal(), torch.ones(4, dtype=torch.float64))


def test_layer_norm_kernel_is_invariant_to_scale_of_preceding_bias_free_dense(x1, x2):
    def model(W_std):
        return stax.serial(stax.Dense(8, W_std=1.1, b_std=0.3), stax.Erf(),
                           stax.Dense(8, W_std=W_std), stax.LayerNorm(eps=0.), stax.Relu(),
                           stax.Dense(1))
    small, large = model(0.5).kernel_fn(x1, x2), model(3.).kernel_fn(x1, x2)
    torch.testing.assert_close(small.nngp, large.nngp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(small.ntk, large.ntk, rtol=1e-12, atol=1e-12)


def test_layer_norm_negative_axis_is_channel_axis_for_flat_inputs(x1, x2):
    last = stax.serial(before(), stax.LayerNorm(axis=-1)).kernel_fn(x1, x2, get='ntk')
    channel = stax.serial(before(), stax.LayerNorm(axis=1)).kernel_fn(x1, x2, get='ntk')
    torch.testing.assert_close(last, channel, rtol=0, atol=0)


def test_layer_norm_forward_standardizes_channels(x1):
    out = stax.LayerNorm()(3 * x1 + 2)
    torch.testing.assert_close(out.mean(1), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.var(1, unbiased=False), torch.ones(4, dtype=torch.float64),
                               rtol=1e-10, atol=1e-10)


def test_layer_norm_network_empirical_ntk_approaches_analytic():
    width = 1024
    x = gaussian(5, 6, seed=2)

    def network():
        return stax.serial(stax.Dense(width, W_std=1.5, b_std=0.2), stax.Relu(),
                           stax.Dense(width, W_std=1.2), stax.LayerNorm(), stax.Erf(),
                           stax.Dense(1, W_std=1.3, b_std=0.1))
    empirical = average_over_inits(network(), torchntk.empirical_ntk_fn, x, seeds=2)
    assert relative_error(empirical, network().kernel_fn(x, get='ntk')) < 0.15


def test_layer_norm_extra_repr():
    assert repr(stax.LayerNorm()) == 'LayerNorm(axis=1, eps=1e-12)'
