"""``vblk serve`` as a real process: several disks, NBD listeners, clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile

import pytest

from service.cli import main
from service.config import parse_disk, parse_size
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
    with pytest.raises(SystemExit) as info:
        main(["serve", "--backend", "memory", "--size", "1000"])
    assert info.value.code == 2
    assert "multiple of 512" in capsys.readouterr().err


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
