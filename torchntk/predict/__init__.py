r"""Predictions of wide networks trained by gradient descent, from their kernels.

Given the NTK (or NNGP) on the training set, the outputs of an infinitely wide
network (or of the linearization of a finite one) follow a linear ODE in
function space under gradient flow, solved here in closed form for the mean
squared error and numerically for any other loss ("Wide Neural Networks of Any
Depth Evolve as Linear Models Under Gradient Descent", Lee et al. 2019,
arXiv:1902.06720). The semantics are those of neural-tangents' `predict`:

* the loss is `0.5 · mean((f - y)²)` over all `n = y_train.numel()` entries,
  so gradient flow is `df/dt = -η Θ (f - y) / n`;
* times `t` count steps of size `learning_rate = η` (continuous: the
  absolute time is `η t`), so `t` and `learning_rate` are interchangeable;
* `t=None` is infinite time, solved by a Cholesky factorization; a finite `t`
  (any shape: the outputs get leading axes `t.shape`) by an
  eigendecomposition. Both are computed on first use and cached.

Kernel layout. For targets `y_train` of shape `(N, *O)`, a kernel lacks the
output axes in `trace_axes` (it is read as `Θ ⊗ I` along them) and has every
other axis twice, zipped: `trace_axes=(-1,)` (the default, and the layout of
`model.kernel_fn` and of `empirical_ntk_fn`'s default) gives `(N1, N2)`;
`trace_axes=()` gives `(N1, N2, O, O')`, the full kernel of a finite network
(`empirical_ntk_fn(model, trace_axes=())`).

Regularization. `diag_reg` adds `diag_reg · mean(diag K) · I` to the train-train
kernel (`diag_reg · I` with `diag_reg_absolute_scale=True`) before it is
factorized. With `diag_reg=0` a singular kernel cannot be Cholesky-factorized:
`t=None` then raises and asks for `diag_reg > 0`, while `t=float('inf')` goes
through the eigendecomposition and takes the limit of gradient flow, which never
moves along the kernel's null space (a pseudo-inverse with the cutoff
`λ ≤ λ_max · n · eps`). Negative eigenvalues, which a PSD kernel gets only from
round-off, are treated as zero; a train-train kernel that is not symmetric or
not positive semi-definite beyond round-off (`λ_min < -√eps · max |λ|`) is refused.

Where things are: `mse.py` solves the MSE flow in closed form (outputs,
linearized parameters, the largest stable learning rate); `ode.py` integrates
the flow of any loss; `inference.py` holds the GP posteriors and the infinite
ensemble; `linalg.py` the eigendecomposition and Cholesky factor of a
train-train kernel; `layout.py` the zipped kernel layout; `arguments.py` the
checks of the predictors' arguments.
"""

from .inference import Gaussian, gp_inference, gradient_descent_mse_ensemble
from .mse import gradient_descent_mse, gradient_descent_mse_params, max_learning_rate
from .ode import ODEState, gradient_descent

__all__ = ['Gaussian', 'ODEState', 'gp_inference', 'gradient_descent', 'gradient_descent_mse',
           'gradient_descent_mse_ensemble', 'gradient_descent_mse_params', 'max_learning_rate']
