"""Prometheus metrics for vblk: the rings, the device, the driver and the front ends.

Service layer. Most figures are read at scrape time from the counters the driver and the
device already keep (a custom collector: no work per request); only latency histograms and
HTTP request counts are observed per request. Names follow Prometheus conventions: prefix
``vblk_``, base units (seconds, bytes), ``_total`` for counters, small label sets. The
``io_time`` pair has node_exporter's disk semantics (``node_disk_io_time_seconds_total``,
``node_disk_io_time_weighted_seconds_total``), so familiar dashboards carry over.
"""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

import device.virtqueue
import driver.blk
import service.nbd.server
from device.block.throttle import DIRECTIONS
from service.latency import FrontendObserver, LatencyHistogram, VirtioObserver

if TYPE_CHECKING:
    from service.model import Disk
    from service.throttling import Throttling

# NBD connections: open now, accepted, refused; polls for a next request that found one, that did not.
NbdCounts = Callable[[], tuple[int, int, int, int, int]]

VERSION = importlib.metadata.version("vblk")  # pyproject.toml's, as installed


def compiled() -> bool:
    """Whether the request path runs compiled (setup.py builds it with mypyc by default)."""
    modules = (device.virtqueue, driver.blk, service.nbd.server)
    return all(not (m.__file__ or ".py").endswith(".py") for m in modules)


