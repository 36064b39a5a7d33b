"""The REST front end's edge: what every HTTP request passes through before and after its handler.

Service layer, HTTP front end, under :mod:`service.http.api` (whose handlers it wraps). The
middleware checks bearer tokens and the query string against what the handler declares, turns
every failure into JSON (:class:`~service.http.errors.ApiError`, the disk port's error kinds,
aiohttp's own 4xx) and writes one canonical ``http_request`` log line and the request metrics;
:meth:`Edge.on_response_prepare` does the same for the few answers aiohttp gives before any
middleware runs. Handlers tell it what they did through :func:`observe` and :data:`EXCHANGE`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import itertools
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, Protocol

import structlog
from aiohttp import HttpVersion11, web

from service.addresses import format_peer
from service.blockio import ErrorKind, error_kind
from service.http.errors import ApiError, ErrorCode
from service.http.params import MAX_JSON, check_query, declared_query, parse_bearer
from service.http.responses import error_body, error_response

if TYPE_CHECKING:
    from service.metrics import Metrics
    from service.model import ServiceConfig
    from service.security import Tokens

log = structlog.get_logger("vblk.http")

_request_ids = itertools.count(1)


class EdgeHost(Protocol):
    """What the edge uses of the running service: the tokens, their public paths, the metrics."""

    @property
    def metrics(self) -> Metrics: ...

    @property
    def tokens(self) -> Tokens | None: ...

    @property
    def config(self) -> ServiceConfig: ...


# The port's failure kinds as the API's error codes.
_ERROR_CODES: Final = {
    ErrorKind.READ_ONLY: ErrorCode.READ_ONLY,
    ErrorKind.UNSUPPORTED: ErrorCode.UNSUPPORTED,
    ErrorKind.UNAVAILABLE: ErrorCode.UNAVAILABLE,
    ErrorKind.NO_SPACE: ErrorCode.NO_SPACE,
    ErrorKind.IO: ErrorCode.IO_ERROR,
}

# 4xx the HTTP layer (aiohttp's router) answers itself, as JSON like every other error.
_HTTP_CODES = {
    400: ErrorCode.BAD_REQUEST,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    411: ErrorCode.LENGTH_REQUIRED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    414: ErrorCode.URI_TOO_LONG,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    416: ErrorCode.RANGE_NOT_SATISFIABLE,
    417: ErrorCode.EXPECTATION_FAILED,
    431: ErrorCode.HEADERS_TOO_LARGE,
}


def http_error(exc: web.HTTPException) -> ApiError:
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "content-range")}
    if exc.status == 404:
        message = "no such route: /openapi.json lists them"
    elif exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        message = f"this route takes only {allowed}" if allowed else "this route takes no method"
    else:
        try:
            phrase = HTTPStatus(exc.status).phrase.lower()
        except ValueError:
            phrase = "refused"
        message = f"the request is refused ({exc.status}: {phrase})"
    return ApiError(_HTTP_CODES.get(exc.status, ErrorCode.HTTP_ERROR), message, headers, status=exc.status)


def device_error(exc: BaseException) -> ApiError:
    return ApiError(_ERROR_CODES[error_kind(exc)], str(exc) or type(exc).__name__)


def peer_of(request: web.BaseRequest) -> str:
    transport = request.transport
    return format_peer(transport.get_extra_info("peername") if transport is not None else None)


def who_asked(request: web.Request) -> dict[str, object]:
    """Who sent a request, for the log line of a control-plane call: the peer, the class of its
    bearer token (``none`` without tokens), and on a unix socket the peer's pid and uid."""
    who: dict[str, object] = {"peer": peer_of(request), "token": request[EXCHANGE].access or "none"}
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and getattr(sock, "family", None) == socket.AF_UNIX:
        try:
            credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except (OSError, AttributeError):
            return who
        pid, uid, _gid = _UCRED.unpack(credentials)
        who.update(pid=pid, uid=uid)
    return who


_UCRED: Final = struct.Struct("3i")  # struct ucred {pid, uid, gid}


def require_admin(request: web.Request) -> None:
    """A control-plane call (disks added, removed, resized, throttled): with tokens configured it
    needs an ``admin`` token; without, only a client on this machine (loopback, unix socket) may."""
    access = request[EXCHANGE].access
    if access is None:
        if not is_local(request):
            raise ApiError(
                ErrorCode.ADMIN_REQUIRED, "without tokens, only clients on this machine manage disks"
            )
    elif access != "admin":
        raise ApiError(ErrorCode.ADMIN_REQUIRED, "this call manages disks: it needs an admin token")


def is_local(request: web.BaseRequest) -> bool:
    """The client is on this machine: a unix socket or a loopback address."""
    transport = request.transport
    peername = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peername, str | bytes):
        return True
    if isinstance(peername, tuple) and peername and isinstance(peername[0], str):
        try:
            return ipaddress.ip_address(peername[0].partition("%")[0]).is_loopback
        except ValueError:
            return False
    return False


@dataclasses.dataclass(slots=True)
class Exchange:
    """What the middleware logs and measures about one request."""

    disk: str | None = None
    op: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    streaming: bool = False  # response headers sent: errors can only cut the connection
    error: str | None = None  # the error code of a 4xx/5xx answer, for the log line
    access: str | None = None  # the bearer token's class ("admin", "rw", "ro"); None: no tokens configured


EXCHANGE = web.RequestKey("vblk_exchange", Exchange)


def observe(request: web.Request, disk: str, op: str) -> None:
    """The handler's request is ``op`` on ``disk``: its log line and latency metric say so."""
    exchange = request[EXCHANGE]
    exchange.disk = disk
    exchange.op = op


