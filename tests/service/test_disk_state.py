"""Run-time changes kept across restarts (``--state-dir``): the state file and what it brings back.

Disks added at run time come back with their options and limits, a configured disk's live resize
and limits come back over its configuration (unless the configuration changed them since), and a
SIGKILL in the middle of control-plane calls leaves the old state file or the new one, never a
torn one: the next start reads it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from service.model import DiskSpec, StartupError
from service.state import LOCK_FILE, STATE_FILE, RuntimeState, write_atomically
from tests.service.conftest import MiB, run, serving


def configured(tmp: Path, **changes: Any) -> DiskSpec:
    fields: dict[str, Any] = {
        "name": "disk0",
        "path": tmp / "d0.img",
        "size": 16 * MiB,
        "size_explicit": True,
        **changes,
    }
    return DiskSpec(**fields)


async def test_disks_added_resized_and_throttled_live_come_back_after_a_restart(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    async with serving(configured(tmp_path), state_dir=state_dir) as rig, aiohttp.ClientSession() as http:
        url = f"{rig.base_url}/v1/disks"
        added = {"name": "a", "image": str(tmp_path / "a.img"), "size": "8M", "iops-total": 300}
        for body in (added, {"name": "m", "backend": "memory", "size": "4M"}):
            async with http.post(url, json=body) as r:
                assert r.status == 201, await r.text()
        await run("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 64k", rig.uri("a"))
        for name, size in (("disk0", "32M"), ("a", "12M")):
            async with http.patch(f"{url}/{name}", json={"op": "resize", "size": size}) as r:
                assert r.status == 200, await r.text()
        async with http.patch(f"{url}/disk0", json={"op": "throttle", "bps-total": "16M"}) as r:
            assert r.status == 200, await r.text()
        async with http.patch(f"{url}/a", json={"op": "throttle", "iops-total": 400}) as r:
            assert r.status == 200, await r.text()
        writes = rig.service.state.writes
        assert writes == 6
    document = json.loads((state_dir / STATE_FILE).read_text())
    assert document["version"] == 1 and sorted(document["disks"]) == ["a", "disk0", "m"]
    # The same configuration again: without the state, disk0's 16M would not match its image.
    async with serving(configured(tmp_path), state_dir=state_dir) as rig, aiohttp.ClientSession() as http:
        service = rig.service
        assert sorted(service.disks) == ["a", "disk0", "m"]
        assert {name: disk.driver.size for name, disk in service.disks.items()} == {
            "disk0": 32 * MiB,
            "a": 12 * MiB,
            "m": 4 * MiB,
        }
        assert sorted(service.hotplugged) == ["a", "m"]  # hot-plugged again: removable
        assert service.throttling.group_limits("disk0") == {"bps-total": 16 * MiB}
        assert service.throttling.group_limits("a") == {"iops-total": 400}
        await run("qemu-io", "-f", "raw", "-c", "read -P 0x42 0 64k", rig.uri("a"))
        async with http.delete(f"{rig.base_url}/v1/disks/a") as r:
            assert r.status == 200
    async with serving(configured(tmp_path), state_dir=state_dir) as rig:
        assert sorted(rig.service.disks) == ["disk0", "m"]


async def test_the_configuration_wins_over_a_kept_change_it_has_changed_since(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    async with serving(configured(tmp_path), state_dir=state_dir) as rig, aiohttp.ClientSession() as http:
        url = f"{rig.base_url}/v1/disks/disk0"
        async with http.patch(url, json={"op": "throttle", "iops-total": 100}) as r:
            assert r.status == 200
        async with http.patch(url, json={"op": "resize", "size": "24M"}) as r:
            assert r.status == 200
    changed = configured(tmp_path, size=32 * MiB, grow=True, throttle=(("iops-total", 900),))
    async with serving(changed, state_dir=state_dir) as rig:
        service = rig.service
        assert service.disks["disk0"].driver.size == 32 * MiB  # the configuration's size, grown to
        assert service.throttling.group_limits("disk0") == {"iops-total": 900}
        assert not service.state.disks["disk0"].to_json()  # both kept changes are dropped


async def test_a_state_file_that_is_not_one_stops_the_start_with_its_path(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text('{"version": 1, "disks": {"a": {"added": 7}}}')
    with pytest.raises(StartupError) as caught:
        async with serving(configured(tmp_path), state_dir=tmp_path):
            pass
    assert caught.value.event == "state_unreadable" and str(tmp_path / STATE_FILE) in caught.value.message
    with pytest.raises(StartupError, match="does not exist"):
        async with serving(configured(tmp_path), state_dir=tmp_path / "missing"):
            pass


async def test_a_second_vblk_on_the_same_state_directory_is_refused_until_the_first_stops(
    tmp_path: Path,
) -> None:
    """Two processes keeping one directory would write over each other's changes: the second is
    refused with the first's pid, and starts once the first has stopped (a SIGKILLed one too)."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    proc, sock = await _serve(tmp_path, state_dir)
    try:
        assert (state_dir / LOCK_FILE).read_text().strip() == str(proc.pid)
        other = tmp_path / "other"
        other.mkdir()
        with pytest.raises(StartupError) as caught:
            async with serving(configured(other), state_dir=state_dir):
                pass
        assert caught.value.event == "state_dir_in_use" and f"pid {proc.pid}" in caught.value.message
        connector = aiohttp.UnixConnector(path=sock)
        async with aiohttp.ClientSession(connector=connector) as http, http.get("http://vblk/v1/disks") as r:
            assert r.status == 200  # the first goes on
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    async with serving(configured(tmp_path / "other"), state_dir=state_dir) as rig:  # the lock died with it
        assert (state_dir / LOCK_FILE).read_text().strip() == str(os.getpid())
        assert rig.service.state.kept
    async with serving(configured(tmp_path / "other"), state_dir=state_dir):  # and a stop lets it go
        pass


