"""The REST sector API's handlers: disks, bytes, sectors, extents, health, ``/metrics``.

Service layer, REST front end (aiohttp). Like NBD, it reaches a disk only through the disk
port (:class:`service.blockio.ByteDisk`), so every read and write goes through the disk's
virtqueues, and ``/extents`` asks the port's allocation map, as NBD's BLOCK_STATUS does.
Every request passes :mod:`service.http.edge` (tokens, JSON errors, the log line, metrics)
on its way to a handler here. Large transfers stream in bounded chunks with one chunk of
read-ahead (or write-behind), so memory stays flat for a GET of the whole disk. Every path,
query, header and body value is parsed by :mod:`service.http.params` before a handler acts
on it; every error is JSON ``{"error", "message"}`` with the right status; never a traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog
from aiohttp import web

from service.blockio import SECTOR, ByteDisk, IoBuffer
from service.http.bitmaps import BitmapsApi, SnapshotsApi, ViewsApi, dirty_extents
from service.http.control import ControlApi
from service.http.edge import EXCHANGE, Edge, EdgeHost, expect, is_local, observe, read_json_body
from service.http.errors import ApiError, ErrorCode
from service.http.openapi import openapi_document
from service.http.params import (
    MAX_JSON,
    MAX_SECTORS,
    no_such_disk,
    parse_extents,
    parse_get_range,
    parse_json_object,
    parse_patch,
    parse_sector_read,
    parse_sector_write,
    parse_write_target,
    query_bool,
    takes_query,
)
from service.http.ranges import ByteRange
from service.http.responses import json_response
from service.http.ui import RingsView
from service.rings import disk_snapshot

if TYPE_CHECKING:
    from service.model import Disk, DiskSpec
    from service.snapshots import Snapshots
    from service.throttling import Throttled, Throttling
    from service.views import Views

__all__ = ["MAX_JSON", "MAX_SECTORS", "ApiError", "ApiHost", "RestApi", "build_app", "routes"]


class ApiHost(EdgeHost, Protocol):
    """What the REST API uses of the running service (the composition root hands itself over):
    the edge's needs, and the disks and addresses the handlers describe."""

    @property
    def disks(self) -> Mapping[str, Disk]: ...

    @property
    def http_addresses(self) -> Sequence[str]: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def views(self) -> Views: ...

    @property
    def snapshots(self) -> Snapshots: ...

    @property
    def throttling(self) -> Throttling: ...

    def add_disk(self, spec: DiskSpec, options: dict[str, object] | None = None) -> Awaitable[Disk]: ...

    def remove_disk(self, name: str) -> Awaitable[dict[str, object]]: ...

    def resize_disk(self, name: str, size: int, *, shrink: bool = False) -> Awaitable[dict[str, object]]: ...

    def throttle_disk(
        self, name: str, device: Throttled, changes: dict[str, object]
    ) -> Awaitable[dict[str, Any]]: ...


log = structlog.get_logger("vblk.http")

CHUNK = 1 << 20  # streaming unit of GET and PUT bodies
# Connections a client may read or write one disk with at once (OPTIONS max_readers and
# max_writers, as ovirt-imageio publishes them): every connection's requests share the disk's
# virtqueues, and edge sectors are locked across front ends, so parallel writers are safe;
# eight is what imageio's own file backend offers.
MAX_CONNECTIONS: Final = 8


