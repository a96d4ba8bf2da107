"""Batches of no examples: `kernel_fn` returns the empty kernels of the right
shapes, in both backends, and `forward` the empty outputs."""

from unittest import mock

import pytest
import torch

from torchntk import stax
from torchntk.ops import conv_chain

from tests.strategies import gaussian


def conv():
    return stax.Conv(3, (3, 3), padding='SAME', W_std=1.3, b_std=0.2)


NETWORKS = {
    'mlp': (lambda: stax.serial(stax.Dense(5, 1.3, 0.2), stax.Relu(), stax.Dense(1)), (4, 6)),
    'mlp-erf-layernorm': (lambda: stax.serial(stax.Dense(5, 1.3, 0.2), stax.LayerNorm(), stax.Erf(),
                                              stax.Dense(1)), (4, 6)),
    # The fused chain with the extension, then the readout.
    'cnn-flatten': (lambda: stax.serial(conv(), stax.Relu(), conv(), stax.Relu(), stax.Flatten(),
                                        stax.Dense(1)), (3, 2, 5, 4)),
    'cnn-spatial-outputs': (lambda: stax.serial(conv(), stax.Relu(), conv()), (3, 2, 5, 4)),
    'cnn-global-pool': (lambda: stax.serial(conv(), stax.Gelu(), stax.GlobalAvgPool(),
                                            stax.Dense(1)), (3, 2, 5, 4)),
}


def assert_empty_like(actual, expected):
    """`actual` is `expected` with no examples on the sides that are empty."""
    for field in ('nngp', 'ntk', 'cov1', 'cov2'):
        a, e = getattr(actual, field), getattr(expected, field)
        assert (a is None) == (e is None), field
        if a is not None:
            assert a.shape == e.shape and a.dtype == e.dtype, (field, a.shape, e.shape)
    assert actual.shape1 == expected.shape1 and actual.shape2 == expected.shape2


@pytest.mark.parametrize('network', NETWORKS)
@pytest.mark.parametrize('side', ['x1', 'x2', 'both', 'x1 alone'])
def test_an_empty_batch_gives_the_empty_kernel(network, side, backend):
    build, shape = NETWORKS[network]
    model = build()
    x1, x2 = gaussian(*shape, seed=0), gaussian(2, *shape[1:], seed=1)
    cut1 = side in ('x1', 'both', 'x1 alone')
    cut2 = side in ('x2', 'both')
    empty1, empty2 = x1[:0] if cut1 else x1, x2[:0] if cut2 else x2
    if side == 'x1 alone':
        actual, full = model.kernel_fn(empty1), model.kernel_fn(x1)
        expected = full.replace(nngp=full.nngp[:0, :0], ntk=full.ntk[:0, :0], cov1=full.cov1[:0],
                                shape1=(0, *full.shape1[1:]), shape2=(0, *full.shape2[1:]))
        assert actual.cov2 is None and bool(actual.x1_is_x2)
    else:
        actual, full = model.kernel_fn(empty1, empty2), model.kernel_fn(x1, x2)
        n1, n2 = (0 if cut1 else None), (0 if cut2 else None)
        expected = full.replace(nngp=full.nngp[:n1, :n2], ntk=full.ntk[:n1, :n2],
                                cov1=full.cov1[:n1], cov2=full.cov2[:n2],
                                shape1=tuple(empty1.shape[:1]) + full.shape1[1:],
                                shape2=tuple(empty2.shape[:1]) + full.shape2[1:])
        assert bool(actual.x1_is_x2) == (cut1 and cut2)
        # The batch that is not empty keeps its own covariances.
        if not cut1:
            torch.testing.assert_close(actual.cov1, full.cov1, rtol=1e-13, atol=0)
        if not cut2:
            torch.testing.assert_close(actual.cov2, full.cov2, rtol=1e-13, atol=0)
    assert_empty_like(actual, expected)


def test_an_empty_batch_with_get_and_full_covariances(backend):
    model = NETWORKS['cnn-spatial-outputs'][0]()
    x = gaussian(3, 2, 5, 4, seed=2)
    nngp, ntk = model.kernel_fn(x[:0], x, get=('nngp', 'ntk'), diagonal_batch=False)
    assert nngp.shape == ntk.shape == (0, 3, 5, 5, 4, 4)


def test_an_empty_float32_batch_gives_a_float32_kernel(backend):
    model = NETWORKS['mlp'][0]()
    ntk = model.kernel_fn(torch.zeros(0, 6), torch.ones(2, 6), get='ntk')
    assert ntk.shape == (0, 2) and ntk.dtype == torch.float32


def test_an_empty_batch_takes_the_fused_chain_path_it_would_take():
    if not conv_chain.available(torch.zeros(1, dtype=torch.float64)):
        pytest.skip('needs the compiled extension')
    model = NETWORKS['cnn-flatten'][0]()
    with mock.patch.object(conv_chain, 'chain_pairs', wraps=conv_chain.chain_pairs) as fused:
        nngp = model.kernel_fn(gaussian(0, 2, 5, 4), gaussian(2, 2, 5, 4, seed=3), get='nngp',
                               diagonal_spatial=False)
    assert fused.call_count == 1 and nngp.shape == (0, 2)


def test_an_empty_batch_of_a_network_with_two_inputs():
    model = stax.serial(stax.parallel(stax.Dense(4), stax.Dense(4)), stax.FanInSum(), stax.Relu(),
                        stax.Dense(1))
    x = gaussian(3, 5, seed=4)
    nngp = model.kernel_fn([x[:0], x[:0]], [x, x], get='nngp')
    assert nngp.shape == (0, 3)


def test_an_empty_batch_with_a_mask_constant():
    model = stax.serial(stax.Dense(4), stax.Relu(), stax.GlobalAvgPool(), stax.Dense(1))
    x = gaussian(3, 2, 5, seed=5)
    k = model.kernel_fn(x[:0], x, mask_constant=1.)
    assert k.nngp.shape == (0, 3) and k.mask1.shape[0] == 0


def test_an_empty_batch_through_forward_gives_empty_outputs():
    model = NETWORKS['cnn-flatten'][0]()
    model.init_parameters((3, 2, 5, 4), generator=torch.Generator().manual_seed(0))
    assert model(torch.zeros(0, 2, 5, 4)).shape == (0, 1)
