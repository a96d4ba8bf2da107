"""Layers on the network's raw inputs.

The inputs are fixed values, not zero-mean Gaussians (`kernel_from_inputs`
gives `is_gaussian=False`, as neural-tangents): a nonlinearity on them has a
kernel `φ(x)·φ(x')ᵀ/d` that their Gram matrix `x·x'ᵀ/d` does not determine,
and a sum of them with a Gaussian branch is neither fixed nor Gaussian. Such
networks are refused naming the layer; linear layers on the inputs keep their
exact kernels. A product of branches averages `∏_i K_i[c]` over channels `c`,
which is the product of the kernels only if at most one branch has channels of
different kernels, as the inputs (and the outputs of `Flatten`) have.
"""

import pytest
import torch

from torchntk import stax

from tests.strategies import gaussian, relative_error


@pytest.mark.parametrize('before', [
    pytest.param(lambda: [], id='inputs'),
    pytest.param(lambda: [stax.Identity()], id='identity'),
    pytest.param(lambda: [stax.AvgPool((2,))], id='avg-pool'),
    pytest.param(lambda: [stax.SumPool((3,), padding='SAME')], id='sum-pool'),
])
@pytest.mark.parametrize('layer', [stax.Relu, stax.Erf, stax.Tanh, stax.LayerNorm],
                         ids=lambda layer: layer.__name__)
def test_nonlinearity_on_raw_inputs_raises_naming_it(backend, before, layer):
    network = stax.serial(*before(), layer(), stax.Conv(3, (2,)), stax.Relu(), stax.Conv(1, (2,)))
    with pytest.raises(ValueError, match=rf"{layer.__name__}: the input kernel is not Gaussian"
                                         r".*network's inputs"):
        network.kernel_fn(gaussian(3, 4, 7))


def test_sum_of_inputs_and_gaussian_branch_raises_naming_fan_in_sum():
    # The network: 1.48 where sampling gives 0.35.
    network = stax.serial(stax.FanOut(2), stax.parallel(stax.Identity(), stax.Dense(5)),
                          stax.FanInSum(), stax.Relu())
    with pytest.raises(ValueError, match=r'FanInSum: every branch must end with an affine layer'
                                         r".*network's inputs.*\[False, True\]"):
        network.kernel_fn(gaussian(4, 5))


def test_spatial_concat_of_inputs_and_gaussian_branch_raises_naming_fan_in_concat():
    network = stax.serial(stax.FanOut(2), stax.parallel(stax.Identity(), stax.Conv(2, (1,))),
                          stax.FanInConcat(axis=2))
    with pytest.raises(ValueError, match=r'FanInConcat: every branch must end with an affine '
                                         r'layer'):
        network.kernel_fn(gaussian(3, 2, 5))


def test_linear_layers_on_raw_inputs_give_the_exact_kernel(backend):
    """Pooling, Flatten and Dense on fixed inputs: the output of the finite
    network is `W·flat(pool(x))/√d + b` at any width, whose covariance (and NTK,
    the inputs having no parameters) is `W_std²·flat(pool(x))·flat(pool(x'))ᵀ/d + b_std²`."""
    x1, x2 = gaussian(3, 2, 8, seed=1), gaussian(2, 2, 8, seed=2)
    network = stax.serial(stax.AvgPool((2,), strides=(2,)), stax.Flatten(),
                          stax.Dense(6, W_std=1.3, b_std=0.2))
    pooled = [torch.nn.functional.avg_pool1d(x, 2).flatten(1) for x in (x1, x2)]
    expected = 1.3**2 * pooled[0] @ pooled[1].T / pooled[0].shape[1] + 0.2**2
    kernel = network.kernel_fn(x1, x2)
    assert relative_error(kernel.nngp, expected) <= 1e-14
    assert relative_error(kernel.ntk, expected) <= 1e-14


@pytest.mark.parametrize('branches, shape', [
    pytest.param(lambda: [stax.Identity(), stax.Identity()], (3, 5), id='x*x'),
    pytest.param(lambda: [stax.Identity(), stax.AvgPool((2,), padding='SAME')], (3, 2, 6),
                 id='x*pool(x)'),
    pytest.param(lambda: [stax.serial(stax.Conv(3, (2,)), stax.Relu(), stax.Flatten())
                          for _ in range(2)], (3, 2, 6), id='flatten*flatten'),
])
def test_product_of_two_branches_with_channels_that_differ_raises_naming_fan_in_prod(
        backend, branches, shape):
    network = stax.serial(stax.FanOut(2), stax.parallel(*branches()), stax.FanInProd(),
                          stax.Dense(1))
    with pytest.raises(ValueError, match=r'FanInProd: at most one branch may have channels that '
                                         r'are not identically distributed.*\[False, False\]'):
        network.kernel_fn(gaussian(*shape))


def test_product_of_inputs_and_gaussian_branch_is_exact(backend):
    """`x ⊙ g` with `g = W x/√d + b` Gaussian: the readout's covariance is
    `W_out²·(1/d) Σ_c x_c x'_c E[g_c g'_c] = W_out²·(x·x'ᵀ/d)·(W²·x·x'ᵀ/d + b²)`."""
    x1, x2 = gaussian(3, 5, seed=4), gaussian(2, 5, seed=5)
    network = stax.serial(stax.FanOut(2), stax.parallel(stax.Identity(), stax.Dense(5, 1.3, 0.2)),
                          stax.FanInProd(), stax.Dense(1, W_std=0.9))
    gram = x1 @ x2.T / 5
    expected = 0.9**2 * gram * (1.3**2 * gram + 0.2**2)
    assert relative_error(network.kernel_fn(x1, x2, get='nngp'), expected) <= 1e-14
