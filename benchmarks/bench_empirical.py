"""Time the empirical NTK implementations against torch.func's recipe and neural-tangents.

Two networks, float32, `x2` an independent batch of the same size:

* mlp: Linear(784, 512)-ReLU-Linear(512, 512)-ReLU-Linear(512, 10), batch 64;
* cnn: three Conv2d(·, 64, 3, padding=1)-ReLU on 3×16×16, flatten, Linear(·, 10), batch 32.

Timed: our `empirical_ntk_fn` with each implementation (vmap_axes=0), under
`torch.no_grad()` (no autograd graph through the kernel, as neither the
recipe, which differentiates detached parameters, nor neural-tangents keeps
one; it also lets float32 products run on oneDNN, `torchntk.ops.products`);
PyTorch's documented NTK recipe ("Neural Tangent Kernels" tutorial:
`vmap(jacrev(f))` per input, then `einsum` per parameter), timed first,
before any torchntk call, with glibc's default allocation, and again inside
`torchntk.ops.heap.reuse_heap` (large temporaries from reused heap memory,
as torchntk's kernels run); and, with
`--nt-python`, neural-tangents' jitted `empirical_ntk_fn` (vmap_axes=0) with each
of its implementations on the same architecture, in a subprocess of that
interpreter that stays up (stax, NHWC layout). Both `trace_axes=()` (the full
`(N1, N2, 10, 10)` kernel, the recipe's) and `trace_axes=(-1,)` are timed.

The two libraries take turns, `--rounds` times: the first round times every
implementation, the later ones what the summary compares (our `auto` and
neural-tangents' best), so that a slow spell of the machine falls on both.
Times are medians in milliseconds over all rounds; the summary gives our
`auto` against neural-tangents' best and the recipe (timed once). The load
average is printed before and after: timings taken beside other processes
are only comparable within a run, and `--threads 1` (both libraries on one
thread) is the steadier comparison on a busy machine, where PyTorch's
threads wait on each other. The speed of
PyTorch's float32 matrix product (`torch.mm`, MKL) is printed too: the
structured MLP kernel is mostly matrix products, which MKL runs at 60–80% of
XLA's speed on the AMD CPU we benchmark on (torchntk's contractions use
oneDNN's instead, `torchntk.ops.products`).

    .venv/bin/python benchmarks/bench_empirical.py --nt-python /work/venvs/nt/bin/python
    .venv/bin/python benchmarks/bench_empirical.py --implementations structured_derivatives auto
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import logging
import os
import statistics
import sys
import textwrap
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from tqdm import tqdm

import torchntk
from torchntk.ops.heap import reuse_heap

from _common import NeuralTangents, median_ms, timings_ms

NT_IMPLEMENTATIONS = {'jacobian_contraction': 1, 'ntk_vector_products': 2,
                      'structured_derivatives': 3, 'auto': 0}

NT_SCRIPT = textwrap.dedent('''
    import json, time
    import jax
    import jax.numpy as jnp
    import neural_tangents as nt
    from neural_tangents import stax

    def network(case):
        if case == "mlp":
            return stax.serial(stax.Dense(512), stax.Relu(), stax.Dense(512), stax.Relu(),
                               stax.Dense(10)), (64, 784)
        return stax.serial(*[layer for _ in range(3) for layer in
                             (stax.Conv(64, (3, 3), padding="SAME"), stax.Relu())],
                           stax.Flatten(), stax.Dense(10)), (32, 16, 16, 3)

    def kernel(case, trace_axes, implementation):
        """A call of the jitted kernel, compiled once per process (`cache`)."""
        key = (case, tuple(trace_axes), implementation)
        if key not in cache:
            (init_fn, apply_fn, _), shape = network(case)
            key1, key2, key3 = jax.random.split(jax.random.PRNGKey(0), 3)
            x1 = jax.random.normal(key1, shape, dtype=jnp.float32)
            x2 = jax.random.normal(key2, shape, dtype=jnp.float32)
            _, params = init_fn(key3, shape)
            fn = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=tuple(trace_axes),
                                             vmap_axes=0, implementation=implementation))
            cache[key] = lambda: fn(x1, x2, params).block_until_ready()
        return cache[key]

    for case, trace_axes, name in spec["runs"]:
        run = kernel(case, trace_axes, spec["implementations"][name])
        for _ in range(spec["warmup"]):
            run()
        times = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - start))
        print(json.dumps({"case": case, "trace_axes": trace_axes, "name": name,
                          "times": times}), flush=True)
''')


def mlp() -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10)), (64, 784)


def cnn() -> tuple[nn.Module, tuple[int, ...]]:
    layers = []
    for channels in (3, 64, 64):
        layers += [nn.Conv2d(channels, 64, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 16 * 16, 10)), (32, 3, 16, 16)


CASES = {'mlp': mlp, 'cnn': cnn}


def torch_func_recipe(model: nn.Module, trace_axes: tuple[int, ...]) -> Callable:
    """PyTorch's tutorial NTK: per-example Jacobians by vmap(jacrev), einsum per parameter."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f_single(params, x):
        return functional_call(model, params, (x[None],))[0]

    spec = 'Naf,Maf->NM' if trace_axes else 'Naf,Mbf->NMab'

    def ntk(x1, x2):
        jac1 = vmap(jacrev(f_single), (None, 0))(params, x1)
        jac2 = vmap(jacrev(f_single), (None, 0))(params, x2)
        jac1 = [j.flatten(2) for j in jac1.values()]
        jac2 = [j.flatten(2) for j in jac2.values()]
        result = sum(torch.einsum(spec, j1, j2) for j1, j2 in zip(jac1, jac2))
        return result / 10 if trace_axes else result
    return ntk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--nt-python', help='python of a neural-tangents environment')
    parser.add_argument('--cases', nargs='+', default=list(CASES), choices=list(CASES))
    parser.add_argument('--implementations', nargs='+', default=list(NT_IMPLEMENTATIONS),
                        choices=list(NT_IMPLEMENTATIONS),
                        help='implementations timed (ours and neural-tangents\')')
    parser.add_argument('--no-recipe', action='store_true', help="skip torch.func's recipe")
    parser.add_argument('--threads', type=int, help="PyTorch's threads (1: neural-tangents too)")
    parser.add_argument('--repeats', type=int, default=5, help='timed calls per round')
    parser.add_argument('--warmup', type=int, default=1, help='untimed calls before them')
    parser.add_argument('--rounds', type=int, default=3,
                        help='rounds alternating ours and neural-tangents (the first times '
                             'everything, the others what the summary compares)')
    args = parser.parse_args()

    load_before = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    samples = collections.defaultdict(list)
    problems = {}
    for case in args.cases:
        model, shape = CASES[case]()
        problems[case] = model, torch.randn(shape), torch.randn(shape)
    # The recipe first, with glibc's default allocation (torchntk's kernels
    # change its thresholds, ops.heap), then as torchntk runs it.
    for heap in ((False, True) if not args.no_recipe else ()):
        for case, (model, x1, x2) in problems.items():
            for trace_axes in ((), (-1,)):
                recipe = torch_func_recipe(model, trace_axes)
                context = reuse_heap if heap else contextlib.nullcontext

                def run_recipe():
                    with context():
                        return recipe(x1, x2)
                name = 'torch.func recipe' + (' (reuse_heap)' if heap else '')
                samples[case, trace_axes, name] = timings_ms(run_recipe, args.repeats,
                                                             args.warmup)
    ours = {}
    for case, (model, x1, x2) in problems.items():
        for trace_axes in ((), (-1,)):
            for implementation in args.implementations:
                fn = torchntk.empirical_ntk_fn(model, trace_axes=trace_axes,
                                               implementation=implementation)
                ours[case, trace_axes, f'torchntk {implementation}'] = \
                    torch.no_grad()(functools.partial(fn, x1, x2))
            if 'auto' in args.implementations:
                choice = auto_choice(ours[case, trace_axes, 'torchntk auto'])
                samples[case, trace_axes, f'(auto picks {choice})'] = [float('nan')]
    theirs = [(case, trace_axes, name) for case in args.cases for trace_axes in ((), (-1,))
              for name in args.implementations] if args.nt_python else []
    neural_tangents = (NeuralTangents(args.nt_python, NT_SCRIPT, args.threads == 1)
                       if args.nt_python else contextlib.nullcontext())
    with neural_tangents:
        for turn in tqdm(range(args.rounds), desc='rounds'):
            compared = {(*group, name) for group in groups(samples)
                        for name in compared_names(medians(samples), *group) if name}
            for key, run in ours.items():
                if turn == 0 or key in compared:
                    samples[key] += timings_ms(run, args.repeats, args.warmup)
            runs = [list(key) for key in theirs if turn == 0 or
                    (key[0], key[1], f'neural-tangents {key[2]}') in compared]
            if runs:
                spec = {'runs': runs, 'repeats': args.repeats, 'warmup': args.warmup,
                        'implementations': NT_IMPLEMENTATIONS}
                for r in neural_tangents.run(spec):
                    samples[r['case'], tuple(r['trace_axes']),
                            f"neural-tangents {r['name']}"] += r['times']

    times = medians(samples)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, vmap_axes=0, "
          f"median ms over {args.rounds} rounds of {args.repeats} calls (one for the recipe and "
          f"what the summary does not compare); load average {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; matrix product {matmul_gflops():.0f} GFLOP/s")
    print(f"{'case':5} {'trace_axes':10} {'implementation':45} {'ms':>10}")
    for (case, trace_axes, name), ms in sorted(times.items(), key=lambda kv: kv[0][:2]):
        print(f"{case:5} {str(tuple(trace_axes)):10} {name:45} {ms:10.1f}")
    print_summary(times)


