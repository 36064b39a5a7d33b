"""Point-in-time views of a live disk: copy-before-write into a scratch file (QEMU's image fleecing).

Block layer, with :mod:`device.block.dirty`: the dirty-tracking layer, which sees every change on
its way to the storage, also holds a disk's :class:`View` objects. Before a write, write-zeroes or
discard reaches the storage, the layer has each view copy the *old* data of the clusters it is
about to change, and have not been copied yet, into the view's scratch file (a sparse file, the
old data at its own offset; a cluster that was all zeroes costs nothing but its bit). A view is
read through :class:`ViewNode`, a read-only storage node that answers each cluster from the
scratch file where it was copied and from the live disk where it was not, so what it reads is
the disk at the instant the view began, however the disk changes afterwards.

One lock per disk orders a view's reads of uncopied clusters against the copies: a change that
must copy waits for a view read of the same disk to finish, and a view read waits for a copy,
so a view never reads a cluster the disk is half-way through changing. Views need a stack whose
operations complete when called (files, qcow2, memory): the copy is made in the thread of the
change. When the scratch would grow past its limit, or a copy fails, the view breaks (QEMU's
``on-cbw-error=break-snapshot``): the disk's writes go on, and every later read of the view fails.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Final

import structlog

from device.block.node import (
    BlockError,
    BlockingNode,
    BlockNode,
    Capabilities,
    Extent,
    Outcome,
)

log = structlog.get_logger("vblk.device.block")

CLUSTER: Final = 64 * 1024  # the unit a view copies (QEMU's copy-before-write cluster)


class View:
    """The frozen image of a disk (``source``: the node under its tracking layer) from the instant
    the view was added: the bits of the clusters copied, and the scratch file holding them."""

    def __init__(self, name: str, source: BlockNode, scratch: str, limit: int) -> None:
        self.name = name
        self.source = source
        self.size = source.size
        self.scratch = scratch
        self.limit = limit
        self.fd = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(self.fd, self.size)
        except OSError:
            os.close(self.fd)
            os.unlink(scratch)
            raise
        clusters = -(-self.size // CLUSTER)
        self.copied = bytearray(-(-clusters // 8))
        self.clusters_copied = 0
        self.scratch_bytes = 0  # bytes of data the scratch file holds (zero clusters hold none)
        self.broken: str | None = None
        self.closed = False

    def is_copied(self, cluster: int) -> bool:
        return bool(self.copied[cluster >> 3] >> (cluster & 7) & 1)

    def _copy(self, cluster: int) -> None:
        """Save the old data of ``cluster`` (the caller holds the lock and found it uncopied)."""
        start = cluster * CLUSTER
        length = min(CLUSTER, self.size - start)
        data = bytearray(length)
        outcome = Outcome()
        self.source.readv(start, [memoryview(data)], outcome)
        outcome.result()
        if data.count(0) != length:
            if self.scratch_bytes + length > self.limit:
                raise BlockError(
                    errno.ENOSPC, f"view {self.name}: its scratch limit, {self.limit} bytes, is reached"
                )
            written = os.pwrite(self.fd, data, start)
            if written != length:
                raise BlockError(errno.EIO, f"view {self.name}: short write to {self.scratch}")
            self.scratch_bytes += length
        self.copied[cluster >> 3] |= 1 << (cluster & 7)
        self.clusters_copied += 1

    def before_change(self, offset: int, length: int) -> None:
        """Copy what ``[offset, offset+length)`` is about to overwrite (the caller holds the lock)."""
        if self.broken is not None or offset >= self.size or length <= 0:
            return
        first = offset // CLUSTER
        last = (min(offset + length, self.size) - 1) // CLUSTER
        for cluster in range(first, last + 1):
            if not self.is_copied(cluster):
                try:
                    self._copy(cluster)
                except OSError as failed:
                    self.broken = failed.strerror or str(failed)
                    log.warning("view_broken", view=self.name, reason=self.broken)
                    return

    def read(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers`` with the view's bytes from ``offset`` (the caller holds the lock)."""
        if self.broken is not None:
            raise BlockError(errno.EIO, f"view {self.name} is broken: {self.broken}")
        if self.closed:
            raise BlockError(errno.ESHUTDOWN, f"view {self.name} was removed")
        position = offset
        for buffer in buffers:
            done = 0
            total = buffer.nbytes
            while done < total:
                cluster = position // CLUSTER
                take = min(total - done, (cluster + 1) * CLUSTER - position)
                part = buffer[done : done + take]
                if self.is_copied(cluster):
                    got = os.preadv(self.fd, [part], position)
                    if got != take:
                        raise BlockError(errno.EIO, f"view {self.name}: short read of {self.scratch}")
                else:
                    outcome = Outcome()
                    self.source.readv(position, [part], outcome)
                    outcome.result()
                done += take
                position += take

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The live disk's map where nothing was copied; copied clusters are data."""
        out: list[Extent] = []
        for extent in self.source.extents(offset, length):
            position = extent.offset
            end = extent.offset + extent.length
            while position < end:
                cluster = position // CLUSTER
                stop = min(end, (cluster + 1) * CLUSTER)
                copied = self.is_copied(cluster)
                hole = extent.hole and not copied
                zero = extent.zero and not copied
                last = out[-1] if out else None
                if last is not None and last.hole == hole and last.zero == zero:
                    out[-1] = Extent(last.offset, last.length + stop - position, hole, zero)
                else:
                    out.append(Extent(position, stop - position, hole, zero))
                position = stop
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "scratch": self.scratch,
            "scratch_bytes": self.scratch_bytes,
            "scratch_limit": self.limit,
            "clusters_copied": self.clusters_copied,
            "broken": self.broken,
        }

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        os.close(self.fd)
        try:
            os.unlink(self.scratch)
        except FileNotFoundError:
            pass


class ViewNode(BlockingNode):
    """A view as a read-only storage node: what its own virtio-blk device serves."""

    kind = "view"

    def __init__(self, view: View, lock: threading.Lock, of: str) -> None:
        super().__init__(view.size, True)
        self.view = view
        self.lock = lock  # the source's tracking layer's view lock
        self.of = of

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(read_only=True, discard=False, fast_zero=False, cache=False, extents=True)

    def read_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        with self.lock:
            self.view.read(offset, buffers)

    def write_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        raise BlockError(errno.EROFS, f"view {self.view.name} is read-only")

    def zero_now(self, offset: int, length: int, may_unmap: bool) -> None:
        raise BlockError(errno.EROFS, f"view {self.view.name} is read-only")

    def extents(self, offset: int, length: int) -> list[Extent]:
        with self.lock:
            return self.view.extents(offset, length)

    def advise_willneed(self, offset: int, length: int) -> None:
        pass

    def resize(self, new_size: int) -> None:
        raise BlockError(errno.EROFS, f"view {self.view.name} keeps the size its disk had")

    def describe(self) -> dict[str, Any]:
        return {"node": self.kind, "of": self.of, "scratch": self.view.scratch}

    def counters(self) -> Mapping[str, int]:
        view = self.view
        return {"view_scratch_bytes": view.scratch_bytes, "view_clusters_copied": view.clusters_copied}

    def close(self) -> None:
        pass  # the view is the tracking layer's: it closes it when the view is removed
