"""Order-to-chaos phase diagrams of deep Erf networks, fully connected and convolutional.

A deep network repeats one block; `torchntk.signal.fixed_points` sweeps the
block's weight and bias variances `(σ_w², σ_b²)` over a grid and returns, for
every grid point, the fixed point `q*` of the variance, the stable correlation
`c*` of two inputs, the slope `χ₁` of the correlation map at `c = 1` (the
critical line `χ₁ = 1` separates the ordered phase, where all inputs become
alike, from the chaotic one, where nearby inputs decorrelate), and the depth
scale `ξ_c` over which a deep network forgets input correlations, which
diverges on the critical line (Schoenholz et al. 2017, arXiv:1611.01232).

Two diagrams are saved to `examples/output/`:

* `phase_diagram_erf.png`: `Dense → Erf`, the fully connected network;
* `phase_diagram_cnn.png`: `Conv 3×3 (SAME padding) → Erf` on 8×8 images,
  where `q*` and `c*` are per position (the panels show their means). Zero
  padding lowers the variances near the border and moves the critical line
  slightly; with CIRCULAR padding the diagram is exactly the fully connected
  one (Xiao et al. 2018, arXiv:1806.05393), which the script checks.

It prints the critical `σ_w²` at a few `σ_b²` for each. Needs matplotlib (the
`demo` extra). Run it with
`bash scripts/setup.sh && .venv/bin/python examples/phase_diagram.py`.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import torch

from torchntk import signal, stax

OUTPUT = pathlib.Path(__file__).parent / 'output'


def report(name: str, res: signal.FixedPoints, seconds: float) -> None:
    b_var, line = res.b_var, res.critical_line()
    shown = torch.linspace(0, len(b_var) - 1, 5).round().long()
    points = ', '.join(f"σ_b² = {b_var[i]:.3f}: σ_w² = {line[i]:.3f}" for i in shown)
    print(f"{name}: {len(res.W_var)} x {len(b_var)} grid in {seconds:.1f} s; "
          f"critical line {points}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--grid', type=int, default=100,
                        help='grid points per axis for the fully connected network')
    parser.add_argument('--cnn-grid', type=int, default=40,
                        help='grid points per axis for the CNN')
    parser.add_argument('--size', type=int, default=8, help='image side for the CNN')
    parser.add_argument('--output', type=pathlib.Path, default=OUTPUT)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    W_range, b_range = (0.5, 4.), (0., 0.5)

    def sweep(block: stax.Layer, points: int, **options) -> tuple[signal.FixedPoints, float]:
        W_var = torch.linspace(*W_range, points, dtype=torch.float64)
        b_var = torch.linspace(*b_range, points, dtype=torch.float64)
        start = time.perf_counter()
        res = signal.fixed_points(block, W_var, b_var, **options)
        return res, time.perf_counter() - start

    erf, seconds = sweep(stax.serial(stax.Dense(512), stax.Erf()), args.grid)
    report('Erf, fully connected', erf, seconds)
    signal.phase_diagram(erf, title='Dense → Erf').savefig(args.output / 'phase_diagram_erf.png')

    cnn, seconds = sweep(stax.serial(stax.Conv(64, (3, 3), padding='SAME'), stax.Erf()),
                         args.cnn_grid, spatial_shape=(args.size, args.size))
    report(f'Erf CNN, 3x3 SAME convolution on {args.size}x{args.size} images', cnn, seconds)
    signal.phase_diagram(cnn, title=f'Conv 3×3 SAME → Erf, {args.size}×{args.size} images') \
        .savefig(args.output / 'phase_diagram_cnn.png')

    # With periodic padding a uniform kernel stays uniform: the CNN's diagram
    # is the fully connected one (Xiao et al. 2018).
    circular, _ = sweep(stax.serial(stax.Conv(64, (3, 3), padding='CIRCULAR'), stax.Erf()), 6,
                        spatial_shape=(args.size, args.size))
    fc, _ = sweep(stax.serial(stax.Dense(512), stax.Erf()), 6)
    gap = (circular.chi_1 - fc.chi_1).abs().max().item()
    print(f"CIRCULAR padding against fully connected, 6 x 6 grid: largest |Δχ₁| = {gap:.1e}")
    print(f"saved {args.output / 'phase_diagram_erf.png'} and {args.output / 'phase_diagram_cnn.png'}")


if __name__ == '__main__':
    main()
