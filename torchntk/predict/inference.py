"""Exact Gaussian-process inference with the NNGP and NTK, and the infinite
ensemble of wide networks trained on the MSE for a finite time."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, NamedTuple, Sequence

import torch

from ..checks import check_callable, check_flag, check_nonnegative, check_positive
from ..outputs import Outputs
from .arguments import (Times, checked_kernel, checked_targets, checked_test_train_kernel,
                        checked_times, checked_train_matrix, first_kernel_field, kernel_field)
from .layout import OutputAxes, kernel_matrix, symmetrized, zipped_kernel
from .linalg import CholeskyFactor, KernelSpectrum, regularized


class Gaussian(NamedTuple):
    """Mean `(N, *O)` and covariance (the kernel's layout) of a Gaussian over outputs."""

    mean: torch.Tensor
    covariance: torch.Tensor


#: `gp_inference`'s `get`: the NNGP posterior, the NTK ensemble at t = ∞, the NTK-GP.
GP_PREDICTIONS = Outputs('Gaussians', ('nngp', 'ntk', 'ntkgp'), 'prediction',
                         default=('nngp', 'ntk'))
#: `gradient_descent_mse_ensemble`'s `get`: training of the readout layer or of all layers.
ENSEMBLE_PREDICTIONS = Outputs('Gaussians', ('nngp', 'ntk'), 'prediction',
                               default=('nngp', 'ntk'))


def gp_inference(k_train_train: Any, y_train: torch.Tensor, diag_reg: float = 0.,
                 diag_reg_absolute_scale: bool = False,
                 trace_axes: Sequence[int] = (-1,)) -> Callable[..., Any]:
    r"""Posterior of the NNGP, the NTK ensemble at infinite time, and the NTK-GP.

    * `'nngp'`: the exact posterior of an infinitely wide Bayesian network,
      mean `K_{*d} K^{-1} y`, covariance `K_{**} - K_{*d} K^{-1} K_{d*}` with `K` the NNGP;
    * `'ntk'`: the distribution of an infinite ensemble of infinitely wide networks
      trained by gradient flow to `t = ∞`: mean `Θ_{*d} Θ^{-1} y`, covariance
      `K_{**} + Θ_{*d} Θ^{-1} K_{dd} Θ^{-1} Θ_{d*} - (Θ_{*d} Θ^{-1} K_{d*} + transpose)`;
    * `'ntkgp'`: the GP posterior with the NTK as prior covariance ("Bayesian Deep
      Ensembles via the Neural Tangent Kernel", He et al. 2020, arXiv:2007.05864).

    `K + diag_reg·…·I` is Cholesky-factorized once per kernel on first use; a
    kernel that is not positive definite raises (pass `diag_reg > 0`).

    Args:
        k_train_train: train-train kernels: a record with `nngp` and/or `ntk`
            fields (`torchntk.Kernel`, or the named tuple of `kernel_fn(..., get=...)`),
            or a tensor used for every `get`. `'ntk'` with covariances needs both.
        y_train, diag_reg, diag_reg_absolute_scale, trace_axes: as in `gradient_descent_mse`.

    Returns:
        `predict_fn(get=None, k_test_train=None, k_test_test=None)`. `get` is
        `'nngp'`, `'ntk'`, `'ntkgp'` or a tuple of them (`None`: `('nngp', 'ntk')`).
        `k_test_train=None` predicts the training set (`N(y_train, 0)`); with
        `k_test_test` (the NNGP on the test set; the NTK for `'ntkgp'`) each
        prediction is a `Gaussian(mean, covariance)`, else the mean. A string
        `get` gives one prediction, a tuple a named tuple `Gaussians` of them.

    Shape:
        mean: `(M, *O)`; covariance: `(M, M)` for `trace_axes=(-1,)`, in general
        the kernel's zipped layout.
    """
    caller = 'gp_inference'
    first = first_kernel_field(k_train_train, 'k_train_train', caller)
    y_train = checked_targets(y_train, first, caller)
    axes = OutputAxes(y_train.shape, trace_axes, caller)
    check_nonnegative(diag_reg, 'diag_reg', caller)
    check_flag(diag_reg_absolute_scale, 'diag_reg_absolute_scale', caller)
    factors: dict[str, CholeskyFactor] = {}

    def train_kernel(field: str) -> torch.Tensor:
        kernel = checked_kernel(kernel_field(k_train_train, field, 'k_train_train', caller),
                                f'k_train_train.{field}', caller)
        axes.check_kernel(kernel, f'k_train_train.{field}', axes.kept_shape, axes.kept_shape)
        return kernel

    def solve(field: str, rhs: torch.Tensor) -> torch.Tensor:
        if field not in factors:
            matrix = checked_train_matrix(train_kernel(field), f'k_train_train.{field}', caller)
            factors[field] = CholeskyFactor(regularized(matrix, diag_reg,
                                                        diag_reg_absolute_scale),
                                            caller, f'k_train_train.{field}')
        return factors[field].solve(rhs)

    def predict_fn(get: str | Sequence[str] | None = None, k_test_train: Any = None,
                   k_test_test: Any = None) -> Any:
        names = GP_PREDICTIONS.names(get, caller)
        y_matrix = axes.to_matrix(y_train)
        predictions = {}
        for name in names:
            field = 'ntk' if name == 'ntkgp' else name
            k_dd = train_kernel(field)
            if k_test_train is None:
                predictions[name] = (y_train.clone() if k_test_test is None
                          else Gaussian(y_train.clone(), torch.zeros_like(k_dd)))
                continue
            k_td = kernel_field(k_test_train, field, 'k_test_train', caller)
            k_td = checked_test_train_kernel(k_td, k_dd, axes, caller, f'k_test_train.{field}')
            test_kept = tuple(k_td.shape[::2])
            k_td = kernel_matrix(k_td)
            mean = axes.from_matrix(k_td @ solve(field, y_matrix), test_kept)
            if k_test_test is None:
                predictions[name] = mean
                continue
            prior = 'ntk' if name == 'ntkgp' else 'nngp'
            k_tt = kernel_field(k_test_test, prior, 'k_test_test', caller)
            k_tt = checked_kernel(k_tt, f'k_test_test.{prior}', caller)
            axes.check_kernel(k_tt, f'k_test_test.{prior}', test_kept, test_kept)
            k_tt = kernel_matrix(k_tt)
            if name == 'ntk':
                nngp_dd = kernel_matrix(train_kernel('nngp'))
                nngp_td = kernel_field(k_test_train, 'nngp', 'k_test_train', caller)
                nngp_td = kernel_matrix(checked_test_train_kernel(nngp_td, k_dd, axes, caller,
                                                                  'k_test_train.nngp'))
                weights = solve('ntk', k_td.T)            # Θ⁻¹ Θ_d*
                cross = nngp_td @ weights                 # K_*d Θ⁻¹ Θ_d*
                covariance = k_tt + weights.T @ nngp_dd @ weights - cross - cross.T
            else:
                covariance = k_tt - k_td @ solve(field, k_td.T)
            predictions[name] = Gaussian(mean,
                                         zipped_kernel(symmetrized(covariance), test_kept))
        return GP_PREDICTIONS.select(predictions, get, caller)

    return predict_fn


def gradient_descent_mse_ensemble(kernel_fn: Callable[..., Any], x_train: torch.Tensor,
                                  y_train: torch.Tensor, learning_rate: float = 1.,
                                  diag_reg: float = 0., diag_reg_absolute_scale: bool = False,
                                  trace_axes: Sequence[int] = (-1,),
                                  **kernel_fn_kwargs: Any) -> Callable[..., Any]:
    r"""Mean and covariance of an infinite ensemble of infinitely wide networks trained on the MSE.

    Marginalizing over the initialization `f_0 ~ N(0, K)` (`K` the NNGP), the
    outputs at time `t` of gradient flow with kernel `Θ` are Gaussian:

    .. math::
        μ_*(t) = Θ_{*d} Θ^{-1} (I - e^{-ηΘt/n})\, y

    * `'ntk'`: training of all layers, covariance
      `K_{**} + A_t^T K_{dd} A_t - (K_{*d} A_t + transpose)` with
      `A_t = Θ^{-1}(I - e^{-ηΘt/n}) Θ_{d*}`;
    * `'nngp'`: `Θ = K` (training of the readout layer only, or the Bayesian
      posterior at `t = ∞`), covariance `K_{**} - K_{*d} K^{-1}(I - e^{-2ηKt/n}) K_{d*}`.

    On the training set (`x_test=None`) the covariances are
    `e^{-ηΘt/n} K e^{-ηΘt/n}` (`'ntk'`) and `K e^{-2ηKt/n}` (`'nngp'`). At
    `t=None` this is `gp_inference`. Kernels, eigendecompositions and Cholesky
    factors of the training set are computed on first use and cached.

    Args:
        kernel_fn: `kernel_fn(x1, x2, get=('nngp', 'ntk'), **kernel_fn_kwargs)`
            returning a record with the requested fields, e.g. `model.kernel_fn`.
        x_train, y_train: training inputs and targets.
        learning_rate, diag_reg, diag_reg_absolute_scale, trace_axes: as in
            `gradient_descent_mse`.
        **kernel_fn_kwargs: passed to every call of `kernel_fn`.

    Returns:
        `predict_fn(t=None, x_test=None, get=None, compute_cov=False)`:
        `get` is `'nngp'`, `'ntk'` or a tuple (`None`: both); `x_test=None`
        predicts the training set. Returns means, or `Gaussian(mean, covariance)`
        with `compute_cov`; one for a string `get`, a named tuple `Gaussians` for a tuple.

    Shape:
        mean: `(*t.shape, M, *O)`; covariance: `(*t.shape, M, M)` for
        `trace_axes=(-1,)`, in general the kernel's zipped layout.
    """
    caller = 'gradient_descent_mse_ensemble'
    check_callable(kernel_fn, 'kernel_fn', caller)
    checked_targets(y_train, None, caller)
    axes = OutputAxes(y_train.shape, trace_axes, caller)
    check_positive(learning_rate, 'learning_rate', caller)
    check_nonnegative(diag_reg, 'diag_reg', caller)
    check_flag(diag_reg_absolute_scale, 'diag_reg_absolute_scale', caller)
    train_kernels: dict[str, torch.Tensor] = {}
    spectra: dict[str, KernelSpectrum] = {}
    posteriors: dict[tuple[str, ...], Callable] = {}

    def train_kernel(fields: tuple[str, ...]) -> dict[str, torch.Tensor]:
        missing = tuple(f for f in fields if f not in train_kernels)
        if missing:
            computed = kernel_fn(x_train, None, get=missing, **kernel_fn_kwargs)
            for field in missing:
                arg = f'kernel_fn(x_train).{field}'
                kernel = checked_kernel(kernel_field(computed, field, 'kernel_fn(x_train)', caller),
                                        arg, caller)
                axes.check_kernel(kernel, arg, axes.kept_shape, axes.kept_shape)
                train_kernels[field] = kernel
        return {f: train_kernels[f] for f in fields}

    def train_spectrum(field: str) -> KernelSpectrum:
        if field not in spectra:
            arg = f'kernel_fn(x_train).{field}'
            matrix = checked_train_matrix(train_kernel((field,))[field], arg, caller)
            spectra[field] = KernelSpectrum(regularized(matrix, diag_reg,
                                                        diag_reg_absolute_scale),
                                            y_train.numel(), caller, arg)
        return spectra[field]

    def predict_fn(t: Times = None, x_test: torch.Tensor | None = None,
                   get: str | Sequence[str] | None = None, compute_cov: bool = False) -> Any:
        names = ENSEMBLE_PREDICTIONS.names(get, caller)
        check_flag(compute_cov, 'compute_cov', caller)
        fields = tuple(f for f in ('nngp', 'ntk')
                       if f in names or (f == 'nngp' and compute_cov))
        k_dd = train_kernel(fields)
        target = checked_targets(y_train, k_dd[fields[0]], caller)
        k_td = nngp_tt = None
        if x_test is not None:
            computed = kernel_fn(x_test, x_train, get=fields, **kernel_fn_kwargs)
            k_td = {f: checked_test_train_kernel(
                        kernel_field(computed, f, 'kernel_fn(x_test, x_train)', caller), k_dd[f],
                        axes, caller, f'kernel_fn(x_test, x_train).{f}')
                    for f in fields}
            if compute_cov:
                nngp_tt = kernel_field(kernel_fn(x_test, None, get=('nngp',), **kernel_fn_kwargs),
                                       'nngp', 'kernel_fn(x_test)', caller)
                nngp_tt = checked_kernel(nngp_tt, 'kernel_fn(x_test).nngp', caller)

        if t is None:
            if fields not in posteriors:
                posteriors[fields] = gp_inference(SimpleNamespace(**k_dd), target, diag_reg,
                                                  diag_reg_absolute_scale, trace_axes)
            test_test = (True if x_test is None else nngp_tt) if compute_cov else None
            test_train = None if k_td is None else SimpleNamespace(**k_td)
            return posteriors[fields](names[0] if isinstance(get, str) else names,
                                      test_train, test_test)

        times, t_shape = checked_times(t, learning_rate, k_dd[fields[0]], caller)
        y_matrix = axes.to_matrix(target)
        kept = axes.kept_shape if k_td is None else tuple(k_td[fields[0]].shape[::2])
        predictions = {}
        for name in names:
            spectrum = train_spectrum(name)
            if k_td is None:
                mean = spectrum.apply(spectrum.one_minus_decay(times), y_matrix)
            else:
                mean = (kernel_matrix(k_td[name])
                        @ spectrum.apply(spectrum.integral(times), y_matrix))
            mean = axes.from_matrix(mean, kept, t_shape)
            if not compute_cov:
                predictions[name] = mean
                continue
            nngp_dd = kernel_matrix(k_dd['nngp'])
            if k_td is None and name == 'nngp':
                covariance = spectrum.apply(spectrum.evals * spectrum.decay(2 * times))
            elif k_td is None:
                decay = spectrum.apply(spectrum.decay(times))                 # e^{-ηΘt/n}
                covariance = decay @ nngp_dd @ decay
            elif name == 'nngp':
                k_dt = kernel_matrix(k_td['nngp']).T
                covariance = (kernel_matrix(nngp_tt)
                              - k_dt.T @ spectrum.apply(spectrum.integral(2 * times), k_dt))
            else:
                weights = spectrum.apply(spectrum.integral(times),
                                         kernel_matrix(k_td['ntk']).T)   # A_t
                cross = kernel_matrix(k_td['nngp']) @ weights
                covariance = (kernel_matrix(nngp_tt) + weights.mT @ nngp_dd @ weights
                              - cross - cross.mT)
            covariance = symmetrized(covariance).reshape(*t_shape, *covariance.shape[-2:])
            predictions[name] = Gaussian(mean, zipped_kernel(covariance, kept))
        return ENSEMBLE_PREDICTIONS.select(predictions, get, caller)

    return predict_fn
