"""Runs of Conv, pooling and ReLU-like layers through the extension's fused
chain (stax/fusion.py, csrc/conv_chain.cpp) give the layers' own kernels."""

from unittest import mock

import pytest
import torch

from torchntk import stax
from torchntk.functional import elementwise as maps
from torchntk.ops import conv_chain
from torchntk.stax.fusion import FusedRun, fused_runs

from tests.strategies import gaussian, relative_error

needs_chain = pytest.mark.skipif(not conv_chain.available(torch.zeros(1, dtype=torch.float64)),
                                 reason='the fused chain needs the compiled extension')


def conv(n_spatial=2, **kwargs):
    kwargs = {'padding': 'SAME', 'W_std': 1.3, 'b_std': 0.2, **kwargs}
    return stax.Conv(4, kwargs.pop('filter_shape', (3,) * n_spatial), **kwargs)


CHAINS = {
    'same-relu': lambda: [conv(), stax.Relu(), conv(), stax.Relu()],
    'circular-valid-strided': lambda: [conv(padding='CIRCULAR'), stax.LeakyRelu(0.1),
                                       conv(padding='VALID', strides=(2, 1)), stax.Abs(), conv()],
    'standard-parameterization': lambda: [
        conv(parameterization='standard'), stax.ABRelu(-0.3, 0.7),
        conv(b_std=None, parameterization='standard', s=(2, 3)), stax.Relu()],
    'no-bias-even-window': lambda: [conv(b_std=None, filter_shape=(2, 4)), stax.Relu(),
                                    conv(filter_shape=(1, 3), padding='VALID')],
    'conv-then-dense': lambda: [conv(), stax.Relu(), stax.Dense(3, W_std=1.1, b_std=0.3),
                                stax.LeakyRelu(-0.2), stax.Dense(2, parameterization='standard')],
    # Pools between and after the convolutions, and a nonlinearity right after
    # a pool (its input is Gaussian through it).
    'pools': lambda: [conv(), stax.Relu(), stax.AvgPool((2, 2), strides=(2, 2)), conv(),
                      stax.SumPool((3, 2), strides=(1, 2), padding='SAME'), stax.Relu(),
                      stax.AvgPool((2, 1), padding='CIRCULAR', normalize_edges=True),
                      conv(padding='VALID', filter_shape=(2, 1)), stax.Abs(),
                      stax.AvgPool((2, 1), strides=(1, 1))],
}
FLAT_CHAINS = {
    'dense-relu': lambda: [stax.Dense(8, 1.5, 0.05), stax.Relu(), stax.Dense(8, 1.5, 0.05),
                           stax.Relu(), stax.Dense(1, 1.5, 0.05)],
    'standard-abrelu': lambda: [stax.Dense(8, 1.2, parameterization='standard', s=(2, 1)),
                                stax.ABRelu(0.4, -1.1), stax.Dense(3, 0.9, 0.2, 'standard')],
    'dense-only': lambda: [stax.Dense(8, 1.2, 0.1), stax.Dense(3, 0.7)],
}
SHAPES = {1: (3, 2, 7), 2: (3, 2, 6, 5), 3: (2, 1, 4, 3, 5)}


def layer_by_layer(layers, x1, x2):
    k = stax.Identity().kernel_fn(x1, x2, diagonal_spatial=False if x1.ndim > 2 else None)
    for layer in layers:
        k = layer.propagate(k)
    return k


def assert_same_kernels(actual, expected, tolerance):
    for field in ('nngp', 'ntk', 'cov1', 'cov2'):
        a, e = getattr(actual, field), getattr(expected, field)
        assert (a is None) == (e is None), field
        if a is not None:
            assert a.shape == e.shape, field
            assert relative_error(a, e) <= tolerance, (field, relative_error(a, e))
    assert actual.is_gaussian == expected.is_gaussian
    assert actual.shape1 == expected.shape1 and actual.shape2 == expected.shape2


