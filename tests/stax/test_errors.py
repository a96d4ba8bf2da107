"""Invalid networks and arguments raise `ValueError`/`TypeError` naming the layer and the problem."""

import math

import pytest
import torch
from torch import nn

from torchntk import stax


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture
def x():
    return gaussian(4, 6)


# --- nonlinearities need Gaussian inputs ------------------------------------------------------

@pytest.mark.parametrize('model', [
    pytest.param(lambda: stax.serial(stax.Dense(4), stax.Relu(), stax.Relu()), id='relu-relu'),
    pytest.param(lambda: stax.serial(stax.Dense(4), stax.Dropout(0.5).train(), stax.Relu()),
                 id='dropout-relu'),
    pytest.param(lambda: stax.serial(stax.FanOut(2), stax.parallel(stax.Dense(4), stax.Dense(4)),
                                     stax.FanInConcat(), stax.Relu()), id='concat-relu'),
    pytest.param(lambda: stax.serial(stax.FanOut(2), stax.parallel(stax.Dense(4), stax.Dense(4)),
                                     stax.FanInProd(), stax.Relu()), id='prod-relu'),
])
def test_nonlinearity_without_affine_layer_before_it_raises(model, x):
    with pytest.raises(ValueError, match=r'Relu: the input kernel is not Gaussian.*affine layer'):
        model().kernel_fn(x)


@pytest.mark.parametrize('phi', [stax.Erf, stax.Tanh, lambda: stax.Elementwise(torch.sin)],
                         ids=['Erf', 'Tanh', 'Elementwise'])
def test_every_kind_of_nonlinearity_checks_gaussian_inputs(phi, x):
    layer = phi()
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf'{name}: the input kernel is not Gaussian'):
        stax.serial(stax.Dense(4), stax.Abs(), layer).kernel_fn(x)


def test_layer_norm_after_nonlinearity_raises(x):
    with pytest.raises(ValueError, match=r'LayerNorm: the input kernel is not Gaussian'):
        stax.serial(stax.Dense(4), stax.Relu(), stax.LayerNorm()).kernel_fn(x)


def test_nonlinearity_on_raw_inputs_raises(x):
    # The inputs are fixed values, not Gaussian: relu(x)·relu(x')ᵀ/d is not a
    # function of x·x'ᵀ/d (neural-tangents refuses this network too).
    with pytest.raises(ValueError, match=r"Relu: the input kernel is not Gaussian.*network's inputs"):
        stax.serial(stax.Relu(), stax.Dense(1)).kernel_fn(x)


def test_dropout_in_eval_mode_keeps_inputs_gaussian(x):
    nngp = stax.serial(stax.Dense(4), stax.Dropout(0.5).eval(), stax.Relu()).kernel_fn(x, get='nngp')
    assert torch.isfinite(nngp).all()


def test_fan_in_sum_of_non_gaussian_branches_raises(x):
    model = stax.serial(stax.Dense(4), stax.FanOut(2), stax.parallel(stax.Relu(), stax.Identity()),
                        stax.FanInSum())
    with pytest.raises(ValueError, match=r'FanInSum: every branch must end with an affine layer'):
        model.kernel_fn(x)


# --- inputs -----------------------------------------------------------------------------------

def test_x1_x2_feature_sizes_that_differ_raise(x):
    with pytest.raises(ValueError, match=r'Serial: x1 and x2 must agree in all but the batch axis.*'
                                         r'\(4, 6\).*\(3, 5\)'):
        stax.serial(stax.Dense(4), stax.Relu()).kernel_fn(x, gaussian(3, 5))


def test_x1_x2_dtypes_that_differ_raise(x):
    with pytest.raises(ValueError, match=r'Dense: x1 and x2 must have the same dtype'):
        stax.Dense(4).kernel_fn(x, x.float())


