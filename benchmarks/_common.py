"""What the benchmark scripts share: timing, and running neural-tangents in its own venv."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from typing import Callable


def timings_ms(fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
    """Wall times of `repeats` calls `fn()` in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median wall time of `fn()` in milliseconds, after `warmup` untimed calls."""
    return statistics.median(timings_ms(fn, repeats, warmup))


# Runs a neural-tangents script once per request line on stdin, with the
# request as `spec` and a `cache` dict that lives as long as the process.
_DRIVER = """
import json, sys
code, cache = compile(sys.argv[1], "neural_tangents_script", "exec"), {}
for line in sys.stdin:
    exec(code, {"__name__": "neural_tangents_script", "spec": json.loads(line), "cache": cache})
    print(json.dumps({"done": True}), flush=True)
"""


class NeuralTangents:
    """A neural-tangents `script` run by `python` (a venv with neural-tangents)
    on the CPU in a process that stays up, so that its timings can alternate
    with ours: `run(spec)` executes the script with the globals `spec` and
    `cache` (kept between runs: jitted functions compile once) and returns the
    JSON objects it prints, one per line. `single_thread` keeps XLA to one
    thread."""

    def __init__(self, python: str, script: str, single_thread: bool = False):
        env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
        if single_thread:
            env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=false '
                                'intra_op_parallelism_threads=1').strip()
        self.python, self.stderr = python, tempfile.TemporaryFile(mode='w+')
        self.process = subprocess.Popen([python, '-c', _DRIVER, script], env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr)

    def run(self, spec: dict) -> list[dict]:
        self.process.stdin.write(json.dumps(spec) + '\n')
        self.process.stdin.flush()
        results = []
        for line in self.process.stdout:
            if line.startswith('{'):
                result = json.loads(line)
                if result == {'done': True}:
                    return results
                results.append(result)
        self.stderr.seek(0)
        raise RuntimeError(f'neural-tangents ({self.python}) failed:\n{self.stderr.read()[-4000:]}')

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
        self.stderr.close()

    def __enter__(self) -> 'NeuralTangents':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_neural_tangents(python: str, script: str, spec: dict, single_thread: bool = False
                        ) -> list[dict]:
    """The JSON objects `script` prints, run once with `spec` (`NeuralTangents`)."""
    with NeuralTangents(python, script, single_thread) as neural_tangents:
        return neural_tangents.run(spec)
