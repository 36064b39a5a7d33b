"""``vblk`` as a real process: SIGTERM under load keeps every acknowledged write; helpers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import aiohttp

from tests.service.conftest import SYSTEM_PYTHON, MiB, run

BLOCK = 4096
IMAGE = 64 * MiB

# A libnbd writer that never stops on its own: 32 writes in flight, write number i going to
# block i % blocks with content derived from i; prints which were acknowledged once the server
# goes away.
WRITER = r"""
import hashlib, json, sys, time, nbd
uri, blocks = sys.argv[1], int(sys.argv[2])
def data(i):
    return hashlib.sha256(str(i).encode()).digest() * 128
h = nbd.NBD()
h.connect_uri(uri)
outstanding, acked, failed, i = {}, [], 0, 0
print("started", flush=True)
try:
    while True:
        while len(outstanding) < 32:
            outstanding[h.aio_pwrite(data(i), (i % blocks) * 4096)] = i
            i += 1
        h.poll(1000)
        for cookie in list(outstanding):
            try:
                if h.aio_command_completed(cookie):
                    acked.append(outstanding.pop(cookie))
            except nbd.Error:
                outstanding.pop(cookie)
                failed += 1
except nbd.Error:
    pass
print(json.dumps({"acked": acked, "failed": failed, "submitted": i}), flush=True)
"""


def block_data(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * 128


async def start_vblk(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


async def wait_for_path(path: str, proc: asyncio.subprocess.Process) -> None:
    for _ in range(400):
        if os.path.exists(path):
            return
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.025)
    _, err = await proc.communicate()
    raise AssertionError(f"vblk did not come up: {err.decode()}")


async def test_sigterm_under_load_keeps_every_acknowledged_write() -> None:
    with tempfile.TemporaryDirectory(prefix="vblk-") as tmp:
        sock, image = f"{tmp}/nbd.sock", f"{tmp}/a.img"
        proc = await start_vblk(
            "--disk", f"name=a,image={image},size=64M", "--nbd-listen", "none", "--nbd-socket", sock,
            "--http-listen", "none",
        )  # fmt: skip
        await wait_for_path(sock, proc)
        writer = await asyncio.create_subprocess_exec(
            SYSTEM_PYTHON, "-c", WRITER, f"nbd+unix:///a?socket={sock}", str(IMAGE // BLOCK),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert writer.stdout is not None
        assert (await asyncio.wait_for(writer.stdout.readline(), 30)).strip() == b"started"
        await asyncio.sleep(0.7)  # under load
        assert writer.returncode is None
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        written, werr = await asyncio.wait_for(writer.communicate(), 30)
        result = json.loads(written.decode().strip().splitlines()[-1])
        acked: list[int] = result["acked"]
        assert len(acked) > 100, (result["submitted"], werr.decode())
        # Each block holds its last acknowledged write, or a later one that was in flight.
        blocks, submitted = IMAGE // BLOCK, result["submitted"]
        last_acked: dict[int, int] = {}
        for i in acked:
            last_acked[i % blocks] = max(i, last_acked.get(i % blocks, -1))
        with open(image, "rb") as f:
            for block, i in last_acked.items():
                f.seek(block * BLOCK)
                on_disk = f.read(BLOCK)
                allowed = {block_data(j) for j in range(i, submitted, blocks)}
                assert on_disk in allowed, f"acknowledged write {i} to block {block} lost"
        events = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
        names = [e["event"] for e in events]
        assert "signal" in names and names[-1] == "stopped"
        stopped = next(e for e in events if e["event"] == "disk_stopped")  # nothing leaked at exit
        assert stopped["requests_inflight"] == 0 and stopped["free_descriptors"] == stopped["queue_sizes"]
        connection = next(e for e in events if e["event"] == "nbd_connection")
        assert connection["by_command"]["write"] >= len(acked)
        assert connection["export"] == "a" and connection["peer"]


async def test_config_file_env_and_http_default_disk(tmp_path: Path) -> None:
    sock = str(tmp_path / "h.sock")
    config = tmp_path / "vblk.toml"
    config.write_text(
        f'nbd-listen = "none"\nhttp-socket = "{sock}"\n[[disk]]\nname = "m"\nbackend = "memory"\n'
    )
    proc = await start_vblk(
        "--config",
        str(config),
        env={"VBLK_HTTP_LISTEN": "none", "VBLK_SIZE": "4M", "VBLK_LOG_LEVEL": "debug"},
    )
    try:
        await wait_for_path(sock, proc)
        connector = aiohttp.UnixConnector(path=sock)
        async with aiohttp.ClientSession(connector=connector) as http, http.get("http://vblk/v1/disks") as r:
            disks = await r.json()
        assert [(d["name"], d["size"]) for d in disks] == [("m", 4 * MiB)]
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    levels = {json.loads(line)["level"] for line in out.decode().splitlines() if line.startswith("{")}
    assert "debug" in levels


async def test_create_image_and_info(tmp_path: Path) -> None:
    image = tmp_path / "new.img"
    made = await run(sys.executable, "-m", "service.cli", "create-image", str(image), "--size", "16M")
    assert json.loads(made.stdout) == {"path": str(image), "format": "raw", "size": 16 * MiB}
    assert image.stat().st_size == 16 * MiB and image.stat().st_blocks * 512 < MiB  # sparse
    again = await run(
        sys.executable, "-m", "service.cli", "create-image", str(image), "--size", "16M", check=False
    )
    assert again.returncode == 1 and "exists" in again.stderr
    with image.open("r+b") as f:
        f.seek(MiB)
        f.write(b"x" * 65536)
    info = json.loads((await run(sys.executable, "-m", "service.cli", "info", str(image))).stdout)
    assert info["size"] == 16 * MiB and 65536 <= info["allocated"] < 16 * MiB
    missing = await run(sys.executable, "-m", "service.cli", "info", str(tmp_path / "nope"), check=False)
    assert missing.returncode == 1


async def test_create_image_makes_qcow2_images_and_refuses_what_it_cannot(tmp_path: Path) -> None:
    vblk = (sys.executable, "-m", "service.cli", "create-image")
    base = tmp_path / "base.raw"
    await run(*vblk, str(base), "--size", "1M")
    top = tmp_path / "top.qcow2"
    made = await run(*vblk, str(top), "--format", "qcow2", "--size", "64M", "--cluster-size", "4K",
                     "--backing", "base.raw", "--backing-format", "raw")  # fmt: skip
    assert json.loads(made.stdout) == {
        "path": str(top), "format": "qcow2", "size": 64 * MiB, "cluster_size": 4096,
        "backing": {"path": "base.raw", "format": "raw"},
    }  # fmt: skip
    info = json.loads((await run("qemu-img", "info", "--output=json", str(top))).stdout)
    assert (info["virtual-size"], info["cluster-size"], info["backing-filename"]) == (
        64 * MiB,
        4096,
        "base.raw",
    )
    await run("qemu-img", "check", str(top))
    shown = json.loads(
        (await run(sys.executable, "-m", "service.cli", "info", "--format", "qcow2", str(top))).stdout
    )
    assert (
        shown["backing"] == [{"path": str(base), "format": "raw", "size": MiB}]
        and shown["refcount_bits"] == 16
    )
    for argv, code, message in [
        ((str(tmp_path / "a.qcow2"), "--format", "qcow2", "--size", "1M", "--backing", "base.raw"), 2,
         "needs --backing-format"),
        ((str(tmp_path / "a.qcow2"), "--format", "qcow2", "--size", "1M", "--cluster-size", "3K"), 2,
         "power of two"),
        ((str(tmp_path / "a.img"), "--size", "1M", "--cluster-size", "4K"), 2, "for --format qcow2"),
        ((str(tmp_path / "a.qcow2"), "--format", "qcow2", "--size", "1M", "--backing", "gone.raw",
          "--backing-format", "raw"), 1, "does not exist"),
        ((str(top), "--format", "qcow2", "--size", "1M"), 1, "exists"),
    ]:  # fmt: skip
        refused = await run(*vblk, *argv, check=False)
        assert refused.returncode == code and message in refused.stderr, refused.stderr
        assert not (tmp_path / "a.qcow2").exists()