def test_an_atomic_write_replaces_all_or_nothing(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    write_atomically(path, b"old\n")
    write_atomically(path, b"new\n")
    assert path.read_bytes() == b"new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]
    (tmp_path / f".{STATE_FILE}.123.tmp").write_bytes(b"torn")  # a write a crash cut short
    state = RuntimeState(tmp_path)
    with pytest.raises(StartupError):
        state.load()  # "new" is not a state file: refused, never taken as empty
    again = RuntimeState(tmp_path)
    again._lock()  # refused, the directory was let go again: this takes it without a StartupError
    again.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOCK_FILE, STATE_FILE])  # the torn one gone


async def _serve(tmp: Path, state_dir: Path) -> tuple[asyncio.subprocess.Process, str]:
    sock = f"{tmp}/http.sock"
    Path(sock).unlink(missing_ok=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "serve", "--backend", "memory", "--size", "4M",
        "--nbd-listen", "none", "--http-listen", "none", "--http-socket", sock,
        "--state-dir", str(state_dir), "--log-level", "warning",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    for _ in range(400):
        if Path(sock).exists():
            try:
                async with (
                    aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as http,
                    http.get("http://vblk/readyz") as r,
                ):
                    if r.status == 200:
                        return proc, sock
            except aiohttp.ClientConnectionError:
                pass  # bound, not yet listening
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.025)
    proc.kill()
    _, err = await proc.communicate()
    raise AssertionError(f"vblk did not start: {err.decode()}")


async def _churn(http: aiohttp.ClientSession, round_: int, restored: set[str]) -> None:
    """Control-plane calls until the service dies: the restored disks removed, then adds and
    removes (every third call a remove), each answered before the next is sent."""
    for name in sorted(restored):  # restored disks are hot-plugged: removable
        async with http.delete(f"http://vblk/v1/disks/{name}") as r:
            assert r.status == 200
    n = 0
    while True:
        body = {"name": f"r{round_}n{n}", "backend": "memory", "size": "1M"}
        async with http.post("http://vblk/v1/disks", json=body) as r:
            assert r.status == 201, await r.text()
        if n % 3 == 2:
            async with http.delete(f"http://vblk/v1/disks/r{round_}n{n - 1}") as r:
                assert r.status == 200
        n += 1


async def test_sigkill_during_control_calls_leaves_a_whole_state_file(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    rng = random.Random(21)
    expected_before: set[str] = set()
    for round_ in range(5):
        proc, sock = await _serve(tmp_path, state_dir)
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as http:
            async with http.get("http://vblk/v1/disks") as r:
                names = {disk["name"] for disk in await r.json()}
            assert names == {"disk0"} | expected_before  # every disk the last file named came back

            task = asyncio.create_task(_churn(http, round_, expected_before))
            await asyncio.sleep(0.8 + rng.random() * 0.8)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            with pytest.raises((aiohttp.ClientError, AssertionError)):
                await task
        text = (state_dir / STATE_FILE).read_text()
        document = json.loads(text)  # whole: the old file or the new one
        assert document["version"] == 1
        expected_before = set(document["disks"])
        assert all("added" in entry for entry in document["disks"].values())
    proc, sock = await _serve(tmp_path, state_dir)
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
