"""vblk on Ceph RBD against a real (throwaway, loopback) cluster: data, allocation map, concurrency,
ownership and failover, and a cluster that dies under load.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from device.block import ceph
from device.block.allocation import DATA, HOLE, ZERO, AllocationMap
from device.block.node import BlockError, awaited
from device.block.rbd import CACHE_MODES, ImageLockedError, RbdNode, RbdTarget
from device.block.sched import batch_thread
from driver.blk import BlkIOError
from service.app import Service
from service.config import ConfigError, from_sources
from service.model import DiskSpec, ServiceConfig, StartupError
from tests.ceph.cluster import Cluster
from tests.ceph.conftest import CLIENT_TIMEOUT, ceph_options, image_name, rbd_backend
from tests.deploy.conftest import tool
from tests.deploy.test_prometheus_grafana import (
    DASHBOARD,
    all_panels,
    metrics_on_no_panel,
    panels_without_data,
    prometheus,
    query,
    wait_for_scrapes,
)
from tests.service.conftest import MiB, NbdRig, nbdsh, run, serving
from tests.service.test_metrics import parse, scrape

REPO = Path(__file__).resolve().parents[2]


def rbd_diff(cluster: Cluster, image: str) -> list[tuple[int, int]]:
    """Allocated runs of an image according to the ``rbd`` tool (merged)."""
    out = json.loads(cluster.rbd("diff", "--format", "json", f"{cluster.pool}/{image}"))
    runs: list[tuple[int, int]] = []
    for entry in sorted(out, key=lambda e: e["offset"]):
        if entry["exists"] != "true":
            continue
        if runs and runs[-1][0] + runs[-1][1] == entry["offset"]:
            runs[-1] = (runs[-1][0], runs[-1][1] + entry["length"])
        else:
            runs.append((entry["offset"], entry["length"]))
    return runs


def test_deploy_example_config_is_valid() -> None:
    config, _values = from_sources({}, environ={}, config_file=REPO / "deploy/ceph/vblk.toml")
    db, golden = config.disks
    assert (db.backend, db.pool, db.rbd_image, db.create, db.read_only) == ("rbd", "rbd", "db", True, False)
    assert db.cache == golden.cache == "none"
    assert (golden.pool, golden.rbd_image, golden.read_only) == ("images", "debian-12", True)
    assert db.ceph.client_id == "vblk" and db.ceph.timeout == 30.0 and not db.ceph.take_over
    assert db.ceph.keyring == "/run/credentials/vblk.service/ceph.keyring"


async def test_deploy_drop_in_verifies_and_outlasts_a_stop_against_a_dead_cluster(tmp_path: Path) -> None:
    """deploy/ceph's systemd drop-in, merged into the unit, passes systemd-analyze; its stop
    timeout covers the worst stop of the example config against a dead cluster (the drains, the
    flushes, closing every disk), so systemd does not SIGKILL vblk with the image's lock held."""
    drop_in = REPO / "deploy/ceph/vblk.service.d/ceph.conf"
    unit = (REPO / "deploy/systemd/vblk.service").read_text().replace("/opt/vblk/bin/vblk", "/bin/true")
    merged = tmp_path / "vblk.service"
    merged.write_text(unit + "\n" + drop_in.read_text())
    result = await run(tool("systemd-analyze"), "verify", "--man=no", str(merged), check=False)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )
    settings: dict[str, str] = {}
    for line in drop_in.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings[key] = value
    config, values = from_sources({}, environ={}, config_file=REPO / "deploy/ceph/vblk.toml")
    drain = values["drain-timeout"]
    writable = [d for d in config.disks if not d.read_only]
    # NBD and HTTP drains, a flush per writable disk, then closing each disk (three Ceph timeouts).
    worst = 2 * drain + drain * len(writable) + sum(3 * d.ceph.timeout for d in config.disks)
    assert float(settings["TimeoutStopSec"].removesuffix("s")) >= worst, (settings, worst)
    assert settings["CPUSchedulingPolicy"] == "batch"
    assert settings["LoadCredential"].startswith("ceph.keyring:")
    assert config.disks[0].ceph.keyring == "/run/credentials/vblk.service/ceph.keyring"


def test_cache_option_is_an_rbd_disk_option() -> None:
    def disks(*specs: str) -> list[DiskSpec]:
        config, _values = from_sources({"disk": list(specs)}, environ={})
        return list(config.disks)

    plain, cached = disks("name=a,backend=rbd", "name=b,backend=rbd,cache=writeback")
    assert (plain.cache, cached.cache) == ("none", "writeback")
    with pytest.raises(ConfigError, match="cache"):
        disks("name=c,backend=rbd,cache=writearound")
    with pytest.raises(ConfigError, match="rbd disk"):
        disks("name=d,backend=file,cache=writeback")
    with pytest.raises(ValueError, match="cache"):
        RbdTarget("rbd", "x", cache="unsafe")


def test_ceph_timeout_is_whole_seconds() -> None:
    """Ceph's client timeouts are whole seconds: librados refuses "2.5" (EINVAL) at connect."""
    for bad in ("2.5", "0", "-1", "inf", "nan", "1e12"):
        with pytest.raises(ConfigError, match="whole number of seconds"):
            from_sources({"disk": ["name=a,backend=rbd"]}, environ={"VBLK_CEPH_TIMEOUT": bad})
    config, _values = from_sources({"disk": ["name=a,backend=rbd"]}, environ={"VBLK_CEPH_TIMEOUT": "7"})
    assert config.disks[0].ceph.timeout == 7
    assert ("rados_osd_op_timeout", "3") in RbdTarget("rbd", "x", timeout=2.5).options()  # rounded up


