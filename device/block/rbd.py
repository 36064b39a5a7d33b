"""Ceph RBD backend: a virtio-blk disk whose sectors live in an RBD image on a Ceph cluster.

Storage backend below :mod:`device.blk`, through the ctypes binding in :mod:`device.block.ceph`.
It is an :class:`~device.block.AsyncBackend`: the device starts librbd aio requests
(``rbd_aio_readv``/``rbd_aio_writev`` straight from and into guest memory) and returns to the event
loop; librbd signals finished completions on an eventfd the loop watches, and :meth:`_reap` collects
them in batches with ``rbd_poll_io_events``. So as many requests are in flight to the cluster as the
virtqueues hold, and no Python code runs on a librbd thread.

Semantics:

* Cache (``RbdTarget.cache``, the disk's ``cache=`` option). ``none`` (the default): librbd's cache
  is off, so a write is acknowledged by the OSDs and is on the cluster. ``writeback``: librbd's
  writeback cache (``rbd_cache_policy=writeback``, the ObjectCacher), the mode QEMU runs with
  ``cache=writeback``: a write is acknowledged once it is in the cache, and FLUSH (librbd's flush)
  writes every dirty byte back and fails if any of it fails; a failed write-back stays dirty and
  makes every FLUSH fail until it is written. So an acknowledged FLUSH covers every write
  acknowledged before it in both modes. The cache is write-back from the start
  (``rbd_cache_writethrough_until_flush=false``): the device is write-through itself (a flush
  after every write) for a driver that did not negotiate VIRTIO_BLK_F_FLUSH or that turned the
  write cache off. librbd's default policy, ``writearound``, is never used: it reports a write's
  failure only to a FLUSH that was waiting for that write, so a FLUSH sent after the failed write
  had finished succeeds.
* After any failed write, discard, write-zeroes or FLUSH, every later FLUSH fails too: a FLUSH is
  never reported successful after a failed write.
* Client timeouts are always set (``rados_osd_op_timeout`` and friends; Ceph's defaults wait for
  ever), so a dead cluster turns into ETIMEDOUT, then IOERR at the device.
* Ownership: a writable image is opened with RBD's exclusive lock held explicitly (librbd does not
  hand it over on request). Another owner, live or dead (the lock cannot tell), makes
  :meth:`RbdNode.open` fail with EBUSY; ``take_over`` breaks the old owner's lock, which
  blocklists it (``rbd_blocklist_on_break_lock``, always on here; fencing: its writes fail from
  then on), then takes the lock.
* The allocation map (NBD BLOCK_STATUS, REST ``/extents``) of a writable image is read once at
  open with librbd's diff iteration (``rbd_diff_iterate2``; whole objects from the object map
  when the image has fast-diff) and then kept up to date by every
  write, discard and write-zeroes completed here, which the exclusive lock makes the only writer.
  So answering it never waits for the cluster. A read-only client holds no lock and others may
  write under it, so its map calls every block data: a hole it reported could hide data written
  since, and NBD clients would read that as zeroes.
* Discard, and write-zeroes that may unmap, use librbd's write-zeroes, which deallocates whole
  objects and zeroes the rest: they read back as zeroes and map as holes. Write-zeroes that must
  not unmap (virtio-blk without the UNMAP flag, NBD ``NO_HOLE``) asks librbd to keep the range
  allocated (``RBD_WRITE_ZEROES_FLAG_THICK_PROVISION``, a write-same of zeroes): it maps as
  allocated zeroes (:data:`ZERO`: NBD's ``ZERO`` state without ``HOLE``).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import errno
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

import structlog
from mypy_extensions import mypyc_attr

from device.block import ceph
from device.block.allocation import DATA, HOLE, ZERO, AllocationMap
from device.block.node import BlockError, Capabilities, Completion, Extent, StorageNode, check_access
from device.block.sched import batch_threads

log = structlog.get_logger("vblk.device.rbd")

POLL_BATCH: Final = 64
DEFAULT_TIMEOUT = 30.0
CACHE_MODES = ("none", "writeback")
DEFAULT_CACHE = "none"

# The operations the allocation map follows.
_READ: Final = 0
_WRITE: Final = 1
_FLUSH: Final = 2
_ZERO: Final = 3  # zeroes that may deallocate (discard, write-zeroes with unmap)
_ZERO_KEEP: Final = 4  # zeroes that stay allocated (write-zeroes without unmap)


@dataclasses.dataclass(frozen=True, slots=True)
class RbdTarget:
    """Which cluster, as whom, and which image; plus what to do if it is missing or locked."""

    pool: str
    image: str
    conf_file: str | None = None  # None: librados's default search (/etc/ceph/ceph.conf, $CEPH_CONF)
    client_id: str = "admin"
    keyring: str | None = None
    timeout: float = DEFAULT_TIMEOUT  # seconds for every mon and OSD operation, and for connecting
    create_size: int | None = None  # create the image with this size if it does not exist
    read_only: bool = False
    take_over: bool = False  # break a (dead) owner's exclusive lock, blocklisting it
    cache: str = DEFAULT_CACHE  # "none": librbd's cache off; "writeback": its writeback cache
    snapshot: str | None = None  # open this snapshot of the image (read-only), not its head

    def __post_init__(self) -> None:
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, not {self.cache!r}")

    @property
    def spec(self) -> str:
        head = f"{self.pool}/{self.image}"
        return head if self.snapshot is None else f"{head}@{self.snapshot}"

    def options(self) -> list[tuple[str, str]]:
        t = str(math.ceil(self.timeout))  # Ceph's timeouts are whole seconds ("2.5" is EINVAL)
        options = [
            ("client_mount_timeout", t),
            ("rados_mon_op_timeout", t),
            ("rados_osd_op_timeout", t),
            ("log_to_stderr", "false"),
            ("err_to_stderr", "false"),  # vblk logs failures itself, with the errno
            ("rbd_blocklist_on_break_lock", "true"),  # --take-over fences the old owner, always
        ]
        if self.cache == "writeback":
            options += [
                ("rbd_cache", "true"),
                ("rbd_cache_policy", "writeback"),  # not writearound: it can lose a write's error
                ("rbd_cache_writethrough_until_flush", "false"),  # the device does write-through
            ]
        else:
            options.append(("rbd_cache", "false"))  # an acknowledged write is on the OSDs
        if self.keyring:
            options.append(("keyring", self.keyring))
        return options

    @staticmethod
    def defaults() -> list[tuple[str, str, str]]:
        """Tuning vblk applies unless ceph.conf changes it: ``(key, Ceph's default, vblk's value)``.

        One librados completion thread instead of two: completions only bump the eventfd the
        event loop reaps, and a second thread costs wake-ups and lock hand-offs, not throughput
        (about 5-8% less CPU per 4 KiB request on a 2-CPU host). Each disk has its own client.
        """
        return [("librados_thread_count", "2", "1")]


@mypyc_attr(native_class=False)
class ImageLockedError(BlockError):
    """The image's exclusive lock belongs to another client (another vblk)."""