def allocator() -> str:
    """Which malloc this process runs: ``tcmalloc``, ``jemalloc`` or ``glibc``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc"


def _le(upper: float) -> str:
    """A bucket bound as Prometheus writes it (``0.0005``, ``1.0``, ``+Inf``)."""
    return "+Inf" if upper == math.inf else repr(float(upper))


class _HistogramCollector(Collector):
    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str],
        histograms: Mapping[Any, LatencyHistogram],
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = list(labels)
        self._histograms = histograms

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labels)
        for labels, histogram in sorted(self._histograms.items()):
            buckets = [(_le(upper), count) for upper, count in histogram.cumulative()]
            family.add_metric(list(labels), buckets, histogram.sum)
        yield family


class _DiskCollector(Collector):
    """Snapshots of every disk's driver and device counters, taken at scrape time."""

    def __init__(self, disks: Callable[[], Mapping[str, Disk]], nbd: NbdCounts) -> None:
        self._disks = disks
        self._nbd = nbd

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily: the disks exist only once the service has started

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily
        c = CounterMetricFamily
        size = g("vblk_disk_size_bytes", "Capacity of the disk", labels=["disk"])
        read_only = g("vblk_disk_read_only", "1 if the device offers VIRTIO_BLK_F_RO", labels=["disk"])
        ready = g("vblk_disk_ready", "1 while the device is DRIVER_OK and not NEEDS_RESET", labels=["disk"])
        q_size = g("vblk_virtqueue_size", "Descriptors in the virtqueue", labels=["disk", "queue"])
        q_depth = g("vblk_virtqueue_depth", "Chains in flight on the virtqueue", labels=["disk", "queue"])
        q_free = g("vblk_virtqueue_free_descriptors", "Free descriptors", labels=["disk", "queue"])
        kicks = c("vblk_kicks", "Notifications the driver sent the device", labels=["disk", "queue"])
        kicks_sup = c(
            "vblk_kicks_suppressed",
            "Notifications the driver skipped (avail_event / NO_NOTIFY said the device was busy)",
            labels=["disk", "queue"],
        )
        irq_received = c(
            "vblk_interrupts_received",
            "Used-buffer interrupts the driver handled",
            labels=["disk", "queue"],
        )
        irqs = c("vblk_interrupts", "Interrupts the device raised", labels=["disk", "vector"])
        irqs_sup = c(
            "vblk_interrupts_suppressed",
            "Interrupts the device skipped (used_event / NO_INTERRUPT)",
            labels=["disk", "vector"],
        )
        requests = c(
            "vblk_requests",
            "virtio-blk requests completed, by operation and status (ok, ioerr, unsupp, reset, ...)",
            labels=["disk", "op", "status"],
        )
        inflight = g(
            "vblk_requests_inflight", "virtio-blk requests submitted, not completed", labels=["disk"]
        )
        read_bytes = c("vblk_read_bytes", "Bytes read through the device", labels=["disk"])
        written_bytes = c("vblk_written_bytes", "Bytes written through the device", labels=["disk"])
        io_time = c("vblk_io_time_seconds", "Seconds with at least one request in flight", labels=["disk"])
        io_weighted = c(
            "vblk_io_time_weighted_seconds",
            "Integral of requests in flight over time (average queue size = its rate)",
            labels=["disk"],
        )
        resets = c("vblk_device_resets", "Device resets the driver performed to recover", labels=["disk"])
        resubmitted = c(
            "vblk_device_resubmitted",
            "Requests the driver submitted again after a recovery reset them (a back end that restarted)",
            labels=["disk"],
        )
        needs_reset = c("vblk_device_needs_reset", "Times the device set DEVICE_NEEDS_RESET", labels=["disk"])
        config_irqs = c("vblk_config_interrupts", "Configuration-change interrupts", labels=["disk"])
        rbd_inflight = g(
            "vblk_rbd_requests_inflight", "librbd aio requests started, not yet collected", labels=["disk"]
        )
        rbd_completed = c("vblk_rbd_requests_completed", "librbd aio requests collected", labels=["disk"])
        rbd_failed = g(
            "vblk_rbd_write_failed",
            "1 once a write, discard, write-zeroes or FLUSH failed: every FLUSH fails until restart",
            labels=["disk"],
        )
        bitmap_dirty = g(
            "vblk_bitmap_dirty_bytes",
            "Bytes of disk a dirty bitmap marks as written since it was made or cleared",
            labels=["disk", "bitmap"],
        )
        bitmap_recording = g(
            "vblk_bitmap_recording", "1 while the bitmap marks every write", labels=["disk", "bitmap"]
        )
        bitmap_inconsistent = g(
            "vblk_bitmap_inconsistent",
            "1 for a bitmap in use when its image was last closed (it may miss writes)",
            labels=["disk", "bitmap"],
        )
        view_scratch = g(
            "vblk_view_scratch_bytes",
            "Bytes of old data a point-in-time view's scratch file holds",
            labels=["disk", "view"],
        )
        view_limit = g(
            "vblk_view_scratch_limit_bytes", "The most its scratch file may hold", labels=["disk", "view"]
        )
        view_broken = g(
            "vblk_view_broken",
            "1 once the view broke (scratch full, a copy failed): its reads fail",
            labels=["disk", "view"],
        )
        for name, disk in self._disks().items():
            dirty = disk.bytes.dirty
            if dirty is not None and disk.spec.backend != "view":  # a view shows its source's
                for view in list(dirty.views.values()):
                    labels = [name, view.name]
                    view_scratch.add_metric(labels, view.scratch_bytes)
                    view_limit.add_metric(labels, view.limit)
                    view_broken.add_metric(labels, int(view.broken is not None))
                with dirty.lock:
                    for bitmap in dirty.bitmaps.values():
                        labels = [name, bitmap.name]
                        described = bitmap.describe()
                        bitmap_dirty.add_metric(labels, described["dirty_bytes"])
                        bitmap_recording.add_metric(labels, int(described["recording"]))
                        bitmap_inconsistent.add_metric(labels, int(bitmap.inconsistent))
            counters = disk.bytes.control.counters()  # the stack's own: RBD's when a node is RBD
            if "rbd_requests_inflight" in counters:
                rbd_inflight.add_metric([name], counters["rbd_requests_inflight"])
                rbd_completed.add_metric([name], counters["rbd_requests_completed"])
                rbd_failed.add_metric([name], counters["rbd_write_failed"])
            stats = disk.driver.statistics()
            device = disk.device.stats
            size.add_metric([name], disk.driver.size)
            read_only.add_metric([name], int(disk.driver.read_only))
            ready.add_metric([name], int(disk.driver.ready))
            for q in stats.queues:
                labels = [name, str(q.index)]
                q_size.add_metric(labels, q.size)
                q_depth.add_metric(labels, q.inflight)
                q_free.add_metric(labels, q.free_descriptors)
                kicks.add_metric(labels, q.kicks)
                kicks_sup.add_metric(labels, q.kicks_suppressed)
                irq_received.add_metric(labels, q.interrupts)
            for vector, (raised, suppressed) in sorted(device.interrupts_by_vector.items()):
                irqs.add_metric([name, str(vector)], raised)
                irqs_sup.add_metric([name, str(vector)], suppressed)
            for (op, status), count in sorted(stats.requests.items()):
                requests.add_metric([name, op, status], count)
            inflight.add_metric([name], stats.requests_inflight)
            read_bytes.add_metric([name], stats.bytes_read)
            written_bytes.add_metric([name], stats.bytes_written)
            io_time.add_metric([name], stats.io_time)
            io_weighted.add_metric([name], stats.io_time_weighted)
            resets.add_metric([name], stats.resets)
            resubmitted.add_metric([name], stats.resubmitted)
            needs_reset.add_metric([name], device.needs_reset)
            config_irqs.add_metric([name], stats.config_interrupts)
        yield from (size, read_only, ready, q_size, q_depth, q_free, kicks, kicks_sup, irq_received)
        yield from (irqs, irqs_sup, requests, inflight, read_bytes, written_bytes, io_time, io_weighted)
        yield from (
            resets,
            resubmitted,
            needs_reset,
            config_irqs,
            bitmap_dirty,
            bitmap_recording,
            bitmap_inconsistent,
        )
        yield from (view_scratch, view_limit, view_broken)
        if rbd_failed.samples:  # only where there are RBD disks (deploy/grafana's vblk-ceph.json shows them)
            yield from (rbd_inflight, rbd_completed, rbd_failed)
        current, total, refused_total, poll_hits, poll_misses = self._nbd()
        connections = g("vblk_nbd_connections", "NBD connections open now")
        connections.add_metric([], current)
        yield connections
        accepted = c("vblk_nbd_connections_accepted", "NBD connections accepted")
        accepted.add_metric([], total)
        yield accepted
        refused = c("vblk_nbd_connections_refused", "NBD connections closed at once: max-connections")
        refused.add_metric([], refused_total)
        yield refused
        polls = c(
            "vblk_nbd_polls",
            "busy polls for a client's next request (--nbd-poll-us), by whether one came in time",
            labels=["result"],
        )
        polls.add_metric(["hit"], poll_hits)
        polls.add_metric(["miss"], poll_misses)
        yield polls
        info = g(
            "vblk_build_info",
            "vblk version, and whether its request path is compiled",
            labels=["version", "compiled"],
        )
        info.add_metric([VERSION, str(compiled()).lower()], 1)
        yield info


