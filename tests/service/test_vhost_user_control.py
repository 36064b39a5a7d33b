"""``vblk vhost-user --http``: the control surface of the back end's disk, without QEMU.

The listener on a unix socket, asked with aiohttp: the disk's description, a resize (grow, an
explicit shrink) and every refusal as JSON ``{"error", "message"}`` (a size that is no whole
number of blocks, a shrink not asked for, another op, bad JSON, an unknown disk); bearer tokens
as in ``vblk serve``; and one ``control_call`` log line per resize, naming who asked. The resize
reaching a front end is tested in tests/e2e (vblk's own driver, and a Linux guest under QEMU).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from structlog.testing import capture_logs

from device.blk import BlkConfig
from device.block.memory import MemoryNode
from device.vhost_user import VhostUserBlk
from service.model import DiskSpec
from service.vhost_user_control import ControlListener
from tests.service.test_startup import busy_port, one_error_line, one_usage_line, vblk

MiB = 1 << 20
RW_TOKEN = "rw-token-0123456789abcdef"
RO_TOKEN = "ro-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"


class Rig:
    def __init__(self, blk: VhostUserBlk, http: aiohttp.ClientSession) -> None:
        self.blk = blk
        self.http = http

    async def patch(self, body: Any, *, token: str | None = None, name: str = "disk0") -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.patch(f"http://vblk/v1/disks/{name}", json=body, headers=headers) as r:
            return r.status, await r.json()

    async def get(self, path: str, *, token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.get(f"http://vblk{path}", headers=headers) as r:
            return r.status, await r.json()


async def make_rig(*, tokens: bool = False, read_only: bool = False) -> AsyncIterator[Rig]:
    directory = Path(tempfile.mkdtemp(prefix="vblk-ctl-"))  # short: unix socket paths are limited
    tokens_file = None
    if tokens:
        tokens_file = directory / "tokens"
        tokens_file.write_text(f"rw {RW_TOKEN}\nro {RO_TOKEN}\nadmin {ADMIN_TOKEN}\n")
    node = MemoryNode(4 * MiB, read_only=read_only)
    blk = VhostUserBlk(node, BlkConfig(queue_size=128, serial="vblk-ctl", blk_size=4096))
    listener = ControlListener(
        f"unix:{directory}/http.sock",
        name="disk0",
        spec=DiskSpec(name="disk0", backend="memory"),
        blk=blk,
        socket=directory / "vu.sock",
        tokens_file=tokens_file,
    )
    await listener.start()
    try:
        assert listener.addresses == [f"unix:{directory}/http.sock"]
        connector = aiohttp.UnixConnector(path=str(directory / "http.sock"))
        async with aiohttp.ClientSession(connector=connector) as http:
            yield Rig(blk, http)
    finally:
        await listener.close()
        blk.close()
        node.close()
        assert not (directory / "http.sock").exists()  # removed at close
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async for made in make_rig():
        yield made


async def test_the_disk_is_described_as_vblk_serve_describes_one(rig: Rig) -> None:
    status, disks = await rig.get("/v1/disks")
    assert status == 200 and [d["name"] for d in disks] == ["disk0"]
    status, info = await rig.get("/v1/disks/disk0/info")
    assert status == 200 and info == disks[0]
    assert (await rig.get("/v1/disks/disk0"))[1] == info  # the data is the guest's: the description
    assert info["size"] == 4 * MiB and info["block_size"] == 4096 and info["sector_size"] == 512
    assert info["serial"] == "vblk-ctl" and info["backend"] == "memory" and info["read_only"] is False
    assert info["stack"][-1]["node"] == "memory"
    assert info["vhost_user"]["connected"] is False and info["vhost_user"]["backend_channel"] is False
    assert info["ring"] == "split" and info["vhost_user"]["inflight_region"] is False
    assert info["vhost_user"]["resubmitted"] == 0
    status, error = await rig.get("/v1/disks/disk1")
    assert status == 404 and error["error"] == "no_such_disk"
    status, error = await rig.get("/v1/disks?verbose=1")
    assert status == 400 and error["error"] == "bad_parameter"


async def test_a_resize_grows_and_an_explicit_shrink_shrinks(rig: Rig) -> None:
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        status, answer = await rig.patch({"op": "resize", "size": "8M"})
        assert status == 200, answer
        assert answer["name"] == "disk0" and answer["size"] == 8 * MiB and rig.blk.node.size == 8 * MiB
        assert answer["resize"]["old_size"] == 4 * MiB and answer["resize"]["notice"] == "no_front_end"
        status, answer = await rig.patch({"op": "resize", "size": 6 * MiB, "shrink": True})
        assert status == 200 and answer["size"] == 6 * MiB, answer
        status, answer = await rig.patch({"op": "resize", "size": 6 * MiB})
        assert status == 200 and answer["resize"]["notice"] == "unchanged"
    [grow, shrink, _same] = [e for e in logs if e["event"] == "control_call"]
    assert (grow["op"], grow["disk"], grow["old_size"], grow["size"]) == ("resize", "disk0", 4 * MiB, 8 * MiB)
    assert shrink["shrink"] is True and shrink["size"] == 6 * MiB
    # Who asked: on a unix socket, the peer's process and user.
    assert grow["token"] == "none" and grow["pid"] == os.getpid() and grow["uid"] == os.getuid()
    assert grow["peer"].startswith("unix")


@pytest.mark.parametrize(
    ("body", "status", "code", "says"),
    [
        (
            {"op": "resize", "size": 4 * MiB + 512},
            400,
            "bad_field",
            "multiple of the disk's block size (4096",
        ),
        ({"op": "resize", "size": "4097K"}, 400, "bad_field", "multiple"),
        ({"op": "resize", "size": 0}, 400, "bad_field", "size must be"),
        ({"op": "resize", "size": "-1M"}, 400, "bad_field", "64M"),
        ({"op": "resize", "size": "\u0663M"}, 400, "bad_field", "64M"),  # Arabic-Indic three
        ({"op": "resize", "size": 1 << 70}, 400, "bad_field", "size must be"),
        ({"op": "resize", "size": 8.0}, 400, "bad_field", "integer"),
        ({"op": "resize"}, 400, "bad_field", "size is required"),
        ({"op": "resize", "size": 2 * MiB}, 409, "resize_refused", '"shrink": true'),
        (
            {"op": "resize", "size": 2 * MiB, "shrink": "yes"},
            400,
            "bad_field",
            "shrink must be true or false",
        ),
        ({"op": "resize", "size": 8 * MiB, "force": True}, 400, "bad_field", 'unknown field "force"'),
        ({"op": "zero", "offset": 0, "size": 4096}, 400, "bad_op", "op must be resize"),
        ({"size": 8 * MiB}, 400, "bad_op", "op must be resize"),
        ([1, 2], 400, "bad_json", "object"),
    ],
)
async def test_refusals_are_json_and_change_nothing(
    rig: Rig, body: Any, status: int, code: str, says: str
) -> None:
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        got, error = await rig.patch(body)
    assert (got, error["error"]) == (status, code), error
    assert says in error["message"], error
    assert rig.blk.node.size == 4 * MiB and rig.blk.resizes == []
    [refused] = [e for e in logs if e["event"] == "control_call_refused"]
    assert refused["error"] == code and refused["pid"] == os.getpid()


async def test_tokens_guard_the_control_surface() -> None:
    async for rig in make_rig(tokens=True):
        status, error = await rig.patch({"op": "resize", "size": "8M"})
        assert status == 401 and error["error"] == "unauthorized"
        status, error = await rig.patch({"op": "resize", "size": "8M"}, token=RO_TOKEN)
        assert status == 403 and error["error"] == "read_only_token"
        assert (await rig.get("/v1/disks", token=RO_TOKEN))[0] == 200
        assert (await rig.get("/healthz"))[0] == 200  # a public path
        status, error = await rig.patch({"op": "resize", "size": "8M"}, token=RW_TOKEN)
        assert status == 403 and error["error"] == "admin_required"  # data access is not control
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            status, answer = await rig.patch({"op": "resize", "size": "8M"}, token=ADMIN_TOKEN)
        assert status == 200 and answer["size"] == 8 * MiB
        [call] = [e for e in logs if e["event"] == "control_call"]
        assert call["token"] == "admin" and ADMIN_TOKEN not in str(call)


async def test_a_read_only_disk_is_not_resized() -> None:
    async for rig in make_rig(read_only=True):
        status, error = await rig.patch({"op": "resize", "size": "8M"})
        assert status == 403 and error["error"] == "read_only"
        assert rig.blk.node.size == 4 * MiB


@pytest.mark.expect_errors("listen_failed")
async def test_the_command_line_refuses_a_bad_control_surface_in_one_line(tmp_path: Path) -> None:
    base = ["vhost-user", "--socket", str(tmp_path / "vu.sock"), "--backend", "memory", "--size", "1M"]
    line = one_usage_line(await vblk(*base, "--http", "localhost"))
    assert "--http 'localhost': want unix:PATH or HOST:PORT" in line, line
    line = one_usage_line(await vblk(*base, "--tokens-file", str(tmp_path / "tokens")))
    assert "give --http too" in line, line
    line = one_usage_line(await vblk(*base, "--http", "127.0.0.1:0", "--tokens-file", str(tmp_path / "none")))
    assert "cannot read tokens file" in line, line
    line = one_usage_line(await vblk(*base, "--name=a/b"))
    assert "disk name 'a/b'" in line, line
    with busy_port() as port:
        error = one_error_line(await vblk(*base, "--http", f"127.0.0.1:{port}", "--log-format", "json"))
    assert error["event"] == "listen_failed" and f"HTTP cannot listen on 127.0.0.1:{port}" in str(
        error["error"]
    )
