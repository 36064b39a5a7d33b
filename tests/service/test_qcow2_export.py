"""A qcow2 disk end to end: ``format=qcow2`` serves an image QEMU made, read-only, and NBD clients
read the bytes ``qemu-img convert -O raw`` reads; REST shows its stack; the configuration refuses,
in one line, what this version does not do (writing, sizes).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import pytest

from service.cli import main
from service.config import from_sources
from service.model import DiskSpec
from tests.service.conftest import MiB, run, serving
from tests.service.test_startup import QUIET, one_error_line, one_usage_line, vblk


def chain(where: Path) -> Path:
    """A raw base (smaller), a compressed qcow2 over it, a v2 qcow2 on top, with data in each."""
    base = where / "base.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", base, "3M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x01 0 3M", base], check=True, capture_output=True
    )
    plain = where / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", plain, "8M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x02 1M 1M", plain], check=True, capture_output=True)
    mid = where / "mid.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", plain, mid], check=True)
    subprocess.run(["qemu-img", "rebase", "-u", "-b", "base.raw", "-F", "raw", mid], check=True)
    top = where / "top.qcow2"
    options = "compat=0.10,cluster_size=4k"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            options,
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            top,
            "8M",
        ],
        check=True,
    )
    subprocess.run(["qemu-io", "-c", "write -P 0x03 1536k 8k", "-c", "write -P 0x04 7M 4k", top], check=True)
    return top


def raw_of(image: Path) -> bytes:
    out = image.with_suffix(".expected")
    subprocess.run(["qemu-img", "convert", "-O", "raw", image, out], check=True)
    return out.read_bytes()


def merged_map(entries: list[dict[str, object]]) -> list[tuple[int, int, object, object]]:
    out: list[tuple[int, int, object, object]] = []
    for e in entries:
        start, length = int(str(e["start"])), int(str(e["length"]))
        if out and out[-1][2:] == (e["data"], e["zero"]):
            out[-1] = (out[-1][0], out[-1][1] + length, e["data"], e["zero"])
        else:
            out.append((start, length, e["data"], e["zero"]))
    return out


async def test_nbd_clients_read_a_qcow2_chain_as_qemu_does(tmp_path: Path) -> None:
    top = chain(tmp_path)
    expected = raw_of(top)
    spec = DiskSpec(name="q", path=top, format="qcow2", read_only=True)
    async with serving(spec) as rig:
        copy = tmp_path / "copy.raw"
        await run("qemu-img", "convert", "-f", "raw", "-O", "raw", rig.uri("q"), str(copy))
        assert copy.read_bytes() == expected
        await run("nbdcopy", rig.tcp_uri("q"), str(tmp_path / "nbdcopy.raw"))
        assert (tmp_path / "nbdcopy.raw").read_bytes() == expected
        info = json.loads((await run("nbdinfo", "--json", rig.uri("q"))).stdout)["exports"][0]
        assert info["export-size"] == 8 * MiB and info["is_read_only"] is True
        # the allocation map over NBD (base:allocation) says what qemu-img map says of the image
        served = json.loads((await run("qemu-img", "map", "-f", "raw", "--output=json", rig.uri("q"))).stdout)
        local = json.loads((await run("qemu-img", "map", "--output=json", str(top))).stdout)
        assert merged_map(served) == merged_map(local)
        write = await run("qemu-io", "-f", "raw", "-c", "write 0 4k", rig.uri("q"), check=False)
        assert write.returncode != 0
        async with (
            aiohttp.ClientSession(base_url=rig.base_url) as http,
            http.get("/v1/disks/q/info") as response,
        ):
            described = await response.json()
        assert described["read_only"] is True and described["size"] == 8 * MiB
        dirty, qcow2, file = described["stack"]
        assert dirty == {"node": "dirty", "bitmaps": []}
        assert (qcow2["node"], qcow2["format"], qcow2["version"], qcow2["cluster_size"]) == (
            "qcow2",
            "qcow2",
            2,
            4096,
        )
        assert [(b["path"], b["format"]) for b in qcow2["backing"]] == [
            (str(tmp_path / "mid.qcow2"), "qcow2"),
            (str(tmp_path / "base.raw"), "raw"),
        ]
        assert file["node"] == "file" and file["path"] == str(top) and file["read_only"] is True


async def test_vblk_serve_exports_a_qcow2_image_over_nbd() -> None:
    with tempfile.TemporaryDirectory(prefix="vblk-") as tmp:
        top = chain(Path(tmp))
        sock = f"{tmp}/nbd.sock"
        disk = f"name=q,image={top},format=qcow2,read-only=on"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.cli", "serve", "--disk", disk,
            "--nbd-socket", sock, "--nbd-listen", "none", "--http-listen", "none", *QUIET,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            for _ in range(200):
                if os.path.exists(sock) or proc.returncode is not None:
                    break
                await asyncio.sleep(0.05)
            copy = Path(tmp) / "copy.raw"
            await run(
                "qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd+unix:///q?socket={sock}", str(copy)
            )
            assert copy.read_bytes() == raw_of(top)
            # served read-only: QEMU's tools may read the image meanwhile, not write it
            busy = await run("qemu-io", "-c", "write 0 4k", str(top), check=False)
            assert busy.returncode != 0 and "lock" in busy.stderr
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        ready = [json.loads(line) for line in out.decode().splitlines() if '"disk_ready"' in line]
        assert ready and ready[0]["read_only"] is True and ready[0]["format"] == "qcow2"


@pytest.mark.parametrize(
    ("disk", "message"),
    [
        ("format=qcow2,read-only,backend=memory", "disk q: format=qcow2 is a file disk's option"),
        ("l2-cache-size=1M", "disk q: l2-cache-size is a qcow2 disk's option"),
        ("format=qcow2,l2-cache-size=0", "disk q: l2-cache-size must be positive"),
        ("format=vmdk,read-only", "disk q: 'vmdk' is not one of raw, qcow2"),
    ],
)
async def test_what_a_qcow2_disk_cannot_do_is_one_usage_line(tmp_path: Path, disk: str, message: str) -> None:
    spec = f"name=q,image={tmp_path}/q.qcow2,{disk}"
    line = one_usage_line(
        await vblk("serve", "--disk", spec, "--nbd-listen", "none", "--http-listen", "none")
    )
    assert message in line, line


@pytest.mark.expect_errors("disk_open_failed")
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "q.qcow2 does not exist (a read-only disk is never created)"),
        ("raw", "no qcow2 magic"),
        ("unrecorded backing format", "has no recorded format"),
    ],
)
async def test_a_qcow2_image_that_cannot_be_served_is_one_error_line(
    tmp_path: Path, case: str, message: str
) -> None:
    image = tmp_path / "q.qcow2"
    if case == "raw":
        image.write_bytes(bytes(MiB))
    elif case == "unrecorded backing format":  # written by hand as old tools wrote it: no format
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "1M"], check=True)
        data = bytearray(image.read_bytes())
        name = b"base.raw"
        data[8:20] = (1024).to_bytes(8, "big") + len(name).to_bytes(4, "big")
        data[1024 : 1024 + len(name)] = name
        image.write_bytes(data)
        (tmp_path / "base.raw").write_bytes(bytes(MiB))
    spec = f"name=q,image={image},format=qcow2,read-only"
    error = one_error_line(
        await vblk("serve", "--disk", spec, "--nbd-listen", "none", "--http-listen", "none", *QUIET)
    )
    assert error["event"] == "disk_open_failed" and message in str(error["error"]), error


def test_format_is_a_disk_key_and_the_size_rules_are_the_same_for_both(tmp_path: Path) -> None:
    config_file = tmp_path / "vblk.toml"
    config_file.write_text("[[disk]]\nname = 'a'\nformat = 'qcow2'\nread-only = true\n")
    config, _ = from_sources(
        {"size": 4 * MiB, "grow": True}, {"VBLK_DISK": "name=q,format=qcow2,read-only; name=r"}
    )
    assert [(d.name, d.format, d.size_explicit, d.grow) for d in config.disks] == [
        ("q", "qcow2", True, True),  # a new qcow2 image's size, and an existing one's growth
        ("r", "raw", True, True),
    ]
    config, _ = from_sources({}, {}, config_file)
    assert [(d.name, d.format, d.read_only) for d in config.disks] == [("a", "qcow2", True)]
    config, _ = from_sources({}, {"VBLK_DISK": "name=q,format=qcow2,l2-cache-size=4M"})
    assert config.disks[0].l2_cache_size == 4 * MiB


def test_vblk_info_describes_a_qcow2_image_and_its_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    top = chain(tmp_path)
    assert main(["info", "--format", "qcow2", str(top)]) == 0
    facts = json.loads(capsys.readouterr().out)
    local = json.loads(
        subprocess.run(["qemu-img", "map", "--output=json", top], check=True, capture_output=True).stdout
    )
    assert facts["format"] == "qcow2" and facts["size"] == 8 * MiB
    assert (facts["version"], facts["cluster_size"], len(facts["backing"])) == (2, 4096, 2)
    assert facts["allocated"] == sum(e["length"] for e in local if e["data"])
    assert main(["info", str(top)]) == 0  # raw, as it always was: the file's own bytes
    assert json.loads(capsys.readouterr().out)["size"] == top.stat().st_size
    assert main(["info", "--format", "qcow2", str(tmp_path / "base.raw")]) == 1
    assert "no qcow2 magic" in capsys.readouterr().err


def writable_chain(where: Path) -> Path:
    """A raw base, a qcow2 middle with data of its own, and an empty qcow2 on top (4 KiB clusters)."""
    base = where / "base.raw"
    base.write_bytes(bytes(range(256)) * (3 * MiB // 256))
    mid = where / "mid.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, "8M"], check=True
    )
    subprocess.run(["qemu-io", "-c", "write -P 0x02 1M 1M", mid], check=True, capture_output=True)
    top = where / "top.qcow2"
    assert main(["create-image", str(top), "--format", "qcow2", "--size", "8M", "--cluster-size", "4K",
                 "--backing", "mid.qcow2", "--backing-format", "qcow2"]) == 0  # fmt: skip
    return top


async def test_nbd_clients_write_a_qcow2_chain_and_qemu_img_agrees(tmp_path: Path) -> None:
    top = writable_chain(tmp_path)
    reference = tmp_path / "reference.qcow2"  # the same chain, written by QEMU
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "mid.qcow2", "-F", "qcow2",
         reference, "8M"], check=True,
    )  # fmt: skip
    writes = ["write -P 0x33 1536k 8k", "write -P 0x44 100k 3k", "write -z 1M 64k", "discard 2M 128k",
              "write -P 0x55 7M 1M"]  # fmt: skip
    subprocess.run(["qemu-io", *[arg for w in writes for arg in ("-c", w)], reference], check=True)
    spec = DiskSpec(name="q", path=top, format="qcow2")
    async with serving(spec) as rig:
        argv = ["qemu-io", "-f", "raw"]
        for command in writes:
            argv += ["-c", command]
        await run(*argv, rig.uri("q"))
        await run("qemu-io", "-f", "raw", "-c", "flush", rig.uri("q"))
        info = json.loads((await run("nbdinfo", "--json", rig.uri("q"))).stdout)["exports"][0]
        assert info["is_read_only"] is False and info["can_trim"] and info["can_zero"]
        contexts = (await run("nbdinfo", "--list", "--content", "--json", rig.uri("q"))).stdout
        assert "qemu:allocation-depth" in contexts and "base:allocation" in contexts
        served = (await run("nbdinfo", "--map=qemu:allocation-depth", "--json", rig.uri("q"))).stdout
        copy = tmp_path / "served.raw"
        await run("qemu-img", "convert", "-f", "raw", "-O", "raw", rig.uri("q"), str(copy))
    # The reference server's view of QEMU's own image.
    sock = tmp_path / "ref.sock"
    server = subprocess.Popen(
        ["qemu-nbd", "-r", "-A", "-f", "qcow2", "-k", str(sock), "-x", "q", str(reference)]
    )
    try:
        for _ in range(200):
            if sock.exists():
                break
            await asyncio.sleep(0.02)
        uri = f"nbd+unix:///q?socket={sock}"
        expected = (await run("nbdinfo", "--map=qemu:allocation-depth", "--json", uri)).stdout
    finally:
        server.terminate()
        server.wait(10)

    def depths(text: str) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        for e in json.loads(text):
            if out and out[-1][2] == e["type"] and out[-1][0] + out[-1][1] == e["offset"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"], e["type"])
            else:
                out.append((e["offset"], e["length"], e["type"]))
        return out

    assert depths(served) == depths(expected)
    assert {d for _, _, d in depths(served)} == {1, 2, 3}  # this image, mid, base (and past its end)
    assert copy.read_bytes() == raw_of(reference)
    done = subprocess.run(["qemu-img", "check", str(top)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        subprocess.run(["qemu-img", "compare", top, reference], capture_output=True, check=False).returncode
        == 0
    )


async def test_a_missing_qcow2_image_is_created_and_a_size_grows_it(tmp_path: Path) -> None:
    image = tmp_path / "new.qcow2"
    async with serving(DiskSpec(name="q", path=image, format="qcow2", size=4 * MiB)) as rig:
        await run("qemu-io", "-f", "raw", "-c", "write -P 0x61 0 1M", rig.uri("q"))
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", image], capture_output=True,
                                     check=True).stdout)  # fmt: skip
    assert (info["format"], info["virtual-size"], info["cluster-size"]) == ("qcow2", 4 * MiB, 64 * 1024)
    grown = DiskSpec(name="q", path=image, format="qcow2", size=16 * MiB, size_explicit=True, grow=True)
    async with serving(grown) as rig:
        nbd = json.loads((await run("nbdinfo", "--json", rig.uri("q"))).stdout)["exports"][0]
        assert nbd["export-size"] == 16 * MiB
        await run("qemu-io", "-f", "raw", "-c", "read -P 0x61 0 1M", "-c", "read -P 0 1M 15M", rig.uri("q"))
    assert subprocess.run(["qemu-img", "check", image], capture_output=True, check=False).returncode == 0


async def test_a_damaged_qcow2_disk_fails_its_requests_and_the_other_disk_serves_on(tmp_path: Path) -> None:
    image = tmp_path / "bad.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", image, "4M"], check=True
    )
    subprocess.run(["qemu-io", "-c", "write -P 0x21 0 64k", image], check=True, capture_output=True)
    data = bytearray(image.read_bytes())
    l1_offset = int.from_bytes(data[40:48], "big")
    l2 = int.from_bytes(data[l1_offset : l1_offset + 8], "big") & 0x00FFFFFFFFFFFE00
    data[l2 + 8 : l2 + 16] = ((1 << 63) | (1 << 44)).to_bytes(8, "big")  # cluster 1: past the end
    image.write_bytes(data)
    disks = (
        DiskSpec(name="bad", path=image, format="qcow2"),
        DiskSpec(name="good", backend="memory", size=MiB),
    )
    async with serving(*disks) as rig:
        failed = await run("qemu-io", "-f", "raw", "-c", "read 4k 4k", rig.uri("bad"), check=False)
        assert "Input/output error" in failed.stdout + failed.stderr
        await run(
            "qemu-io", "-f", "raw", "-c", "read -P 0x21 0 4k", "-c", "read -P 0x21 8k 56k", rig.uri("bad")
        )
        await run(
            "qemu-io", "-f", "raw", "-c", "write -P 0x5 0 64k", "-c", "read -P 0x5 0 64k", rig.uri("good")
        )
