"""The `Kernel` record and `kernel_fn`'s public behaviour: `get`, `x2`, layouts, dtypes."""

import dataclasses

import pytest
import torch

from torchntk import Kernel, stax


def network():
    return stax.serial(stax.Dense(16, W_std=1.5, b_std=0.2), stax.Relu(),
                       stax.Dense(8, W_std=1.2, b_std=0.1), stax.Erf(),
                       stax.Dense(1, W_std=0.8, b_std=0.3))


@pytest.fixture
def x1():
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture
def x2():
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# --- get semantics ----------------------------------------------------------------------------

def test_get_single_name_returns_that_field(x1, x2):
    kernel = network().kernel_fn(x1, x2, get=None)
    torch.testing.assert_close(network().kernel_fn(x1, x2, get='nngp'), kernel.nngp, rtol=0, atol=0)
    torch.testing.assert_close(network().kernel_fn(x1, x2, get='ntk'), kernel.ntk, rtol=0, atol=0)


def test_get_tuple_returns_namedtuple_in_requested_order(x1, x2):
    kernels = network().kernel_fn(x1, x2, get=('ntk', 'nngp'))
    assert kernels._fields == ('ntk', 'nngp')
    ntk, nngp = kernels
    torch.testing.assert_close(ntk, network().kernel_fn(x1, x2, get='ntk'), rtol=0, atol=0)
    torch.testing.assert_close(nngp, network().kernel_fn(x1, x2, get='nngp'), rtol=0, atol=0)


def test_get_is_case_insensitive(x1):
    torch.testing.assert_close(network().kernel_fn(x1, get='NTK'),
                               network().kernel_fn(x1, get='ntk'), rtol=0, atol=0)
    assert network().kernel_fn(x1, get=('NNGP', 'Ntk'))._fields == ('nngp', 'ntk')


def test_get_none_returns_kernel_record(x1):
    kernel = network().kernel_fn(x1, get=None)
    assert isinstance(kernel, Kernel)
    assert kernel.nngp.shape == kernel.ntk.shape == (4, 4)


def test_get_default_returns_whole_record(x1):
    assert isinstance(network().kernel_fn(x1), Kernel)


def test_get_other_fields(x1, x2):
    cov1, cov2 = network().kernel_fn(x1, x2, get=('cov1', 'cov2'))
    assert cov1.shape == (4,) and cov2.shape == (3,)


@pytest.mark.parametrize('get', ['ntks', ('nngp', 'cntk'), 'weights'])
def test_get_unknown_name_raises_value_error(x1, get):
    with pytest.raises(ValueError, match='unknown kernel field'):
        network().kernel_fn(x1, get=get)


@pytest.mark.parametrize('get', [('nngp', 'nngp'), ('ntk', 'NTK')])
def test_get_duplicate_names_raise_value_error(x1, get):
    with pytest.raises(ValueError, match='duplicate'):
        network().kernel_fn(x1, get=get)


def test_get_empty_tuple_raises_value_error(x1):
    with pytest.raises(ValueError, match='get'):
        network().kernel_fn(x1, get=())


def test_get_non_string_name_raises_type_error(x1):
    with pytest.raises(TypeError, match='get'):
        network().kernel_fn(x1, get=('nngp', 3))


def test_get_nngp_only_skips_ntk(x1):
    kernel = network().kernel_fn(x1, get=None)
    nngp, = network().kernel_fn(x1, get=('nngp',))
    torch.testing.assert_close(nngp, kernel.nngp, rtol=0, atol=0)


# --- x2 and layouts ---------------------------------------------------------------------------

