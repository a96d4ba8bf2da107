"""torchntk.batch: tiled kernels equal untiled ones; memory estimates; checkpoints
that survive SIGKILL, damage and concurrent runs; several processes (gloo)."""

import collections
import dataclasses
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import torchntk as nt
from torchntk import stax
from torchntk.batching import memory, tiling
from torchntk.ops import conv_chain

from tests.strategies import gaussian
from tests.test_compile import mlp

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cnn():
    """Full spatial covariances all the way: outputs (N1, N2, 3, 3, 3, 3)."""
    return stax.serial(stax.Conv(4, (3, 3), padding='SAME'), stax.Relu(),
                       stax.AvgPool((2, 2), (2, 2)), stax.Conv(4, (3, 3), padding='CIRCULAR'),
                       stax.Relu(), stax.Dense(1))


def locally_connected():
    """Only same-position covariances: outputs (N1, N2, 4, 4)."""
    return stax.serial(stax.ConvLocal(4, (3, 3), padding='SAME', b_std=0.1), stax.Gelu(),
                       stax.ConvLocal(1, (3, 3), padding='SAME'))


def assert_same(tiled, untiled):
    """Equal to rounding (float64): tensors, named tuples, Kernels, lists of those."""
    if isinstance(untiled, (list, tuple)) and not hasattr(untiled, '_fields'):
        assert type(tiled) is type(untiled) and len(tiled) == len(untiled)
        for a, b in zip(tiled, untiled):
            assert_same(a, b)
        return
    if isinstance(untiled, torch.Tensor):
        assert isinstance(tiled, torch.Tensor) and tiled.shape == untiled.shape
        tiled, untiled = tiled.detach(), untiled.detach()
        if untiled.dtype == torch.bool:
            assert torch.equal(tiled, untiled)
        else:
            torch.testing.assert_close(tiled, untiled, rtol=1e-12, atol=1e-12 * untiled.abs().max())
        return
    if isinstance(untiled, nt.Kernel):
        assert isinstance(tiled, nt.Kernel)
        fields = {f.name: (getattr(tiled, f.name), getattr(untiled, f.name))
                  for f in dataclasses.fields(untiled)}
    else:
        assert type(tiled) is type(untiled)
        fields = {name: (getattr(tiled, name), getattr(untiled, name)) for name in untiled._fields}
    for name, (a, b) in fields.items():
        if isinstance(b, torch.Tensor):
            assert_same(a, b)
        else:
            assert a == b, name


# ----------------------------------------------------------------------------- exactness

GETS = ['nngp', 'ntk', ('nngp', 'ntk'), None]


@pytest.mark.parametrize('diagonal_batch', [None, False])
@pytest.mark.parametrize('with_x2', [False, True])
@pytest.mark.parametrize('get', GETS, ids=str)
def test_tiled_mlp_kernel_equals_untiled(get, with_x2, diagonal_batch):
    model = mlp()
    x1, x2 = gaussian(10, 5, seed=0), gaussian(7, 5, seed=1) if with_x2 else None
    untiled = model.kernel_fn(x1, x2, get, diagonal_batch=diagonal_batch)
    tiled = nt.batch(model.kernel_fn, 3, progress=False)(x1, x2, get,
                                                         diagonal_batch=diagonal_batch)
    assert_same(tiled, untiled)


@pytest.mark.parametrize('diagonal_spatial', [None, False])
@pytest.mark.parametrize('with_x2', [False, True])
@pytest.mark.parametrize('get', GETS, ids=str)
def test_tiled_cnn_kernel_with_spatial_axes_equals_untiled(get, with_x2, diagonal_spatial):
    model = cnn()
    x1, x2 = gaussian(5, 2, 6, 6, seed=2), gaussian(4, 2, 6, 6, seed=3) if with_x2 else None
    untiled = model.kernel_fn(x1, x2, get, diagonal_spatial=diagonal_spatial)
    tiled = nt.batch(model, 2, progress=False)(x1, x2, get, diagonal_spatial=diagonal_spatial)
    first = untiled if isinstance(untiled, torch.Tensor) else untiled[0] if get else untiled.nngp
    assert first.ndim == 6
    assert_same(tiled, untiled)


