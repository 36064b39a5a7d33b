"""Point-in-time views as disks: each one a read-only virtio-blk device plugged in while vblk runs.

Service layer, beside the composition root (:mod:`service.app` owns one :class:`Views`). Starting a
view drains the source disk, has its tracking layer begin copying before writes
(:mod:`device.block.fleece`) and, in the same drained instant, takes a checkpoint when asked (so
the view and the bitmap describe one instant: an incremental backup is consistent); then it plugs
a new virtio-blk PCI function whose storage is the view, lets the guest driver probe it, and
exports it under the view's name over NBD and REST like any disk (read-only, with the source's
bitmaps as its meta contexts). Stopping a view unexports it, unplugs the device and removes its
scratch file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import os
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from device.blk import BlkConfig, VirtioBlkDevice, plug_blk
from device.block.dirty import BitmapError, DirtyLayer
from device.block.fleece import View, ViewNode
from device.block.node import BlockNode
from device.block.rbd import RbdNode
from service.blockio import ByteDisk, StackControl
from service.model import Disk, DiskSpec
from service.nbd.settings import NbdExport
from service.values import DISK_NAME

if TYPE_CHECKING:
    from device.machine import Machine
    from driver.guest import Guest

log = structlog.get_logger("vblk.service")


class ViewError(Exception):
    """A view cannot be started or stopped as asked: ``kind`` says why, for the front end."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # no_such_disk, no_such_view, view_exists, bad_name, refused, unavailable
        self.message = message


@dataclasses.dataclass(slots=True)
class LiveView:
    """A started view: its disk, where it came from, and the bitmap its backup reads."""

    name: str
    source: str
    view: View | None  # copy-before-write into a scratch file; None for an RBD snapshot
    device: VirtioBlkDevice
    disk: Disk
    bitmap: str | None  # the bitmap frozen with it (its checkpoint's), if any
    rbd_snapshot: str | None = None  # an RBD disk's view: the snapshot it reads

    def describe(self) -> dict[str, Any]:
        if self.view is not None:
            described = self.view.describe()
        else:
            described = {
                "name": self.name, "size": self.disk.bytes.size, "scratch": None, "scratch_bytes": 0,
                "scratch_limit": None, "clusters_copied": 0, "broken": None,
            }  # fmt: skip
        return {**described, "disk": self.source, "bitmap": self.bitmap, "rbd_snapshot": self.rbd_snapshot}


