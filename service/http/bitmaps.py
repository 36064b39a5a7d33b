"""The REST API's dirty bitmaps and checkpoints, and the dirty extents of incremental backup.

Service layer, REST front end, beside :mod:`service.http.api` (whose routes list these handlers).
A disk's bitmaps are its dirty-tracking layer's (:mod:`device.block.dirty`), reached through the
disk port. Every change to them runs with the disk drained (:meth:`ByteDisk.quiesced`): no request
is in flight, so a write is either wholly before the change or wholly after it. A checkpoint adds
the next recording bitmap and disables the ones recording, in one drained section, as QEMU's
transaction of ``block-dirty-bitmap-add`` and ``-disable`` does. ``GET .../extents?context=dirty``
answers as ovirt-imageio does: ``[{"start", "length", "dirty", "zero"}]``.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from aiohttp import web

from service.blockio import (
    DEFAULT_GRANULARITY,
    MAX_GRANULARITY,
    MIN_GRANULARITY,
    Bitmap,
    BitmapError,
    ByteDisk,
    DirtyLayer,
    check_name,
)
from service.http.edge import observe, read_json_body
from service.http.errors import ApiError, ErrorCode
from service.http.params import JsonFields, parse_json_object, shown, takes_query
from service.http.responses import json_response
from service.snapshots import SnapshotError, Snapshots
from service.views import ViewError, Views

if TYPE_CHECKING:
    from service.model import Disk

log = structlog.get_logger("vblk.http")

T = TypeVar("T")

_QUOTED = re.compile(r"'([^']*)'")
_BY_ERRNO = {
    errno.ENOENT: ErrorCode.NO_SUCH_BITMAP,
    errno.EEXIST: ErrorCode.BITMAP_EXISTS,
    errno.EBUSY: ErrorCode.BITMAP_INCONSISTENT,
    errno.EINVAL: ErrorCode.BAD_FIELD,
}


def bitmap_api_error(error: BitmapError) -> ApiError:
    """A refused bitmap operation as the REST API answers it."""
    code = _BY_ERRNO.get(error.errno or 0, ErrorCode.BITMAP_REFUSED)
    return ApiError(code, _plain(error.strerror or str(error)))


def _dirty(disk: ByteDisk) -> DirtyLayer:
    layer = disk.dirty
    if layer is None:
        raise ApiError(
            ErrorCode.UNSUPPORTED, f"disk {disk.name} keeps no bitmaps (its storage is another process's)"
        )
    return layer


def _granularity(fields: JsonFields) -> int:
    if "granularity" not in fields.body:
        return DEFAULT_GRANULARITY
    return fields.uint("granularity", minimum=MIN_GRANULARITY, maximum=MAX_GRANULARITY)


def _bitmap_name(request: web.Request) -> str:
    """The bitmap a path names (:func:`_known_name`)."""
    return _known_name(request.match_info["bitmap"])


def _known_name(name: str) -> str:
    """``name``, if a bitmap could have it; else not found (over 1023 bytes)."""
    try:
        check_name(name, new=False)
    except BitmapError:
        quoted = shown(name)
        raise ApiError(
            ErrorCode.NO_SUCH_BITMAP, f"no bitmap is named {quoted}" if quoted else "no bitmap has that name"
        ) from None
    return name


class BitmapsApi:
    """The handlers of ``/v1/disks/{name}/bitmaps...`` and ``.../checkpoints``; ``disk`` finds
    the disk a request names (404 otherwise), ``writable`` refuses a read-only one (403)."""

    def __init__(self, disk: Callable[[web.Request], ByteDisk], writable: Callable[[ByteDisk], None]) -> None:
        self._disk = disk
        self._writable = writable

    async def _change(self, disk: ByteDisk, action: Callable[[], T]) -> T:
        """Run a change to the bitmaps with the disk drained; refusals become API errors."""
        try:
            return await disk.quiesced(action)
        except BitmapError as refused:
            raise bitmap_api_error(refused) from None
        except TimeoutError:
            raise ApiError(
                ErrorCode.UNAVAILABLE, f"disk {disk.name}: requests in flight did not end; try again"
            ) from None

    def _describe(self, disk: ByteDisk, bitmap: Bitmap) -> dict[str, Any]:
        layer = _dirty(disk)
        with layer.lock:
            described: dict[str, Any] = bitmap.describe()
        return described

    @takes_query()
    async def list_bitmaps(self, request: web.Request) -> web.Response:
        disk = self._disk(request)
        observe(request, disk.name, "bitmaps")
        layer = _dirty(disk)
        refusal = layer.persistence_refusal()
        store = layer.store
        return json_response(
            {
                "bitmaps": [self._describe(disk, b) for b in layer.bitmaps.values()],
                "persistence": {
                    "available": refusal is None,
                    "where": store.where if store is not None else None,
                    "reason": refusal,
                },
            }
        )

    @takes_query()
    async def get_bitmap(self, request: web.Request) -> web.Response:
        disk = self._disk(request)
        observe(request, disk.name, "bitmaps")
        try:
            bitmap = _dirty(disk).get(_bitmap_name(request), usable=False)
        except BitmapError as refused:
            raise bitmap_api_error(refused) from None
        return json_response(self._describe(disk, bitmap))

    @takes_query()
    async def add_bitmap(self, request: web.Request) -> web.Response:
        """``{"name", "granularity"?, "persistent"?, "disabled"?}``: a new clean bitmap, recording
        unless ``disabled``; persistent by default where the disk can keep it."""
        disk = self._disk(request)
        self._writable(disk)
        layer = _dirty(disk)
        body = parse_json_object(await read_json_body(request))
        fields = JsonFields(body, ("name", "granularity", "persistent", "disabled"), "a bitmap")
        name = fields.string("name")
        granularity = _granularity(fields)
        persistent = fields.boolean("persistent", layer.persistence_refusal() is None)
        disabled = fields.boolean("disabled", False)
        observe(request, disk.name, "bitmap_add")
        bitmap = await self._change(
            disk, lambda: layer.add(name, granularity, persistent=persistent, enabled=not disabled)
        )
        log.info("bitmap_added", disk=disk.name, bitmap=name, granularity=granularity, persistent=persistent)
        return json_response(self._describe(disk, bitmap), status=201)

    @takes_query()
    async def remove_bitmap(self, request: web.Request) -> web.Response:
        disk = self._disk(request)
        self._writable(disk)
        layer = _dirty(disk)
        name = _bitmap_name(request)
        observe(request, disk.name, "bitmap_remove")
        bitmap = await self._change(disk, lambda: layer.remove(name))
        log.info("bitmap_removed", disk=disk.name, bitmap=name)
        return json_response({"removed": bitmap.name})

    @takes_query()
    async def patch_bitmap(self, request: web.Request) -> web.Response:
        """``{"op": "clear" | "enable" | "disable"}`` or ``{"op": "merge", "bitmaps": [SOURCE, ...]}``
        (the sources OR-ed into this one, which keeps its own bits)."""
        disk = self._disk(request)
        self._writable(disk)
        layer = _dirty(disk)
        name = _bitmap_name(request)
        body = parse_json_object(await read_json_body(request))
        op = body.get("op")
        action: Callable[[], Bitmap]
        if op == "merge":
            sources = JsonFields(body, ("op", "bitmaps"), "op merge").strings("bitmaps")
            action = lambda: layer.merge(name, sources)  # noqa: E731
        elif op in ("clear", "enable", "disable"):
            JsonFields(body, ("op",), f"op {op}")
            if op == "clear":
                action = lambda: layer.clear(name)  # noqa: E731
            else:
                enabled = op == "enable"
                action = lambda: layer.set_enabled(name, enabled)  # noqa: E731
        else:
            raise ApiError(ErrorCode.BAD_OP, "op must be one of clear, enable, disable, merge")
        observe(request, disk.name, f"bitmap_{op}")
        bitmap = await self._change(disk, action)
        log.info("bitmap_changed", disk=disk.name, bitmap=name, op=op)
        return json_response(self._describe(disk, bitmap))

    @takes_query()
    async def checkpoint(self, request: web.Request) -> web.Response:
        """``{"bitmap": NEW, "granularity"?, "persistent"?}``: NEW starts recording and every
        bitmap recording until now stops, at one instant."""
        disk = self._disk(request)
        self._writable(disk)
        layer = _dirty(disk)
        body = parse_json_object(await read_json_body(request))
        fields = JsonFields(body, ("bitmap", "granularity", "persistent"), "a checkpoint")
        name = fields.string("bitmap")
        granularity = _granularity(fields)
        persistent = fields.boolean("persistent", layer.persistence_refusal() is None)
        observe(request, disk.name, "checkpoint")
        bitmap, disabled = await self._change(
            disk, lambda: layer.checkpoint(name, granularity, persistent=persistent)
        )
        log.info("checkpoint", disk=disk.name, bitmap=name, disabled=disabled)
        return json_response({"bitmap": self._describe(disk, bitmap), "disabled": disabled}, status=201)


_VIEW_CODES = {
    "no_such_disk": ErrorCode.NO_SUCH_DISK,
    "no_such_view": ErrorCode.NO_SUCH_VIEW,
    "view_exists": ErrorCode.VIEW_EXISTS,
    "bad_name": ErrorCode.BAD_FIELD,
    "refused": ErrorCode.VIEW_REFUSED,
    "unavailable": ErrorCode.UNAVAILABLE,
    "bitmap_exists": ErrorCode.BITMAP_EXISTS,
    "no_such_bitmap": ErrorCode.NO_SUCH_BITMAP,
    "bitmap_inconsistent": ErrorCode.BITMAP_INCONSISTENT,
}


class ViewsApi:
    """The handlers of ``/v1/disks/{name}/views...``: point-in-time views, each served as a disk."""

    def __init__(
        self,
        views: Callable[[], Views],
        disk: Callable[[web.Request], ByteDisk],
        writable: Callable[[ByteDisk], None],
    ) -> None:
        self._views = views
        self._disk = disk
        self._writable = writable

    @takes_query()
    async def list_views(self, request: web.Request) -> web.Response:
        disk = self._disk(request)
        observe(request, disk.name, "views")
        return json_response({"views": [live.describe() for live in self._views().of(disk.name)]})

    @takes_query()
    async def start_view(self, request: web.Request) -> web.Response:
        """``{"name", "checkpoint"?, "bitmap"?, "scratch_limit"?}``: a read-only disk named
        ``name`` showing this disk as it is now, for as long as it is not stopped."""
        disk = self._disk(request)
        self._writable(disk)
        body = parse_json_object(await read_json_body(request))
        fields = JsonFields(body, ("name", "checkpoint", "bitmap", "scratch_limit"), "a view")
        name = fields.string("name")
        checkpoint = fields.string("checkpoint") if "checkpoint" in body else None
        bitmap = fields.string("bitmap") if "bitmap" in body else None
        limit = fields.uint("scratch_limit", minimum=1) if "scratch_limit" in body else None
        if checkpoint is not None:
            _known_new_name(checkpoint)
        observe(request, disk.name, "view_start")
        try:
            live = await self._views().start(
                disk.name, name, checkpoint=checkpoint, bitmap=bitmap, scratch_limit=limit
            )
        except ViewError as refused:
            raise ApiError(
                _VIEW_CODES.get(refused.kind, ErrorCode.VIEW_REFUSED), _plain(refused.message)
            ) from None
        return json_response(live.describe(), status=201)

    @takes_query()
    async def stop_view(self, request: web.Request) -> web.Response:
        disk = self._disk(request)
        self._writable(disk)
        name = request.match_info["view"]
        observe(request, disk.name, "view_stop")
        live = self._views().views.get(name)
        if live is None or live.source != disk.name:
            quoted = shown(name)
            raise ApiError(
                ErrorCode.NO_SUCH_VIEW,
                f"disk {disk.name} has no view {quoted}"
                if quoted
                else f"disk {disk.name} has no view of that name",
            )
        await self._views().stop(name)
        return json_response({"removed": name, **live.describe()})


_SNAPSHOT_CODES = {
    "refused": ErrorCode.SNAPSHOT_REFUSED,
    "exists": ErrorCode.SNAPSHOT_EXISTS,
    "bad_name": ErrorCode.BAD_FIELD,
    "unavailable": ErrorCode.UNAVAILABLE,
}


class SnapshotsApi:
    """``POST /v1/disks/{name}/snapshot`` (a new qcow2 overlay on top, live) and ``.../commit``
    (the overlay copied back into its base, live)."""

    def __init__(
        self,
        snapshots: Callable[[], Snapshots],
        disks: Callable[[], Mapping[str, Disk]],
        disk: Callable[[web.Request], ByteDisk],
        writable: Callable[[ByteDisk], None],
    ) -> None:
        self.snapshots = snapshots
        self._disks = disks
        self._disk = disk
        self._writable = writable

    def _target(self, request: web.Request) -> Disk:
        port = self._disk(request)
        self._writable(port)
        return self._disks()[port.name]

    @takes_query()
    async def snapshot(self, request: web.Request) -> web.Response:
        """``{"overlay": FILE}``: FILE (a name in the image's directory) becomes the disk's image,
        a qcow2 overlay over the image it had, which stays as it is now."""
        disk = self._target(request)
        body = parse_json_object(await read_json_body(request))
        overlay = JsonFields(body, ("overlay",), "a snapshot").string("overlay")
        observe(request, disk.spec.name, "snapshot")
        return json_response(await _answered(self.snapshots().snapshot(disk, overlay)), status=201)

    @takes_query()
    async def list_snapshots(self, request: web.Request) -> web.Response:
        """The internal snapshots of a qcow2 disk's image, as ``qemu-img snapshot -l`` lists them,
        and the one the disk serves (``snapshot=``), if any."""
        port = self._disk(request)
        observe(request, port.name, "snapshots")
        internal, serving = port.control.internal_snapshots()
        return json_response({"internal": internal, "serving": serving})

    @takes_query()
    async def commit(self, request: web.Request) -> web.Response:
        """``{}``: what the disk's overlay holds is copied into its base, which becomes the image."""
        disk = self._target(request)
        JsonFields(parse_json_object(await read_json_body(request) or b"{}"), (), "a commit")
        observe(request, disk.spec.name, "commit")
        return json_response(await _answered(self.snapshots().commit(disk)))


async def _answered(change: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """A snapshot's or commit's answer; its refusal as the API's error."""
    try:
        return await change
    except SnapshotError as refused:
        code = _SNAPSHOT_CODES.get(refused.kind, ErrorCode.SNAPSHOT_REFUSED)
        raise ApiError(code, _plain(refused.message)) from None


def _known_new_name(name: str) -> None:
    try:
        check_name(name)
    except BitmapError as refused:
        raise bitmap_api_error(refused) from None


def _plain(message: str) -> str:
    """``message`` with the names it quotes (they came from the client) shown only when plain,
    as everywhere in the API."""
    return _QUOTED.sub(lambda m: shown(m.group(1)) or "that", message)


def dirty_extents(disk: ByteDisk, bitmap_name: str | None, offset: int, length: int) -> list[dict[str, Any]]:
    """``[{"start", "length", "dirty", "zero"}]`` over the range: the bitmap's runs split where the
    allocation map's zero runs begin and end, equal neighbours merged."""
    layer = disk.dirty
    usable = [] if layer is None else [b.name for b in layer.bitmaps.values() if not b.inconsistent]
    if bitmap_name is None:
        bitmap_name = disk.default_bitmap
    if bitmap_name is None:
        if not usable:
            raise ApiError(
                ErrorCode.NO_DIRTY_TRACKING,
                f"disk {disk.name} has no bitmap: context=dirty is not available "
                f"(POST .../bitmaps makes one)",
            )
        if len(usable) > 1:
            raise ApiError(
                ErrorCode.BAD_PARAMETER,
                f"disk {disk.name} has {len(usable)} bitmaps: name one with bitmap= "
                f"({', '.join(sorted(usable))})",
            )
        bitmap_name = usable[0]
    _known_name(bitmap_name)
    if layer is None:
        raise ApiError(ErrorCode.NO_SUCH_BITMAP, f"disk {disk.name} keeps no bitmaps")
    try:
        runs = layer.runs(bitmap_name, offset, length)
    except BitmapError as refused:
        raise bitmap_api_error(refused) from None
    zeroes = [(e.offset, e.offset + e.length, e.zero) for e in disk.extents(offset, length)]
    out: list[dict[str, Any]] = []
    z = 0
    for start, run_length, dirty in runs:
        end = start + run_length
        position = start
        while position < end:
            while z < len(zeroes) and zeroes[z][1] <= position:
                z += 1
            if z < len(zeroes):
                stop, zero = min(end, zeroes[z][1]), zeroes[z][2]
            else:
                stop, zero = end, False
            last = out[-1] if out else None
            if last is not None and last["dirty"] == dirty and last["zero"] == zero:
                last["length"] += stop - position
            else:
                out.append({"start": position, "length": stop - position, "dirty": dirty, "zero": zero})
            position = stop
    return out
