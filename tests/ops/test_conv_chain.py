"""torchntk.ops.conv_chain: the extension reads each step record by its fields."""

import math

import pytest
import torch

from torchntk.ops import conv_chain

needs_chain = pytest.mark.skipif(not conv_chain.available(torch.zeros(1, dtype=torch.float64)),
                                 reason='the fused chain needs the compiled extension')


def pairs(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@needs_chain
def test_an_affine_step_reads_each_of_its_coefficients():
    """Four different numbers: a field read in another's place changes the result."""
    nngp, ntk = pairs(3, 4), pairs(3, 4, seed=1)
    step = conv_chain.AffineStep(W_var=2., b_var=0.5, gamma=3., delta=0.25, circular=False,
                                 windows=())
    nngp_out, ntk_out = conv_chain.chain_pairs(nngp, ntk, [], [], [step])
    torch.testing.assert_close(nngp_out, 2. * nngp + 0.5, rtol=1e-15, atol=0)
    torch.testing.assert_close(ntk_out, 3. * nngp + (2. * ntk + 0.25), rtol=1e-15, atol=0)


@needs_chain
def test_a_pool_step_reads_its_scale_and_windows():
    """A 1-D box of 2 with stride 2 and padding (1, 1) on 3 positions: outputs
    {pad, 0} and {1, 2}; entry (p, q) is scale · Σ over both boxes."""
    nngp = pairs(2, 2, 3, 3)
    window = conv_chain.Window(size=2, stride=2, pad_low=1, pad_high=0)
    step = conv_chain.PoolStep(scale=0.3, circular=False, windows=(window,))
    nngp_out, _ = conv_chain.chain_pairs(nngp, None, [], [], [step])
    boxes = [[0], [1, 2]]
    expected = torch.stack([torch.stack([0.3 * nngp[..., p_box, :][..., q_box].sum((-2, -1))
                                         for q_box in boxes], -1) for p_box in boxes], -2)
    torch.testing.assert_close(nngp_out, expected, rtol=1e-14, atol=0)


@needs_chain
def test_an_abrelu_step_reads_a_and_b():
    """The arc-cosine kernel of a·min(x, 0) + b·max(x, 0) (Cho & Saul 2009)
    at variances v: (a² + b²)/2·v for an example with itself, (a − b)²/(2π)·v
    between two uncorrelated ones."""
    a, b, v = -0.4, 1.3, 2.5
    affine = conv_chain.AffineStep(1., 0., 1., 0., False, ())
    cov = torch.tensor([v], dtype=torch.float64)
    own, variances = conv_chain.chain_self(cov, [affine, conv_chain.ABReluStep(a=a, b=b)])
    assert math.isclose(own.item(), (a * a + b * b) / 2 * v, rel_tol=1e-15)
    nngp = torch.tensor([[0.]], dtype=torch.float64)
    nngp_out, _ = conv_chain.chain_pairs(nngp, None, variances, variances,
                                         [affine, conv_chain.ABReluStep(a=a, b=b)])
    assert math.isclose(nngp_out.item(), (a - b)**2 / (2 * math.pi) * v, rel_tol=1e-15)


@needs_chain
def test_a_record_of_an_unknown_kind_is_refused_naming_it():
    class SoftplusStep:
        kind = 'softplus'

    with pytest.raises(RuntimeError, match="unknown step kind 'softplus'"):
        conv_chain.chain_pairs(pairs(2, 2), None, [], [], [SoftplusStep()])


@needs_chain
def test_a_step_with_a_window_per_other_dimension_is_refused():
    window = conv_chain.Window(size=1, stride=1, pad_low=0, pad_high=0)
    step = conv_chain.AffineStep(1., 0., 1., 0., False, (window, window))
    with pytest.raises(RuntimeError, match='a step with 2 windows on 1 spatial dimensions'):
        conv_chain.chain_pairs(pairs(2, 2, 3, 3), None, [], [], [step])


def test_needs_gradient_only_in_grad_mode_for_tensors_that_require_it():
    weight = torch.tensor(1.5, requires_grad=True)
    assert conv_chain.needs_gradient(0.5, None, weight)
    assert not conv_chain.needs_gradient(0.5, torch.tensor(1.5))
    with torch.no_grad():
        assert not conv_chain.needs_gradient(weight)
