"""`torchntk.empirical.implementations`: on `torch.nn` models, every
implementation, with and without vmap, equals the Jacobian contraction of the
whole batch; `auto` falls back and the vector products explain what they lack.
"""

import re

import pytest
import torch

import torchntk
from torchntk import stax

from tests.empirical.references import ATOL, IMPLEMENTATIONS


class ResNetBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.conv2 = torch.nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.readout = torch.nn.Linear(3 * 5 * 5, 2)

    def forward(self, x):
        x = x + self.conv2(torch.relu(self.norm(self.conv1(x))))
        return self.readout(x.flatten(1))


def torch_models():
    return {
        'mlp': (lambda: torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                            torch.nn.Linear(7, 3)), (5,)),
        'cnn': (lambda: torch.nn.Sequential(
            torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(4, 3, 3, stride=2, dilation=2), torch.nn.Flatten(),
            torch.nn.Linear(3, 3)), (2, 6, 6)),
        'cnn1d': (lambda: torch.nn.Sequential(
            torch.nn.Conv1d(2, 4, 3, padding=2, dilation=2), torch.nn.ReLU(),
            torch.nn.Conv1d(4, 3, 2, stride=2), torch.nn.Flatten(), torch.nn.Linear(12, 2)),
            (2, 9)),
        'resnet_block': (ResNetBlock, (3, 5, 5)),
        # Training mode with dropout=0 avoids the fused inference kernel, which
        # has no derivative rules in torch.func.
        'transformer': (lambda: torch.nn.Sequential(
            torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.,
                                             batch_first=True),
            torch.nn.Flatten(), torch.nn.Linear(24, 2)).train(), (3, 8)),
    }


@pytest.mark.parametrize('name', sorted(torch_models()))
@pytest.mark.parametrize('trace_axes, diagonal_axes', [((-1,), ()), ((), ()), ((), (-1,))])
def test_implementations_agree_on_torch_models(name, trace_axes, diagonal_axes):
    make, shape = torch_models()[name]
    torch.manual_seed(0)
    model = make().to(torch.float64)
    x1 = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x2 = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = torchntk.empirical_ntk_fn(model, trace_axes, diagonal_axes, vmap_axes=None,
                                         implementation='jacobian_contraction')(x1, x2)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        # The math attention backend has forward-mode derivatives, needed by
        # 'ntk_vector_products'.
        for vmap_axes in (0, None):
            for implementation in IMPLEMENTATIONS:
                ntk = torchntk.empirical_ntk_fn(model, trace_axes, diagonal_axes, vmap_axes,
                                                implementation)(x1, x2)
                torch.testing.assert_close(ntk, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
@pytest.mark.parametrize('vmap_axes', [0, None])
def test_diagonal_over_the_batch_axis_is_the_diagonal_of_the_kernel(implementation, vmap_axes):
    make, shape = torch_models()['cnn']
    torch.manual_seed(0)
    model = make().to(torch.float64)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = torchntk.empirical_ntk_fn(model, trace_axes=(), vmap_axes=None,
                                     implementation='jacobian_contraction')(x)   # (N, N, O, O)
    diagonal = torchntk.empirical_ntk_fn(model, trace_axes=(), diagonal_axes=(0,),
                                         vmap_axes=vmap_axes, implementation=implementation)(x)
    torch.testing.assert_close(diagonal, torch.diagonal(full, dim1=0, dim2=1).permute(2, 0, 1),
                               rtol=0, atol=ATOL)


def test_auto_falls_back_when_forward_mode_is_missing():
    make, shape = torch_models()['transformer']
    model = make().to(torch.float64)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torchntk.empirical_ntk_fn(model, implementation='jacobian_contraction')(x)
    torch.testing.assert_close(torchntk.empirical_ntk_fn(model)(x), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_random_model_in_train_mode_gives_kernel_or_clear_error(implementation):
    # Dropout draws masks inside the model: an implementation must either handle
    # it or say so, not fail inside torch.func.vmap.
    model = stax.serial(stax.Dense(8), stax.Relu(), stax.Dropout(0.5), stax.Dense(1)).train()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model.init_parameters(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    try:
        ntk = torchntk.empirical_ntk_fn(model, implementation=implementation)(x)
    except ValueError as error:
        assert re.search(r'random|eval|Dropout', str(error)), str(error)
        return
    assert ntk.shape == (3, 3) and torch.isfinite(ntk).all()


def mlp_with_tangent_error(error):
    """Linear-Tanh-(2·)-Linear in float64 whose doubling raises `error` in forward mode."""
    class Doubling(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return 2 * x

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return 2 * g

        @staticmethod
        def jvp(ctx, tangent):
            raise error

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden, self.head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(Doubling.apply(torch.tanh(self.hidden(x))))

    torch.manual_seed(0)
    return Model().double()


def test_vector_products_name_an_operation_without_forward_mode():
    model = mlp_with_tangent_error(NotImplementedError('no tangent rule'))
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"ntk_vector_products' needs forward-mode AD.*no tangent"):
        torchntk.empirical_ntk_fn(model, implementation='ntk_vector_products')(x)


def test_vector_products_let_a_deterministic_model_s_own_error_through():
    # The error's text mentions randomness, but the model draws no random numbers.
    model = mlp_with_tangent_error(RuntimeError('a random failure of the tangent'))
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(RuntimeError, match='a random failure of the tangent'):
        torchntk.empirical_ntk_fn(model, implementation='ntk_vector_products')(x)
