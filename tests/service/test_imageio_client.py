"""ovirt-imageio's client (``ovirt_imageio.client``) against vblk's REST API.

The real client, as oVirt backup and upload tools run it: it reads OPTIONS (features,
max_readers, max_writers, unix_socket), sizes the disk from ``/extents``, reads with ranged
GETs, writes with ``PUT`` + ``Content-Range`` (``?flush=n``), zeroes with ``PATCH``, flushes
at the end, and spreads the copy over several connections. Its local side is qemu-nbd and
qemu-img. It is synchronous: it runs in a thread while the service serves on the loop.
"""

from __future__ import annotations

import asyncio
import errno
import os
import ssl
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from ovirt_imageio import client  # type: ignore[import-untyped]
from ovirt_imageio._internal import errors as imageio_errors  # type: ignore[import-untyped]
from structlog.testing import capture_logs

from service.app import Service
from service.model import DiskSpec, SecurityConfig, ServiceConfig
from tests.reliability.test_security import make_pki
from tests.service.conftest import MiB, NbdRig, run, serving

KiB = 1 << 10
SIZE = 16 * MiB
CHUNK = 128 * KiB
STRIDE = 512 * KiB  # data, then a hole, every STRIDE: 32 data extents to spread over workers
WORKERS = 4


def _data_offsets() -> list[int]:
    return list(range(0, SIZE, STRIDE))


def file_data_ranges(path: Path) -> list[tuple[int, int]]:
    """The allocated ``[start, end)`` ranges of a file (SEEK_DATA / SEEK_HOLE)."""
    ranges: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        position = 0
        while position < size:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, end))
            position = end
    finally:
        os.close(fd)
    return ranges


def disk_data_ranges(rig: NbdRig, name: str = "disk0") -> list[tuple[int, int]]:
    """The allocated ranges of a vblk disk, from its allocation map (merged)."""
    ranges: list[tuple[int, int]] = []
    disk = rig.service.disks[name].bytes
    for extent in disk.extents(0, disk.size):
        if extent.hole:
            continue
        end = extent.offset + extent.length
        if ranges and ranges[-1][1] == extent.offset:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((extent.offset, end))
    return ranges


def requests(logs: list[MutableMapping[str, Any]], *methods: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "http_request" and e["method"] in methods]


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """vblk's log events, with the per-request context (``peer``) merged in."""
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as entries:
        yield entries


async def test_options_say_what_the_client_looks_for(logs: list[MutableMapping[str, Any]]) -> None:
    async with serving(
        DiskSpec(name="disk0", backend="memory", size=SIZE),
        DiskSpec(name="ro", backend="memory", size=MiB, read_only=True),
    ) as rig:

        def inspect() -> tuple[int, int, int, list[Any]]:
            with client.ImageioClient(f"{rig.base_url}/v1/disks/disk0", secure=False) as c:
                c.write(1000, b"\x55" * 3000)  # PUT with Content-Range, unaligned
                c.zero(2000, 1000)  # PATCH zero
                c.flush()  # PATCH flush
                buffer = bytearray(4096)
                c.read(0, buffer)
                assert buffer == bytes(1000) + b"\x55" * 1000 + bytes(1000) + b"\x55" * 1000 + bytes(96)
                size = c.size()
            with client.ImageioClient(f"{rig.base_url}/v1/disks/disk0", secure=False) as c:
                return c.max_readers, c.max_writers, size, list(c.extents())  # the client caches them

        max_readers, max_writers, size, extents = await asyncio.to_thread(inspect)
        assert (max_readers, max_writers) == (8, 8)
        assert size == SIZE
        assert extents[0].start == 0 and extents[-1].start + extents[-1].length == SIZE
        assert not extents[0].zero and extents[-1].zero
        puts = requests(logs, "PUT")
        assert puts and all(e["path"].endswith("?flush=n") and e["status"] == 200 for e in puts)
        assert [e["status"] for e in requests(logs, "PATCH")] == [200, 200]

        def read_only() -> list[Any]:
            with client.ImageioClient(f"{rig.base_url}/v1/disks/ro", secure=False) as c:
                return list(c.extents())

        assert [(e.start, e.length, e.zero) for e in await asyncio.to_thread(read_only)] == [(0, MiB, True)]


async def test_parallel_download_keeps_the_data_and_the_holes(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    async with serving(DiskSpec(name="disk0", backend="memory", size=SIZE)) as rig:
        disk = rig.service.disks["disk0"].bytes
        for offset in _data_offsets():
            await disk.write(offset, os.urandom(CHUNK))
        expected = await disk.read(0, SIZE)
        target = tmp_path / "download.raw"
        await asyncio.to_thread(
            client.download,
            f"{rig.base_url}/v1/disks/disk0",
            str(target),
            None,  # cafile: plain http needs none
            fmt="raw",
            max_workers=WORKERS,
        )
        assert target.read_bytes() == expected
        # Sparse: the client skipped vblk's holes, so the file has data exactly where the disk has.
        assert file_data_ranges(target) == disk_data_ranges(rig)
        assert len(file_data_ranges(target)) == SIZE // STRIDE
        # In parallel: the ranged GETs came over several connections (peers), at most one per worker.
        gets = requests(logs, "GET")
        data_gets = [e for e in gets if e["route"] == "/v1/disks/{name}"]
        assert all(e["status"] == 206 for e in data_gets)
        peers = {e["peer"] for e in data_gets}
        assert 2 <= len(peers) <= WORKERS, peers
        assert all(e["peer"].startswith("127.0.0.1:") for e in data_gets)
        # qcow2 too (the client's default format), compared by qemu-img against the raw copy.
        qcow2 = tmp_path / "download.qcow2"
        await asyncio.to_thread(
            client.download, f"{rig.base_url}/v1/disks/disk0", str(qcow2), None, max_workers=WORKERS
        )
        await run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(target), str(qcow2))


