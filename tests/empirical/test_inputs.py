"""`torchntk.empirical` at its public boundary: the names in `params`, empty
batches, and inputs the model cannot take (wrong dtype, shape or device,
non-finite, complex, shape-only `meta` tensors).

References are closed forms of small networks, or the kernel of the
non-empty batch the empty one is cut from.
"""

import numpy as np
import pytest
import torch
from torch import nn

import torchntk
from torchntk import empirical
from torchntk.empirical import inputs as empirical_inputs
from torchntk.empirical.layer_stack import layer_stack
from torchntk.empirical.task import prepare_ntk

from tests.empirical.references import IMPLEMENTATIONS


def mlp():
    """`Linear(3, 4) - Tanh - Linear(4, 2)` in float64: a layer stack."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def not_a_layer_stack():
    """An MLP with a LayerNorm, which no layer stack takes: Jacobians by vmap(jacrev)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2)).double()


def inputs(n, features=3, seed=1, dtype=torch.float64):
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def kernel_fns(model):
    """Every public kernel function of `model`, as `fn(x1, x2, params)`."""
    ntk, nngp = torchntk.empirical_ntk_fn(model), torchntk.empirical_nngp_fn(model)
    both = torchntk.empirical_kernel_fn(model)
    return {'empirical_ntk_fn': lambda x1, x2=None, params=None: ntk(x1, x2, params),
            'empirical_nngp_fn': lambda x1, x2=None, params=None: nngp(x1, x2, params),
            'empirical_kernel_fn': lambda x1, x2=None, params=None: both(x1, x2, params=params)}


FUNCTIONS = ('empirical_ntk_fn', 'empirical_nngp_fn', 'empirical_kernel_fn')
EXPANSIONS = (torchntk.linearize, lambda model, params0: torchntk.taylor_expand(model, params0, 2))


# params: names of the model's parameters, or a ValueError naming the others.

@pytest.mark.parametrize('function', FUNCTIONS)
def test_misspelt_params_name_raises_value_error_naming_it(function):
    model = mlp()
    params = dict(model.named_parameters())
    params['0.wieght'] = params.pop('0.weight')
    with pytest.raises(ValueError, match=r"empirical_(ntk|nngp)_fn: params .*'0\.wieght'.*"
                                         r"did you mean '0\.weight'"):
        kernel_fns(model)[function](inputs(3), None, params)


@pytest.mark.parametrize('function', FUNCTIONS)
def test_params_with_no_parameter_name_raise_value_error(function):
    model = mlp()
    params = {f'layer{i}': p for i, p in enumerate(model.parameters())}
    with pytest.raises(ValueError, match=r"params .*'layer0', 'layer1', 'layer2', 'layer3'"):
        kernel_fns(model)[function](inputs(3), None, params)


def test_params_naming_a_buffer_raise_value_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double().eval()
    with pytest.raises(ValueError, match=r"empirical_ntk_fn: params .*'1\.running_mean'"):
        torchntk.empirical_ntk_fn(model)(inputs(3), params={'1.running_mean': torch.zeros(4)})


def test_params_of_another_shape_raise_value_error_naming_the_parameter():
    model = mlp()
    params = dict(model.named_parameters())
    params['2.weight'] = torch.zeros(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"empirical_ntk_fn: params\['2\.weight'\] .*\(2, 4\).*"
                                         r"\(2, 5\)"):
        torchntk.empirical_ntk_fn(model)(inputs(3), params=params)


def test_params_value_that_is_not_a_tensor_raises_type_error():
    model = mlp()
    with pytest.raises(TypeError, match=r"empirical_nngp_fn: params\['2\.bias'\] must be a "
                                        r"tensor"):
        torchntk.empirical_nngp_fn(model)(inputs(3), params={'2.bias': [0., 0.]})


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_ntk_of_some_parameters_is_the_readout_kernel(implementation):
    """Documented: the parameters named are those differentiated. For the
    readout's weight and bias alone, Θ = (a1·a2 + 1) δ(o, o'), `a` the hidden
    activations, and the trace over the 2 outputs gives a1·a2 + 1."""
    model = mlp()
    x1, x2 = inputs(3, seed=1), inputs(2, seed=2)
    params = {name: p for name, p in model.named_parameters() if name.startswith('2.')}
    ntk = torchntk.empirical_ntk_fn(model, implementation=implementation)(x1, x2, params)
    a1, a2 = (torch.tanh(model[0](x)).detach() for x in (x1, x2))
    torch.testing.assert_close(ntk, a1 @ a2.T + 1, rtol=0, atol=1e-12)


