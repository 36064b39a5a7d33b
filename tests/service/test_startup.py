"""Starting up: every configuration and start-up error is one clear line and a non-zero exit status.

Each kind of mistake a user makes runs ``vblk`` as a process, as a user would. Configuration
errors (caught before anything starts) are one line on stderr and exit status 2; start-up
errors (a disk that cannot be opened, a listener that cannot be bound) are one error-level log
line and exit status 1. Neither ever prints a traceback. An explicit ``--size`` is never ignored:
an existing image of another size is refused, or grown when asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.conftest import Proc, run

MiB = 1 << 20
QUIET = ["--log-format", "json", "--guest-memory", "32M"]


def free_port() -> tuple[socket.socket, int]:
    """A bound, listening socket on loopback (the port is busy while it lives)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


async def vblk(*args: str, env: dict[str, str] | None = None) -> Proc:
    """``vblk ARGS`` as a process; ``env`` adds to the environment."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", *args,
        env={**os.environ, **(env or {})}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return Proc(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))


def one_error_line(proc: Proc) -> dict[str, object]:
    """The run failed with exactly one error line, JSON, and nothing else anywhere."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr == "", proc.stderr
    assert "Traceback" not in proc.stdout
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    errors = [r for r in records if r["level"] in ("error", "critical")]
    assert len(errors) == 1, errors
    error: dict[str, object] = errors[0]
    return error


def one_usage_line(proc: Proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("vblk")
    return line


@contextlib.contextmanager
def busy_port() -> Iterator[int]:
    sock, port = free_port()
    try:
        yield port
    finally:
        sock.close()


pytestmark = pytest.mark.expect_errors("disk_open_failed", "listen_failed", "startup_failed")


async def test_a_busy_nbd_port_is_one_line(tmp_path: Path) -> None:
    with busy_port() as port:
        proc = await vblk("serve", "--backend", "memory", "--nbd-listen", f"127.0.0.1:{port}",
                          "--http-listen", "none", *QUIET)  # fmt: skip
    error = one_error_line(proc)
    assert error["event"] == "listen_failed"
    assert (
        error["error"] == f"NBD cannot listen on 127.0.0.1:{port}: Address already in use (another server?)"
    )


async def test_a_busy_http_port_is_one_line(tmp_path: Path) -> None:
    with busy_port() as port:
        proc = await vblk("serve", "--backend", "memory", "--nbd-listen", f"unix:{tmp_path}/nbd.sock",
                          "--http-listen", f"127.0.0.1:{port}", *QUIET)  # fmt: skip
    error = one_error_line(proc)
    assert error["event"] == "listen_failed"
    assert str(error["error"]).startswith(f"HTTP cannot listen on 127.0.0.1:{port}: Address already in use")


async def test_a_unix_socket_path_in_use_and_a_host_that_does_not_resolve(tmp_path: Path) -> None:
    stale = tmp_path / "nbd.sock"
    stale.write_text("not a socket")
    proc = await vblk("serve", "--backend", "memory", "--nbd-listen", "none", "--nbd-socket", str(stale),
                      "--http-listen", "none", *QUIET)  # fmt: skip
    error = one_error_line(proc)
    assert error["event"] == "listen_failed" and f"unix:{stale}" in str(error["error"])
    proc = await vblk("serve", "--backend", "memory", "--nbd-listen", "no-such-host.invalid:10809",
                      "--http-listen", "none", *QUIET)  # fmt: skip
    error = one_error_line(proc)
    assert str(error["error"]).startswith("NBD cannot listen on no-such-host.invalid:10809: ")
    assert "Unknown error" not in str(error["error"])


@pytest.mark.parametrize(
    ("case", "disk", "message"),
    [
        ("read-only and missing", "image={tmp}/missing.img,read-only", "{tmp}/missing.img does not exist"),
        ("directory missing", "image=/proc/no-such-dir/x.img", "/proc/no-such-dir"),
        ("a directory", "image={tmp}", "{tmp}: Is a directory"),
        ("not sector sized", "image={tmp}/odd.img", "is 1000 bytes, not a positive multiple of 512"),
        ("vhost-user back end gone", "backend=vhost-user:{tmp}/gone.sock", "vhost-user back end at"),
    ],
)
async def test_a_disk_that_cannot_be_opened_is_one_line(
    tmp_path: Path, case: str, disk: str, message: str
) -> None:
    (tmp_path / "odd.img").write_bytes(bytes(1000))
    spec = "name=d0," + disk.format(tmp=tmp_path)
    proc = await vblk("serve", "--disk", spec, "--nbd-listen", "none", "--http-listen", "none", *QUIET)
    error = one_error_line(proc)
    assert error["event"] == "disk_open_failed", case
    assert str(error["error"]).startswith("disk d0: "), error
    assert message.format(tmp=tmp_path) in str(error["error"]), (case, error)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "lots"], "--size: not a size: 'lots'"),
        (["--queue-size", "9"], "queue-size must be a power of two"),
        (["--queues", "0"], "queues must be 1..64"),
        (["--disk", "name=a,colour=red"], "unknown disk option 'colour'"),
        (["--nbd-listen", "localhost"], "listen address 'localhost': want HOST:PORT"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--config", "/nonexistent/vblk.toml"], "cannot read config file /nonexistent/vblk.toml"),
    ],
)
async def test_a_configuration_error_is_one_line(args: list[str], message: str) -> None:
    line = one_usage_line(await vblk("serve", "--backend", "memory", *args))
    assert message in line, line