async def test_parallel_upload_writes_the_data_and_punches_the_holes(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    source = tmp_path / "upload.raw"
    with open(source, "wb") as f:
        f.truncate(SIZE)
        for offset in _data_offsets():
            f.seek(offset + CHUNK)  # data in the second chunk of each stride: holes at 0 and the end
            f.write(os.urandom(CHUNK))
    expected = source.read_bytes()
    async with serving(DiskSpec(name="disk0", backend="memory", size=SIZE)) as rig:
        disk = rig.service.disks["disk0"].bytes
        await disk.write(0, b"\xaa" * SIZE)  # every byte written: the upload must zero the holes
        await asyncio.to_thread(
            client.upload, str(source), f"{rig.base_url}/v1/disks/disk0", None, max_workers=WORKERS
        )
        assert await disk.read(0, SIZE) == expected
        assert disk_data_ranges(rig) == file_data_ranges(source)  # zeroed with unmap: holes again
        writes = requests(logs, "PUT", "PATCH")
        assert writes and all(e["status"] == 200 for e in writes), [e for e in writes if e["status"] != 200]
        assert len([e for e in writes if e["method"] == "PUT"]) == SIZE // STRIDE
        peers = {e["peer"] for e in writes}
        assert 2 <= len(peers) <= WORKERS, peers


async def test_incremental_download_is_refused_cleanly(tmp_path: Path) -> None:
    """No dirty tracking: ``extents?context=dirty`` is 404, which the client turns into
    UnsupportedOperation (a 200 with zero extents made it fail with a KeyError)."""
    async with serving(DiskSpec(name="disk0", backend="memory", size=SIZE)) as rig:
        url = f"{rig.base_url}/v1/disks/disk0"

        def dirty() -> None:
            with client.ImageioClient(url, secure=False) as c:
                list(c.extents("dirty"))

        with pytest.raises(imageio_errors.UnsupportedOperation, match="dirty"):
            await asyncio.to_thread(dirty)
        with pytest.raises(imageio_errors.UnsupportedOperation):
            await asyncio.to_thread(
                client.download, url, str(tmp_path / "incremental.qcow2"), None, incremental=True
            )


async def test_a_local_client_moves_to_the_unix_socket(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    """OPTIONS over TCP names the unix socket; the client's transfer connections use it."""
    async with serving(DiskSpec(name="disk0", backend="memory", size=SIZE), http_unix=True) as rig:
        disk = rig.service.disks["disk0"].bytes
        await disk.write(3 * MiB, os.urandom(CHUNK))
        expected = await disk.read(0, SIZE)
        target = tmp_path / "download.raw"
        await asyncio.to_thread(
            client.download, f"{rig.base_url}/v1/disks/disk0", str(target), None, fmt="raw", max_workers=2
        )
        assert target.read_bytes() == expected
        options = requests(logs, "OPTIONS")
        assert options and options[0]["peer"].startswith("127.0.0.1:")
        data_gets = [e for e in requests(logs, "GET") if e["route"] == "/v1/disks/{name}"]
        assert data_gets and all(e["peer"] == "unix" for e in data_gets), data_gets


async def test_https_with_the_ca_file(tmp_path: Path) -> None:
    """Over HTTPS the client verifies vblk's certificate against ``cafile`` (and the host name
    with ``secure=True``, its default); without the CA it refuses to connect."""
    await make_pki(tmp_path)
    service = Service(
        ServiceConfig(
            disks=(DiskSpec(name="disk0", backend="memory", size=SIZE),),
            guest_memory=64 * MiB,
            nbd_listen=(),
            http_listen=("127.0.0.1:0",),
            security=SecurityConfig(
                tls_cert=tmp_path / "server-cert.pem", tls_key=tmp_path / "server-key.pem", http_tls=True
            ),
        )
    )
    await service.start()
    try:
        await service.start_front_ends()
        disk = service.disks["disk0"].bytes
        await disk.write(MiB, os.urandom(CHUNK))
        url = f"https://{service.http_addresses[0]}/v1/disks/disk0"
        target = tmp_path / "download.raw"
        ca = str(tmp_path / "ca-cert.pem")
        await asyncio.to_thread(client.download, url, str(target), ca, fmt="raw", max_workers=WORKERS)
        assert target.read_bytes() == await disk.read(0, SIZE)
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(client.download, url, str(tmp_path / "refused.raw"), None, fmt="raw")
    finally:
        await service.stop()