def test_nngp_with_some_parameters_replaced_uses_them():
    model = mlp()
    x = inputs(3)
    weight = torch.randn(2, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    nngp = torchntk.empirical_nngp_fn(model, trace_axes=())(x, params={'2.weight': weight})
    f = torch.tanh(model[0](x)).detach() @ weight.T + model[2].bias.detach()
    torch.testing.assert_close(nngp, torch.einsum('io,jp->ijop', f, f), rtol=0, atol=1e-12)


@pytest.mark.parametrize('expand', EXPANSIONS, ids=['linearize', 'taylor_expand'])
def test_taylor_expansion_around_unknown_names_raises_value_error(expand):
    model = mlp()
    params0 = {name.replace('weight', 'W'): p.detach() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"(linearize|taylor_expand): params0 .*'0\.W'"):
        expand(model, params0)


# Empty batches give empty kernels of the shapes the non-empty batch's kernels
# are cut to.

# Without vmap_axes, the Jacobian contraction and the vector products handled
# empty batches before; the structured derivatives did not.
@pytest.mark.parametrize('vmap_axes, implementation',
                         [(0, i) for i in IMPLEMENTATIONS] +
                         [(None, 'structured_derivatives'), (None, 'auto')])
@pytest.mark.parametrize('model_fn', [mlp, not_a_layer_stack],
                         ids=['layer_stack', 'not_a_layer_stack'])
@pytest.mark.parametrize('sizes', [(0, None), (0, 4), (3, 0)], ids=['x1_empty', 'x1_empty_x2',
                                                                   'x2_empty'])
@pytest.mark.parametrize('trace_axes', [(-1,), ()])
def test_empty_batch_gives_empty_ntk(vmap_axes, implementation, model_fn, sizes, trace_axes):
    model = model_fn()
    n1, n2 = sizes
    x1, x2 = inputs(max(n1, 3), seed=1), inputs(max(n2 or 0, 4), seed=2)
    full = torchntk.empirical_ntk_fn(model, trace_axes, vmap_axes=vmap_axes,
                                     implementation=implementation)
    expected = full(x1, None if n2 is None else x2)[:n1, :n1 if n2 is None else n2]
    empty = full(x1[:n1], None if n2 is None else x2[:n2])
    assert empty.shape == expected.shape and empty.numel() == 0
    assert empty.dtype == expected.dtype


def test_the_empty_batch_models_are_a_layer_stack_and_not_one():
    """What the `layer_stack` / `not_a_layer_stack` cases above name."""
    def stack(model):
        task, _ = prepare_ntk(model, empirical_inputs.trainable_params(model), inputs(3), None, {},
                              (-1,), (), 0, empirical.DEFAULT_CHUNK_BYTES)
        return layer_stack(task)
    assert stack(mlp()) is not None
    assert stack(not_a_layer_stack()) is None


@pytest.mark.parametrize('x2_size', [None, 4])
def test_empty_batch_gives_empty_kernels_of_kernel_fn(x2_size):
    model = not_a_layer_stack()
    x2 = None if x2_size is None else inputs(x2_size, seed=2)
    kernels = torchntk.empirical_kernel_fn(model, trace_axes=())(inputs(0), x2)
    shape = (0, 0 if x2 is None else 4, 2, 2)
    assert kernels.nngp.shape == shape and kernels.ntk.shape == shape


# Inputs the model cannot take: the cause, the function and the argument.

@pytest.mark.parametrize('function', FUNCTIONS)
@pytest.mark.parametrize('vmap_axes', [0, None])
def test_input_dtype_other_than_the_parameters_names_both(function, vmap_axes):
    model = mlp().float()
    fn = torchntk.empirical_kernel_fn(model, vmap_axes=vmap_axes)
    fns = {'empirical_ntk_fn': lambda x: torchntk.empirical_ntk_fn(model, vmap_axes=vmap_axes)(x),
           'empirical_nngp_fn': torchntk.empirical_nngp_fn(model),
           'empirical_kernel_fn': fn}
    with pytest.raises(ValueError, match=r"empirical_(ntk|nngp)_fn: x1 has dtype torch\.float64 "
                                         r"but the model's parameters have torch\.float32"):
        fns[function](inputs(3))


@pytest.mark.parametrize('vmap_axes', [0, None])
@pytest.mark.parametrize('model_fn', [mlp, not_a_layer_stack],
                         ids=['layer_stack', 'not_a_layer_stack'])
def test_input_of_the_wrong_shape_names_it_not_vmap_axes(vmap_axes, model_fn):
    ntk_fn = torchntk.empirical_ntk_fn(model_fn(), vmap_axes=vmap_axes)
    with pytest.raises(ValueError, match=r"empirical_ntk_fn: the model fails on x1 of shape "
                                         r"\(5, 7\)") as error:
        ntk_fn(inputs(5, features=7))
    assert 'vmap_axes' not in str(error.value)
    with pytest.raises(ValueError, match=r"empirical_ntk_fn: the model fails on x2 of shape "
                                         r"\(4, 7\)") as error:
        ntk_fn(inputs(3), inputs(4, features=7))
    assert 'vmap_axes' not in str(error.value)


def test_nngp_input_of_the_wrong_shape_names_it():
    with pytest.raises(ValueError, match=r"empirical_nngp_fn: the model fails on x2 of shape "
                                         r"\(4, 7\)"):
        torchntk.empirical_nngp_fn(mlp())(inputs(3), inputs(4, features=7))


@pytest.mark.parametrize('function', FUNCTIONS)
def test_input_on_another_device_than_the_parameters_names_both(function):
    model = mlp().to('meta')   # the one other device every machine has
    with pytest.raises(ValueError, match=r"empirical_(ntk|nngp)_fn: x1 is on cpu but the "
                                         r"model's parameters are on meta"):
        kernel_fns(model)[function](inputs(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cpu_input_of_a_cuda_model_names_the_devices():
    model = mlp().cuda()
    with pytest.raises(ValueError, match=r"empirical_ntk_fn: x1 is on cpu but the model's "
                                         r"parameters are on cuda:0"):
        torchntk.empirical_ntk_fn(model)(inputs(3))


@pytest.mark.parametrize('function', FUNCTIONS)
@pytest.mark.parametrize('argument', ['x1', 'x2'])
@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_non_finite_input_raises_value_error_naming_it(function, argument, value):
    x1, x2 = inputs(3, seed=1), inputs(2, seed=2)
    (x1 if argument == 'x1' else x2)[1, 2] = value
    with pytest.raises(ValueError, match=rf"empirical_(ntk|nngp)_fn: {argument} contains "
                                         r"non-finite values"):
        kernel_fns(mlp())[function](x1, x2)


@pytest.mark.parametrize('expand', EXPANSIONS, ids=['linearize', 'taylor_expand'])
def test_non_finite_input_of_a_taylor_expansion_raises_value_error(expand):
    model = mlp()
    x = inputs(3)
    x[0, 0] = float('nan')
    f = expand(model, {name: p.detach() for name, p in model.named_parameters()})
    with pytest.raises(ValueError, match=r"(linearize|taylor_expand): x contains non-finite"):
        f(x)


@pytest.mark.parametrize('function', FUNCTIONS)
def test_complex_input_raises_type_error(function):
    with pytest.raises(TypeError, match=r"empirical_(ntk|nngp)_fn: x1 must be real, got a "
                                        r"torch\.complex128 tensor"):
        kernel_fns(mlp())[function](inputs(3).to(torch.complex128))


@pytest.mark.parametrize('function', FUNCTIONS)
def test_meta_input_raises_value_error(function):
    with pytest.raises(ValueError, match=r"empirical_(ntk|nngp)_fn: x1 is on the meta device"):
        kernel_fns(mlp())[function](inputs(3).to('meta'))


@pytest.mark.parametrize('function', FUNCTIONS)
def test_numpy_input_raises_type_error(function):
    with pytest.raises(TypeError, match=r"empirical_(ntk|nngp)_fn: x1 must be a tensor or a "
                                        r"pytree of tensors, got ndarray"):
        kernel_fns(mlp())[function](np.zeros((3, 3)))


def test_vmap_axes_on_the_wrong_axis_is_still_named():
    """The model runs on the whole batch, not on its examples cut along axis 1."""
    with pytest.raises(ValueError, match=r"empirical_ntk_fn: the model runs on x1 but fails on "
                                         r"its examples cut along vmap_axes"):
        torchntk.empirical_ntk_fn(mlp(), vmap_axes=1)(inputs(5))


# Arguments of the factories.

@pytest.mark.parametrize('factory', [torchntk.empirical_ntk_fn, torchntk.empirical_nngp_fn,
                                     torchntk.empirical_kernel_fn,
                                     lambda model: torchntk.linearize(model, {})])
def test_model_that_is_not_a_module_raises_type_error(factory):
    with pytest.raises(TypeError, match=r"(empirical_\w+|linearize): model must be an "
                                        r"nn\.Module, got str"):
        factory('mlp')


@pytest.mark.parametrize('factory', [torchntk.empirical_ntk_fn, torchntk.empirical_nngp_fn,
                                     torchntk.empirical_kernel_fn])
@pytest.mark.parametrize('arg', ['trace_axes', 'diagonal_axes'])
def test_axes_that_are_not_ints_raise_type_error(factory, arg):
    with pytest.raises(TypeError, match=rf"empirical_\w+_fn: {arg} must be a sequence of ints"):
        factory(mlp(), **{arg: 'a'})


@pytest.mark.parametrize('factory', [torchntk.empirical_ntk_fn, torchntk.empirical_nngp_fn])
def test_axes_out_of_range_raise_value_error_naming_the_function(factory):
    with pytest.raises(ValueError, match=r"empirical_(ntk|nngp)_fn: trace_axes \(5,\) are out "
                                         r"of range for outputs with 2 axes"):
        factory(mlp(), trace_axes=(5,))(inputs(3))


def test_taylor_expand_degree_that_is_not_an_int_raises_type_error():
    model = mlp()
    with pytest.raises(TypeError,
                       match=r"taylor_expand: degree must be an integer >= 0, got 'a' \(str\)"):
        torchntk.taylor_expand(model, dict(model.named_parameters()), 'a')


def test_linearize_params0_that_is_not_a_dict_raises_type_error():
    with pytest.raises(TypeError, match=r"linearize: params0 must be a dict"):
        torchntk.linearize(mlp(), 5)
