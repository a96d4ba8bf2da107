"""`torchntk.empirical.vmap_axes`: pytree inputs and outputs, keyword
arguments, and batch axes other than the leading one.
"""

import pytest
import torch

import torchntk
from torchntk import stax

from tests.empirical.models import TwoInputsTwoHeads, pytree_inputs
from tests.empirical.references import (ATOL, IMPLEMENTATIONS, agrees_with_jacobian_contraction,
                                        full_ntk_by_loop)


def jacobian_by_loop_of(fn, params):
    """`(*out, P)` of one output tensor `fn()`."""
    out = fn()
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        o, params, retain_graph=True, allow_unused=True, materialize_grads=True)])
        for o in out.reshape(-1)]
    return torch.stack(rows).reshape(*out.shape, -1)


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
@pytest.mark.parametrize('vmap_axes', [0, None])
def test_pytree_inputs_and_outputs_give_a_pytree_of_kernels(implementation, vmap_axes):
    torch.manual_seed(0)
    model = TwoInputsTwoHeads().double()
    x1, x2 = pytree_inputs(3, seed=1), pytree_inputs(2, seed=2)
    ntk = torchntk.empirical_ntk_fn(model, trace_axes=(), vmap_axes=vmap_axes,
                                    implementation=implementation)(x1, x2)
    params = list(model.parameters())
    for head, select in ((0, lambda out: out[0]), (1, lambda out: out[1]['z'])):
        j1 = jacobian_by_loop_of(lambda: select(model(x1)), params)
        j2 = jacobian_by_loop_of(lambda: select(model(x2)), params)
        expected = torch.einsum('iap,jbp->ijab', j1, j2)
        kernel = ntk[0] if head == 0 else ntk[1]['z']
        torch.testing.assert_close(kernel, expected, rtol=0, atol=ATOL)
    assert isinstance(ntk, tuple) and set(ntk[1]) == {'z'}


def test_pytree_nngp_is_a_pytree_of_output_products():
    torch.manual_seed(0)
    model = TwoInputsTwoHeads().double()
    x1, x2 = pytree_inputs(3, seed=1), pytree_inputs(2, seed=2)
    nngp = torchntk.empirical_nngp_fn(model)(x1, x2)
    with torch.no_grad():
        (a1, b1), (a2, b2) = model(x1), model(x2)
    torch.testing.assert_close(nngp[0], a1 @ a2.T / 2, rtol=0, atol=ATOL)
    torch.testing.assert_close(nngp[1]['z'], b1['z'] @ b2['z'].T / 3, rtol=0, atol=ATOL)


def test_keyword_arguments_with_batch_axes_and_pairs():
    # gate is batched along axis 0 (kwargs_axes) and given per side as a pair.
    torch.manual_seed(0)
    model = TwoInputsTwoHeads().double()
    x1, x2 = pytree_inputs(3, seed=1), pytree_inputs(2, seed=2)
    gate1 = torch.rand(3, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gate2 = torch.rand(2, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    agrees_with_jacobian_contraction(model, x1, x2, trace_axes=(), vmap_axes=(0, 0, {'gate': 0}),
                                     gate=(gate1, gate2))
    # Each side's kernel uses its own gate: the gated NTK differs from the ungated one.
    ntk_fn = torchntk.empirical_ntk_fn(model, vmap_axes=(0, 0, {'gate': 0}))
    gated, plain = ntk_fn(x1, x2, gate=(gate1, gate2)), ntk_fn(x1, x2)
    assert (gated[0] - plain[0]).abs().max() > 1e-3


class BatchLast(torch.nn.Module):
    """`(C, N)` -> `(O, N)`: the examples are the last axis."""

    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))

    def forward(self, x):
        return self.mlp(x.T).T


@pytest.mark.parametrize('vmap_axes', [1, -1, (1, 1, {})])
def test_vmap_axes_along_a_non_leading_axis(vmap_axes):
    torch.manual_seed(0)
    model = BatchLast().double()
    x1 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x2 = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    agrees_with_jacobian_contraction(model, x1, x2, trace_axes=(), vmap_axes=vmap_axes)
    ntk = torchntk.empirical_ntk_fn(model, trace_axes=(), vmap_axes=vmap_axes)(x1, x2)
    expected = full_ntk_by_loop(model.mlp, x1.T, x2.T).permute(2, 3, 0, 1)   # (O, O, N1, N2)
    torch.testing.assert_close(ntk, expected, rtol=0, atol=ATOL)


def test_vmap_axes_pytree_with_unbatched_input():
    # x = {'u': (N, 4) batched on axis 0, 'v': (1, 3) shared by every example}.
    torch.manual_seed(0)
    model = TwoInputsTwoHeads().double()
    x1, x2 = pytree_inputs(3, seed=1), pytree_inputs(2, seed=2)
    x2['v'] = x1['v'] = x1['v'][:1]
    agrees_with_jacobian_contraction(model, x1, x2, trace_axes=(),
                                     vmap_axes=({'u': 0, 'v': None}, 0, {}))


def test_vmap_axes_on_the_wrong_axis_raises_value_error():
    model = BatchLast().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match='vmap_axes'):
        torchntk.empirical_ntk_fn(model, vmap_axes=0)(x)
    with pytest.raises(ValueError, match='vmap_axes'):
        torchntk.empirical_ntk_fn(TwoInputsTwoHeads().double(),
                                  vmap_axes=({'u': 0}, 0, {}))(pytree_inputs(3, seed=1))


@pytest.mark.parametrize('vmap_axes', ['0', 1.5, (0, 0, [0])])
def test_invalid_vmap_axes_raises_value_error(vmap_axes):
    with pytest.raises(ValueError, match='vmap_axes'):
        torchntk.empirical_ntk_fn(stax.Dense(1), vmap_axes=vmap_axes)


def test_inputs_of_different_structure_raise_value_error():
    model = TwoInputsTwoHeads().double()
    x1 = pytree_inputs(3, seed=1)
    with pytest.raises(ValueError, match='structure'):
        torchntk.empirical_ntk_fn(model)(x1, (x1['u'], x1['v']))


def test_outputs_differing_on_a_traced_axis_raise_value_error():
    model = torch.nn.Conv1d(1, 2, 2).double()
    with pytest.raises(ValueError, match='axis 2'):
        torchntk.empirical_ntk_fn(model, trace_axes=(-1,))(torch.randn(3, 1, 5, dtype=torch.float64),
                                                           torch.randn(2, 1, 6, dtype=torch.float64))