class RbdNode(StorageNode):
    """One RBD image, open (and, if writable, exclusively locked) through its own librados client."""

    kind = "rbd"

    def __init__(self, target: RbdTarget, rados: ceph.Rados, ioctx: int, image: int) -> None:
        size = ceph.image_size(image)
        super().__init__(size - size % 512, target.read_only)  # whole sectors; a tail is left out
        self.target = target
        self._rados: ceph.Rados | None = rados
        self._ioctx: int | None = ioctx
        self._image: int | None = image
        if self._size != size:
            log.warning("rbd_image_size_not_sectors", image=target.spec, size=size, served=self._size)
        self._lock = threading.Lock()  # the map and the failure flag (sync calls may use threads)
        if target.read_only and target.snapshot is None:  # no lock: others may write, a hole could be stale
            runs = [(0, self._size)]
        else:  # with fast-diff, whole objects from the object map: one query, not one per object
            fast_diff = bool(ceph.image_features(image) & ceph.RBD_FEATURE_FAST_DIFF)
            runs = ceph.diff_extents(image, self._size, fast_diff)
        self._map = AllocationMap(self._size, runs)
        self._write_errno: int | None = None  # first failed write; every later flush fails with it
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        ceph.check(
            ceph.libs().rbd.rbd_set_image_notification(image, self._efd, ceph.EVENT_TYPE_EVENTFD),
            "rbd_set_image_notification",
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        # completion pointer -> (who is told, op, offset, length, objects pinning the buffers)
        self._inflight: dict[int, tuple[Completion, int, int, int, Any]] = {}
        self._comps = (ctypes.c_void_p * POLL_BATCH)()
        self._new_comp = ctypes.c_void_p()  # out-parameter, reused: only the loop thread starts I/O
        self._new_comp_ref = ctypes.byref(self._new_comp)
        lib = ceph.libs().rbd
        self._create_completion = lib.rbd_aio_create_completion
        self._release = lib.rbd_aio_release
        self._aio_read = lib.rbd_aio_read
        self._aio_write = lib.rbd_aio_write
        self._aio_readv = lib.rbd_aio_readv
        self._aio_writev = lib.rbd_aio_writev
        self._poll = lib.rbd_poll_io_events
        self._get_result = lib.rbd_aio_get_return_value
        self.max_inflight = 0  # most aio requests outstanding at once (tests, metrics)
        self.completed = 0

    # -- opening ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, target: RbdTarget) -> RbdNode:
        """Connect, open (creating if asked) and lock the image; raises BlockError.

        librados and librbd start their threads in here, and they run as ``SCHED_BATCH``
        (:func:`device.block.sched.batch_threads`).
        """
        with batch_threads():
            return cls._open(target)

    @classmethod
    def _open(cls, target: RbdTarget) -> RbdNode:
        try:
            rados = ceph.Rados(target.conf_file, target.client_id, target.options(), target.defaults())
        except OSError as unreachable:
            raise BlockError(
                unreachable.errno or errno.EIO, f"Ceph cluster: {unreachable.strerror or unreachable}"
            ) from unreachable
        ioctx: int | None = None
        image: int | None = None
        try:
            ioctx = rados.open_ioctx(target.pool)
            try:
                image = ceph.image_open(ioctx, target.image, target.read_only, target.snapshot)
            except ceph.CephError as missing:
                if (
                    missing.errno != errno.ENOENT
                    or target.create_size is None
                    or target.read_only
                    or target.snapshot is not None
                ):
                    raise
                ceph.image_create(ioctx, target.image, target.create_size)
                log.info("rbd_image_created", image=target.spec, size=target.create_size)
                image = ceph.image_open(ioctx, target.image, target.read_only)
            if not target.read_only:
                _lock(image, target, rados)
            return cls(target, rados, ioctx, image)
        except BaseException as exc:
            if image is not None:
                ceph.libs().rbd.rbd_close(image)
            if ioctx is not None:
                ceph.ioctx_destroy(ioctx)
            rados.shutdown()
            if isinstance(exc, OSError) and not issubclass(type(exc), BlockError):
                raise BlockError(exc.errno or errno.EIO, f"{target.spec}: {exc.strerror}") from exc
            raise

    # -- Backend --------------------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        # Allocated zeroes are a write-same on the OSDs (no faster than a write); no page cache to
        # warm; requests complete on the event loop.
        return Capabilities(read_only=self._read_only, fast_zero=False, cache=False, blocking=False)

    def describe(self) -> dict[str, Any]:
        return {
            "node": self.kind,
            "image": self.target.spec,
            "size": self._size,
            "read_only": self._read_only,
            "cache": self.target.cache,
        }

    def counters(self) -> dict[str, int]:
        return {
            "rbd_requests_inflight": len(self._inflight),
            "rbd_requests_completed": self.completed,
            "rbd_write_failed": int(self._write_errno is not None),
        }

    def snap_create(self, name: str) -> None:
        """Take an RBD snapshot of the image (the caller holds the device drained)."""
        self._snapshot_op(ceph.snap_create, name)

    def snap_remove(self, name: str) -> None:
        self._snapshot_op(ceph.snap_remove, name)

    def _snapshot_op(self, op: Callable[[int, str], None], name: str) -> None:
        if self._image is None:
            raise BlockError(errno.ESHUTDOWN, f"{self.target.spec} is closed")
        try:
            op(self._image, name)
        except ceph.CephError as failed:
            raise BlockError(failed.errno or errno.EIO, f"{self.target.spec}: {failed.strerror}") from failed

    def metadata(self, key: str) -> str | None:
        """The image's metadata value of ``key`` (librbd's image-meta), or None."""
        if self._image is None:
            raise BlockError(errno.ESHUTDOWN, f"{self.target.spec} is closed")
        return ceph.metadata_get(self._image, key)

    def set_metadata(self, key: str, value: str) -> None:
        if self._image is None:
            raise BlockError(errno.ESHUTDOWN, f"{self.target.spec} is closed")
        ceph.metadata_set(self._image, key, value)

    def changed_since(self, snapshot: str, until: str | None = None) -> list[tuple[int, int]]:
        """Where the image (or its snapshot ``until``) differs from its snapshot ``snapshot``."""
        if self._image is None or self._ioctx is None:
            raise BlockError(errno.ESHUTDOWN, f"{self.target.spec} is closed")
        if until is None:
            return ceph.changed_since(self._image, snapshot, self._size)
        handle = ceph.image_open(self._ioctx, self.target.image, True, until)
        try:
            return ceph.changed_since(handle, snapshot, self._size)
        finally:
            ceph.libs().rbd.rbd_close(handle)

    def option(self, key: str) -> str:
        """The value of a Ceph option for this image's client (``rbd_cache_policy``)."""
        if self._rados is None:
            raise BlockError(errno.EBADF, f"{self.target.spec} is closed")
        return self._rados.conf_get(key)

    @property
    def write_failed(self) -> bool:
        """A write, discard, write-zeroes or FLUSH failed: every FLUSH fails until vblk restarts."""
        return self._write_errno is not None

    def _handle(self) -> int:
        if self._image is None:
            raise BlockError(errno.EBADF, f"{self.target.spec} is closed")
        return self._image

    def _check(self, offset: int, length: int, write: bool) -> None:
        if offset >= 0 and length >= 0 and offset + length <= self._size and not (write and self._read_only):
            return  # the common case, without a call into interpreted code
        check_access(self.target.spec, self._size, self._read_only, offset, length, write)

    def _done(self, op: int, offset: int, length: int, result: int) -> None:
        """Book a finished operation into the allocation map and the failure flag."""
        if op == _READ:
            return
        with self._lock:
            if result < 0 and self._write_errno is None:
                self._write_errno = -result  # a failed FLUSH too: the cache may have lost the data
            if op == _WRITE or result < 0:
                self._map.set(offset, offset + length, DATA)  # failed: unknown, so data
            elif op == _ZERO:
                self._map.set(offset, offset + length, HOLE)
            elif op == _ZERO_KEEP:
                self._map.set(offset, offset + length, ZERO)

    def _distrust(self, op: int, offset: int, length: int) -> None:
        """Booking a finished operation failed: answer it EIO and assume the worst of its range.

        The range counts as data (a map that says hole where there is data makes copies skip
        it), and the failure flag is set, so no later FLUSH reports success.
        """
        if op == _READ:
            return
        with self._lock:
            if self._write_errno is None:
                self._write_errno = errno.EIO
            try:
                self._map.set(offset, offset + length, DATA)
            except Exception:  # the map itself is broken: call every block data
                self._map = AllocationMap(self._size, [(0, self._size)])

    def _flush_refused(self) -> BlockError | None:
        code = self._write_errno
        if code is None:
            return None
        return BlockError(code, f"an earlier write to {self.target.spec} failed: {os.strerror(code)}")

    def extents(self, offset: int, length: int) -> list[Extent]:
        self._check(offset, length, False)
        with self._lock:
            return self._map.extents(offset, length)

    def resize(self, new_size: int) -> None:
        if new_size <= 0 or new_size % 512:
            raise ValueError(f"size {new_size} is not a positive multiple of 512")
        if self._read_only:
            raise BlockError(errno.EROFS, f"{self.target.spec} is read-only")
        result = ceph.libs().rbd.rbd_resize(self._handle(), new_size)
        if result < 0:
            raise BlockError(-result, f"resizing {self.target.spec}: {os.strerror(-result)}")
        with self._lock:
            self._map.resize(new_size)
            self._size = new_size

    def advise_willneed(self, offset: int, length: int) -> None:
        """No page cache to warm: the data lives on the OSDs."""

    def close(self) -> None:
        if self._image is None:
            return
        try:
            self._wait_all()
        finally:
            loop: Any = self._loop  # uvloop's remove_reader returns None, not asyncio's bool
            if loop is not None and not loop.is_closed():
                try:
                    loop.remove_reader(self._efd)
                except RuntimeError:
                    pass
            self._loop = None
            lib = ceph.libs().rbd
            result = lib.rbd_close(self._image)
            if result < 0:
                log.warning("rbd_close_failed", image=self.target.spec, errno=-result)
            self._image = None
            if self._ioctx is not None:
                ceph.ioctx_destroy(self._ioctx)
                self._ioctx = None
            if self._rados is not None:
                self._rados.shutdown()
                self._rados = None
            os.close(self._efd)

    # -- the data plane: started on the event loop, completed by _reap --------------------------

    def _attach(self) -> asyncio.AbstractEventLoop:
        """The running loop; on first use, it starts watching the completion eventfd."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            loop.add_reader(self._efd, self._reap)
        return loop

    def _completion(self) -> int:
        """A new librbd completion, with no callback: it is collected through the eventfd.

        Attaches to the running loop first, so no request starts that nothing would collect.
        """
        self._attach()
        result: int = self._create_completion(None, None, self._new_comp_ref)
        comp: int | None = self._new_comp.value
        if result < 0 or comp is None:
            raise BlockError(-result or errno.ENOMEM, "rbd_aio_create_completion failed")
        return comp

    def _started(
        self, comp: int, result: int, op: int, offset: int, length: int, keep: Any, done: Completion
    ) -> None:
        """A request librbd accepted (``result`` 0) is tracked until :meth:`_reap` finishes it;
        one it refused fails now."""
        if result < 0:
            self._release(comp)
            self._done(op, offset, length, result)
            done.complete(BlockError(-result, f"{self.target.spec}: {os.strerror(-result)}"))
            return
        inflight = self._inflight
        inflight[comp] = (done, op, offset, length, keep)
        self.max_inflight = max(self.max_inflight, len(inflight))

    def _reap(self) -> None:
        """The eventfd fired: finish every completion librbd has queued (on the loop thread)."""
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        image = self._image
        if image is None:
            return
        poll, get_result, release = self._poll, self._get_result, self._release
        comps = self._comps
        inflight = self._inflight
        while True:
            count: int = poll(image, comps, POLL_BATCH)
            for i in range(count):
                comp: int | None = comps[i]
                result: int = get_result(comp)
                release(comp)
                entry = inflight.pop(comp or 0, None)
                if entry is None:
                    continue
                self.completed += 1
                done, op, offset, length, _keep = entry
                if op != _READ:
                    try:
                        self._done(op, offset, length, result)
                        if op == _FLUSH and result >= 0:
                            refused = self._flush_refused()
                            if refused is not None:
                                result = -(refused.errno or errno.EIO)
                    except Exception as exc:  # never strand the rest of the batch, nor this request
                        log.error(
                            "rbd_completion_failed", op=op, offset=offset, length=length, error=repr(exc)
                        )
                        self._distrust(op, offset, length)
                        result = -errno.EIO
                if result < 0:
                    done.complete(BlockError(-result, f"{self.target.spec}: {os.strerror(-result)}"))
                else:
                    done.complete(None)
            if count < POLL_BATCH:
                return

    @staticmethod
    def _iovecs(buffers: Sequence[memoryview], read: bool) -> tuple[Any, int, list[Any], int]:
        """An iovec array over the buffers (guest memory: no copy), what pins them, and the total.

        Read-only buffers (a caller's ``bytes``) are copied; librbd then only reads them.
        """
        keep: list[Any] = []
        iov = (
            _IOVEC_ARRAYS[len(buffers)] if len(buffers) < len(_IOVEC_ARRAYS) else ceph.Iovec * len(buffers)
        )()
        n = total = 0
        for given in buffers:
            size = given.nbytes
            if not size:
                continue
            buf = given if given.format == "B" and given.ndim == 1 else given.cast("B")
            if buf.readonly:
                if read:
                    raise BlockError(errno.EINVAL, "cannot read into a read-only buffer")
                holder: Any = ctypes.create_string_buffer(bytes(buf), size)
            else:
                holder = _c_char.from_buffer(buf)
            keep.append(holder)
            entry = iov[n]
            entry.iov_base = _addressof(holder)
            entry.iov_len = size
            n += 1
            total += size
        keep.append(iov)
        return iov, n, keep, total

    def _transfer(self, op: int, offset: int, buffers: Sequence[memoryview], done: Completion) -> None:
        """Start reading into (``op`` ``_READ``) or writing from (``_WRITE``) ``buffers``."""
        write = op == _WRITE
        try:
            image = self._handle()
            result: int
            if len(buffers) == 1:
                buf = buffers[0]
                length = buf.nbytes
                if length and buf.format == "B" and buf.ndim == 1 and not buf.readonly:
                    # The common request, one guest buffer: librbd reads into it or writes from it
                    # (rbd_aio_read/rbd_aio_write), with no iovec array.
                    self._check(offset, length, write)
                    holder = _c_char.from_buffer(buf)
                    comp = self._completion()
                    one = self._aio_write if write else self._aio_read
                    result = one(image, offset, length, _addressof(holder), comp)
                    self._started(comp, result, op, offset, length, holder, done)
                    return
            iov, count, keep, total = self._iovecs(buffers, not write)
            self._check(offset, total, write)
            comp = self._completion()
            many = self._aio_writev if write else self._aio_readv
            result = many(image, iov, count, offset, comp)
        except OSError as refused:
            done.complete(refused)
            return
        self._started(comp, result, op, offset, total, keep, done)

    def readv(self, offset: int, buffers: Sequence[memoryview], done: Completion) -> None:
        self._transfer(_READ, offset, buffers, done)

    def writev(self, offset: int, buffers: Sequence[memoryview], done: Completion) -> None:
        self._transfer(_WRITE, offset, buffers, done)

    def flush(self, done: Completion) -> None:
        refused = self._flush_refused()
        if refused is None and self._image is None:
            refused = BlockError(errno.EBADF, f"{self.target.spec} is closed")
        if refused is not None:
            done.complete(refused)
            return
        try:
            comp = self._completion()
        except OSError as failed:
            done.complete(failed)
            return
        result: int = ceph.libs().rbd.rbd_aio_flush(self._image, comp)
        self._started(comp, result, _FLUSH, 0, 0, None, done)

    def _zero(self, offset: int, length: int, unmap: bool, done: Completion) -> None:
        try:
            image = self._handle()
            self._check(offset, length, True)
            comp = self._completion()
        except OSError as refused:
            done.complete(refused)
            return
        flags, op = _zeroing(unmap)
        result: int = ceph.libs().rbd.rbd_aio_write_zeroes(image, offset, length, comp, flags, 0)
        self._started(comp, result, op, offset, length, None, done)

    def discard(self, offset: int, length: int, done: Completion) -> None:
        self._zero(offset, length, True, done)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool, done: Completion) -> None:
        self._zero(offset, length, may_unmap, done)

    @property
    def inflight(self) -> int:
        """Requests started and not yet completed."""
        return len(self._inflight)

    def _wait_all(self) -> None:
        """Block until librbd has finished every started request (then collect them): at close."""
        if not self._inflight or self._image is None:
            return
        wait = ceph.libs().rbd.rbd_aio_wait_for_complete
        for comp in list(self._inflight):
            wait(comp)
        self._reap()


def _zeroing(unmap: bool) -> tuple[int, int]:
    """librbd's write-zeroes flags and the operation the map books, for zeroes that may unmap
    (deallocated: holes) or must not (``RBD_WRITE_ZEROES_FLAG_THICK_PROVISION``: allocated zeroes)."""
    if unmap:
        return 0, _ZERO
    return ceph.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION, _ZERO_KEEP


_IOVEC_ARRAYS = [ceph.Iovec * n for n in range(9)]
_c_char: Final = ctypes.c_char
_addressof: Final = ctypes.addressof


def _lock(image: int, target: RbdTarget, rados: ceph.Rados) -> None:
    """Take the image's exclusive lock, breaking a dead owner's if ``take_over``."""
    lib = ceph.libs().rbd
    features = ceph.image_features(image)
    if not features & ceph.RBD_FEATURE_EXCLUSIVE_LOCK:
        raise BlockError(
            errno.EINVAL,
            f"{target.spec} lacks the exclusive-lock feature, which vblk needs to be its only writer "
            f"(rbd feature enable {target.spec} exclusive-lock)",
        )
    owners = ceph.lock_owners(image)
    if owners and not target.take_over:
        raise ImageLockedError(
            errno.EBUSY,
            f"{target.spec} is in use by {', '.join(owners)}; if that vblk is dead, start with "
            f"--take-over to break its lock (it is blocklisted)",
        )
    for owner in owners:
        log.warning("rbd_lock_break", image=target.spec, owner=owner, me=rados.address())
        result = lib.rbd_lock_break(image, ceph.RBD_LOCK_MODE_EXCLUSIVE, owner.encode())
        if result < 0 and result != -errno.ENOENT:
            ceph.check(result, f"breaking the lock of {owner} on {target.spec}")
    result = lib.rbd_lock_acquire(image, ceph.RBD_LOCK_MODE_EXCLUSIVE)
    if result in (-errno.EROFS, -errno.EBUSY):
        owners = ceph.lock_owners(image)
        raise ImageLockedError(
            errno.EBUSY, f"{target.spec} is in use by {', '.join(owners) or 'another client'}"
        )
    ceph.check(result, f"locking {target.spec}")
