"""The checkpoint directory of a tiled computation: `meta.json` (which
computation it belongs to), one file per finished tile, and resuming from them."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Callable

import torch

from .files import Lock, open_own, write_atomically
from .fingerprint import hash_tensor
from .memory import gib
from .plan import Task

logger = logging.getLogger(__name__)

_FORMAT = 1

_META_FIELDS = {'format': 'an int', 'key': 'a string', 'batch_size': 'an int >= 1',
                'description': 'an object of strings'}


class Checkpoint:
    """The finished tiles of one computation: a directory of one file per tile.

    `meta.json` holds the hash of the computation (`key`) and what it was made
    of; each `<tile>.pt` holds the key, the tile's name, its values and their
    sha256. Files are written to a temporary name, synced, and renamed, so a
    file under a tile's name is always whole; a run killed mid-write leaves
    only a temporary file, removed by the next run. Every file is opened
    without following links (`open_own`), so nothing outside the directory
    is read or written.
    """

    def __init__(self, directory: pathlib.Path, description: dict[str, str],
                 batch_size: int) -> None:
        self.directory, self.description, self.batch_size = directory, description, batch_size
        self.key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
        self._lock = None

    @staticmethod
    def recorded_batch_size(directory: pathlib.Path) -> int | None:
        """The tile size of the checkpoint in `directory`, if there is one."""
        meta = Checkpoint.read_meta(directory)
        return None if meta is None else meta['batch_size']

    @staticmethod
    def read_meta(directory: pathlib.Path) -> dict | None:
        """The `meta.json` of `directory` (`None` if absent), or a `ValueError`
        saying what is wrong with it."""
        try:
            fd = open_own(directory / 'meta.json', os.O_RDONLY, 'checkpoint folder')
        except FileNotFoundError:
            return None
        with os.fdopen(fd, 'rb') as f:
            text = f.read()
        try:
            meta = json.loads(text)
        except ValueError as error:  # UnicodeDecodeError too
            problem = f'not JSON: {error}'
        else:
            problem = _meta_problem(meta)
        if problem:
            raise ValueError(f"batch: checkpoint folder {directory}: meta.json is damaged "
                             f"({problem}); delete the folder to start over")
        return meta

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = Lock(self.directory / 'lock')
        meta = self.read_meta(self.directory)
        if meta is not None:
            if meta['key'] != self.key:  # the lock goes in close()
                old = meta['description']
                changed = [k for k in self.description if old.get(k) != self.description[k]]
                raise ValueError(f"batch: checkpoint {self.directory} belongs to another "
                                 f"computation (different {', '.join(changed) or 'format'}); "
                                 "pass another directory or delete this one")
        else:
            self._write(self.directory / 'meta.json', lambda f: f.write(json.dumps(
                {'format': _FORMAT, 'key': self.key, 'batch_size': self.batch_size,
                 'description': self.description}, indent=1).encode()))
        for stale in self.directory.glob('.tmp-*'):
            stale.unlink()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def path(self, task: Task) -> pathlib.Path:
        return self.directory / f'{task.name}.pt'

    def load(self, task: Task) -> list | None:
        """The values of a finished tile, or `None` if absent or damaged (then removed)."""
        path = self.path(task)
        try:
            fd = open_own(path, os.O_RDONLY, 'checkpoint folder')
        except FileNotFoundError:
            return None
        try:
            with os.fdopen(fd, 'rb') as f:
                payload = torch.load(f, map_location='cpu', weights_only=True)
            if payload['key'] == self.key and payload['task'] == task.name and \
                    payload['digest'] == _digest(payload['values']):
                return payload['values']
            problem = 'its contents do not match their checksum'
        except Exception as error:  # truncated or corrupt files fail in many ways
            problem = f'{type(error).__name__}: {error}'
        logger.warning("batch: tile file %s is damaged (%s); computing it again", path, problem)
        path.unlink()
        return None

    def save(self, task: Task, values: list) -> None:
        values = [v.detach().cpu() if isinstance(v, torch.Tensor) else None for v in values]
        payload = {'key': self.key, 'task': task.name, 'values': values, 'digest': _digest(values)}
        self._write(self.path(task), lambda f: torch.save(payload, f))

    def _write(self, path: pathlib.Path, write: Callable[[Any], None]) -> None:
        """`write_atomically`, with an error that says what to do where it fails
        for the file system (a full disk shows in `torch.save` as a `RuntimeError`
        whose context holds the `OSError`)."""
        try:
            write_atomically(path, write)
        except Exception as error:
            cause = error
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            full = cause.errno in (errno.ENOSPC, errno.EDQUOT)
            problem = (f"the disk is full while writing {path.name} "
                       f"({gib(shutil.disk_usage(self.directory).free)} free)" if full else
                       f"writing {path.name} failed ({type(cause).__name__}: {cause})")
            raise OSError(cause.errno, f"batch: checkpoint folder {self.directory}: {problem}; "
                          f"{'free some space' if full else 'fix it'} or pass another folder (a "
                          "run started again with the same arguments resumes from the tiles "
                          "saved so far)") from error


def _meta_problem(meta: Any) -> str | None:
    """What is wrong with the contents of a checkpoint's `meta.json`, if anything."""
    if not isinstance(meta, dict):
        return f'a JSON {type(meta).__name__}, not an object'
    missing = [field for field in _META_FIELDS if field not in meta]
    if missing:
        return f"no {', '.join(missing)}"
    valid = {'format': isinstance(meta['format'], int), 'key': isinstance(meta['key'], str),
             'batch_size': type(meta['batch_size']) is int and meta['batch_size'] >= 1,
             'description': isinstance(meta['description'], dict) and
             all(isinstance(v, str) for v in meta['description'].values())}
    wrong = [f'{field} is {meta[field]!r}, expected {_META_FIELDS[field]}'
             for field, ok in valid.items() if not ok]
    if not wrong and meta['format'] != _FORMAT:
        wrong = [f"format {meta['format']}, this torchntk reads format {_FORMAT}"]
    return '; '.join(wrong) or None


def _digest(values: list) -> str:
    """sha256 of a tile's values."""
    h = hashlib.sha256()
    for value in values:
        if isinstance(value, torch.Tensor):
            hash_tensor(h, value)
        else:
            h.update(b'none')
    return h.hexdigest()
