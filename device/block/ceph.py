"""A small typed ctypes binding of librados.so.2 and librbd.so.1: what the RBD backend needs.

Below :mod:`device.block.rbd`. Why ctypes and not Ceph's Cython modules (python3-rbd): the
data path wants librbd's event-socket completions (``rbd_set_image_notification`` +
``rbd_poll_io_events``: librbd bumps an eventfd, the event loop collects finished completions in
batches, and no Python code ever runs on a librbd thread) and scatter-gather I/O straight into
guest memory (``rbd_aio_readv``/``rbd_aio_writev``); the Cython binding offers neither (its aio
callbacks take the GIL on librbd's thread and its reads return fresh ``bytes``). ctypes also needs
only librbd1/librados2, not a module built for one CPython minor version. ctypes releases the
GIL around every foreign call.

Every function returns or raises :class:`CephError` (an ``OSError`` with the errno librados or
librbd reported). Libraries load on first use, so importing this module never fails.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Sequence
from typing import Any

c_void_p = ctypes.c_void_p
c_char_p = ctypes.c_char_p
c_int = ctypes.c_int
c_uint8 = ctypes.c_uint8
c_uint64 = ctypes.c_uint64
c_size_t = ctypes.c_size_t
c_ssize_t = ctypes.c_ssize_t

EVENT_TYPE_EVENTFD = 2
RBD_LOCK_MODE_EXCLUSIVE = 0
RBD_FEATURE_EXCLUSIVE_LOCK = 1 << 2
RBD_FEATURE_OBJECT_MAP = 1 << 3
RBD_FEATURE_FAST_DIFF = 1 << 4
RBD_WRITE_ZEROES_FLAG_THICK_PROVISION = 1 << 0  # keep the zeroed range allocated (write-same)


class Iovec(ctypes.Structure):
    _fields_ = (("iov_base", c_void_p), ("iov_len", c_size_t))


DIFF_CALLBACK = ctypes.CFUNCTYPE(c_int, c_uint64, c_size_t, c_int, c_void_p)


class CephError(OSError):
    """A librados/librbd call failed; ``errno`` is the (positive) error number."""


def check(result: int, what: str) -> int:
    if result < 0:
        code = -result
        raise CephError(code, f"{what}: {os.strerror(code)}")
    return result


class _Libs:
    """librados and librbd with argument and result types declared (loaded once)."""

    def __init__(self) -> None:
        try:
            self.rados = ctypes.CDLL("librados.so.2")
            self.rbd = ctypes.CDLL("librbd.so.1")
        except OSError as exc:
            raise CephError(errno.ENOENT, f"cannot load librados/librbd ({exc}): install librbd1") from exc
        r, b = self.rados, self.rbd
        p = ctypes.POINTER
        sigs: dict[Any, dict[str, tuple[Any, list[Any]]]] = {
            r: {
                "rados_create": (c_int, [p(c_void_p), c_char_p]),
                "rados_conf_read_file": (c_int, [c_void_p, c_char_p]),
                "rados_conf_set": (c_int, [c_void_p, c_char_p, c_char_p]),
                "rados_conf_get": (c_int, [c_void_p, c_char_p, c_char_p, c_size_t]),
                "rados_connect": (c_int, [c_void_p]),
                "rados_shutdown": (None, [c_void_p]),
                "rados_ioctx_create": (c_int, [c_void_p, c_char_p, p(c_void_p)]),
                "rados_ioctx_destroy": (None, [c_void_p]),
                "rados_getaddrs": (c_int, [c_void_p, p(c_char_p)]),
                "rados_get_instance_id": (c_uint64, [c_void_p]),
                "rados_blocklist_add": (c_int, [c_void_p, c_char_p, ctypes.c_uint32]),
                "rados_buffer_free": (None, [c_void_p]),
                "rados_mon_command": (
                    c_int,
                    [c_void_p, p(c_char_p), c_size_t, c_char_p, c_size_t, *[p(c_void_p), p(c_size_t)] * 2],
                ),
            },
            b: {
                "rbd_create": (c_int, [c_void_p, c_char_p, c_uint64, p(c_int)]),
                "rbd_remove": (c_int, [c_void_p, c_char_p]),
                "rbd_open": (c_int, [c_void_p, c_char_p, p(c_void_p), c_char_p]),
                "rbd_open_read_only": (c_int, [c_void_p, c_char_p, p(c_void_p), c_char_p]),
                "rbd_close": (c_int, [c_void_p]),
                "rbd_snap_create": (c_int, [c_void_p, c_char_p]),
                "rbd_metadata_get": (c_int, [c_void_p, c_char_p, c_char_p, p(c_size_t)]),
                "rbd_metadata_set": (c_int, [c_void_p, c_char_p, c_char_p]),
                "rbd_snap_remove": (c_int, [c_void_p, c_char_p]),
                "rbd_get_size": (c_int, [c_void_p, p(c_uint64)]),
                "rbd_get_features": (c_int, [c_void_p, p(c_uint64)]),
                "rbd_resize": (c_int, [c_void_p, c_uint64]),
                "rbd_read2": (c_ssize_t, [c_void_p, c_uint64, c_size_t, c_void_p, c_int]),
                "rbd_write2": (c_ssize_t, [c_void_p, c_uint64, c_size_t, c_void_p, c_int]),
                "rbd_flush": (c_int, [c_void_p]),
                "rbd_write_zeroes": (c_ssize_t, [c_void_p, c_uint64, c_size_t, c_int, c_int]),
                "rbd_diff_iterate2": (
                    c_int,
                    [c_void_p, c_char_p, c_uint64, c_uint64, c_uint8, c_uint8, DIFF_CALLBACK, c_void_p],
                ),
                "rbd_lock_acquire": (c_int, [c_void_p, c_int]),
                "rbd_lock_release": (c_int, [c_void_p]),
                "rbd_lock_break": (c_int, [c_void_p, c_int, c_char_p]),
                "rbd_lock_get_owners": (c_int, [c_void_p, p(c_int), p(c_char_p), p(c_size_t)]),
                "rbd_lock_get_owners_cleanup": (None, [p(c_char_p), c_size_t]),
                "rbd_is_exclusive_lock_owner": (c_int, [c_void_p, p(c_int)]),
                "rbd_set_image_notification": (c_int, [c_void_p, c_int, c_int]),
                "rbd_poll_io_events": (c_int, [c_void_p, p(c_void_p), c_int]),
                "rbd_aio_create_completion": (c_int, [c_void_p, c_void_p, p(c_void_p)]),
                "rbd_aio_read": (c_int, [c_void_p, c_uint64, c_size_t, c_void_p, c_void_p]),
                "rbd_aio_write": (c_int, [c_void_p, c_uint64, c_size_t, c_void_p, c_void_p]),
                "rbd_aio_readv": (c_int, [c_void_p, p(Iovec), c_int, c_uint64, c_void_p]),
                "rbd_aio_writev": (c_int, [c_void_p, p(Iovec), c_int, c_uint64, c_void_p]),
                "rbd_aio_flush": (c_int, [c_void_p, c_void_p]),
                "rbd_aio_discard": (c_int, [c_void_p, c_uint64, c_uint64, c_void_p]),
                "rbd_aio_write_zeroes": (c_int, [c_void_p, c_uint64, c_size_t, c_void_p, c_int, c_int]),
                "rbd_aio_get_return_value": (c_ssize_t, [c_void_p]),
                "rbd_aio_get_arg": (c_void_p, [c_void_p]),
                "rbd_aio_wait_for_complete": (c_int, [c_void_p]),
                "rbd_aio_is_complete": (c_int, [c_void_p]),
                "rbd_aio_release": (None, [c_void_p]),
            },
        }
        for lib, functions in sigs.items():
            for name, (restype, argtypes) in functions.items():
                fn = getattr(lib, name)
                fn.restype = restype
                fn.argtypes = argtypes


_libs: _Libs | None = None


def libs() -> _Libs:
    global _libs  # noqa: PLW0603 - loaded once, on first use
    if _libs is None:
        _libs = _Libs()
    return _libs


class Rados:
    """A connected librados client (``client.<client_id>``)."""

    def __init__(
        self,
        conf_file: str | None,
        client_id: str = "admin",
        options: Sequence[tuple[str, str]] = (),
        defaults: Sequence[tuple[str, str, str]] = (),
    ) -> None:
        """Read ``conf_file``, set ``options`` over it, and connect.

        ``defaults`` are ``(key, ceph_default, value)``: ``key`` becomes ``value`` unless the
        configuration already changed it from Ceph's own default.
        """
        lib = libs().rados
        handle = c_void_p()
        check(lib.rados_create(ctypes.byref(handle), client_id.encode()), "rados_create")
        self.handle: int | None = handle.value
        try:
            check(
                lib.rados_conf_read_file(self.handle, conf_file.encode() if conf_file else None),
                f"reading Ceph configuration {conf_file or '(default search path)'}",
            )
            for key, value in options:
                check(lib.rados_conf_set(self.handle, key.encode(), value.encode()), f"setting {key}")
            for key, ceph_default, value in defaults:
                if self.conf_get(key) == ceph_default:
                    check(lib.rados_conf_set(self.handle, key.encode(), value.encode()), f"setting {key}")
            check(lib.rados_connect(self.handle), "connecting to the Ceph cluster")
        except BaseException:
            self.shutdown()
            raise

    def conf_get(self, key: str) -> str:
        """This client's value of a Ceph option (``rbd_cache`` → ``"true"``)."""
        buf = ctypes.create_string_buffer(4096)
        check(libs().rados.rados_conf_get(self.handle, key.encode(), buf, len(buf)), f"reading {key}")
        return buf.value.decode()

    def open_ioctx(self, pool: str) -> int:
        ioctx = c_void_p()
        check(
            libs().rados.rados_ioctx_create(self.handle, pool.encode(), ctypes.byref(ioctx)), f"pool {pool}"
        )
        assert ioctx.value is not None
        return ioctx.value

    def address(self) -> str:
        """This client's address as the cluster sees it (``127.0.0.1:0/12345``)."""
        out = c_char_p()
        check(libs().rados.rados_getaddrs(self.handle, ctypes.byref(out)), "rados_getaddrs")
        value = (out.value or b"").decode()
        return value

    def mon_command(self, command: str, inbuf: bytes = b"") -> tuple[bytes, str]:
        """Run a JSON mon command; its output buffer and status string."""
        lib = libs().rados
        cmd = (c_char_p * 1)(command.encode())
        outbuf, outs = c_void_p(), c_void_p()
        outbuf_len, outs_len = c_size_t(), c_size_t()
        result = lib.rados_mon_command(
            self.handle, cmd, 1, inbuf, len(inbuf),
            ctypes.byref(outbuf), ctypes.byref(outbuf_len), ctypes.byref(outs), ctypes.byref(outs_len),
        )  # fmt: skip
        try:
            data = ctypes.string_at(outbuf.value, outbuf_len.value) if outbuf.value else b""
            status = ctypes.string_at(outs.value, outs_len.value).decode() if outs.value else ""
        finally:
            for buf in (outbuf, outs):
                if buf.value:
                    lib.rados_buffer_free(buf)
        check(result, f"mon command {command}: {status}")
        return data, status

    def shutdown(self) -> None:
        if self.handle is not None:
            libs().rados.rados_shutdown(self.handle)
            self.handle = None


