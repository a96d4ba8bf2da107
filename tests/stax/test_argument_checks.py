"""Arguments of `kernel_fn` (layout flags) and of layer constructors
(standard deviations, windows) are checked where they are given, with errors
naming the argument, and the layers that rule out a requested layout."""

import re
from unittest import mock

import pytest
import torch

from torchntk import stax
from torchntk.ops import conv_chain
from torchntk.stax.requirements import Requirements

from tests.strategies import gaussian


@pytest.mark.parametrize('value', ['no', 0, 1.0, torch.tensor(True)], ids=repr)
@pytest.mark.parametrize('arg', ['diagonal_batch', 'diagonal_spatial'])
def test_layout_flag_that_is_not_a_bool_raises_type_error(arg, value):
    network = stax.serial(stax.Dense(3), stax.Relu(), stax.Dense(1))
    with pytest.raises(TypeError, match=rf"Serial.kernel_fn: {arg} must be True, False or None, "
                                        rf"got {re.escape(repr(value))}"):
        network.kernel_fn(gaussian(2, 4), **{arg: value})


LAYERS = {
    'Dense': lambda **kw: stax.Dense(3, **kw),
    'Conv': lambda **kw: stax.Conv(3, (2, 2), **kw),
    'ConvTranspose': lambda **kw: stax.ConvTranspose(3, (2,), **kw),
    'ConvLocal': lambda **kw: stax.ConvLocal(3, (2,), **kw),
}


@pytest.mark.parametrize('arg, value', [
    ('W_std', 1e200), ('b_std', 1e155), ('W_std', torch.tensor(1e300, dtype=torch.float64))],
    ids=['W_std', 'b_std', 'W_std-tensor'])
@pytest.mark.parametrize('layer', LAYERS)
def test_standard_deviation_whose_square_overflows_raises_at_construction(layer, arg, value):
    with pytest.raises(ValueError, match=rf'{layer}: {arg} must be below ~1.34e154 \(its square, '
                                         r'the variance, overflows float64.*got 1e\+'):
        LAYERS[layer](**{arg: value})


@pytest.mark.skipif(not conv_chain.available(torch.zeros(1, dtype=torch.float64)),
                    reason='the fused chain needs the compiled extension')
def test_fused_run_squares_an_overflowing_tensor_std_to_inf_as_the_layers_do(monkeypatch):
    """A tensor W_std may grow after construction (a hyperparameter being
    optimized): the chain's W_std² is then inf, as in the layers' tensor
    arithmetic, not an OverflowError of Python floats."""
    W_std = torch.tensor(1., dtype=torch.float64)
    network = stax.serial(stax.Dense(4, W_std=W_std, b_std=0.1), stax.Dense(1))
    W_std.fill_(1e200)
    x = gaussian(3, 4)
    with mock.patch.object(conv_chain, 'chain_pairs', wraps=conv_chain.chain_pairs) as fused:
        nngp = network.kernel_fn(x, get='nngp')
    assert fused.call_count == 1
    gram = x @ x.T
    assert torch.equal(nngp, torch.where(gram > 0, torch.inf, -torch.inf).to(nngp.dtype))
    monkeypatch.setattr(conv_chain, 'available', lambda tensor: False)
    assert torch.equal(network.kernel_fn(x, get='nngp'), nngp)


@pytest.mark.parametrize('make, arg', [
    (lambda: stax.Conv(4, '3x3'), 'filter_shape'),
    (lambda: stax.ConvLocal(4, 3), 'filter_shape'),
    (lambda: stax.Conv(4, (3, 3), strides=2), 'strides'),
    (lambda: stax.AvgPool((2, 2.5)), 'window_shape'),
    (lambda: stax.SumPool((2,), strides=(True,)), 'strides'),
], ids=['string', 'int', 'int-strides', 'float-entry', 'bool-entry'])
def test_window_argument_of_the_wrong_type_raises_type_error(make, arg):
    with pytest.raises(TypeError, match=rf'{arg} must be a tuple of positive integers'):
        make()


class MixesExamples(stax.Identity):
    """A layer that needs the covariances between examples (as batch normalization would)."""

    @property
    def requirements(self):
        return Requirements(diagonal_batch=False)


def test_diagonal_batch_true_with_a_layer_mixing_examples_raises_naming_it():
    with pytest.raises(ValueError, match=r'Serial: diagonal_batch=True is not possible: a layer in '
                                         r'this network mixes examples.*\(MixesExamples\)'):
        stax.serial(stax.Dense(3), MixesExamples()).kernel_fn(gaussian(2, 4), diagonal_batch=True)
