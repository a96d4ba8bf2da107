"""`stax.requirements`: needs declared once per layer (Gaussian input, coupled
axes) and read by kernel_fn, and `modules_mixing_examples` with the input ranks
`recorded_input_ranks` finds, as the empirical kernels and `batch` read them."""

import pytest
import torch
from torch import nn

from torchntk import stax
from torchntk.stax.requirements import (Diagonal, Requirements, modules_mixing_examples,
                                        recorded_input_ranks)

from tests.strategies import gaussian


def named(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def output_alone_and_in_batch(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The layer's output for example 0 computed alone and within the batch `x`."""
    return layer(x[:1])[0], layer(x)[0]


# ----------------------------------------------------------------------------- LayerNorm

def test_layer_norm_over_the_batch_axis_is_named_and_its_finite_outputs_depend_on_the_batch():
    layer = stax.LayerNorm(axis=(0, 1))
    alone, in_batch = output_alone_and_in_batch(layer, gaussian(4, 5, seed=1))
    assert not torch.allclose(alone, in_batch)
    assert modules_mixing_examples({'norm': layer}) == ['norm']


def test_layer_norm_over_channels_is_not_named_and_its_finite_outputs_do_not_depend_on_the_batch():
    layer = stax.LayerNorm(axis=(1, 2))
    alone, in_batch = output_alone_and_in_batch(layer, gaussian(4, 5, 3, seed=2))
    torch.testing.assert_close(alone, in_batch, rtol=1e-15, atol=1e-15)
    assert modules_mixing_examples({'norm': layer}, {'norm': {3}}) == []


@pytest.mark.parametrize('ranks, mixes', [((2,), True), ((3,), False), ((3, 2), True), ((), False)],
                         ids=['flat', 'sequence', 'both', 'not called'])
def test_negative_layer_norm_axes_mix_examples_only_for_the_ranks_that_make_one_of_them_the_batch(
        ranks, mixes):
    # axis=(-2, -1): on (N, C) inputs -2 is the batch; on (N, C, X) it is the channels.
    layer = stax.LayerNorm(axis=(-2, -1))
    assert modules_mixing_examples({'norm': layer}, {'norm': set(ranks)}) == (['norm'] if mixes else [])


def test_layer_norm_requires_a_gaussian_input_and_couples_its_axes():
    requirements = stax.LayerNorm(axis=(1, -1)).requirements
    assert requirements.gaussian_input and requirements.coupled_axes == (1, -1)


# ----------------------------------------------------------------------------- BatchNorm, Dropout

@pytest.mark.parametrize('make, training, mixes', [
    (lambda: nn.BatchNorm1d(3), True, True),
    (lambda: nn.BatchNorm1d(3), False, False),
    (lambda: nn.BatchNorm1d(3, track_running_stats=False), False, True),
    (lambda: nn.Linear(3, 3), True, False),
], ids=['train', 'eval', 'no-running-stats', 'linear'])
def test_torch_batch_norm_is_named_where_its_finite_outputs_depend_on_the_batch(make, training,
                                                                               mixes):
    module = make().double().train(training)
    with torch.no_grad():
        alone, in_batch = module(gaussian(4, 3, seed=3)[:2])[0], module(gaussian(4, 3, seed=3))[0]
    assert torch.allclose(alone, in_batch, rtol=1e-15, atol=1e-15) is not mixes
    assert modules_mixing_examples({'m': module}) == (['m'] if mixes else [])


@pytest.mark.parametrize('make', [lambda p: nn.Dropout(p), lambda p: stax.Dropout(p)],
                         ids=['torch', 'stax'])
@pytest.mark.parametrize('p, training, mixes', [(0.5, True, True), (0.5, False, False),
                                                (0., True, False)],
                         ids=['training', 'eval', 'p=0'])
def test_dropout_is_named_where_it_draws_random_masks(make, p, training, mixes):
    module = make(p).train(training)
    x = gaussian(4, 30, seed=4)
    assert torch.equal(module(x), module(x)) is not mixes
    assert modules_mixing_examples({'m': module}) == (['m'] if mixes else [])


def test_a_root_module_without_a_name_is_named_by_its_type():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5))
    assert modules_mixing_examples(named(model)) == ['1']
    assert modules_mixing_examples(named(nn.Dropout(0.5))) == ['Dropout']


# ----------------------------------------------------------------------------- input ranks

def test_input_ranks_are_recorded_from_the_kernel_rule_without_a_forward_pass():
    model = stax.serial(stax.Dense(4), stax.LayerNorm(axis=(-2, -1)), stax.Dense(1))
    modules = named(model)
    with recorded_input_ranks(modules) as ranks:
        model.kernel_fn(gaussian(3, 5, seed=4), None, 'nngp')
    assert ranks['1'] == {2}
    assert modules_mixing_examples(modules, ranks) == ['1']


def test_input_ranks_are_recorded_from_the_forward_pass():
    model = stax.serial(stax.Conv(4, (3,)), stax.LayerNorm(axis=(-2, -1)), stax.Dense(1))
    modules = named(model)
    with recorded_input_ranks(modules) as ranks:
        model(gaussian(3, 2, 7, seed=5))
    assert ranks['1'] == {3}
    assert modules_mixing_examples(modules, ranks) == []


def test_recorded_input_ranks_leave_no_hook_behind():
    model = stax.serial(stax.Dense(4), stax.LayerNorm(axis=(-2, -1)))
    modules = named(model)
    with recorded_input_ranks(modules) as ranks:
        pass
    model.kernel_fn(gaussian(3, 5, seed=6), None, 'nngp')
    model(gaussian(3, 5, seed=6))
    assert ranks == {name: set() for name in modules}
    assert not any(m._forward_pre_hooks for m in modules.values())


# ----------------------------------------------------------------------------- folding

def test_composed_and_parallel_requirements_fold_only_the_layout():
    own = Requirements(diagonal_spatial=Diagonal(), gaussian_input=True, coupled_axes=(0,))
    for folded in (own >> Requirements(), Requirements() >> own, own & own):
        assert folded.diagonal_spatial == Diagonal()
        assert not folded.gaussian_input and folded.coupled_axes == ()


def test_a_nonlinearity_inside_a_container_is_refused_by_its_own_name():
    # The container carries no Gaussian need of its own: the layer checks its input.
    assert not stax.serial(stax.Relu()).requirements.gaussian_input
    with pytest.raises(ValueError, match=r'^Relu: the input kernel is not Gaussian'):
        stax.serial(stax.Relu()).kernel_fn(gaussian(2, 3, seed=7))
