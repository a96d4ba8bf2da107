"""`stax.Dropout`: identity kernel in eval mode, dropout noise on the diagonal in train mode."""

import pytest
import torch

from torchntk import stax

from tests.strategies import gaussian, relative_error


def network(p, width=8, out_dim=1):
    return stax.serial(stax.Dense(width, W_std=1.5, b_std=0.1), stax.Relu(), stax.Dropout(p),
                       stax.Dense(out_dim, W_std=1.2, b_std=0.2))


def without_dropout(width=8):
    return stax.serial(stax.Dense(width, W_std=1.5, b_std=0.1), stax.Relu(),
                       stax.Dense(1, W_std=1.2, b_std=0.2))


# Equal to rounding: without the dropout layer the Dense-Relu-Dense run is fused
# into one extension call (stax/fusion.py), with it the layers run one by one.
FUSION_ROUNDING = dict(rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize('diagonal_batch', [True, False])
def test_dropout_in_eval_mode_is_identity_kernel(x1, diagonal_batch):
    kernel = network(0.3).eval().kernel_fn(x1, diagonal_batch=diagonal_batch)
    expected = without_dropout().kernel_fn(x1, diagonal_batch=diagonal_batch)
    for name in ('nngp', 'ntk', 'cov1'):
        torch.testing.assert_close(getattr(kernel, name), getattr(expected, name),
                                   **FUSION_ROUNDING)


def test_dropout_with_p_zero_in_train_mode_is_identity_kernel(x1):
    kernel = network(0.).train().kernel_fn(x1)
    expected = without_dropout().kernel_fn(x1)
    torch.testing.assert_close(kernel.ntk, expected.ntk, **FUSION_ROUNDING)


def test_dropout_in_train_mode_scales_same_example_entries(x1):
    # Before the readout: E[d_i d_j]/(1-p)² is 1/(1-p) for i = j and 1 otherwise.
    p = 0.3
    train = stax.serial(stax.Dense(8, b_std=0.1), stax.Relu(), stax.Dropout(p)).train().kernel_fn(x1)
    plain = stax.serial(stax.Dense(8, b_std=0.1), stax.Relu()).kernel_fn(x1)
    scale = torch.ones(4, 4, dtype=torch.float64) + torch.eye(4, dtype=torch.float64) * (1 / (1 - p) - 1)
    torch.testing.assert_close(train.nngp, plain.nngp * scale, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(train.ntk, plain.ntk * scale, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(train.cov1, plain.cov1 / (1 - p), rtol=1e-14, atol=1e-14)


def test_dropout_in_train_mode_leaves_cross_kernel_of_distinct_inputs(x1, x2):
    p = 0.4
    train = stax.serial(stax.Dense(8, b_std=0.1), stax.Relu(), stax.Dropout(p)).train() \
        .kernel_fn(x1, x2, diagonal_batch=False)
    plain = stax.serial(stax.Dense(8, b_std=0.1), stax.Relu()).kernel_fn(x1, x2, diagonal_batch=False)
    torch.testing.assert_close(train.nngp, plain.nngp, rtol=0, atol=0)
    torch.testing.assert_close(torch.diagonal(train.cov2), torch.diagonal(plain.cov2) / (1 - p),
                               rtol=1e-14, atol=1e-14)
    off_diagonal = ~torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(train.cov2[off_diagonal], plain.cov2[off_diagonal], rtol=0, atol=0)


def test_dropout_in_train_mode_treats_equal_x2_like_x2_none(x1):
    model = network(0.3).train()
    torch.testing.assert_close(model.kernel_fn(x1, x1.clone(), get='ntk'),
                               model.kernel_fn(x1, get='ntk'), rtol=1e-14, atol=1e-14)


def test_dropout_kernel_follows_train_and_eval_switches(x1):
    model = network(0.5)
    train = model.train().kernel_fn(x1, get='nngp')
    evaluation = model.eval().kernel_fn(x1, get='nngp')
    assert not torch.allclose(train, evaluation)
    torch.testing.assert_close(model.train().kernel_fn(x1, get='nngp'), train, rtol=0, atol=0)


def test_dropout_in_train_mode_matches_monte_carlo_over_masks_and_weights():
    # f(x)·f(x')/O with a wide readout, averaged over initializations and dropout masks.
    p, width, out_dim, draws = 0.3, 2048, 2048, 4
    x = gaussian(5, 6, seed=2)
    model = network(p, width, out_dim).train()
    generator = torch.Generator().manual_seed(3)
    monte_carlo = 0
    with torch.no_grad():
        for seed in range(draws):
            model.init_parameters(x.shape, generator=generator, dtype=torch.float64)
            torch.manual_seed(seed)  # the dropout masks
            f = model(x)
            monte_carlo = monte_carlo + f @ f.T / out_dim / draws
    analytic = model.kernel_fn(x, get='nngp')
    error = relative_error(monte_carlo, analytic)
    assert error < 0.06
    # The dropout noise is far larger than the tolerance: eval mode's kernel is rejected.
    assert relative_error(monte_carlo, model.eval().kernel_fn(x, get='nngp')) > 2 * error


def test_dropout_forward_in_eval_mode_is_identity(x1):
    assert torch.equal(stax.Dropout(0.5).eval()(x1), x1)


def test_dropout_forward_in_train_mode_drops_and_rescales():
    torch.manual_seed(0)
    x = torch.ones(200, 500, dtype=torch.float64)
    out = stax.Dropout(0.25).train()(x)
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.75))


def test_dropout_output_is_not_gaussian_in_train_mode(x1):
    assert not stax.Dropout(0.2).train().kernel_fn(x1).is_gaussian
