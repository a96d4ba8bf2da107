import pytest

from torchntk.ops import extension

from tests.strategies import gaussian


@pytest.fixture
def x1():
    return gaussian(4, 6, seed=0)


@pytest.fixture
def x2():
    return gaussian(3, 6, seed=1)


@pytest.fixture
def images1():
    return gaussian(3, 2, 6, 5, seed=0)


@pytest.fixture
def images2():
    return gaussian(2, 2, 6, 5, seed=1)


@pytest.fixture(params=['extension', 'torch'])
def backend(request, monkeypatch):
    """Runs a test with the compiled extension (the fused chain included) and
    with the torch fallback; skips the first where the extension is not in use."""
    if request.param == 'torch':
        monkeypatch.setattr(extension, 'EXTENSION', None)
    elif extension.EXTENSION is None:
        pytest.skip('the extension is not in use (not built, or TORCHNTK_BACKEND=torch)')
    return request.param
