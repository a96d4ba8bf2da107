"""Masked inputs (`kernel_fn(..., mask_constant=...)`, `forward_masked`): what masks do
to kernels, how each layer maps masks, and the finite network the kernels describe.
neural-tangents' values for masked networks are in tests/stax/test_reference.py."""

import math

import pytest
import torch

from torchntk import stax

from tests.strategies import gaussian, relative_error

MASK = -1.


def masked_sequences(lengths, channels=2, size=8, seed=0):
    """`(N, C, size)` sequences whose positions past each length are `MASK`."""
    x = gaussian(len(lengths), channels, size, seed=seed)
    for i, length in enumerate(lengths):
        x[i, :, length:] = MASK
    return x


def conv_gap_network():
    return stax.serial(stax.Conv(3, (3,), padding='SAME', W_std=1.3, b_std=0.2), stax.Relu(),
                       stax.Conv(3, (3,), padding='SAME', W_std=1.2, b_std=0.1), stax.Erf(),
                       stax.GlobalAvgPool(), stax.Dense(1, W_std=1.1, b_std=0.1))


NETWORKS = {
    'dense-gap': lambda: stax.serial(stax.Dense(3, W_std=1.3, b_std=0.2), stax.Relu(),
                                     stax.GlobalAvgPool(), stax.Dense(1)),
    'conv-gap': conv_gap_network,
    'avgpool-flatten': lambda: stax.serial(stax.Conv(3, (2,), b_std=0.3), stax.Gelu(),
                                           stax.AvgPool((2,), (2,), 'SAME'), stax.Flatten(),
                                           stax.Dense(1)),
    'transpose-layernorm': lambda: stax.serial(
        stax.ConvTranspose(3, (3,), (2,), 'SAME', b_std=0.1), stax.LayerNorm(axis=(1, 2)),
        stax.Relu(), stax.GlobalAvgPool(), stax.Dense(1)),
    'concat-space-resize': lambda: stax.serial(
        stax.FanOut(2), stax.parallel(stax.Dense(3, b_std=0.2), stax.Conv(3, (3,), padding='SAME')),
        stax.FanInConcat(axis=2), stax.ImageResize((-1, -1, 5), 'linear'), stax.Relu(),
        stax.GlobalAvgPool(), stax.Dense(1)),
}


@pytest.mark.parametrize('network', NETWORKS)
def test_masked_entries_do_not_change_the_kernel(network):
    model = NETWORKS[network]()
    x1, x2 = masked_sequences((8, 5, 3), seed=0), masked_sequences((6, 8), seed=1)
    masks = (x1 == MASK, x2 == MASK)
    reference = model.kernel_fn(x1, x2, mask_constant=MASK)
    for constant in (7.5, math.nan, math.inf):
        y1, y2 = (torch.where(m, constant, x) for x, m in zip((x1, x2), masks))
        kernel = model.kernel_fn(y1, y2, mask_constant=constant)
        for name in ('nngp', 'ntk', 'cov1', 'cov2'):
            torch.testing.assert_close(getattr(kernel, name), getattr(reference, name),
                                       rtol=0, atol=0)


def test_masked_tail_is_the_kernel_of_the_shorter_sequence():
    # SAME convolutions see zeros past the end either way, and the average
    # pools over the unmasked positions only: padding to length 8 changes nothing.
    model = conv_gap_network()
    x1, x2 = masked_sequences((5, 8), seed=2), masked_sequences((5, 5), seed=3)
    padded = model.kernel_fn(x1, x2, mask_constant=MASK)
    short = model.kernel_fn(x1[:1, :, :5], x2[:, :, :5])
    for name in ('nngp', 'ntk'):
        torch.testing.assert_close(getattr(padded, name)[:1], getattr(short, name),
                                   rtol=1e-13, atol=0)


def test_unmasked_inputs_give_the_unmasked_kernel(images1, images2):
    model = stax.serial(stax.Conv(3, (3, 3), padding='SAME', b_std=0.1), stax.Relu(),
                        stax.AvgPool((2, 2)), stax.GlobalAvgPool(), stax.Dense(1))
    masked = model.kernel_fn(images1, images2, mask_constant=MASK)
    plain = model.kernel_fn(images1, images2)
    torch.testing.assert_close(masked.ntk, plain.ntk, rtol=1e-14, atol=0)
    assert plain.mask1 is None and not masked.mask1.any()