@needs_chain
@pytest.mark.parametrize('x2_given', [True, False], ids=['x2', 'x2=None'])
@pytest.mark.parametrize('chain', CHAINS)
def test_fused_chain_equals_the_layers_one_at_a_time(chain, x2_given):
    layers = CHAINS[chain]()
    x1, x2 = gaussian(3, 2, 6, 5, seed=0), gaussian(2, 2, 6, 5, seed=1) if x2_given else None
    with mock.patch.object(conv_chain, 'chain_pairs', wraps=conv_chain.chain_pairs) as fused:
        actual = stax.serial(*layers).kernel_fn(x1, x2, diagonal_spatial=False)
    assert fused.call_count == 1
    assert_same_kernels(actual, layer_by_layer(layers, x1, x2), 1e-13)


@needs_chain
@pytest.mark.parametrize('get', [None, 'nngp'], ids=['all', 'nngp'])
@pytest.mark.parametrize('x2_given', [True, False], ids=['x2', 'x2=None'])
@pytest.mark.parametrize('chain', FLAT_CHAINS)
def test_fused_flat_chain_equals_the_layers_one_at_a_time(chain, x2_given, get):
    layers = FLAT_CHAINS[chain]()
    x1, x2 = gaussian(5, 7, seed=0), gaussian(4, 7, seed=1) if x2_given else None
    with mock.patch.object(conv_chain, 'chain_pairs', wraps=conv_chain.chain_pairs) as fused:
        actual = stax.serial(*layers).kernel_fn(x1, x2, get=get)
    assert fused.call_count == 1
    expected = layer_by_layer(layers, x1, x2)
    if get == 'nngp':
        assert relative_error(actual, expected.nngp) <= 1e-14
    else:
        assert_same_kernels(actual, expected, 1e-14)
        if x2 is None:
            assert torch.equal(torch.diagonal(actual.nngp), actual.cov1)


@needs_chain
@pytest.mark.parametrize('pools', [True, False], ids=['pools', 'convolutions'])
@pytest.mark.parametrize('n_spatial', [1, 3])
def test_fused_chain_in_one_and_three_dimensions(n_spatial, pools, chain_calls):
    """Without pools, the chain goes one diagonal of the first spatial pair at
    a time (csrc/conv_chain.cpp, run_by_diagonals and run_self)."""
    layers = [conv(n_spatial), stax.Relu(), conv(n_spatial, padding='VALID'), stax.Relu(),
              conv(n_spatial, strides=(1,) + (2,) * (n_spatial - 1))]
    if pools:
        window = (2,) + (1,) * (n_spatial - 1)
        layers += [stax.AvgPool(window, strides=window), conv(n_spatial, padding='CIRCULAR'),
                   stax.Relu(), stax.SumPool(window[::-1], padding='CIRCULAR')]
    x1 = gaussian(*SHAPES[n_spatial], seed=2)
    actual = stax.serial(*layers).kernel_fn(x1, None, diagonal_spatial=False)
    assert chain_calls == {'chain_self': 1, 'chain_pairs': 1}
    assert_same_kernels(actual, layer_by_layer(layers, x1, None), 1e-13)
    if not pools:
        assert torch.equal(torch.diagonal(actual.nngp, 0, 0, 1).movedim(-1, 0), actual.cov1)


@needs_chain
def test_fused_chain_in_float32_is_as_close_as_the_layers(chain_calls):
    layers = CHAINS['same-relu']()
    x1, x2 = gaussian(3, 2, 6, 5, seed=3), gaussian(2, 2, 6, 5, seed=4)
    expected = layer_by_layer(layers, x1, x2)
    actual = stax.serial(*layers).kernel_fn(x1.float(), x2.float(), diagonal_spatial=False)
    assert chain_calls['chain_pairs'] == 1 and actual.ntk.dtype == torch.float32
    assert_same_kernels(actual, expected, 1e-6)


