"""Kernel propagation compiles with torch.compile(fullgraph=True): no graph breaks.

Graph breaks are decided by dynamo's trace, which the 'eager' backend runs in
full; inductor's C++ code generation on top takes minutes on two cores, so it
is left to benchmarks.
"""

import pytest
import torch

from torchntk import stax

from tests.strategies import gaussian


def mlp():
    return stax.serial(stax.Dense(8, 1.5, 0.05), stax.Relu(), stax.Dense(8, 1.5, 0.05),
                       stax.Erf(), stax.Dense(1))


def cnn():
    return stax.serial(stax.Conv(8, (3, 3), padding='SAME'), stax.Relu(),
                       stax.AvgPool((2, 2), (2, 2)), stax.Conv(8, (3, 3), padding='CIRCULAR'),
                       stax.Relu(), stax.GlobalAvgPool(), stax.Dense(1))


@pytest.mark.parametrize('model, shape', [(mlp, (4, 5)), (cnn, (3, 2, 6, 6))], ids=['mlp', 'cnn'])
def test_compiled_kernel_fn_without_graph_breaks_gives_the_same_kernels(model, shape):
    model = model()
    x1, x2 = gaussian(*shape, seed=0), gaussian(2, *shape[1:], seed=1)
    compiled = torch.compile(lambda a, b: model.kernel_fn(a, b, get=('nngp', 'ntk')),
                             fullgraph=True, backend='eager')
    expected = model.kernel_fn(x1, x2, get=('nngp', 'ntk'))
    actual = compiled(x1, x2)
    torch.testing.assert_close(actual.nngp, expected.nngp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(actual.ntk, expected.ntk, rtol=1e-12, atol=1e-14)