@pytest.mark.parametrize('value', [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize('which', ['x1', 'x2'])
def test_non_finite_inputs_raise(x, value, which):
    bad = x.clone()
    bad[1, 2] = value
    x1, x2 = (bad, x) if which == 'x1' else (x, bad)
    with pytest.raises(ValueError, match=rf'Serial: {which} contains non-finite values'):
        stax.serial(stax.Dense(4), stax.Relu()).kernel_fn(x1, x2)


def test_input_without_channel_axis_raises():
    with pytest.raises(ValueError, match=r'Dense: x1 must have shape \(N, C, \*spatial\)'):
        stax.Dense(4).kernel_fn(torch.ones(5, dtype=torch.float64))


def test_x2_with_kernel_input_raises(x):
    kernel = stax.Dense(4).kernel_fn(x, get=None)
    with pytest.raises(ValueError, match=r'Relu: x2, .* must be None when x1 is a Kernel'):
        stax.Relu().kernel_fn(kernel, x)


def test_layout_flags_with_kernel_input_raise(x):
    kernel = stax.Dense(4).kernel_fn(x, get=None)
    with pytest.raises(ValueError, match=r'Relu: .*diagonal_batch.* must be None when x1 is a Kernel'):
        stax.Relu().kernel_fn(kernel, diagonal_batch=False)


# --- constructor arguments --------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, message', [
    ({'W_std': -1.}, r'Dense: W_std must be finite and >= 0, got -1.0'),
    ({'W_std': math.inf}, r'Dense: W_std must be finite and >= 0'),
    ({'W_std': math.nan}, r'Dense: W_std must be finite and >= 0'),
    ({'b_std': -0.1}, r'Dense: b_std must be finite and >= 0, got -0.1'),
    ({'W_std': torch.tensor(-2.)}, r'Dense: W_std must be finite and >= 0'),
    ({'W_std': torch.ones(2)}, r'Dense: W_std must be a scalar'),
    ({'parameterization': 'mup'}, r"Dense: parameterization must be one of .*'mup'"),
    ({'s': (1, 2, 3)}, r'Dense: s must be a pair'),
    ({'s': (0, 1)}, r'Dense: s must be a positive integer'),
])
def test_invalid_dense_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stax.Dense(4, **kwargs)


@pytest.mark.parametrize('W_std', ['1.0', None, True])
def test_non_numeric_w_std_raises_type_error(W_std):
    with pytest.raises(TypeError, match=r'Dense: W_std'):
        stax.Dense(4, W_std=W_std)


@pytest.mark.parametrize('out_dim', [0, -3])
def test_out_dim_below_one_raises_value_error(out_dim):
    with pytest.raises(ValueError, match=r'Dense: out_dim must be a positive integer'):
        stax.Dense(out_dim)


@pytest.mark.parametrize('out_dim', [2.5, True, '8'])
def test_out_dim_that_is_not_an_int_raises_type_error(out_dim):
    with pytest.raises(TypeError, match=r'Dense: out_dim must be a positive integer'):
        stax.Dense(out_dim)


@pytest.mark.parametrize('p', [1, 1.5, -0.1])
def test_invalid_dropout_p_raises(p):
    with pytest.raises(ValueError, match=r'Dropout: p \(the drop probability\) must be in \[0, 1\)'):
        stax.Dropout(p)


@pytest.mark.parametrize('p', ['0.5', None])
def test_dropout_p_of_another_type_raises_type_error(p):
    with pytest.raises(TypeError, match=r'Dropout: p \(the drop probability\) must be a float'):
        stax.Dropout(p)


@pytest.mark.parametrize('axis', [0, (0,), -2])
def test_layer_norm_axis_without_channel_axis_raises(x, axis):
    model = stax.serial(stax.Dense(4), stax.LayerNorm(axis=axis))
    with pytest.raises(ValueError, match=r'LayerNorm: axis must include the channel axis 1'):
        model.kernel_fn(x)
    with pytest.raises(ValueError, match=r'LayerNorm: axis must include the channel axis 1'):
        model(x)


def test_layer_norm_axis_out_of_range_raises(x):
    with pytest.raises(ValueError, match=r'LayerNorm: axis=\(1, 3\) out of range'):
        stax.serial(stax.Dense(4), stax.LayerNorm(axis=(1, 3))).kernel_fn(x)