async def read_json_body(request: web.Request) -> bytes:
    """The raw body of a JSON request, refused unread when it is declared too large (the parser
    refuses one that turns out larger: it gets one byte more than it may have)."""
    if request.content_length is not None and request.content_length > MAX_JSON:
        raise ApiError(ErrorCode.PAYLOAD_TOO_LARGE, f"a JSON body may have at most {MAX_JSON} bytes")
    return await request.content.read(MAX_JSON + 1)


class Edge:
    """The middleware and the response hook of one application, bound to its service."""

    def __init__(self, host: EdgeHost) -> None:
        self.host = host

    def _authorize(self, request: web.Request) -> None:
        """Bearer tokens, when configured: read-only tokens may only read."""
        tokens = self.host.tokens
        if tokens is None or request.path in self.host.config.security.public_paths:
            return
        token = parse_bearer(request.headers.get("Authorization"))
        access = tokens.access(f"Bearer {token}") if token is not None else None
        if access is None:
            raise ApiError(
                ErrorCode.UNAUTHORIZED,
                "send Authorization: Bearer <token>",
                {"WWW-Authenticate": 'Bearer realm="vblk"'},
            )
        request[EXCHANGE].access = access
        if access == "ro" and request.method not in ("GET", "HEAD", "OPTIONS"):
            raise ApiError(ErrorCode.READ_ONLY_TOKEN, "this token may only read")

    @staticmethod
    def _error(exchange: Exchange, error: ApiError) -> web.Response:
        exchange.error = error.code.code
        return error_response(error)

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """JSON errors, the query check, one canonical log line and the metrics of every request."""
        started = time.perf_counter()
        request_id = next(_request_ids)
        structlog.contextvars.bind_contextvars(http_request=request_id, peer=peer_of(request))
        exchange = request[EXCHANGE] = Exchange()
        status = 500
        response: web.StreamResponse | None = None
        try:
            try:
                self._authorize(request)
                expect = request.headers.get("Expect")
                if expect is not None and expect.lower() != "100-continue":
                    raise ApiError(ErrorCode.EXPECTATION_FAILED, "only Expect: 100-continue is understood")
                allowed = declared_query(request.match_info.handler)
                if allowed is not None:
                    check_query(request.query, allowed)
                response = await handler(request)
            except ApiError as exc:
                response = self._error(exchange, exc)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                response = self._error(exchange, http_error(exc))
            except (ConnectionError, asyncio.CancelledError):
                status = 499  # the client went away (nginx's convention, for the log only)
                exchange.error = "client_gone"
                raise
            except OSError as exc:  # every failure of the disk port is an OSError
                error = device_error(exc)
                exchange.error = error.code.code
                log.warning("http_io_failed", error=str(exc), status=error.status)
                if exchange.streaming:
                    raise  # headers are out: the only honest signal left is a cut connection
                response = error_response(error)
            except Exception as exc:
                log.exception("http_handler_crashed", error=repr(exc))
                response = self._error(
                    exchange, ApiError(ErrorCode.INTERNAL, "internal error; see the service log")
                )
            status = response.status
            return response
        finally:
            self._record(request, exchange, status, response, time.perf_counter() - started)
            structlog.contextvars.unbind_contextvars("http_request", "peer")

    def _record(
        self,
        request: web.Request,
        exchange: Exchange,
        status: int,
        response: web.StreamResponse | None,
        seconds: float,
        **fields: object,
    ) -> None:
        """The metrics and the canonical ``http_request`` log line of one request."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics = self.host.metrics
        metrics.http_requests.labels(route, request.method, str(status)).inc()
        if exchange.disk is not None and exchange.op is not None:
            metrics.observe_request("http", exchange.disk, exchange.op, seconds)
        if status >= 400:
            fields["error"] = exchange.error or "http_error"
        log.info(
            "http_request",
            method=request.method,
            path=request.path_qs[:256],
            route=route,
            status=status,
            bytes_in=exchange.bytes_in,
            bytes_out=exchange.bytes_out or _body_length(response),
            seconds=round(seconds, 6),
            **fields,
        )

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """The safety net under the middleware, for the few answers aiohttp gives before it.

        aiohttp answers an ``Expect`` header it does not know on a route that is not ours
        (404, 405) before any middleware runs; that answer becomes JSON like every other
        error here, and gets its log line.
        """
        if EXCHANGE in request:
            return  # the middleware answered, and logs
        exchange = request[EXCHANGE] = Exchange()
        if response.status >= 400 and isinstance(response, web.Response):
            error = ApiError(
                _HTTP_CODES.get(response.status, ErrorCode.HTTP_ERROR),
                "only Expect: 100-continue is understood"
                if response.status == 417
                else f"the request is refused ({response.status})",
                status=response.status,
            )
            exchange.error = error.code.code
            body = error_body(error)
            response.body = body
            response.content_type = "application/json"
            response.charset = "utf-8"
            response.headers["Content-Length"] = str(len(body))  # set for the body it had
        self._record(request, exchange, response.status, response, 0.0, peer=peer_of(request))


def _body_length(response: web.StreamResponse | None) -> int:
    if isinstance(response, web.Response) and isinstance(response.body, bytes):
        return len(response.body)
    return 0


async def expect(request: web.Request) -> None:
    """``Expect: 100-continue`` gets its interim 100 (as aiohttp's default handler sends it);
    any other expectation is left to the middleware, which answers 417 as JSON."""
    if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not the response's first byte
