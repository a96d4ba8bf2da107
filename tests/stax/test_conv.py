"""`stax.Conv`, `stax.ConvTranspose`, `stax.ConvLocal`: kernel rules, finite forward,
layout requirements, gradients, and the architectures of the issue (WideResNet,
Myrtle, the 21-layer CNN)."""

import functools

import pytest
import torch
import torch.nn.functional as F

import torchntk
from torchntk import stax
from torchntk.functional.conv import embed_spatial_diagonal, spatial_diagonal
from torchntk.kernel import interleave, kernel_from_inputs
from torchntk.stax.requirements import resolve_layout

from tests.strategies import gaussian, relative_error

CONV_LAYERS = (stax.Conv, stax.ConvTranspose, stax.ConvLocal)
PADDINGS = ('VALID', 'SAME', 'CIRCULAR')


# --- architectures ----------------------------------------------------------------------------

def wide_resnet_block(channels, strides=(1, 1), channel_mismatch=False):
    main = stax.serial(stax.Relu(), stax.Conv(channels, (3, 3), strides, padding='SAME'),
                       stax.Relu(), stax.Conv(channels, (3, 3), padding='SAME'))
    shortcut = stax.Conv(channels, (3, 3), strides, padding='SAME') if channel_mismatch \
        else stax.Identity()
    return stax.serial(stax.FanOut(2), stax.parallel(main, shortcut), stax.FanInSum())


def wide_resnet(block_size, k, num_classes, pool=8):
    """The WideResNet of neural-tangents' README (`pool=8` for 32×32 images)."""
    def group(n, channels, strides=(1, 1)):
        return stax.serial(wide_resnet_block(channels, strides, channel_mismatch=True),
                           *(wide_resnet_block(channels) for _ in range(n - 1)))
    return stax.serial(stax.Conv(16, (3, 3), padding='SAME'),
                       group(block_size, 16 * k), group(block_size, 32 * k, (2, 2)),
                       group(block_size, 64 * k, (2, 2)), stax.AvgPool((pool, pool)),
                       stax.Flatten(), stax.Dense(num_classes, 1., 0.))


def myrtle(depth, width=1, W_std=2**0.5, b_std=0.):
    """Myrtle-5/7/10 (Shankar et al. 2020, arXiv:2003.02237) for 32×32 images."""
    factor = {5: (2, 1, 1), 7: (2, 2, 2), 10: (3, 3, 3)}[depth]
    conv = functools.partial(stax.Conv, width, (3, 3), W_std=W_std, b_std=b_std, padding='SAME')

    def pool():
        return stax.AvgPool((2, 2), strides=(2, 2))

    def block(n):
        return [layer for _ in range(n) for layer in (conv(), stax.Relu())]

    return stax.serial(*block(factor[0]), pool(), *block(factor[1]), pool(), *block(factor[2]),
                       pool(), pool(), pool(), stax.Flatten(), stax.Dense(10, W_std, b_std))


def cnn21(readout):
    """The 21-layer CNN benchmark: 21 × [Conv(3×3, SAME) + Relu], then `readout`."""
    body = [layer for _ in range(21) for layer in (stax.Conv(8, (3, 3), padding='SAME'),
                                                   stax.Relu())]
    return stax.serial(*body, readout, stax.Dense(1))


# --- the kernel is the covariance of the finite layer -----------------------------------------

def exact_nngp(layer, x1, x2):
    """`E_W[z(x1)[p] z(x2)[q]]` of a layer with one output channel and unit
    weights: the output is linear in the weight, so it is `J(x1) J(x2)ᵀ`."""
    layer.init_parameters(x1.shape, generator=torch.Generator().manual_seed(0), dtype=x1.dtype)
    weight = layer.weight.detach().clone()

    def output(w, x):
        return torch.func.functional_call(layer, {'weight': w}, (x,))[:, 0]

    j1, j2 = (torch.func.jacrev(output)(weight, x).flatten(-weight.ndim) for x in (x1, x2))
    cov = torch.einsum('aip,bjp->abij', j1.flatten(1, -2), j2.flatten(1, -2))
    return interleave(cov.reshape(len(x1), len(x2), *j1.shape[1:-1], *j2.shape[1:-1]), 2)


@pytest.mark.parametrize('layer_type', CONV_LAYERS)
@pytest.mark.parametrize('padding', PADDINGS)
@pytest.mark.parametrize('filter_shape, strides', [((3, 2), (1, 1)), ((2, 3), (2, 1)),
                                                   ((1, 2), (3, 2))])
