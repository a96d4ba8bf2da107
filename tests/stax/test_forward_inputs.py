"""`Layer.__call__`: an outermost forward call checks its input as `kernel_fn`
does (a tensor, finite values); calls inside another layer's forward and
calls under torch.func transforms do not."""

import pytest
import torch

from torchntk import stax

from tests.strategies import gaussian


def sign_network():
    model = stax.serial(stax.Dense(4), stax.Sign(), stax.Dense(1))
    model.init_parameters((3, 5), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model


def test_a_nan_input_raises_where_the_network_would_return_finite_outputs():
    model, x = sign_network(), gaussian(3, 5)
    x[1, 2] = float('nan')
    with torch.no_grad():   # sign(NaN) = 0: the outputs of example 1 would look fine
        unchecked = torch.func.vmap(model)(x[:, None])   # one example at a time
    assert torch.isfinite(unchecked).all()
    with pytest.raises(ValueError, match=r"Serial: x contains non-finite values"):
        model(x)


def test_an_infinite_input_to_a_single_layer_raises_naming_it():
    with pytest.raises(ValueError, match=r"Relu: x contains non-finite values"):
        stax.Relu()(torch.tensor([[1., float('inf')]]))


def test_a_numpy_input_raises_a_type_error_naming_the_layer():
    with pytest.raises(TypeError, match=r"Serial: x must be a torch.Tensor .* got numpy.ndarray"):
        sign_network()(gaussian(3, 5).numpy())


def test_layers_inside_a_forward_are_not_checked():
    # exp(50·x) overflows inside the network: the layer after it sees inf and lets it through.
    model = stax.serial(stax.Dense(4), stax.Exp(1., 50.), stax.Dense(1))
    model.init_parameters((3, 5), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = model(100 * gaussian(3, 5))
    assert not torch.isfinite(out).all()


def test_torch_func_transforms_see_no_check():
    model, x = sign_network(), gaussian(3, 5)
    x[0, 0] = float('inf')
    jacobian = torch.func.vmap(torch.func.jacrev(model))(x[:, None])   # one example at a time
    assert jacobian.shape == (3, 1, 1, 1, 5)


def test_a_layer_that_raised_leaves_the_next_call_checked():
    model, x = sign_network(), gaussian(3, 5)
    with pytest.raises(ValueError, match='Dense'):
        model(gaussian(3, 7))   # the wrong number of features fails inside the forward
    x[0, 0] = float('nan')
    with pytest.raises(ValueError, match="non-finite"):
        model(x)
