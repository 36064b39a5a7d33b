"""External snapshots and commit of a live disk: a new qcow2 overlay on top, and back down again.

Service layer, beside :mod:`service.views`; the block work is the dirty-tracking layer's, whose
storage node (the layer's inner node) is what changes. A **snapshot** drains the disk, flushes and
closes its image, creates a qcow2 overlay backed by it (the image becomes a read-only base), opens
the overlay and makes it the layer's storage, all in one drained section: requests wait in their
virtqueues meanwhile, none is lost, reordered or failed. A **commit** copies what the overlay
holds into its base while the disk keeps taking writes (QEMU's active commit): the base is
reopened writable under the overlay (in a short drained section), the overlay's own clusters are
copied down, the writes that land meanwhile are tracked by an internal bitmap and copied again,
and in a last drained section the rest is copied, the base flushed and made the storage again.
The overlay file is left as it is (it is no longer used). Both need a file disk (raw or qcow2)
without point-in-time views (their copies read the storage being replaced).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import os
from pathlib import Path
from typing import Any, Final

import structlog

from device.block.bitmap_sidecar import SidecarStore
from device.block.dirty import BitmapStore, DirtyLayer
from device.block.file import FileNode
from device.block.node import BlockError, BlockNode
from device.block.qcow2 import Qcow2Node, create_image
from device.block.qcow2_bitmaps import Qcow2BitmapStore
from service.model import Disk
from service.values import DISK_NAME

log = structlog.get_logger("vblk.service")

COPY_CHUNK: Final = 1 << 20  # a commit copies this much between turns of the event loop
SETTLE_BYTES: Final = 4 << 20  # dirty bytes left for the last drained pass of a commit
MAX_PASSES: Final = 16  # live passes before the last one drains the disk whatever is left


class SnapshotError(Exception):
    """A snapshot or commit refused: ``kind`` (``refused``, ``exists``, ``bad_name``, ``unavailable``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclasses.dataclass(slots=True)
class Image:
    """One image of a disk's chain: where it is and in which format."""

    path: Path
    format: str

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format}