@pytest.mark.parametrize('get', ['ntk', None], ids=str)
def test_tiled_kernel_in_the_diagonal_spatial_layout_equals_untiled(get):
    model = locally_connected()
    x = gaussian(7, 3, 4, 4, seed=4)
    untiled = model.kernel_fn(x, None, get)
    assert (untiled if get else untiled.ntk).shape == (7, 7, 4, 4)
    assert_same(nt.batch(model.kernel_fn, 3, progress=False)(x, None, get), untiled)


def test_network_with_several_outputs_gives_a_list_of_tiled_kernels():
    model = stax.serial(stax.FanOut(2), stax.parallel(mlp(), stax.serial(stax.Dense(3), stax.Relu())))
    x1, x2 = gaussian(6, 5, seed=5), gaussian(5, 5, seed=6)
    for b in (None, x2):
        untiled = model.kernel_fn(x1, b, ('nngp', 'ntk'))
        assert isinstance(untiled, list) and len(untiled) == 2
        assert_same(nt.batch(model.kernel_fn, 4, progress=False)(x1, b, ('nngp', 'ntk')), untiled)


@pytest.mark.parametrize('trace_axes', [(-1,), ()], ids=['traced', 'untraced'])
def test_tiled_empirical_kernel_equals_untiled(trace_axes):
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    kernel_fn = nt.empirical_kernel_fn(net, trace_axes=trace_axes)
    x1, x2 = gaussian(7, 5, seed=7), gaussian(4, 5, seed=8)
    for b in (None, x2):
        untiled = kernel_fn(x1, b, None)
        assert_same(nt.batch(kernel_fn, 3, progress=False)(x1, b, None), untiled)


def test_x2_none_computes_only_the_tiles_on_and_above_the_diagonal():
    model, x = mlp(), gaussian(10, 5, seed=9)
    calls = []

    def kernel_fn(x1, x2, get):
        if not x1.is_meta:  # meta calls (the memory check) compute nothing
            calls.append((x1.shape[0], None if x2 is None else x2.shape[0]))
        return model.kernel_fn(x1, x2, get)

    nt.batch(kernel_fn, 3, progress=False)(x, None, 'ntk')
    tile_calls = calls[1:]  # the first is the one-example probe
    assert calls[0] == (1, None)
    # 4 row blocks (3, 3, 3, 1): 4 diagonal tiles with x2=None and 6 above the diagonal.
    expected = [(3, None)] * 3 + [(1, None)] + [(3, 3)] * 3 + [(3, 1)] * 3
    assert collections.Counter(tile_calls) == collections.Counter(expected)


def test_batch_size_zero_is_one_tile_and_larger_than_the_data_is_clipped():
    model, x1, x2 = mlp(), gaussian(5, 5, seed=10), gaussian(3, 5, seed=11)
    untiled = model.kernel_fn(x1, x2, 'ntk')
    for size in (0, 100):
        assert_same(nt.batch(model, size, progress=False)(x1, x2, 'ntk'), untiled)


def test_compiled_kernel_fn_is_batched_with_the_same_values():
    model, x = mlp(), gaussian(6, 5, seed=12)
    compiled = torch.compile(model.kernel_fn, fullgraph=True, backend='eager')
    untiled = model.kernel_fn(x, None, ('nngp', 'ntk'))
    assert_same(nt.batch(compiled, 3, progress=False)(x, None, ('nngp', 'ntk')), untiled)


# ----------------------------------------------------------------------------- layers that mix examples

