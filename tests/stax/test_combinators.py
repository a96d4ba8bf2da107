"""`serial`, `parallel` and `repeat`: composition of kernels and of finite networks."""

import pytest
import torch

from torchntk import Kernel, stax


def block():
    return stax.serial(stax.Dense(8, W_std=1.3, b_std=0.1), stax.Relu())


def assert_same_kernels(actual, expected, tol=1e-14):
    for name in ('nngp', 'ntk', 'cov1', 'cov2'):
        a, e = getattr(actual, name), getattr(expected, name)
        if e is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=name)


# --- repeat -----------------------------------------------------------------------------------

def test_repeat_kernel_equals_serial_of_copies(x1, x2):
    repeated = stax.serial(stax.repeat(block(), 3), stax.Dense(1))
    copies = stax.serial(block(), block(), block(), stax.Dense(1))
    assert_same_kernels(repeated.kernel_fn(x1, x2), copies.kernel_fn(x1, x2), tol=0)


def test_repeat_once_equals_layer(x1, x2):
    assert_same_kernels(stax.repeat(block(), 1).kernel_fn(x1, x2), block().kernel_fn(x1, x2), tol=0)


def test_repeat_copies_have_independent_parameters(x1):
    repeated = stax.repeat(stax.Dense(6, b_std=0.1), 3)
    repeated.init_parameters(x1.shape, generator=torch.Generator().manual_seed(0),
                             dtype=torch.float64)
    weights = [layer.weight for layer in repeated.children()]
    assert len(weights) == 3
    assert len({id(w) for w in weights}) == 3
    assert not torch.equal(weights[0], weights[1])


def test_repeat_of_an_initialized_layer_does_not_copy_its_weights(x1):
    # The kernel of repeat assumes independent weights in every copy; deep copies of
    # an already-initialized layer would start the finite network with equal ones.
    layer = stax.Dense(6, b_std=0.1)
    layer(x1)
    repeated = stax.repeat(layer, 2)
    repeated(x1)
    first, second = repeated.children()
    assert not torch.equal(first.weight, second.weight)


