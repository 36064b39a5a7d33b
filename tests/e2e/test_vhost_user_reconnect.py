"""A running guest outlives its back end: ``vblk vhost-user`` SIGKILLed and started again, several
times, while the guest's stress rounds have requests in flight.

The back end runs with an I/O limit, so the guest's requests wait at its throttle gate and every
kill finds some in flight. QEMU runs with ``-chardev socket,...,reconnect=1``: when the back end's
socket closes it stops the vhost device (the guest's requests simply wait) and reconnects every
second. The new vblk process listens on the same path, QEMU hands it the in-flight region it kept
(SET_INFLIGHT_FD), and the process resubmits what its predecessor had taken and not completed,
then goes on from the ring position the region records. The guest's workload verifies everything
it wrote by reading it back (O_DIRECT, four processes at a time); it must finish with no I/O
error, and e2fsck on the host must find the file system clean. Split and packed rings.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e import linux
from tests.e2e.conftest import DISK_SIZE, GuestKit
from tests.e2e.test_vhost_user import _serial_line
from tests.e2e.test_vhost_user_frontend import Variant, spawn_back_end

KILLS = int(os.environ.get("VBLK_E2E_KILLS", "3"))
ROUNDS = int(os.environ.get("VBLK_E2E_RECONNECT_ROUNDS", "1"))
# The guest's requests wait at the back end's throttle gate: every kill finds some in flight.
THROTTLE = "iops-total=200"


async def control(http_socket: Path, path: str) -> tuple[int, Any]:
    """GET on a back end's control surface (a unix socket), with aiohttp's client."""
    connector = aiohttp.UnixConnector(path=str(http_socket))
    async with aiohttp.ClientSession(connector=connector) as http, http.get(f"http://vblk{path}") as response:
        return response.status, await response.json()


async def spawn(directory: Path, image: Path, log: Path, control_socket: Path) -> asyncio.subprocess.Process:
    """``vblk vhost-user`` on ``directory``/vu.sock, throttled, its control surface on ``control_socket``."""
    (directory / "vu.sock").unlink(missing_ok=True)  # a killed predecessor's: wait for the new one
    extra = ["--throttle", THROTTLE, "--http", f"unix:{control_socket}"]
    proc, _socket, _log = await spawn_back_end(Variant("vblk"), image, directory, extra, log)
    return proc


def events(log_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]


async def wait_for_event(log_path: Path, event: str, timeout: float = 30) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        for entry in events(log_path):
            if entry["event"] == event:
                return entry
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {event} from vblk in {timeout:g} s:\n{log_path.read_text()}")


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_guest_io_survives_sigkill_and_restart_of_vblk_vhost_user(
    guest_kit: GuestKit, tmp_path: Path, packed: bool
) -> None:
    directory = Path(tempfile.mkdtemp(prefix="vblk-vu-"))  # short: unix socket paths are limited
    socket_path = directory / "vu.sock"
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
    serial_log = tmp_path / "serial.log"
    logs = [tmp_path / "vblk-0.log"]
    control_socket = directory / "ctl.sock"
    proc = await spawn(directory, image, logs[0], control_socket)
    boot: asyncio.Task[linux.Boot] | None = None
    try:
        boot = asyncio.get_running_loop().create_task(
            linux.boot(
                guest_kit.guest,
                serial_log=serial_log,
                mode="vda",
                qemu_args=linux.vhost_user_blk_args(socket_path, packed=packed, reconnect=1),
                append=f"vblk.stress={ROUNDS}",
                timeout=300,
            )
        )
        # The stress rounds follow the file-system check: kill the back end while they run.
        await _serial_line(boot, serial_log, "vblk-e2e: checked", timeout=120)
        for kill in range(1, KILLS + 1):
            await asyncio.sleep(0.5)
            proc.send_signal(signal.SIGKILL)
            assert await proc.wait() == -signal.SIGKILL
            logs.append(tmp_path / f"vblk-{kill}.log")
            proc = await spawn(directory, image, logs[-1], control_socket)
            resumed = await wait_for_event(logs[-1], "vhost_user_inflight_resubmitted")
            assert resumed["ring"] == 0, resumed
        # The last process says what it took up, on its control surface.
        status, info = await control(control_socket, "/v1/disks/disk0/info")
        assert status == 200 and info["ring"] == ("packed" if packed else "split"), info
        assert info["vhost_user"]["inflight_region"] is True, info
        assert info["vhost_user"]["resubmitted"] == resumed["requests"], (info, resumed)
        result = await boot
        layout = "packed" if packed else "split"
        print(f"guest boot with {KILLS} back-end kills ({layout}): {result.seconds:.1f}s")
        assert result.result() == ["ok", guest_kit.payload_sha256], result.describe()
        assert f"stress: {ROUNDS} rounds" in result.serial, result.describe()
        assert "I/O error" not in result.serial and "blk_update_request" not in result.serial, (
            result.describe()
        )
        await wait_for_event(logs[-1], "vhost_user_disconnected")  # QEMU exited
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, logs[-1].read_text()
    finally:
        if boot is not None and not boot.done():
            boot.cancel()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        shutil.rmtree(directory, ignore_errors=True)
    resubmitted = []
    for log_path in logs[1:]:
        found = events(log_path)
        starts = [e for e in found if e["event"] == "vhost_user_ring_started"]
        assert starts and all(e["packed"] is packed for e in starts), log_path.read_text()
        resubmitted += [e["requests"] for e in found if e["event"] == "vhost_user_inflight_resubmitted"]
    for log_path in logs:
        bad = [e for e in events(log_path) if e["level"] in ("error", "critical")]
        assert not bad, log_path.read_text()
    print("requests resubmitted after each restart:", resubmitted)
    assert len(resubmitted) == KILLS and all(resubmitted), resubmitted  # each restart took some up
    await linux.check_ext4_image(image, guest_kit.payload_sha256, result.describe())
