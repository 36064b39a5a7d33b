"""Crash consistency: SIGKILL ``vblk serve`` at random moments (some mid-FLUSH), restart it, and
find every write that was acknowledged before an acknowledged FLUSH, and every FUA write; on a
qcow2 image (its writes allocate clusters) ``qemu-img check`` also finds no corruption after
every kill (leaked clusters are allowed, as in QEMU)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from device.block.qcow2 import Qcow2Node
from tests.service.conftest import SYSTEM_PYTHON

BLOCK = 4096
BLOCKS_PER_ROUND = 1024
ROUNDS = 20
IMAGE_SIZE = (ROUNDS + 1) * BLOCKS_PER_ROUND * BLOCK

# Runs in Debian's Python (libnbd). Verifies the blocks it is given, then writes fresh blocks in
# batches with some FUA writes, flushing after each batch, and reports what became durable:
# "D <block>..." lines, printed only once the FLUSH (or the FUA write) is acknowledged.
WRITER = r"""
import hashlib, json, sys, nbd
uri, verify_path = sys.argv[1], sys.argv[5]
round_no, base, count = (int(a) for a in sys.argv[2:5])
def content(r, b):
    return hashlib.sha256(f"{r}:{b}".encode()).digest() * 128
h = nbd.NBD()
h.connect_uri(uri)
with open(verify_path) as f:
    for b, r in json.load(f):
        if h.pread(4096, b * 4096) != content(r, b):
            print("LOST", b, r, flush=True)
            sys.exit(3)
print("READY", flush=True)
try:
    block = base
    while block < base + count:
        cookies = {}
        for i in range(16):
            if block >= base + count:
                break
            flags = nbd.CMD_FLAG_FUA if i % 5 == 0 else 0
            cookies[h.aio_pwrite(content(round_no, block), block * 4096, flags=flags)] = (block, flags)
            block += 1
        acked = []
        while cookies:
            h.poll(1000)
            for cookie in list(cookies):
                if h.aio_command_completed(cookie):
                    b, flags = cookies.pop(cookie)
                    if flags:
                        print("D", b, flush=True)
                    else:
                        acked.append(b)
        print("F", flush=True)
        h.flush()
        print("D", *acked, flush=True)
    print("DONE", flush=True)
except nbd.Error as e:
    print("GONE", e.errno, flush=True)
"""


def content(round_no: int, block: int) -> bytes:
    return hashlib.sha256(f"{round_no}:{block}".encode()).digest() * 128


async def start_server(image: Path, sock: str, fmt: str = "raw") -> asyncio.subprocess.Process:
    if os.path.exists(sock):
        os.unlink(sock)
    disk = f"name=a,image={image},size={IMAGE_SIZE},format={fmt}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "serve", "--disk", disk,
        "--nbd-listen", "none", "--nbd-socket", sock, "--http-listen", "none", "--log-level", "warning",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    for _ in range(400):
        if os.path.exists(sock):
            return proc
        await asyncio.sleep(0.02)
    proc.kill()
    _, err = await proc.communicate()
    raise AssertionError(f"vblk did not start: {err.decode()}")


async def writer(
    sock: str, round_no: int, verify: list[tuple[int, int]], tmp: str, base: int, count: int
) -> asyncio.subprocess.Process:
    verify_path = f"{tmp}/verify-{round_no}.json"
    Path(verify_path).write_text(json.dumps(verify))
    return await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON, "-c", WRITER, f"nbd+unix:///a?socket={sock}", str(round_no), str(base), str(count),
        verify_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


def qcow2_blocks(image: Path, blocks: list[tuple[int, int]]) -> dict[int, bytes]:
    """The blocks as the image's guest sees them, after ``qemu-img check`` finds no corruption."""
    done = subprocess.run(
        ["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True, check=False
    )
    assert done.returncode in (0, 3), f"qemu-img check: rc {done.returncode}: {done.stdout}{done.stderr}"
    report = json.loads(done.stdout)
    assert report["check-errors"] == 0 and report.get("corruptions", 0) == 0, report
    node = Qcow2Node.open(image)
    try:
        out = {}
        for block, _ in blocks:
            data = bytearray(BLOCK)
            node.read_now(block * BLOCK, [memoryview(data)])
            out[block] = bytes(data)
        return out
    finally:
        node.close()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_sigkill_never_loses_a_flushed_or_fua_write(fmt: str) -> None:
    rng = random.Random(os.environ.get("VBLK_CRASH_SEED", os.urandom(4).hex()))
    with tempfile.TemporaryDirectory(prefix="vblk-") as tmp:
        image, sock = Path(tmp) / f"crash.{fmt}", f"{tmp}/nbd.sock"
        durable_all: list[tuple[int, int]] = []
        previous: list[tuple[int, int]] = []
        mid_flush_kills = 0
        for round_no in range(ROUNDS + 1):
            server = await start_server(image, sock, fmt)
            final = round_no == ROUNDS
            # The last round only verifies every round's durable writes after the last restart.
            check = durable_all if final else previous
            proc = await writer(
                sock, round_no, check, tmp, round_no * BLOCKS_PER_ROUND, 0 if final else BLOCKS_PER_ROUND
            )
            assert proc.stdout is not None
            first = await asyncio.wait_for(proc.stdout.readline(), 60)
            if first.strip() != b"READY":
                rest = await proc.communicate()
                raise AssertionError(
                    f"round {round_no}: {first.decode()} {rest[0].decode()} {rest[1].decode()}"
                )
            if final:
                await proc.wait()
                server.send_signal(signal.SIGTERM)
                await server.wait()
                break
            lines: list[bytes] = []
            if round_no % 4 == 3:  # kill right after a FLUSH went out: mid-FLUSH
                flushes = rng.randint(1, 20)
                while flushes:
                    line = await asyncio.wait_for(proc.stdout.readline(), 30)
                    assert line, "writer ended early"
                    lines.append(line)
                    flushes -= line.startswith(b"F")
                mid_flush_kills += 1
            else:
                await asyncio.sleep(rng.uniform(0.0, 0.25))
            server.send_signal(signal.SIGKILL)
            await server.wait()
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            lines += out.splitlines()
            previous = []
            for line in lines:
                if line.startswith(b"D"):
                    previous += [(int(b), round_no) for b in line.split()[1:]]
            durable_all += previous
            # The file itself holds them too, before any restart.
            if fmt == "qcow2":
                seen = qcow2_blocks(image, previous)
                for block, r in previous:
                    assert seen[block] == content(r, block), f"round {round_no}: block {block} lost"
                continue
            with image.open("rb") as f:
                for block, r in previous:
                    f.seek(block * BLOCK)
                    assert f.read(BLOCK) == content(r, block), f"round {round_no}: block {block} lost"
        assert mid_flush_kills >= 4
        assert len(durable_all) > ROUNDS * 10, "too few durable writes: the kills came too early"
