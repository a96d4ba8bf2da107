"""torchntk.batch's files: memmap results of their own, free space checked,
no link followed in a checkpoint or memmap folder, and damaged or unwritable
checkpoints named with what to do."""

import errno
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

import torchntk as nt
from torchntk.batching import checkpoint

from tests.strategies import gaussian
from tests.test_batching import assert_same, counting_compute
from tests.test_compile import mlp


def run(checkpoint=None, memmap_dir=None, x=None, batch_size=3, get='nngp'):
    model = mlp()
    x = gaussian(7, 5, seed=60) if x is None else x
    kernel = nt.batch(model, batch_size, checkpoint=checkpoint, memmap_dir=memmap_dir,
                      progress=False)(x, None, get)
    return kernel, model.kernel_fn(x, None, get)


def planted_file(tmp_path):
    victim = tmp_path / 'victim.txt'
    victim.write_text('a file of the user')
    return victim


# ----------------------------------------------------------------------------- memmap_dir

def test_a_second_result_in_the_same_memmap_dir_leaves_the_first_unchanged(tmp_path):
    first, untiled = run(memmap_dir=tmp_path, x=gaussian(7, 5, seed=61))
    second, untiled_second = run(memmap_dir=tmp_path, x=gaussian(7, 5, seed=62))
    assert_same(first, untiled)
    assert_same(second, untiled_second)
    np.testing.assert_array_equal(np.load(tmp_path / 'kernel.npy'), second.numpy())


def test_a_memmap_dir_whose_disk_cannot_hold_the_result_is_refused_before_any_file(
        tmp_path, monkeypatch):
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, 'disk_usage',
                        lambda path: real._replace(free=7 * 7 * 8 - 1))  # one byte short
    computed = counting_compute(monkeypatch)
    with pytest.raises(OSError, match=r'needs 3\.65e-07 GiB .* 3\.64e-07 GiB are free') as error:
        run(memmap_dir=tmp_path / 'result')
    assert error.value.errno == errno.ENOSPC
    assert computed == [] and not (tmp_path / 'result').exists()


