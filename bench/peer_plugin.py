"""The Python peer for ``bench.nbd_compare``: a minimal ``nbdkit python`` plugin over a raw file.

Not imported by vblk; nbdkit loads it (``nbdkit python bench/peer_plugin.py file=IMG``). It does
pread/pwrite/flush with ``os`` calls and nothing else, so it shows what plain Python costs per request.
"""

from __future__ import annotations

import os

import nbdkit  # type: ignore[import-not-found]  # provided by nbdkit's python plugin at load time

API_VERSION = 2

_path: str | None = None


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def config(key: str, value: str) -> None:
    global _path  # noqa: PLW0603 - nbdkit's plugin API is module-level functions
    if key != "file":
        raise RuntimeError(f"unknown parameter {key!r} (only file=PATH)")
    _path = os.path.abspath(value)


def config_complete() -> None:
    if _path is None:
        raise RuntimeError("file=PATH is required")


def open(readonly: bool) -> int:  # the name nbdkit calls
    assert _path is not None
    return os.open(_path, os.O_RDONLY if readonly else os.O_RDWR)


def close(fd: int) -> None:
    os.close(fd)


def get_size(fd: int) -> int:
    return os.fstat(fd).st_size


def can_multi_conn(fd: int) -> bool:
    return True


def can_flush(fd: int) -> bool:
    return True


def pread(fd: int, buf: bytearray, offset: int, flags: int) -> None:
    done = os.preadv(fd, [buf], offset)
    if done != len(buf):
        raise OSError(5, f"short read at {offset}: {done} of {len(buf)}")


def pwrite(fd: int, buf: bytes, offset: int, flags: int) -> None:
    view = memoryview(buf)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def flush(fd: int, flags: int) -> None:
    os.fdatasync(fd)
