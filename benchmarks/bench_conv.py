"""Time `kernel_fn` of deep CNNs (full spatial covariance) for both torchntk backends and neural-tangents.

The networks (neural-tangents' README benchmark, and Myrtle-5):

    pooled   21 x [Conv(256, 3x3, SAME) - Relu] - GlobalAvgPool - Dense(10)
    flatten  21 x [Conv(256, 3x3, SAME) - Relu] - Flatten - Dense(10)
    myrtle5  Myrtle-5 (Shankar et al. 2020): 2 x [Conv-Relu] - AvgPool(2) -
             [Conv-Relu] - AvgPool(2) - [Conv-Relu] - AvgPool(2) until 1x1 -
             Flatten - Dense(10)

with W_std=1.5, b_std=0.05, on N x 3 x S x S inputs, get=('nngp', 'ntk'),
x2=None (an N x N kernel). Every case runs in its own subprocess (so that peak
memory is its own): torchntk with TORCHNTK_BACKEND=extension and =torch, and
with `--nt-python` neural-tangents (the same network, NHWC inputs, jitted,
warmed up, float64 through jax_enable_x64).

Columns: `ms/entry` is the median time of one kernel_fn call divided by N²;
`peak MiB` the growth of the process' peak resident memory over what it held
before the first call; `x nt` how many times faster than neural-tangents;
`x floor` how far above the arithmetic floor. The floor counts only the
convolutions' sums: a Conv layer writes E = N² S_out⁴ covariance entries of
nngp and of ntk (N² S_out² in `flatten`, whose covariances are diagonal in
space), each the sum of k entries along each of its 2 spatial dimensions, so
2·2·k = 12 adds per entry (neural-tangents' dense k x k
convolution does 2k² = 18 multiply-adds per entry and dimension pair);
nonlinearities and pooling are not counted. With x2=None the kernel is
symmetric (cov[j, i, x', x, …] = cov[i, j, x, x', …]), and only its distinct
entries count, N²/2 of the N² pairs' worth (torchntk computes no more: the
pairs i < j, and half of each pair (i, i)). It is priced at the machine's
vector add throughput, measured here as torch's in-place add on vectors that
fit in L2 cache, on all threads (with `--device cuda`: on the GPU, its peak
memory being torch's peak allocation there), at the start and again before
each case: the highest so far prices the case, so that a busy moment does not
lower the floor.

    .venv/bin/python benchmarks/bench_conv.py --nt-python /work/venvs/nt/bin/python
    python benchmarks/bench_conv.py --device cuda --n 16      # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

W_STD = 1.5
B_STD = 0.05
DEPTH = 21
WIDTH = 256
MODELS = ('pooled', 'flatten', 'myrtle5')
DTYPES = ('float32', 'float64')
# Examples per case (the kernel is N x N): the full covariance holds N² S⁴ entries.
DEFAULT_N = {8: 8, 16: 4, 32: 2}


def myrtle_blocks(size: int) -> tuple[list[int], int]:
    """Conv-Relu pairs per stage of Myrtle-5 (a 2x2 pool follows each stage
    but the last), and the number of final 2x2 pools that bring the last stage
    to 1x1 (3 on 32x32, as in neural-tangents)."""
    return [2, 1, 1], size.bit_length() - 1 - 2


def conv_entries(model: str, size: int) -> int:
    """Covariance entries per pair of examples that the Conv layers write, for the floor."""
    if model == 'flatten':
        return DEPTH * size**2
    if model == 'pooled':
        return DEPTH * size**4
    blocks, _ = myrtle_blocks(size)
    return sum(count * (size >> stage)**4 for stage, count in enumerate(blocks))


# --- the torchntk worker -----------------------------------------------------------------------

def torchntk_model(model: str, size: int):
    from torchntk import stax
    conv = lambda: stax.Conv(WIDTH, (3, 3), padding='SAME', W_std=W_STD, b_std=B_STD)  # noqa: E731
    if model in ('pooled', 'flatten'):
        layers = [layer for _ in range(DEPTH) for layer in (conv(), stax.Relu())]
        top = stax.GlobalAvgPool() if model == 'pooled' else stax.Flatten()
        return stax.serial(*layers, top, stax.Dense(10, W_std=W_STD, b_std=B_STD))
    blocks, final_pools = myrtle_blocks(size)
    layers = []
    for stage, count in enumerate(blocks):
        if stage:
            layers.append(stax.AvgPool((2, 2), strides=(2, 2)))
        layers += [layer for _ in range(count) for layer in (conv(), stax.Relu())]
    layers += [stax.AvgPool((2, 2), strides=(2, 2)) for _ in range(final_pools)]
    return stax.serial(*layers, stax.Flatten(), stax.Dense(10, W_std=W_STD, b_std=B_STD))


def resident_mib() -> float:
    with open('/proc/self/statm') as statm:
        return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def torchntk_worker(spec: dict) -> None:
    import torch
    from torchntk import ops
    dtype, device = getattr(torch, spec['dtype']), torch.device(spec['device'])
    model = torchntk_model(spec['model'], spec['size'])
    x = torch.from_numpy(np.load(spec['x'])).to(device, dtype)
    baseline = resident_mib()
    times = []
    with torch.inference_mode():
        for run in range(spec['warmup'] + spec['repeats']):
            start = time.perf_counter()
            out = model.kernel_fn(x, None, get=('nngp', 'ntk'))
            synchronize(device)
            if run >= spec['warmup']:
                times.append(time.perf_counter() - start)
    np.save(spec['out'], out.ntk.double().cpu().numpy())
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == 'cuda'
            else peak_mib() - baseline)
    print(json.dumps({'times': times, 'peak_mib': peak, 'backend': ops.backend(),
                      'threads': torch.get_num_threads()}), flush=True)


def synchronize(device) -> None:
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


# --- the neural-tangents worker ----------------------------------------------------------------

NT_SCRIPT = textwrap.dedent('''
    import json, os, resource, sys, time
    import numpy as np
    spec = json.loads(sys.argv[1])
    import jax
    if spec["dtype"] == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from neural_tangents import stax

    def resident_mib():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    conv = lambda: stax.Conv(spec["width"], (3, 3), padding="SAME", W_std=spec["W_std"],
                             b_std=spec["b_std"])
    dense = stax.Dense(10, W_std=spec["W_std"], b_std=spec["b_std"])
    if spec["model"] in ("pooled", "flatten"):
        layers = [l for _ in range(spec["depth"]) for l in (conv(), stax.Relu())]
        layers.append(stax.GlobalAvgPool() if spec["model"] == "pooled" else stax.Flatten())
    else:
        layers = []
        for stage, count in enumerate(spec["blocks"]):
            if stage:
                layers.append(stax.AvgPool((2, 2), strides=(2, 2)))
            layers += [l for _ in range(count) for l in (conv(), stax.Relu())]
        layers += [stax.AvgPool((2, 2), strides=(2, 2)) for _ in range(spec["final_pools"])]
        layers.append(stax.Flatten())
    _, _, kernel_fn = stax.serial(*layers, dense)
    kernel_fn = jax.jit(kernel_fn, static_argnames="get")
    # NCHW -> NHWC, neural-tangents' layout.
    x = jnp.asarray(np.load(spec["x"]).transpose(0, 2, 3, 1), dtype=spec["dtype"])
    baseline = resident_mib()
    times = []
    for run in range(spec["warmup"] + spec["repeats"]):
        start = time.perf_counter()
        out = kernel_fn(x, None, get=("nngp", "ntk"))
        out.ntk.block_until_ready()
        if run >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    np.save(spec["out"], np.asarray(out.ntk, dtype=np.float64))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"times": times, "peak_mib": peak - baseline}), flush=True)
''')


# --- the driver --------------------------------------------------------------------------------

def run_worker(command: list[str], env: dict) -> dict:
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f'{command[0]} failed:\n{proc.stderr[-4000:]}')
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith('{')][-1])


def add_throughput(dtype: str, device: str) -> float:
    """Adds per second of torch's in-place add on L2-resident vectors, all
    threads (on a GPU: 16 MiB vectors, inside its L2): the best of several
    trials, so that a busy machine does not lower the floor. On the CPU each
    thread adds two 512 KiB slices: with less, each add's fork and join of the
    threads takes a visible share of its time (float32 read ~15 % slower at
    256 KiB on the 2-core machine)."""
    import torch
    device = torch.device(device)
    dtype = getattr(torch, dtype)
    size = (2**24 if device.type == 'cuda' else torch.get_num_threads() * 2**19) \
        // dtype.itemsize
    a = torch.ones(size, dtype=dtype, device=device)
    b = torch.ones_like(a)
    reps = 200
    best = float('inf')
    for _ in range(7):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            a.add_(b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return a.numel() * reps / best


def device_name(device: str) -> str:
    import torch
    if torch.device(device).type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'the CPU, {torch.get_num_threads()} threads'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', choices=MODELS, default=['pooled', 'flatten'])
    parser.add_argument('--sizes', type=int, nargs='+', default=[8, 16, 32],
                        help='input sizes S (inputs are 3 x S x S)')
    parser.add_argument('--dtypes', nargs='+', choices=DTYPES, default=list(DTYPES))
    parser.add_argument('--n', type=int, help=f'examples per case (default {DEFAULT_N})')
    parser.add_argument('--backends', nargs='+', choices=('extension', 'torch'),
                        default=['extension', 'torch'])
    parser.add_argument('--repeats', type=int, default=2, help='timed runs per case (median)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed runs before timing')
    parser.add_argument('--nt-python', help='python of a venv with neural-tangents')
    parser.add_argument('--device', default='cpu', help="torchntk's device (neural-tangents "
                        "always runs on the CPU)")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torchntk_worker(json.loads(args.worker))
        return

    import torch
    from tqdm import tqdm

    rng = np.random.default_rng(args.seed)
    throughput = {dtype: add_throughput(dtype, args.device) for dtype in args.dtypes}
    libraries = list(args.backends) + (['nt'] if args.nt_python else [])
    print(f'kernel_fn, get=(nngp, ntk), x2=None, median of {args.repeats} runs after '
          f'{args.warmup} warm-up; torch {torch.__version__} on {device_name(args.device)}; '
          + ', '.join(f'{d} add throughput {throughput[d] / 1e9:.1f} G/s' for d in args.dtypes)
          + ' at the start (each floor: the highest up to its case)')
    header = f"{'model':>8} {'input':>8} {'dtype':>8} {'N':>3} {'floor ms':>9}"
    for library in libraries:
        header += f" {library + ' ms/entry':>19} {'peak MiB':>9}"
    header += ''.join(f" {b + ' x nt':>14}" for b in args.backends if 'nt' in libraries)
    header += ''.join(f" {b + ' x floor':>17}" for b in args.backends)
    if 'nt' in libraries:
        header += f" {'ntk rel diff':>12}"
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(model, size, dtype) for model in args.models for size in args.sizes
                 for dtype in args.dtypes]
        progress = tqdm(total=len(cases) * len(libraries), file=sys.stderr)
        for model, size, dtype in cases:
            n = args.n or DEFAULT_N.get(size, 2)
            x_path = str(Path(tmp, f'x_{size}_{n}.npy'))
            np.save(x_path, rng.standard_normal((n, 3, size, size)))
            blocks, final_pools = myrtle_blocks(size)
            spec = {'model': model, 'size': size, 'dtype': dtype, 'x': x_path,
                    'repeats': args.repeats, 'warmup': args.warmup, 'width': WIDTH,
                    'depth': DEPTH, 'W_std': W_STD, 'b_std': B_STD, 'blocks': blocks,
                    'final_pools': final_pools, 'device': args.device}
            results = {}
            for library in libraries:
                progress.set_description(f'{model} {size}x{size} {dtype} {library}')
                out = str(Path(tmp, f'{library}.npy'))
                if library == 'nt':
                    env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
                    command = [args.nt_python, '-c', NT_SCRIPT, json.dumps({**spec, 'out': out})]
                else:
                    env = dict(os.environ, TORCHNTK_BACKEND=library)
                    command = [sys.executable, __file__, '--worker',
                               json.dumps({**spec, 'out': out})]
                result = run_worker(command, env)
                result['ms_per_entry'] = 1e3 * statistics.median(result['times']) / n**2
                result['ntk'] = np.load(out)
                results[library] = result
                progress.update()
            throughput[dtype] = max(throughput[dtype], add_throughput(dtype, args.device))
            adds = n**2 / 2 * conv_entries(model, size) * 12   # distinct entries (x2=None)
            floor_ms = 1e3 * adds / throughput[dtype] / n**2
            line = f"{model:>8} {f'3x{size}x{size}':>8} {dtype:>8} {n:>3} {floor_ms:>9.3g}"
            for library in libraries:
                line += f" {results[library]['ms_per_entry']:>19.2f} {results[library]['peak_mib']:>9.0f}"
            if 'nt' in libraries:
                line += ''.join(f" {results['nt']['ms_per_entry'] / results[b]['ms_per_entry']:>14.2f}"
                                for b in args.backends)
            line += ''.join(f" {results[b]['ms_per_entry'] / floor_ms:>17.1f}" for b in args.backends)
            if 'nt' in libraries:
                theirs = results['nt']['ntk']
                ours = results[args.backends[0]]['ntk']
                line += f" {np.abs(ours - theirs).max() / np.abs(theirs).max():>12.1e}"
            progress.write(line, file=sys.stdout)
        progress.close()


if __name__ == '__main__':
    main()