def auto_choice(run: Callable) -> str:
    """The implementation `implementation='auto'` computes `run()` by, as
    `empirical_ntk_fn` logs it at DEBUG level (the last one tried)."""
    tried = []

    class Tried(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith('empirical_ntk_fn: implementation '):
                tried.append(record.args[0])

    logger, handler = logging.getLogger('torchntk.empirical'), Tried(logging.DEBUG)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        run()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return tried[-1]


def medians(samples: dict) -> dict:
    return {key: statistics.median(values) for key, values in samples.items()}


def groups(times: dict) -> list[tuple]:
    """The `(case, trace_axes)` pairs timed."""
    return sorted({key[:2] for key in times})


def compared_names(times: dict, case: str, trace_axes: tuple) -> tuple[str | None, str | None]:
    """Our `auto` (else our best) and neural-tangents' best, of those timed."""
    entries = {name: ms for (c, t, name), ms in times.items()
               if (c, t) == (case, trace_axes) and ms == ms}
    ours = {n: ms for n, ms in entries.items() if n.startswith('torchntk')}
    theirs = {n: ms for n, ms in entries.items() if n.startswith('neural-tangents')}
    best = 'torchntk auto' if 'torchntk auto' in ours else min(ours, key=ours.get, default=None)
    return best, min(theirs, key=theirs.get, default=None)


def matmul_gflops(n: int = 512) -> float:
    """PyTorch's float32 speed on a product of two `n × n` matrices."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_ms(lambda: a @ b, repeats=20, warmup=2) / 1e6


def print_summary(times: dict) -> None:
    """Our `auto` (else our best) against neural-tangents' best and the recipe, per case."""
    for case, trace_axes in groups(times):
        best, nt_best = compared_names(times, case, trace_axes)
        if best is None:
            continue
        ms = {name: times.get((case, trace_axes, name)) for name in (
            best, nt_best, 'torch.func recipe', 'torch.func recipe (reuse_heap)')}
        line = f"{case:5} {str(tuple(trace_axes)):10} ours ({best[9:]}) {ms[best]:.1f} ms"
        if nt_best:
            line += f"; neural-tangents' best ({nt_best[16:]}) / ours = {ms[nt_best] / ms[best]:.2f}"
        if ms['torch.func recipe'] is not None:
            line += (f"; recipe / ours = {ms['torch.func recipe'] / ms[best]:.2f} "
                     f"({ms['torch.func recipe (reuse_heap)'] / ms[best]:.2f} with reuse_heap)")
        print(line)


if __name__ == '__main__':
    sys.exit(main())