@pytest.mark.parametrize('model', [
    pytest.param(lambda: stax.serial(stax.Dense(3, b_std=0.2), stax.Relu(),
                                     stax.ConvLocal(3, (3,), padding='SAME', b_std=0.1),
                                     stax.GlobalAvgPool()), id='conv-local-gap'),
    pytest.param(lambda: stax.serial(stax.Dense(3, b_std=0.2), stax.Relu(), stax.Flatten(),
                                     stax.Dense(1)), id='flatten'),
    pytest.param(lambda: stax.serial(stax.FanOut(2), stax.parallel(stax.Dense(3), stax.Dense(3)),
                                     stax.FanInConcat(axis=2), stax.Erf(), stax.Flatten()),
                 id='concat-space-flatten'),
])
def test_masked_kernel_is_the_same_in_both_spatial_layouts(model):
    # neural-tangents' diagonal-spatial average pool divides by |S|·(positions
    # unmasked in both) instead: its two layouts disagree there.
    x1, x2 = masked_sequences((7, 4, 2), seed=4), masked_sequences((3, 8), seed=5)
    diagonal = model().kernel_fn(x1, x2, mask_constant=MASK, diagonal_spatial=True)
    full = model().kernel_fn(x1, x2, mask_constant=MASK, diagonal_spatial=False,
                             diagonal_batch=False)
    torch.testing.assert_close(diagonal.ntk, full.ntk, rtol=1e-13, atol=1e-16)
    torch.testing.assert_close(diagonal.cov1, torch.einsum('ii...->i...', full.cov1),
                               rtol=1e-13, atol=1e-16)