@needs_chain
def test_fused_chain_keeps_an_example_with_itself_exact(chain_calls):
    """With x2=None the pairs (i, i) go through the same arithmetic as cov1:
    bitwise equal, and the NTK there agrees with the layers' exact diagonal (a fused
    multiply-add in var1·var2 − c² would put it 1e-9 off)."""
    layers = CHAINS['same-relu']()
    x1 = gaussian(3, 2, 6, 5, seed=5)
    k = stax.serial(*layers).kernel_fn(x1, None, diagonal_spatial=False)
    assert chain_calls == {'chain_self': 1, 'chain_pairs': 1}
    same_example = torch.diagonal(k.nngp, 0, 0, 1).movedim(-1, 0)
    assert torch.equal(same_example, k.cov1)
    expected = layer_by_layer(layers, x1, None)
    torch.testing.assert_close(torch.diagonal(k.ntk, 0, 0, 1), torch.diagonal(expected.ntk, 0, 0, 1),
                               rtol=1e-12, atol=0)


@needs_chain
def test_fused_chain_takes_an_examples_variances_from_its_own_pairs(chain_calls):
    """After GlobalAvgPool, cov1 and nngp's same-example entries are rounded
    apart by an ulp; the chain reads the variances of x2=None's pairs (i, i)
    from those entries, so the correlation there stays exactly 1 and the float32
    NTK keeps to float64 (1.5e-4 of its scale off when it read cov1)."""
    network = stax.serial(stax.Dense(3), stax.LayerNorm((1, 2, 3)), stax.Relu(),
                          stax.GlobalAvgPool(), stax.Dense(1), stax.Relu())
    x = gaussian(2, 2, 4, 4, seed=1)
    expected = network.kernel_fn(x.double(), get='ntk')
    chain_calls.clear()
    actual = network.kernel_fn(x.float(), get='ntk')
    assert chain_calls == {'chain_self': 1, 'chain_pairs': 1}
    assert (actual.double() - expected).abs().max() <= 1e-6 * expected.abs().max()


@needs_chain
@pytest.mark.parametrize('padding', ['SAME', 'CIRCULAR'])
@pytest.mark.parametrize('n_spatial', [1, 2, 3])
def test_x2_none_computes_half_the_pairs_and_transposes_the_others(n_spatial, padding):
    """cov[j, i, x', x, …] = cov[i, j, x, x', …] exactly for i != j, and for
    i = j where x != x' if the run goes diagonal by diagonal (stride-1,
    non-circular convolutions); these entries agree with a run over all pairs
    (x2 a copy of x1 and one more example: x2 equal to x1 is the x2=None run;
    there the pairs (i, i) are no longer an example with itself, whose NTK is
    sensitive to rounding at var1·var2 − c² = 0)."""
    layers = [conv(n_spatial, padding=padding), stax.Relu(), conv(n_spatial, padding=padding),
              stax.Relu()]
    x1 = gaussian(*SHAPES[n_spatial], seed=9)
    with mock.patch.object(conv_chain, 'chain_pairs', wraps=conv_chain.chain_pairs) as fused:
        k = stax.serial(*layers).kernel_fn(x1, None, diagonal_spatial=False)
        every_pair = stax.serial(*layers).kernel_fn(x1, torch.cat([x1, 2 * x1[:1]]),
                                                    diagonal_spatial=False)
    assert [call.kwargs['symmetric'] for call in fused.call_args_list] == [True, False]
    swap = [1, 0] + [2 + d + (1 if d % 2 == 0 else -1) for d in range(2 * n_spatial)]
    i, j = torch.triu_indices(len(x1), len(x1), offset=1)
    apart = ~torch.eye(x1.shape[2], dtype=torch.bool)   # x != x'
    for field in ('nngp', 'ntk'):
        value, expected = getattr(k, field), getattr(every_pair, field)
        assert torch.equal(value.permute(swap)[i, j], value[i, j]), field
        if padding == 'SAME':
            same = torch.arange(len(x1))
            assert torch.equal(value.permute(swap)[same, same][:, apart],
                               value[same, same][:, apart]), field
        for a, b in ((i, j), (j, i)):
            assert relative_error(value[a, b], expected[a, b]) <= 1e-13, field


