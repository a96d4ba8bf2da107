"""`kernel_fn(x, x)`: x2 given as the same inputs as x1 (the same tensor, or a
bitwise copy) is the kernel of `kernel_fn(x)`, with `cov2 = cov1`.

Computed as a pair of distinct batches, a same-example entry nngp[i, i] and
the variances cov1[i], cov2[i] take different rounding paths; the correlation
is then 1 − ulp, and the arc-cosine maps (θ = arccos ρ, infinite slope at 1)
turn an ulp into √ulp: 2e-4 of the kernel's scale in float32.
"""

import math

import pytest
import torch

import torchntk as nt
from torchntk import stax

from tests.strategies import gaussian

MASK = -1.


def pooled_cnn():
    return stax.serial(stax.Conv(2, (3, 1)), stax.AvgPool((2, 2)), stax.Dense(2), stax.Relu(),
                       stax.GlobalSumPool(), stax.Dense(1), stax.Relu(), stax.Dense(1))


def quadrature_cnn():
    return stax.serial(stax.Conv(1, (1,)), stax.SiLU(), stax.Dense(1), stax.Relu(),
                       stax.GlobalAvgPool())


def two_input_network():
    return stax.serial(stax.parallel(stax.Conv(3, (3,), padding='SAME', b_std=0.1),
                                     stax.Conv(3, (2,), padding='SAME')),
                       stax.FanInSum(), stax.Relu(), stax.AvgPool((2,)), stax.Dense(2),
                       stax.Relu(), stax.GlobalAvgPool(), stax.Dense(1))


def masked_sequences(seed):
    """`(3, 2, 6)` sequences padded with `MASK` past lengths 6, 4 and 2."""
    x = gaussian(3, 2, 6, seed=seed)
    for i, length in enumerate((6, 4, 2)):
        x[i, :, length:] = MASK
    return x


# name: (network, inputs, mask_constant)
CASES = {
    'pooled-cnn': (pooled_cnn, lambda: gaussian(2, 2, 4, 3, seed=8), None),
    'quadrature-cnn': (quadrature_cnn, lambda: gaussian(2, 2, 3, seed=0), None),
    'masked': (lambda: stax.serial(stax.Conv(3, (3,), padding='SAME', b_std=0.2), stax.Relu(),
                                   stax.AvgPool((2,)), stax.Dense(2), stax.Relu(),
                                   stax.GlobalAvgPool(), stax.Dense(1)),
               lambda: masked_sequences(seed=3), MASK),
    'two-inputs': (two_input_network, lambda: [gaussian(3, 2, 6, seed=4),
                                               gaussian(3, 2, 6, seed=5)], None),
}


def copy_of(x):
    return x.clone() if isinstance(x, torch.Tensor) else [t.clone() for t in x]


def cast(x, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) else [t.to(dtype) for t in x]


def assert_bitwise_equal(actual, expected):
    assert (actual is None) == (expected is None)
    if expected is not None:
        assert actual.shape == expected.shape and actual.dtype == expected.dtype
        assert torch.equal(actual, expected), f"max diff {(actual - expected).abs().max().item()}"


@pytest.mark.parametrize('get', ['nngp', 'ntk', None])
@pytest.mark.parametrize('diagonal_batch', [True, False])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('x2_is', ['a copy', 'x1 itself'])
@pytest.mark.parametrize('case', CASES)
def test_x2_equal_to_x1_gives_the_x2_none_kernel_bitwise(case, x2_is, dtype, diagonal_batch, get,
                                                         backend):
    network, inputs, mask_constant = CASES[case]
    model, x = network(), cast(inputs(), dtype)
    x2 = copy_of(x) if x2_is == 'a copy' else x
    options = dict(get=get, diagonal_batch=diagonal_batch, mask_constant=mask_constant)
    expected = model.kernel_fn(x, **options)
    actual = model.kernel_fn(x, x2, **options)
    if get is not None:
        assert_bitwise_equal(actual, expected)
        return
    for name in ('nngp', 'ntk', 'cov1', 'mask1'):
        assert_bitwise_equal(getattr(actual, name), getattr(expected, name))