class Views:
    """Every view of the running service, by name (a view's name is a disk name too)."""

    def __init__(
        self,
        machine: Machine,
        guest: Guest,
        disks: MutableMapping[str, Disk],
        exports: MutableMapping[str, NbdExport],
    ) -> None:
        self.machine = machine
        self.guest = guest
        self.disks = disks
        self.exports = exports  # the NBD server's live export table (empty without NBD)
        self.views: dict[str, LiveView] = {}
        self._plugging = asyncio.Lock()

    def _tracking(self, disk_name: str) -> tuple[Disk, DirtyLayer]:
        disk = self.disks.get(disk_name)
        if disk is None:
            raise ViewError("no_such_disk", "no disk has that name: GET /v1/disks lists them")
        if disk_name in self.views:
            raise ViewError("refused", f"{disk_name} is a view: a view of a view is not made")
        layer = disk.bytes.dirty
        if layer is None or not isinstance(disk.device, VirtioBlkDevice):
            raise ViewError("refused", f"disk {disk_name}'s storage is another process's: it has no views")
        return disk, layer

    async def start(
        self,
        disk_name: str,
        name: str,
        *,
        checkpoint: str | None = None,
        bitmap: str | None = None,
        scratch_limit: int | None = None,
        scratch_dir: Path | None = None,
    ) -> LiveView:
        """Start view ``name`` of disk ``disk_name`` (with ``checkpoint``: a new recording bitmap,
        the recording ones disabled, at the view's instant)."""
        disk, layer = self._tracking(disk_name)
        if not DISK_NAME.fullmatch(name):
            raise ViewError("bad_name", "a view's name is a disk name: letters, digits, '.', '_', '-'")
        if name in self.disks:
            raise ViewError("view_exists", f"a disk or view is already named {name}")
        if bitmap is not None and checkpoint is not None:
            raise ViewError("refused", "give a checkpoint (a new bitmap) or the bitmap to read, not both")
        if bitmap is not None:
            try:
                layer.get(bitmap)
            except BitmapError as refused:
                raise ViewError(_bitmap_kind(refused), str(refused)) from None
        if isinstance(layer.inner, RbdNode):
            return await self._start_rbd(disk, layer, layer.inner, name, checkpoint, bitmap)
        directory = scratch_dir or _scratch_dir(disk.spec)
        scratch = str(directory / f".{disk_name}.{name}.{os.getpid()}.scratch")
        limit = disk.bytes.size if scratch_limit is None else scratch_limit

        def begin() -> tuple[View, str | None, list[str]]:
            view = layer.add_view(name, scratch, limit)  # first: simply undone if the rest fails
            if checkpoint is None:
                return view, bitmap, []
            try:
                _, disabled = layer.checkpoint(checkpoint, persistent=layer.persistence_refusal() is None)
            except BaseException:
                layer.remove_view(name)
                raise
            return view, disabled[0] if len(disabled) == 1 else None, disabled

        async with disk.bytes.control_lock:  # one snapshot, commit or view change of a disk at a time
            if name in self.disks:
                raise ViewError("view_exists", f"a disk or view is already named {name}")
            try:
                view, frozen, disabled = await disk.bytes.quiesced(begin)
            except BitmapError as refused:  # EBUSY here: a commit is running
                kind = "refused" if refused.errno == errno.EBUSY else _bitmap_kind(refused)
                raise ViewError(kind, str(refused)) from None
            except TimeoutError:
                raise ViewError("unavailable", f"disk {disk_name}: requests in flight did not end") from None
            except OSError as failed:  # the scratch file
                raise ViewError("refused", f"scratch file {scratch}: {failed.strerror or failed}") from None
            try:
                node = ViewNode(view, layer.view_lock, disk.spec.name)
                live = await self._plug(disk, layer, node, name, frozen, view, None)
            except BaseException:
                layer.remove_view(name)
                if checkpoint is not None:  # the view failed: so did its checkpoint, losing no write
                    await disk.bytes.quiesced(functools.partial(layer.undo_checkpoint, checkpoint, disabled))
                raise
        log.info(
            "view_started", disk=disk_name, view=name, scratch=scratch, checkpoint=checkpoint, bitmap=frozen
        )
        return live

    async def _start_rbd(
        self,
        disk: Disk,
        layer: DirtyLayer,
        source: RbdNode,
        name: str,
        checkpoint: str | None,
        bitmap: str | None,
    ) -> LiveView:
        """An RBD disk's view: an RBD snapshot taken drained, opened read-only by a client of its own
        (RBD keeps the old data itself: no copy before writes)."""
        snapshot = f"vblk-view-{name}"

        def begin() -> tuple[str | None, list[str]]:
            source.snap_create(snapshot)
            if checkpoint is None:
                return bitmap, []
            try:
                _, disabled = layer.checkpoint(checkpoint, persistent=layer.persistence_refusal() is None)
            except BaseException:
                source.snap_remove(snapshot)
                raise
            return disabled[0] if len(disabled) == 1 else None, disabled

        async with disk.bytes.control_lock:
            if name in self.disks:
                raise ViewError("view_exists", f"a disk or view is already named {name}")
            try:
                frozen, disabled = await disk.bytes.quiesced(begin)
            except BitmapError as refused:
                raise ViewError(_bitmap_kind(refused), str(refused)) from None
            except TimeoutError:
                raise ViewError(
                    "unavailable", f"disk {disk.spec.name}: requests in flight did not end"
                ) from None
            except OSError as failed:
                raise ViewError("refused", f"RBD snapshot {snapshot}: {failed.strerror or failed}") from None
            try:
                target = dataclasses.replace(
                    source.target, snapshot=snapshot, read_only=True, create_size=None, take_over=False
                )
                node = await asyncio.to_thread(RbdNode.open, target)
                try:
                    live = await self._plug(disk, layer, node, name, frozen, None, snapshot)
                except BaseException:
                    node.close()
                    raise
            except BaseException:
                source.snap_remove(snapshot)
                if checkpoint is not None:
                    await disk.bytes.quiesced(functools.partial(layer.undo_checkpoint, checkpoint, disabled))
                raise
        log.info("view_started", disk=disk.spec.name, view=name, rbd_snapshot=snapshot, bitmap=frozen)
        return live

    async def _plug(
        self,
        source: Disk,
        layer: DirtyLayer,
        node: BlockNode,
        name: str,
        bitmap: str | None,
        view: View | None,
        rbd_snapshot: str | None,
    ) -> LiveView:
        spec = DiskSpec(name=name, backend="view", size=node.size, read_only=True)
        async with self._plugging:  # one probe at a time: each binds the function just plugged
            device = plug_blk(self.machine, node, BlkConfig(serial=name[:20], read_only=True))
            driver = None
            try:
                (driver,) = await self.guest.probe()
                serial = await driver.get_id()
            except BaseException:
                if driver is not None:
                    await self.guest.unbind(driver)
                device.close()
                self.machine.unplug(device.pci_slot)
                raise
        driver.observer = source.driver.observer
        port = ByteDisk(name, driver, StackControl(node, device))
        port.dirty = layer  # the source's bitmaps, read through the view (never changed: read-only)
        port.default_bitmap = bitmap
        disk = Disk(spec, device, driver, serial, port)
        self.disks[name] = disk
        live = LiveView(name, source.spec.name, view, device, disk, bitmap, rbd_snapshot)
        self.views[name] = live
        self.exports[name] = NbdExport(port, f"vblk point-in-time view {name} of {source.spec.name}")
        return live

    async def stop(self, name: str) -> LiveView:
        live = self.views.get(name)
        if live is None:
            raise ViewError("no_such_view", "no view has that name")
        source = self.disks.get(live.source)
        if source is None:
            return await self._stop(name)
        async with source.bytes.control_lock:
            return await self._stop(name)

    async def _stop(self, name: str) -> LiveView:
        live = self.views.pop(name, None)
        if live is None:
            raise ViewError("no_such_view", "no view has that name")
        self.exports.pop(name, None)
        self.disks.pop(name, None)
        try:
            await self.guest.unbind(live.disk.driver)
        except OSError as failed:  # the device goes anyway: nothing reads it any more
            log.warning("view_driver_close_failed", view=name, error=failed.strerror or str(failed))
        finally:
            live.device.close()
            self.machine.unplug(live.device.pci_slot)
            source = self.disks.get(live.source)
            layer = source.bytes.dirty if source is not None else None
            if live.view is not None and layer is not None:
                layer.remove_view(name)
            if live.rbd_snapshot is not None:
                live.device.node.close()
                if layer is not None and isinstance(layer.inner, RbdNode):
                    try:
                        layer.inner.snap_remove(live.rbd_snapshot)
                    except OSError as failed:
                        log.warning(
                            "view_snapshot_not_removed", view=name, error=failed.strerror or str(failed)
                        )
        log.info("view_stopped", disk=live.source, view=name, **(_sizes(live.view) if live.view else {}))
        return live

    async def stop_all(self) -> None:
        for name in list(self.views):
            await self.stop(name)

    def of(self, disk_name: str) -> list[LiveView]:
        return [live for live in self.views.values() if live.source == disk_name]


def _sizes(view: View) -> dict[str, Any]:
    return {
        "scratch_bytes": view.scratch_bytes,
        "clusters_copied": view.clusters_copied,
        "broken": view.broken,
    }


def _bitmap_kind(error: BitmapError) -> str:
    return {
        errno.EEXIST: "bitmap_exists",
        errno.ENOENT: "no_such_bitmap",
        errno.EBUSY: "bitmap_inconsistent",
    }.get(error.errno or 0, "refused")


def _scratch_dir(spec: DiskSpec) -> Path:
    """Beside a file disk's image (same file system, so sparse), else the system's temporary one."""
    if spec.backend == "file":
        return spec.path.resolve().parent
    return Path(tempfile.gettempdir())
