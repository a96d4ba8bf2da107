"""torchntk.ops.extension: large fresh tensors advised as huge pages."""

import pytest
import torch

from torchntk.ops import extension


@pytest.mark.parametrize('shape', [(3, 5), (1024, 1024, 2)], ids=['small', '16 MiB'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_empty_huge_pages_is_a_writable_tensor_like_its_model(shape, dtype):
    like = torch.zeros(2, dtype=dtype)
    tensor = extension.empty_huge_pages(shape, like)
    assert tensor.shape == shape and tensor.dtype == dtype and tensor.is_contiguous()
    values = torch.arange(tensor.numel(), dtype=dtype).reshape(shape)
    tensor.copy_(values)
    assert torch.equal(tensor, values)


def test_empty_huge_pages_without_the_extension_is_torch_empty(monkeypatch):
    monkeypatch.setattr(extension, 'EXTENSION', None)
    tensor = extension.empty_huge_pages((4, 6), torch.zeros(1, dtype=torch.float64))
    assert tensor.shape == (4, 6) and tensor.dtype == torch.float64
