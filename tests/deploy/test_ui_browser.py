"""/ui in a real browser: headless Chromium shows the rings move, and shows the JSON's numbers.

Two workloads: REST clients on a slow backend, whose chains linger in flight for the snapshot
to catch, and fio on a raw file with inline I/O (the default), whose chains never do: there
the page shows what happened between polls. Set ``VBLK_UI_SCREENSHOT=docs/ui.png`` to refresh
the screenshot the README shows (from the fio run); the tests always write theirs into their
temporary directories.
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
from tests.deploy.conftest import tool
from tests.service.conftest import MiB, NbdRig, serving

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
  colours: Object.fromEntries([...document.querySelectorAll('[data-grid]')]
    .map((g) => [g.dataset.grid, [...g.children].map((c) => getComputedStyle(c).backgroundColor)])),
  heat: Object.fromEntries(Object.entries(window.vblk.heat).map(([k, v]) => [k, [...v]])),
  ink: Object.fromEntries([...document.querySelectorAll('canvas[data-chart]')].map((c) => {
    const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0;  // strongly coloured pixels: bars and lines, not the grey labels and axes
    for (let i = 0; i < px.length; i += 4) {
      const rgb = [px[i], px[i + 1], px[i + 2]];
      if (px[i + 3] > 200 && Math.max(...rgb) - Math.min(...rgb) > 60) n++;
    }
    return [c.dataset.chart, n];
  })),
  state: window.vblk.state, polls: window.vblk.polls, errors: window.vblk.errors,
})"""
FREE = "rgb(227, 230, 236)"  # --free: a descriptor not in flight and not recently a head
STAGE_COLOURS = {"avail": "rgb(61, 123, 240)", "device": "rgb(240, 160, 32)", "used": "rgb(47, 168, 79)"}
STAGES = {*STAGE_COLOURS.values(), "rgb(154, 109, 215)"}  # and --unknown


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
    queues = sum(len(disk["queues"]) for disk in state["disks"])
    assert len(view["fields"]) == 3 * len(state["disks"]) + 18 * queues  # every one is drawn
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
            assert view["colours"][path][head] == STAGE_COLOURS[stage]  # in flight: its stage, not its heat
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


@pytest.fixture
async def file_disk(tmp_path: Path) -> AsyncIterator[NbdRig]:
    """vblk as a user runs it by default: a raw image file, inline I/O, one queue of 256."""
    async with serving(
        DiskSpec(name="disk0", backend="file", path=tmp_path / "disk0.img", size=64 * MiB, io_mode="inline")
    ) as rig:
        yield rig


FIO_JOBS = (  # two connections: random 4 KiB reads and writes 16 deep, a 64 KiB stream 4 deep
    "--time_based",
    "--size=32M",
    "--output-format=json",
    "--name=random",
    "--rw=randrw",
    "--bs=4k",
    "--iodepth=16",
    "--name=stream",
    "--rw=read",
    "--bs=64k",
    "--iodepth=4",
)


def hot(view: dict[str, Any], path: str) -> list[int]:
    """The descriptors the page colours by recent use (not grey, not a stage of a chain in flight)."""
    return [i for i, colour in enumerate(view["colours"][path]) if colour != FREE and colour not in STAGES]