def test_x2_none_equals_x2_is_x1(x1):
    alone = network().kernel_fn(x1, get=('nngp', 'ntk'))
    paired = network().kernel_fn(x1, x1.clone(), get=('nngp', 'ntk'))
    torch.testing.assert_close(alone.nngp, paired.nngp, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(alone.ntk, paired.ntk, rtol=1e-14, atol=1e-14)


def test_x2_none_leaves_cov2_none(x1):
    kernel = network().kernel_fn(x1)
    assert kernel.cov2 is None
    assert bool(kernel.x1_is_x2)


def test_x1_is_x2_flag(x1, x2):
    assert not bool(network().kernel_fn(x1, x2).x1_is_x2)
    assert bool(network().kernel_fn(x1, x1.clone()).x1_is_x2)


@pytest.mark.parametrize('change, same', [(1e-9, False), (1e-13, True)])
def test_x1_is_x2_looks_at_every_entry_of_large_inputs(change, same):
    """Inputs of 3·10⁵ entries are compared in pieces; the last entry counts."""
    x1 = torch.randn(300, 1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x2 = x1.clone()
    x2[-1, -1] += change
    assert bool(stax.Dense(1).kernel_fn(x1, x2).x1_is_x2) == same


def test_kernels_are_symmetric_when_x2_is_none(x1):
    kernel = network().kernel_fn(x1)
    torch.testing.assert_close(kernel.nngp, kernel.nngp.T, rtol=0, atol=0)
    torch.testing.assert_close(kernel.ntk, kernel.ntk.T, rtol=0, atol=0)


def test_swapping_x1_and_x2_transposes_kernels(x1, x2):
    forward = network().kernel_fn(x1, x2, get=('nngp', 'ntk'))
    backward = network().kernel_fn(x2, x1, get=('nngp', 'ntk'))
    torch.testing.assert_close(forward.nngp, backward.nngp.T, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(forward.ntk, backward.ntk.T, rtol=1e-14, atol=1e-14)


def test_batch_entries_are_independent_of_other_examples(x1, x2):
    # Without batch-mixing layers, kernel rows of x1[:2] do not depend on x1[2:].
    full = network().kernel_fn(x1, x2, get='ntk')
    part = network().kernel_fn(x1[:2], x2, get='ntk')
    torch.testing.assert_close(part, full[:2], rtol=1e-14, atol=1e-14)


def test_diagonal_batch_false_gives_same_kernels(x1, x2):
    diagonal = network().kernel_fn(x1, x2, diagonal_batch=True)
    full = network().kernel_fn(x1, x2, diagonal_batch=False)
    torch.testing.assert_close(full.nngp, diagonal.nngp, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(full.ntk, diagonal.ntk, rtol=1e-14, atol=1e-14)
    assert not full.diagonal_batch and diagonal.diagonal_batch


def test_diagonal_batch_false_cov1_is_full_covariance_with_diagonal_batch_true_diagonal(x1, x2):
    diagonal = network().kernel_fn(x1, x2, diagonal_batch=True)
    full = network().kernel_fn(x1, x2, diagonal_batch=False)
    assert diagonal.cov1.shape == (4,) and full.cov1.shape == (4, 4)
    assert full.cov2.shape == (3, 3)
    torch.testing.assert_close(torch.diagonal(full.cov1), diagonal.cov1, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(torch.diagonal(full.cov2), diagonal.cov2, rtol=1e-14, atol=1e-14)


def test_full_cov1_equals_nngp_of_x1_with_itself(x1, x2):
    cov1 = network().kernel_fn(x1, x2, get='cov1', diagonal_batch=False)
    torch.testing.assert_close(cov1, network().kernel_fn(x1, get='nngp'), rtol=1e-14, atol=1e-14)


def test_diagonal_of_nngp_equals_cov1(x1):
    kernel = network().kernel_fn(x1)
    torch.testing.assert_close(torch.diagonal(kernel.nngp), kernel.cov1, rtol=1e-14, atol=1e-14)


# --- inputs, dtype, device --------------------------------------------------------------------

def test_input_kernel_is_channel_averaged_gram_and_zero_ntk(x1, x2):
    kernel = stax.Identity().kernel_fn(x1, x2)
    torch.testing.assert_close(kernel.nngp, x1 @ x2.T / 6, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(kernel.cov1, (x1**2).mean(1), rtol=1e-14, atol=1e-14)
    assert kernel.ntk.shape == () and float(kernel.ntk) == 0.
    assert not kernel.is_gaussian   # fixed values (tests/stax/test_raw_inputs.py)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_kernel_dtype_follows_inputs(x1, x2, dtype):
    kernel = network().kernel_fn(x1.to(dtype), x2.to(dtype), diagonal_batch=False)
    for name in ('nngp', 'ntk', 'cov1', 'cov2'):
        assert getattr(kernel, name).dtype == dtype, name


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_quadrature_and_dropout_kernel_dtype_follows_inputs(x1, dtype):
    model = stax.serial(stax.Dense(4, b_std=0.1), stax.Tanh(), stax.Dropout(0.2), stax.Dense(4),
                        stax.LayerNorm(), stax.Dense(1))
    kernel = model.kernel_fn(x1.to(dtype))
    for name in ('nngp', 'ntk', 'cov1'):
        assert getattr(kernel, name).dtype == dtype, name


def test_float32_kernels_close_to_float64(x1, x2):
    single = network().kernel_fn(x1.float(), x2.float(), get='ntk')
    double = network().kernel_fn(x1, x2, get='ntk')
    torch.testing.assert_close(single.double(), double, rtol=1e-5, atol=1e-6)


def test_integer_inputs_become_floating():
    x = torch.tensor([[1, 0, 2], [0, 1, 1]])
    nngp = stax.Dense(1).kernel_fn(x, get='nngp')
    assert nngp.is_floating_point()
    torch.testing.assert_close(nngp, x.to(nngp.dtype) @ x.T.to(nngp.dtype) / 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_kernel_device_follows_inputs(x1, x2):
    kernel = network().kernel_fn(x1.cuda(), x2.cuda())
    assert kernel.nngp.is_cuda and kernel.ntk.is_cuda and kernel.cov1.is_cuda
    torch.testing.assert_close(kernel.ntk.cpu(), network().kernel_fn(x1, x2, get='ntk'))


# --- the record -------------------------------------------------------------------------------

def test_kernel_is_immutable(x1):
    kernel = network().kernel_fn(x1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        kernel.nngp = kernel.ntk


def test_replace_returns_changed_copy(x1):
    kernel = network().kernel_fn(x1)
    changed = kernel.replace(nngp=2 * kernel.nngp)
    torch.testing.assert_close(changed.nngp, 2 * kernel.nngp, rtol=0, atol=0)
    assert changed.ntk is kernel.ntk and changed is not kernel


def test_shapes_track_finite_activations(x1, x2):
    kernel = stax.serial(stax.Dense(16), stax.Relu(), stax.Dense(3)).kernel_fn(x1, x2)
    assert kernel.shape1 == (4, 3) and kernel.shape2 == (3, 3)


# --- layout operations ------------------------------------------------------------------------

def conv_network():
    return stax.serial(stax.Conv(8, (3,), padding='SAME', b_std=0.1), stax.Relu(),
                       stax.Conv(8, (2,), b_std=0.2))


@pytest.fixture
def images1():
    return torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


@pytest.fixture
def images2():
    return torch.randn(3, 3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def assert_kernels_equal(actual, expected):
    for name in ('nngp', 'ntk', 'cov1', 'cov2'):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name),
                                   rtol=1e-14, atol=1e-14, msg=name)
    assert (actual.shape1, actual.shape2) == (expected.shape1, expected.shape2)
    assert bool(actual.x1_is_x2) == bool(expected.x1_is_x2)


def test_transpose_is_the_kernel_of_swapped_inputs(images1, images2):
    """Full spatial layout: the pairs of spatial axes swap with the batch axes."""
    forward = conv_network().kernel_fn(images1, images2, diagonal_batch=False)
    assert forward.nngp.shape == (4, 3, 4, 4)
    assert_kernels_equal(forward.transpose(),
                         conv_network().kernel_fn(images2, images1, diagonal_batch=False))


def test_transpose_of_x2_none_kernel_keeps_cov2_none(images1):
    kernel = conv_network().kernel_fn(images1)
    transposed = kernel.transpose()
    assert transposed.cov2 is None
    torch.testing.assert_close(transposed.nngp, kernel.nngp, rtol=0, atol=0)


def test_slice_examples_is_the_kernel_of_sliced_inputs(images1, images2):
    kernel = conv_network().kernel_fn(images1, images2, diagonal_batch=False)
    assert_kernels_equal(kernel.slice_examples(slice(1, 3), slice(0, 2)),
                         conv_network().kernel_fn(images1[1:3], images2[0:2], diagonal_batch=False))


def test_slice_examples_of_x2_none_kernel_takes_x2_rows_from_x1(images1):
    kernel = conv_network().kernel_fn(images1)
    sliced = kernel.slice_examples(slice(0, 2), slice(2, 4))
    assert sliced.cov2 is not None and not bool(sliced.x1_is_x2)
    assert_kernels_equal(sliced, conv_network().kernel_fn(images1[0:2], images1[2:4]))


def test_map_covariances_gives_each_field_its_batch_axes_and_passes_scalar_ntk(x1):
    kernel = stax.Identity().kernel_fn(x1, diagonal_batch=False)
    assert kernel.ntk.ndim == 0 and kernel.cov2 is None
    seen = []

    def rule(cov, batch_ndim):
        seen.append((cov.shape, batch_ndim))
        return 2 * cov

    mapped = kernel.map_covariances(rule)
    assert seen == [((4, 4), 2), ((4, 4), 2)]   # nngp and cov1; not the scalar NTK, not None
    torch.testing.assert_close(mapped.nngp, 2 * x1 @ x1.T / 6, rtol=1e-14, atol=0)
    assert mapped.ntk is kernel.ntk and mapped.cov2 is None


def test_map_covariances_replaces_other_fields_in_the_same_copy(x1):
    kernel = stax.Identity().kernel_fn(x1)
    mapped = kernel.map_covariances(lambda cov, _: -cov, ('cov1',), is_gaussian=True,
                                    shape1=(4, 1))
    torch.testing.assert_close(mapped.cov1, -(x1**2).mean(1), rtol=1e-14, atol=0)
    assert mapped.nngp is kernel.nngp and mapped.is_gaussian and mapped.shape1 == (4, 1)