@pytest.mark.parametrize('layer, name', [
    (lambda: stax.Dropout(0.3), 'Dropout'),
    (lambda: stax.LayerNorm(axis=(0, 1)), 'LayerNorm'),
])
def test_layers_that_mix_examples_are_refused_naming_the_layer(layer, name):
    model = stax.serial(stax.Dense(4), layer(), stax.Dense(1))
    with pytest.raises(ValueError, match=r'Serial\.1.*mix the examples'):
        nt.batch(model.kernel_fn, 2, progress=False)(gaussian(4, 3, seed=13), None, 'nngp')


def test_layer_norm_over_the_batch_axis_by_a_negative_index_is_refused():
    model = stax.serial(stax.Dense(4), stax.LayerNorm(axis=(-2, -1)), stax.Dense(1))  # (N, C): -2 is N
    with pytest.raises(ValueError, match='LayerNorm|Serial.1'):
        nt.batch(model, 2, progress=False)(gaussian(4, 3, seed=14), None, 'nngp')


def test_dropout_in_eval_mode_and_layer_norm_over_channels_are_tiled_exactly():
    model = stax.serial(stax.Dense(4), stax.LayerNorm(axis=1), stax.Dropout(0.3), stax.Relu(),
                        stax.Dense(1)).eval()
    x = gaussian(7, 3, seed=15)
    assert_same(nt.batch(model, 3, progress=False)(x, None, 'ntk'), model.kernel_fn(x, None, 'ntk'))


def test_a_model_reached_through_a_closure_is_checked_too():
    model = stax.serial(stax.Dense(4), stax.Dropout(0.5), stax.Dense(1))

    def kernel_fn(x1, x2):
        return model.kernel_fn(x1, x2, 'nngp')

    with pytest.raises(ValueError, match='Dropout|mix the examples'):
        nt.batch(kernel_fn, 2, progress=False)(gaussian(4, 3, seed=16))


def test_empirical_kernel_of_a_network_with_batch_norm_in_training_mode_is_refused():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    with pytest.raises(ValueError, match='mix the examples'):
        nt.batch(nt.empirical_kernel_fn(net), 2, progress=False)(gaussian(4, 3, seed=17), None, 'ntk')


def test_bad_arguments_raise_clear_errors():
    model = mlp()
    for size in (-1, 'big'):
        with pytest.raises(ValueError, match='batch_size'):
            nt.batch(model, size)
    for size in (1.5, True):
        with pytest.raises(TypeError, match='batch_size'):
            nt.batch(model, size)
    with pytest.raises(TypeError, match='callable'):
        nt.batch(42)
    with pytest.raises(ValueError, match='max_memory'):
        nt.batch(model, 2, max_memory=-5)
    kernel = model.kernel_fn(gaussian(2, 5, seed=0))
    with pytest.raises(TypeError, match='not a Kernel'):
        nt.batch(model, 2)(kernel)
    with pytest.raises(ValueError, match='different batch sizes'):
        nt.batch(model, 2)([gaussian(2, 5, seed=0), gaussian(3, 5, seed=0)])


def test_arguments_of_a_wrong_type_are_type_errors_naming_them():
    model = mlp()
    wrong = {'progress': 'no', 'store_on_device': 1, 'max_memory': '1GB', 'device': 1.5,
             'checkpoint': 3, 'memmap_dir': b'dir'}
    for name, value in wrong.items():
        with pytest.raises(TypeError, match=rf'^batch: {name} must be'):
            nt.batch(model, 2, **{name: value})


# ----------------------------------------------------------------------------- memory

def test_live_bytes_counts_the_peak_of_tensors_alive_at_once():
    with memory.LiveBytes() as counter:
        a = torch.empty(1000, dtype=torch.float64, device='meta')   # 8000 bytes
        b = a * 2                                                   # 16000 alive
        view = b[:10]                                               # a view: no new bytes
        del a
        c = torch.empty(500, dtype=torch.float32, device='meta')    # 8000 + 2000 alive
        assert counter.current == 10000
        del b, view, c
    assert counter.peak == 16000 and counter.current == 0


