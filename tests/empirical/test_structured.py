"""`torchntk.empirical.structured`: every layer the structured rules cover gets
one, and the kernel equals the Jacobian contraction.
"""

import pytest
import torch

import torchntk
from torchntk import stax
from torchntk.empirical import inputs as empirical_inputs
from torchntk.empirical.task import prepare_ntk

from tests.empirical.references import agrees_with_jacobian_contraction


def structured_layers(model, x):
    task, _ = prepare_ntk(model, empirical_inputs.trainable_params(model), x, None, {}, (-1,), (),
                          0, torchntk.empirical.DEFAULT_CHUNK_BYTES)
    return set(task.structured_layers)


def convolutions():
    nn = torch.nn
    return {
        'conv3d': (lambda: nn.Sequential(nn.Conv3d(2, 3, (2, 3, 2), padding=1, stride=(1, 2, 1)),
                                         nn.Tanh(), nn.Flatten(), nn.Linear(225, 2)), (2, 4, 5, 4)),
        'groups_same_dilated': (lambda: nn.Sequential(
            nn.Conv2d(4, 6, 3, groups=2, padding='same', dilation=2), nn.Tanh(),
            nn.Conv2d(6, 6, 2, groups=3, padding=1, padding_mode='reflect'), nn.Flatten(),
            nn.Linear(216, 2)), (4, 5, 5)),
        'depthwise_circular_replicate': (lambda: nn.Sequential(
            nn.Conv1d(3, 6, 3, groups=3, padding='same', padding_mode='circular'), nn.Tanh(),
            nn.Conv1d(6, 2, 2, padding=1, padding_mode='replicate', dilation=3), nn.Flatten(),
            nn.Linear(12, 2)), (3, 7)),
        'same_even_kernel': (lambda: nn.Sequential(
            nn.Conv2d(2, 3, (2, 4), padding='same', dilation=(1, 3), bias=False), nn.Tanh(),
            nn.Conv2d(3, 2, 3, stride=2, padding='valid'), nn.Flatten(), nn.Linear(8, 2)),
            (2, 5, 6)),
    }


@pytest.mark.filterwarnings('ignore:Using padding=.same. with even kernel')
@pytest.mark.parametrize('name', sorted(convolutions()))
@pytest.mark.parametrize('trace_axes', [(-1,), ()])
def test_structured_rules_of_convolutions_match_jacobian_contraction(name, trace_axes):
    make, shape = convolutions()[name]
    torch.manual_seed(0)
    model = make().to(torch.float64)
    x1 = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x2 = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert structured_layers(model, x1) == {str(i) for i, m in enumerate(model)
                                            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d,
                                                              torch.nn.Conv2d, torch.nn.Conv3d))}
    agrees_with_jacobian_contraction(model, x1, x2, trace_axes,
                                     implementations=('structured_derivatives',))


@pytest.mark.parametrize('padding', ['VALID', 'SAME', 'CIRCULAR'])
@pytest.mark.parametrize('parameterization', ['ntk', 'standard'])
def test_structured_rule_of_stax_conv_matches_jacobian_contraction(padding, parameterization):
    model = stax.serial(
        stax.Conv(3, (3, 2), strides=(2, 1), padding=padding, W_std=1.3, b_std=0.4,
                  parameterization=parameterization), stax.Relu(),
        stax.Conv(2, (2, 2), padding=padding, parameterization=parameterization),
        stax.Flatten(), stax.Dense(2, b_std=0.1, parameterization=parameterization))
    x1 = torch.randn(3, 2, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x2 = torch.randn(2, 2, 6, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model.init_parameters(x1.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert len(structured_layers(model, x1)) == 3
    agrees_with_jacobian_contraction(model, x1, x2, trace_axes=(),
                                     implementations=('structured_derivatives',))


def test_structured_rule_with_frozen_weight_or_bias_uses_the_trainable_one():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.Linear(12, 2)).double()
    model[0].weight.requires_grad_(False)
    model[3].bias.requires_grad_(False)
    x1 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x2 = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert structured_layers(model, x1) == {'0', '3'}
    agrees_with_jacobian_contraction(model, x1, x2, trace_axes=())


def test_module_called_twice_falls_back_to_generic_rule():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.linear(torch.tanh(self.linear(x)))

    model = Twice().double()
    x1 = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x2 = torch.randn(2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert structured_layers(model, x1) == set()
    agrees_with_jacobian_contraction(model, x1, x2, trace_axes=())


def test_forward_hook_changing_the_output_disables_the_structured_rule():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    model[0].register_forward_hook(lambda module, args, output: 2 * output**2)
    x1 = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x2 = torch.randn(2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert structured_layers(model, x1) == {'2'}
    agrees_with_jacobian_contraction(model, x1, x2, trace_axes=())