def ioctx_destroy(ioctx: int) -> None:
    libs().rados.rados_ioctx_destroy(ioctx)


def image_create(ioctx: int, name: str, size: int) -> None:
    order = c_int(0)  # the cluster's default object size (4 MiB) and default features
    check(libs().rbd.rbd_create(ioctx, name.encode(), size, ctypes.byref(order)), f"creating image {name}")


def image_open(ioctx: int, name: str, read_only: bool, snapshot: str | None = None) -> int:
    """An image handle: of its head, or (read-only) of its snapshot ``snapshot``."""
    lib = libs().rbd
    image = c_void_p()
    opener = lib.rbd_open_read_only if read_only or snapshot is not None else lib.rbd_open
    snap = snapshot.encode() if snapshot is not None else None
    where = name if snapshot is None else f"{name}@{snapshot}"
    check(opener(ioctx, name.encode(), ctypes.byref(image), snap), f"opening image {where}")
    assert image.value is not None
    return image.value


def snap_create(image: int, name: str) -> None:
    """Take snapshot ``name`` of the image (librbd flushes what it caches first)."""
    check(libs().rbd.rbd_snap_create(image, name.encode()), f"creating snapshot {name}")


def snap_remove(image: int, name: str) -> None:
    check(libs().rbd.rbd_snap_remove(image, name.encode()), f"removing snapshot {name}")


