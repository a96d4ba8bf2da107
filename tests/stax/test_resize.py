"""`stax.ImageResize`: finite forward against torch, kernel, requirements, errors."""

import pytest
import torch
import torch.nn.functional as F

from torchntk import stax
from torchntk.kernel import kernel_from_inputs
from torchntk.stax.requirements import resolve_layout


def test_linear_upsampling_is_torch_bilinear(images1):
    ours = stax.ImageResize((-1, -1, 12, 8), 'bilinear')(images1)
    reference = F.interpolate(images1, size=(12, 8), mode='bilinear', align_corners=False)
    torch.testing.assert_close(ours, reference, rtol=1e-13, atol=1e-13)


def test_nearest_is_torch_nearest_exact(images1):
    ours = stax.ImageResize((-1, -1, 13, 3), 'nearest')(images1)
    reference = F.interpolate(images1, size=(13, 3), mode='nearest-exact')
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_minus_one_keeps_an_axis(images1):
    out = stax.ImageResize((-1, -1, -1, 9), 'linear')(images1)
    assert out.shape == (3, 2, 6, 9)
    torch.testing.assert_close(stax.ImageResize((-1, -1, -1, -1), 'linear')(images1), images1)


@pytest.mark.parametrize('shape, method, antialias', [
    ((-1, -1, 12, 10), 'linear', True), ((-1, -1, 4, 3), 'linear', True),
    ((-1, -1, 4, 3), 'linear', False), ((-1, -1, 13, 2), 'nearest', True),
])
def test_kernel_is_the_gram_matrix_of_the_outputs(shape, method, antialias, images1, images2):
    layer = stax.ImageResize(shape, method, antialias)
    kernel = layer.kernel_fn(images1, images2, diagonal_batch=False)
    outputs = kernel_from_inputs(layer(images1), layer(images2), diagonal_batch=False,
                                 diagonal_spatial=False, compute_ntk=False)
    for key in ('nngp', 'cov1', 'cov2'):
        torch.testing.assert_close(getattr(kernel, key), getattr(outputs, key), rtol=1e-13,
                                   atol=1e-13)


def test_resizing_needs_full_spatial_and_keeping_does_not():
    assert not resolve_layout(stax.serial(stax.ImageResize((-1, -1, 3, 3), 'linear'),
                                          stax.Flatten()).requirements, None, None, '')[1]
    assert resolve_layout(stax.serial(stax.ImageResize((-1, -1, -1, -1), 'linear'),
                                      stax.Flatten()).requirements, None, None, '')[1]


def test_diagonal_spatial_true_with_resize_raises(images1):
    with pytest.raises(ValueError, match='diagonal_spatial=True'):
        stax.serial(stax.ImageResize((-1, -1, 3, 3), 'linear'), stax.Flatten()).kernel_fn(
            images1, diagonal_spatial=True)


@pytest.mark.parametrize('shape, method, match', [
    ((-1, 4, 3, 3), 'linear', 'channels'),
    ((2, -1, 3, 3), 'linear', 'batch'),
    ((-1, -1, 3, 3), 'cubic', 'method'),
    ((-1, -1, 0, 3), 'linear', 'shape'),
])
def test_image_resize_rejects_bad_arguments(shape, method, match):
    with pytest.raises(ValueError, match=match):
        stax.ImageResize(shape, method)


def test_shape_rank_must_match_input_rank(images1):
    with pytest.raises(ValueError, match='ImageResize: shape'):
        stax.ImageResize((-1, -1, 3), 'linear').kernel_fn(images1)
