"""`diagonal_spatial=True` on networks whose output keeps its spatial axes:
the same-position kernel `(N1, N2, X, Y, …)` (as neural-tangents), which is
the spatial diagonal of the full kernel; layers that mix positions refuse it,
naming themselves. Diagonal-spatial kernels never reach the fused chain."""

from unittest import mock

import pytest
import torch

from torchntk import stax
from torchntk.ops import conv_chain, extension

from tests.strategies import gaussian, relative_error


def same_positions(cov, batch_ndim):
    """`(B…, X, X', Y, Y', …) -> (B…, X, Y, …)`."""
    for _ in range((cov.ndim - batch_ndim) // 2):
        cov = torch.diagonal(cov, dim1=batch_ndim, dim2=batch_ndim + 1)
    return cov


def conv(n_spatial, **kwargs):
    kwargs = {'filter_shape': (3,) * n_spatial, 'padding': 'SAME', 'W_std': 1.3, 'b_std': 0.2,
              **kwargs}
    return stax.Conv(3, kwargs.pop('filter_shape'), **kwargs)


NETWORKS = {
    'conv-relu-conv': lambda n: [conv(n), stax.Relu(), conv(n, padding='VALID')],
    'circular-strided-erf': lambda n: [conv(n, padding='CIRCULAR', strides=(2,) * n),
                                       stax.Erf(), conv(n, filter_shape=(2,) * n)],
    'transpose-gelu': lambda n: [conv(n), stax.Gelu(),
                                 stax.ConvTranspose(3, (2,) * n, (2,) * n, W_std=0.9)],
    # Pooling after a locally connected layer (off-diagonal covariances zero).
    'local-avg-pool': lambda n: [conv(n), stax.Relu(), stax.ConvLocal(3, (2,) * n, b_std=0.1),
                                 stax.AvgPool((2,) * n, strides=(1,) + (2,) * (n - 1)),
                                 stax.Abs(), conv(n)],
    'residual-layer-norm': lambda n: [
        conv(n), stax.FanOut(2), stax.parallel(stax.serial(stax.Relu(), conv(n)), stax.Identity()),
        stax.FanInSum(), stax.LayerNorm(axis=tuple(range(1, n + 2))), stax.Relu(), conv(n)],
}
SHAPES = {1: ((3, 2, 7), (2, 2, 7)), 2: ((3, 2, 6, 5), (2, 2, 6, 5))}


@pytest.mark.parametrize('layout', ['x2', 'x2=None', 'diagonal_batch=False'])
@pytest.mark.parametrize('n_spatial', [1, 2])
@pytest.mark.parametrize('network', NETWORKS)
def test_diagonal_spatial_true_gives_the_diagonal_of_the_full_kernel(backend, network, n_spatial,
                                                                      layout):
    model = stax.serial(*NETWORKS[network](n_spatial))
    shape1, shape2 = SHAPES[n_spatial]
    x1, x2 = gaussian(*shape1, seed=0), None if layout == 'x2=None' else gaussian(*shape2, seed=1)
    diagonal_batch = False if layout == 'diagonal_batch=False' else None
    diagonal = model.kernel_fn(x1, x2, diagonal_spatial=True, diagonal_batch=diagonal_batch)
    full = model.kernel_fn(x1, x2, diagonal_spatial=False, diagonal_batch=diagonal_batch)
    assert diagonal.diagonal_spatial and not full.diagonal_spatial
    cov_batch_ndim = 2 if layout == 'diagonal_batch=False' else 1
    for field, batch_ndim in (('nngp', 2), ('ntk', 2), ('cov1', cov_batch_ndim),
                              ('cov2', cov_batch_ndim)):
        actual, expected = getattr(diagonal, field), getattr(full, field)
        assert (actual is None) == (expected is None), field
        if actual is not None:
            expected = same_positions(expected, batch_ndim)
            assert actual.shape == expected.shape, field
            assert relative_error(actual, expected) <= 1e-13, field


def test_default_layout_of_a_network_without_readout_stays_full():
    model = stax.serial(*NETWORKS['conv-relu-conv'](2))
    assert model.kernel_fn(gaussian(3, 2, 6, 5)).nngp.shape == (3, 3, 4, 4, 3, 3)


@pytest.mark.parametrize('layers, name', [
    pytest.param(lambda: [conv(2), stax.AvgPool((2, 2))], 'AvgPool', id='conv-avg-pool'),
    pytest.param(lambda: [conv(2), stax.Relu(), stax.GlobalAvgPool()], 'GlobalAvgPool',
                 id='conv-global-avg-pool'),
    pytest.param(lambda: [stax.SumPool((2, 2)), conv(2)], 'SumPool', id='inputs-sum-pool'),
    # Relu's mean makes the covariances between positions nonzero again.
    pytest.param(lambda: [stax.ConvLocal(3, (2, 2)), stax.Relu(), stax.AvgPool((2, 2))],
                 'AvgPool', id='local-relu-avg-pool'),
    pytest.param(lambda: [conv(2), stax.ImageResize((-1, -1, 3, 3), 'linear')], 'ImageResize',
                 id='conv-resize'),
])
def test_diagonal_spatial_true_with_a_layer_mixing_positions_raises_naming_it(layers, name):
    with pytest.raises(ValueError, match=r'Serial: diagonal_spatial=True is not possible: a layer '
                                         rf'.*different positions \({name}\)'):
        stax.serial(*layers()).kernel_fn(gaussian(3, 2, 6, 5), diagonal_spatial=True)


@pytest.mark.skipif(not conv_chain.available(torch.zeros(1, dtype=torch.float64)),
                    reason='the fused chain needs the compiled extension')
@pytest.mark.parametrize('x2_given', [True, False], ids=['x2', 'x2=None'])
@pytest.mark.parametrize('readout, flat_runs', [
    pytest.param(lambda: [stax.Dense(1)], 0, id='issue'),
    pytest.param(lambda: [stax.Dense(3, W_std=1.2, b_std=0.1), stax.Relu(), stax.Dense(1)], 1,
                 id='flat-run-after'),
])
def test_flatten_network_on_spatial_inputs_skips_the_chain_before_flatten(
        monkeypatch, readout, flat_runs, x2_given):
    """The run `Dense, Relu` before `Flatten` sees a diagonal-spatial kernel
    `(N1, N2, X)`: it goes layer by layer, only a flat run after `Flatten`
    goes through the chain, and the torch backend gives the same kernel."""
    layers = [stax.Dense(4, W_std=1.4, b_std=0.3), stax.Relu(), stax.Flatten(), *readout()]
    model = stax.serial(*layers)
    x1, x2 = gaussian(2, 3, 7, seed=2), gaussian(3, 3, 7, seed=3) if x2_given else None
    with mock.patch.object(conv_chain, 'chain_pairs', wraps=conv_chain.chain_pairs) as fused:
        with_extension = model.kernel_fn(x1, x2)
    assert [call.args[0].shape for call in fused.call_args_list] == \
        [(2, 3 if x2_given else 2)] * flat_runs
    monkeypatch.setattr(extension, 'EXTENSION', None)
    with_torch = model.kernel_fn(x1, x2)
    for field in ('nngp', 'ntk', 'cov1'):
        assert relative_error(getattr(with_extension, field), getattr(with_torch, field)) <= 1e-14