def _u64(fn: Callable[..., int], image: int, what: str) -> int:
    value = c_uint64()
    check(fn(image, ctypes.byref(value)), what)
    return value.value


def image_size(image: int) -> int:
    return _u64(libs().rbd.rbd_get_size, image, "rbd_get_size")


def image_features(image: int) -> int:
    return _u64(libs().rbd.rbd_get_features, image, "rbd_get_features")


def lock_owners(image: int) -> list[str]:
    """The exclusive lock's current owners (empty when nobody holds it)."""
    lib = libs().rbd
    mode = c_int()
    count = c_size_t(8)
    owners = (c_char_p * 8)()
    result = lib.rbd_lock_get_owners(image, ctypes.byref(mode), owners, ctypes.byref(count))
    if result == -errno.ENOENT:
        return []
    check(result, "rbd_lock_get_owners")
    try:
        return [(owners[i] or b"").decode() for i in range(count.value)]
    finally:
        lib.rbd_lock_get_owners_cleanup(owners, count)


def metadata_get(image: int, key: str) -> str | None:
    """The image's metadata value of ``key`` (None when it has none)."""
    lib = libs().rbd
    size = c_size_t(4096)
    while True:
        buffer = ctypes.create_string_buffer(size.value)
        result = lib.rbd_metadata_get(image, key.encode(), buffer, ctypes.byref(size))
        if result == -errno.ENOENT:
            return None
        if result == -errno.ERANGE:
            continue  # ``size`` now says how much it needs
        check(result, f"reading image metadata {key}")
        return buffer.value.decode()