def test_conv_nngp_is_the_covariance_of_the_finite_layer(layer_type, padding, filter_shape,
                                                         strides, images1, images2):
    layer = layer_type(1, filter_shape, strides, padding, W_std=1.3)
    expected = exact_nngp(layer, images1, images2)
    full = layer.kernel_fn(images1, images2, get='nngp', diagonal_spatial=False)
    torch.testing.assert_close(full, expected, rtol=1e-12, atol=1e-12)
    diagonal_inputs = kernel_from_inputs(images1, images2, diagonal_batch=True,
                                         diagonal_spatial=True, compute_ntk=True)
    diagonal = layer.kernel_rule(diagonal_inputs).nngp
    torch.testing.assert_close(diagonal, spatial_diagonal(expected, 2), rtol=1e-12, atol=1e-12)


def test_conv1d_and_conv3d_nngp_are_covariances_of_the_finite_layer():
    for shape, filter_shape in (((2, 2, 7), (3,)), ((2, 2, 4, 3, 5), (2, 3, 2))):
        x1, x2 = gaussian(*shape, seed=2), gaussian(*shape, seed=3)
        layer = stax.Conv(1, filter_shape, padding='CIRCULAR')
        torch.testing.assert_close(layer.kernel_fn(x1, x2, get='nngp', diagonal_spatial=False),
                                   exact_nngp(layer, x1, x2), rtol=1e-12, atol=1e-12)


def test_conv_local_output_is_uncorrelated_across_positions(images1, images2):
    layer = stax.ConvLocal(3, (3, 3), padding='SAME', b_std=0.5)
    nngp = layer.kernel_fn(images1, images2, get='nngp', diagonal_spatial=False)
    assert torch.equal(nngp, embed_spatial_diagonal(spatial_diagonal(nngp, 2), 2))
    assert spatial_diagonal(nngp, 2).abs().min() > 0


# --- finite forward matches torch.nn -------------------------------------------------------------

@pytest.mark.parametrize('padding, torch_padding', [('VALID', 0), ('SAME', 1)])
def test_conv_forward_is_scaled_torch_conv2d(images1, padding, torch_padding):
    layer = stax.Conv(4, (3, 3), padding=padding, W_std=1.5, b_std=0.3)
    layer.init_parameters(images1.shape, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64)
    reference = torch.nn.Conv2d(2, 4, 3, padding=torch_padding, dtype=torch.float64)
    with torch.no_grad():
        reference.weight.copy_(layer.weight * 1.5 / (2 * 9)**0.5)
        reference.bias.copy_(layer.bias * 0.3)
    torch.testing.assert_close(layer(images1), reference(images1), rtol=1e-13, atol=1e-13)


def test_conv_circular_forward_is_torch_circular_padding(images1):
    layer = stax.Conv(4, (3, 3), padding='CIRCULAR')
    out = layer(images1)
    reference = F.conv2d(F.pad(images1, (1, 1, 1, 1), mode='circular'), layer.weight) / 18**0.5
    torch.testing.assert_close(out, reference, rtol=1e-13, atol=1e-13)


def test_conv_transpose_forward_is_scaled_torch_conv_transpose2d(images1):
    layer = stax.ConvTranspose(4, (3, 2), strides=(2, 2), b_std=0.2)
    out = layer(images1)
    reference = torch.nn.ConvTranspose2d(2, 4, (3, 2), stride=2, dtype=torch.float64)
    with torch.no_grad():
        reference.weight.copy_(layer.weight / (2 * 6)**0.5)
        reference.bias.copy_(layer.bias * 0.2)
    assert out.shape == (3, 4, 13, 10)
    torch.testing.assert_close(out, reference(images1), rtol=1e-13, atol=1e-13)


