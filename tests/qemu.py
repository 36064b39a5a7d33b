"""QEMU's own tools beside vblk in tests: qemu-nbd serving a raw image, and the image locks in /proc/locks.

Test support, shared by tests/device (image locks) and tests/service (the CLI's refusal). qemu-nbd
runs as a child on a unix socket in a fresh directory; it is ready when its pid file appears,
which it writes only once the image is open and the socket listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

QEMU_TOOLS = ("qemu-nbd", "qemu-img", "qemu-io")


def require_qemu_tools() -> None:
    """Fail (never skip) when the QEMU tools are missing: scripts/install-tools.sh installs them."""
    missing = [tool for tool in QEMU_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: install qemu-utils (scripts/install-tools.sh)")


@dataclasses.dataclass
class QemuNbd:
    """A qemu-nbd that opened its image and serves it on ``socket``."""

    process: asyncio.subprocess.Process
    socket: Path

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"


@dataclasses.dataclass
class Started:
    """How a qemu-nbd start went: serving (``server``), or exited with ``returncode``, ``stderr``."""

    server: QemuNbd | None
    returncode: int | None
    stderr: str


@contextlib.asynccontextmanager
async def start_qemu_nbd(image: Path, *args: str, timeout: float = 20) -> AsyncIterator[Started]:
    """``qemu-nbd -t -f raw ARGS IMAGE``, once it serves or has exited; stopped on exit."""
    require_qemu_tools()
    directory = Path(tempfile.mkdtemp(prefix="vblk-qnbd-"))  # short: unix socket paths max out at 108
    sock = directory / "nbd.sock"
    pid_file = directory / "qemu-nbd.pid"
    stderr_path = directory / "stderr"
    with stderr_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            "qemu-nbd", "-t", "-f", "raw", "-k", str(sock), "--pid-file", str(pid_file), *args, str(image),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            if pid_file.exists() and pid_file.read_text().strip():
                started = Started(QemuNbd(process, sock), None, "")
                break
            with contextlib.suppress(TimeoutError):
                code = await asyncio.wait_for(process.wait(), 0.02)
                started = Started(None, code, stderr_path.read_text())
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"qemu-nbd neither served nor exited: {stderr_path.read_text()}")
        yield started
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def qemu_nbd(image: Path, *args: str) -> AsyncIterator[QemuNbd]:
    """qemu-nbd serving ``image``; the test fails if it refuses to."""
    async with start_qemu_nbd(image, *args) as started:
        if started.server is None:
            raise AssertionError(f"qemu-nbd {' '.join(args)} exited {started.returncode}: {started.stderr}")
        yield started.server


async def qemu_nbd_refusal(image: Path, *args: str) -> str:
    """Start qemu-nbd on ``image``, expecting it to refuse; its error message."""
    async with start_qemu_nbd(image, *args) as started:
        if started.server is not None:
            raise AssertionError(f"qemu-nbd {' '.join(args)} served {image}, expected a refusal")
        assert started.returncode != 0
        return started.stderr


def locked_bytes(image: Path) -> dict[int, str]:
    """Every byte of ``image`` under an OFD lock, and the lock's type (READ or WRITE): /proc/locks."""
    st = os.stat(image)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    held: dict[int, str] = {}
    for line in Path("/proc/locks").read_text().splitlines():
        # "12: OFDLCK ADVISORY  READ -1 fe:00:2164844 100 101" (a waiter's line has "->" in field 1)
        fields = line.split()
        if len(fields) < 8 or fields[1] != "OFDLCK" or fields[5] != key or not fields[7].isdigit():
            continue
        for byte in range(int(fields[6]), int(fields[7]) + 1):
            held[byte] = fields[3]
    return held
