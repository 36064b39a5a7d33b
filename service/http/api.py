"""The REST sector API, health checks and ``/metrics`` (aiohttp).

Service layer, REST front end. Like NBD, every read and write goes through the disk's
virtqueues (:class:`service.blockio.ByteDisk` over :class:`driver.blk.VirtioBlk`); only the
allocation map (``/extents``) asks the backend directly, as NBD's BLOCK_STATUS does.
Large transfers stream in bounded chunks with one chunk of read-ahead (or write-behind), so
memory stays flat for a GET of the whole disk. Every error is JSON ``{"error", "message"}``
with the right status; never a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import itertools
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from device.spec import virtio_blk as vb
from driver.blk import BlkError, BlkReadOnlyError, BlkResetError, BlkUnsupportedError
from driver.dma import DmaBuffer
from service.blockio import SECTOR, ByteDisk
from service.http.openapi import openapi_document
from service.http.ranges import (
    BadContentRangeError,
    ByteRange,
    RangeNotSatisfiableError,
    parse_content_range,
    parse_range,
)
from service.http.ui import RingsView

if TYPE_CHECKING:
    from service.app import Service

log = structlog.get_logger("vblk.http")

CHUNK = 1 << 20  # streaming unit of GET and PUT bodies
MAX_SECTORS = 65536  # 32 MiB per /sectors request, as NBD's maximum request
MAX_JSON = 64 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_request_ids = itertools.count(1)
FEATURE_NAMES = {
    getattr(vb, name): name.removeprefix("VIRTIO_BLK_F_").lower()
    for name in dir(vb)
    if name.startswith("VIRTIO_BLK_F_")
}


class ApiError(Exception):
    """An HTTP error answered as JSON ``{"error": code, "message": sentence}``."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def _json_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    431: "headers_too_large",
}


def _unsatisfiable(disk: ByteDisk, message: str) -> ApiError:
    """416, with the ``Content-Range: bytes */size`` RFC 9110 asks for."""
    return ApiError(416, "range_not_satisfiable", message, {"Content-Range": f"bytes */{disk.size}"})


def _device_error(exc: BaseException) -> ApiError:
    if isinstance(exc, BlkReadOnlyError):
        return ApiError(403, "read_only", str(exc))
    if isinstance(exc, BlkUnsupportedError):
        return ApiError(501, "unsupported", str(exc))
    if isinstance(exc, BlkResetError):
        return ApiError(503, "unavailable", str(exc))
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return ApiError(507, "no_space", str(exc))
    return ApiError(500, "io_error", str(exc) or type(exc).__name__)


@dataclasses.dataclass(slots=True)
class _Exchange:
    """What the middleware logs and measures about one request."""

    disk: str | None = None
    op: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    streaming: bool = False  # response headers sent: errors can only cut the connection


_EXCHANGE = web.RequestKey("vblk_exchange", _Exchange)


