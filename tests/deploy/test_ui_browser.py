"""/ui in a real browser: headless Chromium shows the rings move, and shows the JSON's numbers.

Set ``VBLK_UI_SCREENSHOT=docs/ui.png`` to refresh the screenshot the README shows; the test
always writes one into its temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import service.storage
from device.block.memory import MemoryNode
from service.app import Service
from service.model import DiskSpec, ServiceConfig
from tests.deploy.browser import Page, chromium
from tests.service.conftest import MiB

WIDTH = 1400
DELAY = 0.002  # each backend call takes this long in a worker thread: chains linger in the device

READ_VIEW = """JSON.stringify({
  fields: Object.fromEntries([...document.querySelectorAll('[data-field]')]
    .map((e) => [e.dataset.field, e.textContent])),
  rates: Object.fromEntries([...document.querySelectorAll('[data-rate]')]
    .map((e) => [e.dataset.rate, e.textContent])),
  cells: Object.fromEntries([...document.querySelectorAll('[data-grid]')]
    .map((g) => [g.dataset.grid, [...g.children].map((c) => c.className)])),
  chains: Object.fromEntries([...document.querySelectorAll('[data-chains]')]
    .map((t) => [t.dataset.chains, [...t.querySelectorAll('tr[data-head]')].map((r) => r.textContent)])),
  state: window.vblk.state, polls: window.vblk.polls, errors: window.vblk.errors,
})"""


class SlowBackend(MemoryNode):
    def read_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        time.sleep(DELAY)
        super().read_now(offset, buffers)

    def write_now(self, offset: int, buffers: Sequence[memoryview]) -> None:
        time.sleep(DELAY)
        super().write_now(offset, buffers)


@pytest.fixture
async def slow_service(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Service]:
    monkeypatch.setattr(service.storage, "open_storage", lambda spec: SlowBackend(spec.size))
    directory = tempfile.mkdtemp(prefix="vblk-")
    config = ServiceConfig(
        disks=(
            DiskSpec(
                name="disk0", backend="memory", size=64 * MiB, num_queues=2, queue_size=64, io_mode="thread"
            ),
        ),
        guest_memory=64 * MiB,
        nbd_listen=(f"unix:{directory}/nbd.sock",),
        http_listen=("127.0.0.1:0",),
    )
    vblk = Service(config)
    await vblk.start()
    await vblk.start_front_ends()
    try:
        yield vblk
    finally:
        await vblk.stop()
        shutil.rmtree(directory, ignore_errors=True)


def lookup(state: dict[str, Any], path: str) -> Any:
    name, *keys = path.split("/")
    value: Any = next(d for d in state["disks"] if d["name"] == name)
    for key in keys:
        value = value[int(key)] if isinstance(value, list) else value[key]
    return value


def check_view(view: dict[str, Any], state: dict[str, Any]) -> None:
    """Every number on screen is the one in ``state``; the descriptor grid is its table."""
    assert len(view["fields"]) >= 30
    for path, text in view["fields"].items():
        assert text == str(lookup(state, path)), path
    for path, classes in view["cells"].items():
        queue = lookup(state, path)
        assert len(classes) == queue["size"]
        for cell, kind in zip(classes, queue["descriptors"], strict=True):
            assert cell == "cell" if kind == "." else cell.split()[:2] == ["cell", kind]
        stages = {c["head"]: c["stage"] for c in queue["chains"]}
        for head, stage in stages.items():
            assert classes[head].split()[-1] == stage
        assert len(view["chains"][path]) == min(12, len(queue["chains"]))


async def read_view(page: Page) -> dict[str, Any]:
    view: dict[str, Any] = json.loads(await page.evaluate(READ_VIEW))
    assert view["errors"] == 0
    return view


async def workload(base_url: str, stop: asyncio.Event, clients: int = 12) -> int:
    """REST clients writing and reading 4 KiB sectors until ``stop``; requests made."""
    done = 0

    async def client(http: aiohttp.ClientSession, seed: int) -> None:
        nonlocal done
        rng = random.Random(seed)
        while not stop.is_set():
            lba = rng.randrange(0, 64 * MiB // 512 - 8, 8)
            if rng.random() < 0.5:
                async with http.put(f"/v1/disks/disk0/sectors/{lba}?flush=n", data=os.urandom(4096)) as r:
                    assert r.status == 200
            else:
                async with http.get(f"/v1/disks/disk0/sectors/{lba}?count=8") as r:
                    assert r.status == 200 and len(await r.read()) == 4096
            done += 1

    async with aiohttp.ClientSession(base_url) as http:
        await asyncio.gather(*(client(http, seed) for seed in range(clients)))
    return done


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    return width, height


async def test_rings_page_moves_with_a_workload_and_matches_the_json(
    slow_service: Service, tmp_path: Path
) -> None:
    base_url = f"http://{slow_service.http_addresses[0]}"
    async with chromium(WIDTH, 1000) as page:
        await page.send("Page.navigate", {"url": f"{base_url}/ui?interval=150"})
        await page.wait_for("window.vblk && window.vblk.polls >= 2")
        idle = await read_view(page)
        check_view(idle, idle["state"])
        assert idle["fields"]["disk0/queues/0/counts/in_flight"] == "0"

        stop = asyncio.Event()
        load = asyncio.get_running_loop().create_task(workload(base_url, stop))
        try:
            await asyncio.sleep(0.5)
            first = await read_view(page)
            check_view(first, first["state"])
            # Watch until requests are caught in flight on screen (the slow backend holds them).
            busiest = first
            async with asyncio.timeout(10):
                while True:
                    await asyncio.sleep(0.2)
                    view = await read_view(page)
                    check_view(view, view["state"])
                    in_flight = sum(int(view["fields"][f"disk0/queues/{q}/counts/in_flight"]) for q in (0, 1))
                    if in_flight > sum(
                        int(busiest["fields"][f"disk0/queues/{q}/counts/in_flight"]) for q in (0, 1)
                    ):
                        busiest = view
                    if in_flight >= 4 and view["polls"] >= first["polls"] + 4:
                        break
            if os.environ.get("VBLK_UI_SCREENSHOT"):
                await asyncio.sleep(4)  # the picture for the README: let the charts fill in
            shot = tmp_path / "ui.png"
            png = await page.screenshot(shot)
            last = await read_view(page)
        finally:
            stop.set()
            requests = await load
        assert requests > 50
        # The numbers on screen moved with the workload.
        for q in (0, 1):
            for key in ("avail/idx", "used/idx", "driver/kicks", "device/interrupts"):
                path = f"disk0/queues/{q}/{key}"
                assert last["fields"][path] != idle["fields"][path], path
        assert int(last["fields"]["disk0/requests/completed"]) > int(
            first["fields"]["disk0/requests/completed"]
        )
        assert float(last["rates"]["disk0/iops"]) > 0
        assert any(rows for rows in busiest["chains"].values())  # chains listed while in flight

        # Quiet again: what the page shows is what the JSON says right now.
        polls = (await read_view(page))["polls"]
        await page.wait_for(f"window.vblk.polls >= {polls + 2}")
        settled = await read_view(page)
        async with aiohttp.ClientSession() as http, http.get(f"{base_url}/ui/state.json") as r:
            fresh = await r.json()
        check_view(settled, fresh)
        assert settled["fields"]["disk0/queues/0/counts/free"] == "64"

        assert page.errors == []
        assert page.requests and all(url.startswith(base_url + "/") for url in page.requests), page.requests

    width, height = png_size(png)
    assert width == WIDTH and height >= 600
    target = os.environ.get("VBLK_UI_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)
