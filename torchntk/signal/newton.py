"""Fixed points of many maps at once by Newton's method: forward-mode Jacobians
(dense, or one pass per group of columns that share no row), spectral radii,
and the step that gives a fixed point its implicit-function-theorem derivative."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch


#: `(x, params) ↦ (f(x, *params), ∂f/∂x)` for a batch of rows.
ValueAndJacobian = Callable[[torch.Tensor, Sequence[torch.Tensor]],
                            tuple[torch.Tensor, torch.Tensor]]


def autograd_jacobian(fn: Callable[..., torch.Tensor]) -> ValueAndJacobian:
    """`(x, params) ↦ (fn(x_g, *params_g), ∂fn/∂x_g)` for every row `g`, by forward mode."""
    def twice(x, *p):
        y = fn(x, *p)
        return y, y

    def value_and_jacobian(x: torch.Tensor,
                           params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        jacobian, value = torch.func.vmap(torch.func.jacfwd(twice, has_aux=True))(x, *params)
        return value, jacobian
    return value_and_jacobian


def sparse_jacobian(fn: Callable[..., torch.Tensor], pattern: torch.Tensor) -> ValueAndJacobian:
    """Like `autograd_jacobian`, with one forward-mode pass per group of
    columns of the Jacobian that have no nonzero row in common (greedy column
    colouring, Curtis, Powell & Reid 1974): 9 passes instead of 64 for a 3×3
    convolution on 8×8 images."""
    n = pattern.shape[0]
    conflicts = ((pattern.T.double() @ pattern.double()) > 0).cpu().numpy()
    colors = np.zeros(n, dtype=np.int64)
    for column in range(n):
        taken = set(colors[:column][conflicts[column, :column]])
        colors[column] = next(color for color in range(n) if color not in taken)
    colors = torch.as_tensor(colors, device=pattern.device)
    tangents = torch.nn.functional.one_hot(colors).T

    def single(x, *p):
        def push(tangent):
            return torch.func.jvp(lambda y: fn(y, *p), (x,), (tangent,))
        return torch.func.vmap(push)(tangents.to(x.dtype))

    def value_and_jacobian(x: torch.Tensor,
                           params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        values, products = torch.func.vmap(single)(x, *params)        # (G, colors, n)
        return values[:, 0], products[:, colors, :].transpose(-1, -2) * pattern
    return value_and_jacobian


def spectral_radius(matrix: torch.Tensor) -> torch.Tensor:
    """`max |λ|` of each matrix of a batch `(…, n, n)`."""
    if matrix.shape[-1] == 1:
        return matrix[..., 0, 0].abs()
    return torch.linalg.eigvals(matrix).abs().amax(-1)


def newton_fixed_points(value_and_jacobian: ValueAndJacobian, x: torch.Tensor,
                        params: Sequence[torch.Tensor], valid: Callable[..., torch.Tensor],
                        is_variance: torch.Tensor, tol: float, max_iter: int,
                        floor: torch.Tensor | float = 0.
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed points `x = f(x, *params)` of every row, without gradients.

    A Newton step `x − (J − I)⁻¹(f(x) − x)` is taken where it is finite,
    `valid`, and heads the way the plain iteration `x ← f(x)` goes (so it
    moves toward the attractor the network reaches, not toward a repelling
    fixed point); elsewhere the plain iteration is. A row stops once
    `|f(x) − x| ≤ tol·|x| + floor` (`|x|` its largest entry), after taking that
    last step, or when `f(x)` overflows. The test is relative, so that tiny fixed
    points get every digit, and on the residual, which a map's rounding keeps
    from shrinking further, not on the step, which near a critical line
    (`J ≈ I`) amplifies that rounding; the absolute `floor` of a row lets an
    iteration that approaches a fixed point at 0 stop.

    Returns:
        `x`, whether each row converged, and whether its last step increased
        every variance (a diverging variance map).
    """
    x = x.detach().clone()
    params = [p.detach() for p in params]
    converged = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    increasing = torch.zeros_like(converged)
    active = torch.arange(x.shape[0], device=x.device)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    floor = torch.as_tensor(floor, dtype=x.dtype, device=x.device).expand(x.shape[0])
    with torch.no_grad():
        for _ in range(max_iter):
            if active.numel() == 0:
                break
            x_active, p_active = x[active], [p[active] for p in params]
            value, jacobian = value_and_jacobian(x_active, p_active)
            residual = value - x_active
            overflow = ~torch.isfinite(value).all(-1)
            increasing[active] = (residual[:, is_variance] > 0).all(-1)
            step, singular = torch.linalg.solve_ex(jacobian - eye, -residual)
            newton = x_active + step
            accept = ((singular == 0) & torch.isfinite(newton).all(-1) & valid(newton, *p_active)
                      & ((step * residual).sum(-1) > 0))
            done = residual.abs().amax(-1) <= tol * x_active.abs().amax(-1) + floor[active]
            converged[active] = done
            x[active] = torch.where(overflow[:, None], x_active,
                                    torch.where(accept[:, None], newton, value))
            active = active[~(done | overflow)]
    return x, converged, increasing


def implicit_step(fn: Callable[..., torch.Tensor], x: torch.Tensor, params: Sequence[torch.Tensor],
                   jacobian: torch.Tensor) -> torch.Tensor:
    """The converged `x` with the derivative `−(J − I)⁻¹ ∂fn/∂params` of the
    implicit function theorem: that of one Newton step from `x` (`jacobian`
    is the `J` to use, taken as a constant); the value stays `x`."""
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    value = torch.func.vmap(fn)(x, *params)
    step, singular = torch.linalg.solve_ex(jacobian.detach() - eye, x - value)
    # Where J − I is singular (on a critical line, or a line of fixed points)
    # the derivative does not exist.
    step = torch.where((singular == 0)[:, None] & torch.isfinite(step), step, 0.)
    return x + (step - step.detach())