def test_a_full_disk_while_reserving_memmap_files_is_an_error_not_a_crash(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(os, 'posix_fallocate', full)
    with pytest.raises(OSError, match=r'memmap_dir .*kernel\.npy.*No space left'):
        run(memmap_dir=tmp_path)
    assert not (tmp_path / 'kernel.npy').exists()


def test_a_link_planted_as_a_memmap_file_is_replaced_not_followed(tmp_path):
    victim = planted_file(tmp_path)
    (tmp_path / 'result').mkdir()
    (tmp_path / 'result' / 'kernel.npy').symlink_to(victim)
    kernel, untiled = run(memmap_dir=tmp_path / 'result')
    assert victim.read_text() == 'a file of the user'
    assert not (tmp_path / 'result' / 'kernel.npy').is_symlink()
    assert_same(kernel, untiled)


# ----------------------------------------------------------------------------- links in checkpoints

def test_a_link_planted_as_the_checkpoint_lock_is_refused_and_not_followed(tmp_path):
    victim = planted_file(tmp_path)
    (tmp_path / 'tiles').mkdir()
    (tmp_path / 'tiles' / 'lock').symlink_to(victim)
    with pytest.raises(ValueError, match=r'tiles: lock is a symbolic link'):
        run(checkpoint=tmp_path / 'tiles')
    assert victim.read_text() == 'a file of the user'


def test_a_hard_link_planted_as_the_checkpoint_lock_is_refused_and_not_truncated(tmp_path):
    victim = planted_file(tmp_path)
    (tmp_path / 'tiles').mkdir()
    os.link(victim, tmp_path / 'tiles' / 'lock')
    with pytest.raises(ValueError, match=r'tiles: lock has 2 hard links'):
        run(checkpoint=tmp_path / 'tiles')
    assert victim.read_text() == 'a file of the user'


def test_a_link_planted_as_meta_json_is_refused_and_not_read(tmp_path):
    run(checkpoint=tmp_path / 'tiles')
    meta = tmp_path / 'tiles' / 'meta.json'
    copy = tmp_path / 'meta-copy.json'  # a valid meta.json: following it would resume
    meta.rename(copy)
    meta.symlink_to(copy)
    with pytest.raises(ValueError, match=r'tiles: meta\.json is a symbolic link'):
        run(checkpoint=tmp_path / 'tiles')


def test_a_link_planted_as_a_tile_is_refused_and_not_read(tmp_path):
    run(checkpoint=tmp_path / 'tiles')
    tile = sorted((tmp_path / 'tiles').glob('main-*.pt'))[1]
    copy = tmp_path / 'tile-copy.pt'  # the tile itself: following it would load it
    tile.rename(copy)
    tile.symlink_to(copy)
    with pytest.raises(ValueError, match=rf'tiles: {tile.name} is a symbolic link'):
        run(checkpoint=tmp_path / 'tiles')
    assert copy.exists()


# ----------------------------------------------------------------------------- damaged checkpoints

DAMAGED_META = {
    'truncated': (lambda text: text[:len(text) // 2], 'not JSON'),
    'not utf-8': (lambda text: '\udcff' + text, 'not JSON'),
    'a list': (lambda text: json.dumps([json.loads(text)]), 'a JSON list, not an object'),
    'no key': (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != 'key'}),
               'no key'),
    'batch_size text': (lambda text: json.dumps({**json.loads(text), 'batch_size': '3'}),
                        "batch_size is '3', expected an int >= 1"),
    'description list': (lambda text: json.dumps({**json.loads(text), 'description': []}),
                         'description is [], expected an object of strings'),
    'other format': (lambda text: json.dumps({**json.loads(text), 'format': 2}),
                     'format 2, this torchntk reads format 1'),
}


@pytest.mark.parametrize('batch_size', [3, 'auto'])
@pytest.mark.parametrize('damage', list(DAMAGED_META))
def test_a_damaged_meta_json_says_what_is_wrong_and_what_to_do(tmp_path, damage, batch_size):
    run(checkpoint=tmp_path)
    damaged, problem = DAMAGED_META[damage]
    meta = tmp_path / 'meta.json'
    meta.write_bytes(damaged(meta.read_text()).encode('utf-8', 'surrogateescape'))
    x = gaussian(7, 5, seed=60)
    with pytest.raises(ValueError, match=rf'checkpoint folder {re.escape(str(tmp_path))}: meta\.json '
                                         rf'is damaged \(.*{re.escape(problem)}.*\); delete the '
                                         'folder to start over'):
        nt.batch(mlp(), batch_size, checkpoint=tmp_path, max_memory=2**30,
                 progress=False)(x, None, 'nngp')


def test_a_directory_in_place_of_a_tile_is_refused_with_its_name(tmp_path):
    run(checkpoint=tmp_path)
    tile = sorted(tmp_path.glob('main-*.pt'))[2]
    tile.unlink()
    tile.mkdir()
    with pytest.raises(ValueError, match=rf'{tmp_path}: {tile.name} is not a regular file'):
        run(checkpoint=tmp_path)


def writes_fail_after(monkeypatch, bytes_written):
    """torch.save's writes fail with a full disk after `bytes_written` bytes."""
    real_save = torch.save

    class FullDisk:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > bytes_written:
                raise OSError(errno.ENOSPC, 'No space left on device')
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(torch, 'save', lambda obj, f: real_save(obj, FullDisk(f)))


def test_a_full_disk_while_saving_a_tile_says_so_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    saved = []
    real_write = checkpoint.write_atomically

    def write_atomically(path, write):
        real_write(path, write)
        saved.append(path.name)

    monkeypatch.setattr(checkpoint, 'write_atomically', write_atomically)
    with monkeypatch.context() as patch:
        writes_fail_after(patch, 0)
        with pytest.raises(OSError, match=rf'checkpoint folder {tmp_path}: the disk is full while '
                                          r'writing main-000000-000000\.pt .*free some space'):
            run(checkpoint=tmp_path)
    assert saved == ['meta.json'] and not list(tmp_path.glob('.tmp-*'))
    computed = counting_compute(monkeypatch)
    kernel, untiled = run(checkpoint=tmp_path)
    assert len(computed) == 6
    assert_same(kernel, untiled)