class RestApi:
    """Handlers bound to the running service (an :class:`ApiHost`)."""

    def __init__(self, service: ApiHost) -> None:
        self.service = service
        self.control = ControlApi(lambda: service, self.describe)

    # -- plumbing ------------------------------------------------------------------------------

    def disk(self, request: web.Request) -> ByteDisk:
        name = request.match_info["name"]
        disk = self.service.disks.get(name)
        if disk is None:
            raise no_such_disk(name)
        return disk.bytes

    def writable(self, disk: ByteDisk) -> None:
        if disk.read_only:
            raise ApiError(ErrorCode.READ_ONLY, f"disk {disk.name} is read-only")

    # -- service -------------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        disks = {name: disk.bytes.ready for name, disk in self.service.disks.items()}
        ready = bool(disks) and all(disks.values()) and not self.service.stopping
        if not ready:
            request[EXCHANGE].error = "not_ready"
        return json_response(
            {"status": "ready" if ready else "not_ready", "disks": disks}, status=200 if ready else 503
        )

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.service.metrics.render(request.headers.get("Accept"))
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(openapi_document())

    # -- disks ---------------------------------------------------------------------------------

    def describe(self, name: str) -> dict[str, Any]:
        disk = self.service.disks[name]
        info = disk.bytes.info()
        described = {"name": name, **info, "serial": disk.serial, "backend": disk.spec.backend}
        throttle = self.service.throttling.describe(name)
        if throttle is not None:
            described["throttle"] = throttle
        return described

    @takes_query()
    async def list_disks(self, request: web.Request) -> web.Response:
        return json_response([self.describe(name) for name in self.service.disks])

    @takes_query()
    async def add_disk(self, request: web.Request) -> web.Response:
        """``POST /v1/disks``: a disk added at run time, hot-plugged (:mod:`service.http.control`)."""
        return await self.control.add_disk(request, await read_json_body(request))

    @takes_query()
    async def remove_disk(self, request: web.Request) -> web.Response:
        """``DELETE /v1/disks/{name}``: the disk drained, flushed, unplugged and forgotten."""
        name = request.match_info["name"]
        if name not in self.service.disks:
            raise no_such_disk(name)
        return await self.control.remove_disk(request, name)

    @takes_query()
    async def disk_info(self, request: web.Request) -> web.Response:
        return json_response(self.describe(self.disk(request).name))

    def _unix_socket(self) -> str | None:
        """The first plain-HTTP unix socket vblk serves on, for clients on this machine."""
        if self.service.config.security.http_tls:
            return None  # imageio's client speaks plain HTTP on the unix socket
        for address in self.service.http_addresses:
            if address.startswith("unix:"):
                return address.removeprefix("unix:")
        return None

    @takes_query()
    async def options(self, request: web.Request) -> web.Response:
        """Methods (``Allow``) and, in the shape ovirt-imageio's client reads, what the disk does.

        ``features`` (``extents``, ``zero``, ``flush`` are imageio's names), ``max_readers`` and
        ``max_writers`` (connections the client may use at once; without them it uses one) and,
        for a client on this machine when vblk serves HTTP on a unix socket, ``unix_socket``
        (the client then moves its connections there).
        """
        disk = self.disk(request)
        methods = ["GET", "HEAD", "OPTIONS"] if disk.read_only else ["GET", "HEAD", "PUT", "PATCH", "OPTIONS"]
        features = (
            ["extents", "sectors"] if disk.read_only else ["extents", "sectors", "zero", "discard", "flush"]
        )
        body: dict[str, Any] = {
            "features": features,
            "max_request": MAX_SECTORS * SECTOR,
            "max_readers": MAX_CONNECTIONS,
            "max_writers": MAX_CONNECTIONS,
        }
        unix_socket = self._unix_socket()
        if unix_socket is not None and is_local(request):
            body["unix_socket"] = unix_socket
        return json_response(body, headers={"Allow": ", ".join(methods)})

    @takes_query()
    async def get_disk(self, request: web.Request) -> web.StreamResponse:
        disk = self.disk(request)
        size = disk.size
        byte_range = parse_get_range(request.headers.get("Range"), size)
        response = web.StreamResponse(status=200 if byte_range is None else 206)
        response.headers["Accept-Ranges"] = "bytes"
        response.headers["Content-Type"] = "application/octet-stream"
        if byte_range is None:
            byte_range = ByteRange(0, size - 1)
        else:
            response.headers["Content-Range"] = byte_range.content_range(size)
        response.content_length = byte_range.length
        if request.method == "HEAD":
            await response.prepare(request)
            return response
        observe(request, disk.name, "read")
        await self._stream_out(request, response, disk, byte_range.first, byte_range.length)
        return response

    async def _stream_out(
        self, request: web.Request, response: web.StreamResponse, disk: ByteDisk, offset: int, length: int
    ) -> None:
        """Send ``length`` bytes from ``offset``: read chunk n+1 from the device while n goes out."""
        end = offset + length
        loop = asyncio.get_running_loop()

        def read_next(position: int) -> asyncio.Task[tuple[IoBuffer, memoryview]]:
            stop = min(end, (position // CHUNK + 1) * CHUNK)  # later chunks are aligned
            return loop.create_task(disk.read_buffer(position, stop - position))

        pending: asyncio.Task[tuple[IoBuffer, memoryview]] | None = read_next(offset)
        position = offset
        sent = 0
        try:
            while pending is not None:
                buffer, view = await pending
                pending = None
                try:
                    position += view.nbytes
                    if position < end:
                        pending = read_next(position)
                    data = bytes(view)  # the transport may keep what it has not sent yet
                finally:
                    view.release()
                    buffer.free()
                exchange = request[EXCHANGE]
                if not exchange.streaming:
                    exchange.streaming = True
                    await response.prepare(request)
                await response.write(data)
                sent += len(data)
            await response.write_eof()
        finally:
            request[EXCHANGE].bytes_out = sent
            if pending is not None:
                pending.cancel()
                try:
                    buffer, view = await pending
                except BaseException:
                    pass
                else:
                    view.release()
                    buffer.free()

    @takes_query("offset", "flush")
    async def put_disk(self, request: web.Request) -> web.Response:
        disk = self.disk(request)
        self.writable(disk)
        target = parse_write_target(request.headers, request.content_length, request.query, disk.size)
        observe(request, disk.name, "write")
        if target.length:
            await self._stream_in(request, disk, target.offset, target.length)
        if target.flush:
            await disk.flush()
        return json_response({"offset": target.offset, "written": target.length, "flushed": target.flush})

    async def _stream_in(self, request: web.Request, disk: ByteDisk, offset: int, length: int) -> None:
        """Receive the body chunk by chunk into DMA buffers; chunk n is written while n+1 arrives.

        A body that ends early fails with 400; a body of at most one chunk (1 MiB) is received
        in full before anything is written, so a truncated small upload writes nothing. A
        chunked body (its length said only by Content-Range) that goes on past ``length``
        fails with 400 too, found before the last chunk is written.
        """
        end = offset + length
        writing: asyncio.Task[None] | None = None
        position = offset
        received = 0
        try:
            while position < end:
                stop = min(end, position + CHUNK)
                if stop < end:
                    stop -= stop % SECTOR  # later chunks start on a sector: no edge read-modify-write
                count = stop - position
                buffer = await disk.allocate_for(position, count)
                head = position % SECTOR
                try:
                    view = buffer.view[head : head + count]
                    try:
                        await _read_exactly(request, view)
                    finally:
                        view.release()
                    if stop == end and request.content_length is None and await request.content.read(1):
                        raise ApiError(
                            ErrorCode.LENGTH_MISMATCH,
                            f"the body is longer than the {length} bytes of Content-Range",
                        )
                except BaseException:
                    buffer.free()
                    raise
                received += count
                if writing is not None:
                    await writing
                writing = asyncio.get_running_loop().create_task(
                    _write_and_free(disk, position, count, buffer)
                )
                position = stop
            if writing is not None:
                task, writing = writing, None
                await task
        finally:
            request[EXCHANGE].bytes_in = received
            if writing is not None:
                await asyncio.gather(writing, return_exceptions=True)

    @takes_query()
    async def patch_disk(self, request: web.Request) -> web.Response:
        disk = self.disk(request)
        raw = await read_json_body(request)
        body = parse_json_object(raw)
        if body.get("op") == "throttle":
            return await self.control.throttle(request, self.service.disks[disk.name], body)
        if body.get("op") == "resize":
            return await self.control.resize(request, self.service.disks[disk.name], body)
        patch = parse_patch(raw, disk.size)
        self.writable(disk)
        observe(request, disk.name, patch.op)
        if patch.op == "flush":
            await disk.flush()
            return json_response({"op": "flush"})
        if patch.op == "zero":
            await disk.zero(patch.offset, patch.size, unmap=True, fua=patch.flush)
        else:
            await disk.discard(patch.offset, patch.size, fua=patch.flush)
        return json_response(
            {"op": patch.op, "offset": patch.offset, "size": patch.size, "flushed": patch.flush}
        )

    @takes_query("context", "bitmap", "offset", "length")
    async def extents(self, request: web.Request) -> web.Response:
        """The allocation map as imageio's zero extents, ``[{start, length, zero, hole}]``, or with
        ``context=dirty`` a bitmap's as its dirty extents, ``[{start, length, dirty, zero}]``."""
        disk = self.disk(request)
        query = parse_extents(request.query, disk.size)
        observe(request, disk.name, "extents")
        if query.context == "dirty":
            return json_response(dirty_extents(disk, query.bitmap, query.offset, query.length))
        merged: list[dict[str, Any]] = []
        for extent in disk.extents(query.offset, query.length):
            last = merged[-1] if merged else None
            if last is not None and (last["zero"], last["hole"]) == (extent.zero, extent.hole):
                last["length"] += extent.length
            else:
                merged.append(
                    {
                        "start": extent.offset,
                        "length": extent.length,
                        "zero": extent.zero,
                        "hole": extent.hole,
                    }
                )
        return json_response(merged)

    @takes_query("count")
    async def get_sectors(self, request: web.Request) -> web.Response:
        disk = self.disk(request)
        span = parse_sector_read(request.match_info["lba"], request.query, disk.size)
        observe(request, disk.name, "read")
        data = await disk.read(span.lba * SECTOR, span.count * SECTOR)
        return web.Response(body=data, content_type="application/octet-stream")

    @takes_query("count", "flush")
    async def put_sectors(self, request: web.Request) -> web.Response:
        disk = self.disk(request)
        self.writable(disk)
        span = parse_sector_write(request.match_info["lba"], request.query, request.content_length, disk.size)
        flush = query_bool(request.query, "flush", True)
        observe(request, disk.name, "write")
        await self._stream_in(request, disk, span.lba * SECTOR, span.count * SECTOR)
        if flush:
            await disk.flush()
        return json_response({"lba": span.lba, "sectors": span.count, "flushed": flush})


async def _write_and_free(disk: ByteDisk, offset: int, length: int, buffer: IoBuffer) -> None:
    try:
        await disk.write_buffer(offset, length, buffer)
    finally:
        buffer.free()


async def _read_exactly(request: web.Request, view: memoryview) -> None:
    filled = 0
    content = request.content
    while filled < view.nbytes:
        try:
            data = await content.read(view.nbytes - filled)
        except (asyncio.IncompleteReadError, ConnectionError):
            data = b""
        if not data:
            raise ApiError(ErrorCode.SHORT_BODY, f"the body ended {view.nbytes - filled} bytes early")
        view[filled : filled + len(data)] = data
        filled += len(data)


def routes(api: RestApi) -> list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]]:
    """Every route: the application and the OpenAPI document are built from this one list."""
    service = api.service
    bitmaps = BitmapsApi(api.disk, api.writable)
    views = ViewsApi(lambda: service.views, api.disk, api.writable)
    snapshots = SnapshotsApi(lambda: service.snapshots, lambda: service.disks, api.disk, api.writable)
    rings = RingsView(
        lambda name: disk_snapshot(service.disks[name], service.metrics.virtio_latency),
        lambda: list(service.disks),
        lambda request: api.disk(request).name,
    )
    return [
        ("GET", "/healthz", api.healthz),
        ("GET", "/readyz", api.readyz),
        ("GET", "/metrics", api.metrics),
        ("GET", "/openapi.json", api.openapi),
        ("GET", "/v1/disks", api.list_disks),
        ("POST", "/v1/disks", api.add_disk),
        ("DELETE", "/v1/disks/{name}", api.remove_disk),
        ("GET", "/v1/disks/{name}", api.get_disk),
        ("HEAD", "/v1/disks/{name}", api.get_disk),
        ("PUT", "/v1/disks/{name}", api.put_disk),
        ("PATCH", "/v1/disks/{name}", api.patch_disk),
        ("OPTIONS", "/v1/disks/{name}", api.options),
        ("GET", "/v1/disks/{name}/info", api.disk_info),
        ("GET", "/v1/disks/{name}/extents", api.extents),
        ("GET", "/v1/disks/{name}/bitmaps", bitmaps.list_bitmaps),
        ("POST", "/v1/disks/{name}/bitmaps", bitmaps.add_bitmap),
        ("GET", "/v1/disks/{name}/bitmaps/{bitmap}", bitmaps.get_bitmap),
        ("PATCH", "/v1/disks/{name}/bitmaps/{bitmap}", bitmaps.patch_bitmap),
        ("DELETE", "/v1/disks/{name}/bitmaps/{bitmap}", bitmaps.remove_bitmap),
        ("POST", "/v1/disks/{name}/checkpoints", bitmaps.checkpoint),
        ("GET", "/v1/disks/{name}/views", views.list_views),
        ("POST", "/v1/disks/{name}/views", views.start_view),
        ("DELETE", "/v1/disks/{name}/views/{view}", views.stop_view),
        ("POST", "/v1/disks/{name}/snapshot", snapshots.snapshot),
        ("GET", "/v1/disks/{name}/snapshots", snapshots.list_snapshots),
        ("POST", "/v1/disks/{name}/commit", snapshots.commit),
        ("GET", "/v1/disks/{name}/sectors/{lba}", api.get_sectors),
        ("PUT", "/v1/disks/{name}/sectors/{lba}", api.put_sectors),
        ("GET", "/v1/disks/{name}/rings", rings.rings),
        ("GET", "/ui", rings.page),
        ("GET", "/ui/state.json", rings.state),
    ]


def build_app(service: ApiHost) -> web.Application:
    """The aiohttp application: REST API, health checks, metrics and the OpenAPI document."""
    api = RestApi(service)
    edge = Edge(service)
    app = web.Application(middlewares=[edge.middleware], client_max_size=MAX_JSON)
    app.on_response_prepare.append(edge.on_response_prepare)
    for method, path, handler in routes(api):
        app.router.add_route(method, path, handler, expect_handler=expect)
    return app
