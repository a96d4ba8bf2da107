"""`FanOut`, `FanInSum`, `FanInProd`, `FanInConcat`: exact kernel identities and the
finite network's NTK for a residual block."""

import math

import pytest
import torch

import torchntk
from torchntk import stax

from tests.strategies import average_over_inits, gaussian, relative_error


def assert_close(actual, expected, tol=1e-14):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def test_fan_out_copies_kernel_and_input(x1):
    kernels = stax.FanOut(3).kernel_fn(x1, get='nngp')
    assert len(kernels) == 3
    for nngp in kernels:
        assert_close(nngp, x1 @ x1.T / 6)
    assert stax.FanOut(3)(x1) == [x1, x1, x1]


def test_fan_in_sum_of_dense_branches_is_dense_with_summed_variances(x1, x2):
    # Independent branches add: Σ_i (σ_Wi² k + σ_bi²) = (Σσ_Wi²) k + Σσ_bi², for the NTK too.
    prefix = lambda: stax.serial(stax.Dense(8, W_std=1.2, b_std=0.1), stax.Relu())
    branches = stax.serial(prefix(), stax.FanOut(2),
                           stax.parallel(stax.Dense(8, W_std=1.5, b_std=0.3),
                                         stax.Dense(8, W_std=0.8, b_std=0.4)),
                           stax.FanInSum(), stax.Erf(), stax.Dense(1))
    single = stax.serial(prefix(), stax.Dense(8, W_std=math.sqrt(1.5**2 + 0.8**2),
                                              b_std=math.sqrt(0.3**2 + 0.4**2)),
                         stax.Erf(), stax.Dense(1))
    for name in ('nngp', 'ntk', 'cov1', 'cov2'):
        assert_close(getattr(branches.kernel_fn(x1, x2), name),
                     getattr(single.kernel_fn(x1, x2), name), tol=1e-13)


def test_residual_block_kernel_is_sum_of_branch_kernels(x1, x2):
    def prefix():
        return stax.Dense(8, W_std=1.3, b_std=0.2)

    def branch():
        return stax.serial(stax.Relu(), stax.Dense(8, W_std=1.1, b_std=0.1))
    residual = stax.serial(prefix(), stax.FanOut(2), stax.parallel(branch(), stax.Identity()),
                           stax.FanInSum()).kernel_fn(x1, x2)
    main = stax.serial(prefix(), branch()).kernel_fn(x1, x2)
    skip = prefix().kernel_fn(x1, x2)
    for name in ('nngp', 'ntk', 'cov1', 'cov2'):
        assert_close(getattr(residual, name), getattr(main, name) + getattr(skip, name))


def test_fan_in_sum_of_one_branch_is_identity(x1, x2):
    kernel = stax.Dense(4, b_std=0.2).kernel_fn(x1, x2)
    summed = stax.serial(stax.Dense(4, b_std=0.2), stax.FanOut(1), stax.FanInSum()).kernel_fn(x1, x2)
    assert_close(summed.ntk, kernel.ntk, tol=0)


def test_fan_in_prod_follows_product_rule(x1, x2):
    a = lambda: stax.Dense(4, W_std=1.5, b_std=0.3)
    b = lambda: stax.serial(stax.Dense(4, W_std=0.9, b_std=0.2), stax.Relu(), stax.Dense(4))
    product = stax.serial(stax.FanOut(2), stax.parallel(a(), b()), stax.FanInProd()).kernel_fn(x1, x2)
    ka, kb = a().kernel_fn(x1, x2), b().kernel_fn(x1, x2)
    assert_close(product.nngp, ka.nngp * kb.nngp)
    assert_close(product.ntk, ka.ntk * kb.nngp + ka.nngp * kb.ntk)
    assert_close(product.cov1, ka.cov1 * kb.cov1)
    assert_close(product.cov2, ka.cov2 * kb.cov2)
    assert not product.is_gaussian


def test_fan_in_prod_forward_multiplies(x1):
    a, b = x1, x1 + 1
    torch.testing.assert_close(stax.FanInProd()([a, b]), a * b, rtol=0, atol=0)


