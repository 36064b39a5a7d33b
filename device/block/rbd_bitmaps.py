"""Persistent dirty bitmaps of an RBD disk, kept the RBD way: each one is an RBD snapshot.

Block layer, a :class:`device.block.dirty.BitmapStore` for :mod:`device.block.rbd` images. A
persistent bitmap is the snapshot ``vblk-bitmap-NAME`` taken when it began (in the drained
instant of its ``POST`` or checkpoint) and, once it stops recording, a second one,
``vblk-bitmap-NAME.end``. Loading asks librbd's diff iteration (``rbd_diff_iterate2``, what ``rbd
export-diff`` uses) what changed between the two, or since the first one, and sets those bits: a
crash loses nothing, so these bitmaps are never inconsistent. Their list, granularities and
snapshot names live in the image's metadata (``vblk.bitmaps``, JSON), written before a snapshot
is removed and after one is made, so a crash can at worst leave an unused snapshot behind.
Enabling a disabled bitmap drops its end snapshot: it then counts the writes of the time it was
disabled too (more than QEMU's would, never fewer). Merging into one is refused: a snapshot
cannot hold another bitmap's bits.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any, Final

import structlog

from device.block.dirty import Bitmap, BitmapError, BitmapRecord
from device.block.node import BlockError
from device.block.rbd import RbdNode

log = structlog.get_logger("vblk.device.block")

KEY: Final = "vblk.bitmaps"
_PLAIN: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")


def snapshot_name(bitmap: str) -> str:
    """``vblk-bitmap-NAME``, or a digest of the name where it is not a plain one."""
    if _PLAIN.fullmatch(bitmap):
        return f"vblk-bitmap-{bitmap}"
    return "vblk-bitmap-" + hashlib.sha256(bitmap.encode("utf-8", "surrogatepass")).hexdigest()[:24]


class RbdBitmapStore:
    """The persistent bitmaps of the RBD image ``node`` serves (its snapshots and metadata)."""

    def __init__(self, node: RbdNode) -> None:
        self.node = node
        self.entries: dict[str, dict[str, Any]] = {}

    @property
    def where(self) -> str:
        return f"RBD image {self.node.target.spec} (snapshots vblk-bitmap-*)"

    def refusal(self) -> str | None:
        if self.node.read_only:
            return "the disk is read-only"
        return None

    def _write(self) -> None:
        self.node.set_metadata(KEY, json.dumps({"version": 1, "bitmaps": list(self.entries.values())}))

    def load(self) -> list[BitmapRecord]:
        text = self.node.metadata(KEY)
        if text is None:
            return []
        try:
            document = json.loads(text)
            entries = [dict(e) for e in document["bitmaps"]]
            for entry in entries:
                if not isinstance(entry["name"], str) or type(entry["granularity"]) is not int:
                    raise ValueError("an entry without a name or a granularity")
        except (ValueError, KeyError, TypeError, RecursionError) as bad:
            log.warning("rbd_bitmaps_metadata_damaged", image=self.node.target.spec, error=str(bad))
            return []
        records: list[BitmapRecord] = []
        size = self.node.size
        for entry in entries:
            name = entry["name"]
            bitmap = Bitmap(name, size, entry["granularity"], persistent=True)
            in_use = False
            try:
                for offset, length in self.node.changed_since(entry["from"], entry.get("end")):
                    bitmap.mark(offset, length)
            except OSError as missing:  # a snapshot removed behind vblk's back: the bits are unknown
                log.warning(
                    "rbd_bitmap_snapshot_missing", bitmap=name, error=missing.strerror or str(missing)
                )
                in_use = True
            self.entries[name] = entry
            records.append(
                BitmapRecord(name, bitmap.granularity, entry.get("end") is None, in_use, bytes(bitmap.bits))
            )
        return records

    def save(self, records: Sequence[BitmapRecord]) -> None:
        """The snapshots are made as bitmaps change; at a clean close only the list is rewritten
        (a bitmap left out is removed, its snapshots too)."""
        keep = {r.name for r in records}
        for name in [n for n in self.entries if n not in keep]:
            self.bitmap_removed(name)
        self._write()

    # -- as the bitmaps change (the layer calls these with the device drained) ---------------------

    def bitmap_added(self, bitmap: Bitmap) -> None:
        snapshot = snapshot_name(bitmap.name)
        self._snap(snapshot)
        entry: dict[str, Any] = {"name": bitmap.name, "granularity": bitmap.granularity, "from": snapshot}
        if not bitmap.enabled:
            entry["end"] = snapshot
        self.entries[bitmap.name] = entry
        self._write()

    def bitmap_removed(self, name: str) -> None:
        entry = self.entries.pop(name, None)
        if entry is None:
            return
        self._write()
        for snapshot in {entry["from"], entry.get("end")} - {None}:
            self._unsnap(str(snapshot))

    def bitmap_cleared(self, name: str) -> None:
        entry = self.entries.get(name)
        if entry is None:
            return
        recording = entry.get("end") is None
        old = {entry["from"], entry.get("end")} - {None}
        fresh = snapshot_name(name) + (".c" if entry["from"] == snapshot_name(name) else "")
        self._snap(fresh)
        entry["from"] = fresh
        if recording:
            entry.pop("end", None)
        else:
            entry["end"] = fresh
        self._write()
        for snapshot in old - {fresh}:
            self._unsnap(str(snapshot))

    def bitmap_enabled(self, name: str, enabled: bool) -> None:
        entry = self.entries.get(name)
        if entry is None or (entry.get("end") is None) == enabled:
            return
        if enabled:
            end = entry.pop("end")
            self._write()
            if end != entry["from"]:
                self._unsnap(str(end))
            return
        end = entry["from"] + ".end"
        self._snap(end)
        entry["end"] = end
        self._write()

    def merge_refusal(self) -> str:
        return "an RBD disk's persistent bitmap is a snapshot: it cannot take another bitmap's bits"

    def _snap(self, snapshot: str) -> None:
        try:
            self.node.snap_create(snapshot)
        except BlockError as failed:
            if failed.errno != errno.EEXIST:
                raise BitmapError(
                    failed.errno or errno.EIO, f"RBD snapshot {snapshot}: {failed.strerror}"
                ) from failed
            self.node.snap_remove(snapshot)  # left by a crash before its metadata was written
            self.node.snap_create(snapshot)

    def _unsnap(self, snapshot: str) -> None:
        try:
            self.node.snap_remove(snapshot)
        except OSError as failed:
            log.warning(
                "rbd_bitmap_snapshot_not_removed", snapshot=snapshot, error=failed.strerror or str(failed)
            )