@pytest.mark.parametrize('factory, message', [
    (lambda: stax.repeat(stax.Dense(2), 0), r'repeat: n must be a positive integer'),
    (lambda: stax.FanOut(0), r'FanOut: num must be a positive integer'),
    (lambda: stax.ElementwiseNumerical(torch.tanh, deg=0), r'ElementwiseNumerical: deg must be'),
])
def test_invalid_layer_arguments_raise_value_error(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


@pytest.mark.parametrize('factory, message', [
    (lambda: stax.Hermite(1.5), r'Hermite: degree must be an integer >= 0, got 1.5'),
    (lambda: stax.Monomial('2'), r'Monomial: degree must be an integer in 0..5'),
    (lambda: stax.FanOut(2.), r'FanOut: num must be a positive integer'),
    (lambda: stax.repeat(stax.Dense(2), True), r'repeat: n must be a positive integer'),
    (lambda: stax.ElementwiseNumerical(torch.tanh, deg=10.), r'ElementwiseNumerical: deg must be'),
    (lambda: stax.Polynomial(2.), r'Polynomial: coef must be a non-empty sequence'),
    (lambda: stax.LayerNorm(axis='a'), r'LayerNorm: axis must be a sequence of ints'),
    (lambda: stax.LayerNorm(axis=(1, True)), r'LayerNorm: axis must be a sequence of ints'),
])
def test_layer_argument_of_a_wrong_type_raises_type_error(factory, message):
    with pytest.raises(TypeError, match=message):
        factory()


# --- combinators and branching ----------------------------------------------------------------

def test_fan_in_concat_axis_that_is_not_an_int_raises():
    with pytest.raises(TypeError, match=r'FanInConcat: axis must be an int'):
        stax.FanInConcat(axis=1.0)


@pytest.mark.parametrize('axis', [4, -5])
def test_fan_in_concat_axis_out_of_range_raises(images1, axis):
    model = stax.serial(stax.FanOut(2), stax.parallel(stax.Dense(2), stax.Dense(2)),
                        stax.FanInConcat(axis=axis))
    with pytest.raises(ValueError, match=rf'FanInConcat: axis={axis} is out of range'):
        model.kernel_fn(images1)


def test_fan_in_concat_along_space_of_non_gaussian_branches_raises(images1):
    model = stax.serial(stax.Dense(2), stax.FanOut(2), stax.parallel(stax.Relu(), stax.Identity()),
                        stax.FanInConcat(axis=2))
    with pytest.raises(ValueError, match=r'FanInConcat: every branch must end with an affine'):
        model.kernel_fn(images1)


def test_fan_in_concat_along_space_with_other_channel_counts_raises(images1):
    model = stax.serial(stax.FanOut(2), stax.parallel(stax.Dense(2), stax.Dense(3)),
                        stax.FanInConcat(axis=2))
    with pytest.raises(ValueError, match=r'FanInConcat: branches must agree in all but axis 2'):
        model.kernel_fn(images1)


def test_unknown_get_raises(x):
    with pytest.raises(ValueError, match=r"Dense.kernel_fn: get must be .* got unknown kernel field 'ntks'"):
        stax.Dense(1).kernel_fn(x, get='ntks')


def test_fan_in_sum_over_mismatched_shapes_raises(x):
    model = stax.serial(stax.FanOut(2), stax.parallel(stax.Dense(3), stax.Dense(4)), stax.FanInSum())
    with pytest.raises(ValueError, match=r'FanInSum: all branches must have the same shape'):
        model.kernel_fn(x)
    with pytest.raises(ValueError, match=r'FanInSum: all branches must have the same shape'):
        model(x)


def test_fan_in_prod_over_mismatched_shapes_raises(x):
    model = stax.serial(stax.FanOut(2), stax.parallel(stax.Dense(3), stax.Dense(4)), stax.FanInProd())
    with pytest.raises(ValueError, match=r'FanInProd: all branches must have the same shape'):
        model.kernel_fn(x)


def test_fan_in_of_single_kernel_raises(x):
    with pytest.raises(ValueError, match=r'FanInSum: expected a list of kernels'):
        stax.serial(stax.Dense(3), stax.FanInSum()).kernel_fn(x)


@pytest.mark.parametrize('inputs, got', [(3, '3 kernels'), (1, 'one kernel')])
def test_parallel_with_wrong_number_of_inputs_raises(x, inputs, got):
    model = stax.serial(stax.FanOut(inputs), stax.parallel(stax.Dense(2), stax.Dense(2))) \
        if inputs > 1 else stax.parallel(stax.Dense(2), stax.Dense(2))
    with pytest.raises(ValueError, match=rf'parallel: expected a list of 2 kernels .*got {got}'):
        model.kernel_fn(x)


def test_parallel_forward_with_wrong_number_of_inputs_raises(x):
    with pytest.raises(ValueError, match=r'parallel: expected a list of 2 inputs'):
        stax.parallel(stax.Dense(2), stax.Dense(2))([x, x, x])


def test_parallel_kernel_fn_with_mismatched_x1_x2_lists_raises(x):
    with pytest.raises(ValueError, match=r'Parallel: x1 has 2 inputs but x2 has 1'):
        stax.parallel(stax.Dense(2), stax.Dense(2)).kernel_fn([x, x], [x])


def test_same_dense_instance_twice_in_serial_raises():
    dense = stax.Dense(4)
    with pytest.raises(ValueError, match=r'serial: the same Dense instance is used twice'):
        stax.serial(dense, stax.Relu(), dense)


def test_same_dense_instance_twice_in_nested_serial_raises():
    dense = stax.Dense(4)
    with pytest.raises(ValueError, match=r'serial: the same Dense instance is used twice'):
        stax.serial(stax.serial(dense, stax.Relu()), dense)


def test_same_dense_instance_in_two_parallel_branches_raises():
    dense = stax.Dense(4)
    with pytest.raises(ValueError, match=r'parallel: the same Dense instance is used twice'):
        stax.parallel(dense, dense)


def test_same_parameter_free_layer_twice_is_allowed(x):
    relu = stax.Relu()
    model = stax.serial(stax.Dense(4), relu, stax.Dense(4), relu, stax.Dense(1))
    assert torch.isfinite(model.kernel_fn(x, get='ntk')).all()


def test_non_torchntk_layer_in_serial_raises():
    with pytest.raises(TypeError, match=r'serial: expected torchntk layers, got Linear'):
        stax.serial(stax.Dense(4), nn.Linear(4, 4))


def test_elementwise_without_kernel_raises(x):
    with pytest.raises(ValueError, match=r'Elementwise: no nngp_fn given'):
        stax.serial(stax.Dense(4), stax.Elementwise(torch.sin)).kernel_fn(x)


def test_elementwise_without_function_raises(x):
    with pytest.raises(ValueError, match=r'Elementwise: no fn given'):
        stax.Elementwise(nngp_fn=lambda c, v1, v2: c)(x)


def test_dense_forward_with_wrong_input_size_raises(x):
    model = stax.Dense(3)
    model.init_parameters((1, 5), dtype=torch.float64)
    with pytest.raises(ValueError, match=r'Dense: the weight of shape \(3, 5\) was made for other inputs than \(4, 6\)'):
        model(x)


def test_elementwise_numerical_with_very_high_degree_is_rejected_or_finite(x):
    # numpy's hermgauss overflows for deg ≳ 380 and returns NaN weights.
    try:
        layer = stax.ElementwiseNumerical(torch.tanh, deg=400)
    except ValueError as error:
        assert 'ElementwiseNumerical' in str(error) and 'deg' in str(error)
        return
    assert torch.isfinite(stax.serial(stax.Dense(4), layer).kernel_fn(x, get='nngp')).all()


def test_parallel_without_layers_raises_value_error(x):
    with pytest.raises(ValueError, match=r'parallel'):
        stax.parallel().kernel_fn([x])