@pytest.mark.parametrize('model, shape, size', [(mlp, (120, 5), 40), (cnn, (6, 2, 6, 6), 3)],
                         ids=['mlp', 'cnn'])
def test_memory_estimate_equals_the_tensors_of_a_real_tile(model, shape, size, monkeypatch):
    model = model()
    estimate = nt.estimate_memory(model, shape, shape, get=('nngp', 'ntk'), dtype=torch.float64,
                                  batch_size=size)
    x1, x2 = gaussian(*shape, seed=18), gaussian(*shape, seed=19)

    def real_peak():
        with torch.no_grad(), memory.LiveBytes() as counter:
            a, b = x1[:size].clone(), x2[:size].clone()
            out = model.kernel_fn(a, b, ('nngp', 'ntk'))
            del a, b, out
        return counter.peak

    # The extension's fused Conv/ReLU chain needs less than the layers one by one.
    assert real_peak() <= estimate.tile_bytes
    monkeypatch.setattr(conv_chain, 'available', lambda tensor: False)
    # Meta and real runs of the layers differ only in a few scalar constants.
    assert abs(estimate.tile_bytes - real_peak()) <= 256 < 0.01 * estimate.tile_bytes
    full = model.kernel_fn(x1, x2, ('nngp', 'ntk'))
    assert estimate.output_bytes == sum(t.numel() * t.element_size() for t in full)
    assert estimate.tiles == (shape[0] // size) ** 2 and estimate.batch_size == size


def test_memory_of_large_tiles_is_extrapolated_from_measured_ones_from_above(monkeypatch):
    model = mlp()
    exact = nt.estimate_memory(model, (1200, 5), None, 'ntk', batch_size=1200)
    # A 1200-example tile takes ~350 meta operations (more row blocks), 600 ~230.
    monkeypatch.setattr(memory.Estimator, 'MAX_OPERATIONS', 250)
    extrapolated = nt.estimate_memory(model, (1200, 5), None, 'ntk', batch_size=1200)
    assert extrapolated.extrapolated and not exact.extrapolated
    # From above: (1200 / b)² times a measured tile of b examples, which holds
    # its row blocks whole where a 1200 one does not.
    assert exact.tile_bytes <= extrapolated.tile_bytes


def test_auto_batch_size_is_the_largest_tile_that_fits_max_memory():
    model, x = mlp(), gaussian(50, 5, seed=20)
    budget = nt.estimate_memory(model, (50, 5), None, 'nngp', batch_size=13,
                                dtype=torch.float64).total_bytes
    chosen = []
    original = tiling.Tiles.__init__

    def spy(self, plan, x1, x2, batch_size, *rest):
        chosen.append(batch_size)
        original(self, plan, x1, x2, batch_size, *rest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiling.Tiles, '__init__', spy)
        tiled = nt.batch(model, 'auto', max_memory=budget, progress=False)(x, None, 'nngp')
    assert_same(tiled, model.kernel_fn(x, None, 'nngp'))
    b = chosen[0]
    assert b >= 13
    assert nt.estimate_memory(model, (50, 5), None, 'nngp', batch_size=b,
                              dtype=torch.float64).total_bytes <= budget
    assert nt.estimate_memory(model, (50, 5), None, 'nngp', batch_size=b + 1,
                              dtype=torch.float64).total_bytes > budget


def test_auto_batch_size_resumes_a_checkpoint_with_its_own_tile_size(tmp_path, monkeypatch):
    model, x = mlp(), gaussian(30, 5, seed=34)
    budget = nt.estimate_memory(model, (30, 5), None, 'nngp', batch_size=7,
                                dtype=torch.float64).total_bytes
    nt.batch(model, 'auto', max_memory=budget, checkpoint=tmp_path, progress=False)(x, None, 'nngp')
    computed = counting_compute(monkeypatch)
    kernel = nt.batch(model, 'auto', max_memory=4 * budget, checkpoint=tmp_path,
                      progress=False)(x, None, 'nngp')
    assert computed == []
    assert_same(kernel, model.kernel_fn(x, None, 'nngp'))


def test_a_computation_that_cannot_fit_says_so_before_computing_any_tile():
    model, x = mlp(), gaussian(40, 5, seed=21)
    calls = []

    def kernel_fn(x1, x2, get):
        if not x1.is_meta:
            calls.append(x1.shape)
        return model.kernel_fn(x1, x2, get)

    with pytest.raises(MemoryError, match=r'GiB.*more than the .*GiB'):
        nt.batch(kernel_fn, 10, max_memory=1000, progress=False)(x, None, 'nngp')
    with pytest.raises(MemoryError, match='even a tile of one example'):
        nt.batch(kernel_fn, 'auto', max_memory=1000, progress=False)(x, None, 'nngp')
    assert all(shape[0] == 1 for shape in calls)  # only one-example probes ran


def test_memmap_dir_holds_the_result_in_npy_files(tmp_path):
    import numpy as np
    model, x = mlp(), gaussian(9, 5, seed=22)
    kernel = nt.batch(model, 4, memmap_dir=tmp_path, progress=False)(x, None, ('nngp', 'ntk'))
    untiled = model.kernel_fn(x, None, ('nngp', 'ntk'))
    assert_same(kernel, untiled)
    for name in ('nngp', 'ntk'):
        on_disk = np.load(tmp_path / f'{name}.npy', mmap_mode='r')
        np.testing.assert_array_equal(on_disk, getattr(kernel, name).numpy())


# ----------------------------------------------------------------------------- progress

def test_progress_bar_counts_tiles_and_is_silent_when_disabled(capsys):
    model, x = mlp(), gaussian(10, 5, seed=23)
    nt.batch(model, 3, progress=True)(x, None, 'nngp')
    err = capsys.readouterr().err
    assert '10/10' in err and 'tile' in err
    nt.batch(model, 3, progress=False)(x, None, 'nngp')
    assert capsys.readouterr().err == ''


# ----------------------------------------------------------------------------- checkpoints

def counting_compute(monkeypatch):
    """Record the tiles `batch` computes (not those it loads)."""
    computed = []
    original = tiling.Tiles.compute

    def compute(self, task):
        computed.append(task.name)
        return original(self, task)

    monkeypatch.setattr(tiling.Tiles, 'compute', compute)
    return computed


def test_a_finished_checkpoint_is_loaded_without_computing(tmp_path, monkeypatch):
    model, x1, x2 = mlp(), gaussian(8, 5, seed=24), gaussian(5, 5, seed=25)
    first = nt.batch(model, 3, checkpoint=tmp_path, progress=False)(x1, x2, None)
    assert len(list(tmp_path.glob('main-*.pt'))) == 3 * 2
    computed = counting_compute(monkeypatch)
    second = nt.batch(model, 3, checkpoint=tmp_path, progress=False)(x1, x2, None)
    assert computed == []
    assert_same(second, model.kernel_fn(x1, x2, None))
    assert_same(second, first)


def test_damaged_tile_files_are_detected_and_computed_again(tmp_path, monkeypatch):
    model, x = mlp(), gaussian(9, 5, seed=26)
    nt.batch(model, 3, checkpoint=tmp_path, progress=False)(x, None, 'ntk')
    files = sorted(tmp_path.glob('main-*.pt'))
    assert len(files) == 6
    truncated, corrupted = files[1], files[4]
    truncated.write_bytes(truncated.read_bytes()[:100])
    data = bytearray(corrupted.read_bytes())
    stored = torch.load(corrupted, weights_only=True)['values'][0].numpy().tobytes()
    data[data.index(stored) + 13] ^= 0x10  # one bit of one stored number
    corrupted.write_bytes(bytes(data))
    computed = counting_compute(monkeypatch)
    kernel = nt.batch(model, 3, checkpoint=tmp_path, progress=False)(x, None, 'ntk')
    assert sorted(computed) == sorted([truncated.stem, corrupted.stem])
    assert_same(kernel, model.kernel_fn(x, None, 'ntk'))


def test_a_checkpoint_of_another_computation_is_refused(tmp_path):
    model, x = mlp(), gaussian(6, 5, seed=27)
    nt.batch(model, 3, checkpoint=tmp_path, progress=False)(x, None, 'nngp')
    changes = {
        'x1': lambda: nt.batch(model, 3, checkpoint=tmp_path)(x + 1e-9, None, 'nngp'),
        'arguments': lambda: nt.batch(model, 3, checkpoint=tmp_path)(x, None, 'ntk'),
        'tiles': lambda: nt.batch(model, 2, checkpoint=tmp_path)(x, None, 'nngp'),
        'kernel_fn': lambda: nt.batch(stax.serial(stax.Dense(8, 1.5, 0.06), stax.Relu(), stax.Dense(1)),
                                      3, checkpoint=tmp_path)(x, None, 'nngp'),
    }
    for field, run in changes.items():
        with pytest.raises(ValueError, match=rf'belongs to another computation \(different {field}'):
            run()


def _slow_tiles(seconds):
    """Make each tile take at least `seconds` (in a worker process)."""
    original = tiling.Tiles.compute

    def compute(self, task):
        time.sleep(seconds)
        return original(self, task)

    tiling.Tiles.compute = compute


def kill_case():
    """The computation the kill and concurrency tests run in two processes."""
    return mlp(), gaussian(16, 5, seed=28), 2, ('nngp', 'ntk')


_WORKER = """
import sys, torch
from tests.test_batching import _slow_tiles, kill_case
import torchntk as nt
_slow_tiles(float(sys.argv[2]))
model, x, size, get = kill_case()
kernel = nt.batch(model, size, checkpoint=sys.argv[1], progress=False)(x, None, get)
torch.save(tuple(kernel), sys.argv[3])
"""


def start_worker(checkpoint, seconds_per_tile, result):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    return subprocess.Popen([sys.executable, '-c', _WORKER, str(checkpoint), str(seconds_per_tile),
                             str(result)], cwd=ROOT, env=env, stderr=subprocess.PIPE)


def wait_for(condition, process, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"worker ended early: {process.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(0.02)


def test_a_run_killed_at_a_random_moment_resumes_without_recomputing_finished_tiles(
        tmp_path, monkeypatch):
    model, x, size, get = kill_case()
    n_tiles = 8 * 9 // 2
    worker = start_worker(tmp_path, 0.1, tmp_path / 'unused.pt')
    wait_for(lambda: len(list(tmp_path.glob('main-*.pt'))) >= 3, worker)
    time.sleep(random.Random(os.getpid()).uniform(0, 0.1))  # anywhere within a tile
    worker.send_signal(signal.SIGKILL)
    assert worker.wait() == -signal.SIGKILL
    finished = {path.stem for path in tmp_path.glob('main-*.pt')}
    assert 3 <= len(finished) < n_tiles
    computed = counting_compute(monkeypatch)
    kernel = nt.batch(model, size, checkpoint=tmp_path, progress=False)(x, None, get)
    assert len(computed) == n_tiles - len(finished) and not finished & set(computed)
    assert not list(tmp_path.glob('.tmp-*'))
    assert_same(kernel, model.kernel_fn(x, None, get))


def test_a_second_run_on_a_checkpoint_in_use_is_refused_and_the_first_is_intact(
        tmp_path, monkeypatch):
    model, x, size, get = kill_case()
    result = tmp_path / 'result.pt'
    checkpoint = tmp_path / 'tiles'
    worker = start_worker(checkpoint, 0.05, result)
    wait_for(lambda: (checkpoint / 'meta.json').exists(), worker)
    with pytest.raises(RuntimeError, match=r'in use by another run \(pid'):
        nt.batch(model, size, checkpoint=checkpoint, progress=False)(x, None, get)
    assert worker.wait(timeout=60) == 0, worker.stderr.read().decode()[-2000:]
    untiled = model.kernel_fn(x, None, get)
    assert_same(type(untiled)(*torch.load(result)), untiled)
    computed = counting_compute(monkeypatch)
    assert_same(nt.batch(model, size, checkpoint=checkpoint, progress=False)(x, None, get), untiled)
    assert computed == []


# ----------------------------------------------------------------------------- several processes

def _distributed_worker(rank, world_size, rendezvous, directory):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{rendezvous}', rank=rank,
                            world_size=world_size)
    try:
        model, x1, x2 = cnn(), gaussian(5, 2, 6, 6, seed=29), gaussian(3, 2, 6, 6, seed=30)
        square = nt.batch(model, 2, progress=False, checkpoint=directory / 'tiles')(
            x1, None, ('nngp', 'ntk'))
        results = {'square': None if square is None else tuple(square),  # plain tuples pickle
                   'rectangle': nt.batch(model, 2, progress=False)(x1, x2, None)}
        torch.save({k: v if rank == 0 else v is None for k, v in results.items()},
                   directory / f'rank{rank}.pt')
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_single_process_kernel(tmp_path):
    # fork: the children start with torch already imported (seconds saved on two cores).
    processes = mp.start_processes(_distributed_worker, args=(2, tmp_path / 'rendezvous', tmp_path),
                                   nprocs=2, start_method='fork', join=False)
    deadline = time.monotonic() + 120
    while not processes.join(timeout=1):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail('the two gloo processes did not finish in 120 s')
    model, x1, x2 = cnn(), gaussian(5, 2, 6, 6, seed=29), gaussian(3, 2, 6, 6, seed=30)
    on_rank0 = torch.load(tmp_path / 'rank0.pt', weights_only=False)
    assert torch.load(tmp_path / 'rank1.pt', weights_only=False) == {'square': True,
                                                                       'rectangle': True}
    square = model.kernel_fn(x1, None, ('nngp', 'ntk'))
    assert_same(type(square)(*on_rank0['square']), square)
    assert_same(on_rank0['rectangle'], model.kernel_fn(x1, x2, None))
    assert len(list((tmp_path / 'tiles').glob('main-*.pt'))) == 3 * 4 // 2


# ----------------------------------------------------------------------------- GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@cuda
@pytest.mark.parametrize('store_on_device', [True, False])
def test_tiles_computed_on_the_gpu_equal_the_cpu_kernel(store_on_device):
    model, x = cnn(), gaussian(5, 2, 6, 6, seed=31)
    kernel = nt.batch(model, 2, device='cuda', store_on_device=store_on_device,
                      progress=False)(x, None, ('nngp', 'ntk'))
    assert kernel.ntk.device.type == ('cuda' if store_on_device else 'cpu')
    assert_same(type(kernel)(*(t.cpu() for t in kernel)), model.kernel_fn(x, None, ('nngp', 'ntk')))


@cuda
def test_memory_estimate_matches_the_gpu_allocator_peak(monkeypatch):
    monkeypatch.setattr(conv_chain, 'available', lambda tensor: False)  # the layers one by one
    model = cnn()
    x1, x2 = gaussian(8, 2, 6, 6, seed=32).cuda(), gaussian(8, 2, 6, 6, seed=33).cuda()
    estimate = nt.estimate_memory(model, tuple(x1.shape), tuple(x2.shape), 'ntk', batch_size=8,
                                  dtype=torch.float64)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        a, b = x1.clone(), x2.clone()
        out = model.kernel_fn(a, b, 'ntk')
    peak = torch.cuda.max_memory_allocated() - before
    del a, b, out
    assert estimate.tile_bytes <= peak <= 1.05 * estimate.tile_bytes + 2**20
