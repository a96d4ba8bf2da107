"""torchntk.estimate_memory bounds the memory a computation really takes: the
bytes the CPU allocator hands out (torch's profiler sees every allocation,
those inside operators too) and the resident memory of the process, on both
backends, with and without gradients, and for tiles too large to count."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch.autograd.profiler_util import MEMORY_EVENT_NAME
from torch.profiler import ProfilerActivity, profile

import torchntk as nt
from torchntk import stax
from torchntk.ops import extension

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cnn(W_std=1.):
    return stax.serial(stax.Conv(4, (3, 3), W_std=W_std, padding='SAME'), stax.Relu(),
                       stax.AvgPool((2, 2), (2, 2)), stax.Conv(4, (3, 3), padding='CIRCULAR'),
                       stax.Relu(), stax.Dense(1))


def mlp(W_std=1.5):
    return stax.serial(stax.Dense(8, W_std, 0.05), stax.Relu(), stax.Dense(8, 1.5, 0.05),
                       stax.Erf(), stax.Dense(1))


def allocated_peak(fn):
    """The most bytes of CPU memory allocated at once while `fn()` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = sorted((e for e in prof.profiler.kineto_results.events()
                          if e.name() == MEMORY_EVENT_NAME
                          and e.device_type() == torch.autograd.DeviceType.CPU),
                         key=lambda e: e.start_ns())
    current = peak = 0
    for allocation in allocations:
        current += allocation.nbytes()
        peak = max(peak, current)
    return peak


def test_a_tile_too_large_to_count_is_bounded_from_above(monkeypatch):
    model, x = cnn(), torch.randn(64, 3, 8, 8)
    estimate = nt.estimate_memory(model, (64, 3, 8, 8), None, ('nngp', 'ntk'), batch_size=64)
    assert estimate.extrapolated
    monkeypatch.setattr(extension, 'EXTENSION', None)  # the torch backend, layer by layer

    def tile():
        with torch.no_grad():
            model.kernel_fn(x.clone(), None, ('nngp', 'ntk'))

    assert estimate.tile_bytes >= allocated_peak(tile)


@pytest.mark.parametrize('model, shape, batch_size', [(cnn, (48, 3, 8, 8), 12),
                                                       (mlp, (1200, 20), 300)], ids=['cnn', 'mlp'])
def test_a_batched_run_allocates_at_most_a_tile_and_the_result(model, shape, batch_size,
                                                              monkeypatch):
    monkeypatch.setattr(extension, 'EXTENSION', None)  # the torch backend, layer by layer
    model, x = model(), torch.randn(*shape)
    estimate = nt.estimate_memory(model, shape, None, ('nngp', 'ntk'), batch_size=batch_size)
    assert estimate.tiles == 10
    allocated = allocated_peak(
        lambda: nt.batch(model, batch_size, progress=False)(x, None, ('nngp', 'ntk')))
    assert estimate.tile_bytes + estimate.output_bytes >= allocated


@pytest.mark.parametrize('model, shape', [(cnn, (6, 3, 8, 8)), (mlp, (300, 20))],
                         ids=['cnn', 'mlp'])
def test_a_call_with_gradients_is_counted_with_the_tensors_it_keeps(model, shape):
    W_std = torch.tensor(1.5, requires_grad=True)
    model, x = model(W_std), torch.randn(*shape)
    estimate = nt.estimate_memory(model, shape, None, ('nngp', 'ntk'))

    def call():
        model.kernel_fn(x.clone(), None, ('nngp', 'ntk'))[1].sum().backward()

    allocated = allocated_peak(call)
    assert W_std.grad is not None
    # The call itself, up to the 0-dim tensors that Python numbers become inside
    # operators, which the count does not see; with the allocator's share, the
    # backward pass on top of what the call keeps.
    forward = allocated_peak(lambda: model.kernel_fn(x.clone(), None, ('nngp', 'ntk')))
    assert estimate.tile_bytes >= forward - 1024
    assert estimate.total_bytes >= allocated


_RESIDENT = """
import json, sys, torch
import torchntk as nt
from tests.test_memory_estimate import cnn, mlp

def resident(field):
    with open('/proc/self/status') as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))

torch.set_num_threads(1)
model, shape, batch_size = eval(sys.argv[1])(), eval(sys.argv[2]), int(sys.argv[3])
x = torch.randn(*shape)
estimate = nt.estimate_memory(model, shape, None, ('nngp', 'ntk'), batch_size=batch_size)
model.kernel_fn(x[:2], None, ('nngp', 'ntk'))  # code paths, thread pools
before = resident('VmRSS:')
with open('/proc/self/clear_refs', 'w') as clear:
    clear.write('5')  # the peak starts again from here
if batch_size:
    out = nt.batch(model, batch_size, progress=False)(x, None, ('nngp', 'ntk'))
else:
    with torch.no_grad():
        out = model.kernel_fn(x, None, ('nngp', 'ntk'))
print(json.dumps({'estimate': estimate.total_bytes, 'resident': resident('VmHWM:') - before}))
"""


@pytest.mark.skipif(not os.access('/proc/self/clear_refs', os.W_OK),
                    reason='needs Linux /proc/self/clear_refs to reset the peak resident memory')
@pytest.mark.parametrize('model, shape, batch_size, backend', [
    ('cnn', (48, 3, 8, 8), 0, 'torch'), ('cnn', (48, 3, 8, 8), 0, 'extension'),
    ('mlp', (3000, 20), 0, 'torch'), ('mlp', (3000, 20), 0, 'extension'),
    ('mlp', (3000, 20), 750, 'torch')],
    ids=['cnn-torch', 'cnn-extension', 'mlp-torch', 'mlp-extension', 'mlp-tiled-torch'])
def test_the_estimate_bounds_the_peak_resident_memory(model, shape, batch_size, backend):
    if backend == 'extension' and extension.backend() != 'extension':
        pytest.skip('the extension is not built')
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', TORCHNTK_BACKEND=backend)
    result = subprocess.run([sys.executable, '-c', _RESIDENT, model, str(shape), str(batch_size)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.splitlines()[-1])
    assert measured['estimate'] >= measured['resident'], measured
