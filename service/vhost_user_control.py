"""``vblk vhost-user --http ADDR``: the control surface of a vhost-user back end's one disk.

Service layer, beside :mod:`service.vhost_user`. The routes have the shape ``vblk serve`` gives
them: ``GET /v1/disks`` (a list), ``GET /v1/disks/{name}/info`` (one disk), and ``PATCH
/v1/disks/{name}`` with ``{"op": "resize", "size": N, "shrink": false}``, answered with the
disk's description. The disk's bytes are the guest's (they move on the guest's rings, not on
this socket), so ``GET /v1/disks/{name}`` answers the same description rather than the data.
Requests pass the REST API's edge (:mod:`service.http.edge`): bearer tokens, JSON errors, the
``http_request`` log line. Every control call is logged once more, with who asked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from device.block.node import describe_stack
from device.spec import vhost_user as vu
from device.vhost_user import VhostUserBlk
from device.vhost_user.protocol import ShrinkRefusedError
from service.addresses import join_host_port
from service.blockio import FEATURE_NAMES, SECTOR
from service.http.edge import Edge, expect, observe, read_json_body, require_admin, who_asked
from service.http.errors import ApiError, ErrorCode
from service.http.params import MAX_JSON, no_such_disk, parse_json_object, shown, takes_query
from service.http.resize import parse_resize
from service.http.responses import json_response
from service.metrics import Metrics
from service.model import DiskSpec, SecurityConfig, ServiceConfig
from service.security import Tokens

log = structlog.get_logger("vblk.service.vhost_user")


@dataclasses.dataclass
class ControlHost:
    """What the edge needs of a running service (:class:`service.http.edge.EdgeHost`), for the
    one disk of ``vblk vhost-user``."""

    name: str
    spec: DiskSpec
    blk: VhostUserBlk
    socket: Path
    tokens: Tokens | None
    config: ServiceConfig
    metrics: Metrics


class ControlApi:
    def __init__(self, host: ControlHost) -> None:
        self.host = host

    def _disk(self, request: web.Request) -> str:
        name = request.match_info["name"]
        if name != self.host.name:
            raise no_such_disk(name)
        return name

    def describe(self) -> dict[str, Any]:
        """The disk as ``vblk serve``'s ``GET /v1/disks/{name}/info`` tells one, and its front end."""
        host = self.host
        blk = host.blk
        device = blk.device
        config = device.blk_config
        negotiated = device.driver_features if device.driver_ok else 0
        channel = blk.channel
        return {
            "name": host.name,
            "size": blk.node.size,
            "sector_size": SECTOR,
            "block_size": config.blk_size,
            "read_only": device.read_only,
            "features": sorted(name for bit, name in FEATURE_NAMES.items() if negotiated >> bit & 1),
            "queues": len(device.queues),
            "queue_size": config.queue_size,
            "ready": device.driver_ok,
            "ring": "packed" if device.packed else "split",
            "stack": describe_stack(blk.node),
            "serial": config.serial,
            "backend": host.spec.backend,
            "vhost_user": {
                "socket": str(host.socket),
                "connected": blk.connected,
                "protocol_features": vu.feature_names(blk.protocol_features),
                "backend_channel": channel is not None and not channel.closed,
                # The in-flight region QEMU keeps across restarts, and what this process took up
                # from it when its rings started (requests its predecessor left in flight).
                "inflight_region": blk.inflight is not None,
                "resubmitted": sum(start.resubmitted for start in blk.starts),
            },
        }

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    @takes_query()
    async def list_disks(self, request: web.Request) -> web.Response:
        return json_response([self.describe()])

    @takes_query()
    async def disk_info(self, request: web.Request) -> web.Response:
        self._disk(request)
        return json_response(self.describe())

    @takes_query()
    async def patch_disk(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        who = who_asked(request)
        blk = self.host.blk
        op: object = None
        try:
            self._disk(request)
            require_admin(request)
            body = parse_json_object(await read_json_body(request))
            op = body.get("op")
            if op != "resize":
                raise ApiError(
                    ErrorCode.BAD_OP,
                    "op must be resize: the data of vblk vhost-user's disk is the guest's, "
                    "it moves on the guest's rings",
                )
            if blk.device.read_only:
                raise ApiError(ErrorCode.READ_ONLY, f"disk {name} is read-only: it cannot be resized")
            resize = parse_resize(body, blk.node.size, blk.device.blk_config.blk_size)
            observe(request, name, "resize")
            try:
                outcome = await blk.resize(resize.size, shrink=resize.shrink)
            except ShrinkRefusedError as exc:  # the disk shrank meanwhile: the parser saw it bigger
                raise ApiError(ErrorCode.RESIZE_REFUSED, str(exc)) from exc
        except (ApiError, OSError) as exc:
            code = exc.code.code if isinstance(exc, ApiError) else "io_error"
            shown_op = shown(op) if isinstance(op, str) else None  # the client's words, only if plain
            log.warning("control_call_refused", op=shown_op, disk=shown(name), error=code, **who)
            raise
        log.info(
            "control_call",
            op="resize",
            disk=name,
            old_size=outcome.old_size,
            size=outcome.size,
            shrink=resize.shrink,
            notice=outcome.notice,
            **who,
        )
        answer = self.describe()
        answer["resize"] = {
            "old_size": outcome.old_size,
            "size": outcome.size,
            "notice": outcome.notice,
            "message": outcome.message,
        }
        return json_response(answer)


def build_control_app(host: ControlHost) -> web.Application:
    api = ControlApi(host)
    edge = Edge(host)
    app = web.Application(middlewares=[edge.middleware], client_max_size=MAX_JSON)
    app.on_response_prepare.append(edge.on_response_prepare)
    for method, path, handler in (
        ("GET", "/healthz", api.healthz),
        ("GET", "/v1/disks", api.list_disks),
        ("GET", "/v1/disks/{name}", api.disk_info),
        ("GET", "/v1/disks/{name}/info", api.disk_info),
        ("PATCH", "/v1/disks/{name}", api.patch_disk),
    ):
        app.router.add_route(method, path, handler, expect_handler=expect)
    return app


class ControlListener:
    """The control surface on ``unix:PATH`` or ``HOST:PORT``; the addresses it is bound to."""

    def __init__(
        self,
        address: str,
        *,
        name: str,
        spec: DiskSpec,
        blk: VhostUserBlk,
        socket: Path,
        tokens_file: Path | None = None,
    ) -> None:
        self.address = address
        security = SecurityConfig(tokens_file=tokens_file)
        tokens = Tokens.load(tokens_file) if tokens_file is not None else None
        self.host = ControlHost(
            name,
            spec,
            blk,
            socket,
            tokens,
            ServiceConfig(disks=(spec,), nbd_listen=(), http_listen=(address,), security=security),
            Metrics(dict, lambda: (0, 0, 0, 0, 0)),
        )
        self.addresses: list[str] = []
        self._runner: web.AppRunner | None = None
        self._unix: tuple[str, int] | None = None

    async def start(self) -> None:
        """Bind and serve; an OSError (or ValueError for a malformed address) if it cannot."""
        runner = web.AppRunner(build_control_app(self.host), access_log=None, shutdown_timeout=5)
        await runner.setup()
        self._runner = runner
        address = self.address
        site: web.BaseSite
        if address.startswith("unix:"):
            path = address.removeprefix("unix:")
            site = web.UnixSite(runner, path)
            await site.start()
            self._unix = (path, os.stat(path).st_ino)
            self.addresses.append(address)
        else:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"listen address {address!r}: want HOST:PORT or unix:PATH")
            site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True)
            await site.start()
            for bound in runner.addresses:
                if isinstance(bound, tuple):
                    self.addresses.append(join_host_port(bound[0], bound[1]))
            if self.host.tokens is None and host.strip("[]") not in ("127.0.0.1", "::1", "localhost"):
                log.warning(
                    "listening_beyond_loopback_unprotected",
                    front_end="http",
                    address=address,
                    hint="anyone who can reach it can resize the disk: use --tokens-file",
                )
        log.info("http_listening", addresses=self.addresses)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._unix is not None:
            path, inode = self._unix
            self._unix = None
            with contextlib.suppress(OSError):
                status = os.stat(path)
                if stat.S_ISSOCK(status.st_mode) and status.st_ino == inode:
                    os.unlink(path)
