"""`torchntk.empirical.taylor`: `linearize` and `taylor_expand` against the
model's own outputs and Jacobians, and polynomials their expansion is exact for.
"""

import pytest
import torch

import torchntk

from tests.empirical.models import TwoInputsTwoHeads, pytree_inputs
from tests.empirical.references import ATOL


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def perturbed(params, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    return {name: p + scale * torch.randn(p.shape, generator=generator, dtype=p.dtype)
            for name, p in params.items()}


def test_linearize_equals_model_at_params0(model, x1):
    params0 = snapshot(model)
    f_lin = torchntk.linearize(model, params0)
    with torch.no_grad():
        expected = model(x1)
    torch.testing.assert_close(f_lin(x1), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(f_lin(x1, params0), expected, rtol=0, atol=ATOL)


def test_linearize_jacobian_equals_model_jacobian_at_params0(model, x1):
    params0 = snapshot(model)
    f_lin = torchntk.linearize(model, params0)
    jac_lin = torch.func.jacrev(lambda p: f_lin(x1, p))(params0)
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x1,)))(params0)
    for name in params0:
        torch.testing.assert_close(jac_lin[name], jac[name], rtol=0, atol=ATOL)


def test_linearize_is_affine_in_params(model, x1):
    params0 = snapshot(model)
    f_lin = torchntk.linearize(model, params0)
    a, b = perturbed(params0, 0.3, seed=1), perturbed(params0, 0.3, seed=2)
    midpoint = {name: (a[name] + b[name]) / 2 for name in params0}
    torch.testing.assert_close(f_lin(x1, midpoint), (f_lin(x1, a) + f_lin(x1, b)) / 2,
                               rtol=0, atol=ATOL)


def test_training_linearized_model_moves_outputs_by_jacobian_times_step(model, x1, x2):
    # Gradient descent on f_lin: after any number of steps the outputs on fresh
    # inputs are f(θ0) + J(θ0)·(θ − θ0), with J the model's Jacobian at θ0.
    params0 = snapshot(model)
    f_lin = torchntk.linearize(model, params0)
    params = {name: torch.nn.Parameter(p.clone()) for name, p in params0.items()}
    optimizer = torch.optim.SGD(params.values(), lr=0.1)
    target = torch.ones(x1.shape[0], model(x1).shape[1], dtype=torch.float64)
    for _ in range(3):
        optimizer.zero_grad()
        ((f_lin(x1, params) - target)**2).sum().backward()
        optimizer.step()
    delta = {name: params[name].detach() - params0[name] for name in params0}
    assert max(d.abs().max() for d in delta.values()) > 1e-3
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x2,)))(params0)
    out_dims = model(x2).ndim
    expected = model(x2).detach() + sum(
        (jac[name].flatten(out_dims) * delta[name].flatten()).sum(-1) for name in params0)
    torch.testing.assert_close(f_lin(x2, {n: p.detach() for n, p in params.items()}), expected,
                               rtol=0, atol=1e-11)


def test_linearize_of_pytree_model_is_pytree_and_exact_at_params0():
    torch.manual_seed(0)
    model = TwoInputsTwoHeads().double()
    x = pytree_inputs(3, seed=1)
    gate = torch.rand(3, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    params0 = snapshot(model)
    f_lin = torchntk.linearize(model, params0)
    with torch.no_grad():
        expected = model(x, gate=gate)
    for params in (None, params0):
        out = f_lin(x, params, gate=gate)
        torch.testing.assert_close(out[0], expected[0], rtol=0, atol=ATOL)
        torch.testing.assert_close(out[1]['z'], expected[1]['z'], rtol=0, atol=ATOL)


def test_taylor_expand_degree_1_equals_linearize(model, x1):
    params0 = snapshot(model)
    params = perturbed(params0, 0.5, seed=3)
    torch.testing.assert_close(torchntk.taylor_expand(model, params0, 1)(x1, params),
                               torchntk.linearize(model, params0)(x1, params), rtol=0, atol=ATOL)


def test_taylor_expand_degree_0_is_constant(model, x1):
    params0 = snapshot(model)
    f0 = torchntk.taylor_expand(model, params0, 0)
    torch.testing.assert_close(f0(x1, perturbed(params0, 0.5, seed=3)), f0(x1), rtol=0, atol=0)


class Cubic(torch.nn.Module):
    """f(x) = (a x)² ⊙ (b x): quadratic in a, linear in b, cubic in (a, b) jointly."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(4, 3, generator=generator, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(4, 3, generator=generator, dtype=torch.float64))

    def forward(self, x):
        return (x @ self.a.T)**2 * (x @ self.b.T)


def test_taylor_expand_is_exact_at_the_polynomial_degree(x1):
    # Cubic in (a, b) jointly: degree 3 is exact, degree 2 is not.
    x = x1[:, :3]
    model = Cubic()
    params0 = snapshot(model)
    params = perturbed(params0, 0.7, seed=4)
    exact = torch.func.functional_call(model, params, (x,))
    torch.testing.assert_close(torchntk.taylor_expand(model, params0, 3)(x, params), exact,
                               rtol=0, atol=1e-11)
    assert (torchntk.taylor_expand(model, params0, 2)(x, params) - exact).abs().max() > 1e-3


def test_taylor_expand_degree_2_is_exact_for_quadratic_function(x1):
    model = SquaredLinear()
    params0 = snapshot(model)
    params = perturbed(params0, 0.7, seed=5)
    exact = torch.func.functional_call(model, params, (x1,))
    torch.testing.assert_close(torchntk.taylor_expand(model, params0, 2)(x1, params), exact,
                               rtol=0, atol=1e-11)


class SquaredLinear(torch.nn.Module):
    """f(x) = (W x + b)²: quadratic in (W, b)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3, dtype=torch.float64)

    def forward(self, x):
        return self.linear(x)**2


def test_taylor_expand_rejects_params_with_other_names(model, x1):
    params0 = snapshot(model)
    params = dict(params0)
    params.pop(next(iter(params)))
    with pytest.raises(ValueError, match='keys of params0'):
        torchntk.taylor_expand(model, params0, 1)(x1, params)


def test_taylor_expand_rejects_negative_degree(model):
    with pytest.raises(ValueError, match='degree'):
        torchntk.taylor_expand(model, snapshot(model), -1)
