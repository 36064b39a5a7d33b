"""The ring view's HTTP side: the snapshot routes and the page that draws them.

Service layer, HTTP front end. ``GET /v1/disks/{name}/rings`` and ``GET /ui/state.json`` return
the snapshots :mod:`service.rings` takes; ``GET /ui`` is a self-contained page (no build step,
nothing fetched from elsewhere) that polls them, shows requests move through the rings and turns
the counters into rates.
"""

from __future__ import annotations

import functools
import importlib.resources
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from service.http.params import takes_query
from service.http.responses import json_response


class RingsView:
    """The handlers of ``/ui``, ``/ui/state.json`` and ``/v1/disks/{name}/rings``."""

    def __init__(
        self,
        snapshot: Callable[[str], dict[str, Any]],
        names: Callable[[], Iterable[str]],
        name_of: Callable[[web.Request], str],
    ) -> None:
        """``snapshot(disk)``: one disk's rings; ``names()``: every disk; ``name_of(request)``:
        the disk a request names (404 for an unknown one, as everywhere)."""
        self._snapshot = snapshot
        self._names = names
        self._name_of = name_of

    @takes_query()
    async def rings(self, request: web.Request) -> web.Response:
        return json_response(self._snapshot(self._name_of(request)))

    async def state(self, request: web.Request) -> web.Response:
        disks = [self._snapshot(name) for name in self._names()]
        return json_response({"time": time.time(), "disks": disks}, headers={"Cache-Control": "no-store"})

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=page_html(), content_type="text/html", charset="utf-8")


@functools.cache
def page_html() -> str:
    """The page: HTML, CSS and script in one file, shipped as package data."""
    return importlib.resources.files("service.http").joinpath("static/ui.html").read_text("utf-8")