@needs_chain
@pytest.mark.parametrize('chain, n_spatial', [('same-relu', 1), ('same-relu', 2), ('same-relu', 3),
                                              ('circular-valid-strided', 2), ('pools', 2)])
def test_a_scalar_ntk_input_equals_its_broadcast_tensor(chain, n_spatial):
    """The inputs' NTK, a scalar zero, is not materialized: the chain starts
    from zero sums, bitwise what a tensor of zeros gives. A nonzero scalar is
    broadcast as a tensor."""
    layers = CHAINS[chain]() if n_spatial == 2 else [conv(n_spatial), stax.Relu(), conv(n_spatial)]
    x1, x2 = gaussian(*SHAPES[n_spatial], seed=11), gaussian(*SHAPES[n_spatial], seed=12)
    k = stax.Identity().kernel_fn(x1, x2, diagonal_spatial=False)
    run = FusedRun(layers)
    with mock.patch.object(conv_chain, 'chain_pairs', wraps=conv_chain.chain_pairs) as fused:
        for scalar in (0., 0.7):
            ntk = torch.full((), scalar, dtype=k.nngp.dtype)
            from_scalar = run.propagate(k.replace(ntk=ntk))
            from_tensor = run.propagate(k.replace(ntk=ntk.expand(k.nngp.shape).contiguous()))
            assert torch.equal(from_scalar.nngp, from_tensor.nngp)
            assert torch.equal(from_scalar.ntk, from_tensor.ntk), scalar
    assert fused.call_count == 4
    expected = layer_by_layer(layers, x1, x2).ntk
    assert relative_error(run.propagate(k).ntk, expected) <= 1e-13
    assert relative_error(from_scalar.ntk, expected) > 1e-3   # the scalar 0.7 counts


@needs_chain
def test_get_nngp_alone_runs_the_chain_without_ntk():
    layers = CHAINS['same-relu']()
    x1 = gaussian(3, 2, 6, 5, seed=6)
    with mock.patch.object(conv_chain, 'chain_pairs', wraps=conv_chain.chain_pairs) as fused:
        nngp = stax.serial(*layers).kernel_fn(x1, None, get='nngp', diagonal_spatial=False)
    assert fused.call_count == 1 and fused.call_args.args[1] is None   # no NTK in the chain
    torch.testing.assert_close(nngp, layer_by_layer(layers, x1, None).nngp, rtol=1e-13, atol=0)


@needs_chain
@pytest.mark.parametrize('grad_of', ['inputs', 'W_std'])
def test_gradients_go_through_the_layers_and_match_the_fused_values(grad_of):
    W_std = torch.tensor(1.3, dtype=torch.float64, requires_grad=grad_of == 'W_std')
    layers = [conv(W_std=W_std), stax.Relu(), conv(), stax.Relu()]
    x1 = gaussian(2, 2, 5, 5, seed=7).requires_grad_(grad_of == 'inputs')
    with mock.patch.object(conv_chain, 'chain_pairs', wraps=conv_chain.chain_pairs) as fused:
        ntk = stax.serial(*layers).kernel_fn(x1, None, get='ntk', diagonal_spatial=False)
    assert fused.call_count == 0 and ntk.requires_grad
    with torch.no_grad(), mock.patch.object(conv_chain, 'chain_pairs',
                                            wraps=conv_chain.chain_pairs) as fused:
        ntk_fused = stax.serial(*layers).kernel_fn(x1, None, get='ntk', diagonal_spatial=False)
    assert fused.call_count == 1
    torch.testing.assert_close(ntk.detach(), ntk_fused, rtol=1e-13, atol=0)


@needs_chain
def test_masked_kernels_go_through_the_layers():
    layers = CHAINS['same-relu']()
    x1 = gaussian(2, 2, 6, 5, seed=8)
    x1[0, :, 0, 0] = 7.
    with mock.patch.object(conv_chain, 'chain_pairs', wraps=conv_chain.chain_pairs) as fused:
        k = stax.serial(*layers).kernel_fn(x1, None, mask_constant=7., diagonal_spatial=False)
    assert fused.call_count == 0 and k.mask1 is not None


