"""``vblk serve`` as a real process: several disks, NBD listeners, clean stop on SIGTERM, and the
image locks it shares with QEMU's tools: a locked image is one line and exit status 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import pytest

from service.cli import main
from service.config import parse_disk
from service.values import parse_size
from tests.qemu import qemu_nbd, qemu_nbd_refusal
from tests.service.conftest import MiB, run


def test_parse_size_and_disk_spec() -> None:
    assert parse_size("512") == 512
    assert parse_size("64M") == 64 * MiB
    assert parse_size("1GiB") == 1 << 30
    assert parse_disk("name=a,size=1G,read-only") == {"name": "a", "size": "1G", "read-only": "true"}
    with pytest.raises(Exception, match="unknown disk option"):
        parse_disk("name=a,colour=blue")
    with pytest.raises(Exception, match="needs name"):
        parse_disk("size=1G")


def test_bad_size_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--backend", "memory", "--size", "1000"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("vblk serve: error: ") and "multiple of 512" in line


async def test_serve_two_disks_then_sigterm_flushes_and_exits_zero() -> None:
    with tempfile.TemporaryDirectory(prefix="vblk-") as tmp:
        sock = f"{tmp}/nbd.sock"
        image = f"{tmp}/a.img"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--disk",
            f"name=a,image={image},size=8M",
            "--disk",
            "name=b,backend=memory,size=4M,read-only",
            "--nbd-listen",
            "127.0.0.1:0",
            "--nbd-socket",
            sock,
            "--http-listen",
            "127.0.0.1:0",
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            for _ in range(200):
                if os.path.exists(sock):
                    break
                await asyncio.sleep(0.05)
            listing = json.loads(
                (await run("nbdinfo", "--json", "--list", f"nbd+unix:///?socket={sock}")).stdout
            )
            sizes = {e["export-name"]: (e["export-size"], e["is_read_only"]) for e in listing["exports"]}
            assert sizes == {"a": (8 * MiB, False), "b": (4 * MiB, True)}
            await run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", f"nbd+unix:///a?socket={sock}")
            assert os.path.getsize(image) == 8 * MiB
        finally:
            proc.send_signal(signal.SIGTERM)
            err, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        events = [json.loads(line)["event"] for line in err.decode().splitlines() if line.startswith("{")]
        assert "nbd_listening" in events and events[-1] == "stopped"
        with open(image, "rb") as f:
            assert f.read(65536) == b"\x5a" * 65536


@pytest.mark.expect_errors("disk_open_failed")
async def test_serve_refuses_an_image_qemu_nbd_writes_in_one_line(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(bytes(MiB))
    async with qemu_nbd(image):
        serve = await run(
            sys.executable, "-m", "service.cli", "serve", "--disk", f"name=a,image={image}",
            "--nbd-listen", "none", "--http-listen", "none", "--log-format", "json", check=False,
        )  # fmt: skip
        vhost_user = await run(
            sys.executable, "-m", "service.cli", "vhost-user", "--socket", str(tmp_path / "vu.sock"),
            "--image", str(image), "--log-format", "json", check=False,
        )  # fmt: skip
    assert serve.returncode == 1 and serve.stderr == "", serve.stderr
    records = [json.loads(line) for line in serve.stdout.splitlines()]  # JSON lines, no traceback
    [error] = [r for r in records if r["level"] == "error"]
    assert error["event"] == "disk_open_failed" and error["errno"] == 16, error
    assert error["error"].startswith(f"disk a: {image} is in use by another process (open for writing"), error
    assert vhost_user.returncode == 1 and vhost_user.stderr == "", vhost_user.stderr
    [error] = [r for r in map(json.loads, vhost_user.stdout.splitlines()) if r["level"] == "error"]
    assert error["event"] == "disk_open_failed" and error["errno"] == 16, error
    assert error["error"].startswith(f"{image} is in use by another process"), error
    # force-share: only read-only, as in QEMU.
    refused = await run(
        sys.executable, "-m", "service.cli", "vhost-user", "--socket", str(tmp_path / "vu.sock"),
        "--image", str(image), "--force-share", check=False,
    )  # fmt: skip
    assert refused.returncode == 2 and "force-share is for read-only disks" in refused.stderr


async def test_a_served_image_stays_locked_until_vblk_exits(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    sock = tmp_path / "nbd.sock"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "serve", "--disk", f"name=a,image={image},size=4M",
        "--nbd-listen", "none", "--nbd-socket", str(sock), "--http-listen", "none",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(200):
            if sock.exists() or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert sock.exists(), "vblk did not start serving"
        assert 'Failed to get "write" lock' in await qemu_nbd_refusal(image)
        convert = await run(
            "qemu-img", "convert", "-f", "raw", "-O", "raw", str(image), f"{image}.copy", check=False
        )
        assert convert.returncode != 0 and 'Failed to get shared "write" lock' in convert.stderr
        async with qemu_nbd(image, "-r"):  # a reader that shares writing (QEMU's -r) may look
            pass
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    await run("qemu-img", "convert", "-f", "raw", "-O", "raw", str(image), f"{image}.copy")
    async with qemu_nbd(image):
        pass


async def test_info_shares_the_image_like_qemu_img_info_u(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(bytes(MiB))
    async with qemu_nbd(image):  # a writer: info reads beside it, as force-share does
        assert main(["info", str(image)]) == 0
        assert json.loads(capsys.readouterr().out)["size"] == MiB
