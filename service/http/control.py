"""The REST API's control plane: calls that change a disk rather than its data.

Service layer, REST front end, beside :mod:`service.http.api` (which routes ``PATCH
/v1/disks/{name}`` here for the ops that are not data: ``throttle``). Every call needs an ``admin``
token (or, without tokens, a client on this machine), and is logged with who asked, whether it is
done or refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from service.http.edge import observe, require_admin, who_asked
from service.http.errors import ApiError, ErrorCode
from service.http.params import shown
from service.http.responses import json_response
from service.throttling import ThrottleError, Throttling, throttleable
from service.values import parse_size

if TYPE_CHECKING:
    from service.model import Disk

log = structlog.get_logger("vblk.http")


def _limit_values(body: Mapping[str, object]) -> dict[str, object]:
    """The body's limits as numbers (``"10M"`` as the CLI writes it too); ``group`` as it is."""
    changes: dict[str, object] = {}
    for key, value in body.items():
        if key == "op":
            continue
        if key == "group":
            if not isinstance(value, str):
                raise ApiError(ErrorCode.BAD_FIELD, 'group: a name ("" for the disk\'s own)')
            changes[key] = value
        elif isinstance(value, str):
            try:
                changes[key] = parse_size(value)
            except ValueError:
                raise ApiError(
                    ErrorCode.BAD_FIELD, f"{shown(key)}: a whole number, or a size as 10M"
                ) from None
        else:
            changes[key] = value
    return changes


class ControlApi:
    """``PATCH /v1/disks/{name}`` op ``throttle``: the disk's I/O limits, live."""

    def __init__(self, throttling: Callable[[], Throttling]) -> None:
        self._throttling = throttling

    async def throttle(self, request: web.Request, disk: Disk, body: Mapping[str, object]) -> web.Response:
        who = who_asked(request)
        name = disk.spec.name
        try:
            require_admin(request)
            observe(request, name, "throttle")
            device = throttleable(disk.device)
            if device is None:
                raise ApiError(
                    ErrorCode.UNSUPPORTED,
                    f"disk {name} is a vhost-user back end's: give it limits there",
                )
            changes = _limit_values(body)
            try:
                answer = self._throttling().change(name, device, changes)
            except ThrottleError as exc:
                raise ApiError(ErrorCode.BAD_FIELD, str(exc)) from exc
        except ApiError as exc:
            log.warning("control_call_refused", op="throttle", disk=name, error=exc.code.code, **who)
            raise
        log.info(
            "control_call", op="throttle", disk=name, group=answer["group"], limits=answer["limits"], **who
        )
        return json_response({"op": "throttle", **answer})
