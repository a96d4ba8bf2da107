"""Kernels at scale with `torchntk.batch`: a 20000 x 20000 NNGP in tiles, its peak memory; torch.compile.

The network is Dense(512)-Relu-Dense(512)-Relu-Dense(10) (W_std=1.5,
b_std=0.05, as in bench_fc.py) on `N x 784` standard normal inputs, float32,
`x2=None`, get='nngp'.

Scale (default): `batch(model.kernel_fn, batch_size, memmap_dir=...)` computes
the N x N kernel in tiles (only those on and above the diagonal, on
`--device`) into a memory-mapped .npy file, in a fresh process that reports
its time and its peak resident memory (VmHWM, which counts the pages of the
memory-mapped result it touched) beside `estimate_memory`'s numbers: the
bound is the process before the run (Python, torch, the inputs) plus one tile,
the freed memory the allocator keeps (`MemoryEstimate.allocator_bytes`) and
the output. Rows spread over the result are checked against
untiled `kernel_fn(x[rows], x)`.

`--compile`: the same batched kernel on `--compile-size` examples, with
`model.kernel_fn` and with `torch.compile(model.kernel_fn)` (inductor; compiled
once per tile shape, so the first call's compile time is reported apart), on
the CPU: median time of the whole batched computation and the speedup.

    .venv/bin/python benchmarks/bench_batching.py                    # N = 20000, tiles of 2000
    .venv/bin/python benchmarks/bench_batching.py --size 4000 --batch-size 1000
    .venv/bin/python benchmarks/bench_batching.py --compile --size 0 # compile speedup only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import torchntk as nt
from torchntk import stax

from _common import median_ms

FEATURES = 784
WIDTH = 512
W_STD = 1.5
B_STD = 0.05
CHECK_ROWS = 16


def model() -> stax.Layer:
    return stax.serial(stax.Dense(WIDTH, W_std=W_STD, b_std=B_STD), stax.Relu(),
                       stax.Dense(WIDTH, W_std=W_STD, b_std=B_STD), stax.Relu(),
                       stax.Dense(10, W_std=W_STD, b_std=B_STD))


def inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(seed))


def memory_kib(field: str) -> int:
    """A `/proc/self/status` field (VmRSS, VmHWM) in KiB."""
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} not in /proc/self/status')


def scale_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: one batched computation, printed as JSON."""
    torch.set_num_threads(args.threads)
    net, x = model(), inputs(args.size, args.seed)
    estimate = nt.estimate_memory(net, tuple(x.shape), None, 'nngp', batch_size=args.batch_size)
    torch.empty(1, device=args.device)  # a GPU's runtime takes host memory when it starts
    before_kib = memory_kib('VmRSS')
    start = time.perf_counter()
    kernel = nt.batch(net, args.batch_size, device=args.device, memmap_dir=args.out_dir,
                      progress=args.progress)(x, None, 'nngp')
    seconds = time.perf_counter() - start
    peak_kib = memory_kib('VmHWM')
    rows = torch.linspace(0, args.size - 1, CHECK_ROWS).long()
    exact = net.kernel_fn(x[rows], x, 'nngp')
    error = float(((kernel[rows] - exact).abs().max() / exact.abs().max()))
    print(json.dumps({'seconds': seconds, 'before_kib': before_kib, 'peak_kib': peak_kib,
                      'tile_bytes': estimate.tile_bytes, 'output_bytes': estimate.output_bytes,
                      'allocator_bytes': estimate.allocator_bytes,
                      'tiles': estimate.tiles, 'extrapolated': estimate.extrapolated,
                      'max_rel_error': error}))


def scale(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as out_dir:
        command = [sys.executable, __file__, '--child', '--out-dir', out_dir, '--size',
                   str(args.size), '--batch-size', str(args.batch_size), '--threads',
                   str(args.threads), '--seed', str(args.seed), '--device', args.device]
        if args.progress:
            command.append('--progress')
        proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        result = json.loads(proc.stdout.splitlines()[-1])
    mib = 2**20
    before, peak = result['before_kib'] / 1024, result['peak_kib'] / 1024
    tile, output = result['tile_bytes'] / mib, result['output_bytes'] / mib
    allocator = result['allocator_bytes'] / mib
    tiles = result['tiles']
    print(f"NNGP {args.size} x {args.size} float32 (x2=None), tiles of {args.batch_size}: "
          f"{tiles} tiles on {args.device}, {args.threads} threads")
    print(f"  time                  {result['seconds']:8.1f} s   ({tiles / result['seconds']:.2f} tiles/s)")
    print(f"  RSS before the run    {before:8.0f} MiB  (Python, torch, inputs)")
    print(f"  estimate: one tile    {tile:8.0f} MiB{'  (extrapolated)' if result['extrapolated'] else ''}")
    print(f"  estimate: output      {output:8.0f} MiB  (memory-mapped file)")
    print(f"  estimate: allocator   {allocator:8.0f} MiB  (freed blocks it keeps)")
    print(f"  bound                 {before + tile + allocator + output:8.0f} MiB  "
          "(before + tile + allocator + output)")
    print(f"  peak RSS (VmHWM)      {peak:8.0f} MiB  ({peak - before:.0f} MiB above before)")
    print(f"  max rel error of {CHECK_ROWS} rows against untiled kernel_fn: {result['max_rel_error']:.1e}")


def compile_speedup(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    net, x = model(), inputs(args.compile_size, args.seed)
    plain = nt.batch(net.kernel_fn, args.compile_batch_size, progress=False)
    compiled = nt.batch(torch.compile(net.kernel_fn), args.compile_batch_size, progress=False)
    start = time.perf_counter()
    first = compiled(x, None, 'nngp')
    first_seconds = time.perf_counter() - start
    reference = plain(x, None, 'nngp')
    error = float((first - reference).abs().max() / reference.abs().max())
    eager_ms = median_ms(lambda: plain(x, None, 'nngp'), args.repeats, warmup=1)
    compiled_ms = median_ms(lambda: compiled(x, None, 'nngp'), args.repeats, warmup=1)
    print(f"torch.compile (inductor, CPU, {args.threads} threads): NNGP {args.compile_size} x "
          f"{args.compile_size} float32, tiles of {args.compile_batch_size}, median of {args.repeats}")
    print(f"  first compiled call   {first_seconds:8.1f} s   (compiles each tile shape)")
    print(f"  kernel_fn             {eager_ms:8.0f} ms")
    print(f"  torch.compile         {compiled_ms:8.0f} ms   speedup {eager_ms / compiled_ms:.2f}x")
    print(f"  max rel diff compiled vs eager: {error:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=20000, help='N (0: skip the scale run)')
    parser.add_argument('--batch-size', type=int, default=2000, help='tile size of the scale run')
    parser.add_argument('--threads', type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument('--device', default='cpu', help="where the scale run's tiles are computed")
    parser.add_argument('--compile', action='store_true', help='also measure torch.compile')
    parser.add_argument('--compile-size', type=int, default=4000)
    parser.add_argument('--compile-batch-size', type=int, default=1000)
    parser.add_argument('--repeats', type=int, default=3, help='timed runs of --compile (median)')
    parser.add_argument('--tmp', help='directory for the memory-mapped result (default: $TMPDIR)')
    parser.add_argument('--progress', action='store_true', help='show the tiles progress bar')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--out-dir', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        scale_child(args)
        return
    if args.size:
        scale(args)
    if args.compile:
        compile_speedup(args)


if __name__ == '__main__':
    main()
