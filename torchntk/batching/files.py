"""The files `batch` makes: opened without following links, written atomically,
locked, memory-mapped, and the space they need checked before they are written."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import pathlib
import shutil
import socket
import stat
import tempfile
from typing import Any, Callable

import numpy as np
import torch

from .memory import gib

try:
    import fcntl
except ImportError:  # not POSIX: concurrent runs on one checkpoint are not detected
    fcntl = None

logger = logging.getLogger(__name__)

_NO_FOLLOW = getattr(os, 'O_NOFOLLOW', 0)


def open_own(path: pathlib.Path, flags: int, folder: str) -> int:
    """`os.open(path, flags)` where `path` must be a regular file with no other
    name: a symbolic link, a hard link or anything else planted there raises a
    `ValueError` instead of being followed (`FileNotFoundError` if absent)."""
    # O_NONBLOCK: opening a FIFO planted there returns at once, to be refused below.
    try:
        fd = os.open(path, flags | _NO_FOLLOW | getattr(os, 'O_NONBLOCK', 0), 0o666)
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.EISDIR):
            raise
        problem = 'is a symbolic link' if error.errno == errno.ELOOP else 'is not a regular file'
    else:
        info = os.fstat(fd)
        problem = ('is not a regular file' if not stat.S_ISREG(info.st_mode) else
                   f'has {info.st_nlink} hard links' if info.st_nlink > 1 else None)
        if problem is None:
            return fd
        os.close(fd)
    raise ValueError(f"batch: {folder} {path.parent}: {path.name} {problem}; batch uses only "
                     "files it made there and follows no link: remove it")


def write_atomically(path: pathlib.Path, write: Callable[[Any], None]) -> None:
    """`write(f)` into a temporary file beside `path`, synced, then renamed to
    `path`: a file under that name is always whole."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix='.tmp-', suffix=path.suffix)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if hasattr(os, 'O_DIRECTORY'):  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class Lock:
    """An exclusive advisory lock on a file (`fcntl.flock`), or a refusal."""

    def __init__(self, path: pathlib.Path) -> None:
        self.file = os.fdopen(open_own(path, os.O_RDWR | os.O_CREAT, 'checkpoint folder'), 'r+')
        if fcntl is None:
            logger.warning("batch: no fcntl here; concurrent runs on %s are not detected", path.parent)
            return
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or 'another process'
            self.file.close()
            raise RuntimeError(f"batch: checkpoint {path.parent} is in use by another run "
                               f"({holder}); wait for it to finish or use another directory")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f'pid {os.getpid()} on {socket.gethostname()}')
        self.file.flush()

    def release(self) -> None:
        if fcntl is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    try:
        return torch.empty((), dtype=dtype).numpy().dtype
    except TypeError as error:
        raise TypeError(f"batch: memmap_dir cannot hold {dtype} (no numpy dtype)") from error


def new_npy(path: pathlib.Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new `.npy` file of `shape` at `path`, its space reserved, mapped.

    What was at `path` is unlinked, never opened: an earlier result that maps
    that file keeps it (rewriting it in place would change that result, and
    reading it would crash with SIGBUS where the new file is shorter), and a
    link there is not followed. The space is reserved (`posix_fallocate`)
    because a sparse file on a full disk fails only when a tile is written
    into the mapping, and then with SIGBUS.
    """
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NO_FOLLOW, 0o666)
    with os.fdopen(fd, 'w+b') as f:
        np.lib.format.write_array_header_1_0(f, {'descr': np.lib.format.dtype_to_descr(dtype),
                                                 'fortran_order': False, 'shape': shape})
        offset = f.tell()
        size = offset + dtype.itemsize * math.prod(shape)
        try:
            if hasattr(os, 'posix_fallocate'):
                os.posix_fallocate(fd, 0, size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # where it cannot reserve
                path.unlink()
                raise OSError(error.errno, f"batch: memmap_dir {path.parent}: cannot reserve "
                              f"{gib(size)} for {path.name} ({error.strerror}); free some "
                              "space or pass a directory on another disk") from error
        return np.memmap(f, dtype=dtype, mode='r+', offset=offset, shape=shape)


def check_disk_space(directory: pathlib.Path, needed: int) -> None:
    """Refuse a result of `needed` bytes that the disk of `directory` cannot hold."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"batch: memmap_dir {directory} needs {gib(needed)} for the "
                      f"result, and {gib(free)} are free on its disk; free some space or pass a "
                      "directory on another disk")