def test_fan_in_concat_of_equal_branches_is_that_branch(x1, x2):
    branch = lambda: stax.serial(stax.Dense(4, W_std=1.5, b_std=0.3), stax.Erf())
    concat = stax.serial(stax.FanOut(2), stax.parallel(branch(), branch()),
                         stax.FanInConcat()).kernel_fn(x1, x2)
    single = branch().kernel_fn(x1, x2)
    for name in ('nngp', 'ntk', 'cov1', 'cov2'):
        assert_close(getattr(concat, name), getattr(single, name))
    assert concat.shape1 == (4, 8)


def test_fan_in_concat_averages_kernels_weighted_by_widths(x1, x2):
    a = lambda: stax.Dense(3, W_std=1.5, b_std=0.3)
    b = lambda: stax.serial(stax.Dense(4), stax.Relu(), stax.Dense(5, W_std=0.7))
    concat = stax.serial(stax.FanOut(2), stax.parallel(a(), b()), stax.FanInConcat()).kernel_fn(x1, x2)
    ka, kb = a().kernel_fn(x1, x2), b().kernel_fn(x1, x2)
    assert_close(concat.nngp, (3 * ka.nngp + 5 * kb.nngp) / 8)
    assert_close(concat.ntk, (3 * ka.ntk + 5 * kb.ntk) / 8)
    assert concat.shape1 == (4, 8) and concat.shape2 == (3, 8)
    assert not concat.is_gaussian


def test_fan_in_concat_forward_concatenates_channels(x1):
    out = stax.FanInConcat()([x1, x1[:, :2]])
    assert out.shape == (4, 8)
    torch.testing.assert_close(out[:, 6:], x1[:, :2], rtol=0, atol=0)


def test_dense_after_concat_of_independent_dense_branches_matches_concat_of_inputs(x1, x2):
    # Dense(concat(z_a, z_b)) sees the width-weighted mean of the branch kernels.
    model = stax.serial(stax.FanOut(2),
                        stax.parallel(stax.Dense(2, W_std=1.2), stax.Dense(6, W_std=0.6, b_std=0.4)),
                        stax.FanInConcat(), stax.Dense(1, W_std=1.1, b_std=0.2))
    nngp = model.kernel_fn(x1, x2, get='nngp')
    inputs = x1 @ x2.T / 6
    expected = 1.1**2 * (2 * 1.2**2 * inputs + 6 * (0.6**2 * inputs + 0.16)) / 8 + 0.04
    assert_close(nngp, expected)


def test_residual_network_empirical_ntk_approaches_analytic():
    # A finite residual network; fluctuations ~ 1/sqrt(width), averaged over two seeds.
    width = 1024
    x = gaussian(5, 6, seed=3)

    def network():
        return stax.serial(stax.Dense(width, W_std=1.4, b_std=0.1), stax.FanOut(2),
                           stax.parallel(stax.serial(stax.Relu(), stax.Dense(width, W_std=1.2)),
                                         stax.Identity()),
                           stax.FanInSum(), stax.Erf(), stax.Dense(1, W_std=1.3, b_std=0.2))
    empirical = average_over_inits(network(), torchntk.empirical_ntk_fn, x, seeds=2)
    assert relative_error(empirical, network().kernel_fn(x, get='ntk')) < 0.15


def test_fan_in_prod_network_monte_carlo_nngp_approaches_analytic():
    # E[z_a z_b z_a' z_b'] = nngp_a·nngp_b for independent branches.
    width = 4096
    x = gaussian(5, 6, seed=4)
    model = stax.serial(stax.FanOut(2), stax.parallel(stax.Dense(width, W_std=1.3, b_std=0.2),
                                                      stax.Dense(width, W_std=0.8)),
                        stax.FanInProd(), stax.Dense(2048))
    monte_carlo = 0
    for seed in range(4):
        model.init_parameters(x.shape, generator=torch.Generator().manual_seed(seed),
                              dtype=torch.float64)
        monte_carlo = monte_carlo + torchntk.empirical_nngp_fn(model)(x) / 4
    assert relative_error(monte_carlo, model.kernel_fn(x, get='nngp')) < 0.12