class RestApi:
    """Handlers bound to one :class:`service.app.Service`."""

    def __init__(self, service: Service) -> None:
        self.service = service

    # -- plumbing ------------------------------------------------------------------------------

    def disk(self, request: web.Request) -> ByteDisk:
        name = request.match_info["name"]
        disk = self.service.disks.get(name) if _NAME.fullmatch(name) else None
        if disk is None:
            raise ApiError(404, "no_such_disk", f"no disk named {name[:64]!r}")
        return disk.bytes

    def _writable(self, disk: ByteDisk) -> None:
        if disk.read_only:
            raise ApiError(403, "read_only", f"disk {disk.name} is read-only")

    @staticmethod
    def _observe(request: web.Request, disk: str, op: str) -> None:
        exchange = request[_EXCHANGE]
        exchange.disk = disk
        exchange.op = op

    def _authorize(self, request: web.Request) -> None:
        """Bearer tokens, when configured: read-only tokens may only read."""
        tokens = self.service.tokens
        if tokens is None or request.path in self.service.config.security.public_paths:
            return
        access = tokens.access(request.headers.get("Authorization"))
        if access is None:
            raise ApiError(
                401,
                "unauthorized",
                "send Authorization: Bearer <token>",
                {"WWW-Authenticate": 'Bearer realm="vblk"'},
            )
        if access == "ro" and request.method not in ("GET", "HEAD", "OPTIONS"):
            raise ApiError(403, "read_only_token", "this token may only read")

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """JSON errors, one canonical log line and the metrics of every request."""
        started = time.perf_counter()
        request_id = next(_request_ids)
        structlog.contextvars.bind_contextvars(http_request=request_id, peer=request.remote)
        exchange = request[_EXCHANGE] = _Exchange()
        status = 500
        response: web.StreamResponse | None = None
        try:
            try:
                self._authorize(request)
                response = await handler(request)
            except ApiError as exc:
                response = _json_error(exc.status, exc.code, exc.message, exc.headers)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                code = _HTTP_CODES.get(exc.status, "http_error")
                headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "content-range")}
                response = _json_error(exc.status, code, exc.reason, headers)
            except (BlkError, OSError) as exc:
                if isinstance(exc, ConnectionError):
                    raise
                error = _device_error(exc)
                log.warning("http_io_failed", error=str(exc), status=error.status)
                if exchange.streaming:
                    raise  # headers are out: the only honest signal left is a cut connection
                response = _json_error(error.status, error.code, error.message)
            except (ConnectionError, asyncio.CancelledError):
                status = 499  # the client went away (nginx's convention, for the log only)
                raise
            except Exception as exc:
                log.exception("http_handler_crashed", error=repr(exc))
                response = _json_error(500, "internal", "internal error; see the service log")
            status = response.status
            return response
        finally:
            seconds = time.perf_counter() - started
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            metrics = self.service.metrics
            metrics.http_requests.labels(route, request.method, str(status)).inc()
            if exchange.disk is not None and exchange.op is not None:
                metrics.observe_request("http", exchange.disk, exchange.op, seconds)
            log.info(
                "http_request",
                method=request.method,
                path=request.path_qs[:256],
                route=route,
                status=status,
                bytes_in=exchange.bytes_in,
                bytes_out=exchange.bytes_out or _body_length(response),
                seconds=round(seconds, 6),
            )
            structlog.contextvars.unbind_contextvars("http_request", "peer")

    # -- service -------------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        disks = {name: disk.driver.ready for name, disk in self.service.disks.items()}
        ready = bool(disks) and all(disks.values()) and not self.service.stopping
        return web.json_response(
            {"status": "ready" if ready else "not_ready", "disks": disks}, status=200 if ready else 503
        )

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.service.metrics.render(request.headers.get("Accept"))
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    # -- disks ---------------------------------------------------------------------------------

    def describe(self, name: str) -> dict[str, Any]:
        disk = self.service.disks[name]
        driver = disk.driver
        return {
            "name": name,
            "size": driver.size,
            "sector_size": SECTOR,
            "block_size": driver.block_size,
            "read_only": driver.read_only,
            "features": sorted(name for bit, name in FEATURE_NAMES.items() if driver.has_feature(bit)),
            "serial": disk.serial,
            "pci": driver.name,
            "queues": len(driver.queues),
            "queue_size": driver.queues[0].size if driver.queues else 0,
            "backend": disk.spec.backend,
            "ready": driver.ready,
        }

    async def list_disks(self, request: web.Request) -> web.Response:
        return web.json_response([self.describe(name) for name in self.service.disks])

    async def disk_info(self, request: web.Request) -> web.Response:
        return web.json_response(self.describe(self.disk(request).name))

    async def options(self, request: web.Request) -> web.Response:
        disk = self.disk(request)
        methods = ["GET", "HEAD", "OPTIONS"] if disk.read_only else ["GET", "HEAD", "PUT", "PATCH", "OPTIONS"]
        features = (
            ["extents", "sectors"] if disk.read_only else ["extents", "sectors", "zero", "discard", "flush"]
        )
        return web.json_response(
            {"features": features, "max_request": MAX_SECTORS * SECTOR},
            headers={"Allow": ", ".join(methods)},
        )

    async def get_disk(self, request: web.Request) -> web.StreamResponse:
        disk = self.disk(request)
        size = disk.size
        try:
            byte_range = parse_range(request.headers.get("Range"), size)
        except RangeNotSatisfiableError as exc:
            raise _unsatisfiable(disk, str(exc)) from exc
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
        self._observe(request, disk.name, "read")
        await self._stream_out(request, response, disk, byte_range.first, byte_range.length)
        return response

    async def _stream_out(
        self, request: web.Request, response: web.StreamResponse, disk: ByteDisk, offset: int, length: int
    ) -> None:
        """Send ``length`` bytes from ``offset``: read chunk n+1 from the device while n goes out."""
        end = offset + length
        loop = asyncio.get_running_loop()

        def read_next(position: int) -> asyncio.Task[tuple[DmaBuffer, memoryview]]:
            stop = min(end, (position // CHUNK + 1) * CHUNK)  # later chunks are aligned
            return loop.create_task(disk.read_buffer(position, stop - position))

        pending: asyncio.Task[tuple[DmaBuffer, memoryview]] | None = read_next(offset)
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
                exchange = request[_EXCHANGE]
                if not exchange.streaming:
                    exchange.streaming = True
                    await response.prepare(request)
                await response.write(data)
                sent += len(data)
            await response.write_eof()
        finally:
            request[_EXCHANGE].bytes_out = sent
            if pending is not None:
                pending.cancel()
                try:
                    buffer, view = await pending
                except BaseException:
                    pass
                else:
                    view.release()
                    buffer.free()

    def _write_target(self, request: web.Request, disk: ByteDisk) -> tuple[int, int | None]:
        """Offset and length of a PUT body, from Content-Range or ``?offset=``."""
        declared = request.content_length
        content_range = request.headers.get("Content-Range")
        if content_range is not None:
            try:
                first, last, total = parse_content_range(content_range)
            except BadContentRangeError as exc:
                raise ApiError(400, "bad_content_range", str(exc)) from exc
            if total is not None and total != disk.size:
                raise ApiError(
                    400, "bad_content_range", f"Content-Range size {total} is not the disk's {disk.size}"
                )
            length = last - first + 1
            if declared is not None and declared != length:
                raise ApiError(
                    400,
                    "length_mismatch",
                    f"Content-Length {declared} does not match Content-Range length {length}",
                )
            return first, length
        offset = _query_int(request, "offset", 0)
        return offset, declared

    async def put_disk(self, request: web.Request) -> web.Response:
        disk = self.disk(request)
        self._writable(disk)
        offset, length = self._write_target(request, disk)
        flush = _query_bool(request, "flush", True)
        if length is None:
            raise ApiError(411, "length_required", "send Content-Length or Content-Range")
        if offset + length > disk.size:
            raise _unsatisfiable(
                disk, f"writing {length} bytes at {offset} runs past the end ({disk.size} bytes)"
            )
        self._observe(request, disk.name, "write")
        if length:
            await self._stream_in(request, disk, offset, length)
        if flush:
            await disk.flush()
        return web.json_response({"offset": offset, "written": length, "flushed": flush})

    async def _stream_in(self, request: web.Request, disk: ByteDisk, offset: int, length: int) -> None:
        """Receive the body chunk by chunk into DMA buffers; chunk n is written while n+1 arrives.

        A body that ends early fails with 400; a body of at most one chunk (1 MiB) is received
        in full before anything is written, so a truncated small upload writes nothing.
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
            request[_EXCHANGE].bytes_in = received
            if writing is not None:
                await asyncio.gather(writing, return_exceptions=True)

    async def patch_disk(self, request: web.Request) -> web.Response:
        disk = self.disk(request)
        body = await _json_body(request)
        op = body.get("op")
        if op == "flush":
            self._writable(disk)
            self._observe(request, disk.name, "flush")
            await disk.flush()
            return web.json_response({"op": "flush"})
        if op not in ("zero", "discard"):
            raise ApiError(400, "bad_op", "op must be one of zero, discard, flush")
        self._writable(disk)
        offset = _json_int(body, "offset")
        size = _json_int(body, "size")
        flush = body.get("flush", False)
        if not isinstance(flush, bool):
            raise ApiError(400, "bad_request", "flush must be true or false")
        if size <= 0:
            raise ApiError(400, "bad_request", "size must be positive")
        if offset + size > disk.size:
            raise _unsatisfiable(
                disk, f"{op} of {size} bytes at {offset} runs past the end ({disk.size} bytes)"
            )
        self._observe(request, disk.name, op)
        if op == "zero":
            await disk.zero(offset, size, unmap=True, fua=flush)
        else:
            await disk.discard(offset, size, fua=flush)
        return web.json_response({"op": op, "offset": offset, "size": size, "flushed": flush})

    async def extents(self, request: web.Request) -> web.Response:
        disk = self.disk(request)
        offset = _query_int(request, "offset", 0)
        length = _query_int(request, "length", disk.size - offset) if offset < disk.size else 0
        if offset >= disk.size or length <= 0 or offset + length > disk.size:
            raise _unsatisfiable(
                disk, f"extents of {length} bytes at {offset} are outside the disk ({disk.size} bytes)"
            )
        self._observe(request, disk.name, "extents")
        merged: list[dict[str, Any]] = []
        for extent in disk.extents(offset, length):
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
        return web.json_response(merged)

    def _sectors(self, request: web.Request, disk: ByteDisk) -> tuple[int, int]:
        try:
            lba = int(request.match_info["lba"])
        except ValueError:
            raise ApiError(400, "bad_request", "lba must be a sector number") from None
        count = _query_int(request, "count", 1)
        if not 1 <= count <= MAX_SECTORS:
            raise ApiError(400, "bad_request", f"count must be in 1..{MAX_SECTORS}")
        capacity = disk.size // SECTOR
        if lba >= capacity or lba + count > capacity:
            raise _unsatisfiable(
                disk, f"sectors {lba}..{lba + count - 1} are outside the disk ({capacity} sectors)"
            )
        return lba, count

    async def get_sectors(self, request: web.Request) -> web.Response:
        disk = self.disk(request)
        lba, count = self._sectors(request, disk)
        self._observe(request, disk.name, "read")
        data = await disk.read(lba * SECTOR, count * SECTOR)
        return web.Response(body=data, content_type="application/octet-stream")

    async def put_sectors(self, request: web.Request) -> web.Response:
        disk = self.disk(request)
        self._writable(disk)
        lba, _ = self._sectors(request, disk)
        declared = request.content_length
        if declared is None:
            raise ApiError(411, "length_required", "send Content-Length")
        if declared == 0 or declared % SECTOR or declared > MAX_SECTORS * SECTOR:
            raise ApiError(
                400, "bad_length", f"body must be 1..{MAX_SECTORS} whole sectors of {SECTOR} bytes"
            )
        if lba + declared // SECTOR > disk.size // SECTOR:
            raise _unsatisfiable(disk, f"{declared // SECTOR} sectors at {lba} run past the end")
        flush = _query_bool(request, "flush", True)
        self._observe(request, disk.name, "write")
        await self._stream_in(request, disk, lba * SECTOR, declared)
        if flush:
            await disk.flush()
        return web.json_response({"lba": lba, "sectors": declared // SECTOR, "flushed": flush})


def _body_length(response: web.StreamResponse | None) -> int:
    if isinstance(response, web.Response) and isinstance(response.body, bytes):
        return len(response.body)
    return 0


async def _write_and_free(disk: ByteDisk, offset: int, length: int, buffer: DmaBuffer) -> None:
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
            raise ApiError(400, "short_body", f"the body ended {view.nbytes - filled} bytes early")
        view[filled : filled + len(data)] = data
        filled += len(data)


def _query_int(request: web.Request, key: str, default: int) -> int:
    text = request.query.get(key)
    if text is None:
        return default
    if not text.isdigit() or len(text) > 19:
        raise ApiError(400, "bad_request", f"{key} must be a non-negative integer")
    return int(text)


def _query_bool(request: web.Request, key: str, default: bool) -> bool:
    text = request.query.get(key)
    if text is None:
        return default
    value = text.lower()
    if value in ("y", "yes", "true", "1", "on"):
        return True
    if value in ("n", "no", "false", "0", "off"):
        return False
    raise ApiError(400, "bad_request", f"{key} must be y or n")


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_JSON:
        raise ApiError(413, "payload_too_large", f"JSON bodies are limited to {MAX_JSON} bytes")
    raw = await request.content.read(MAX_JSON + 1)
    if len(raw) > MAX_JSON:
        raise ApiError(413, "payload_too_large", f"JSON bodies are limited to {MAX_JSON} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    return body


def _json_int(body: Mapping[str, Any], key: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ApiError(400, "bad_request", f"{key} must be a non-negative integer")
    return value


def routes(api: RestApi) -> list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]]:
    """Every route: the application and the OpenAPI document are built from this one list."""
    rings = RingsView(api)
    return [
        ("GET", "/healthz", api.healthz),
        ("GET", "/readyz", api.readyz),
        ("GET", "/metrics", api.metrics),
        ("GET", "/openapi.json", api.openapi),
        ("GET", "/v1/disks", api.list_disks),
        ("GET", "/v1/disks/{name}", api.get_disk),
        ("HEAD", "/v1/disks/{name}", api.get_disk),
        ("PUT", "/v1/disks/{name}", api.put_disk),
        ("PATCH", "/v1/disks/{name}", api.patch_disk),
        ("OPTIONS", "/v1/disks/{name}", api.options),
        ("GET", "/v1/disks/{name}/info", api.disk_info),
        ("GET", "/v1/disks/{name}/extents", api.extents),
        ("GET", "/v1/disks/{name}/sectors/{lba}", api.get_sectors),
        ("PUT", "/v1/disks/{name}/sectors/{lba}", api.put_sectors),
        ("GET", "/v1/disks/{name}/rings", rings.rings),
        ("GET", "/ui", rings.page),
        ("GET", "/ui/state.json", rings.state),
    ]


def build_app(service: Service) -> web.Application:
    """The aiohttp application: REST API, health checks, metrics and the OpenAPI document."""
    api = RestApi(service)
    app = web.Application(middlewares=[api.middleware], client_max_size=MAX_JSON)
    for method, path, handler in routes(api):
        app.router.add_route(method, path, handler)
    return app