def test_repeat_finite_network_equals_serial_of_copies_with_same_seed(x1):
    repeated = stax.serial(stax.repeat(block(), 2), stax.Dense(2))
    copies = stax.serial(block(), block(), stax.Dense(2))
    for model in (repeated, copies):
        model.init_parameters(x1.shape, generator=torch.Generator().manual_seed(1),
                              dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(repeated(x1), copies(x1))


# --- serial -----------------------------------------------------------------------------------

def test_nested_serial_kernel_equals_flat_serial(x1, x2):
    a, b, c = stax.Dense(8, W_std=1.2, b_std=0.2), stax.Erf(), stax.Dense(1, W_std=0.7)
    nested = stax.serial(stax.serial(a, b), c)
    a2, b2, c2 = stax.Dense(8, W_std=1.2, b_std=0.2), stax.Erf(), stax.Dense(1, W_std=0.7)
    flat = stax.serial(a2, b2, c2)
    assert_same_kernels(nested.kernel_fn(x1, x2), flat.kernel_fn(x1, x2), tol=0)


def test_serial_is_associative(x1, x2):
    def layers():
        return [stax.Dense(8, b_std=0.3), stax.Tanh(), stax.Dense(8, W_std=1.5), stax.Relu(),
                stax.Dense(1)]
    a, b, c, d, e = layers()
    left = stax.serial(stax.serial(stax.serial(a, b), c), stax.serial(d, e))
    a, b, c, d, e = layers()
    right = stax.serial(a, stax.serial(b, stax.serial(c, d, e)))
    # Equal to rounding, not bitwise: each grouping fuses other runs (stax/fusion.py).
    assert_same_kernels(left.kernel_fn(x1, x2), right.kernel_fn(x1, x2), tol=1e-14)


def test_nested_serial_finite_network_equals_flat_serial(x1):
    nested = stax.serial(stax.serial(stax.Dense(8, b_std=0.2), stax.Erf()), stax.Dense(2))
    flat = stax.serial(stax.Dense(8, b_std=0.2), stax.Erf(), stax.Dense(2))
    for model in (nested, flat):
        model.init_parameters(x1.shape, generator=torch.Generator().manual_seed(2),
                              dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(nested(x1), flat(x1))


def test_serial_of_one_layer_equals_layer(x1, x2):
    assert_same_kernels(stax.serial(stax.Dense(3, W_std=2., b_std=0.5)).kernel_fn(x1, x2),
                        stax.Dense(3, W_std=2., b_std=0.5).kernel_fn(x1, x2), tol=0)


def test_serial_forward_applies_layers_in_order(x1):
    first, second = stax.Dense(5), stax.Relu()
    model = stax.serial(first, second)
    with torch.no_grad():
        out = model(x1)
        torch.testing.assert_close(out, second(first(x1)), rtol=0, atol=0)
    assert (out >= 0).all()


def test_serial_output_shape():
    model = stax.serial(stax.Dense(8), stax.Relu(), stax.Dense(3))
    assert tuple(model.output_shape((5, 4))) == (5, 3)


# --- feeding a Kernel back in -----------------------------------------------------------------

def test_kernel_fn_on_a_kernel_continues_the_network(x1, x2):
    def first():
        return stax.serial(stax.Dense(8, W_std=1.4, b_std=0.1), stax.Relu(), stax.Dense(8))

    def second():
        return stax.serial(stax.Erf(), stax.Dense(1, W_std=0.9, b_std=0.2))

    kernel = first().kernel_fn(x1, x2, get=None)
    chained = second().kernel_fn(kernel, get=None)
    assert_same_kernels(chained, stax.serial(first(), second()).kernel_fn(x1, x2), tol=0)


@pytest.mark.parametrize('get', ['ntk', ('nngp', 'ntk')])
def test_kernel_fn_on_a_kernel_honours_get(x1, get):
    model = stax.serial(stax.Dense(8), stax.Relu(), stax.Dense(1))
    kernel = stax.Dense(8, b_std=0.2).kernel_fn(x1, get=None)
    whole = stax.serial(stax.Dense(8, b_std=0.2), model).kernel_fn(x1, get=get)
    chained = model.kernel_fn(kernel, get=get)
    if isinstance(get, str):
        torch.testing.assert_close(chained, whole, rtol=0, atol=0)
    else:
        assert chained._fields == whole._fields
        for a, b in zip(chained, whole):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kernel_fn_on_a_full_batch_kernel_keeps_the_layout(x1, x2):
    kernel = stax.Dense(8, b_std=0.2).kernel_fn(x1, x2, get=None, diagonal_batch=False)
    out = stax.serial(stax.Relu(), stax.Dense(1)).kernel_fn(kernel, get=None)
    assert not out.diagonal_batch and out.cov1.shape == (4, 4)


# --- parallel ---------------------------------------------------------------------------------

def test_parallel_applies_each_layer_to_its_input(x1, x2):
    def layers():
        return stax.Dense(4, W_std=1.5), stax.serial(stax.Dense(4, b_std=0.3), stax.Erf())
    a, b = layers()
    kernels = stax.parallel(a, b).kernel_fn([x1, x1 + 1], [x2, x2 - 1], get='ntk')
    a, b = layers()
    assert isinstance(kernels, list) and len(kernels) == 2
    torch.testing.assert_close(kernels[0], a.kernel_fn(x1, x2, get='ntk'), rtol=0, atol=0)
    torch.testing.assert_close(kernels[1], b.kernel_fn(x1 + 1, x2 - 1, get='ntk'), rtol=0, atol=0)


def test_parallel_after_fan_out_receives_copies(x1, x2):
    model = stax.serial(stax.Dense(4, b_std=0.1), stax.FanOut(2),
                        stax.parallel(stax.Relu(), stax.Erf()))
    relu, erf = model.kernel_fn(x1, x2, get='nngp')
    # Dense-Relu alone is one fused run (stax/fusion.py): equal to rounding.
    torch.testing.assert_close(relu, stax.serial(stax.Dense(4, b_std=0.1), stax.Relu())
                               .kernel_fn(x1, x2, get='nngp'), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(erf, stax.serial(stax.Dense(4, b_std=0.1), stax.Erf())
                               .kernel_fn(x1, x2, get='nngp'), rtol=0, atol=0)


def test_parallel_kernel_of_list_returns_list_of_records(x1):
    kernels = stax.parallel(stax.Dense(3), stax.Dense(3)).kernel_fn([x1, x1])
    assert all(isinstance(k, Kernel) for k in kernels)


def test_parallel_forward_returns_list(x1):
    model = stax.parallel(stax.Dense(3), stax.Identity())
    out = model([x1, x1])
    assert len(out) == 2 and out[0].shape == (4, 3) and out[1] is x1


def test_parallel_output_shapes():
    model = stax.parallel(stax.Dense(3), stax.Identity())
    assert [tuple(s) for s in model.output_shape([(2, 5), (2, 7)])] == [(2, 3), (2, 7)]


def test_parallel_init_parameters_initializes_every_branch(x1):
    model = stax.serial(stax.FanOut(2), stax.parallel(stax.Dense(3), stax.Dense(5)))
    shapes = model.init_parameters(x1.shape, generator=torch.Generator().manual_seed(0),
                                   dtype=torch.float64)
    assert [tuple(s) for s in shapes] == [(4, 3), (4, 5)]
    assert not any(torch.nn.parameter.is_lazy(p) for p in model.parameters())
