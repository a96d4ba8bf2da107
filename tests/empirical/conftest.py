import pytest
import torch

from tests.empirical.models import initialized, tiny_models


@pytest.fixture(params=sorted(tiny_models()))
def model_name(request):
    return request.param


@pytest.fixture
def model(model_name):
    return initialized(model_name, seed=0)


@pytest.fixture
def x1():
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.fixture
def x2():
    return torch.randn(2, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