class Snapshots:
    """The chains of the running service's disks: their top image, and what lies beneath."""

    def __init__(self) -> None:
        self.tops: dict[str, Image] = {}
        self.committing: set[str] = set()

    def top(self, disk: Disk) -> Image:
        return self.tops.get(disk.spec.name) or Image(disk.spec.path, disk.spec.format)

    def _layer(self, disk: Disk) -> DirtyLayer:
        layer = disk.bytes.dirty
        if disk.spec.backend != "file" or layer is None:
            raise SnapshotError(
                "refused", f"disk {disk.spec.name} is not a file disk: it has no external snapshots"
            )
        if disk.bytes.read_only:
            raise SnapshotError("refused", f"disk {disk.spec.name} is read-only")
        if layer.views:
            raise SnapshotError("refused", f"disk {disk.spec.name} has point-in-time views: stop them first")
        if disk.spec.name in self.committing:
            raise SnapshotError("unavailable", f"disk {disk.spec.name} is being committed")
        return layer

    async def snapshot(self, disk: Disk, overlay_name: str) -> dict[str, Any]:
        """Make the disk's current image a read-only base under a new qcow2 overlay named
        ``overlay_name`` (a file in the image's directory), live."""
        async with disk.bytes.control_lock:  # one snapshot, commit or view change at a time
            return await self._snapshot(disk, overlay_name)

    async def _snapshot(self, disk: Disk, overlay_name: str) -> dict[str, Any]:
        layer = self._layer(disk)
        if not DISK_NAME.fullmatch(overlay_name) or overlay_name.startswith("."):
            raise SnapshotError("bad_name", "an overlay is a file name: letters, digits, '.', '_', '-'")
        base = self.top(disk)
        overlay = base.path.parent / overlay_name
        if overlay.exists():
            raise SnapshotError("exists", f"{overlay_name} already exists beside the image")
        spec = disk.spec

        def switch() -> None:
            if layer.views:
                raise BlockError(errno.EBUSY, "the disk has point-in-time views")
            old = layer.inner
            _flush(old)
            create_image(overlay, old.size, backing=str(base.path.resolve()), backing_format=base.format)
            closed = False
            try:
                layer.save()  # the bitmaps, consistent, in the base as of this instant
                old.close()
                closed = True
                node = Qcow2Node.open(overlay, read_only=False, l2_cache_bytes=spec.l2_cache_size)
            except BaseException:
                # back on the image it had (its bitmaps marked in use again by the store's load)
                back = _reopen(base, spec.l2_cache_size) if closed else old
                layer.replace_inner(back, _store(back, base))
                overlay.unlink(missing_ok=True)
                raise
            try:
                layer.replace_inner(node, Qcow2BitmapStore(node))
            except BaseException:
                node.close()
                reopened = _reopen(base, spec.l2_cache_size)
                layer.replace_inner(reopened, _store(reopened, base))
                overlay.unlink(missing_ok=True)
                raise

        try:
            await disk.bytes.quiesced(switch)
        except TimeoutError:
            raise SnapshotError("unavailable", f"disk {spec.name}: requests in flight did not end") from None
        except OSError as failed:
            raise SnapshotError("refused", f"snapshot of {spec.name}: {failed.strerror or failed}") from None
        self.tops[spec.name] = Image(overlay, "qcow2")
        disk.bytes.has_chain = True
        log.info("snapshot_taken", disk=spec.name, base=str(base.path), overlay=str(overlay))
        return {"disk": spec.name, "top": self.tops[spec.name].describe(), "base": base.describe()}

    async def commit(self, disk: Disk) -> dict[str, Any]:
        """Copy the top overlay into its base and continue on the base, live."""
        async with disk.bytes.control_lock:
            return await self._commit(disk)

    async def _commit(self, disk: Disk) -> dict[str, Any]:
        layer = self._layer(disk)
        top_image = self.top(disk)
        top = layer.inner
        if not isinstance(top, Qcow2Node) or top.backing is None:
            raise SnapshotError(
                "refused", f"disk {disk.spec.name}'s image has no backing file to commit into"
            )
        base = _backing_image(top, top_image.path)
        spec = disk.spec
        self.committing.add(spec.name)
        layer.replacing = True
        tracked = None
        try:

            def reopen_base() -> BlockNode:
                nonlocal tracked
                below = top.backing
                assert below is not None
                below.close()
                top.backing = None
                try:
                    writable = _reopen(base, spec.l2_cache_size)
                except BaseException:
                    top.backing = _reopen(base, spec.l2_cache_size, read_only=True)
                    raise
                top.backing = writable
                tracked = layer.track()
                return writable

            writable = await disk.bytes.quiesced(reopen_base)
            assert tracked is not None
            changes = tracked
            copied = 0
            for offset, length, depth in top.allocation_depth(0, top.size):
                if depth == 1:
                    copied += await _copy(top, writable, offset, length)
            passes = 0
            while changes.dirty_bytes() > SETTLE_BYTES and passes < MAX_PASSES:
                # taken drained: every write marked so far has landed, so what is copied next is
                # at least as new as what the bits stood for (a later write marks them again)
                runs = await disk.bytes.quiesced(functools.partial(layer.take, changes))
                copied += await _copy_runs(top, writable, runs)
                passes += 1

            def pivot() -> int:
                runs = layer.take(changes)
                done = 0
                for offset, length in runs:
                    done += _copy_now(top, writable, offset, length)
                _flush(writable)
                store = _store(writable, base)
                store.load()  # may fail: then nothing has changed, the overlay serves on
                layer.untrack(changes)
                layer.replace_inner(writable, store, loaded=True)
                top.backing = None  # the base stays open: it is the storage now
                try:
                    top.close()
                except OSError as failed:  # the overlay is left behind anyway
                    log.warning(
                        "commit_overlay_close_failed", disk=spec.name, error=failed.strerror or str(failed)
                    )
                return done

            copied += await disk.bytes.quiesced(pivot)
            tracked = None
        except TimeoutError:
            raise SnapshotError("unavailable", f"disk {spec.name}: requests in flight did not end") from None
        except OSError as failed:
            raise SnapshotError("refused", f"commit of {spec.name}: {failed.strerror or failed}") from None
        finally:
            if tracked is not None:
                layer.untrack(tracked)
            layer.replacing = False
            self.committing.discard(spec.name)
        if base.path == spec.path:
            self.tops.pop(spec.name, None)
        else:
            self.tops[spec.name] = base
        disk.bytes.has_chain = isinstance(writable, Qcow2Node) and writable.backing is not None
        log.info("commit_done", disk=spec.name, top=str(top_image.path), base=str(base.path), copied=copied)
        return {
            "disk": spec.name,
            "top": base.describe(),
            "committed": top_image.describe(),
            "copied": copied,
        }


def _flush(node: BlockNode) -> None:
    if isinstance(node, FileNode | Qcow2Node):
        node.flush_now()


def _backing_image(top: Qcow2Node, path: Path) -> Image:
    name = top.backing_name
    target = Path(name) if os.path.isabs(name) else path.parent / name
    return Image(target, top.backing_format)


def _reopen(image: Image, l2_cache: int, *, read_only: bool = False) -> FileNode | Qcow2Node:
    if image.format == "qcow2":
        return Qcow2Node.open(image.path, read_only=read_only, l2_cache_bytes=l2_cache)
    return FileNode.open(image.path, read_only=read_only, create=False)


def _store(node: BlockNode, image: Image) -> BitmapStore:
    if isinstance(node, Qcow2Node):
        return Qcow2BitmapStore(node)
    return SidecarStore(image.path, node)


def _copy_now(source: Qcow2Node, target: BlockNode, offset: int, length: int) -> int:
    end = offset + length
    buffer = bytearray(COPY_CHUNK)
    position = offset
    while position < end:
        take = min(COPY_CHUNK, end - position)
        view = memoryview(buffer)[:take]
        source.read_now(position, [view])
        if isinstance(target, FileNode | Qcow2Node):
            target.write_now(position, [view])
        else:
            raise BlockError(errno.ENOTSUP, "commit into storage that is not a file")
        position += take
    return length


async def _copy(source: Qcow2Node, target: BlockNode, offset: int, length: int) -> int:
    """Copy a range in chunks, letting the event loop serve requests between them."""
    position = offset
    end = offset + length
    while position < end:
        take = min(COPY_CHUNK, end - position)
        _copy_now(source, target, position, take)
        position += take
        await asyncio.sleep(0)
    return length


async def _copy_runs(source: Qcow2Node, target: BlockNode, runs: list[tuple[int, int]]) -> int:
    copied = 0
    for offset, length in runs:
        copied += await _copy(source, target, offset, length)
    return copied