@pytest.mark.parametrize("cache", CACHE_MODES)
def test_cache_option_is_what_librbd_runs_with(ceph_cluster: Cluster, cache: str) -> None:
    target = RbdTarget(
        "rbd",
        image_name("cache"),
        str(ceph_cluster.conf),
        timeout=CLIENT_TIMEOUT,
        create_size=MiB,
        cache=cache,
    )
    backend = RbdNode.open(target)
    try:
        settings = {k: backend.option(k) for k in ("rbd_cache", "rbd_cache_policy")}
        assert backend.option("librados_thread_count") == "1"  # vblk's default: one completion thread
        if cache == "none":  # the cluster's ceph.conf says nothing else matters here
            assert settings["rbd_cache"] == "false"
        else:  # write-back from the first write, with the ObjectCacher (not writearound)
            assert settings == {"rbd_cache": "true", "rbd_cache_policy": "writeback"}
            assert backend.option("rbd_cache_writethrough_until_flush") == "false"
    finally:
        backend.close()


def test_librbd_threads_are_batch_threads_and_the_caller_is_not(ceph_cluster: Cluster) -> None:
    before = set(os.listdir("/proc/self/task"))
    target = RbdTarget(
        "rbd", image_name("sched"), str(ceph_cluster.conf), timeout=CLIENT_TIMEOUT, create_size=MiB
    )
    backend = RbdNode.open(target)
    try:
        started = set(os.listdir("/proc/self/task")) - before
        assert len(started) >= 3  # the messenger, the aio dispatch and completion thread, timers...
        policies = {os.sched_getscheduler(int(tid)) for tid in started}
        assert policies == {os.SCHED_BATCH}
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the opening thread is itself again
    finally:
        backend.close()


def test_batch_thread_switches_a_default_thread_and_leaves_a_chosen_policy_alone() -> None:
    def in_a_thread() -> list[object]:
        tid = threading.get_native_id()
        seen: list[object] = [os.sched_getscheduler(tid)]
        restore = batch_thread()
        assert restore is not None
        seen.append(os.sched_getscheduler(tid))
        assert batch_thread() is None  # batch already: nothing to undo twice
        restore()
        seen.append(os.sched_getscheduler(tid))
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))  # as chrt -i would
        seen.append(batch_thread())
        seen.append(os.sched_getscheduler(tid))
        return seen

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        seen = pool.submit(in_a_thread).result()
    assert seen == [os.SCHED_OTHER, os.SCHED_BATCH, os.SCHED_OTHER, None, os.SCHED_IDLE]


async def test_event_loop_runs_batch_while_an_rbd_disk_is_served(ceph_cluster: Cluster) -> None:
    tid = threading.get_native_id()
    assert os.sched_getscheduler(tid) == os.SCHED_OTHER
    spec = DiskSpec(
        name="disk0",
        backend="rbd",
        rbd_image=image_name("loop"),
        size=MiB,
        create=True,
        ceph=ceph_options(ceph_cluster),
    )
    async with serving(spec) as rig:
        assert os.sched_getscheduler(tid) == os.SCHED_BATCH
        disk = rig.service.disks["disk0"].bytes
        await disk.write(0, b"b" * 4096)
        assert await disk.read(0, 4096) == b"b" * 4096
    assert os.sched_getscheduler(tid) == os.SCHED_OTHER  # stopping switched it back


async def test_aio_transfers_one_buffer_several_and_read_only_ones(ceph_cluster: Cluster) -> None:
    target = RbdTarget(
        "rbd", image_name("aio"), str(ceph_cluster.conf), timeout=CLIENT_TIMEOUT, create_size=MiB
    )
    backend = await asyncio.to_thread(RbdNode.open, target)
    try:
        ram = bytearray(4 * 4096)
        view = memoryview(ram)
        ram[:4096] = b"a" * 4096
        await awaited(backend.writev, 0, [view[:4096]])  # one guest buffer: rbd_aio_write
        ram[4096:12288] = b"b" * 4096 + b"c" * 4096
        await awaited(backend.writev, 4096, [view[4096:8192], view[8192:12288]])  # several: an iovec array
        await awaited(backend.writev, 12288, [memoryview(b"d" * 4096)])  # read-only: written from a copy
        ram[:] = bytes(len(ram))
        await awaited(backend.readv, 0, [view[:4096]])
        await awaited(backend.readv, 4096, [view[4096:6144], view[6144:12288], view[12288:]])
        assert ram == b"a" * 4096 + b"b" * 4096 + b"c" * 4096 + b"d" * 4096
        with pytest.raises(BlockError) as refused:
            await awaited(backend.readv, 0, [memoryview(bytes(4096))])  # nowhere to put the data
        assert refused.value.errno == errno.EINVAL
        with pytest.raises(BlockError) as outside:
            await awaited(backend.readv, MiB - 512, [view[:4096]])
        assert outside.value.errno == errno.EINVAL
        assert backend.completed == 5 and backend.inflight == 0
    finally:
        backend.close()


def test_ceph_conf_overrides_vblks_tuning(ceph_cluster: Cluster, tmp_path: Path) -> None:
    conf = tmp_path / "ceph.conf"
    conf.write_text(
        ceph_cluster.conf.read_text().replace("[client]\n", "[client]\nlibrados thread count = 3\n")
    )
    target = RbdTarget("rbd", image_name("tuned"), str(conf), timeout=CLIENT_TIMEOUT, create_size=MiB)
    backend = RbdNode.open(target)
    try:
        assert backend.option("librados_thread_count") == "3"
    finally:
        backend.close()


