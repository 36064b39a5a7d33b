"""``/metrics``: each counter moves by exactly what a known workload does."""

from __future__ import annotations

import bisect

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from driver.blk import BlkIOError
from service.latency import LATENCY_BUCKETS, LatencyHistogram
from tests.service.conftest import NbdRig, nbdsh

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(rig: NbdRig, accept: str | None = None) -> tuple[Samples, str]:
    headers = {"Accept": accept} if accept else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{rig.base_url}/metrics", headers=headers) as r,
    ):
        assert r.status == 200
        text = await r.text()
        content_type = r.headers["Content-Type"]
    return parse(text), content_type


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by name and sorted labels."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


async def test_counters_follow_a_known_workload(nbd_rig: NbdRig) -> None:
    before, content_type = await scrape(nbd_rig)
    assert content_type.startswith("text/plain; version=0.0.4")
    script = """
h = nbd.NBD()
h.connect_uri(uri)
for i in range(10):
    h.pwrite(bytes([i]) * 4096, i * 4096)
h.flush()
for i in range(5):
    assert h.pread(4096, i * 4096) == bytes([i]) * 4096
h.shutdown()
"""
    await nbdsh(nbd_rig.uri(), script)
    driver = nbd_rig.service.disks["disk0"].driver
    with pytest.raises(BlkIOError):  # past the end: the device answers IOERR
        await driver.read(driver.capacity, 512)
    after, _ = await scrape(nbd_rig)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    disk = {"disk": "disk0"}
    assert delta("vblk_requests_total", op="write", status="ok", **disk) == 10
    assert delta("vblk_requests_total", op="read", status="ok", **disk) == 5
    assert delta("vblk_requests_total", op="flush", status="ok", **disk) == 1
    assert delta("vblk_requests_total", op="read", status="ioerr", **disk) == 1
    assert delta("vblk_written_bytes_total", **disk) == 10 * 4096
    assert delta("vblk_read_bytes_total", **disk) == 5 * 4096
    assert delta("vblk_virtio_request_duration_seconds_count", op="write", **disk) == 10
    assert delta("vblk_virtio_request_duration_seconds_count", op="read", **disk) == 6
    nbd = {"frontend": "nbd", **disk}
    assert delta("vblk_request_duration_seconds_count", op="write", **nbd) == 10
    assert delta("vblk_request_duration_seconds_count", op="read", **nbd) == 5
    assert delta("vblk_request_duration_seconds_count", op="flush", **nbd) == 1
    assert delta("vblk_nbd_connections_accepted_total") == 1
    assert value(after, "vblk_nbd_connections") == 0
    # Busy time grows, and the in-flight-weighted time at least as much (queue depth >= 1).
    busy = delta("vblk_io_time_seconds_total", **disk)
    weighted = delta("vblk_io_time_weighted_seconds_total", **disk)
    assert 0 < busy <= weighted
    # Idle: nothing in flight, every descriptor free.
    assert value(after, "vblk_virtqueue_depth", queue="0", **disk) == 0
    assert value(after, "vblk_requests_inflight", **disk) == 0
    size = value(after, "vblk_virtqueue_size", queue="0", **disk)
    assert size == 256 and value(after, "vblk_virtqueue_free_descriptors", queue="0", **disk) == size
    # Notifications: at most one kick per request; every interrupt the device raised on a queue
    # vector reached the driver.
    requests = 10 + 5 + 1 + 1
    kicks = delta("vblk_kicks_total", queue="0", **disk)
    assert 1 <= kicks <= requests
    assert kicks + delta("vblk_kicks_suppressed_total", queue="0", **disk) >= 1
    raised = delta("vblk_interrupts_total", vector="1", **disk)
    assert raised == delta("vblk_interrupts_received_total", queue="0", **disk) >= 1
    assert value(after, "vblk_disk_size_bytes", **disk) == 64 << 20
    assert value(after, "vblk_disk_read_only", disk="ro") == 1
    assert value(after, "vblk_disk_ready", **disk) == 1


async def test_http_requests_and_openmetrics(nbd_rig: NbdRig) -> None:
    before, _ = await scrape(nbd_rig)
    async with aiohttp.ClientSession(base_url=nbd_rig.base_url) as http:
        for _ in range(3):
            async with http.get("/healthz") as r:
                assert r.status == 200
        async with http.get("/v1/disks/nope/info") as r:
            assert r.status == 404
        async with http.put("/v1/disks/disk0/sectors/0", data=b"\1" * 1024) as r:
            assert r.status == 200
    after, content_type = await scrape(nbd_rig, accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("vblk_http_requests_total", route="/healthz", method="GET", status="200") == 3
    assert delta("vblk_http_requests_total", route="/v1/disks/{name}/info", method="GET", status="404") == 1
    assert delta("vblk_http_requests_total", route="/metrics", method="GET", status="200") == 1
    http_writes = {"disk": "disk0", "op": "write", "frontend": "http"}
    assert delta("vblk_request_duration_seconds_count", **http_writes) == 1
    assert delta("vblk_written_bytes_total", disk="disk0") == 1024
    assert total(after, "vblk_build_info") == 1


@given(st.floats(min_value=0, max_value=100, allow_nan=False))
def test_latency_histogram_buckets_as_bisect_left(seconds: float) -> None:
    """An observation lands in the first bucket whose bound is at least it (``le``), else +Inf."""
    histogram = LatencyHistogram()
    histogram.observe(seconds)
    [index] = [i for i, n in enumerate(histogram.counts) if n]
    assert index == bisect.bisect_left(LATENCY_BUCKETS, seconds)
    assert histogram.count == 1 and histogram.sum == seconds
