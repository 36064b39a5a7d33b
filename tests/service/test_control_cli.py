"""``vblk disk`` and ``vblk bitmap``: the control plane's command-line client, run as a real process
against a running service, over TCP and over the unix socket, with and without tokens."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from service.model import DiskSpec, SecurityConfig
from tests.service.conftest import MiB, Proc, run, serving

VBLK = str(Path(sys.executable).parent / "vblk")  # the console script the package installs


async def vblk_disk(*argv: str, env: dict[str, str] | None = None, command: str = "disk") -> Proc:
    if env is None:
        return await run(VBLK, command, *argv, check=False)
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return await run(VBLK, command, *argv, check=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def one_error_line(proc: Proc, verb: str, code: str) -> str:
    assert proc.returncode == 1, proc
    [line] = proc.stderr.splitlines()
    assert line.startswith((f"vblk disk {verb}: error: ", f"vblk bitmap {verb}: error: ")) and line.endswith(
        f"({code})"
    ), line
    return line


async def test_list_add_resize_throttle_remove(tmp_path: Path) -> None:
    async with serving(DiskSpec(name="disk0", backend="memory", size=64 * MiB), http_unix=True) as rig:
        url = ["--url", rig.base_url]
        image = tmp_path / "db.img"
        added = await vblk_disk(*url, "add", f"name=db,image={image},size=8M,iops-total=500")
        assert (added.returncode, added.stdout.strip()) == (0, "added disk db: 8M, PCI 1:0.0"), added
        assert image.stat().st_size == 8 * MiB
        listed = await vblk_disk(*url, "list")
        lines = listed.stdout.splitlines()
        assert lines[0].split() == ["NAME", "SIZE", "BACKEND", "PCI", "STATE", "LIMITS"]
        assert lines[1].split()[:5] == ["disk0", "64M", "memory", "0:4.0", "ready"]
        assert lines[2].split() == ["db", "8M", "file", "1:0.0", "ready", "iops-total=500"]
        resized = await vblk_disk(*url, "resize", "db", "16M")
        assert resized.stdout.strip() == "resized disk db: 8M -> 16M", resized
        assert rig.service.disks["db"].driver.size == 16 * MiB
        throttled = await vblk_disk(*url, "throttle", "db", "iops-total=0,bps-total=10M")
        assert throttled.stdout.strip() == f"throttled disk db: group db, limits bps-total={10 * MiB}"
        # --json prints the API's answer; the unix socket and the environment work too.
        shown = await vblk_disk(
            "--json", "show", "db", env={"VBLK_SOCKET": str(Path(rig.socket).with_name("http.sock"))}
        )
        assert shown.returncode == 0 and json.loads(shown.stdout)["size"] == 16 * MiB
        removed = await vblk_disk(*url, "remove", "db")
        assert removed.stdout.strip() == "removed disk db: 0 NBD connections closed", removed
        assert sorted(rig.service.disks) == ["disk0"]


async def test_errors_are_one_line_and_exit_one(tmp_path: Path) -> None:
    async with serving(DiskSpec(name="disk0", backend="memory", size=4 * MiB)) as rig:
        url = ["--url", rig.base_url]
        one_error_line(await vblk_disk(*url, "add", "name=disk0,backend=memory"), "add", "disk_exists")
        one_error_line(await vblk_disk(*url, "remove", "disk0"), "remove", "disk_refused")
        one_error_line(await vblk_disk(*url, "remove", "nope"), "remove", "no_such_disk")
        one_error_line(await vblk_disk(*url, "resize", "disk0", "1M"), "resize", "resize_refused")
        one_error_line(await vblk_disk(*url, "throttle", "disk0", "iops-totl=5"), "throttle", "bad_field")
        bad = await vblk_disk(*url, "add", "name=x,colour=blue")
        assert bad.returncode == 1 and "unknown disk option 'colour'" in bad.stderr
        unreachable = await vblk_disk("--socket", str(tmp_path / "none.sock"), "list")
        assert unreachable.returncode == 1 and "cannot reach vblk at unix:" in unreachable.stderr
        usage = await vblk_disk(*url, "resize", "disk0")
        assert usage.returncode == 2
        assert sorted(rig.service.disks) == ["disk0"]


async def test_a_token_from_the_environment(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    admin, writer = "admin-0123456789abcdef", "rw-0123456789abcdef"
    tokens.write_text(f"admin {admin}\nrw {writer}\n")
    spec = DiskSpec(name="disk0", backend="memory", size=4 * MiB)
    async with serving(spec, security=SecurityConfig(tokens_file=tokens)) as rig:
        args = ("--url", rig.base_url, "add", "name=m,backend=memory,size=1M")
        one_error_line(await vblk_disk(*args), "add", "unauthorized")
        one_error_line(await vblk_disk(*args, env={"VBLK_TOKEN": writer}), "add", "admin_required")
        assert (await vblk_disk(*args, env={"VBLK_TOKEN": admin})).returncode == 0
        assert "m" in rig.service.disks


async def test_bitmaps_from_the_shell_follow_what_nbd_writes() -> None:
    async with serving(DiskSpec(name="disk0", backend="memory", size=16 * MiB)) as rig:
        url = ["--url", rig.base_url]

        async def bitmap(*argv: str) -> Proc:
            return await vblk_disk(*url, *argv, command="bitmap")

        added = await bitmap("add", "disk0", "b0", "--granularity", "64K", "--transient")
        assert added.stdout.strip() == "added bitmap b0 of disk disk0", added
        await run("qemu-io", "-f", "raw", "-c", "write -P 1 1M 64k", rig.uri())
        lines = (await bitmap("list", "disk0")).stdout.splitlines()
        assert lines[0].split() == ["NAME", "GRANULARITY", "STATE", "PERSISTENT", "DIRTY"]
        assert lines[1].split() == ["b0", "64K", "recording", "no", str(64 * 1024)]
        checkpoint = await bitmap("checkpoint", "disk0", "b1", "--transient")
        assert checkpoint.stdout.strip() == "checkpoint b1 of disk disk0: stopped recording: b0", checkpoint
        await run("qemu-io", "-f", "raw", "-c", "write -P 2 4M 64k", rig.uri())
        assert (await bitmap("merge", "disk0", "b1", "b0")).returncode == 0
        shown = json.loads((await bitmap("--json", "list", "disk0")).stdout)
        dirty = {b["name"]: b["dirty_bytes"] for b in shown["bitmaps"]}
        assert dirty == {"b0": 64 * 1024, "b1": 128 * 1024}
        for verb in ("disable", "enable", "clear"):
            assert (await bitmap(verb, "disk0", "b1")).returncode == 0
        one_error_line(await bitmap("add", "disk0", "b0"), "add", "bitmap_exists")
        one_error_line(await bitmap("remove", "disk0", "nope"), "remove", "no_such_bitmap")
        assert (await bitmap("remove", "disk0", "b0")).stdout.strip() == "removed bitmap b0 of disk disk0"