class _ThrottleCollector(Collector):
    """The I/O limits in force on each throttled disk and what they held back."""

    def __init__(self, throttling: Callable[[], Throttling | None]) -> None:
        self._throttling = throttling

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        throttling = self._throttling()
        if throttling is None:
            return
        limit = GaugeMetricFamily(
            "vblk_throttle_limit",
            "An I/O limit in force on the disk's throttle group, by its key (iops-total, bps-read-max, ...)",
            labels=["disk", "group", "limit"],
        )
        waiting = GaugeMetricFamily(
            "vblk_throttle_waiting_requests", "Requests held by the I/O limits now", labels=["disk"]
        )
        throttled = CounterMetricFamily(
            "vblk_throttle_throttled_requests",
            "Requests that waited for the I/O limits, by direction",
            labels=["disk", "direction"],
        )
        seconds = CounterMetricFamily(
            "vblk_throttle_wait_seconds",
            "Time requests spent waiting for the I/O limits, by direction",
            labels=["disk", "direction"],
        )
        for disk, member in sorted(throttling.members.items()):
            group = member.group
            for key, value in sorted(group.limits.keys().items()):
                limit.add_metric([disk, group.name, key], value)
            waiting.add_metric([disk], member.waiting)
            for index, direction in enumerate(DIRECTIONS):
                throttled.add_metric([disk, direction], member.throttled[index])
                seconds.add_metric([disk, direction], member.throttled_seconds[index])
        yield from (limit, waiting, throttled, seconds)


class Metrics:
    """The service's registry (one per service, so tests can run several side by side)."""

    def __init__(
        self,
        disks: Callable[[], Mapping[str, Disk]],
        nbd: NbdCounts,
        throttling: Callable[[], Throttling | None] = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_DiskCollector(disks, nbd))
        self.registry.register(_ThrottleCollector(throttling))
        self.virtio_latency: dict[tuple[str, str], LatencyHistogram] = {}  # (disk, op)
        self.frontend_latency: dict[tuple[str, str, str], LatencyHistogram] = {}  # (disk, op, frontend)
        self._frontends: dict[str, FrontendObserver] = {}
        self.registry.register(
            _HistogramCollector(
                "vblk_virtio_request_duration_seconds",
                "Latency of one virtio-blk request, submit to used-ring completion (driver-observed)",
                ("disk", "op"),
                self.virtio_latency,
            )
        )
        self.registry.register(
            _HistogramCollector(
                "vblk_request_duration_seconds",
                "Latency of one front-end request (an NBD command, an HTTP request), by operation",
                ("disk", "op", "frontend"),
                self.frontend_latency,
            )
        )
        self.http_requests = Counter(
            "vblk_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )

    def virtio_observer(self, disk: str) -> VirtioObserver:
        """The driver's per-request hook for ``disk``."""
        return VirtioObserver(disk, self.virtio_latency)

    def forget(self, disk: str) -> None:
        """``disk`` is gone: its latency series go with it (the others are read off the disks)."""
        for key in [key for key in self.virtio_latency if key[0] == disk]:
            del self.virtio_latency[key]
        for key3 in [key3 for key3 in self.frontend_latency if key3[0] == disk]:
            del self.frontend_latency[key3]

    def frontend_observer(self, frontend: str) -> FrontendObserver:
        """A front end's per-request hook: its ``observe(disk, operation, seconds)``."""
        observer = self._frontends.get(frontend)
        if observer is None:
            observer = self._frontends[frontend] = FrontendObserver(frontend, self.frontend_latency)
        return observer

    def observe_request(self, frontend: str, disk: str, op: str, seconds: float) -> None:
        self.frontend_observer(frontend).observe(disk, op, seconds)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition in the format the scraper asked for (OpenMetrics or text 0.0.4)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