def test_allocation_map_model() -> None:
    m = AllocationMap(1 << 20)
    assert m.block == 4096 and m.runs() == []
    m.set(4096, 8192, DATA)
    m.set(8192, 12288, DATA)  # neighbouring runs are one
    m.set(100, 200, DATA)  # a partly written block is data
    assert m.runs() == [(0, 12288)]
    m.set(5000, 9000, HOLE)  # zeroes covering no whole block leave it data
    assert m.runs() == [(0, 12288)]
    m.set(1000, 12288, HOLE)  # blocks 1 and 2 are covered whole: holes
    assert [(e.offset, e.length, e.hole, e.zero) for e in m.extents(0, 20000)] == [
        (0, 4096, False, False),
        (4096, 15904, True, True),
    ]
    assert [(e.offset, e.length) for e in m.extents(100, 50)] == [(100, 50)]
    # Allocated zeroes: blocks covered whole are zero and allocated; a partly covered hole
    # becomes one too (it reads zeroes, and part of it is allocated); partly covered data stays data.
    m.set(20480, 40960, DATA)
    m.set(16384 + 100, 32768 + 100, ZERO)
    kinds = [(e.offset, e.length, e.hole, e.zero) for e in m.extents(12288, 32768)]
    assert kinds == [
        (12288, 4096, True, True),  # untouched hole
        (16384, 16384, False, True),  # partly covered hole (block 4) and covered data (5-7)
        (32768, 8192, False, False),  # partly covered data (block 8), then data (block 9)
        (40960, 4096, True, True),
    ], kinds
    assert m.runs() == [(0, 4096), (16384, 24576)]
    m.set(16384, 32768, HOLE)  # unmapped again
    assert [e.hole for e in m.extents(16384, 16384)] == [True]
    m.set((1 << 20) - 100, 1 << 20, DATA)  # the last block
    m.resize(1 << 19)
    assert m.runs() == [(0, 4096), (32768, 8192)]
    m.resize(3 << 20)
    assert m.runs() == [(0, 4096), (32768, 8192)] and m.size == 3 << 20
    big = AllocationMap(1 << 40)  # 1 TiB: 64 KiB blocks, a 16 MiB map
    assert big.block == 65536 and len(big.extents(0, 1 << 40)) == 1
    odd = AllocationMap(10000, [(0, 10000)])  # a short last block
    odd.set(8192, 10000, HOLE)
    assert odd.runs() == [(0, 8192)]
    odd.set(8192, 10000, ZERO)
    assert [(e.offset, e.length, e.hole, e.zero) for e in odd.extents(0, 10000)][-1] == (
        8192,
        1808,
        False,
        True,
    )


async def test_data_written_through_vblk_is_what_rbd_export_reads(
    nbd_rig: NbdRig, ceph_cluster: Cluster
) -> None:
    """Writes over NBD (fio at QD32, then nbdcopy) land in the image: ``rbd export`` reads them back.

    The allocation map vblk keeps agrees with librbd's: no data where librbd's diff iteration has
    none, and above all no hole where the image holds anything but zeroes (a copy would skip it).
    """
    backend = rbd_backend(nbd_rig.service)
    out = await run(
        "fio", "--name=qd32", "--ioengine=nbd", f"--uri={nbd_rig.uri()}", "--rw=randwrite",
        "--bs=4k", "--iodepth=32", "--size=8M", "--offset=16M", "--output-format=json",
    )  # fmt: skip
    assert json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]["error"] == 0
    assert backend.max_inflight >= 16, f"only {backend.max_inflight} requests in flight at QD32"
    with tempfile.TemporaryDirectory() as tmp:
        data = os.urandom(8 * MiB)
        source = Path(tmp, "in.img")
        source.write_bytes(data)
        await run("nbdcopy", "--flush", str(source), nbd_rig.uri())
        exported = Path(tmp, "export.img")
        await asyncio.to_thread(ceph_cluster.rbd, "export", f"rbd/{backend.target.image}", str(exported))
        image = exported.read_bytes()
        assert len(image) == 64 * MiB
        assert image[: 8 * MiB] == data
        over_nbd = Path(tmp, "nbd.img")
        await run("nbdcopy", nbd_rig.uri(), str(over_nbd))
        assert over_nbd.read_bytes() == image
    # Zero a range and trim another; the map and a fresh diff iteration agree.
    await nbd_rig.service.disks["disk0"].bytes.zero(1 * MiB, 2 * MiB)
    await nbd_rig.service.disks["disk0"].bytes.discard(4 * MiB, 4 * MiB)
    ours = [(e.offset, e.length) for e in backend.extents(0, backend.size) if not e.hole]
    theirs = await asyncio.to_thread(rbd_diff, ceph_cluster, backend.target.image)
    covered = AllocationMap(backend.size, theirs)
    for offset, length in ours:  # everything vblk calls data, librbd calls data too
        assert all(not e.hole for e in covered.extents(offset, length)), (offset, length, theirs)
    assert [e.hole for e in backend.extents(4 * MiB, 4 * MiB)] == [True]
    # The other way round, what matters: wherever vblk says hole, the image reads zeroes.
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(tmp, "export.img")
        await asyncio.to_thread(ceph_cluster.rbd, "export", f"rbd/{backend.target.image}", str(exported))
        image = exported.read_bytes()
    holes = [e for e in backend.extents(0, backend.size) if e.hole]
    assert holes and ours
    for e in holes:
        assert image[e.offset : e.offset + e.length].count(0) == e.length, (e, ours)


async def test_a_fresh_open_maps_exactly_what_was_written(ceph_cluster: Cluster) -> None:
    """A writable open reads the map from the cluster: the runs written, zeroed and trimmed before."""
    target = RbdTarget(
        "rbd", image_name("fresh"), str(ceph_cluster.conf), timeout=CLIENT_TIMEOUT, create_size=32 * MiB
    )
    backend = await asyncio.to_thread(RbdNode.open, target)
    try:
        await awaited(backend.writev, 1 * MiB, [memoryview(bytearray(b"a" * 12288))])
        await awaited(backend.writev, 9 * MiB + 4096, [memoryview(bytearray(b"b" * 65536))])
        await awaited(backend.writev, 16 * MiB, [memoryview(bytearray(b"c" * (8 * MiB)))])
        await awaited(backend.discard, 20 * MiB, 4 * MiB)  # a whole object: deallocated
        await awaited(backend.write_zeroes, 16 * MiB, 4 * MiB, False)  # zeroes kept allocated
    finally:
        await asyncio.to_thread(backend.close)
    written = [(1 * MiB, 12288), (9 * MiB + 4096, 65536), (16 * MiB, 4 * MiB)]
    untouched = [(4 * MiB, 4 * MiB), (12 * MiB, 4 * MiB), (20 * MiB, 12 * MiB)]  # whole 4 MiB objects
    reopened = await asyncio.to_thread(RbdNode.open, target)
    try:
        # librbd reports an object's data from the object's start: the map may err towards data
        # inside a written object, never towards a hole.
        for offset, length in written:
            assert all(not e.hole for e in reopened.extents(offset, length)), reopened._map.runs()
        for offset, length in untouched:
            assert [e.hole for e in reopened.extents(offset, length)] == [True], reopened._map.runs()
        # The image has fast-diff (Ceph's default features): whole objects, from the object map.
        assert ceph.image_features(reopened._handle()) & ceph.RBD_FEATURE_FAST_DIFF
        assert reopened._map.runs() == [(0, 4 * MiB), (8 * MiB, 4 * MiB), (16 * MiB, 4 * MiB)]
    finally:
        await asyncio.to_thread(reopened.close)
    # A read-only client takes no lock, so others may write under it: it calls every block data.
    read_only = dataclasses.replace(target, read_only=True, create_size=None)
    shared = await asyncio.to_thread(RbdNode.open, read_only)
    try:
        everything = [(e.offset, e.length, e.hole) for e in shared.extents(0, shared.size)]
        assert everything == [(0, 32 * MiB, False)]
    finally:
        await asyncio.to_thread(shared.close)


