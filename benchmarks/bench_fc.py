"""Time `kernel_fn` of a 3-layer ReLU network against its matmul floor and neural-tangents.

The network is Dense(512)-Relu-Dense(512)-Relu-Dense(10) (W_std=1.5,
b_std=0.05) on `N x 784` inputs, with get=('nngp', 'ntk'). Two kernels per case:
`x2=None` (N x N, train x train) and `x1` against an independent `x2` of the
same size (N x N, test x train).

The floor: on flat inputs every layer's rule is elementwise on the N1 x N2
kernel, so the only O(N1 N2 d) work is the input Gram matrix x1 x2^T, costing
2 N1 N2 784 FLOPs. Its time is measured here with torch on the same shapes;
`x matmul` is how many times longer `kernel_fn` takes than that product.

With `--nt-python`, the same network is timed in neural-tangents (jitted
kernel_fn, warmed up, float64 through jax_enable_x64) in a subprocess of that
interpreter, and its kernels are compared with ours on a corner block. With
`x2=None` that block holds the diagonal, where neural-tangents takes the ReLU
NTK's arccos at a correlation rounded off 1 and loses half the digits (about
sqrt(eps): 2e-8 in float64, 4e-4 in float32); torchntk's diagonal is exact to
rounding, so `max rel diff` there is neural-tangents' error.

Each call allocates N1 x N2 tensors (the input Gram matrix, the outputs); above
glibc's 32 MiB mmap limit each allocation would be fresh memory whose page
faults can cost more than the arithmetic: `kernel_fn` has glibc reuse freed
memory while it runs (`torchntk.ops.heap.reuse_heap`), and the extension
advises its outputs as huge pages.

    .venv/bin/python benchmarks/bench_fc.py --nt-python /path/to/nt-venv/bin/python
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from torchntk import stax

from _common import median_ms, run_neural_tangents

FEATURES = 784
WIDTH = 512
W_STD = 1.5
B_STD = 0.05
GET = ('nngp', 'ntk')
# Our kernels are compared with neural-tangents' on this top-left block.
CHECK_BLOCK = 256
DTYPES = {'float32': torch.float32, 'float64': torch.float64}

NT_SCRIPT = textwrap.dedent('''
    import json, time
    import numpy as np
    import jax
    if spec["dtype"] == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from neural_tangents import stax

    _, _, kernel_fn = stax.serial(
        stax.Dense(spec["width"], W_std=spec["W_std"], b_std=spec["b_std"]), stax.Relu(),
        stax.Dense(spec["width"], W_std=spec["W_std"], b_std=spec["b_std"]), stax.Relu(),
        stax.Dense(10, W_std=spec["W_std"], b_std=spec["b_std"]))
    kernel_fn = jax.jit(kernel_fn, static_argnames="get")

    def ready(tree):
        return jax.tree_util.tree_map(lambda a: a.block_until_ready(), tree)

    for case in spec["cases"]:
        x1 = jnp.asarray(np.load(case["x1"]), dtype=spec["dtype"])
        x2 = None if case["x2"] is None else jnp.asarray(np.load(case["x2"]), dtype=spec["dtype"])
        for _ in range(spec["warmup"]):
            out = ready(kernel_fn(x1, x2, get=("nngp", "ntk")))
        times = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            out = ready(kernel_fn(x1, x2, get=("nngp", "ntk")))
            times.append(time.perf_counter() - start)
        b = spec["block"]
        np.save(case["out"], np.stack([np.asarray(out.nngp[:b, :b]), np.asarray(out.ntk[:b, :b])]))
        print(json.dumps({"name": case["name"], "times": times}), flush=True)
''')


def neural_tangents_ms(python: str, dtype: str, cases: list[dict], repeats: int,
                      warmup: int) -> dict[str, float]:
    """Median ms per case name, timed by neural-tangents in `python`."""
    spec = {'dtype': dtype, 'cases': cases, 'repeats': repeats, 'warmup': warmup,
            'width': WIDTH, 'W_std': W_STD, 'b_std': B_STD, 'block': CHECK_BLOCK}
    return {r['name']: 1e3 * statistics.median(r['times'])
            for r in run_neural_tangents(python, NT_SCRIPT, spec)}


def max_relative_difference(ours: torch.Tensor, theirs: np.ndarray) -> float:
    """max |ours - theirs| / max |theirs| over the checked block."""
    ours = ours.double().numpy()
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', type=int, nargs='+', default=[1000, 4000],
                        help='numbers of examples N (each case is N x N)')
    parser.add_argument('--dtypes', nargs='+', choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument('--repeats', type=int, default=5, help='timed runs per case (median)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed runs before timing')
    parser.add_argument('--nt-python', help='python of a venv with neural-tangents')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()

    model = stax.serial(
        stax.Dense(WIDTH, W_std=W_STD, b_std=B_STD), stax.Relu(),
        stax.Dense(WIDTH, W_std=W_STD, b_std=B_STD), stax.Relu(),
        stax.Dense(10, W_std=W_STD, b_std=B_STD),
    )
    rng = np.random.default_rng(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        for n in args.sizes:
            x1, x2 = (rng.standard_normal((n, FEATURES)) for _ in range(2))
            np.save(Path(tmp, f'x1_{n}.npy'), x1)
            np.save(Path(tmp, f'x2_{n}.npy'), x2)
            for dtype in args.dtypes:
                for cross in (False, True):
                    name = f'{n}-{dtype}-{"cross" if cross else "self"}'
                    cases.append({'name': name, 'n': n, 'dtype': dtype, 'cross': cross,
                                  'x1': str(Path(tmp, f'x1_{n}.npy')),
                                  'x2': str(Path(tmp, f'x2_{n}.npy')) if cross else None,
                                  'out': str(Path(tmp, f'nt_{name}.npy'))})

        for case in tqdm(cases, desc='torchntk', file=sys.stderr):
            dtype = DTYPES[case['dtype']]
            x1 = torch.from_numpy(np.load(case['x1'])).to(dtype)
            x2 = None if case['x2'] is None else torch.from_numpy(np.load(case['x2'])).to(dtype)
            x2_or_x1 = x1 if x2 is None else x2
            with torch.inference_mode():
                ours_ms = median_ms(lambda: model.kernel_fn(x1, x2, get=GET),
                                    args.repeats, args.warmup)
                matmul_ms = median_ms(lambda: x1 @ x2_or_x1.T, args.repeats, args.warmup)
                out = model.kernel_fn(x1, x2, get=GET)
            block = slice(0, CHECK_BLOCK)
            flops = 2 * x1.shape[0] * x2_or_x1.shape[0] * FEATURES
            rows.append({'case': case, 'ours_ms': ours_ms, 'matmul_ms': matmul_ms,
                         'gflops': flops / matmul_ms / 1e6,
                         'ours_block': torch.stack([out.nngp[block, block],
                                                    out.ntk[block, block]])})

        nt_ms = {}
        if args.nt_python:
            for dtype in tqdm(args.dtypes, desc='neural-tangents', file=sys.stderr):
                nt_ms.update(neural_tangents_ms(
                    args.nt_python, dtype, [c for c in cases if c['dtype'] == dtype],
                    args.repeats, args.warmup))
            for row in rows:
                case = row['case']
                row['nt_ms'] = nt_ms[case['name']]
                row['rel_diff'] = max_relative_difference(row['ours_block'], np.load(case['out']))

    print(f'kernel_fn of Dense({WIDTH})-Relu-Dense({WIDTH})-Relu-Dense(10), '
          f'{FEATURES} features, get={GET}; median of {args.repeats} runs, '
          f'torch {torch.__version__}, {torch.get_num_threads()} threads')
    header = (f"{'N1 x N2':>11} {'x2':>5} {'dtype':>8} {'torchntk ms':>12} {'matmul ms':>10} "
              f"{'GFLOP/s':>8} {'x matmul':>9}")
    if nt_ms:
        header += f" {'nt ms':>9} {'torchntk/nt':>12} {'max rel diff':>13}"
    print(header)
    for row in rows:
        case = row['case']
        n = case['n']
        line = (f"{f'{n} x {n}':>11} {'x2' if case['cross'] else 'None':>5} {case['dtype']:>8} "
                f"{row['ours_ms']:>12.1f} {row['matmul_ms']:>10.1f} {row['gflops']:>8.1f} "
                f"{row['ours_ms'] / row['matmul_ms']:>9.2f}")
        if nt_ms:
            line += (f" {row['nt_ms']:>9.1f} {row['ours_ms'] / row['nt_ms']:>12.2f}"
                     f" {row['rel_diff']:>13.1e}")
        print(line)


if __name__ == '__main__':
    main()
