"""What the benchmark scripts share: timing, and running neural-tangents in its own venv."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from typing import Callable


def median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median wall time of `fn()` in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run_neural_tangents(python: str, script: str, spec: dict, single_thread: bool = False
                        ) -> list[dict]:
    """Run `script` with `python` (a venv with neural-tangents) on the CPU, `spec`
    as its JSON argument; return the JSON objects it prints, one per line.
    `single_thread` keeps XLA to one thread."""
    env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
    if single_thread:
        env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=false '
                            'intra_op_parallelism_threads=1').strip()
    proc = subprocess.run([python, '-c', script, json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f'neural-tangents ({python}) failed:\n{proc.stderr[-4000:]}')
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