async def test_write_zeroes_unmaps_only_when_allowed(nbd_rig: NbdRig, ceph_cluster: Cluster) -> None:
    """NBD write-zeroes with NO_HOLE keeps the range allocated in the image; without it, it may not."""
    backend = rbd_backend(nbd_rig.service)
    script = (
        "h = nbd.NBD()\nh.connect_uri(uri)\n"
        "h.pwrite(b'\\x7f' * (8 << 20), 32 << 20)\n"
        "h.zero(4 << 20, 32 << 20, nbd.CMD_FLAG_NO_HOLE)\n"
        "h.zero(4 << 20, 36 << 20)\n"
        "h.flush()\n"
        "assert h.pread(8 << 20, 32 << 20) == bytes(8 << 20)\n"
        # FAST_ZERO: unmapping is fast; zeroes kept allocated are a full write here, so ENOTSUP
        # at once, and nothing is written (the byte stays).
        "h.pwrite(b'\\x7f', 48 << 20)\n"
        "h.zero(4 << 20, 44 << 20, nbd.CMD_FLAG_FAST_ZERO)\n"
        "try:\n"
        "    h.zero(4 << 20, 48 << 20, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)\n"
        "    raise AssertionError('FAST_ZERO with NO_HOLE succeeded')\n"
        "except nbd.Error as e:\n"
        "    assert e.errno in (errno.ENOTSUP, 'ENOTSUP'), (e.errno, e)\n"
        "assert h.pread(1, 48 << 20) == b'\\x7f'\n"
    )
    await nbdsh(nbd_rig.uri(), script)
    assert [(e.offset, e.length, e.hole, e.zero) for e in backend.extents(32 * MiB, 8 * MiB)] == [
        (32 * MiB, 4 * MiB, False, True),  # allocated zeroes: NBD_STATE_ZERO without HOLE
        (36 * MiB, 4 * MiB, True, True),
    ]
    out = await run("nbdinfo", "--map", "--json", nbd_rig.uri())
    extents = json.loads(out.stdout)

    def kind(start: int, end: int) -> set[int]:
        return {e["type"] for e in extents if e["offset"] < end and start < e["offset"] + e["length"]}

    assert kind(32 * MiB, 36 * MiB) == {2} and kind(36 * MiB, 40 * MiB) == {3}, extents
    runs = await asyncio.to_thread(rbd_diff, ceph_cluster, backend.target.image)
    theirs = AllocationMap(backend.size, runs)
    assert [(e.offset, e.length, e.hole) for e in theirs.extents(32 * MiB, 8 * MiB)] == [
        (32 * MiB, 4 * MiB, False),
        (36 * MiB, 4 * MiB, True),
    ]


async def test_metrics_follow_the_rbd_backend(nbd_rig: NbdRig) -> None:
    backend = rbd_backend(nbd_rig.service)
    before = backend.completed
    disk = nbd_rig.service.disks["disk0"].bytes
    await disk.write(0, b"m" * 4096)
    await disk.flush()
    assert await disk.read(0, 4096) == b"m" * 4096
    samples, _ = await scrape(nbd_rig)  # indexed: a missing sample fails the test

    def sample(name: str, disk: str) -> float:
        return samples[(name, (("disk", disk),))]

    assert sample("vblk_rbd_requests_completed_total", "disk0") >= before + 3  # write, flush, read
    assert sample("vblk_rbd_requests_inflight", "disk0") == 0
    assert sample("vblk_rbd_write_failed", "disk0") == 0
    assert sample("vblk_rbd_write_failed", "ro") == 0  # the read-only RBD disk is there too


async def test_second_vblk_refuses_a_locked_image(ceph_cluster: Cluster) -> None:
    name = image_name("locked")
    options = ceph_options(ceph_cluster)
    spec = DiskSpec(name="d", backend="rbd", rbd_image=name, size=8 * MiB, create=True, ceph=options)
    first = Service(ServiceConfig(disks=(spec,), guest_memory=32 * MiB, nbd_listen=()))
    await first.start()
    try:
        second = Service(ServiceConfig(disks=(spec,), guest_memory=32 * MiB, nbd_listen=()))
        started = time.monotonic()
        with pytest.raises(StartupError, match=r"disk d: .* in use by") as refused:
            await second.start()
        assert isinstance(refused.value.__cause__, ImageLockedError)
        assert time.monotonic() - started < 5
        await second.stop()
        # Read-only opens take no lock and may share the image.
        ro = Service(
            ServiceConfig(
                disks=(DiskSpec(name="d", backend="rbd", rbd_image=name, read_only=True, ceph=options),),
                guest_memory=32 * MiB,
                nbd_listen=(),
            )
        )
        await ro.start()
        await first.disks["d"].bytes.write(0, b"\x5a" * 4096)
        assert await ro.disks["d"].bytes.read(0, 4096) == b"\x5a" * 4096
        # Data written after the read-only client opened is data to it: not a hole that NBD
        # clients would read as zeroes (sparse READ replies, BLOCK_STATUS) and copies would skip.
        await first.disks["d"].bytes.write(2 * MiB, b"\x6b" * 131072)
        assert not any(e.hole for e in ro.disks["d"].bytes.extents(2 * MiB, 131072))
        assert await ro.disks["d"].bytes.read(2 * MiB, 131072) == b"\x6b" * 131072
        await ro.stop()
    finally:
        await first.stop()
    with pytest.raises(BlockError):  # a missing image without create= is an error, not a new image
        RbdNode.open(RbdTarget("rbd", image_name("missing"), str(ceph_cluster.conf), timeout=5))


