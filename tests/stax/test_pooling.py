"""`stax.AvgPool`, `SumPool`, `GlobalAvgPool`, `GlobalSumPool`, `Flatten`: finite
forward against torch.nn, kernels of these linear layers, requirements, errors."""

import pytest
import torch

from torchntk import stax
from torchntk.kernel import kernel_from_inputs
from torchntk.stax.requirements import resolve_layout

from tests.strategies import gaussian


# --- finite forward -------------------------------------------------------------------------------

def test_avg_pool_forward_is_torch_avg_pool2d(images1):
    torch.testing.assert_close(stax.AvgPool((2, 2), strides=(2, 2))(images1),
                               torch.nn.AvgPool2d(2)(images1), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize('normalize_edges', [False, True])
def test_avg_pool_same_padding_is_torch_count_include_pad(images1, normalize_edges):
    ours = stax.AvgPool((3, 3), padding='SAME', normalize_edges=normalize_edges)(images1)
    reference = torch.nn.AvgPool2d(3, 1, padding=1, count_include_pad=not normalize_edges)
    torch.testing.assert_close(ours, reference(images1), rtol=1e-14, atol=1e-14)


def test_avg_pool_circular_forward_wraps_around(images1):
    ours = stax.AvgPool((3, 3), padding='CIRCULAR')(images1)
    padded = torch.nn.functional.pad(images1, (1, 1, 1, 1), mode='circular')
    torch.testing.assert_close(ours, torch.nn.AvgPool2d(3, 1)(padded), rtol=1e-14, atol=1e-14)


def test_sum_pool_is_avg_pool_times_window_size(images1):
    torch.testing.assert_close(stax.SumPool((2, 3), strides=(1, 2), padding='SAME')(images1),
                               6 * stax.AvgPool((2, 3), strides=(1, 2), padding='SAME')(images1),
                               rtol=1e-14, atol=1e-14)


def test_global_pools_and_flatten_forward(images1):
    torch.testing.assert_close(stax.GlobalAvgPool()(images1), images1.mean((2, 3)))
    torch.testing.assert_close(stax.GlobalSumPool()(images1), images1.sum((2, 3)))
    torch.testing.assert_close(stax.Flatten()(images1), torch.nn.Flatten()(images1))


# --- kernels of parameter-free linear layers are Gram matrices of their outputs -------------------

LINEAR_LAYERS = {
    'avg_valid': lambda: stax.AvgPool((2, 2), strides=(2, 1)),
    'avg_same': lambda: stax.AvgPool((3, 2), strides=(2, 2), padding='SAME'),
    'avg_same_edges': lambda: stax.AvgPool((3, 3), padding='SAME', normalize_edges=True),
    'avg_circular': lambda: stax.AvgPool((3, 2), strides=(1, 2), padding='CIRCULAR'),
    'sum_same': lambda: stax.SumPool((2, 3), strides=(2, 1), padding='SAME'),
    'global_avg': lambda: stax.GlobalAvgPool(),
    'global_sum': lambda: stax.GlobalSumPool(),
    'flatten': lambda: stax.Flatten(),
    'avg_then_flatten': lambda: stax.serial(stax.AvgPool((2, 2), padding='CIRCULAR'),
                                            stax.Flatten()),
}


@pytest.mark.parametrize('make_layer', LINEAR_LAYERS.values(), ids=LINEAR_LAYERS.keys())
def test_kernel_is_the_gram_matrix_of_the_outputs(make_layer, images1, images2):
    layer = make_layer()
    kernel = layer.kernel_fn(images1, images2, diagonal_batch=False, diagonal_spatial=False)
    outputs = kernel_from_inputs(layer(images1), layer(images2), diagonal_batch=False,
                                 diagonal_spatial=False, compute_ntk=False)
    for key in ('nngp', 'cov1', 'cov2'):
        torch.testing.assert_close(getattr(kernel, key), getattr(outputs, key), rtol=1e-13,
                                   atol=1e-13)
    assert kernel.shape1 == tuple(layer(images1).shape)


def test_pooling_in_one_and_three_dimensions_gives_gram_matrices():
    for shape, window in (((2, 2, 7), (3,)), ((2, 2, 4, 3, 5), (2, 2, 3))):
        x1, x2 = gaussian(*shape, seed=2), gaussian(*shape, seed=3)
        layer = stax.AvgPool(window, padding='SAME', normalize_edges=True)
        nngp = layer.kernel_fn(x1, x2, get='nngp', diagonal_spatial=False)
        expected = kernel_from_inputs(layer(x1), layer(x2), diagonal_batch=True,
                                      diagonal_spatial=False, compute_ntk=False).nngp
        torch.testing.assert_close(nngp, expected, rtol=1e-13, atol=1e-13)


# --- requirements and layouts ------------------------------------------------------------------

def test_two_pools_after_conv_local_need_full_spatial():
    net = stax.serial(stax.ConvLocal(2, (3, 3)), stax.AvgPool((2, 2)), stax.SumPool((2, 2)),
                      stax.Flatten())
    assert resolve_layout(net.requirements, None, None, '') == (True, False)


def test_avg_pool_after_conv_needs_full_spatial():
    net = stax.serial(stax.Conv(2, (3, 3)), stax.Relu(), stax.AvgPool((2, 2)), stax.Flatten())
    assert resolve_layout(net.requirements, None, None, '') == (True, False)


def test_avg_pool_after_conv_local_runs_diagonal_and_agrees_with_full(images1, images2):
    # Right after ConvLocal the off-diagonal covariances are zero, so one pooling
    # layer reads only the diagonal; a second one (or a Relu first) would not.
    net = stax.serial(stax.Conv(3, (2, 2), b_std=0.1), stax.Relu(),
                      stax.ConvLocal(3, (2, 2), padding='SAME', b_std=0.2),
                      stax.AvgPool((2, 3), strides=(2, 1), padding='SAME', normalize_edges=True),
                      stax.Relu(), stax.Flatten(), stax.Dense(1))
    assert resolve_layout(net.requirements, None, None, '') == (True, True)
    diagonal = net.kernel_fn(images1, images2)
    full = net.kernel_fn(images1, images2, diagonal_spatial=False)
    for key in ('nngp', 'ntk', 'cov1', 'cov2'):
        torch.testing.assert_close(getattr(full, key), getattr(diagonal, key), rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize('readout', [stax.GlobalAvgPool, stax.GlobalSumPool])
def test_global_pool_after_conv_local_runs_diagonal_and_agrees_with_full(readout, images1):
    net = stax.serial(stax.ConvLocal(3, (3, 2), b_std=0.2), stax.Relu(), stax.ConvLocal(3, (2, 2)),
                      readout(), stax.Dense(1))
    diagonal = net.kernel_fn(images1)
    full = net.kernel_fn(images1, diagonal_spatial=False)
    torch.testing.assert_close(full.ntk, diagonal.ntk, rtol=1e-12, atol=1e-12)


def test_flatten_output_is_not_gaussian(images1):
    kernel = stax.serial(stax.Conv(2, (2, 2)), stax.Flatten()).kernel_fn(images1)
    assert not kernel.is_gaussian
    with pytest.raises(ValueError, match='Gaussian'):
        stax.serial(stax.Conv(2, (2, 2)), stax.Flatten(), stax.Relu()).kernel_fn(images1)


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, error, match', [
    (dict(window_shape=(2, 2), padding='REFLECT'), ValueError, 'padding'),
    (dict(window_shape=(2, 2), padding=None), TypeError, 'padding'),
    (dict(window_shape=(2, 2), strides=(1, 1, 1)), ValueError, 'strides'),
    (dict(window_shape=(2, 2, 2, 2)), ValueError, 'window_shape'),
    (dict(window_shape=(2, 2), normalize_edges=1), TypeError, 'normalize_edges'),
])
def test_avg_pool_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        stax.AvgPool(**kwargs)


def test_pool_window_rank_must_match_input_rank(images1):
    with pytest.raises(ValueError, match='SumPool: a 3-d window'):
        stax.SumPool((2, 2, 2)).kernel_fn(images1)


def test_extra_repr():
    assert repr(stax.AvgPool((2, 2), strides=(2, 2), padding='same', normalize_edges=True)) == \
        "AvgPool((2, 2), strides=(2, 2), padding='SAME', normalize_edges=True)"