def test_conv_local_with_tied_weights_is_conv(images1):
    conv = stax.Conv(4, (3, 2), strides=(1, 2), padding='SAME', b_std=0.1)
    local = stax.ConvLocal(4, (3, 2), strides=(1, 2), padding='SAME', b_std=0.1)
    out = conv(images1)
    local.init_parameters(images1.shape, dtype=torch.float64)
    with torch.no_grad():
        local.weight.copy_(conv.weight[..., None, None].expand_as(local.weight))
        local.bias.copy_(conv.bias[:, None, None].expand_as(local.bias))
    torch.testing.assert_close(local(images1), out, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize('layer_type', CONV_LAYERS)
def test_standard_parameterization_initializes_with_fan_in(layer_type, images1):
    layer = layer_type(600, (3, 3), padding='SAME', W_std=2., parameterization='standard',
                       s=(2, 1))
    layer.init_parameters(images1.shape, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64)
    # Var(W) = σ_W² s_in / (C_in k) = 4·2 / 18.
    assert abs(layer.weight.var().item() / (8 / 18) - 1) < 0.05


def test_lazy_initialization_follows_the_generator(images1):
    def draw():
        net = stax.serial(stax.Conv(3, (2, 2), b_std=0.1), stax.Relu(), stax.ConvLocal(2, (2, 2)),
                          stax.ConvTranspose(2, (2, 2)))
        net.init_parameters(images1.shape, generator=torch.Generator().manual_seed(4),
                            dtype=torch.float64)
        return net(images1)
    torch.testing.assert_close(draw(), draw(), rtol=0, atol=0)


# --- empirical NTK of wide networks ------------------------------------------------------------

@pytest.mark.parametrize('layer_type, readout, parameterization', [
    (stax.Conv, stax.GlobalAvgPool, 'ntk'),
    (stax.Conv, stax.Flatten, 'ntk'),
    (stax.Conv, stax.GlobalAvgPool, 'standard'),
    (stax.ConvTranspose, stax.GlobalAvgPool, 'ntk'),
])
def test_empirical_ntk_of_wide_cnn_approaches_analytic(layer_type, readout, parameterization):
    x1, x2 = gaussian(3, 1, 4, 4, seed=5), gaussian(2, 1, 4, 4, seed=6)
    net = stax.serial(
        layer_type(512, (3, 3), padding='SAME', b_std=0.2, parameterization=parameterization),
        stax.Relu(),
        layer_type(512, (2, 2), padding='CIRCULAR', W_std=1.3, parameterization=parameterization),
        stax.Relu(), readout(), stax.Dense(4, parameterization=parameterization))
    net.init_parameters(x1.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    empirical = torchntk.empirical_ntk_fn(net)(x1, x2)
    analytic = net.kernel_fn(x1, x2, get='ntk')
    assert relative_error(empirical, analytic) < 0.15


# --- layout requirements ---------------------------------------------------------------------

def conv_relu_conv(readout):
    return stax.serial(stax.Conv(3, (3, 3), padding='SAME'), stax.Relu(), stax.Conv(3, (3, 3)),
                       readout)


def test_conv_relu_conv_flatten_runs_diagonal_spatial():
    assert resolve_layout(conv_relu_conv(stax.Flatten()).requirements, None, None, '') == \
        (True, True)


def test_conv_relu_conv_global_avg_pool_runs_full_spatial():
    assert resolve_layout(conv_relu_conv(stax.GlobalAvgPool()).requirements, None, None, '') == \
        (True, False)


def test_conv_without_readout_gives_full_spatial_kernel(images1, images2):
    nngp = conv_relu_conv(stax.Identity()).kernel_fn(images1, images2, get='nngp')
    assert nngp.shape == (3, 2, 4, 4, 3, 3)


def test_conv_local_then_global_avg_pool_runs_diagonal_spatial():
    net = stax.serial(stax.ConvLocal(3, (3, 3)), stax.Relu(), stax.ConvLocal(3, (2, 2)),
                      stax.GlobalAvgPool())
    assert resolve_layout(net.requirements, None, None, '') == (True, True)


def test_diagonal_spatial_true_with_global_avg_pool_raises(images1):
    with pytest.raises(ValueError, match='diagonal_spatial=True'):
        conv_relu_conv(stax.GlobalAvgPool()).kernel_fn(images1, diagonal_spatial=True)


@pytest.mark.parametrize('middle', [
    lambda: stax.Relu(), lambda: stax.Erf(), lambda: stax.Gelu(),
    lambda: stax.LayerNorm(axis=(1, 2, 3)),
    lambda: stax.serial(stax.FanOut(2), stax.parallel(stax.Relu(), stax.Identity()),
                        stax.FanInConcat()),
    lambda: stax.serial(stax.FanOut(2), stax.parallel(stax.Conv(3, (1, 1)), stax.Identity()),
                        stax.FanInSum(), stax.Tanh(deg=9)),
    lambda: stax.serial(stax.Relu(), stax.ConvLocal(3, (2, 2), padding='SAME'), stax.Relu()),
], ids=['relu', 'erf', 'gelu', 'layer_norm', 'fan_in_concat', 'residual', 'conv_local'])
def test_forcing_full_spatial_on_flatten_network_changes_nothing(middle, images1, images2):
    net = stax.serial(stax.Conv(3, (3, 3), padding='SAME', b_std=0.3), middle(),
                      stax.Conv(3, (2, 2), strides=(2, 1), W_std=1.4), stax.Relu(),
                      stax.Flatten(), stax.Dense(1))
    diagonal = net.kernel_fn(images1, images2)
    full = net.kernel_fn(images1, images2, diagonal_spatial=False)
    for key in ('nngp', 'ntk', 'cov1', 'cov2'):
        torch.testing.assert_close(getattr(full, key), getattr(diagonal, key), rtol=1e-12,
                                   atol=1e-12)


# --- gradients ----------------------------------------------------------------------------------

def small_cnn():
    return stax.serial(stax.Conv(2, (3, 3), padding='SAME', b_std=0.1), stax.Relu(),
                       stax.ConvTranspose(2, (2, 2), strides=(2, 2), padding='CIRCULAR'),
                       stax.Relu(), stax.ConvLocal(2, (2, 2), strides=(2, 2)), stax.Relu(),
                       stax.AvgPool((2, 2), padding='SAME'), stax.Conv(2, (2, 2)), stax.Relu(),
                       stax.GlobalAvgPool(), stax.Dense(1))


def test_conv_kernel_gradients_wrt_inputs_match_finite_differences():
    net = small_cnn()
    x1 = gaussian(2, 1, 3, 3, seed=7).requires_grad_()
    x2 = gaussian(1, 1, 3, 3, seed=8).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: net.kernel_fn(a, b, get=('nngp', 'ntk')),
                                    (x1, x2))


def test_wide_resnet_kernel_gradients_are_finite_at_zero_inputs():
    x1 = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    x1[1] = gaussian(3, 8, 8, seed=9)
    x1.requires_grad_()
    nngp, ntk = wide_resnet(1, 1, 10, pool=2).kernel_fn(x1, get=('nngp', 'ntk'))
    gradient, = torch.autograd.grad((nngp + ntk).sum(), x1)
    assert torch.isfinite(gradient).all()
    assert gradient[1].abs().sum() > 0


def test_conv_kernel_values_with_grad_equal_values_without_grad(images1, images2):
    net = stax.serial(stax.Conv(2, (3, 3), padding='CIRCULAR'), stax.Relu(),
                      stax.Conv(2, (3, 2), strides=(2, 1), padding='SAME'), stax.Relu(),
                      stax.GlobalAvgPool())
    without = net.kernel_fn(images1, images2, get=('nngp', 'ntk'))
    with_grad = net.kernel_fn(images1.clone().requires_grad_(), images2, get=('nngp', 'ntk'))
    for a, b in zip(with_grad, without):
        torch.testing.assert_close(a.detach(), b, rtol=1e-13, atol=1e-13)


# --- architectures ----------------------------------------------------------------------------

@pytest.mark.parametrize('depth', [5, 7, 10])
def test_myrtle_builds_and_runs(depth):
    x = gaussian(1, 3, 32, 32, seed=10)
    net = myrtle(depth)
    nngp, ntk = net.kernel_fn(x, get=('nngp', 'ntk'))
    assert nngp.shape == ntk.shape == (1, 1) and torch.isfinite(ntk).all()
    assert net(x).shape == (1, 10)


def test_wide_resnet_builds_and_runs():
    x = gaussian(1, 3, 32, 32, seed=11)
    net = wide_resnet(1, 1, 10)
    assert torch.isfinite(net.kernel_fn(x, get='ntk')).all()
    assert net(x).shape == (1, 10)


@pytest.mark.parametrize('readout', [stax.GlobalAvgPool, stax.Flatten])
def test_cnn21_builds_and_runs(readout):
    x = gaussian(2, 3, 8, 8, seed=12)
    net = cnn21(readout())
    assert torch.isfinite(net.kernel_fn(x, get='ntk')).all()
    assert net(x).shape == (2, 1)


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, error, match', [
    (dict(filter_shape=(3, 3), padding='FULL'), ValueError, 'padding'),
    (dict(filter_shape=(3, 3), padding=1), TypeError, 'padding'),
    (dict(filter_shape=(3, 3), strides=(1,)), ValueError, 'strides'),
    (dict(filter_shape=3), TypeError, 'filter_shape'),
    (dict(filter_shape=(0, 3)), ValueError, 'filter_shape'),
    (dict(filter_shape=(3, 3), W_std=-1.), ValueError, 'W_std'),
    (dict(filter_shape=(3, 3), parameterization='mup'), ValueError, 'parameterization'),
])
@pytest.mark.parametrize('layer_type', CONV_LAYERS)
def test_conv_rejects_bad_arguments(layer_type, kwargs, error, match):
    with pytest.raises(error, match=match):
        layer_type(3, **kwargs)


@pytest.mark.parametrize('layer_type', CONV_LAYERS)
def test_filter_rank_must_match_input_rank(layer_type, images1):
    with pytest.raises(ValueError, match=f'{layer_type.__name__}: a 1-d window'):
        layer_type(3, (3,)).kernel_fn(images1)
    with pytest.raises(ValueError, match=f'{layer_type.__name__}: a 1-d window'):
        layer_type(3, (3,))(images1)


def test_extra_repr_reads_like_the_constructor():
    assert repr(stax.Conv(8, (3, 3), strides=(2, 2), padding='same', b_std=0.1)) == \
        "Conv(8, filter_shape=(3, 3), strides=(2, 2), padding='SAME', W_std=1.0, b_std=0.1)"
