"""The REST API's error codes and the typed error that carries one to the client.

Service layer, REST front end. Every error answer is JSON ``{"error": code, "message":
sentence}``; the code is stable (clients branch on it), the sentence is for people. The
OpenAPI document lists the codes from :class:`ErrorCode`, so the two cannot drift apart.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class ErrorCode(enum.Enum):
    """A stable error code, the HTTP status it is answered with, and what it means."""

    BAD_PARAMETER = (
        "bad_parameter",
        400,
        "a path or query value is malformed or out of range, "
        "a query parameter is unknown to the route, or one is given twice",
    )
    BAD_JSON = (
        "bad_json",
        400,
        "the body is not one JSON object (not UTF-8, a syntax error, "
        "a duplicate key, NaN or Infinity, nested too deeply)",
    )
    BAD_FIELD = (
        "bad_field",
        400,
        "a field of the JSON body is missing, unknown, of the wrong type or out of range",
    )
    BAD_OP = (
        "bad_op",
        400,
        "PATCH op is missing or not one the route takes (a disk: zero, discard, flush, resize, throttle; "
        "a bitmap: clear, enable, disable, merge)",
    )
    BAD_CONTENT_RANGE = (
        "bad_content_range",
        400,
        "the Content-Range of a PUT is malformed or names another size than the disk's",
    )
    LENGTH_MISMATCH = ("length_mismatch", 400, "Content-Length disagrees with Content-Range or count")
    BAD_LENGTH = ("bad_length", 400, "a sectors PUT body is not 1..65536 whole 512-byte sectors")
    SHORT_BODY = ("short_body", 400, "the body ended before Content-Length bytes arrived")
    BAD_REQUEST = ("bad_request", 400, "the request is malformed")
    UNAUTHORIZED = ("unauthorized", 401, "no valid bearer token (tokens are configured)")
    READ_ONLY = ("read_only", 403, "the disk is read-only")
    READ_ONLY_TOKEN = ("read_only_token", 403, "the bearer token may only read")
    ADMIN_REQUIRED = (
        "admin_required",
        403,
        "a control-plane call (a disk added, removed, resized or throttled) needs an admin token; "
        "without tokens, a client on this machine",
    )
    NO_SUCH_DISK = ("no_such_disk", 404, "no disk has this name")
    NOT_FOUND = ("not_found", 404, "no such route")
    NO_DIRTY_TRACKING = ("no_dirty_tracking", 404, "extents context=dirty: the disk tracks no dirty blocks")
    NO_SUCH_BITMAP = ("no_such_bitmap", 404, "the disk has no bitmap of this name")
    NO_SUCH_VIEW = ("no_such_view", 404, "the disk has no point-in-time view of this name")
    METHOD_NOT_ALLOWED = ("method_not_allowed", 405, "the route does not take this method (see Allow)")
    BITMAP_EXISTS = ("bitmap_exists", 409, "the disk already has a bitmap of this name")
    BITMAP_INCONSISTENT = (
        "bitmap_inconsistent",
        409,
        "the bitmap was in use when its image was last closed (it may miss writes): it can only be removed",
    )
    BITMAP_REFUSED = (
        "bitmap_refused",
        409,
        "the bitmap cannot be made as asked: persistence this disk cannot keep, "
        "or more bitmaps or memory than a disk may have",
    )
    DISK_EXISTS = ("disk_exists", 409, "a disk or view already has this name")
    DISK_REFUSED = (
        "disk_refused",
        409,
        "the disk cannot be added, removed or resized as asked: no free hot-plug slot, a throttle group "
        "with other limits, a disk configured at start (it sits on bus 0, which has no hot-plug slots), "
        "a view, a disk with views, or a disk committing its overlay",
    )
    DISK_OPEN_FAILED = (
        "disk_open_failed",
        409,
        "the disk's storage cannot be opened or made (a missing or locked file, a cluster that does not "
        "answer), or the guest did not bind the hot-plugged function",
    )
    VIEW_EXISTS = ("view_exists", 409, "a disk or view already has this name")
    VIEW_REFUSED = (
        "view_refused",
        409,
        "the view cannot be made: the disk's storage cannot copy before writes (RBD, vhost-user), "
        "it is a view itself, or its scratch file cannot be made",
    )
    SNAPSHOT_EXISTS = ("snapshot_exists", 409, "the overlay file named already exists")
    SNAPSHOT_REFUSED = (
        "snapshot_refused",
        409,
        "the snapshot or commit cannot be made: not a writable file disk, point-in-time views are open, "
        "nothing to commit into, or the image files cannot be made or opened",
    )
    RESIZE_REFUSED = (
        "resize_refused",
        409,
        'the resize is refused: a size below the disk\'s without "shrink": true',
    )
    LENGTH_REQUIRED = ("length_required", 411, "a PUT needs Content-Length (or Content-Range)")
    PAYLOAD_TOO_LARGE = ("payload_too_large", 413, "the JSON body is over 64 KiB")
    URI_TOO_LONG = ("uri_too_long", 414, "the request target is too long")
    UNSUPPORTED_MEDIA_TYPE = ("unsupported_media_type", 415, "the body's Content-Type is refused")
    EXPECTATION_FAILED = ("expectation_failed", 417, "an Expect header other than 100-continue")
    RANGE_NOT_SATISFIABLE = (
        "range_not_satisfiable",
        416,
        "the range, offset or sectors are "
        "outside the disk, or the Range header cannot be served; "
        "Content-Range: bytes */SIZE gives the size",
    )
    HEADERS_TOO_LARGE = ("headers_too_large", 431, "the request headers are too large")
    HTTP_ERROR = ("http_error", 400, "another 4xx refusal of the HTTP layer (the status says which)")
    IO_ERROR = ("io_error", 500, "the disk's backend failed the request")
    INTERNAL = ("internal", 500, "a bug in vblk; the service log has the details")
    UNSUPPORTED = ("unsupported", 501, "the device does not support the operation")
    UNAVAILABLE = ("unavailable", 503, "the device is being reset; try again")
    NO_SPACE = ("no_space", 507, "the backend is out of space")

    @property
    def code(self) -> str:
        return self.value[0]

    @property
    def status(self) -> int:
        return self.value[1]

    @property
    def description(self) -> str:
        return self.value[2]


class ApiError(Exception):
    """An error answered as JSON ``{"error": code, "message": message}``.

    ``status`` overrides the code's own only for :attr:`ErrorCode.HTTP_ERROR`, which stands
    for any 4xx the HTTP layer answers itself.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        headers: Mapping[str, str] | None = None,
        *,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = code.status if status is None else status
        self.message = message
        self.headers = dict(headers or {})


def unsatisfiable(size: int, message: str) -> ApiError:
    """416 with the ``Content-Range: bytes */size`` RFC 9110 section 15.5.17 asks for."""
    return ApiError(ErrorCode.RANGE_NOT_SATISFIABLE, message, {"Content-Range": f"bytes */{size}"})
