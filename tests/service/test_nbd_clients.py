"""The NBD server against real clients: nbdinfo, nbdcopy, nbdsh (libnbd), qemu-img, qemu-io, fio."""

from __future__ import annotations

import json
import os
import tempfile

from service.model import DiskSpec
from service.nbd.settings import NbdLimits
from tests.service.conftest import MiB, NbdRig, nbdsh, run, serving


async def test_nbdinfo_reports_size_flags_and_block_sizes(nbd_rig: NbdRig) -> None:
    info = json.loads((await run("nbdinfo", "--json", nbd_rig.uri())).stdout)
    [export] = info["exports"]
    assert export["export-name"] == "disk0"
    assert export["export-size"] == 64 * MiB
    assert export["is_read_only"] is False
    for flag in (
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
        "can_multi_conn",
    ):
        assert export[flag] is True, flag
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 * MiB
    assert "base:allocation" in export["contexts"]


async def test_nbdinfo_lists_every_export_with_description(nbd_rig: NbdRig) -> None:
    listing = json.loads((await run("nbdinfo", "--json", "--list", nbd_rig.uri(""))).stdout)
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert set(exports) == {"disk0", "ro"}
    assert exports["ro"]["is_read_only"] is True
    assert exports["disk0"]["description"] == "vblk virtio-blk disk disk0"


async def test_default_export_over_tcp(nbd_rig: NbdRig) -> None:
    info = json.loads((await run("nbdinfo", "--json", f"nbd://127.0.0.1:{nbd_rig.tcp_port}")).stdout)
    assert info["exports"][0]["export-size"] == 64 * MiB


async def test_nbdcopy_round_trip_and_qemu_img_compare(nbd_rig: NbdRig) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = f"{tmp}/in.img"
        data = os.urandom(8 * MiB)
        with open(source, "wb") as f:
            f.write(data)
        await run("nbdcopy", "--flush", source, nbd_rig.uri())
        out = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", source, nbd_rig.uri(), check=False)
        # The export is 64 MiB and the file 8: qemu-img compares the common part, then zeroes.
        assert out.returncode == 0, out.stdout + out.stderr
        back = f"{tmp}/out.img"
        await run("nbdcopy", nbd_rig.uri(), back)
        with open(back, "rb") as f:
            copied = f.read()
        assert copied[: len(data)] == data
        assert copied[len(data) :] == bytes(64 * MiB - len(data))


async def test_qemu_io_patterns_including_unaligned(nbd_rig: NbdRig) -> None:
    out = await run(
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0xab 1M 64k",
        "-c",
        "write -P 0xcd 1000 333",
        "-c",
        "write -P 0xef 1333 100",
        "-c",
        "read -P 0xab 1M 64k",
        "-c",
        "read -P 0xcd 1000 333",
        "-c",
        "read -P 0xef 1333 100",
        "-c",
        "read -P 0 0 1000",
        "-c",
        "read -P 0 1433 615",
        "-c",
        "flush",
        nbd_rig.uri(),
    )
    assert "Pattern verification failed" not in out.stdout + out.stderr
    assert out.stdout.count("read ") == 5


async def test_qemu_img_map_shows_allocation(nbd_rig: NbdRig) -> None:
    await run("qemu-io", "-f", "raw", "-c", "write -P 1 4M 1M", nbd_rig.uri())
    extents = json.loads((await run("qemu-img", "map", "--output=json", "-f", "raw", nbd_rig.uri())).stdout)
    data = [(e["start"], e["length"]) for e in extents if e["data"]]
    assert data == [(4 * MiB, 1 * MiB)]
    assert sum(e["length"] for e in extents) == 64 * MiB


async def test_nbdinfo_map_after_trim_and_zero(nbd_rig: NbdRig) -> None:
    await run(
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 7 0 2M",
        "-c",
        "discard 0 1M",
        "-c",
        "write -z -u 1M 64k",  # -u: the server may unmap (without it, qemu sends NO_HOLE)
        nbd_rig.uri(),
    )
    out = (await run("nbdinfo", "--map", "--json", nbd_rig.uri())).stdout
    extents = json.loads(out)
    kinds = [(e["offset"], e["length"], e["type"]) for e in extents]
    assert kinds[0] == (0, 1 * MiB + 64 * 1024, 3)  # hole+zero: trimmed, then zeroed
    assert kinds[1] == (1 * MiB + 64 * 1024, 1 * MiB - 64 * 1024, 0)  # data
    check = await run(
        "qemu-io", "-f", "raw", "-c", "read -P 0 0 1088k", "-c", "read -P 7 1088k 960k", nbd_rig.uri()
    )
    assert "Pattern verification failed" not in check.stdout


