"""The phase diagram of a block: `q*`, `c*` and the depth scale over `(σ_w², σ_b²)`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .mean_field import FixedPoints


def phase_diagram(result: FixedPoints, *, title: str | None = None) -> Any:
    """Plot `q*`, `c*` and the depth scale `ξ_c` over the `(σ_w², σ_b²)` grid,
    with the critical line `χ₁ = 1` and the region without finite `q*`.

    Quantities over positions (convolutional blocks) are averaged. Needs
    matplotlib (the `demo` extra); the figure is made without pyplot, so
    save it with `fig.savefig(path)`.

    Args:
        result: `fixed_points` over 1-D `W_var` and `b_var`.
        title: figure title.

    Returns:
        A `matplotlib.figure.Figure` with three panels.
    """
    if not isinstance(result, FixedPoints):
        raise TypeError(f"phase_diagram: result must be the FixedPoints of fixed_points, got "
                        f"{type(result).__name__}")
    if title is not None and not isinstance(title, str):
        raise TypeError(f"phase_diagram: title must be a string, got {type(title).__name__}")
    try:
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("phase_diagram needs matplotlib: pip install 'torchntk[demo]'") from error
    if result.W_var.ndim != 1 or result.b_var.ndim != 1 or len(result.W_var) < 2 \
            or len(result.b_var) < 2:
        raise ValueError(f"phase_diagram: needs fixed points over 1-D W_var and b_var of at least "
                         f"2 values each, got shapes {tuple(result.W_var.shape)} and "
                         f"{tuple(result.b_var.shape)}")

    def grid_values(t: torch.Tensor) -> np.ndarray:
        t = t.detach().to('cpu', torch.float64)
        return t.flatten(2).nanmean(-1).numpy().T if t.ndim > 2 else t.numpy().T

    W, b = (v.detach().to('cpu', torch.float64).numpy() for v in (result.W_var, result.b_var))
    depth = grid_values(result.depth_scale)
    finite_depth = depth[np.isfinite(depth) & (depth > 0)]
    panels = [
        ('$q^*$' + (' (mean over positions)' if result.q_star.ndim > 2 else ''),
         grid_values(result.q_star), {}),
        ('$c^*$' + (' (mean over positions)' if result.c_star.ndim > 2 else ''),
         grid_values(result.c_star), {}),
        (r'depth scale $\xi_c = -1/\log\chi_c$',
         np.where(np.isfinite(depth), depth, np.nan),
         {'norm': LogNorm(vmin=max(finite_depth.min(), 1e-2), vmax=finite_depth.max())}
         if finite_depth.size else {}),
    ]
    fig = Figure(figsize=(15, 4.4), layout='constrained')
    diverges = grid_values(result.q_diverges.to(torch.float64))
    chi_1 = grid_values(result.chi_1)
    for ax, (label, values, options) in zip(fig.subplots(1, 3), panels):
        mesh = ax.pcolormesh(W, b, values, shading='auto', cmap='viridis', **options)
        fig.colorbar(mesh, ax=ax)
        if np.nanmin(chi_1) < 1 < np.nanmax(chi_1):
            ax.contour(W, b, chi_1, levels=[1.], colors='white', linestyles='--', linewidths=2)
        if diverges.any():
            ax.contourf(W, b, diverges, levels=[0.5, 1.5], colors='none', hatches=['//'])
        ax.set_xlabel(r'$\sigma_w^2$')
        ax.set_ylabel(r'$\sigma_b^2$')
        ax.set_title(label)
    fig.suptitle((title + ': ' if title else '') + r'critical line $\chi_1 = 1$ dashed'
                 + (r', no finite $q^*$ hatched' if diverges.any() else ''))
    return fig
