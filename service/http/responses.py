"""JSON answers of the REST API: one helper for every JSON body, success or error.

Service layer, REST front end. Each body is one JSON document and a newline, so ``curl``'s
output ends its line before the shell prompt; handlers and the middleware build every JSON
response here rather than calling :func:`aiohttp.web.json_response`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from service.http.errors import ApiError


def json_body(data: Any) -> bytes:
    """``data`` as the bytes of a JSON body: one document, then a newline."""
    return (json.dumps(data) + "\n").encode()


def json_response(data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """``data`` as ``application/json; charset=utf-8``, ending with a newline."""
    return web.Response(
        body=json_body(data), status=status, headers=headers, content_type="application/json", charset="utf-8"
    )


def error_body(error: ApiError) -> bytes:
    return json_body({"error": error.code.code, "message": error.message})


def error_response(error: ApiError) -> web.Response:
    """The answer to ``error``: its status and headers, ``{"error": code, "message": ...}``."""
    return web.Response(
        body=error_body(error),
        status=error.status,
        headers=error.headers,
        content_type="application/json",
        charset="utf-8",
    )
