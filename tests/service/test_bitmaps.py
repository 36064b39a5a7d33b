"""Dirty bitmaps end to end: made and changed over REST, marked by writes from real clients
(qemu-io, fio, nbdsh, curl, REST), read back as ``qemu:dirty-bitmap:NAME`` by nbdinfo, qemu-img
and libnbd, and as imageio's dirty extents over REST; checkpoints that no write straddles;
persistent bitmaps of a raw image kept across a restart."""

from __future__ import annotations

import asyncio
import errno
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from service.model import DiskSpec
from tests.service.conftest import MiB, NbdRig, nbdsh, run, serving

KiB = 1024
LIST_CONTEXTS = """
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri)
out = []
h.opt_list_meta_context(lambda c: out.append(c))
print(sorted(out))
"""
G = 64 * KiB  # the default granularity


def chunks_of(ranges: list[tuple[int, int]], granularity: int = G) -> set[int]:
    """The granularity chunks the byte ranges touch."""
    out: set[int] = set()
    for offset, length in ranges:
        out.update(range(offset // granularity, (offset + length - 1) // granularity + 1))
    return out


def dirty_chunks(extents: list[dict[str, Any]], granularity: int = G) -> set[int]:
    """Chunks ``nbdinfo --map --json`` calls dirty (type 1)."""
    out: set[int] = set()
    for e in extents:
        if e["type"] & 1:
            assert e["offset"] % granularity == 0
            out.update(range(e["offset"] // granularity, -(-(e["offset"] + e["length"]) // granularity)))
    return out


async def nbdinfo_map(rig: NbdRig, context: str, export: str = "disk0") -> list[dict[str, Any]]:
    out = (await run("nbdinfo", f"--map={context}", "--json", rig.uri(export))).stdout
    extents: list[dict[str, Any]] = json.loads(out)
    return extents


async def api(
    http: aiohttp.ClientSession, method: str, path: str, body: Any = None, status: int = 200
) -> Any:
    async with http.request(method, path, json=body) as response:
        answer = await response.json()
        assert response.status == status, (method, path, response.status, answer)
        return answer


async def test_writes_by_real_clients_show_in_the_bitmap_as_nbd_and_rest_see_it(nbd_rig: NbdRig) -> None:
    rig = nbd_rig
    async with aiohttp.ClientSession(base_url=rig.base_url) as http:
        made = await api(http, "POST", "/v1/disks/disk0/bitmaps", {"name": "b0"}, 201)
        assert made == {
            "name": "b0",
            "granularity": G,
            "recording": True,
            "persistent": False,  # a memory disk has nowhere to keep it
            "inconsistent": False,
            "dirty_bytes": 0,
            "size": 64 * MiB,
        }
        writes = [(0, 4096), (3 * MiB + 100, 5000), (10 * MiB - 512, 1024)]
        for offset, length in writes:
            await run("qemu-io", "-f", "raw", "-c", f"write -P 7 {offset} {length}", rig.uri())
        # REST: a sector PUT and a zeroing PATCH mark too
        async with http.put("/v1/disks/disk0/sectors/40960", data=b"\1" * 512) as r:  # 20 MiB
            assert r.status == 200
        await api(http, "PATCH", "/v1/disks/disk0", {"op": "zero", "offset": 30 * MiB, "size": 200 * KiB})
        writes += [(20 * MiB, 512), (30 * MiB, 200 * KiB)]
        # fio through the NBD engine, confined to [40 MiB, 44 MiB)
        await run(
            "fio", "--name=w", "--ioengine=nbd", f"--uri={rig.uri()}", "--rw=randwrite", "--bs=4k",
            "--offset=40M", "--size=4M", "--io_size=1M", "--iodepth=8", "--randrepeat=1",
        )  # fmt: skip
        expected = chunks_of(writes)
        listed = await api(http, "GET", "/v1/disks/disk0/bitmaps")
        assert [b["name"] for b in listed["bitmaps"]] == ["b0"]
        assert listed["persistence"]["available"] is False and listed["persistence"]["reason"]

        served = await nbdinfo_map(rig, "qemu:dirty-bitmap:b0")
        assert sum(e["length"] for e in served) == 64 * MiB
        assert all(e["type"] in (0, 1) for e in served)  # only bit 0 (virtnbdbackup asserts it)
        seen = dirty_chunks(served)
        fio_chunks = {c for c in seen if 40 * MiB // G <= c < 44 * MiB // G}
        assert fio_chunks, "fio's writes are not in the bitmap"
        assert seen - fio_chunks == expected

        # the same over REST, as ovirt-imageio reads it (bitmap= may be left out: there is one)
        extents = await api(http, "GET", "/v1/disks/disk0/extents?context=dirty")
        assert extents == await api(http, "GET", "/v1/disks/disk0/extents?context=dirty&bitmap=b0")
        assert sum(e["length"] for e in extents) == 64 * MiB
        assert {c for e in extents if e["dirty"] for c in chunks_of([(e["start"], e["length"])])} == seen
        zeroed = [e for e in extents if e["start"] <= 30 * MiB < e["start"] + e["length"]]
        assert zeroed[0]["dirty"] and zeroed[0]["zero"]  # the zeroed range: dirty and zero
        bitmap = await api(http, "GET", "/v1/disks/disk0/bitmaps/b0")
        assert bitmap["dirty_bytes"] == len(seen) * G

        # qemu-img reads the context as if it were base:allocation: dirty is a hole ("data": false)
        opts = (
            f"driver=nbd,server.type=unix,server.path={rig.socket},export=disk0,"
            "x-dirty-bitmap=qemu:dirty-bitmap:b0"
        )
        mapped = json.loads((await run("qemu-img", "map", "--output=json", "--image-opts", opts)).stdout)
        holes = {c for e in mapped if not e["data"] for c in chunks_of([(e["start"], e["length"])])}
        assert holes == seen


async def test_meta_contexts_list_and_select_bitmaps_as_qemu_nbd(nbd_rig: NbdRig) -> None:
    async with aiohttp.ClientSession(base_url=nbd_rig.base_url) as http:
        await api(http, "POST", "/v1/disks/disk0/bitmaps", {"name": "b0"}, 201)
        await api(http, "POST", "/v1/disks/disk0/bitmaps", {"name": "b1", "granularity": 4096}, 201)
    script = """
def listed(*queries):
    h = nbd.NBD()
    h.set_opt_mode(True)
    for q in queries:
        h.add_meta_context(q)
    h.connect_uri(uri)
    out = []
    h.opt_list_meta_context(lambda ctx: out.append(ctx))
    h.opt_abort()
    return sorted(out)
b0, b1 = "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"
assert listed() == ["base:allocation", b0, b1], listed()
assert listed("qemu:") == [b0, b1], listed("qemu:")
assert listed("qemu:dirty-bitmap:") == [b0, b1]
assert listed("base:") == ["base:allocation"]
assert listed(b1) == [b1]
assert listed("qemu:bogus", "x:") == []
h = nbd.NBD()
for c in ("base:allocation", b0, b1):
    h.add_meta_context(c)
h.connect_uri(uri)
assert all(h.can_meta_context(c) for c in ("base:allocation", b0, b1))
h.pwrite(b"\\x09" * 4096, 8192)
seen = {}
def cb(ctx, offset, entries, err):
    seen[ctx] = list(zip(entries[0::2], entries[1::2]))
    return 0
h.block_status(1 << 20, 0, cb)
assert set(seen) == {"base:allocation", b0, b1}, seen
assert seen[b0][0] == (65536, 1) and sum(n for n, _ in seen[b0]) == 1 << 20, seen[b0]
assert seen[b1][0] == (8192, 0) and seen[b1][1] == (4096, 1), seen[b1]
seen.clear()
h.block_status(1 << 20, 0, cb, flags=nbd.CMD_FLAG_REQ_ONE)
assert all(len(v) == 1 for v in seen.values()), seen
h.shutdown()
print("ok")
"""
    assert (await nbdsh(nbd_rig.uri(), script)).stdout.strip() == "ok"


async def test_a_checkpoint_splits_concurrent_writes_between_two_bitmaps(nbd_rig: NbdRig) -> None:
    """Writes in flight while a checkpoint is taken: each lands in exactly one of the two bitmaps."""
    rig = nbd_rig
    async with aiohttp.ClientSession(base_url=rig.base_url) as http:
        await api(http, "POST", "/v1/disks/disk0/bitmaps", {"name": "b0"}, 201)
        writer = await run_background_writer(rig, count=512)
        checkpoint = await api(http, "POST", "/v1/disks/disk0/checkpoints", {"bitmap": "b1"}, 201)
        assert checkpoint["disabled"] == ["b0"] and checkpoint["bitmap"]["recording"] is True
        out, _ = await writer.communicate()
        assert writer.returncode == 0, out
        b0 = dirty_chunks(await nbdinfo_map(rig, "qemu:dirty-bitmap:b0"))
        b1 = dirty_chunks(await nbdinfo_map(rig, "qemu:dirty-bitmap:b1"))
        assert b0 | b1 == set(range(512)) and not b0 & b1, (len(b0), len(b1), b0 & b1)
        assert b1, "every write finished before the checkpoint: the test did not overlap them"
        states = {
            b["name"]: b["recording"] for b in (await api(http, "GET", "/v1/disks/disk0/bitmaps"))["bitmaps"]
        }
        assert states == {"b0": False, "b1": True}


async def run_background_writer(rig: NbdRig, count: int) -> Any:
    """A libnbd client writing ``count`` chunks (one 4 KiB write in each 64 KiB chunk) with many in
    flight; it prints "ready" once writing."""
    script = f"""
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
buf = nbd.Buffer.from_bytearray(bytearray(b"\\x33" * 4096))
pending = 0
for i in range({count}):
    while h.aio_in_flight() >= 16:
        h.poll(-1)
    h.aio_pwrite(buf, i * 65536)
    if i == 16:
        print("ready", flush=True)
        import time; time.sleep(0.05)
    if i % 64 == 0:
        import time; time.sleep(0.005)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.shutdown()
"""
    proc = await asyncio.create_subprocess_exec(
        "/usr/bin/python3", "-c", script, rig.uri(), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    assert (await proc.stdout.readline()).strip() == b"ready"
    return proc


async def test_a_bitmap_removed_after_a_client_chose_it_is_an_error_not_its_namesake(nbd_rig: NbdRig) -> None:
    script = f"""
import json, urllib.request
def rest(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    headers = {{"Content-Type": "application/json"}}
    request = urllib.request.Request("{nbd_rig.base_url}" + path, method=method, data=data, headers=headers)
    urllib.request.urlopen(request).read()
rest("POST", "/v1/disks/disk0/bitmaps", {{"name": "b"}})
h = nbd.NBD()
h.add_meta_context("qemu:dirty-bitmap:b")
h.connect_uri(uri)
h.pwrite(b"\\x01" * 4096, 0)
seen = []
h.block_status(1 << 20, 0, lambda ctx, off, entries, err: seen.append(list(entries)) or 0)
assert seen[0][:2] == [65536, 1], seen
rest("DELETE", "/v1/disks/disk0/bitmaps/b")
rest("POST", "/v1/disks/disk0/bitmaps", {{"name": "b"}})  # a new, clean one of the same name
try:
    h.block_status(1 << 20, 0, lambda ctx, off, entries, err: 0)
    print("answered")
except nbd.Error as e:
    print("refused", e.errno)
h.pread(4096, 0)  # the connection goes on
h.shutdown()
"""
    out = (await nbdsh(nbd_rig.uri(), script)).stdout.split()
    assert out[0] == "refused" and out[1] in ("EINVAL", str(errno.EINVAL)), out


async def test_bitmap_management_and_its_refusals(nbd_rig: NbdRig) -> None:
    async with aiohttp.ClientSession(base_url=nbd_rig.base_url) as http:
        await api(http, "POST", "/v1/disks/disk0/bitmaps", {"name": "a", "granularity": 4096}, 201)
        await api(http, "POST", "/v1/disks/disk0/bitmaps", {"name": "b", "disabled": True}, 201)
        async with http.put("/v1/disks/disk0/sectors/0", data=b"\2" * 512) as r:
            assert r.status == 200
        a = await api(http, "GET", "/v1/disks/disk0/bitmaps/a")
        b = await api(http, "GET", "/v1/disks/disk0/bitmaps/b")
        assert (a["dirty_bytes"], a["recording"]) == (4096, True)
        assert (b["dirty_bytes"], b["recording"]) == (0, False)  # disabled: the write missed it
        merged = await api(http, "PATCH", "/v1/disks/disk0/bitmaps/b", {"op": "merge", "bitmaps": ["a"]})
        assert merged["dirty_bytes"] == G  # a coarser target rounds out
        assert (await api(http, "PATCH", "/v1/disks/disk0/bitmaps/b", {"op": "enable"}))["recording"]
        assert (await api(http, "PATCH", "/v1/disks/disk0/bitmaps/a", {"op": "clear"}))["dirty_bytes"] == 0
        assert not (await api(http, "PATCH", "/v1/disks/disk0/bitmaps/a", {"op": "disable"}))["recording"]
        refusals = [
            ("POST", "/v1/disks/disk0/bitmaps", {"name": "a"}, 409, "bitmap_exists"),
            ("POST", "/v1/disks/disk0/bitmaps", {"name": ""}, 400, "bad_field"),
            ("POST", "/v1/disks/disk0/bitmaps", {"name": "x/y"}, 400, "bad_field"),
            ("POST", "/v1/disks/disk0/bitmaps", {"name": "x" * 1024}, 400, "bad_field"),
            ("POST", "/v1/disks/disk0/bitmaps", {"name": "c", "granularity": 3000}, 400, "bad_field"),
            ("POST", "/v1/disks/disk0/bitmaps", {"name": "c", "granularity": 256}, 400, "bad_field"),
            ("POST", "/v1/disks/disk0/bitmaps", {"name": "c", "persistent": True}, 409, "bitmap_refused"),
            ("POST", "/v1/disks/disk0/bitmaps", {"name": "c", "colour": 1}, 400, "bad_field"),
            ("POST", "/v1/disks/disk0/bitmaps", {"granularity": 4096}, 400, "bad_field"),
            ("GET", "/v1/disks/disk0/bitmaps/nope", None, 404, "no_such_bitmap"),
            ("DELETE", "/v1/disks/disk0/bitmaps/nope", None, 404, "no_such_bitmap"),
            ("PATCH", "/v1/disks/disk0/bitmaps/a", {"op": "paint"}, 400, "bad_op"),
            ("PATCH", "/v1/disks/disk0/bitmaps/a", {"op": "merge"}, 400, "bad_field"),
            (
                "PATCH",
                "/v1/disks/disk0/bitmaps/a",
                {"op": "merge", "bitmaps": ["nope"]},
                404,
                "no_such_bitmap",
            ),
            ("PATCH", "/v1/disks/disk0/bitmaps/a", {"op": "clear", "x": 1}, 400, "bad_field"),
            ("POST", "/v1/disks/disk0/checkpoints", {"bitmap": "a"}, 409, "bitmap_exists"),
            ("POST", "/v1/disks/ro/bitmaps", {"name": "r"}, 403, "read_only"),
            ("POST", "/v1/disks/nope/bitmaps", {"name": "r"}, 404, "no_such_disk"),
            ("GET", "/v1/disks/disk0/extents?context=dirty", None, 400, "bad_parameter"),  # two: which?
            ("GET", "/v1/disks/disk0/extents?context=dirty&bitmap=nope", None, 404, "no_such_bitmap"),
            ("GET", "/v1/disks/ro/extents?context=dirty", None, 404, "no_dirty_tracking"),
        ]
        for method, path, body, status, code in refusals:
            answer = await api(http, method, path, body, status)
            assert answer["error"] == code, (method, path, body, answer)
        names = [b["name"] for b in (await api(http, "GET", "/v1/disks/disk0/bitmaps"))["bitmaps"]]
        assert names == ["a", "b"]
        assert (await api(http, "DELETE", "/v1/disks/disk0/bitmaps/a")) == {"removed": "a"}
        # the NBD server stops offering a removed bitmap
        contexts = await nbdsh(nbd_rig.uri(), LIST_CONTEXTS)
        assert contexts.stdout.strip() == "['base:allocation', 'qemu:dirty-bitmap:b']"


async def test_a_raw_images_bitmaps_persist_in_its_sidecar_across_a_restart(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    spec = DiskSpec(name="d", path=image, size=16 * MiB)
    async with serving(spec) as rig, aiohttp.ClientSession(base_url=rig.base_url) as http:
        made = await api(http, "POST", "/v1/disks/d/bitmaps", {"name": "keep"}, 201)
        assert made["persistent"] is True
        await api(http, "POST", "/v1/disks/d/bitmaps", {"name": "temp", "persistent": False}, 201)
        listed = await api(http, "GET", "/v1/disks/d/bitmaps")
        assert listed["persistence"] == {
            "available": True, "where": f"sidecar file {image}.bitmaps", "reason": None,
        }  # fmt: skip
        await run("qemu-io", "-f", "raw", "-c", "write -P 1 1M 64k", rig.uri("d"))
        assert not Path(f"{image}.bitmaps").exists()  # "keep" is saved at the clean close
    sidecar = json.loads(Path(f"{image}.bitmaps").read_text())
    assert [(b["name"], b["in_use"]) for b in sidecar["bitmaps"]] == [("keep", False)]
    async with serving(spec) as rig, aiohttp.ClientSession(base_url=rig.base_url) as http:
        in_use = json.loads(Path(f"{image}.bitmaps").read_text())["bitmaps"]
        assert [b["in_use"] for b in in_use] == [True]  # while open: a crash now leaves it inconsistent
        kept = await api(http, "GET", "/v1/disks/d/bitmaps")
        assert [(b["name"], b["persistent"], b["inconsistent"]) for b in kept["bitmaps"]] == [
            ("keep", True, False)
        ]
        assert dirty_chunks(await nbdinfo_map(rig, "qemu:dirty-bitmap:keep", "d")) == {16}


# -- persistent bitmaps in qcow2 images, with QEMU on the same file -------------------------------


def qemu_bitmaps(image: Path) -> dict[str, list[str]]:
    """``qemu-img info``'s bitmaps of ``image``: name → sorted flags."""
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(image)], check=True, capture_output=True, text=True
    ).stdout
    data = json.loads(out)["format-specific"]["data"]
    return {b["name"]: sorted(b["flags"]) for b in data.get("bitmaps", [])}


async def qemu_nbd_map(image: Path, bitmap: str, tmp_path: Path, granularity: int = G) -> set[int]:
    """The dirty chunks ``qemu-nbd -r -B bitmap`` serves of ``image``, as nbdinfo reads them."""
    sock = str(tmp_path / "qemu-nbd.sock")
    proc = await asyncio.create_subprocess_exec(
        "qemu-nbd", "-r", "-f", "qcow2", "-B", bitmap, "-k", sock, "-x", "q", "-t", str(image),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(200):
            if Path(sock).exists():
                break
            await asyncio.sleep(0.02)
        out = await run(
            "nbdinfo", f"--map=qemu:dirty-bitmap:{bitmap}", "--json", f"nbd+unix:///q?socket={sock}"
        )
        return dirty_chunks(json.loads(out.stdout), granularity)
    finally:
        proc.terminate()
        await proc.wait()


async def test_qcow2_bitmaps_are_shared_with_qemu_both_ways(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M")
    # QEMU's bitmap, QEMU's writes: vblk serves what qemu-nbd -B serves
    await run("qemu-img", "bitmap", "--add", str(image), "theirs")
    await run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4k", "-c", "write -P 2 5M 200k", str(image))
    theirs = await qemu_nbd_map(image, "theirs", tmp_path)
    assert theirs == chunks_of([(0, 4096), (5 * MiB, 200 * KiB)])
    spec = DiskSpec(name="q", path=image, format="qcow2")
    async with serving(spec) as rig, aiohttp.ClientSession(base_url=rig.base_url) as http:
        assert qemu_bitmaps(image) == {"theirs": ["auto", "in-use"]}  # vblk holds it open, writable
        assert dirty_chunks(await nbdinfo_map(rig, "qemu:dirty-bitmap:theirs", "q")) == theirs
        listed = await api(http, "GET", "/v1/disks/q/bitmaps")
        assert listed["persistence"] == {"available": True, "where": f"qcow2 image {image}", "reason": None}
        made = await api(http, "POST", "/v1/disks/q/bitmaps", {"name": "ours", "granularity": 4096}, 201)
        assert made["persistent"] is True
        await run("qemu-io", "-f", "raw", "-c", "write -P 3 8M 4k", "-c", "write -P 4 12M 512", rig.uri("q"))
        ours = dirty_chunks(await nbdinfo_map(rig, "qemu:dirty-bitmap:ours", "q"), 4096)
        assert ours == chunks_of([(8 * MiB, 4096), (12 * MiB, 512)], 4096)
    # vblk closed it cleanly: QEMU sees both bitmaps, consistent, with every write vblk took
    assert qemu_bitmaps(image) == {"theirs": ["auto"], "ours": ["auto"]}
    check = json.loads((await run("qemu-img", "check", "--output=json", str(image))).stdout)
    assert check.get("corruptions", 0) == 0 and check.get("leaks", 0) == 0, check
    assert await qemu_nbd_map(image, "theirs", tmp_path) == theirs | chunks_of(
        [(8 * MiB, 4096), (12 * MiB, 512)]
    )
    assert await qemu_nbd_map(image, "ours", tmp_path, 4096) == ours


async def test_sigkill_leaves_persistent_bitmaps_inconsistent(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M")
    await run("qemu-img", "bitmap", "--add", str(image), "b0")
    raw = tmp_path / "disk.img"
    sock, http_sock = str(tmp_path / "nbd.sock"), str(tmp_path / "http.sock")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "serve",
        "--disk", f"name=q,image={image},format=qcow2", "--disk", f"name=r,image={raw},size=16M",
        "--nbd-listen", "none", "--nbd-socket", sock, "--http-listen", "none", "--http-socket", http_sock,
        "--log-level", "warning", stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(500):
            if Path(http_sock).exists():
                break
            await asyncio.sleep(0.02)
        curl = ("curl", "-sf", "--unix-socket", http_sock, "-H", "Content-Type: application/json")
        await run(*curl, "-X", "POST", "-d", '{"name": "k"}', "http://vblk/v1/disks/r/bitmaps")
        await run(*curl, "-X", "POST", "-d", '{"name": "k"}', "http://vblk/v1/disks/q/bitmaps")
        await run("qemu-io", "-f", "raw", "-c", "write 0 4k", f"nbd+unix:///q?socket={sock}")
    finally:
        proc.kill()
        await proc.wait()
    # b0 was in use when vblk died ("k" on q was never stored: made after the open)
    assert qemu_bitmaps(image) == {"b0": ["auto", "in-use"]}
    refused = await run(
        "qemu-nbd", "-r", "-f", "qcow2", "-B", "b0", "-k", str(tmp_path / "x.sock"), str(image), check=False
    )
    assert refused.returncode != 0 and "inconsistent" in refused.stderr
    # the raw image's sidecar: "k" was made after the open, so it was never stored either; make
    # one stored, in use, as a crash leaves it, and see vblk refuse it
    async with (
        serving(DiskSpec(name="q", path=image, format="qcow2"), DiskSpec(name="r", path=raw)) as rig,
        aiohttp.ClientSession(base_url=rig.base_url) as http,
    ):
        b0 = await api(http, "GET", "/v1/disks/q/bitmaps/b0")
        assert b0["inconsistent"] is True and b0["recording"] is False
        refusal = await api(http, "PATCH", "/v1/disks/q/bitmaps/b0", {"op": "clear"}, 409)
        assert refusal["error"] == "bitmap_inconsistent"
        refusal = await api(http, "GET", "/v1/disks/q/extents?context=dirty&bitmap=b0", None, 409)
        assert refusal["error"] == "bitmap_inconsistent"
        contexts = await nbdsh(rig.uri("q"), LIST_CONTEXTS)
        assert "dirty-bitmap" not in contexts.stdout
        metrics = (await run("curl", "-sf", f"{rig.base_url}/metrics")).stdout
        assert 'vblk_bitmap_inconsistent{bitmap="b0",disk="q"} 1.0' in metrics
        await api(http, "DELETE", "/v1/disks/q/bitmaps/b0")
        await api(http, "POST", "/v1/disks/r/bitmaps", {"name": "k"}, 201)
    assert qemu_bitmaps(image) == {}
    # r's "k" was stored at that clean close; a kill while it is open leaves it in use
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "serve", "--disk", f"name=r,image={raw}",
        "--nbd-listen", "none", "--nbd-socket", sock, "--http-listen", "none", "--log-level", "warning",
    )  # fmt: skip
    try:
        for _ in range(500):
            sidecar = json.loads(Path(f"{raw}.bitmaps").read_text())
            if sidecar["bitmaps"][0]["in_use"]:
                break
            await asyncio.sleep(0.02)
    finally:
        proc.kill()
        await proc.wait()
    async with (
        serving(DiskSpec(name="r", path=raw)) as rig,
        aiohttp.ClientSession(base_url=rig.base_url) as http,
    ):
        assert (await api(http, "GET", "/v1/disks/r/bitmaps/k"))["inconsistent"] is True