def test_masked_kernel_gradients_are_correct_and_finite():
    # Masked positions reach the ReLU with zero variance; their covariances are
    # constant zeros, and every derivative stays finite.
    mask = masked_sequences((5, 3), channels=2, size=6, seed=6) == MASK
    values = gaussian(2, 2, 6, seed=7)

    def kernel(x, W_std, b_std):
        model = stax.serial(stax.Conv(2, (3,), padding='SAME', W_std=W_std, b_std=b_std),
                            stax.Relu(), stax.Conv(2, (2,), W_std=W_std, b_std=b_std),
                            stax.AvgPool((2,), padding='SAME'), stax.Relu(),
                            stax.GlobalAvgPool(), stax.Dense(1, W_std=W_std, b_std=b_std))
        k = model.kernel_fn(torch.where(mask, MASK, x), get=('nngp', 'ntk'), mask_constant=MASK)
        return k.nngp, k.ntk

    arguments = (values.requires_grad_(), torch.tensor(1.3, dtype=torch.float64, requires_grad=True),
                 torch.tensor(0.2, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(kernel, arguments)
    nngp, ntk = kernel(*arguments)
    grads = torch.autograd.grad(nngp.sum() + ntk.sum(), arguments)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert bool((grads[0][mask] == 0).all())


def test_forward_masked_matches_the_kernel_of_wide_networks():
    # The finite network zeroes its outputs at masked positions after affine
    # layers and averages over unmasked positions; its output covariance over
    # random initializations approaches the masked NNGP.
    width, seeds, out_dim = 512, 4, 256
    model = stax.serial(stax.Conv(width, (3,), padding='SAME', W_std=1.3, b_std=0.3), stax.Relu(),
                        stax.Conv(width, (2,), padding='SAME', W_std=1.2, b_std=0.2), stax.Erf(),
                        stax.GlobalAvgPool(), stax.Dense(out_dim, W_std=1.1, b_std=0.1))
    x = masked_sequences((8, 5, 2, 6), seed=8)
    monte_carlo = 0
    for seed in range(seeds):
        model.init_parameters(x.shape, generator=torch.Generator().manual_seed(seed),
                              dtype=torch.float64)
        with torch.no_grad():
            y, mask = model.forward_masked(x, MASK)
        monte_carlo = monte_carlo + y @ y.T / (out_dim * seeds)
    assert not mask.any()
    nngp = model.kernel_fn(x, get='nngp', mask_constant=MASK)
    assert relative_error(monte_carlo, nngp) < 0.1
    assert relative_error(monte_carlo, model.kernel_fn(torch.where(x == MASK, 0., x),
                                                       get='nngp')) > 0.2


def test_forward_masked_returns_output_masks():
    model = stax.serial(stax.Conv(4, (3,), b_std=0.5), stax.Relu())
    x = masked_sequences((8, 3), size=8, seed=9)
    y, mask = model.forward_masked(x, MASK)
    assert mask.shape == (2, 1, 6)
    assert mask[0].tolist() == [[False] * 6]
    assert mask[1].tolist() == [[False, False, True, True, True, True]]
    assert bool((y[1, :, 2:] == 0).all()) and bool((y[0] != 0).any())


# --- how each layer maps masks ------------------------------------------------------------------

def output_mask(layer, mask, shape):
    """The mask of `layer`'s outputs on inputs of `shape` masked by `mask`."""
    x = torch.where(mask, MASK, gaussian(*shape, seed=10))
    return layer.kernel_fn(x, get='mask1', mask_constant=MASK)


def positions(*flags):
    """A `(1, 1, X)` mask from 0/1 flags."""
    return torch.tensor(flags, dtype=torch.bool).view(1, 1, -1)


def test_kernel_from_inputs_records_entrywise_masks(x1, x2):
    x1 = x1.clone()
    x1[0, 2] = MASK
    k = stax.Identity().kernel_fn(x1, x2, mask_constant=MASK)
    assert k.mask1.tolist() == (x1 == MASK).tolist() and not k.mask2.any()
    assert stax.Identity().kernel_fn(x1, mask_constant=MASK).mask2 is None
    unmasked = torch.where(x1 == MASK, 0., x1)
    torch.testing.assert_close(k.nngp, unmasked @ x2.T / 6, rtol=1e-15, atol=0)


def test_dense_masks_positions_masked_in_every_channel():
    mask = torch.tensor([[[1, 0, 1], [1, 1, 0]]], dtype=torch.bool)
    assert output_mask(stax.Dense(2), mask, (1, 2, 3)).tolist() == [[[True, False, False]]]


@pytest.mark.parametrize('layer, expected', [
    (stax.Conv(1, (3,)), [0, 1, 1, 0]),                       # centre of each VALID window
    (stax.Conv(1, (2,), (2,)), [0, 1, 0]),                    # even window: the left centre
    (stax.Conv(1, (3,), padding='SAME'), [0, 0, 1, 1, 0, 0]),
    (stax.AvgPool((4,), padding='CIRCULAR'), [0, 0, 1, 1, 0, 0]),
    (stax.SumPool((3,), (2,), 'SAME'), [0, 1, 0]),
    (stax.ConvTranspose(1, (2,)), [0, 0, 1, 1, 1, 0, 0]),       # any masked input
    (stax.ImageResize((-1, -1, 3), 'linear'), [0, 0, 0]),      # content wins over masks
    (stax.ImageResize((-1, -1, 3), 'nearest'), [0, 1, 0]),
    (stax.GlobalAvgPool(), None),
])
def test_window_layers_map_masks_as_neural_tangents(layer, expected):
    mask = positions(0, 0, 1, 1, 0, 0)
    got = output_mask(layer, mask, (1, 1, 6))
    if expected is None:
        assert got.tolist() == [[False]]
    else:
        assert got.tolist() == [[[bool(v) for v in expected]]]


def test_global_pool_masks_examples_with_every_position_masked():
    mask = torch.tensor([[[1, 1]], [[1, 0]]], dtype=torch.bool)
    assert output_mask(stax.GlobalSumPool(), mask, (2, 1, 2)).tolist() == [[True], [False]]


def test_flatten_masks_each_feature():
    mask = positions(1, 0, 0)
    assert output_mask(stax.Flatten(), mask, (1, 2, 3)).tolist() == \
        [[True, False, False, True, False, False]]


def test_fan_in_sum_masks_where_every_branch_is_masked_and_concat_concatenates():
    branches = stax.parallel(stax.Conv(1, (3,), padding='SAME'), stax.Conv(1, (2,), padding='SAME'))
    mask = positions(0, 1, 1, 0, 0)
    summed = output_mask(stax.serial(stax.FanOut(2), branches, stax.FanInSum()), mask, (1, 1, 5))
    concat = output_mask(stax.serial(stax.FanOut(2), branches, stax.FanInConcat(axis=-1)), mask,
                         (1, 1, 5))
    assert summed.tolist() == positions(0, 1, 1, 0, 0).tolist()
    assert concat.tolist() == positions(0, 1, 1, 0, 0, 0, 1, 1, 0, 0).tolist()


def test_remasking_layers_zero_covariances_of_masked_positions():
    x = masked_sequences((3,), size=5, seed=11)
    k = stax.Dense(2, b_std=0.5).kernel_fn(x, get=None, mask_constant=MASK,
                                           diagonal_spatial=False)
    assert bool((k.nngp[0, 0, 3:] == 0).all()) and bool((k.nngp[0, 0, :, 3:] == 0).all())
    assert bool((k.nngp[0, 0, :3, :3] != 0).all())


# --- errors -------------------------------------------------------------------------------------

def test_mask_that_differs_between_channels_raises_where_positions_are_pooled():
    x = gaussian(2, 2, 4)
    x[0, 0, 1] = MASK
    with pytest.raises(ValueError, match=r'GlobalAvgPool: the mask differs between channels'):
        stax.GlobalAvgPool().kernel_fn(x, mask_constant=MASK)
    # An affine layer first masks a position only when all its channels are.
    stax.serial(stax.Dense(2), stax.GlobalAvgPool()).kernel_fn(x, mask_constant=MASK)


@pytest.mark.parametrize('constant', ['-1', True, torch.tensor(1.)])
def test_mask_constant_that_is_not_a_number_raises(x1, constant):
    with pytest.raises(TypeError, match=r'Dense: mask_constant must be a float'):
        stax.Dense(1).kernel_fn(x1, mask_constant=constant)
    with pytest.raises(TypeError, match=r'Dense: mask_constant must be a float'):
        stax.Dense(1).forward_masked(x1, constant)


def test_mask_constant_with_kernel_input_raises(x1):
    k = stax.Dense(1).kernel_fn(x1, get=None)
    with pytest.raises(ValueError, match=r'mask_constant must be None when x1 is a Kernel'):
        stax.Relu().kernel_fn(k, mask_constant=MASK)


def test_non_finite_inputs_other_than_the_mask_constant_raise(x1):
    x1 = x1.clone()
    x1[0, 0], x1[1, 1] = math.nan, math.inf
    stax.Dense(1).kernel_fn(torch.where(torch.isinf(x1), math.nan, x1), mask_constant=math.nan)
    with pytest.raises(ValueError, match=r'x1 contains non-finite values .* not the mask_constant'):
        stax.Dense(1).kernel_fn(x1, mask_constant=math.nan)