async def test_fio_nbd_engine_random_write_verify(nbd_rig: NbdRig) -> None:
    out = await run(
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={nbd_rig.uri()}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=8M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    )
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 * MiB
    assert job["read"]["io_bytes"] == 8 * MiB  # the verify pass


async def test_fio_multi_conn_over_tcp(nbd_rig: NbdRig) -> None:
    out = await run(
        "fio",
        "--name=mc",
        "--ioengine=nbd",
        f"--uri={nbd_rig.tcp_uri()}",
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=8",
        "--numjobs=4",
        "--size=4M",
        "--group_reporting",
        "--output-format=json",
    )
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert nbd_rig.service.nbd is not None
    assert nbd_rig.service.nbd.connections_total >= 4


async def test_libnbd_bad_requests_get_the_right_errors(nbd_rig: NbdRig) -> None:
    script = """
size = 64 << 20
def expect(fn, code):
    try:
        fn()
    except nbd.Error as e:
        assert e.errno in (code, errno.errorcode[code]), (fn, e.errno, e.string)
    else:
        raise AssertionError(f"{fn} succeeded")
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(uri)
expect(lambda: h.pwrite(b"x" * 512, size), errno.ENOSPC)
expect(lambda: h.pwrite(b"x" * 1024, size - 512), errno.ENOSPC)
expect(lambda: h.zero(4096, size), errno.ENOSPC)
expect(lambda: h.pread(512, size), errno.EINVAL)
expect(lambda: h.trim(4096, size), errno.EINVAL)
expect(lambda: h.pread(0, 0), errno.EINVAL)
expect(lambda: h.pread(512, 0, flags=1 << 7), errno.EINVAL)  # unknown flag
expect(lambda: h.flush(flags=nbd.CMD_FLAG_NO_HOLE), errno.EINVAL)  # flag of another command
h.pwrite(b"ok" * 256, 0)
assert h.pread(512, 0) == b"ok" * 256
h.shutdown()
r = nbd.NBD()
r.set_strict_mode(0)
r.connect_uri(uri.replace("/disk0?", "/ro?"))
expect(lambda: r.pwrite(b"x" * 512, 0), errno.EPERM)
expect(lambda: r.trim(512, 0), errno.EPERM)
assert r.pread(512, 0) == bytes(512)
r.shutdown()
print("ok")
"""
    out = await nbdsh(nbd_rig.uri(), script)
    assert out.stdout.strip() == "ok"


async def test_libnbd_without_structured_replies_and_old_handshake(nbd_rig: NbdRig) -> None:
    script = """
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(uri)
assert not h.get_structured_replies_negotiated()
h.pwrite(b"\\x42" * 4096, 8192)
assert h.pread(4096, 8192) == b"\\x42" * 4096
try:
    h.pread(512, 64 << 20)
except nbd.Error as e:
    assert e.errno in (errno.EINVAL, "EINVAL")
else:
    raise AssertionError("out-of-range read succeeded")
h.shutdown()
o = nbd.NBD()
o.set_handshake_flags(0)  # plain (non-fixed) newstyle: only NBD_OPT_EXPORT_NAME
o.connect_uri(uri)
assert o.pread(4096, 8192) == b"\\x42" * 4096
o.shutdown()
print("ok")
"""
    assert (await nbdsh(nbd_rig.uri(), script)).stdout.strip() == "ok"