async def test_fio_on_a_raw_file_colours_the_descriptors_it_used(file_disk: NbdRig, tmp_path: Path) -> None:
    """Inline I/O completes within one loop pass, so no poll catches a chain in flight; the
    page still shows which descriptors the workload used, its batches and its peak depth."""
    base_url = file_disk.base_url
    q = "disk0/queues/0"
    async with chromium(WIDTH, 1000) as page:
        await page.send("Page.navigate", {"url": f"{base_url}/ui?interval=250"})
        await page.wait_for("window.vblk && window.vblk.polls >= 2")
        idle = await read_view(page)
        check_view(idle, idle["state"])
        assert hot(idle, q) == [] and set(idle["colours"][q]) == {FREE}
        used_before = lookup(idle["state"], f"{q}/activity/chains_by_head")

        runtime = 20 if os.environ.get("VBLK_UI_SCREENSHOT") else 8
        fio = await asyncio.create_subprocess_exec(
            tool("fio"),
            "--ioengine=nbd",
            f"--uri={file_disk.uri()}",  # an engine option: after the engine
            f"--runtime={runtime}",
            *FIO_JOBS,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        output = asyncio.get_running_loop().create_task(fio.communicate())
        try:
            views: list[dict[str, Any]] = []
            async with asyncio.timeout(30):
                while True:
                    await asyncio.sleep(0.25)
                    if output.done():
                        raise AssertionError(f"fio stopped early: {output.result()[1]!r}")
                    view = await read_view(page)
                    check_view(view, view["state"])
                    views.append(view)
                    if len(views) >= 12 and len(hot(view, q)) >= 4 and view["ink"][f"{q}/kick_batches"]:
                        break
            if os.environ.get("VBLK_UI_SCREENSHOT"):
                await asyncio.sleep(6)  # the picture for the README: let the charts fill in
            png = await page.screenshot(tmp_path / "ui.png")
            loaded = await read_view(page)
            check_view(loaded, loaded["state"])
        except BaseException:
            fio.kill()
            raise
        finally:
            out, err = await output
        assert fio.returncode == 0, err.decode(errors="replace")
        jobs = json.loads(out[out.index(b"{") :])["jobs"]
        ios = sum(job["read"]["total_ios"] + job["write"]["total_ios"] for job in jobs)

        # No poll caught more than a few chains in flight, but every one saw the peak behind it.
        assert max(int(v["fields"][f"{q}/activity/peak_in_flight"]) for v in views) >= 2
        in_flight = [int(v["fields"][f"{q}/counts/in_flight"]) for v in views]
        peaks = [int(v["fields"][f"{q}/activity/peak_in_flight"]) for v in views]
        assert sum(peaks) > sum(in_flight)
        # The coloured descriptors are the heads the workload used: chains_by_head grew there, and
        # the busiest head is the darkest.
        used_now = lookup(loaded["state"], f"{q}/activity/chains_by_head")
        grew = {i for i, (a, b) in enumerate(zip(used_before, used_now, strict=True)) if b > a}
        coloured = set(hot(loaded, q))
        assert len(coloured) >= 4 and coloured <= grew
        assert all(loaded["colours"][q][i] == FREE for i in range(256) if i not in grew)
        heat = loaded["heat"][q]
        assert max(heat) > 0 and heat.index(max(heat)) in coloured
        # Rates between polls: chains went through both rings, several per kick.
        rates = loaded["rates"]
        assert float(rates[f"{q}/avail_rate"]) > 0 and float(rates[f"{q}/used_rate"]) > 0
        assert float(rates[f"{q}/chains_per_kick"]) > 1
        assert float(rates[f"{q}/used_per_irq"]) > 1
        assert rates[f"{q}/indirect_share"] == "100"  # every chain: one descriptor, an indirect table
        assert int(rates[f"{q}/heads_active"]) >= 4
        for chart in ("kick_batches", "device_batches", "interrupt_batches", "depth"):
            assert loaded["ink"][f"{q}/{chart}"] > 0, chart  # bars and lines were drawn

        # Quiet again (fio is done): every request it made was counted, and the heat fades.
        polls = (await read_view(page))["polls"]
        await page.wait_for(f"window.vblk.polls >= {polls + 2}")
        quiet = await read_view(page)
        check_view(quiet, quiet["state"])
        activity = lookup(quiet["state"], f"{q}/activity")
        published = activity["chains_published"] - sum(used_before)
        assert published == sum(activity["chains_by_head"]) - sum(used_before) >= ios > 1000
        hottest = float(quiet["rates"][f"{q}/heat_max"])
        await asyncio.sleep(2)
        faded = await read_view(page)
        assert 0 < float(faded["rates"][f"{q}/heat_max"]) < 0.8 * hottest
        assert hot(faded, q) and set(hot(faded, q)) <= grew  # still shown, fading
        assert page.errors == []
        assert page.requests and all(url.startswith(base_url + "/") for url in page.requests), page.requests

    width, height = png_size(png)
    assert width == WIDTH and height >= 600
    target = os.environ.get("VBLK_UI_SCREENSHOT")
    if target:
        shutil.copyfile(tmp_path / "ui.png", target)
