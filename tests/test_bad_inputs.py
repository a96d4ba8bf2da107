"""Bad inputs at every public entry point: one table of cases, each a call
that must raise a given exception type with a message that names the
argument (and the layer or function): TypeError for a wrong type, ValueError
for a wrong value. A second, shorter table holds edge inputs that are not
mistakes (empty batches) and must give a result.

`/work/notes/sweep.py`-style sweeps import `CASES` and `EDGES` and `classify`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import signal as os_signal
from typing import Any, Callable

import pytest
import torch

import torchntk
from torchntk import predict, signal, stax

# A call that runs longer than this hangs (the slowest legitimate case takes ~1 s).
HANG_SECONDS = 30.


def names(*words: str) -> str:
    """A regex matching a message that contains every one of `words` (regexes), in any order."""
    return '(?s)' + ''.join(f'(?=.*(?:{w}))' for w in words)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[], Any]
    error: type[Exception] | tuple[type[Exception], ...]
    match: str


@dataclasses.dataclass(frozen=True)
class Edge:
    """An input that is not a mistake: `check(result)` says the result is right.
    A `ValueError` matching `refusal` is a clear refusal: the sweep counts it as
    a clear error, and the test accepts it where `may_refuse`."""
    id: str
    call: Callable[[], Any]
    check: Callable[[Any], bool]
    refusal: str
    may_refuse: bool = False


# --- inputs -----------------------------------------------------------------------------------

def x(n: int = 4, d: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def with_value(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[1] = value
    return t


def mlp() -> stax.Layer:
    return stax.serial(stax.Dense(8, W_std=1.5, b_std=0.1), stax.Relu(), stax.Dense(1))


def cnn() -> stax.Layer:
    return stax.serial(stax.Conv(4, (3, 3), padding='SAME'), stax.Relu(), stax.Flatten(),
                       stax.Dense(1))


def torch_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 1)).double()


def params_of(model: torch.nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def kernel(n: int = 4) -> torch.Tensor:
    return mlp().kernel_fn(x(n), get='ntk')


def targets(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def mse(fx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((fx - y)**2).sum()


def nan_kernel() -> torch.Tensor:
    return with_value(kernel(), math.nan)


NAN, INF = math.nan, math.inf

# --- stax layer constructors and combinators ---------------------------------------------------

LAYERS = [
    Case('Dense out_dim=0', lambda: stax.Dense(0), ValueError, names('Dense', 'out_dim')),
    Case('Dense out_dim=-3', lambda: stax.Dense(-3), ValueError, names('Dense', 'out_dim')),
    Case('Dense out_dim="8"', lambda: stax.Dense('8'), TypeError,
         names('Dense', 'out_dim')),
    Case('Dense out_dim=2.5', lambda: stax.Dense(2.5), TypeError,
         names('Dense', 'out_dim')),
    Case('Dense W_std=-1', lambda: stax.Dense(4, W_std=-1.), ValueError, names('Dense', 'W_std')),
    Case('Dense W_std=nan', lambda: stax.Dense(4, W_std=NAN), ValueError, names('Dense', 'W_std')),
    Case('Dense W_std="1"', lambda: stax.Dense(4, W_std='1'), TypeError, names('Dense', 'W_std')),
    Case('Dense W_std=None', lambda: stax.Dense(4, W_std=None), TypeError, names('Dense', 'W_std')),
    Case('Dense b_std=-0.1', lambda: stax.Dense(4, b_std=-0.1), ValueError,
         names('Dense', 'b_std')),
    Case('Dense b_std=inf', lambda: stax.Dense(4, b_std=INF), ValueError, names('Dense', 'b_std')),
    Case('Dense parameterization="foo"', lambda: stax.Dense(4, parameterization='foo'),
         ValueError, names('Dense', 'parameterization')),
    Case('Dense parameterization=5', lambda: stax.Dense(4, parameterization=5), TypeError,
         names('Dense', 'parameterization', 'ntk', 'standard', 'got 5')),
    Case('Dense s=(0, 1)', lambda: stax.Dense(4, parameterization='standard', s=(0, 1)),
         ValueError, names('Dense', r'\bs\b')),
    Case('Dense s=2', lambda: stax.Dense(4, parameterization='standard', s=2), TypeError,
         names('Dense', r'\bs\b', 'pair', 'got 2')),
    Case('Dense W_std=1e200 kernel_fn', lambda: stax.serial(
        stax.Dense(4, W_std=1e200), stax.Relu(), stax.Dense(1)).kernel_fn(x()),
         ValueError, names('Dense', 'W_std')),
    Case('Conv out_chan=0', lambda: stax.Conv(0, (3, 3)), ValueError, names('Conv', 'out_chan')),
    Case('Conv filter_shape=(0, 3)', lambda: stax.Conv(4, (0, 3)), ValueError,
         names('Conv', 'filter_shape')),
    Case('Conv filter_shape="3x3"', lambda: stax.Conv(4, '3x3'), TypeError,
         names('Conv', 'filter_shape')),
    Case('Conv strides=(0, 1)', lambda: stax.Conv(4, (3, 3), strides=(0, 1)), ValueError,
         names('Conv', 'strides')),
    Case('Conv strides of the wrong length', lambda: stax.Conv(4, (3, 3), strides=(1, 1, 1)),
         ValueError, names('Conv', 'strides')),
    Case('Conv padding="bogus"', lambda: stax.Conv(4, (3, 3), padding='bogus'), ValueError,
         names('Conv', 'padding')),
    Case('Conv W_std=-1', lambda: stax.Conv(4, (3, 3), W_std=-1.), ValueError,
         names('Conv', 'W_std')),
    Case('ConvTranspose padding="bogus"', lambda: stax.ConvTranspose(4, (3, 3), padding='bogus'),
         ValueError, names('ConvTranspose', 'padding')),
    Case('ConvLocal out_chan=-1', lambda: stax.ConvLocal(-1, (3, 3)), ValueError,
         names('ConvLocal', 'out_chan')),
    Case('AvgPool window_shape=(0, 2)', lambda: stax.AvgPool((0, 2)), ValueError,
         names('AvgPool', 'window_shape')),
    Case('AvgPool padding="x"', lambda: stax.AvgPool((2, 2), padding='x'), ValueError,
         names('AvgPool', 'padding')),
    Case('SumPool strides=(-1, 1)', lambda: stax.SumPool((2, 2), strides=(-1, 1)), ValueError,
         names('SumPool', 'strides')),
    Case('Dropout p=1.5', lambda: stax.Dropout(1.5), ValueError, names('Dropout', r'\bp\b')),
    Case('Dropout p=-0.1', lambda: stax.Dropout(-0.1), ValueError, names('Dropout', r'\bp\b')),
    Case('Dropout p="a"', lambda: stax.Dropout('a'), TypeError, names('Dropout', r'\bp\b')),
    Case('FanOut num=0', lambda: stax.FanOut(0), ValueError, names('FanOut', 'num')),
    Case('FanOut num=2.5', lambda: stax.FanOut(2.5), TypeError, names('FanOut', 'num')),
    Case('FanInConcat axis="a"', lambda: stax.FanInConcat(axis='a'), TypeError,
         names('FanInConcat', 'axis')),
    Case('LayerNorm eps=-1', lambda: stax.LayerNorm(eps=-1.), ValueError,
         names('LayerNorm', 'eps')),
    Case('LayerNorm axis="a"', lambda: stax.LayerNorm(axis='a'), TypeError,
         names('LayerNorm', 'axis')),
    Case('LayerNorm axis=0 (the batch)', lambda: stax.serial(
        stax.Dense(4), stax.LayerNorm(axis=0)).kernel_fn(x()), ValueError,
         names('LayerNorm', 'axis')),
    Case('Erf a="x"', lambda: stax.Erf(a='x'), TypeError, names('Erf', r'\ba\b')),
    Case('Erf b=inf', lambda: stax.Erf(b=INF), ValueError, names('Erf', r'\bb\b')),
    Case('Sin c=nan', lambda: stax.Sin(c=NAN), ValueError, names('Sin', r'\bc\b')),
    Case('ABRelu a=None', lambda: stax.ABRelu(None, 1.), TypeError, names('ABRelu', r'\ba\b')),
    Case('LeakyRelu alpha="0.1"', lambda: stax.LeakyRelu('0.1'), TypeError,
         names('LeakyRelu', 'alpha')),
    Case('Monomial degree=6', lambda: stax.Monomial(6), ValueError, names('Monomial', 'degree')),
    Case('Monomial degree=-1', lambda: stax.Monomial(-1), ValueError,
         names('Monomial', 'degree')),
    Case('RectifiedMonomial degree=-1', lambda: stax.RectifiedMonomial(-1), ValueError,
         names('RectifiedMonomial', 'degree')),
    Case('Hermite degree=-1', lambda: stax.Hermite(-1), ValueError, names('Hermite', 'degree')),
    Case('Hermite degree=1.5', lambda: stax.Hermite(1.5), TypeError, names('Hermite', 'degree')),
    Case('Polynomial coef=[]', lambda: stax.Polynomial([]), ValueError,
         names('Polynomial', 'coef')),
    Case('Polynomial coef=[1, "a"]', lambda: stax.Polynomial([1., 'a']), TypeError,
         names('Polynomial', 'coef')),
    Case('Rbf gamma=-1', lambda: stax.Rbf(-1.), ValueError, names('Rbf', 'gamma')),
    Case('Exp b="x"', lambda: stax.Exp(b='x'), TypeError, names('Exp', r'\bb\b')),
    Case('Gaussian a=nan', lambda: stax.Gaussian(a=NAN), ValueError, names('Gaussian', r'\ba\b')),
    Case('Tanh deg=0', lambda: stax.Tanh(deg=0), ValueError, names('Tanh', 'deg')),
    Case('ElementwiseNumerical deg=0', lambda: stax.ElementwiseNumerical(torch.tanh, deg=0),
         ValueError, names('ElementwiseNumerical', 'deg')),
    Case('ElementwiseNumerical fn="tanh"', lambda: stax.serial(
        stax.Dense(4), stax.ElementwiseNumerical('tanh', deg=10)).kernel_fn(x()),
         TypeError, names('ElementwiseNumerical', 'fn')),
    Case('ImageResize method="bogus"', lambda: stax.ImageResize((-1, -1, 4, 4), 'bogus'),
         ValueError, names('ImageResize', 'method')),
    Case('ImageResize shape=4', lambda: stax.ImageResize(4, 'linear'), TypeError,
         names('ImageResize', 'shape', 'got 4')),
    Case('ImageResize shape=(-1, -1, 4.0)', lambda: stax.ImageResize((-1, -1, 4.), 'linear'),
         TypeError, names('ImageResize', r'shape\[2\]', 'integer', r'got 4\.0 \(float\)')),
    Case('ImageResize shape=(-1, -1, True)', lambda: stax.ImageResize((-1, -1, True), 'linear'),
         TypeError, names('ImageResize', r'shape\[2\]', 'integer', r'got True \(bool\)')),
    Case('serial of a torch module', lambda: stax.serial(torch.nn.Linear(3, 3)), TypeError,
         names('[Ss]erial', 'Linear')),
    Case('serial of a string', lambda: stax.serial(stax.Dense(4), 'relu'), TypeError,
         names('[Ss]erial', 'relu|str')),
    Case('parallel of a number', lambda: stax.parallel(stax.Dense(2), 5), TypeError,
         names('[Pp]arallel', 'int')),
    Case('repeat n=0', lambda: stax.repeat(stax.Dense(4), 0), ValueError,
         names('[Rr]epeat', r'\bn\b')),
    Case('repeat n="a"', lambda: stax.repeat(stax.Dense(4), 'a'), TypeError,
         names('[Rr]epeat', r'\bn\b')),
]

# --- kernel_fn ---------------------------------------------------------------------------------

KERNEL_FN = [
    Case('kernel_fn x1 numpy', lambda: mlp().kernel_fn(x().numpy()), TypeError,
         names('Serial', 'x1', 'numpy')),
    Case('kernel_fn x1 list of lists', lambda: mlp().kernel_fn([[1., 2.], [3., 4.]]), TypeError,
         names('Serial', 'x1')),
    Case('kernel_fn x1 1-D', lambda: mlp().kernel_fn(torch.ones(5)), ValueError,
         names('Serial', 'x1')),
    Case('kernel_fn x1 complex', lambda: mlp().kernel_fn(x().to(torch.complex128)),
         TypeError, names('Serial', 'x1', 'complex')),
    Case('kernel_fn x1 on meta', lambda: mlp().kernel_fn(x().to('meta')), ValueError,
         names('Serial', 'x1', 'meta')),
    Case('kernel_fn x1 nan', lambda: mlp().kernel_fn(with_value(x(), NAN)), ValueError,
         names('Serial', 'x1')),
    Case('kernel_fn x1 inf', lambda: mlp().kernel_fn(with_value(x(), INF)), ValueError,
         names('Serial', 'x1')),
    Case('kernel_fn x2 nan', lambda: mlp().kernel_fn(x(), with_value(x(3), NAN)), ValueError,
         names('Serial', 'x2')),
    Case('kernel_fn x2 numpy', lambda: mlp().kernel_fn(x(), x(3).numpy()), TypeError,
         names('Serial', 'x2')),
    Case('kernel_fn x2 other features', lambda: mlp().kernel_fn(x(), x(3, 7)), ValueError,
         names('Serial', 'x2')),
    Case('kernel_fn x2 other dtype', lambda: mlp().kernel_fn(x(), x(3).float()), ValueError,
         names('Serial', 'x2', 'dtype')),
    Case('kernel_fn conv on flat inputs', lambda: cnn().kernel_fn(x()), ValueError,
         names('Conv', 'x1|input|spatial')),
    Case('kernel_fn get=123', lambda: mlp().kernel_fn(x(), get=123), TypeError,
         names('kernel_fn', 'get')),
    Case('kernel_fn get="nonsense"', lambda: mlp().kernel_fn(x(), get='nonsense'), ValueError,
         names('kernel_fn', 'get', 'nonsense')),
    Case('kernel_fn get=("nngp", 5)', lambda: mlp().kernel_fn(x(), get=('nngp', 5)), TypeError,
         names('kernel_fn', 'get')),
    Case('kernel_fn get=()', lambda: mlp().kernel_fn(x(), get=()), ValueError,
         names('kernel_fn', 'get')),
    Case('kernel_fn get duplicate', lambda: mlp().kernel_fn(x(), get=('ntk', 'NTK')), ValueError,
         names('kernel_fn', 'get')),
    Case('kernel_fn diagonal_batch="no"', lambda: mlp().kernel_fn(x(), diagonal_batch='no'),
         TypeError, names('kernel_fn', 'diagonal_batch')),
    Case('kernel_fn diagonal_spatial=1', lambda: cnn().kernel_fn(images(), diagonal_spatial=1),
         TypeError, names('kernel_fn', 'diagonal_spatial')),
    Case('kernel_fn mask_constant="a"', lambda: mlp().kernel_fn(x(), mask_constant='a'),
         TypeError, names('Serial', 'mask_constant')),
    Case('kernel_fn x2 with a Kernel', lambda: mlp().kernel_fn(
        stax.Identity().kernel_fn(x()), x()), ValueError, names('Serial', 'x2')),
]

# --- forward -----------------------------------------------------------------------------------

FORWARD = [
    Case('forward numpy', lambda: mlp()(x().numpy()), TypeError, names('Serial', r'\bx\b')),
    Case('forward nan', lambda: mlp()(with_value(x(), NAN)), ValueError,
         names('Serial', r'\bx\b')),
    Case('forward inf', lambda: cnn()(with_value(images(), INF)), ValueError,
         names('Serial', r'\bx\b')),
    Case('forward other features', lambda: (lambda m: (m.init_parameters((4, 5)), m(x(4, 7))))(
        mlp()), ValueError, names('Dense', r'\bx\b|input')),
    Case('forward_masked mask_constant="a"', lambda: mlp().forward_masked(x(), 'a'), TypeError,
         names('Serial', 'mask_constant')),
]

# --- batch, estimate_memory --------------------------------------------------------------------

BATCHING = [
    Case('batch kernel_fn="x"', lambda: torchntk.batch('x'), TypeError,
         names('batch', 'kernel_fn')),
    Case('batch batch_size=-1', lambda: torchntk.batch(mlp().kernel_fn, batch_size=-1),
         ValueError, names('batch', 'batch_size')),
    Case('batch batch_size="big"', lambda: torchntk.batch(mlp().kernel_fn, batch_size='big'),
         ValueError, names('batch', 'batch_size')),
    Case('batch batch_size=2.5', lambda: torchntk.batch(mlp().kernel_fn, batch_size=2.5),
         TypeError, names('batch', 'batch_size')),
    Case('batch device="nodevice"', lambda: torchntk.batch(mlp().kernel_fn, 2, device='nodevice'),
         ValueError, names('batch', 'device')),
    Case('batch max_memory=-5', lambda: torchntk.batch(mlp().kernel_fn, 2, max_memory=-5),
         ValueError, names('batch', 'max_memory')),
    Case('batch memmap_dir=123', lambda: torchntk.batch(mlp().kernel_fn, 2, memmap_dir=123),
         TypeError, names('batch', 'memmap_dir')),
    Case('batch checkpoint=123', lambda: torchntk.batch(mlp().kernel_fn, 2, checkpoint=123),
         TypeError, names('batch', 'checkpoint')),
    Case('batched x1 numpy', lambda: torchntk.batch(mlp().kernel_fn, 2, progress=False)(
        x().numpy()), TypeError, names('x1', 'numpy|ndarray')),
    Case('batched x1 nan', lambda: torchntk.batch(mlp().kernel_fn, 2, progress=False)(
        with_value(x(), NAN)), ValueError, names('x1')),
    Case('batched get=123', lambda: torchntk.batch(mlp().kernel_fn, 2, progress=False)(
        x(), get=123), TypeError, names('get')),
    Case('estimate_memory kernel_fn="x"', lambda: torchntk.estimate_memory('x', (4, 5)),
         TypeError, names('estimate_memory', 'kernel_fn')),
    Case('estimate_memory x1_shape=(4, -5)', lambda: torchntk.estimate_memory(mlp(), (4, -5)),
         ValueError, names('estimate_memory', 'x1_shape')),
    Case('estimate_memory x1_shape="abc"', lambda: torchntk.estimate_memory(mlp(), 'abc'),
         TypeError, names('estimate_memory', 'x1_shape')),
    Case('estimate_memory batch_size=-1', lambda: torchntk.estimate_memory(
        mlp(), (4, 5), batch_size=-1), ValueError, names('estimate_memory', 'batch_size')),
    Case('estimate_memory dtype="float32"', lambda: torchntk.estimate_memory(
        mlp(), (4, 5), dtype='float32'), TypeError, names('estimate_memory', 'dtype')),
]

# --- empirical kernels, linearize, taylor_expand -----------------------------------------------

EMPIRICAL = [
    Case('empirical_ntk_fn model="x"', lambda: torchntk.empirical_ntk_fn('x')(x()), TypeError,
         names('empirical_ntk_fn', 'model')),
    Case('empirical_ntk_fn trace_axes="a"', lambda: torchntk.empirical_ntk_fn(
        torch_mlp(), trace_axes='a')(x()), TypeError, names('empirical_ntk_fn', 'trace_axes')),
    Case('empirical_ntk_fn trace_axes=(5,)', lambda: torchntk.empirical_ntk_fn(
        torch_mlp(), trace_axes=(5,))(x()), ValueError, names('empirical_ntk_fn', 'trace_axes')),
    Case('empirical_ntk_fn implementation="nope"', lambda: torchntk.empirical_ntk_fn(
        torch_mlp(), implementation='nope'), ValueError,
         names('empirical_ntk_fn', 'implementation')),
    Case('empirical_ntk_fn chunk_bytes=0', lambda: torchntk.empirical_ntk_fn(
        torch_mlp(), chunk_bytes=0), ValueError, names('empirical_ntk_fn', 'chunk_bytes')),
    Case('empirical_ntk x1 numpy', lambda: torchntk.empirical_ntk_fn(torch_mlp())(x().numpy()),
         TypeError, names('empirical_ntk_fn', 'x1')),
    Case('empirical_ntk x1 nan', lambda: torchntk.empirical_ntk_fn(torch_mlp())(
        with_value(x(), NAN)), ValueError, names('empirical_ntk_fn', 'x1')),
    Case('empirical_ntk x1 float32 for a float64 model', lambda: torchntk.empirical_ntk_fn(
        torch_mlp())(x().float()), ValueError,
         names('empirical_ntk_fn', 'x1', 'dtype|float32')),
    Case('empirical_ntk x1 other features', lambda: torchntk.empirical_ntk_fn(torch_mlp())(
        x(4, 7)), ValueError, names('empirical_ntk_fn', 'x1')),
    Case('empirical_ntk params with an unknown name', lambda: torchntk.empirical_ntk_fn(
        torch_mlp())(x(), None, {**params_of(torch_mlp()), 'bogus': torch.zeros(1)}),
         ValueError, names('empirical_ntk_fn', 'bogus')),
    Case('empirical_ntk params misspelt', lambda: torchntk.empirical_ntk_fn(torch_mlp())(
        x(), None, {('0.wieght' if k == '0.weight' else k): v
                    for k, v in params_of(torch_mlp()).items()}),
         ValueError, names('empirical_ntk_fn', 'wieght')),
    Case('empirical_nngp x1 nan', lambda: torchntk.empirical_nngp_fn(torch_mlp())(
        with_value(x(), NAN)), ValueError, names('empirical_nngp_fn', 'x1')),
    Case('empirical_nngp_fn model=3', lambda: torchntk.empirical_nngp_fn(3)(x()), TypeError,
         names('empirical_nngp_fn', 'model')),
    Case('empirical_kernel_fn get="bogus"', lambda: torchntk.empirical_kernel_fn(torch_mlp())(
        x(), None, 'bogus'), ValueError, names('empirical_kernel_fn', 'get')),
    Case('linearize model="x"', lambda: torchntk.linearize('x', {})(x(), {}), TypeError,
         names('linearize', 'model')),
    Case('linearize params0=5', lambda: torchntk.linearize(torch_mlp(), 5)(x(), 5), TypeError,
         names('linearize', 'params0')),
    Case('taylor_expand degree=-1', lambda: torchntk.taylor_expand(
        torch_mlp(), params_of(torch_mlp()), -1), ValueError, names('taylor_expand', 'degree')),
    Case('taylor_expand degree="a"', lambda: torchntk.taylor_expand(
        torch_mlp(), params_of(torch_mlp()), 'a'), TypeError, names('taylor_expand', 'degree')),
]

# --- monte_carlo_kernel_fn ---------------------------------------------------------------------

MONTE_CARLO = [
    Case('monte_carlo model="x"', lambda: torchntk.monte_carlo_kernel_fn('x'), TypeError,
         names('monte_carlo_kernel_fn', 'model')),
    Case('monte_carlo n_samples=0', lambda: torchntk.monte_carlo_kernel_fn(mlp(), 0), ValueError,
         names('monte_carlo_kernel_fn', 'n_samples')),
    Case('monte_carlo n_samples=-1', lambda: torchntk.monte_carlo_kernel_fn(mlp(), -1),
         ValueError, names('monte_carlo_kernel_fn', 'n_samples')),
    Case('monte_carlo n_samples=[3, 0]', lambda: torchntk.monte_carlo_kernel_fn(mlp(), [3, 0]),
         ValueError, names('monte_carlo_kernel_fn', 'n_samples')),
    Case('monte_carlo n_samples=2.5', lambda: torchntk.monte_carlo_kernel_fn(mlp(), 2.5),
         TypeError, names('monte_carlo_kernel_fn', 'n_samples')),
    Case('monte_carlo generator=5', lambda: torchntk.monte_carlo_kernel_fn(mlp(), 2, generator=5),
         TypeError, names('monte_carlo_kernel_fn', 'generator')),
    Case('monte_carlo x1 nan', lambda: torchntk.monte_carlo_kernel_fn(mlp(), 2, progress=False)(
        with_value(x(), NAN)), ValueError, names('monte_carlo_kernel_fn', 'x1')),
    Case('monte_carlo x1 numpy', lambda: torchntk.monte_carlo_kernel_fn(
        mlp(), 2, progress=False)(x().numpy()), TypeError, names('monte_carlo_kernel_fn', 'x1')),
    Case('monte_carlo get="bogus"', lambda: torchntk.monte_carlo_kernel_fn(
        mlp(), 2, progress=False)(x(), None, 'bogus'), ValueError,
         names('monte_carlo_kernel_fn', 'get')),
]

# --- predict -----------------------------------------------------------------------------------

PREDICT = [
    Case('gradient_descent_mse k not square', lambda: predict.gradient_descent_mse(
        kernel()[:3], targets()), ValueError, names('gradient_descent_mse', 'k_train_train')),
    Case('gradient_descent_mse k numpy', lambda: predict.gradient_descent_mse(
        kernel().numpy(), targets()), TypeError, names('gradient_descent_mse', 'k_train_train')),
    Case('gradient_descent_mse k nan', lambda: predict.gradient_descent_mse(
        nan_kernel(), targets()), ValueError, names('gradient_descent_mse', 'k_train_train')),
    Case('gradient_descent_mse y_train rows', lambda: predict.gradient_descent_mse(
        kernel(), targets(3)), ValueError, names('gradient_descent_mse', 'y_train')),
    Case('gradient_descent_mse learning_rate=-1', lambda: predict.gradient_descent_mse(
        kernel(), targets(), learning_rate=-1.), ValueError,
         names('gradient_descent_mse', 'learning_rate')),
    Case('gradient_descent_mse diag_reg=-1', lambda: predict.gradient_descent_mse(
        kernel(), targets(), diag_reg=-1.), ValueError, names('gradient_descent_mse', 'diag_reg')),
    Case('gradient_descent_mse t=nan', lambda: predict.gradient_descent_mse(
        kernel(), targets())(NAN, 0.), ValueError, names('gradient_descent_mse', r'\bt\b')),
    Case('gradient_descent_mse t="a"', lambda: predict.gradient_descent_mse(
        kernel(), targets())('a', 0.), TypeError, names('gradient_descent_mse', r'\bt\b')),
    Case('gradient_descent loss="x"', lambda: predict.gradient_descent('x', kernel(), targets()),
         TypeError, names('gradient_descent', 'loss')),
    Case('gradient_descent momentum=1.5', lambda: predict.gradient_descent(
        mse, kernel(), targets(), momentum=1.5), ValueError, names('gradient_descent', 'momentum')),
    Case('gradient_descent method="nope"', lambda: predict.gradient_descent(
        mse, kernel(), targets(), method='nope', progress=False)(
            1., torch.zeros(4, 1, dtype=torch.float64)),
         ValueError, names('gradient_descent', 'method')),
    Case('gradient_descent t=nan', lambda: predict.gradient_descent(
        mse, kernel(), targets(), progress=False)(NAN, torch.zeros(4, 1, dtype=torch.float64)),
         ValueError, names('gradient_descent', r'\bt\b')),
    Case('gp_inference diag_reg=-1', lambda: predict.gp_inference(
        kernel(), targets(), diag_reg=-1.), ValueError, names('gp_inference', 'diag_reg')),
    Case('gp_inference k numpy', lambda: predict.gp_inference(kernel().numpy(), targets()),
         TypeError, names('gp_inference', 'k_train_train')),
    Case('gp_inference get="bogus"', lambda: predict.gp_inference(kernel(), targets())(
        'bogus', kernel()), ValueError, names('gp_inference', 'get')),
    Case('max_learning_rate of a negative kernel', lambda: predict.max_learning_rate(-kernel()),
         ValueError, names('max_learning_rate', 'ntk_train_train')),
    Case('max_learning_rate momentum=2', lambda: predict.max_learning_rate(
        kernel(), momentum=2.), ValueError, names('max_learning_rate', 'momentum')),
    Case('max_learning_rate k not square', lambda: predict.max_learning_rate(kernel()[:3]),
         ValueError, names('max_learning_rate', 'ntk_train_train')),
    Case('gradient_descent_mse_ensemble kernel_fn="x"', lambda:
         predict.gradient_descent_mse_ensemble('x', x(), targets()), TypeError,
         names('gradient_descent_mse_ensemble', 'kernel_fn')),
    Case('gradient_descent_mse_ensemble y_train rows', lambda:
         predict.gradient_descent_mse_ensemble(mlp().kernel_fn, x(), targets(3))(None, x(2)),
         ValueError, names('gradient_descent_mse_ensemble', 'y_train')),
    Case('gradient_descent_mse_params learning_rate=-1', lambda:
         predict.gradient_descent_mse_params(torch_mlp(), x(), targets(), learning_rate=-1.),
         ValueError, names('gradient_descent_mse_params', 'learning_rate')),
    Case('gradient_descent_mse_params implementation="nope"', lambda:
         predict.gradient_descent_mse_params(torch_mlp(), x(), targets(), implementation='nope'),
         ValueError, names('gradient_descent_mse_params', 'implementation')),
]

# --- signal ------------------------------------------------------------------------------------

def block() -> stax.Layer:
    return stax.serial(stax.Dense(1), stax.Erf())


SIGNAL = [
    Case('fixed_points block="x"', lambda: signal.fixed_points('x', 1., 0.), TypeError,
         names('fixed_points', 'block')),
    Case('fixed_points W_var=-1', lambda: signal.fixed_points(block(), -1., 0., progress=False),
         ValueError, names('fixed_points', 'W_var')),
    Case('fixed_points W_var="a"', lambda: signal.fixed_points(block(), 'a', 0., progress=False),
         TypeError, names('fixed_points', 'W_var')),
    Case('fixed_points W_var=nan', lambda: signal.fixed_points(block(), NAN, 0., progress=False),
         ValueError, names('fixed_points', 'W_var')),
    Case('fixed_points b_var=-1', lambda: signal.fixed_points(block(), 1., -1., progress=False),
         ValueError, names('fixed_points', 'b_var')),
    Case('fixed_points max_iter=0', lambda: signal.fixed_points(
        block(), 1., 0., max_iter=0, progress=False), ValueError,
         names('fixed_points', 'max_iter')),
    Case('fixed_points q0=-1', lambda: signal.fixed_points(block(), 1., 0., q0=-1.,
                                                             progress=False),
         ValueError, names('fixed_points', 'q0')),
    Case('fixed_points chunk_size=0', lambda: signal.fixed_points(
        block(), 1., 0., chunk_size=0, progress=False), ValueError,
         names('fixed_points', 'chunk_size')),
    Case('phase_diagram result="x"', lambda: signal.phase_diagram('x'), TypeError,
         names('phase_diagram', 'result')),
]

CASES = LAYERS + KERNEL_FN + FORWARD + BATCHING + EMPIRICAL + MONTE_CARLO + PREDICT + SIGNAL


# --- edge inputs that are not mistakes ---------------------------------------------------------

def empty(t: torch.Tensor) -> torch.Tensor:
    return t[:0]


def shape_is(shape: tuple[int, ...]) -> Callable[[Any], bool]:
    return lambda result: isinstance(result, torch.Tensor) and tuple(result.shape) == shape


def finite(result: Any) -> bool:
    tensors = [result] if isinstance(result, torch.Tensor) else list(result)
    return all(isinstance(t, torch.Tensor) and bool(torch.isfinite(t).all()) for t in tensors)


EDGES = [
    Edge('kernel_fn x1 empty', lambda: mlp().kernel_fn(empty(x()), x(3), get='ntk'),
         shape_is((0, 3)), names('Serial', 'x1')),
    Edge('kernel_fn x2 empty', lambda: cnn().kernel_fn(images(), empty(images()), get='nngp'),
         shape_is((2, 0)), names('Serial', 'x2')),
    Edge('kernel_fn x1 empty, x2=None', lambda: mlp().kernel_fn(empty(x()), get='nngp'),
         shape_is((0, 0)), names('Serial', 'x1')),
    Edge('batched x1 empty', lambda: torchntk.batch(mlp().kernel_fn, 2, progress=False)(
        empty(x()), x(4), get='ntk'), shape_is((0, 4)), names('batch', 'x1')),
    Edge('empirical_ntk x1 empty', lambda: torchntk.empirical_ntk_fn(torch_mlp())(
        empty(x()), x(3)), shape_is((0, 3)), names('empirical_ntk_fn', 'x1')),
    Edge('empirical_nngp x2 empty', lambda: torchntk.empirical_nngp_fn(torch_mlp())(
        x(3), empty(x())), shape_is((3, 0)), names('empirical_nngp_fn', 'x2')),
    Edge('monte_carlo x1 empty', lambda: torchntk.monte_carlo_kernel_fn(
        mlp(), 2, progress=False)(empty(x()), x(3), 'nngp'), shape_is((0, 3)),
         names('monte_carlo_kernel_fn', 'x1')),
    # Infinite time: the steady state, or a clear refusal (as for t=None).
    Edge('gradient_descent t=inf', lambda: predict.gradient_descent(
        mse, kernel(), targets(), progress=False)(INF, torch.zeros(4, 1, dtype=torch.float64)),
         finite, names('gradient_descent', r'\bt\b'), may_refuse=True),
    Edge('gradient_descent t=inf with test data', lambda: predict.gradient_descent(
        mse, kernel(), targets(), progress=False)(
            INF, torch.zeros(4, 1, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64),
            mlp().kernel_fn(x(2, seed=3), x(), get='ntk')),
         finite, names('gradient_descent', r'\bt\b'), may_refuse=True),
    Edge('forward empty batch', lambda: cnn()(empty(images())), shape_is((0, 1)),
         names('Serial', r'\bx\b')),
]


# --- running a case ----------------------------------------------------------------------------

class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise `Hang` in the main thread if the block runs longer than `seconds`."""
    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds:g} s")
    previous = os_signal.signal(os_signal.SIGALRM, on_alarm)
    os_signal.setitimer(os_signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        os_signal.setitimer(os_signal.ITIMER_REAL, 0)
        os_signal.signal(os_signal.SIGALRM, previous)


def classify(case: Case | Edge, seconds: float = HANG_SECONDS) -> tuple[str, str]:
    """('clear' | 'handled' | 'obscure' | 'silent' | 'hang', what happened)."""
    try:
        with deadline(seconds):
            result = case.call()
    except Hang as hang:
        return 'hang', str(hang)
    except Exception as error:   # noqa: BLE001 - any exception is classified
        what = f"{type(error).__name__}: {str(error)[:300]}"
        error_type, match = ((case.error, case.match) if isinstance(case, Case)
                             else (ValueError, case.refusal))
        if isinstance(error, error_type) and re.search(match, str(error)):
            return 'clear', what
        return 'obscure', what
    if isinstance(case, Edge):
        return ('handled' if case.check(result) else 'silent'), f"returned {_describe(result)}"
    return 'silent', f"returned {_describe(result)}"


def _describe(result: Any) -> str:
    if isinstance(result, torch.Tensor):
        return f"a tensor of shape {tuple(result.shape)}"
    return type(result).__name__


@pytest.mark.parametrize('case', CASES, ids=[case.id for case in CASES])
def test_bad_input_raises_a_clear_error(case):
    kind, what = classify(case)
    assert kind == 'clear', f"{kind}: {what}"


@pytest.mark.parametrize('edge', EDGES, ids=[edge.id for edge in EDGES])
def test_edge_input_gives_a_result(edge):
    kind, what = classify(edge)
    assert kind == 'handled' or (edge.may_refuse and kind == 'clear'), f"{kind}: {what}"


def test_the_table_has_no_duplicate_ids():
    ids = [case.id for case in CASES + EDGES]
    assert len(ids) == len(set(ids))