async def test_libnbd_block_status_and_opt_mode(nbd_rig: NbdRig) -> None:
    script = """
h = nbd.NBD()
h.set_opt_mode(True)
h.add_meta_context("base:allocation")
h.connect_uri(uri)
names = []
h.opt_list(lambda name, desc: names.append(name))
assert sorted(names) == ["disk0", "ro"], names
contexts = []
h.opt_list_meta_context(lambda ctx: contexts.append(ctx))
assert contexts == ["base:allocation"], contexts
h.opt_info()
assert h.get_size() == 64 << 20
h.opt_go()
h.pwrite(b"\\x01" * 65536, 1 << 20)
seen = []
def cb(metacontext, offset, entries, err):
    seen.append((metacontext, offset, list(entries)))
    return 0
h.block_status(4 << 20, 0, cb)
ctx, off, entries = seen[0]
assert ctx == "base:allocation" and off == 0
pairs = list(zip(entries[0::2], entries[1::2]))
assert pairs[0] == (1 << 20, 3), pairs
assert pairs[1] == (65536, 0), pairs
seen.clear()
h.block_status(4 << 20, 0, cb, flags=nbd.CMD_FLAG_REQ_ONE)
assert len(seen[0][2]) == 2 and seen[0][2][0] <= 4 << 20
h.cache(4096, 0)
try:
    h.zero(4096, 1 << 20, flags=nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    assert fast_allocated_zeroes, "FAST_ZERO succeeded where allocated zeroes are a full write"
except nbd.Error as e:  # the spec's answer where it would not be fast: ENOTSUP, nothing written
    assert not fast_allocated_zeroes and e.errno in (errno.ENOTSUP, "ENOTSUP"), e
    assert h.pread(4096, 1 << 20) == b"\\x01" * 4096
    h.zero(4096, 1 << 20, flags=nbd.CMD_FLAG_NO_HOLE)  # what a client then falls back to
assert h.pread(4096, 1 << 20) == bytes(4096)
h.pwrite(b"\\x05" * 512, 0, flags=nbd.CMD_FLAG_FUA)
h.flush()
h.shutdown()
print("ok")
"""
    # RBD writes allocated zeroes on the OSDs (write-same): FAST_ZERO with NO_HOLE is refused there.
    fast = nbd_rig.service.disks["disk0"].bytes.capabilities.fast_zero
    out = await nbdsh(nbd_rig.uri(), f"fast_allocated_zeroes = {fast}\n" + script)
    assert out.stdout.strip() == "ok"


async def test_nbdinfo_can_multi_conn_and_qemu_nbd_list(nbd_rig: NbdRig) -> None:
    can = await run("nbdinfo", "--can", "multi-conn", nbd_rig.uri(), check=False)
    assert can.returncode == 0
    cannot = await run("nbdinfo", "--can", "read-only", nbd_rig.uri(), check=False)
    assert cannot.returncode == 2  # nbdinfo --can: 2 means "no"
    listing = await run("qemu-nbd", "-L", "-k", nbd_rig.socket)
    assert "exports available: 2" in listing.stdout
    assert "export: 'disk0'" in listing.stdout and "export: 'ro'" in listing.stdout
    assert "vblk virtio-blk disk disk0" in listing.stdout


async def test_nbdcopy_four_connections_and_qemu_img_convert(nbd_rig: NbdRig) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source, back, converted = f"{tmp}/in.img", f"{tmp}/out.img", f"{tmp}/conv.img"
        data = os.urandom(64 * MiB)
        with open(source, "wb") as f:
            f.write(data)
        await run("nbdcopy", "--connections=4", "--flush", source, nbd_rig.uri())
        await run("nbdcopy", "--connections=4", nbd_rig.tcp_uri(), back)
        with open(back, "rb") as f:
            assert f.read() == data
        await run("qemu-img", "convert", "-f", "raw", "-O", "raw", nbd_rig.uri(), converted)
        await run("qemu-img", "compare", "-f", "raw", "-F", "raw", converted, source)
        await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-q", converted, nbd_rig.uri())
        await run("qemu-img", "compare", "-f", "raw", "-F", "raw", nbd_rig.uri(), source)


async def test_fio_queue_depth_32_verify(nbd_rig: NbdRig) -> None:
    out = await run(
        "fio",
        "--name=qd32",
        "--ioengine=nbd",
        f"--uri={nbd_rig.uri()}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=16M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    )
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] == 16 * MiB


