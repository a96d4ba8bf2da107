"""Gradients of `kernel_fn`: against finite differences (`gradcheck`) at generic
points, finite at zero inputs, and the same values with and without autograd.

Every nonlinearity of `torchntk.stax` is checked inside a small network
`Dense → φ → Dense → φ → Dense(1)`, whose second φ sees covariances and
variances that both depend on the inputs and on `W_std`, `b_std`.
"""

import pytest
import torch
from torch.autograd import gradcheck

from torchntk import stax
from torchntk.functional import elementwise as maps

from tests.strategies import KERNEL_ONLY, UNIT_VARIANCE, all_nonlinearities

DTYPE = torch.float64


def _relu_nngp(cov12, var1, var2):
    return maps.abrelu(cov12, var1, var2, 0., 1., False)[0]


# (id, builder of φ, whether φ needs unit-variance inputs)
NONLINEARITIES = [(repr(phi), phi.build, phi.name in UNIT_VARIANCE) for phi in all_nonlinearities()]
NONLINEARITIES += [
    ('Elementwise(relu, autodiff NTK)',
     lambda: stax.Elementwise(torch.relu, _relu_nngp), False),
    ('ElementwiseNumerical(erf)',
     lambda: stax.ElementwiseNumerical(torch.special.erf, deg=20), False),
]
IDS = [name for name, _, _ in NONLINEARITIES]


def network(phi, unit_variance, W_std=1.2, b_std=0.3, W_std_2=0.9, b_std_2=0.2):
    def block(W, b):
        layers = [stax.Dense(5, W_std=W, b_std=b)]
        return layers + [stax.LayerNorm(), phi()] if unit_variance else layers + [phi()]
    return stax.serial(*block(W_std, b_std), *block(W_std_2, b_std_2),
                       stax.Dense(1, W_std=1.1, b_std=0.1))


def scalar(value):
    return torch.tensor(value, dtype=DTYPE, requires_grad=True)


@pytest.fixture
def x1():
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=DTYPE)


@pytest.fixture
def x2():
    return torch.randn(2, 4, generator=torch.Generator().manual_seed(1), dtype=DTYPE)


@pytest.mark.parametrize('phi, unit_variance', [n[1:] for n in NONLINEARITIES], ids=IDS)
def test_kernel_gradients_wrt_inputs_match_finite_differences(phi, unit_variance, x1, x2):
    model = network(phi, unit_variance)

    def kernels(a, b):
        return tuple(model.kernel_fn(a, b, get=('nngp', 'ntk')))
    assert gradcheck(kernels, (x1.requires_grad_(), x2.requires_grad_()), eps=1e-6, atol=1e-5,
                     rtol=1e-4)


@pytest.mark.parametrize('phi, unit_variance', [n[1:] for n in NONLINEARITIES], ids=IDS)
def test_kernel_gradients_wrt_x1_alone_match_finite_differences(phi, unit_variance, x1):
    # x2 = None: both sides of every entry move together, diagonals included.
    model = network(phi, unit_variance)

    def kernels(a):
        return tuple(model.kernel_fn(a, get=('nngp', 'ntk')))
    assert gradcheck(kernels, (x1.requires_grad_(),), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('phi, unit_variance', [n[1:] for n in NONLINEARITIES], ids=IDS)
def test_kernel_gradients_wrt_w_std_and_b_std_match_finite_differences(phi, unit_variance, x1, x2):
    def kernels(W_std, b_std, W_std_2, b_std_2):
        model = network(phi, unit_variance, W_std, b_std, W_std_2, b_std_2)
        return tuple(model.kernel_fn(x1, x2, get=('nngp', 'ntk')))
    params = (scalar(1.2), scalar(0.3), scalar(0.9), scalar(0.2))
    assert gradcheck(kernels, params, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('phi, unit_variance', [n[1:] for n in NONLINEARITIES], ids=IDS)
@pytest.mark.parametrize('b_std', [0., 0.3])
@pytest.mark.parametrize('zero_rows', ['one', 'all'])
def test_kernel_gradients_are_finite_at_zero_inputs(phi, unit_variance, b_std, zero_rows, x1):
    x = x1.clone()
    if zero_rows == 'one':
        x[1] = 0.
    else:
        x.zero_()
    x.requires_grad_()
    W_std, b = scalar(1.2), scalar(b_std)
    model = network(phi, unit_variance, W_std=W_std, b_std=b, b_std_2=b)
    kernels = model.kernel_fn(x, get=('nngp', 'ntk'))
    for name, value in zip(kernels._fields, kernels):
        assert torch.isfinite(value).all(), f"{name} is not finite: {value}"
    grads = torch.autograd.grad(kernels.nngp.sum() + kernels.ntk.sum(), (x, W_std, b))
    for name, grad in zip(('x', 'W_std', 'b_std'), grads):
        assert torch.isfinite(grad).all(), f"d/d{name} is not finite: {grad}"


@pytest.mark.parametrize('phi, unit_variance', [n[1:] for n in NONLINEARITIES], ids=IDS)
def test_kernel_values_with_grad_equal_values_without_grad(phi, unit_variance, x1, x2):
    W_std = scalar(1.2)
    model = network(phi, unit_variance, W_std=W_std)
    with torch.no_grad():
        expected = model.kernel_fn(x1, x2, get=('nngp', 'ntk'))
    a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    actual = model.kernel_fn(a, b, get=('nngp', 'ntk'))
    for name in ('nngp', 'ntk'):
        value = getattr(actual, name)
        assert value.requires_grad, name
        # Equal up to rounding: torch's autograd-enabled kernels (F.silu, F.mish) may
        # round differently from the inference ones.
        torch.testing.assert_close(value.detach(), getattr(expected, name), rtol=1e-14, atol=1e-15)


WITH_FINITE_NETWORK = [n for n in NONLINEARITIES if n[1]().__class__.__name__ not in KERNEL_ONLY]


@pytest.mark.parametrize('phi, unit_variance', [n[1:] for n in WITH_FINITE_NETWORK],
                         ids=[n[0] for n in WITH_FINITE_NETWORK])
def test_finite_network_gradient_flows_to_parameters(phi, unit_variance, x1):
    model = network(phi, unit_variance)
    model.init_parameters(x1.shape, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    model(x1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
