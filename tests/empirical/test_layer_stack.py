"""`torchntk.empirical`'s fast paths of structured derivatives: the reverse pass
through layer stacks (`layer_stack`), the identity cotangents of an `nn.Linear`
head, and kernels summed in place.

The reference is the Jacobian contraction without `vmap_axes`: `jacrev`
through the whole model, no structured rule.
"""

import gc

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad

import torchntk
from torchntk import empirical
from torchntk.empirical import inputs as empirical_inputs, structured as empirical_structured
from torchntk.empirical.layer_stack import ELEMENTWISE, layer_stack
from torchntk.empirical.task import prepare_ntk

from tests.empirical.references import ATOL


def inputs(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference(model, x1, x2, trace_axes, diagonal_axes=()):
    return torchntk.empirical_ntk_fn(model, trace_axes, diagonal_axes, vmap_axes=None,
                                     implementation='jacobian_contraction')(x1, x2)


def structured(model, x1, x2, trace_axes, diagonal_axes=(), **kwargs):
    return torchntk.empirical_ntk_fn(model, trace_axes, diagonal_axes,
                                     implementation='structured_derivatives', **kwargs)(x1, x2)


def layer_stack_of(model, x1, x2=None, vmap_axes=0):
    task, _ = prepare_ntk(model, empirical_inputs.trainable_params(model), x1, x2, {}, (-1,), (),
                          vmap_axes, empirical.DEFAULT_CHUNK_BYTES)
    return layer_stack(task)


def assert_agrees(model, x1, x2, trace_axes, diagonal_axes=()):
    expected = reference(model, x1, x2, trace_axes, diagonal_axes)
    torch.testing.assert_close(structured(model, x1, x2, trace_axes, diagonal_axes), expected,
                               rtol=0, atol=ATOL)


@pytest.mark.parametrize('activation', ELEMENTWISE, ids=lambda a: a.__name__)
def test_layer_stack_through_each_activation_matches_jacobian_contraction(activation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), activation(), nn.Linear(5, 3)).double()
    x1, x2 = inputs(3, 4, seed=1), inputs(2, 4, seed=2)
    kinds = [kind for _, kind, _ in layer_stack_of(model, x1, x2)]
    assert kinds == ['affine', 'elementwise', 'affine']
    for trace_axes in ((-1,), ()):
        assert_agrees(model, x1, x2, trace_axes)
        assert_agrees(model, x1, None, trace_axes)


def layer_stacks():
    """Models, input shapes, and whether `layer_stack` takes them."""
    def hooked():
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        model[1].register_forward_pre_hook(lambda module, args: (2 * args[0],))
        return model

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(x + self.inner(x))

    return {
        'nested_conv': (lambda: nn.Sequential(
            nn.Sequential(nn.Conv2d(2, 3, 3, padding='same'), nn.GELU(), nn.Identity()),
            nn.Conv2d(3, 4, (2, 3), stride=(2, 1), dilation=(1, 2), padding=(1, 0)),
            nn.Dropout(0.5).eval(), nn.Softplus(), nn.Flatten(), nn.Linear(24, 3)),
            (2, 5, 6), True),
        'conv1d_groups_valid': (lambda: nn.Sequential(
            nn.Conv1d(4, 6, 3, groups=2, padding='valid'), nn.Tanh(), nn.Flatten(),
            nn.Linear(30, 2)), (4, 7), True),
        'conv3d_frozen_first_layer': (lambda: nn.Sequential(
            nn.Conv3d(1, 2, 2).requires_grad_(False), nn.SiLU(), nn.Conv3d(2, 2, 2),
            nn.Flatten(), nn.Linear(16, 2)), (1, 4, 4, 4), True),
        'inplace_relu': (lambda: nn.Sequential(nn.Linear(4, 3), nn.ELU(inplace=True),
                                               nn.Linear(3, 2)), (4,), False),
        'reflect_padding': (lambda: nn.Sequential(
            nn.Conv1d(2, 3, 3, padding=1, padding_mode='reflect'), nn.Flatten(),
            nn.Linear(15, 2)), (2, 5), False),
        'same_even_kernel': (lambda: nn.Sequential(
            nn.Conv1d(2, 3, 2, padding='same'), nn.Flatten(), nn.Linear(15, 2)), (2, 5), False),
        'forward_pre_hook': (hooked, (4,), False),
        'residual': (Residual, (4,), False),
    }


@pytest.mark.filterwarnings('ignore:Using padding=.same. with even kernel')
@pytest.mark.parametrize('name', sorted(layer_stacks()))
def test_layer_stack_is_taken_where_its_reverse_pass_is_exact(name):
    make, shape, is_stack = layer_stacks()[name]
    torch.manual_seed(0)
    model = make().double()
    x1, x2 = inputs(3, *shape, seed=1), inputs(2, *shape, seed=2)
    assert (layer_stack_of(model, x1, x2) is not None) == is_stack
    assert layer_stack_of(model, x1, x2, vmap_axes=None) is None
    for trace_axes in ((-1,), ()):
        assert_agrees(model, x1, x2, trace_axes)