# -- vblk as a process: failover and a dying cluster ---------------------------------------------------


@contextlib.contextmanager
def vblk_process(
    directory: Path, name: str, *args: str, python: Sequence[str] = (sys.executable,)
) -> Iterator[subprocess.Popen[bytes]]:
    """``vblk serve ARGS`` as a process group, logging to ``NAME.log``; ``python``: how to start
    the interpreter (a launcher that changes the process first, then execs Python)."""
    log = (directory / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        [*python, "-m", "service.cli", "serve", "--log-format", "json", *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def wait_serving(
    proc: subprocess.Popen[bytes], socket_path: Path, log: Path, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vblk exited {proc.returncode}: {log.read_text()[-3000:]}")
        if socket_path.exists():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"vblk did not start serving: {log.read_text()[-3000:]}")


async def logged(log: Path, marker: str, timeout: float = 20) -> dict[str, Any]:
    """The first JSON log line holding ``marker`` (the socket is bound a moment before vblk logs
    that it runs: wait for the line, do not race it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if marker in line:
                found: dict[str, Any] = json.loads(line)
                return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {marker} line in {log}: {log.read_text()[-3000:]}")


def serve_args(cluster: Cluster, image: str, sock: Path, *extra: str, cache: str = "none") -> list[str]:
    return [
        "--disk", f"name=d,backend=rbd,image={image},size=64M,create,cache={cache}",
        "--ceph-conf", str(cluster.conf), "--ceph-timeout", "5",
        "--nbd-listen", "none", "--nbd-socket", str(sock), "--http-listen", "none", *extra,
    ]  # fmt: skip


WRITER = """
import os, sys, time
h = nbd.NBD()
h.connect_uri(uri)
blocks = int(sys.argv[2])
flushed = 0
i = 0
while True:
    # 8 writes in flight at a time, then a FLUSH: everything before it is acknowledged and durable.
    cookies = [h.aio_pwrite(bytes([i + k & 0xff]) * 4096, ((i + k) % blocks) * 4096) for k in range(8)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        h.aio_command_completed(c)  # raises if the write failed
    i += 8
    h.flush()
    print(i, flush=True)
"""

CHECKER = """
h = nbd.NBD()
h.connect_uri(uri)
bad = []
# Write n went to block n % blocks. Writes from `done` on were not covered by a FLUSH (8 may have
# been in flight): their blocks may hold either value, so the check covers the blocks before them.
for n in range(max(0, done - blocks + 8), done):
    want = bytes([n & 0xff]) * 4096
    if h.pread(4096, (n % blocks) * 4096) != want:
        bad.append(n)
print(len(bad), bad[:10])
"""


@pytest.mark.parametrize("choice", ["auto", "system"])
async def test_vblk_serving_rbd_runs_tcmalloc_unless_told_not_to(
    ceph_cluster: Cluster, tmp_path: Path, choice: str
) -> None:
    sock = tmp_path / "nbd.sock"
    args = serve_args(ceph_cluster, image_name("malloc"), sock, "--malloc", choice)
    with vblk_process(tmp_path, "v", *args) as proc:
        await wait_serving(proc, sock, tmp_path / "v.log")
        maps = Path(f"/proc/{proc.pid}/maps").read_text()  # the same pid after the exec
        running = await logged(tmp_path / "v.log", '"running"')
        script = "h = nbd.NBD()\nh.connect_uri(uri)\nh.pwrite(b'm' * 4096, 0)\n"
        script += "assert h.pread(4096, 0) == b'm' * 4096\n"
        await nbdsh(f"nbd+unix:///d?socket={sock}", script)  # it serves
    if choice == "auto":
        assert "libtcmalloc_minimal" in maps and running["malloc"] == "tcmalloc", running
    else:
        assert "libtcmalloc" not in maps and running["malloc"] == "glibc", running


# Runs the rest of its command line with what systemd's ``MemoryDenyWriteExecute=yes`` does, by
# the kernel's own switch (``PR_SET_MDWE``, Linux 6.3+; kept across exec): no mapping may be
# writable and executable at once.
DENY_WRITE_EXECUTE = """
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0):  # PR_SET_MDWE, REFUSE_EXEC_GAIN
    sys.exit("PR_SET_MDWE: " + os.strerror(ctypes.get_errno()))
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


async def test_vblk_serves_rbd_where_memory_cannot_be_writable_and_executable(
    ceph_cluster: Cluster, tmp_path: Path
) -> None:
    """deploy/systemd's unit sets MemoryDenyWriteExecute=yes. The RBD path makes a ctypes
    callback at open (the diff iteration), which libffi must build without a W+X mapping."""
    sock = tmp_path / "nbd.sock"
    launch = [sys.executable, "-c", DENY_WRITE_EXECUTE]
    probe = "import mmap\ntry:\n    mmap.mmap(-1, 4096, prot=7)\nexcept OSError:\n    print('denied')\n"
    denied = subprocess.run([*launch, "-c", probe], capture_output=True, text=True, check=True)
    assert denied.stdout.strip() == "denied", denied  # the switch is on in what it starts
    args = serve_args(ceph_cluster, image_name("mdwe"), sock)
    with vblk_process(tmp_path, "v", *args, python=launch) as proc:
        await wait_serving(proc, sock, tmp_path / "v.log")
        script = "h = nbd.NBD()\nh.connect_uri(uri)\nh.pwrite(b'x' * 65536, 0)\nh.flush()\n"
        script += "assert h.pread(65536, 0) == b'x' * 65536\n"
        await nbdsh(f"nbd+unix:///d?socket={sock}", script)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0, (tmp_path / "v.log").read_text()[-2000:]  # and it stopped cleanly


@pytest.mark.parametrize("cache", CACHE_MODES)
@pytest.mark.expect_errors("disk_open_failed")
async def test_failover_take_over_keeps_every_flushed_write(ceph_cluster: Cluster, cache: str) -> None:
    """vblk A serves and is SIGKILLed mid-stream; B refuses, then takes over; nothing flushed is lost.

    With ``cache=writeback`` A's acknowledged but unflushed writes may die with it; the flushed
    ones may not.
    """
    image = image_name("failover")
    blocks = 2048  # 8 MiB of 4 KiB blocks, rewritten in rounds
    with tempfile.TemporaryDirectory(prefix="vblk-") as tmp:
        d = Path(tmp)
        sock_a, sock_b = d / "a.sock", d / "b.sock"
        with vblk_process(d, "a", *serve_args(ceph_cluster, image, sock_a, cache=cache)) as a:
            await wait_serving(a, sock_a, d / "a.log")
            address_a = await asyncio.to_thread(watcher_address, ceph_cluster, image)
            uri = f"nbd+unix:///d?socket={sock_a}"
            prelude = "import nbd, sys, errno\nuri = sys.argv[1]\n"
            writer = await asyncio.create_subprocess_exec(
                "/usr/bin/python3", "-c", prelude + WRITER, uri, str(blocks),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            assert writer.stdout is not None
            flushed = 0
            try:
                while flushed < 3000:  # a few rounds over the blocks, then kill mid-stream
                    line = await asyncio.wait_for(writer.stdout.readline(), 30)
                    assert line, "the writer stopped"
                    flushed = int(line)
                os.killpg(a.pid, signal.SIGKILL)
                a.wait()
                rest = await asyncio.wait_for(writer.stdout.read(), 30)
                for line in rest.split():  # flushes acknowledged just before the kill
                    flushed = int(line)
            finally:
                if writer.returncode is None:
                    writer.kill()
                await writer.wait()
        # B without --take-over: the dead A still owns the lock, so B refuses and exits.
        with vblk_process(d, "b0", *serve_args(ceph_cluster, image, sock_b)) as b0:
            returncode = await asyncio.to_thread(b0.wait, 30)
            assert returncode == 1
            assert "in use by" in (d / "b0.log").read_text()
        with vblk_process(d, "b", *serve_args(ceph_cluster, image, sock_b), "--take-over") as b:
            await wait_serving(b, sock_b, d / "b.log")
            script = f"done = {flushed}\nblocks = {blocks}\n" + CHECKER
            checked = await nbdsh(f"nbd+unix:///d?socket={sock_b}", script)
            assert checked.stdout.startswith("0 "), f"flushed writes lost after {flushed}: {checked.stdout}"
            blocklist = await asyncio.to_thread(ceph_cluster.ceph, "osd", "blocklist", "ls")
            assert address_a in blocklist.split(), (address_a, blocklist)  # A's client is fenced
            assert "rbd_lock_break" in (d / "b.log").read_text()


async def test_least_privilege_user_of_the_deploy_recipe_serves_and_takes_over(
    ceph_cluster: Cluster, tmp_path: Path
) -> None:
    """deploy/ceph/README.md's cephx user (``profile rbd``, no admin key) is enough to create,
    serve, and take over a dead owner's image, blocklisting it."""
    keyring = tmp_path / "ceph.client.vblkuser.keyring"
    await asyncio.to_thread(
        ceph_cluster.ceph, "auth", "get-or-create", "client.vblkuser",
        "mon", "profile rbd", "osd", f"profile rbd pool={ceph_cluster.pool}", "-o", str(keyring),
    )  # fmt: skip
    image = image_name("cephx")
    user = ["--ceph-id", "vblkuser", "--ceph-keyring", str(keyring)]
    sock_a, sock_b = tmp_path / "a.sock", tmp_path / "b.sock"
    with vblk_process(tmp_path, "a", *serve_args(ceph_cluster, image, sock_a), *user) as a:
        await wait_serving(a, sock_a, tmp_path / "a.log")
        address_a = await asyncio.to_thread(watcher_address, ceph_cluster, image)
        script = "h = nbd.NBD()\nh.connect_uri(uri)\nh.pwrite(b'u' * 4096, 0)\nh.flush()\n"
        await nbdsh(f"nbd+unix:///d?socket={sock_a}", script)
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
    args_b = [*serve_args(ceph_cluster, image, sock_b), *user, "--take-over"]
    with vblk_process(tmp_path, "b", *args_b) as b:
        await wait_serving(b, sock_b, tmp_path / "b.log")
        script = "h = nbd.NBD()\nh.connect_uri(uri)\nassert h.pread(4096, 0) == b'u' * 4096\n"
        await nbdsh(f"nbd+unix:///d?socket={sock_b}", script)
        blocklist = await asyncio.to_thread(ceph_cluster.ceph, "osd", "blocklist", "ls")
        assert address_a in blocklist.split(), (address_a, blocklist)


def watcher_address(cluster: Cluster, image: str) -> str:
    """The address of the one client watching ``image`` (its owner, as the blocklist names it)."""
    watchers = json.loads(cluster.rbd("status", "--format", "json", f"{cluster.pool}/{image}"))["watchers"]
    assert len(watchers) == 1, watchers
    address: str = watchers[0]["address"]
    return address


FENCED = """
import time
h = nbd.NBD()
h.connect_uri(uri)
started = time.monotonic()
outcome = []
for step in (lambda: h.pwrite(b"\\x0f" * 4096, 8192), h.flush):
    try:
        step()
        outcome.append("ok")
    except nbd.Error as e:
        outcome.append(errno.errorcode.get(e.errno, str(e.errno)) if isinstance(e.errno, int) else e.errno)
print(json.dumps({"outcome": outcome, "seconds": time.monotonic() - started}))
"""


async def test_take_over_fences_a_live_owner(ceph_cluster: Cluster, tmp_path: Path) -> None:
    """B takes over while A still runs (a partition, a hung host): A is blocklisted, so its next
    write and FLUSH fail with EIO, A itself goes on running, and B has what A flushed."""
    image = image_name("fence")
    sock_a, sock_b = tmp_path / "a.sock", tmp_path / "b.sock"
    uri_a, uri_b = f"nbd+unix:///d?socket={sock_a}", f"nbd+unix:///d?socket={sock_b}"
    with vblk_process(tmp_path, "a", *serve_args(ceph_cluster, image, sock_a)) as a:
        await wait_serving(a, sock_a, tmp_path / "a.log")
        address_a = await asyncio.to_thread(watcher_address, ceph_cluster, image)
        await nbdsh(uri_a, "h = nbd.NBD()\nh.connect_uri(uri)\nh.pwrite(b'A' * 4096, 0)\nh.flush()\n")
        with vblk_process(tmp_path, "b", *serve_args(ceph_cluster, image, sock_b), "--take-over") as b:
            await wait_serving(b, sock_b, tmp_path / "b.log")
            blocklist = await asyncio.to_thread(ceph_cluster.ceph, "osd", "blocklist", "ls")
            assert address_a in blocklist.split(), (address_a, blocklist)
            fenced = await nbdsh(uri_a, "import json\n" + FENCED)
            result = json.loads(fenced.stdout)
            assert result["outcome"] == ["EIO", "EIO"], result
            assert result["seconds"] < 20, result
            assert a.poll() is None  # A serves on (its writes fail), it does not crash
            script = "h = nbd.NBD()\nh.connect_uri(uri)\nassert h.pread(4096, 0) == b'A' * 4096\n"
            script += "assert h.pread(4096, 8192) == bytes(4096)\n"  # A's fenced write never landed
            script += "h.pwrite(b'B' * 4096, 0)\nh.flush()\n"
            await nbdsh(uri_b, script)


DYING = """
import time
h = nbd.NBD()
h.connect_uri(uri)
h.pwrite(b"\\x01" * 65536, 0)
h.flush()
print("ready", flush=True)
sys.stdin.readline()
started = time.monotonic()
cookies = []
mark = None
# 32 writes in flight all along. At the 256th (224 done: writes reach the OSD) the test kills the
# cluster, and the writer goes on for 1.5 s after that, so the kill lands among its writes.
while mark is None or time.monotonic() - mark < 1.5:
    while h.aio_in_flight() < 32:
        cookies.append(h.aio_pwrite(b"\\x02" * 65536, (len(cookies) % 64) * 65536))
        if len(cookies) == 256:
            print("writing", flush=True)  # the test kills the cluster now
            mark = time.monotonic()
    h.poll(-1)
def name(e):
    return errno.errorcode.get(e.errno, str(e.errno)) if isinstance(e.errno, int) else e.errno
errors = []
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    try:
        h.aio_command_completed(c)
    except nbd.Error as e:
        errors.append(name(e))
flushes = []
for _ in range(2):
    try:
        h.flush()
        flushes.append("ok")
    except nbd.Error as e:
        flushes.append(name(e))
try:
    h.pread(65536, 0)  # on the dead cluster's OSD (librbd skips objects it knows do not exist)
    read = "ok"
except nbd.Error as e:
    read = name(e)
print(json.dumps({"seconds": time.monotonic() - started, "writes": len(cookies), "errors": errors,
                  "flushes": flushes, "read": read}), flush=True)
"""


@pytest.fixture
def dying_cluster() -> Iterator[Cluster]:
    cluster = Cluster(client_timeout=3)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.mark.parametrize("cache", CACHE_MODES)
async def test_cluster_dying_mid_write_is_eio_not_a_hang(dying_cluster: Cluster, cache: str) -> None:
    """Writes in flight when the cluster dies fail with EIO (with the writeback cache they may be
    acknowledged from the cache instead), and then every FLUSH fails: the data is not on the cluster.
    """
    image = image_name("dying")
    with tempfile.TemporaryDirectory(prefix="vblk-") as tmp:
        d = Path(tmp)
        sock, http = d / "nbd.sock", d / "http.sock"
        args = serve_args(dying_cluster, image, sock, "--http-socket", str(http), cache=cache)
        args[args.index("--ceph-timeout") + 1] = "3"
        with vblk_process(d, "v", *args) as v:
            await wait_serving(v, sock, d / "v.log")
            prelude = "import nbd, sys, errno, json\nuri = sys.argv[1]\n"
            client = await asyncio.create_subprocess_exec(
                "/usr/bin/python3", "-c", prelude + DYING, f"nbd+unix:///d?socket={sock}",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert client.stdin is not None and client.stdout is not None
            try:
                assert (await asyncio.wait_for(client.stdout.readline(), 30)).strip() == b"ready"
                client.stdin.write(b"go\n")
                await client.stdin.drain()
                assert (await asyncio.wait_for(client.stdout.readline(), 30)).strip() == b"writing"
                await asyncio.to_thread(dying_cluster.kill)  # with 32 writes in flight
                result = json.loads(await asyncio.wait_for(client.stdout.readline(), 40))
            finally:
                if client.returncode is None:
                    client.kill()
                await client.wait()
            assert result["writes"] >= 256, result  # writes were flowing when the cluster died
            if cache == "none":
                assert result["errors"], result  # the writes in flight and after failed...
            assert set(result["errors"]) <= {"EIO"}, result  # ...with EIO
            assert result["flushes"] == ["EIO", "EIO"], result  # and no FLUSH succeeds after them
            if cache == "none":  # (the writeback cache may hold the block)
                assert result["read"] == "EIO", result  # nor does a read the OSD has to serve
            assert result["seconds"] < 25, result
            # REST: a JSON 5xx for a write, and for a read the OSD has to serve, in bounded time.
            requests = [("PUT", "http://vblk/v1/disks/d/sectors/8", ["--data-binary", "x" * 512])]
            if cache == "none":
                requests.append(("GET", "http://vblk/v1/disks/d/sectors/0?count=8", []))
            for method, url, data in requests:
                started = time.monotonic()
                out = await run(
                    "curl", "-sS", "--max-time", "30", "--unix-socket", str(http), "-X", method, *data,
                    "-o", str(d / "body.json"), "-w", "%{http_code}", url,
                )  # fmt: skip
                body = json.loads((d / "body.json").read_text())
                status = int(out.stdout)
                assert 500 <= status < 600 and body["error"] == "io_error", (method, status, body)
                assert time.monotonic() - started < 25
            # /metrics says so: the disk refuses every FLUSH until vblk restarts.
            out = await run(
                "curl", "-sS", "--max-time", "10", "--unix-socket", str(http), "http://vblk/metrics"
            )
            assert parse(out.stdout)[("vblk_rbd_write_failed", (("disk", "d"),))] == 1
            assert v.poll() is None  # the service itself goes on


@pytest.mark.expect_errors("rbd_completion_failed", "flush_failed")
async def test_a_completion_that_cannot_be_booked_is_eio_and_the_rest_of_its_batch_goes_on(
    nbd_rig: NbdRig,
) -> None:
    backend = rbd_backend(nbd_rig.service)
    disk = nbd_rig.service.disks["disk0"].bytes
    armed = False

    class BrokenOnce(AllocationMap):
        """Once armed, the allocation map fails to book the first write it is told of."""

        def set(self, start: int, end: int, state: int) -> None:
            nonlocal armed
            if armed:
                armed = False
                raise RuntimeError("injected bookkeeping failure")
            super().set(start, end, state)

    await disk.discard(0, 1 * MiB)
    backend._map = BrokenOnce(backend.size, backend._map.runs(), backend._map.block)
    armed = True
    results = await asyncio.wait_for(  # a stranded completion would hang here
        asyncio.gather(
            *(disk.write(i * 4096, bytes([i + 1]) * 4096) for i in range(16)), return_exceptions=True
        ),
        30,
    )
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert len(failed) == 1 and isinstance(results[failed[0]], BlkIOError), results
    for i in range(len(results)):  # every other write of the batch completed and landed
        if i not in failed:
            assert await disk.read(i * 4096, 4096) == bytes([i + 1]) * 4096
    # The failed write's range counts as data, and no FLUSH reports success after it.
    assert not any(e.hole for e in backend.extents(failed[0] * 4096, 4096))
    with pytest.raises(BlkIOError):
        await disk.flush()
    assert nbd_rig.service.disks["disk0"].driver.ready  # the disk serves on


# -- the Ceph dashboard against a real Prometheus ----------------------------------------------------

CEPH_DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "vblk-ceph.json"


async def test_ceph_dashboard_queries_return_data_from_a_real_prometheus(nbd_rig: NbdRig) -> None:
    """deploy/grafana's vblk-ceph.json: well-formed, every query has data while an RBD disk is
    under load, and with vblk.json it covers every metric vblk exports."""
    board = json.loads(CEPH_DASHBOARD.read_text())
    assert board["id"] is None and board["uid"] == "vblk-ceph" and "__inputs" not in board
    panels = list(all_panels(board["panels"]))
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
    job = {
        "job_name": "vblk",
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "static_configs": [{"targets": [nbd_rig.http]}],
    }
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": [job]}
    fio = await asyncio.create_subprocess_exec(
        tool("fio"), "--name=rbd", "--ioengine=nbd", f"--uri={nbd_rig.uri()}", "--rw=randrw",
        "--bs=4k", "--iodepth=8", "--size=16M", "--time_based", "--runtime=60",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="vblk-prometheus-") as directory:
            async with prometheus(config, Path(directory)) as base, aiohttp.ClientSession() as http:
                await wait_for_scrapes(http, base, 3)  # under load
                assert fio.returncode is None, "fio stopped early"
                empty = await panels_without_data(http, base, board)
                assert not empty, "panels without data:\n" + "\n".join(empty)
                disks = await query(http, base, "vblk_rbd_write_failed")
                assert {s["metric"]["disk"] for s in disks} == {"disk0", "ro"}
                uncovered = await metrics_on_no_panel(http, nbd_rig, DASHBOARD, CEPH_DASHBOARD)
                assert not uncovered, f"metrics on no panel: {uncovered}"
    finally:
        if fio.returncode is None:
            fio.terminate()
        await fio.wait()


async def test_an_rbd_disk_added_resized_and_removed_live(ceph_cluster: Cluster, tmp_path: Path) -> None:
    """POST /v1/disks makes and hot-plugs an RBD disk; it is served, grows live (the image too),
    and after DELETE its image holds what was written and is free for another client."""
    name = image_name("live")
    template = DiskSpec(ceph=ceph_options(ceph_cluster))
    async with (
        serving(DiskSpec(name="disk0", backend="memory", size=4 * MiB), disk_template=template) as rig,
        aiohttp.ClientSession() as http,
    ):
        body = {"name": "r", "backend": "rbd", "image": name, "size": "16M", "create": True}
        async with http.post(f"{rig.base_url}/v1/disks", json=body) as r:
            assert r.status == 201, await r.text()
        listing = json.loads((await run("nbdinfo", "--json", "--list", rig.uri(""))).stdout)
        assert sorted(e["export-name"] for e in listing["exports"]) == ["disk0", "r"]
        await run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 1M 1M", rig.uri("r"))
        async with http.patch(f"{rig.base_url}/v1/disks/r", json={"op": "resize", "size": "32M"}) as r:
            assert r.status == 200, await r.text()
        await run("qemu-io", "-f", "raw", "-c", "write -P 0x3d 30M 1M", rig.uri("r"))
        async with http.delete(f"{rig.base_url}/v1/disks/r") as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["flushed"] is True
    exported = tmp_path / "export.img"
    await asyncio.to_thread(ceph_cluster.rbd, "export", f"rbd/{name}", str(exported))
    image = exported.read_bytes()
    assert len(image) == 32 * MiB
    assert image[1 * MiB : 2 * MiB] == b"\x3c" * MiB and image[30 * MiB : 31 * MiB] == b"\x3d" * MiB