def concat_of_two_branches(axis):
    return stax.serial(stax.FanOut(2),
                       stax.parallel(stax.Conv(3, (3, 3), padding='SAME', W_std=1.4, b_std=0.2),
                                     stax.Dense(3, W_std=0.8, b_std=0.5)),
                       stax.FanInConcat(axis=axis))


def test_fan_in_concat_along_space_is_block_diagonal(images1, images2):
    # Independent zero-mean branches are uncorrelated across the seam.
    concat = concat_of_two_branches(axis=3).kernel_fn(images1, images2, diagonal_spatial=False)
    conv = stax.Conv(3, (3, 3), padding='SAME', W_std=1.4, b_std=0.2).kernel_fn(
        images1, images2, diagonal_spatial=False)
    dense = stax.Dense(3, W_std=0.8, b_std=0.5).kernel_fn(images1, images2, diagonal_spatial=False)
    for name in ('nngp', 'ntk', 'cov1', 'cov2'):
        got, a, b = (getattr(k, name) for k in (concat, conv, dense))
        assert_close(got[..., :5, :5], a)
        assert_close(got[..., 5:, 5:], b)
        assert not got[..., :5, 5:].any() and not got[..., 5:, :5].any()
    assert concat.shape1 == (3, 3, 6, 10) and concat.shape2 == (2, 3, 6, 10)
    assert concat.is_gaussian


def test_fan_in_concat_along_space_agrees_between_layouts(images1, images2):
    model = stax.serial(concat_of_two_branches(axis=-2), stax.Relu(), stax.Flatten())
    diagonal = model.kernel_fn(images1, images2, diagonal_spatial=True)
    full = model.kernel_fn(images1, images2, diagonal_spatial=False)
    assert_close(diagonal.ntk, full.ntk, tol=1e-13)


def test_fan_in_concat_along_batch_is_block_diagonal(images1, images2):
    model = stax.serial(concat_of_two_branches(axis=0), stax.Relu(), stax.GlobalAvgPool())
    concat = model.kernel_fn(images1, images2, diagonal_batch=False)
    for i, branch in enumerate((stax.Conv(3, (3, 3), padding='SAME', W_std=1.4, b_std=0.2),
                                stax.Dense(3, W_std=0.8, b_std=0.5))):
        single = stax.serial(branch, stax.Relu(), stax.GlobalAvgPool()).kernel_fn(
            images1, images2, diagonal_batch=False)
        assert_close(concat.nngp[3 * i:3 * (i + 1), 2 * i:2 * (i + 1)], single.nngp)
        assert_close(concat.cov1[3 * i:3 * (i + 1), 3 * i:3 * (i + 1)], single.cov1)
    assert concat.shape1 == (6, 3) and concat.shape2 == (4, 3)
    seam = concat_of_two_branches(axis=0).kernel_fn(images1, images2, diagonal_batch=False)
    assert not seam.nngp[:3, 2:].any() and not seam.cov2[:2, 2:].any()
    assert seam.shape1 == (6, 3, 6, 5) and seam.shape2 == (4, 3, 6, 5)
    diagonal_batch = model.kernel_fn(images1, images2, diagonal_batch=True)
    assert_close(diagonal_batch.cov1, torch.diagonal(concat.cov1), tol=1e-13)


@pytest.mark.parametrize('axis', [0, 1, 2, -1])
def test_fan_in_concat_forward_concatenates_along_axis(images1, axis):
    model = stax.serial(stax.FanOut(2), stax.parallel(stax.Identity(), stax.Identity()),
                        stax.FanInConcat(axis=axis))
    out = model(images1)
    torch.testing.assert_close(out, torch.cat([images1, images1], dim=axis), rtol=0, atol=0)
    assert model.output_shape(images1.shape) == tuple(out.shape)