def test_runs_are_affine_pool_and_relu_like_layers_of_at_least_two():
    conv_a, relu, conv_b, pool, conv_c = conv(), stax.Relu(), conv(), stax.AvgPool((2, 2)), conv()
    stabilized, dense, erf = stax.Relu(do_stabilize=True), stax.Dense(3), stax.Erf()
    edges = stax.AvgPool((2, 2), padding='SAME', normalize_edges=True)
    items = fused_runs([conv_a, relu, conv_b, pool, conv_c, stabilized, dense, relu, erf, edges,
                        conv_a, relu, pool, relu])
    assert isinstance(items[0], FusedRun) and items[0].layers == (conv_a, relu, conv_b, pool,
                                                                  conv_c)
    assert isinstance(items[2], FusedRun) and items[2].layers == (dense, relu)
    # After a nonlinearity the pool's output is not Gaussian: the next one is left out.
    assert isinstance(items[5], FusedRun) and items[5].layers == (conv_a, relu, pool)
    assert [items[1], *items[3:5], items[6]] == [stabilized, erf, edges, relu]
    assert len(items) == 7


def test_subclasses_and_a_nonlinearity_first_are_not_fused():
    class MyRelu(stax.Relu):
        pass

    relu, my_relu, conv_a = stax.Relu(), MyRelu(), conv()
    assert fused_runs([relu, conv_a, my_relu]) == [relu, conv_a, my_relu]


class DoubledRelu(stax.Elementwise):
    """φ(x) = 2·max(x, 0), a nonlinearity defined outside torchntk that joins
    the fused chain through its own `chain_step_kind` and `chain_step` alone."""

    def __init__(self):
        super().__init__(fn=lambda x: 2 * torch.relu(x))

    def kernel_map(self, cov12, var1, var2, with_derivative):
        return maps.abrelu(cov12, var1, var2, 0., 2., with_derivative)

    @property
    def chain_step_kind(self):
        return conv_chain.ABReluStep

    def chain_step(self, input_shape):
        return conv_chain.ABReluStep(a=0., b=2.)


@needs_chain
def test_a_nonlinearity_joins_the_chain_through_its_own_step(chain_calls):
    layers = [conv(), DoubledRelu(), conv(padding='VALID'), DoubledRelu()]
    x1, x2 = gaussian(3, 2, 6, 5, seed=13), gaussian(2, 2, 6, 5, seed=14)
    actual = stax.serial(*layers).kernel_fn(x1, x2, diagonal_spatial=False)
    assert chain_calls['chain_pairs'] == 1
    assert_same_kernels(actual, layer_by_layer(layers, x1, x2), 1e-13)


def test_the_steps_of_conv_and_pooling_carry_their_padding():
    """'SAME' pads a window of k with stride s on X positions by
    (out − 1)·s + k − X in all, out = ceil(X / s), the odd one high:
    4 taps on 6 positions by (1, 2), 3 taps with stride 2 on 7 by (1, 1)."""
    layer = stax.Conv(4, (4, 3), strides=(1, 2), padding='SAME', W_std=1.5, b_std=0.5)
    step = layer.chain_step((2, 3, 6, 7))
    assert step.windows == (conv_chain.Window(4, 1, 1, 2), conv_chain.Window(3, 2, 1, 1))
    assert (step.W_var, step.b_var, step.circular) == (2.25, 0.25, False)
    pool = stax.AvgPool((2, 3), padding='CIRCULAR').chain_step((2, 3, 6, 7))
    assert pool.windows == (conv_chain.Window(2, 1, 0, 1), conv_chain.Window(3, 1, 1, 1))
    assert pool.circular and pool.scale == 1 / 36


def test_a_layer_has_no_step_on_inputs_of_another_rank():
    assert conv(n_spatial=2).chain_step((2, 3, 6)) is None
    assert stax.AvgPool((2, 2)).chain_step((2, 3)) is None