@pytest.mark.parametrize('case', CASES)
def test_x2_equal_to_x1_returns_cov2_and_mask2_as_those_of_x1(case):
    network, inputs, mask_constant = CASES[case]
    model, x = network(), inputs()
    kernels = model.kernel_fn(x, copy_of(x), mask_constant=mask_constant)
    for k in kernels if isinstance(kernels, (list, tuple)) else [kernels]:
        assert k.cov2 is not None and torch.equal(k.cov2, k.cov1)
        assert_bitwise_equal(k.mask2, k.mask1)
        assert (k.mask1 is None) == (mask_constant is None)
        assert bool(k.x1_is_x2) and k.shape2 == k.shape1


def test_nan_padding_at_the_same_entries_is_the_same_inputs(backend):
    # NaN != NaN, yet the copy holds the same inputs: the padding matches bit for bit.
    model = CASES['masked'][0]()
    padded = masked_sequences(seed=3).float()
    x = torch.where(padded == MASK, math.nan, padded)
    expected = model.kernel_fn(x, get='ntk', mask_constant=math.nan)
    assert_bitwise_equal(model.kernel_fn(x, x.clone(), get='ntk', mask_constant=math.nan),
                         expected)


def test_empty_batches_equal_to_each_other():
    model = pooled_cnn()
    x = gaussian(0, 2, 4, 3)
    k = model.kernel_fn(x, x.clone())
    assert k.ntk.shape == (0, 0) and k.cov2 is not None and k.cov2.shape == k.cov1.shape


def test_float32_kernel_of_x_and_a_copy_is_within_1e_4_of_float64(backend):
    # Before the fix, 2.2e-4 (torch backend) and 1.4e-4 (extension) of the kernel's scale.
    model = pooled_cnn()
    x = gaussian(2, 2, 4, 3, seed=8)
    exact = model.kernel_fn(x, x.clone(), get='ntk')
    single = model.kernel_fn(x.float(), x.float().clone(), get='ntk')
    assert (single.double() - exact).abs().max() / exact.abs().max() < 1e-4


def test_inputs_that_differ_by_the_sign_of_a_zero_are_the_same_inputs():
    # 0. == -0.: the same inputs, though not the same bits.
    model = pooled_cnn()
    x = gaussian(2, 2, 4, 3, seed=8)
    x[0, 0, 0, 0] = 0.
    x2 = x.clone()
    x2[0, 0, 0, 0] = -0.
    assert_bitwise_equal(model.kernel_fn(x, x2, get='ntk'), model.kernel_fn(x, get='ntk'))


def test_a_copy_that_requires_grad_gets_its_gradient():
    # The x2=None kernel would leave x2 out of the graph: a distinct x2 that needs a gradient
    # takes the pair path, and the two gradients add up to that of kernel_fn(x).
    model = pooled_cnn()
    x = gaussian(2, 2, 4, 3, seed=8)
    x1, x2, x_both = (x.clone().requires_grad_() for _ in range(3))
    model.kernel_fn(x1, x2, get='ntk').sum().backward()
    model.kernel_fn(x_both, get='ntk').sum().backward()
    assert x2.grad is not None and x2.grad.abs().max() > 0
    torch.testing.assert_close(x1.grad + x2.grad, x_both.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize('batch_size', [2, 3])
def test_batch_of_x_and_x_matches_the_untiled_kernel_in_float32(batch_size, backend):
    # Diagonal tiles get x2 rows equal to their x1 rows: their same-example pairs must be the
    # x2=None numbers, else they are √ulp off. Off-diagonal tiles round like the untiled call.
    model = pooled_cnn()
    x = gaussian(4, 2, 4, 3, seed=8).float()
    untiled = model.kernel_fn(x, get='ntk')
    tiled = nt.batch(model.kernel_fn, batch_size, progress=False)(x, x, get='ntk')
    assert (tiled - untiled).abs().max() / untiled.abs().max() < 1e-6
