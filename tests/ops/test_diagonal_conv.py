"""diagonal_conv and its adjoint: both backends against the definition and each other."""

import importlib.util
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from torchntk import ops
from torchntk.functional.conv import same_padding
from torchntk.ops.diagonal_conv import (diagonal_conv_output_size, diagonal_conv_torch,
                                        diagonal_conv_transpose_torch)

try:
    import torchntk._C as extension
except ImportError:
    extension = None

needs_extension = pytest.mark.skipif(extension is None, reason='torchntk._C is not built')
# The CUDA twin runs every test below that goes through implementations() or
# transposes() where it is built and a GPU is present (inputs moved there and back).
WITH_CUDA = extension is not None and extension.with_cuda and torch.cuda.is_available()
DEVICES = ['cpu'] + (['cuda'] if WITH_CUDA else [])

DTYPES = [torch.float32, torch.float64]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}
# (size, k, stride): odd and even sizes, windows up to 5, strides 1 to 3.
GEOMETRIES = [(size, k, stride) for size, k, stride in
              itertools.product([1, 2, 5, 8], range(1, 6), range(1, 4))]
MODES = ['VALID', 'SAME', 'CIRCULAR', 'ASYMMETRIC']


def padding_of(mode, size, k, stride):
    if mode == 'VALID':
        return (0, 0)
    if mode == 'ASYMMETRIC':
        return (0, min(2, size))
    return same_padding(size, k, stride)


def cases(mode):
    """(size, k, stride, padding, circular) of the sweep that `mode` admits."""
    for size, k, stride in GEOMETRIES:
        padding = padding_of(mode, size, k, stride)
        if size + sum(padding) >= k:
            yield size, k, stride, padding, mode == 'CIRCULAR'


def definition(cov, k, stride, padding, circular):
    """out[b, p, q, ...] = (1/k) Σ_i cov_pad[b, s·p + i, s·q + i, ...], padded in numpy."""
    cov = cov.double().numpy()
    widths = [(0, 0), tuple(padding), tuple(padding)] + [(0, 0)] * (cov.ndim - 3)
    padded = np.pad(cov, widths, mode='wrap' if circular else 'constant')
    out_size = diagonal_conv_output_size(cov.shape[1], k, stride, padding)
    rows, cols = np.meshgrid(np.arange(out_size), np.arange(out_size), indexing='ij')
    return torch.from_numpy(sum(padded[:, stride * rows + i, stride * cols + i]
                                for i in range(k)) / k)


def implementations():
    yield 'torch', diagonal_conv_torch
    if extension is not None:
        yield 'extension', lambda cov, k, s, pad, circ: extension.diagonal_conv(
            cov, k, s, pad[0], pad[1], circ)
    if WITH_CUDA:
        yield 'extension-cuda', lambda cov, k, s, pad, circ: extension.diagonal_conv(
            cov.cuda(), k, s, pad[0], pad[1], circ).cpu()


