"""Persistent dirty bitmaps of a raw image: a sidecar file beside it, ``IMAGE.bitmaps``.

Block layer, a :class:`device.block.dirty.BitmapStore` for :mod:`device.block.file` images (a raw
image has no room of its own; qcow2 images keep theirs inside, :mod:`device.block.qcow2_bitmaps`).
The file is JSON: ``{"format": "vblk-bitmaps", "version": 1, "image_size", "bitmaps": [{"name",
"granularity", "enabled", "in_use", "data"}]}``, ``data`` the bit array (the qcow2 extension's bit
order) zlib-compressed and base64-encoded. The qcow2 rule for ``in_use`` holds: a writable open
rewrites the file with every bitmap in use before the disk takes a write, a clean close writes
them back clear, so after a crash they load inconsistent. Every rewrite is atomic (a new file,
fsync, rename, fsync of the directory). A sidecar that cannot be read is moved aside to
``IMAGE.bitmaps.damaged`` (nothing is lost) and the disk starts without bitmaps; one for an
image of another size (resized by a program that does not know the sidecar) loads inconsistent.
Only writes through vblk are tracked: a program that writes the image itself must remove the
sidecar.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import structlog

from device.block.dirty import BitmapRecord, bitmap_bytes, check_granularity, check_name
from device.block.node import BlockError, BlockNode

log = structlog.get_logger("vblk.device.block")

FORMAT: Final = "vblk-bitmaps"
VERSION: Final = 1
SUFFIX: Final = ".bitmaps"
#: What reading a damaged sidecar raises (RecursionError: JSON nested too deeply).
_DAMAGE: Final = (ValueError, KeyError, TypeError, RecursionError, binascii.Error, zlib.error, BlockError)


def sidecar_path(image: Path) -> Path:
    return image.with_name(image.name + SUFFIX)


class SidecarStore:
    """The bitmaps of the raw image at ``image`` (opened as ``node``), kept in ``IMAGE.bitmaps``."""

    def __init__(self, image: Path, node: BlockNode) -> None:
        self.image = image
        self.path = sidecar_path(image)
        self.node = node
        self.read_only = node.capabilities.read_only

    @property
    def size(self) -> int:
        return self.node.size

    @property
    def where(self) -> str:
        return f"sidecar file {self.path}"

    def refusal(self) -> str | None:
        if self.read_only:
            return "the disk is read-only"
        return None

    def load(self) -> list[BitmapRecord]:
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            records = self._parse(text)
        except (
            ValueError,
            KeyError,
            TypeError,
            RecursionError,
            binascii.Error,
            zlib.error,
            BlockError,
        ) as bad:
            if self.read_only:
                log.warning("bitmaps_sidecar_unreadable", path=str(self.path), error=str(bad))
                return []
            aside = self.path.with_name(self.path.name + ".damaged")
            os.replace(self.path, aside)
            log.warning("bitmaps_sidecar_damaged", path=str(self.path), moved_to=str(aside), error=str(bad))
            return []
        if not self.read_only and records:
            self._write([BitmapRecord(r.name, r.granularity, r.enabled, True, r.data) for r in records])
        return records

    def _parse(self, text: bytes) -> list[BitmapRecord]:
        document = json.loads(text)
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        if document.get("version") != VERSION:
            raise ValueError(f"version {document.get('version')!r}, not {VERSION}")
        resized = document["image_size"] != self.size
        records: list[BitmapRecord] = []
        names: set[str] = set()
        for entry in document["bitmaps"]:
            name = entry["name"]
            granularity = entry["granularity"]
            if not isinstance(name, str) or type(granularity) is not int or name in names:
                raise ValueError(f"bitmap entry {name!r}: a name (unique) and a granularity")
            check_name(name, new=False)
            check_granularity(granularity)
            names.add(name)
            expected = bitmap_bytes(document["image_size"], granularity)
            inflate = zlib.decompressobj()
            data = inflate.decompress(base64.b64decode(entry["data"], validate=True), expected + 1)
            if len(data) != expected or not inflate.eof:
                raise ValueError(f"bitmap {name!r}: {len(data)} bytes of data do not fit its image size")
            in_use = bool(entry["in_use"])
            if resized:
                in_use = True  # the image changed size behind vblk's back: the bits may be wrong
                data = _fit(data, self.size, granularity)
            records.append(BitmapRecord(name, granularity, bool(entry["enabled"]), in_use, data))
        if resized:
            log.warning(
                "bitmaps_sidecar_resized", path=str(self.path), image_size=self.size,
                sidecar_size=document["image_size"],
            )  # fmt: skip
        return records

    def save(self, records: Sequence[BitmapRecord]) -> None:
        if self.read_only:
            raise BlockError(errno.EROFS, f"{self.where}: the disk is read-only")
        if not records:
            try:
                self.path.unlink()
            except FileNotFoundError:
                return
            _sync_directory(self.path.parent)
            return
        self._write(records)

    def _write(self, records: Sequence[BitmapRecord]) -> None:
        entries: list[dict[str, Any]] = [
            {
                "name": r.name,
                "granularity": r.granularity,
                "enabled": r.enabled,
                "in_use": r.in_use,
                "data": base64.b64encode(zlib.compress(r.data)).decode("ascii"),
            }
            for r in records
        ]
        document = {"format": FORMAT, "version": VERSION, "image_size": self.size, "bitmaps": entries}
        temporary = self.path.with_name(self.path.name + ".new")
        with open(temporary, "wb") as out:
            out.write(json.dumps(document, indent=1).encode())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)
        _sync_directory(self.path.parent)


def _fit(data: bytes, size: int, granularity: int) -> bytes:
    """``data`` cut or padded to a bitmap of ``granularity`` over ``size`` bytes, tail bits zero."""
    nbits = -(-size // granularity)
    nbytes = -(-nbits // 8)
    fitted = bytearray(data[:nbytes] if len(data) >= nbytes else data + bytes(nbytes - len(data)))
    if nbits & 7 and fitted:
        fitted[-1] &= (1 << (nbits & 7)) - 1
    return bytes(fitted)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
