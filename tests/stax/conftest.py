import pytest

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
