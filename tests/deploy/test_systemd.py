"""systemd: the units pass ``systemd-analyze``, sd_notify and socket activation work for real.

Socket activation is exercised twice: in process (sockets handed to ``start_front_ends``) and
end to end with systemd's own ``systemd-socket-activate``, which binds the sockets, waits for
the first connection and execs ``vblk serve`` with ``LISTEN_FDS``/``LISTEN_FDNAMES`` set, as
systemd does for ``vblk-nbd.socket`` and ``vblk-http.socket``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from service import systemd
from service.app import Service
from service.config import from_sources
from service.model import DiskSpec, ServiceConfig
from tests.deploy.conftest import DEPLOY, tool, vblk_command
from tests.guard import LOG_FILE_ENV
from tests.service.conftest import MiB, run

UNITS = DEPLOY / "systemd"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: unix socket paths max out at 108 bytes."""
    directory = tempfile.mkdtemp(prefix="vblk-")
    try:
        yield Path(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (every section), values by key in order."""
    settings: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


# -- the unit files ------------------------------------------------------------------------------


def installed_copy(directory: Path) -> list[Path]:
    """The units as installed, ExecStart pointing at this environment's ``vblk``; a template as
    its instance ``disk0``."""
    units = []
    for source in sorted(UNITS.glob("vblk*.s*")):
        text = source.read_text().replace("/opt/vblk/bin/vblk", vblk_command())
        target = directory / source.name.replace("@.", "@disk0.")
        target.write_text(text)
        units.append(target)
    return units


async def test_units_pass_systemd_analyze_verify(short_tmp: Path) -> None:
    units = installed_copy(short_tmp)
    assert {u.name for u in units} == {
        "vblk.service",
        "vblk-nbd.socket",
        "vblk-http.socket",
        "vblk-vhost-user@disk0.service",
    }
    result = await run(tool("systemd-analyze"), "verify", "--man=no", *map(str, units), check=False)
    # Unknown keys and bad values are only warnings: any output at all is a failure.
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )


async def test_service_unit_is_notify_restartable_and_hardened(short_tmp: Path) -> None:
    settings = unit_settings(UNITS / "vblk.service")
    assert settings["Type"] == ["notify"]
    assert settings["ExecStart"] == ["/opt/vblk/bin/vblk serve --config /etc/vblk/vblk.toml"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["StateDirectory"] == ["vblk"]
    assert settings["WorkingDirectory"] == ["%S/vblk"]  # relative image paths land in the state dir
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectHome": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert settings[key] == [value], key
    # The drain (drain-timeout, default 10 s) plus a flush fits in the stop timeout.
    assert float(settings["TimeoutStopSec"][0].removesuffix("s")) > 10
    for socket_unit, name in (("vblk-nbd.socket", "nbd"), ("vblk-http.socket", "http")):
        socket_settings = unit_settings(UNITS / socket_unit)
        assert socket_settings["FileDescriptorName"] == [name]
        assert socket_settings["Service"] == ["vblk.service"]
        assert systemd.front_end_of(name) == name
    # systemd's own exposure score (0 safest .. 10): "OK" is below 4.5; vblk aims lower.
    [unit] = [u for u in installed_copy(short_tmp) if u.name == "vblk.service"]
    result = await run(tool("systemd-analyze"), "security", "--offline=yes", str(unit))
    match = re.search(r"Overall exposure level for vblk.service: ([\d.]+)", result.stdout)
    assert match is not None, result.stdout
    assert float(match.group(1)) <= 2.0, result.stdout


async def test_vhost_user_unit_restarts_its_back_end_under_running_guests(short_tmp: Path) -> None:
    """The back end comes straight back after a crash, on the same socket (its directory is kept
    across restarts): a guest with ``reconnect=1`` resumes on it."""
    settings = unit_settings(UNITS / "vblk-vhost-user@.service")
    assert settings["Restart"] == ["on-failure"]
    assert float(settings["RestartSec"][0].removesuffix("ms")) <= 1000  # QEMU retries every second
    assert settings["RuntimeDirectoryPreserve"] == ["yes"] and settings["RuntimeDirectory"] == [
        "vblk-vhost-user"
    ]
    [start] = settings["ExecStart"]
    argv = start.split()
    assert argv[:2] == ["/opt/vblk/bin/vblk", "vhost-user"]
    assert argv[argv.index("--socket") + 1] == "%t/vblk-vhost-user/%i.sock"
    # The command line runs: the back end listens on the socket, and SIGTERM stops it cleanly.
    runtime, state = short_tmp / "run", short_tmp / "state"
    (runtime / "vblk-vhost-user").mkdir(parents=True)
    (state / "vblk-vhost-user").mkdir(parents=True)
    expand = {"%t": str(runtime), "%S": str(state), "%i": "disk0"}
    command = [vblk_command()]
    for word in argv[1:-1]:  # the last one is $VBLK_VHOST_USER_OPTIONS
        arg = word
        for key, value in expand.items():
            arg = arg.replace(key, value)
        command.append(arg)
    proc = await asyncio.create_subprocess_exec(
        *command,
        "--size",
        "16M",
        "--throttle",
        "iops-total=100",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        sock = runtime / "vblk-vhost-user" / "disk0.sock"
        for _ in range(1000):
            if sock.is_socket() or proc.returncode is not None:
                break
            await asyncio.sleep(0.01)
        assert sock.is_socket()
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, out.decode()
        assert (state / "vblk-vhost-user" / "disk0.img").stat().st_size == 16 * MiB
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    [unit] = [u for u in installed_copy(short_tmp) if u.name == "vblk-vhost-user@disk0.service"]
    result = await run(tool("systemd-analyze"), "security", "--offline=yes", str(unit))
    match = re.search(r"Overall exposure level for vblk-vhost-user@disk0.service: ([\d.]+)", result.stdout)
    assert match is not None, result.stdout
    assert float(match.group(1)) <= 2.0, result.stdout


def test_example_config_is_valid() -> None:
    config, values = from_sources({}, environ={}, config_file=UNITS / "vblk.toml")
    assert config.nbd_listen == ("127.0.0.1:10809",) and config.http_listen == ("127.0.0.1:8080",)
    [disk] = config.disks
    assert disk.name == "disk0" and not disk.path.is_absolute()  # under StateDirectory
    assert values["log-level"] == "info"


# -- sd_notify and LISTEN_FDS parsing ------------------------------------------------------------


async def test_notify_sends_to_path_and_abstract_sockets(short_tmp: Path) -> None:
    loop = asyncio.get_running_loop()
    path = str(short_tmp / "notify")
    abstract = f"vblk-test-{os.getpid()}"
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as by_path,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as by_name,
    ):
        by_path.bind(path)
        by_name.bind("\0" + abstract)
        by_path.setblocking(False)
        by_name.setblocking(False)
        assert systemd.notify("READY=1\nSTATUS=ok", {"NOTIFY_SOCKET": path})
        assert await asyncio.wait_for(loop.sock_recv(by_path, 4096), 5) == b"READY=1\nSTATUS=ok"
        assert systemd.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + abstract})
        assert await asyncio.wait_for(loop.sock_recv(by_name, 4096), 5) == b"STOPPING=1"
    assert not systemd.notify("READY=1", {})  # not under systemd: nothing to do
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": path})  # gone: a warning, no exception


def test_listen_fds_follows_sd_listen_fds() -> None:
    other = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "nbd:http"}
    assert systemd.listen_fds(other) == []  # meant for another process
    assert other == {}  # and never passed on to children
    assert systemd.listen_fds({}) == []
    zero = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert systemd.listen_fds(zero) == [] and zero == {}
    with pytest.raises(systemd.SocketActivationError, match="not a number"):
        systemd.listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"})
    with pytest.raises(systemd.SocketActivationError, match="1 names for 2"):
        systemd.listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "nbd"})
    assert systemd.front_end_of("nbd") == "nbd"
    assert systemd.front_end_of("vblk-http.socket") == "http"
    assert systemd.front_end_of("unknown") is None
    assert systemd.front_end_of("nbd-over-http") is None  # ambiguous: refused, not guessed


# -- socket activation in process ----------------------------------------------------------------


def listening(family: int, address: str | tuple[str, int]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind(address)
    sock.listen()
    sock.setblocking(False)
    return sock


@pytest.fixture
async def activated(short_tmp: Path) -> AsyncIterator[tuple[Service, dict[str, list[socket.socket]]]]:
    inherited = {
        "nbd": [
            listening(socket.AF_INET, ("127.0.0.1", 0)),
            listening(socket.AF_UNIX, str(short_tmp / "nbd.sock")),
        ],
        "http": [listening(socket.AF_INET, ("127.0.0.1", 0))],
    }
    config = ServiceConfig(
        disks=(DiskSpec(name="disk0", backend="memory", size=8 * MiB),),
        guest_memory=32 * MiB,
        # Socket activation owns the addresses: these must not be opened.
        nbd_listen=(f"unix:{short_tmp}/configured-nbd.sock",),
        http_listen=(f"unix:{short_tmp}/configured-http.sock",),
    )
    service = Service(config)
    await service.start()
    try:
        await service.start_front_ends(inherited)
        yield service, inherited
    finally:
        await service.stop()


async def test_inherited_sockets_replace_configured_listeners(
    activated: tuple[Service, dict[str, list[socket.socket]]], short_tmp: Path
) -> None:
    service, inherited = activated
    nbd_tcp, _nbd_unix = inherited["nbd"]
    [http_tcp] = inherited["http"]
    tcp_port = nbd_tcp.getsockname()[1]
    assert service.nbd_addresses == [f"127.0.0.1:{tcp_port}", f"unix:{short_tmp}/nbd.sock"]
    assert service.http_addresses == [f"127.0.0.1:{http_tcp.getsockname()[1]}"]
    assert not (short_tmp / "configured-nbd.sock").exists()
    assert not (short_tmp / "configured-http.sock").exists()
    for uri in (f"nbd://127.0.0.1:{tcp_port}/disk0", f"nbd+unix:///disk0?socket={short_tmp}/nbd.sock"):
        info = json.loads((await run(tool("nbdinfo"), "--json", uri)).stdout)
        assert info["exports"][0]["export-size"] == 8 * MiB
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{service.http_addresses[0]}/readyz") as response,
    ):
        assert response.status == 200


# -- socket activation and sd_notify end to end --------------------------------------------------


async def recv_states(sock: socket.socket, want: str, timeout: float = 20) -> list[str]:
    """Notification messages until one containing ``want``."""
    loop = asyncio.get_running_loop()
    states: list[str] = []
    async with asyncio.timeout(timeout):
        while not any(want in s for s in states):
            states.append((await loop.sock_recv(sock, 4096)).decode())
    return states


async def test_socket_activated_vblk_notifies_ready_and_stopping(short_tmp: Path) -> None:
    nbd_sock, http_sock, notify_path = (str(short_tmp / n) for n in ("nbd.sock", "http.sock", "notify"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock:
        notify_sock.bind(notify_path)
        notify_sock.setblocking(False)
        proc = await asyncio.create_subprocess_exec(
            tool("systemd-socket-activate"),
            "--listen",
            nbd_sock,
            "--listen",
            http_sock,
            "--fdname=nbd:http",
            f"--setenv=NOTIFY_SOCKET={notify_path}",
            "--setenv=VBLK_LOG_FORMAT=json",
            *guard_env(),
            "--",
            vblk_command(),
            "serve",
            "--backend",
            "memory",
            "--size",
            "16M",
            "--guest-memory",
            "32M",
            "--nbd-listen",
            f"unix:{short_tmp}/configured.sock",
            "--http-listen",
            "127.0.0.1:0",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            for _ in range(400):  # the activator binds, then waits for the first connection
                if os.path.exists(http_sock):
                    break
                await asyncio.sleep(0.025)
            # This first request is what starts vblk; it waits in the backlog meanwhile.
            async with (
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=http_sock)) as http,
            ):
                async with http.get("http://vblk/healthz", timeout=aiohttp.ClientTimeout(total=30)) as r:
                    assert r.status == 200
                states = await recv_states(notify_sock, "READY=1")
                assert states[-1].startswith("READY=1\nSTATUS=serving 1 disk")
                async with http.get("http://vblk/readyz") as r:
                    assert r.status == 200
            info = json.loads(
                (await run(tool("nbdinfo"), "--json", f"nbd+unix:///disk0?socket={nbd_sock}")).stdout
            )
            assert info["exports"][0]["export-size"] == 16 * MiB
            assert not os.path.exists(f"{short_tmp}/configured.sock")
            proc.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in (await recv_states(notify_sock, "STOPPING=1"))[-1]
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, err.decode()
    events = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    activation = next(e for e in events if e["event"] == "socket_activation")
    assert activation["sockets"] == {"nbd": [f"unix:{nbd_sock}"], "http": [f"unix:{http_sock}"]}
    running = next(e for e in events if e["event"] == "running")
    assert running["nbd"] == [f"unix:{nbd_sock}"] and running["http"] == [f"unix:{http_sock}"]


def guard_env() -> list[str]:
    """systemd-socket-activate passes on only what it is told: the guard's log file too."""
    return [f"--setenv={LOG_FILE_ENV}={os.environ[LOG_FILE_ENV]}"]


@pytest.mark.expect_errors("socket_activation_failed")
async def test_socket_without_a_front_end_name_is_refused(short_tmp: Path) -> None:
    sock_path = str(short_tmp / "mystery.sock")
    proc = await asyncio.create_subprocess_exec(
        tool("systemd-socket-activate"),
        "--listen",
        sock_path,
        "--setenv=VBLK_LOG_FORMAT=json",
        *guard_env(),
        "--",
        vblk_command(),
        "serve",
        "--backend",
        "memory",
        "--size",
        "1M",
        "--nbd-listen",
        "none",
        "--http-listen",
        "none",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(400):
            if os.path.exists(sock_path):
                break
            await asyncio.sleep(0.025)
        _reader, writer = await asyncio.open_unix_connection(sock_path)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        writer.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2
    events = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    failure = next(e for e in events if e["event"] == "socket_activation_failed")
    assert "FileDescriptorName=nbd" in failure["error"]