def transposes():
    yield 'torch', diagonal_conv_transpose_torch
    if extension is not None:
        yield 'extension', lambda grad, size, k, s, pad, circ: extension.diagonal_conv_transpose(
            grad, size, k, s, pad[0], pad[1], circ)
    if WITH_CUDA:
        yield 'extension-cuda', lambda grad, size, k, s, pad, circ: \
            extension.diagonal_conv_transpose(grad.cuda(), size, k, s, pad[0], pad[1], circ).cpu()


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('mode', MODES)
def test_both_backends_match_the_definition(mode, dtype):
    generator = torch.Generator().manual_seed(0)
    for size, k, stride, padding, circular in cases(mode):
        cov = torch.randn(3, size, size, generator=generator, dtype=dtype)
        expected = definition(cov, k, stride, padding, circular).to(dtype)
        for name, implementation in implementations():
            out = implementation(cov, k, stride, padding, circular)
            torch.testing.assert_close(
                out, expected, **TOLERANCE[dtype],
                msg=lambda m: f'{name}, size={size} k={k} stride={stride} {mode}: {m}')


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('mode', MODES)
def test_trailing_axis_is_convolved_like_a_batch(mode, dtype):
    generator = torch.Generator().manual_seed(1)
    for size, k, stride, padding, circular in cases(mode):
        cov = torch.randn(2, size, size, 7, generator=generator, dtype=dtype)
        expected = definition(cov, k, stride, padding, circular).to(dtype)
        for name, implementation in implementations():
            torch.testing.assert_close(implementation(cov, k, stride, padding, circular), expected,
                                       **TOLERANCE[dtype], msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('mode', MODES)
def test_transpose_is_the_adjoint(mode, dtype):
    """<diagonal_conv(cov), grad> = <cov, diagonal_conv_transpose(grad)> in both backends."""
    generator = torch.Generator().manual_seed(2)
    for size, k, stride, padding, circular in cases(mode):
        for trailing in ((), (3,)):
            cov = torch.randn(2, size, size, *trailing, generator=generator, dtype=torch.float64)
            out_size = diagonal_conv_output_size(size, k, stride, padding)
            grad = torch.randn(2, out_size, out_size, *trailing, generator=generator,
                               dtype=torch.float64)
            forward = (definition(cov, k, stride, padding, circular) * grad).sum()
            for name, transpose in transposes():
                adjoint = transpose(grad.to(dtype), size, k, stride, padding, circular)
                assert adjoint.shape == cov.shape
                backward = (cov * adjoint.double()).sum()
                torch.testing.assert_close(backward, forward, **TOLERANCE[dtype],
                                           msg=lambda m: f'{name}, size={size} k={k} '
                                                         f'stride={stride} {mode}: {m}')


@needs_extension
@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_extension_matches_torch_on_many_threads_worth_of_pairs(dtype, device):
    generator = torch.Generator().manual_seed(3)
    cov = torch.randn(257, 16, 16, generator=generator, dtype=dtype)
    for k, stride, circular in [(3, 1, False), (3, 1, True), (5, 2, False), (2, 3, True)]:
        padding = same_padding(16, k, stride)
        out = diagonal_conv_torch(cov, k, stride, padding, circular)
        torch.testing.assert_close(
            extension.diagonal_conv(cov.to(device), k, stride, *padding, circular).cpu(), out,
            **TOLERANCE[dtype])
        torch.testing.assert_close(
            extension.diagonal_conv_transpose(out.to(device), 16, k, stride, *padding,
                                              circular).cpu(),
            diagonal_conv_transpose_torch(out, 16, k, stride, padding, circular),
            **TOLERANCE[dtype])


@needs_extension
def test_extension_takes_non_contiguous_input():
    cov = torch.randn(4, 6, 6, dtype=torch.float64).transpose(1, 2)
    torch.testing.assert_close(extension.diagonal_conv(cov, 3, 1, 1, 1, False),
                               diagonal_conv_torch(cov, 3, 1, (1, 1), False))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('circular', [False, True], ids=['zeros', 'circular'])
def test_dispatch_gradients_pass_gradcheck(circular, device):
    cov = torch.randn(2, 5, 5, 2, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: ops.diagonal_conv(c, 3, 2, (1, 1), circular), cov)
    assert torch.autograd.gradgradcheck(lambda c: ops.diagonal_conv(c, 3, 2, (1, 1), circular),
                                        cov)
    grad = torch.randn(2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda g: ops.diagonal_conv_transpose(g, 5, 3, 2, (1, 1), circular), grad)


def test_dispatch_gradient_equals_torch_gradient():
    cov = torch.randn(3, 7, 7, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 7, 7, dtype=torch.float64)
    (grad_dispatch,) = torch.autograd.grad((ops.diagonal_conv(cov, 3, 1, (1, 1), False)
                                            * weights).sum(), cov)
    (grad_torch,) = torch.autograd.grad((diagonal_conv_torch(cov, 3, 1, (1, 1), False)
                                         * weights).sum(), cov)
    torch.testing.assert_close(grad_dispatch, grad_torch)


@pytest.mark.parametrize('call, message', [
    (lambda: ops.diagonal_conv(torch.zeros(2, 3, 4), 3, 1, (1, 1), False), 'shape'),
    (lambda: ops.diagonal_conv(torch.zeros(2, 3, 3), 0, 1, (0, 0), False), 'k >= 1'),
    (lambda: ops.diagonal_conv(torch.zeros(2, 3, 3), 5, 1, (0, 0), False), 'larger than'),
    (lambda: ops.diagonal_conv_transpose(torch.zeros(2, 4, 4), 3, 3, 1, (1, 1), False), 'size 3'),
])
def test_invalid_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_extension_is_built_unless_disabled():
    """CI builds the extension; a silent fallback to torch would hide its breakage."""
    if os.environ.get('TORCHNTK_BUILD_EXTENSION') == '0' or \
            os.environ.get('TORCHNTK_BACKEND') == 'torch':
        pytest.skip('the extension is disabled')
    assert importlib.util.find_spec('torchntk._C') is not None
    assert ops.backend() == 'extension'


def backend_in_subprocess(value):
    env = dict(os.environ, TORCHNTK_BACKEND=value)
    return subprocess.run([sys.executable, '-c', 'from torchntk import ops; print(ops.backend())'],
                          env=env, capture_output=True, text=True)


def test_environment_variable_forces_the_torch_backend():
    result = backend_in_subprocess('torch')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'torch'


@needs_extension
def test_environment_variable_forces_the_extension_backend():
    result = backend_in_subprocess('extension')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'extension'


def test_unknown_backend_is_rejected():
    result = backend_in_subprocess('fortran')
    assert result.returncode != 0
    assert 'TORCHNTK_BACKEND must be one of' in result.stderr
