"""Whole computations on the GPU equal the same computations on the CPU.

The per-layer reference cases and the extension's op already run on the GPU
where there is one (tests/stax/test_reference.py, tests/ops/); these tests
cover what passes through several modules: gradients of convolutional kernels
(the CUDA twin's adjoint), empirical NTKs, predictions, and kernels compiled by
inductor (Triton). Skipped without a GPU.
"""

import pytest
import torch
from torch import nn

import torchntk as nt
from torchntk import ops, predict, stax

from tests.strategies import gaussian

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def myrtle():
    conv = lambda: stax.Conv(8, (3, 3), padding='SAME', W_std=1.4, b_std=0.1)  # noqa: E731
    return stax.serial(conv(), stax.Relu(), conv(), stax.Relu(), stax.AvgPool((2, 2), (2, 2)),
                       conv(), stax.Relu(), stax.AvgPool((2, 2), (2, 2)), stax.Flatten(),
                       stax.Dense(1))


def test_the_extension_runs_on_the_gpu():
    import torchntk._C as extension
    assert ops.backend() == 'extension' and extension.with_cuda


def test_cnn_kernel_and_its_input_gradient_on_gpu_equal_the_cpu():
    model = myrtle()
    x1, x2 = gaussian(3, 2, 8, 8, seed=0), gaussian(2, 2, 8, 8, seed=1)

    def ntk_and_gradient(a, b):
        a = a.clone().requires_grad_()
        ntk = model.kernel_fn(a, b, get='ntk')
        (gradient,) = torch.autograd.grad(ntk.square().sum(), a)
        return ntk.cpu(), gradient.cpu()

    ntk_gpu, gradient_gpu = ntk_and_gradient(x1.cuda(), x2.cuda())
    ntk_cpu, gradient_cpu = ntk_and_gradient(x1, x2)
    torch.testing.assert_close(ntk_gpu, ntk_cpu, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gradient_gpu, gradient_cpu, rtol=1e-11, atol=1e-13)


def test_fused_conv_chain_on_gpu_equals_the_layers_on_the_cpu():
    from unittest import mock
    from torchntk.ops import conv_chain
    layers = [stax.Conv(4, (3, 3), padding='SAME', W_std=1.3, b_std=0.2), stax.Relu(),
              stax.Conv(4, (3, 2), padding='CIRCULAR', strides=(2, 1)), stax.LeakyRelu(0.1),
              stax.Conv(4, (2, 3), padding='VALID', parameterization='standard', b_std=0.1)]
    for x2 in (gaussian(2, 2, 7, 6, seed=11), None):
        x1 = gaussian(3, 2, 7, 6, seed=10)
        expected = stax.Identity().kernel_fn(x1, x2, diagonal_spatial=False)
        for layer in layers:
            expected = layer.propagate(expected)
        with mock.patch.object(conv_chain, 'chain_pairs', wraps=conv_chain.chain_pairs) as fused:
            actual = stax.serial(*layers).kernel_fn(x1.cuda(), None if x2 is None else x2.cuda(),
                                                    diagonal_spatial=False)
        assert fused.call_count == 1
        for field in ('nngp', 'ntk', 'cov1', 'cov2'):
            if getattr(expected, field) is not None:
                torch.testing.assert_close(getattr(actual, field).cpu(), getattr(expected, field),
                                           rtol=1e-12, atol=1e-14)
        if x2 is None:
            assert torch.equal(torch.diagonal(actual.nngp, 0, 0, 1).movedim(-1, 0), actual.cov1)


def test_cnn_kernel_gradient_on_gpu_passes_gradcheck_and_is_finite_at_zero():
    model = stax.serial(stax.Conv(4, (3, 3), padding='CIRCULAR'), stax.Relu(),
                        stax.Conv(4, (3, 3), padding='SAME'), stax.Erf(), stax.GlobalAvgPool())
    x = gaussian(2, 1, 4, 4, seed=2).cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: model.kernel_fn(a, get='ntk'), x)
    zero = torch.zeros(2, 1, 4, 4, dtype=torch.float64, device='cuda', requires_grad=True)
    (gradient,) = torch.autograd.grad(model.kernel_fn(zero, get='ntk').sum(), zero)
    assert bool(torch.isfinite(gradient).all())


@pytest.mark.parametrize('implementation', ['jacobian_contraction', 'ntk_vector_products',
                                            'structured_derivatives'])
def test_empirical_ntk_on_gpu_equals_the_cpu(implementation):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.Tanh(), nn.Flatten(),
                        nn.Linear(6 * 5 * 5, 3)).double()
    x1, x2 = gaussian(3, 2, 5, 5, seed=3), gaussian(2, 2, 5, 5, seed=4)
    ntk_fn = nt.empirical_ntk_fn(net, trace_axes=(), implementation=implementation)
    ntk_cpu = ntk_fn(x1, x2)
    net.cuda()
    ntk_gpu = ntk_fn(x1.cuda(), x2.cuda())
    assert ntk_gpu.is_cuda
    torch.testing.assert_close(ntk_gpu.cpu(), ntk_cpu, rtol=1e-11, atol=1e-13)


def test_gradient_descent_predictions_on_gpu_equal_the_cpu():
    model = stax.serial(stax.Dense(16, 1.5, 0.1), stax.Relu(), stax.Dense(1, 1.5, 0.1))
    x_train, x_test = gaussian(12, 5, seed=5), gaussian(4, 5, seed=6)
    y_train = gaussian(12, 1, seed=7)
    times = torch.tensor([0., 1., 10., float('inf')], dtype=torch.float64)

    def predictions(device):
        k_train = model.kernel_fn(x_train.to(device), None, get='ntk')
        k_test = model.kernel_fn(x_test.to(device), x_train.to(device), get='ntk')
        predict_fn = predict.gradient_descent_mse(k_train, y_train.to(device), diag_reg=1e-4)
        return predict_fn(times.to(device), 0., 0., k_test)

    train_gpu, test_gpu = predictions('cuda')
    train_cpu, test_cpu = predictions('cpu')
    torch.testing.assert_close(train_gpu.cpu(), train_cpu, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(test_gpu.cpu(), test_cpu, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64], ids=str)
def test_kernel_compiled_by_inductor_on_gpu_equals_the_eager_kernel(dtype):
    model = myrtle()
    x1 = gaussian(3, 2, 8, 8, seed=8).to('cuda', dtype)
    x2 = gaussian(2, 2, 8, 8, seed=9).to('cuda', dtype)
    compiled = torch.compile(lambda a, b: model.kernel_fn(a, b, get=('nngp', 'ntk')),
                             fullgraph=True)
    expected = model.kernel_fn(x1, x2, get=('nngp', 'ntk'))
    actual = compiled(x1, x2)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12,
                                                                                atol=1e-14)
    torch.testing.assert_close(actual.nngp, expected.nngp, **tolerance)
    torch.testing.assert_close(actual.ntk, expected.ntk, **tolerance)
