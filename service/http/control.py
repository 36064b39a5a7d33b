"""The REST API's control plane: calls that add, remove and change disks rather than their data.

Service layer, REST front end, beside :mod:`service.http.api` (which routes ``POST /v1/disks``,
``DELETE /v1/disks/{name}`` and the ``PATCH /v1/disks/{name}`` ops that are not data, ``resize``
and ``throttle``, here). Every call needs an ``admin`` token (or, without tokens, a client on this
machine), and is logged with who asked, whether it is done or refused. The service's
:class:`~service.model.DiskError` kinds become the API's error codes here.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog
from aiohttp import web

from service.config import ConfigError, disk_of_table
from service.http.edge import observe, require_admin, who_asked
from service.http.errors import ApiError, ErrorCode
from service.http.params import json_type, parse_json_object, shown
from service.http.resize import parse_resize
from service.http.responses import json_response
from service.model import DiskError
from service.throttling import Throttled, ThrottleError, Throttling, throttleable
from service.values import parse_size

if TYPE_CHECKING:
    from service.model import Disk, DiskSpec, ServiceConfig

# The service's refusals of a disk call as the API's error codes.
_DISK_ERRORS: Final = {
    "disk_exists": ErrorCode.DISK_EXISTS,
    "no_such_disk": ErrorCode.NO_SUCH_DISK,
    "disk_refused": ErrorCode.DISK_REFUSED,
    "disk_open_failed": ErrorCode.DISK_OPEN_FAILED,
    "resize_refused": ErrorCode.RESIZE_REFUSED,
    "resize_failed": ErrorCode.IO_ERROR,
    "read_only": ErrorCode.READ_ONLY,
    "unsupported": ErrorCode.UNSUPPORTED,
    "unavailable": ErrorCode.UNAVAILABLE,
}


def disk_error(exc: DiskError) -> ApiError:
    return ApiError(_DISK_ERRORS.get(exc.kind, ErrorCode.INTERNAL), exc.message)


class ControlHost(Protocol):
    """What the control plane uses of the running service."""

    @property
    def throttling(self) -> Throttling: ...

    @property
    def config(self) -> ServiceConfig: ...

    def add_disk(self, spec: DiskSpec, options: dict[str, object] | None = None) -> Awaitable[Disk]: ...

    def remove_disk(self, name: str) -> Awaitable[dict[str, object]]: ...

    def resize_disk(self, name: str, size: int, *, shrink: bool = False) -> Awaitable[dict[str, object]]: ...

    def throttle_disk(
        self, name: str, device: Throttled, changes: dict[str, object]
    ) -> Awaitable[dict[str, Any]]: ...


def disk_options(body: Mapping[str, object]) -> dict[str, object]:
    """A ``POST /v1/disks`` body's options: strings as ``--disk`` writes them, integers, booleans."""
    for key, value in body.items():
        if isinstance(value, bool | str) or (isinstance(value, int) and not isinstance(value, bool)):
            continue
        raise ApiError(
            ErrorCode.BAD_FIELD,
            f"{shown(key) or 'a field'} must be a string, an integer or a boolean, not {json_type(value)}",
        )
    if not isinstance(body.get("name"), str):
        raise ApiError(ErrorCode.BAD_FIELD, "name is required: the disk's name, a string")
    return dict(body)


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


@dataclasses.dataclass(slots=True)
class ControlCall:
    """One control-plane call being answered: what its log line says (``disk`` once known,
    ``details`` once done)."""

    op: str
    who: dict[str, object]
    disk: str | None = None
    details: dict[str, object] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def control_call(request: web.Request, op: str, disk: str | None = None) -> Iterator[ControlCall]:
    """An admin's call (:func:`require_admin`), its service refusals as the API's errors, and its
    log line: ``control_call`` when done, ``control_call_refused`` with the code, naming who asked."""
    call = ControlCall(op, who_asked(request), disk)
    try:
        require_admin(request)
        try:
            yield call
        except DiskError as exc:
            raise disk_error(exc) from exc
        except ThrottleError as exc:
            raise ApiError(ErrorCode.BAD_FIELD, str(exc)) from exc
    except ApiError as exc:
        disk_name = shown(call.disk) if call.disk is not None else None
        log.warning("control_call_refused", op=op, disk=disk_name, error=exc.code.code, **call.who)
        raise
    log.info("control_call", op=op, disk=call.disk, **call.details, **call.who)


class ControlApi:
    """Disks added (``POST /v1/disks``), removed (``DELETE /v1/disks/{name}``), resized and
    throttled (``PATCH /v1/disks/{name}`` ops ``resize`` and ``throttle``), live."""

    def __init__(self, host: Callable[[], ControlHost], describe: Callable[[str], dict[str, Any]]) -> None:
        self._host = host
        self._describe = describe

    async def add_disk(self, request: web.Request, raw: bytes) -> web.Response:
        with control_call(request, "add") as call:
            body = parse_json_object(raw)
            name = body.get("name")
            call.disk = name if isinstance(name, str) else None
            options = disk_options(body)
            try:
                spec = disk_of_table(options, self._host().config.disk_template)
            except ConfigError as exc:
                raise ApiError(ErrorCode.BAD_FIELD, str(exc)) from exc
            disk = await self._host().add_disk(spec, options)
            observe(request, spec.name, "add")  # only now: a refused name gets no metric series
            call.details.update(
                backend=spec.backend,
                path=str(spec.path) if spec.backend == "file" else None,
                size=disk.bytes.size,
            )
        return json_response(
            self._describe(spec.name), status=201, headers={"Location": f"/v1/disks/{spec.name}"}
        )

    async def remove_disk(self, request: web.Request, name: str) -> web.Response:
        with control_call(request, "remove", name):  # not observed: its series go with the disk
            outcome = await self._host().remove_disk(name)
        return json_response(outcome)

    async def resize(self, request: web.Request, disk: Disk, body: Mapping[str, object]) -> web.Response:
        name = disk.spec.name
        with control_call(request, "resize", name) as call:
            observe(request, name, "resize")
            resize = parse_resize(body, disk.driver.size, disk.driver.block_size)
            outcome = await self._host().resize_disk(name, resize.size, shrink=resize.shrink)
            call.details.update(outcome, shrink=resize.shrink)
        answer = self._describe(name)
        answer["resize"] = outcome
        return json_response(answer)

    async def throttle(self, request: web.Request, disk: Disk, body: Mapping[str, object]) -> web.Response:
        name = disk.spec.name
        with control_call(request, "throttle", name) as call:
            observe(request, name, "throttle")
            device = throttleable(disk.device)
            if device is None:
                raise ApiError(
                    ErrorCode.UNSUPPORTED,
                    f"disk {name} is a vhost-user back end's: give it limits there",
                )
            answer = await self._host().throttle_disk(name, device, _limit_values(body))
            call.details.update(group=answer["group"], limits=answer["limits"])
        return json_response({"op": "throttle", **answer})