def metadata_set(image: int, key: str, value: str) -> None:
    check(libs().rbd.rbd_metadata_set(image, key.encode(), value.encode()), f"writing image metadata {key}")


def changed_since(image: int, snapshot: str, length: int) -> list[tuple[int, int]]:
    """``(offset, length)`` runs where the image (the head, or the snapshot a handle was opened at)
    differs from snapshot ``snapshot``: data written and ranges zeroed or discarded alike."""
    return _diff(image, snapshot, length, include_parent=False, whole_object=False, existing_only=False)


def diff_extents(image: int, length: int, whole_object: bool = False) -> list[tuple[int, int]]:
    """Allocated ``(offset, length)`` runs of the image's head, from librbd's diff iteration.

    ``whole_object``: whole objects, which librbd answers from the object map when the image has
    fast-diff (no request per object); otherwise it asks the OSDs about every object.
    """
    return _diff(image, None, length, include_parent=True, whole_object=whole_object, existing_only=True)


def _diff(
    image: int,
    since: str | None,
    length: int,
    *,
    include_parent: bool,
    whole_object: bool,
    existing_only: bool,
) -> list[tuple[int, int]]:
    """librbd's diff iteration as sorted, merged ``(offset, length)`` runs (``existing_only``: the
    runs that hold data, not those zeroed)."""
    found: list[tuple[int, int]] = []

    def collect(offset: int, size: int, exists: int, _arg: int | None) -> int:
        if exists or not existing_only:
            if found and found[-1][0] + found[-1][1] == offset:
                found[-1] = (found[-1][0], found[-1][1] + size)
            else:
                found.append((offset, size))
        return 0

    callback = DIFF_CALLBACK(collect)
    what = "rbd_diff_iterate2" if since is None else f"rbd_diff_iterate2 from {since}"
    start = since.encode() if since is not None else None
    check(
        libs().rbd.rbd_diff_iterate2(
            image, start, 0, length, int(include_parent), int(whole_object), callback, None
        ),
        what,
    )
    found.sort()
    return found
