"""Signal propagation: fixed points of a block's kernel map, their slopes and
depth scales over a grid of weight and bias variances, and the phase diagram.

A deep network repeats a block (`serial(Dense, Erf)`, a convolution and a
nonlinearity, a residual block, …). Send two inputs of equal variance `q` and
covariance `q12` through one block; its kernel map is

    q ↦ V(q),     q12 ↦ F(q, q12),     with F(q, q) = V(q)

(identical inputs stay identical). Mean field theory (Poole et al. 2016,
arXiv:1606.05340; Schoenholz et al. 2017, "Deep Information Propagation",
arXiv:1611.01232) reads off the behaviour of deep networks from its fixed points:

- `q* = V(q*)`, the variance every input converges to, at the rate
  `χ_q = ∂V/∂q(q*)`: `|q_l − q*| ~ χ_q^l = exp(−l/ξ_q)`, `ξ_q = −1/log χ_q`;
- the correlation map `C(c) = F(q*, c·q*)/q*` and its slope at `c = 1`,
  `χ₁ = ∂F/∂q12(q*, q*)` (`σ_w²·E[φ'(u)²]` for a Dense–φ block). Where
  `χ₁ < 1` (ordered phase) the stable fixed point is `c* = 1`: all inputs
  become alike. Where `χ₁ > 1` (chaotic phase) it is some `c* < 1`: nearby
  inputs decorrelate. `χ_c = ∂F/∂q12(q*, c*·q*)` (`= χ₁` in the ordered
  phase) sets the depth scale `ξ_c = −1/log χ_c` of `|c_l − c*| ~ exp(−l/ξ_c)`,
  which diverges on the critical line `χ₁ = 1`, where deep networks train.

Convolutional blocks (Xiao et al. 2018, "Dynamical Isometry and a Mean Field
Theory of CNNs", arXiv:1806.05393) carry a variance and a covariance per
position, so `q`, `q12`, `c` are vectors over positions and the slopes are
Jacobian matrices; `χ_q`, `χ₁`, `χ_c` are their spectral radii, the rate of
the slowest mode. With `CIRCULAR` padding a spatially uniform kernel stays
uniform and the phase diagram is exactly the fully connected one; with `SAME`
padding the zero border lowers the variances near the edges.

Fixed points are found for all grid points at once (`torch.func.vmap` over
the hyperparameters) by Newton's method with autograd Jacobians: `∂V/∂q` by
forward mode (one pass per group of positions whose rows of the Jacobian do
not overlap), `∂F/∂q12` through the layers' NTK rules, which carry Price's
theorem `∂E[φ(u)φ(v)]/∂cov12 = E[φ'(u)φ'(v)]` and so stay exact at `c = 1`.
The results are differentiable in `W_var` and `b_var`: one differentiable
Newton step at the solution gives the implicit-function-theorem derivative.

Where things are: `mean_field.py` holds `fixed_points` and its results
(`FixedPoints`, `Status`); `block_map.py` the kernel map of a block as a
function of flat tensors; `newton.py` the batched Newton solver and its
Jacobians; `plot.py` the phase diagram.
"""

from .block_map import DEFAULT_SPATIAL_SIZE
from .mean_field import FixedPoints, Status, fixed_points
from .plot import phase_diagram

__all__ = ['DEFAULT_SPATIAL_SIZE', 'FixedPoints', 'Status', 'fixed_points', 'phase_diagram']