def test_layer_stack_kernel_gradients_match_autograd_and_gradcheck_at_zero_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Softplus(),
                          nn.Linear(4, 2)).double()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    x1, x2 = inputs(3, 3, seed=1).requires_grad_(), inputs(2, 3, seed=2)
    assert layer_stack_of(model, x1, x2) is not None

    def gradients(vmap_axes, implementation):
        fn = torchntk.empirical_ntk_fn(model, trace_axes=(), vmap_axes=vmap_axes,
                                       implementation=implementation)
        return torch.autograd.grad(fn(x1, x2, params=params).square().sum(),
                                   [*params.values(), x1], allow_unused=True,
                                   materialize_grads=True)

    for ours, expected in zip(gradients(0, 'structured_derivatives'),
                              gradients(None, 'jacobian_contraction')):
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)

    fn = torchntk.empirical_ntk_fn(model, trace_axes=(), implementation='structured_derivatives')
    names = list(params)

    def kernel(x, *values):
        return fn(x, x2, params=dict(zip(names, values)))

    zeros = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kernel, (zeros, *params.values()))
    assert torch.autograd.gradcheck(kernel, (x1, *params.values()))


def test_layer_stack_inside_a_dual_level_of_the_callers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x1, x2 = inputs(3, 4, seed=1), inputs(2, 4, seed=2)
    with forward_ad.dual_level():
        ours = structured(model, x1, x2, ())
    torch.testing.assert_close(ours, reference(model, x1, x2, ()), rtol=0, atol=ATOL)


# The cotangents of an nn.Linear head are the identity: its term is the Gram
# matrix of its inputs times δ between the two outputs' feature axes.

@pytest.fixture
def heads_taken(monkeypatch):
    """The number of structured terms computed as an `nn.Linear` head's."""
    taken = []
    original = empirical_structured.linear_head_operands

    def counted(*args):
        taken.append(1)
        return original(*args)
    monkeypatch.setattr(empirical_structured, 'linear_head_operands', counted)
    return taken


@pytest.mark.parametrize('trace_axes, diagonal_axes', [
    ((-1,), ()), ((), ()), ((), (-1,)), ((-1,), (0,)), ((), (0,))])
@pytest.mark.parametrize('vmap_axes', [0, None])
def test_linear_head_term_matches_jacobian_contraction(heads_taken, trace_axes, diagonal_axes,
                                                       vmap_axes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x1 = inputs(3, 4, seed=1)
    x2 = None if 0 in diagonal_axes else inputs(2, 4, seed=2)
    ours = structured(model, x1, x2, trace_axes, diagonal_axes, vmap_axes=vmap_axes)
    torch.testing.assert_close(ours, reference(model, x1, x2, trace_axes, diagonal_axes),
                               rtol=0, atol=ATOL)
    assert len(heads_taken) == 1


@pytest.mark.parametrize('trace_axes, diagonal_axes', [((-1,), ()), ((), ()), ((), (1,)),
                                                       ((1,), ())])
def test_linear_head_over_a_sequence_matches_jacobian_contraction(heads_taken, trace_axes,
                                                                  diagonal_axes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x1, x2 = inputs(3, 6, 4, seed=1), inputs(2, 6, 4, seed=2)
    assert layer_stack_of(model, x1, x2) is not None
    assert_agrees(model, x1, x2, trace_axes, diagonal_axes)
    assert len(heads_taken) == 1


class ScaledInPlace(nn.Module):
    """A linear head whose output is scaled in place: cotangents `2·I`, not `I`."""

    def __init__(self):
        super().__init__()
        self.hidden, self.head = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        y = self.head(torch.tanh(self.hidden(x)))
        y *= 2
        return y


def test_head_scaled_in_place_is_not_taken_for_the_identity(heads_taken):
    torch.manual_seed(0)
    model = ScaledInPlace().double()
    x1, x2 = inputs(3, 4, seed=1), inputs(2, 4, seed=2)
    for trace_axes in ((-1,), ()):
        assert_agrees(model, x1, x2, trace_axes)
    assert not heads_taken


@pytest.mark.parametrize('make', [
    lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)),
    lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.LayerNorm(6), nn.Linear(6, 3)),
], ids=['layer_stack', 'layer_norm'])
def test_kernel_leaves_no_tensor_in_reference_cycles(make):
    """Tensors in reference cycles live until the garbage collector runs: the
    next calls then take fresh memory, page by page."""
    torch.manual_seed(0)
    model = make()
    x1, x2 = torch.randn(5, 4), torch.randn(4, 4)
    fn = torchntk.empirical_ntk_fn(model, trace_axes=(), implementation='structured_derivatives')
    fn(x1, x2)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        fn(x1, x2)
        gc.collect()
        cycled = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert cycled == []