async def test_libnbd_option_phase_probes(nbd_rig: NbdRig) -> None:
    script = """
h = nbd.NBD()
h.set_opt_mode(True)
h.set_request_structured_replies(False)
h.connect_uri(uri)
h.set_export_name("missing")
try:
    h.opt_info()
except nbd.Error as e:
    assert "unknown" in e.string.lower() or e.errno in ("ENOENT", errno.ENOENT), e.string
else:
    raise AssertionError("INFO on a missing export succeeded")
h.set_export_name("disk0")
h.opt_go()
assert not h.get_structured_replies_negotiated()
assert h.pread(512, 0) == bytes(512)
h.shutdown()
print("ok")
"""
    out = await nbdsh(nbd_rig.uri(), script)
    assert out.stdout.strip() == "ok"


async def test_simple_replies_for_every_command(nbd_rig: NbdRig) -> None:
    script = """
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(uri)
h.pwrite(b"\\x11" * 8192, 0)
h.pwrite(b"\\x22" * 100, 50, flags=nbd.CMD_FLAG_FUA)
h.trim(4096, 4096)
h.zero(512, 0)
h.zero(100, 1000, flags=nbd.CMD_FLAG_NO_HOLE)
h.cache(4096, 0)
h.flush()
got = h.pread(8192, 0)
assert got[:512] == bytes(512), got[:16]
assert got[512:1000] == b"\\x11" * 488
assert got[1000:1100] == bytes(100)
assert got[1100:4096] == b"\\x11" * 2996
assert got[4096:] == bytes(4096)
h.shutdown()
print("ok")
"""
    assert (await nbdsh(nbd_rig.uri(), script)).stdout.strip() == "ok"


async def test_structured_sparse_read_sends_holes(nbd_rig: NbdRig) -> None:
    script = """
h = nbd.NBD()
h.connect_uri(uri)
h.pwrite(b"\\x33" * 65536, 1 << 20)
chunks = []
def chunk(buf, offset, status, err):
    chunks.append((offset, len(buf), status, bytes(buf[:1])))
    return 0
buf = h.pread_structured(4 << 20, 0, chunk)
assert buf[:1 << 20] == bytes(1 << 20) and buf[1 << 20 : (1 << 20) + 65536] == b"\\x33" * 65536
kinds = [(o, n, s) for o, n, s, _ in chunks]
assert kinds == [
    (0, 1 << 20, nbd.READ_HOLE),
    (1 << 20, 65536, nbd.READ_DATA),
    ((1 << 20) + 65536, (3 << 20) - 65536, nbd.READ_HOLE),
], kinds
chunks.clear()
h.pread_structured(4 << 20, 0, chunk, flags=nbd.CMD_FLAG_DF)
assert [(o, n, s) for o, n, s, _ in chunks] == [(0, 4 << 20, nbd.READ_DATA)]
h.shutdown()
print("ok")
"""
    assert (await nbdsh(nbd_rig.uri(), script)).stdout.strip() == "ok"


async def test_busy_polling_catches_a_queue_depth_one_client_and_can_be_turned_off() -> None:
    script = """
h = nbd.NBD()
h.connect_uri(uri)
data = bytes(range(256)) * 16
for i in range(40):
    h.pwrite(data, i * 4096)
    assert h.pread(4096, i * 4096) == data
h.shutdown()
"""
    disk = DiskSpec(name="disk0", backend="memory", size=4 * MiB)
    # A generous window: a client that asks again at once is caught by the poll.
    async with serving(disk, nbd_limits=NbdLimits(poll_us=10_000)) as rig:
        await nbdsh(rig.uri(), script)
        assert rig.service.nbd is not None
        polls = rig.service.nbd.polls
        assert polls.hits >= 40, polls  # 80 requests, each answered with nothing else in flight
        metrics = await run("curl", "-sf", f"{rig.base_url}/metrics")
        assert f'vblk_nbd_polls_total{{result="hit"}} {float(polls.hits)}' in metrics.stdout
    async with serving(disk, nbd_limits=NbdLimits(poll_us=0)) as rig:
        await nbdsh(rig.uri(), script)
        assert rig.service.nbd is not None
        assert (rig.service.nbd.polls.hits, rig.service.nbd.polls.misses) == (0, 0)