async def test_vhost_user_start_up_errors_are_one_line(tmp_path: Path) -> None:
    proc = await vblk("vhost-user", "--socket", str(tmp_path / "vu.sock"), "--image",
                      str(tmp_path / "missing.img"), "--read-only", "--log-format", "json")  # fmt: skip
    error = one_error_line(proc)
    assert error["event"] == "disk_open_failed" and "missing.img does not exist" in str(error["error"])
    proc = await vblk("vhost-user", "--socket", str(tmp_path / "no-dir" / "vu.sock"), "--backend", "memory",
                      "--size", "1M", "--log-format", "json")  # fmt: skip
    error = one_error_line(proc)
    assert error["event"] == "listen_failed" and "no-dir/vu.sock" in str(error["error"])
    line = one_usage_line(await vblk("vhost-user", "--socket", "x", "--size", "100"))
    assert "size must be a positive multiple of 512" in line


# -- --size is never ignored ---------------------------------------------------------------------


async def serve_and_read_size(image: Path, tmp: Path, *args: str) -> int:
    """Serve ``image``, read its size over NBD (nbdinfo), stop; the size served."""
    sock = tmp / f"nbd-{os.urandom(4).hex()}.sock"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "serve", "--image", str(image), "--nbd-listen", "none",
        "--nbd-socket", str(sock), "--http-listen", "none", *QUIET, *args,
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(500):
            if sock.exists():
                break
            assert proc.returncode is None
            await asyncio.sleep(0.02)
        info = json.loads((await run("nbdinfo", "--json", f"nbd+unix:///?socket={sock}")).stdout)
        return int(info["exports"][0]["export-size"])
    finally:
        proc.terminate()
        assert await proc.wait() == 0


async def test_an_existing_image_of_another_size_is_refused_unless_asked_to_grow(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(MiB)
        f.write(b"keep me")
    # Served as it is when no size is named, or the same size is.
    assert await serve_and_read_size(image, tmp_path) == MiB
    assert await serve_and_read_size(image, tmp_path, "--size", "1M") == MiB
    # Another size, named: refused, and the image is untouched.
    proc = await vblk("serve", "--image", str(image), "--size", "4M", "--nbd-listen", "none",
                      "--http-listen", "none", *QUIET)  # fmt: skip
    error = one_error_line(proc)
    assert error["event"] == "disk_open_failed"
    assert f"{image} is 1M (1048576 bytes), not the 4M asked for" in str(error["error"])
    assert "--grow" in str(error["error"]) and image.stat().st_size == MiB
    # The environment names a size just as a flag does.
    env_proc = await vblk("serve", "--image", str(image), "--nbd-listen", "none", "--http-listen", "none",
                          *QUIET, env={"VBLK_SIZE": "2M"})  # fmt: skip
    assert "not the 2M asked for" in str(one_error_line(env_proc)["error"])
    # Asked to grow: it grows, and keeps its data.
    assert await serve_and_read_size(image, tmp_path, "--size", "4M", "--grow") == 4 * MiB
    assert image.stat().st_size == 4 * MiB and image.read_bytes()[:7] == b"keep me"
    # Never shrunk, even with grow.
    proc = await vblk("serve", "--disk", f"name=d,image={image},size=2M,grow", "--nbd-listen", "none",
                      "--http-listen", "none", *QUIET)  # fmt: skip
    error = one_error_line(proc)
    assert "never shrinks" in str(error["error"]) and image.stat().st_size == 4 * MiB
    # A disk spec's own size and grow.
    spec = f"name=disk0,image={image},size=8M,grow"
    assert await serve_and_read_size(image, tmp_path, "--disk", spec) == 8 * MiB


async def test_a_new_image_gets_the_size_asked_for(tmp_path: Path) -> None:
    image = tmp_path / "new.img"
    assert await serve_and_read_size(image, tmp_path, "--size", "3M") == 3 * MiB
    assert image.stat().st_size == 3 * MiB and image.stat().st_blocks == 0  # sparse


# -- --help -------------------------------------------------------------------------------------


async def test_help_shows_defaults_as_a_user_writes_them() -> None:
    proc = await vblk("serve", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for shown in ("[1G]", "[127.0.0.1:10809]", "[127.0.0.1:8080]", "[256M]", "[10]", "[4096]", "[disk0]"):
        assert shown in text, shown
    assert "1073741824" not in text and "[['" not in text and "10.0]" not in text


async def test_unix_sockets_are_removed_at_exit_and_a_stale_one_is_replaced(tmp_path: Path) -> None:
    nbd, http = tmp_path / "nbd.sock", tmp_path / "http.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(nbd))  # left behind by a process that died: a socket nobody listens on
    stale.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "serve", "--backend", "memory", "--size", "1M",
        "--nbd-listen", "none", "--nbd-socket", str(nbd), "--http-listen", "none", "--http-socket",
        str(http), *QUIET, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(500):
            if http.exists():
                break
            await asyncio.sleep(0.02)
        await run("nbdinfo", f"nbd+unix:///?socket={nbd}")
    finally:
        proc.terminate()
        assert await proc.wait() == 0
    assert not nbd.exists() and not http.exists()
