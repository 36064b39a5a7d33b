"""Fixtures for front-end tests: an in-process vblk service and real client processes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.app import Service
from service.model import DiskSpec, SecurityConfig, ServiceConfig
from service.nbd.settings import NbdLimits

MiB = 1 << 20
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, where `import nbd` (python3-libnbd) lives


@dataclasses.dataclass
class Proc:
    returncode: int
    stdout: str
    stderr: str


async def run(*argv: str, stdin: bytes | None = None, check: bool = True, timeout: float = 60) -> Proc:
    """Run a real client; a missing binary fails the test (never a silent skip)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    result = Proc(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
    if check and result.returncode != 0:
        raise AssertionError(f"{argv[0]} exited {result.returncode}: {result.stderr}{result.stdout}")
    return result


async def nbdsh(uri: str, script: str, *, check: bool = True) -> Proc:
    """Run a libnbd Python script with ``h`` connected... or not: the script gets ``uri``."""
    prelude = "import nbd, sys, errno\nuri = sys.argv[1]\n"
    return await run(SYSTEM_PYTHON, "-c", prelude + script, uri, check=check)


@dataclasses.dataclass
class NbdRig:
    service: Service
    socket: str
    tcp_port: int
    http: str = ""  # host:port of the HTTP listener

    @property
    def base_url(self) -> str:
        return f"http://{self.http}"

    def uri(self, export: str = "disk0") -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"

    def tcp_uri(self, export: str = "disk0") -> str:
        return f"nbd://127.0.0.1:{self.tcp_port}/{export}"


@contextlib.asynccontextmanager
async def serving(
    *disks: DiskSpec,
    nbd_limits: NbdLimits | None = None,
    http_unix: bool = False,
    security: SecurityConfig | None = None,
    state_dir: Path | None = None,
    disk_template: DiskSpec | None = None,
    ring: str = "split",
) -> AsyncIterator[NbdRig]:
    """A started service with ``disks``: NBD on a unix socket and a free TCP port, HTTP too
    (on a free TCP port, and with ``http_unix`` on ``http.sock`` beside ``nbd.sock``)."""
    directory = tempfile.mkdtemp(prefix="vblk-")  # short: unix socket paths max out at 108
    socket_path = f"{directory}/nbd.sock"
    config = ServiceConfig(
        disks=disks,
        guest_memory=128 * MiB,
        nbd_listen=(f"unix:{socket_path}", "127.0.0.1:0"),
        http_listen=("127.0.0.1:0", f"unix:{directory}/http.sock") if http_unix else ("127.0.0.1:0",),
        nbd_limits=nbd_limits or NbdLimits(),
        security=security or SecurityConfig(),
        state_dir=state_dir,
        disk_template=disk_template or DiskSpec(),
        ring=ring,
    )
    service = Service(config)
    try:
        await service.start()
        await service.start_front_ends()
        port = int(service.nbd_addresses[1].rsplit(":", 1)[1])
        http = next(a for a in service.http_addresses if not a.startswith("unix:"))
        yield NbdRig(service, socket_path, port, http)
    finally:
        await service.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def nbd_rig() -> AsyncIterator[NbdRig]:
    async with serving(
        DiskSpec(name="disk0", backend="memory", size=64 * MiB),
        DiskSpec(name="ro", backend="memory", size=1 * MiB, read_only=True),
    ) as rig:
        yield rig
