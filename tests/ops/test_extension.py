"""torchntk.ops.extension: loading the extension, and large fresh tensors
advised as huge pages."""

import importlib
import warnings

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


def failing_import(error):
    real_import = importlib.import_module

    def import_module(name, *args, **kwargs):
        if name == 'torchntk._C':
            raise error
        return real_import(name, *args, **kwargs)
    return import_module


def test_an_extension_that_fails_to_load_warns_with_the_reason(monkeypatch):
    monkeypatch.delenv('TORCHNTK_BACKEND', raising=False)
    monkeypatch.setattr(extension.importlib, 'import_module', failing_import(
        ImportError("_C.so: undefined symbol: _ZN3c1017RegisterOperators")))
    with pytest.warns(RuntimeWarning,
                      match=r"failed to load \(.*undefined symbol.*TORCHNTK_BACKEND=torch"):
        assert extension._load() is None


def test_an_extension_that_was_never_built_falls_back_silently(monkeypatch):
    monkeypatch.delenv('TORCHNTK_BACKEND', raising=False)
    monkeypatch.setattr(extension.importlib, 'import_module', failing_import(
        ModuleNotFoundError("No module named 'torchntk._C'", name='torchntk._C')))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert extension._load() is None


def test_backend_torch_does_not_try_to_load_the_extension(monkeypatch):
    monkeypatch.setenv('TORCHNTK_BACKEND', 'torch')
    monkeypatch.setattr(extension.importlib, 'import_module', failing_import(ImportError("boom")))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert extension._load() is None


def test_backend_extension_that_fails_to_load_raises_with_the_reason(monkeypatch):
    monkeypatch.setenv('TORCHNTK_BACKEND', 'extension')
    monkeypatch.setattr(extension.importlib, 'import_module', failing_import(
        ImportError("undefined symbol: foo")))
    with pytest.raises(ImportError, match="failed to load .*undefined symbol: foo"):
        extension._load()
