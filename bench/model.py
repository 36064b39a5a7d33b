"""What the harness measures and records: workloads, metrics, the RBD contenders, one run's figures.

Plain data at the bottom of bench/, beside common.py: fio.py makes jobs of it, report.py reads it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from bench.common import KiB, MiB

Metric = Literal[
    "kiops",
    "iops",
    "bw_mib_s",
    "clat_mean_us",
    "clat_p99_us",
    "cpu_s_per_gib",
    "kicks_per_req",
    "irqs_per_req",
]

METRIC_LABELS: dict[Metric, str] = {
    "kiops": "kIOPS",
    "iops": "IOPS",
    "bw_mib_s": "MiB/s",
    "clat_mean_us": "clat mean µs",
    "clat_p99_us": "clat p99 µs",
    "cpu_s_per_gib": "server CPU s/GiB",
    "kicks_per_req": "kicks/req",
    "irqs_per_req": "interrupts/req",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Workload:
    """One cell row: a fio job (``rw``, block size, depth, connections) or an nbdcopy of the image."""

    key: str
    title: str
    tool: Literal["fio", "nbdcopy"]
    shown: tuple[Metric, ...]
    rw: str = ""
    bs: int = 4 * KiB
    iodepth: int = 1
    numjobs: int = 1

    @property
    def writes(self) -> bool:
        return "write" in self.rw

    @property
    def direction(self) -> Literal["read", "write"]:
        return "write" if self.writes else "read"


WORKLOADS: tuple[Workload, ...] = (
    Workload("randread-4k-qd16", "4 KiB random read, QD16", "fio", ("kiops",), "randread", 4 * KiB, 16),
    Workload("randread-4k-qd32", "4 KiB random read, QD32", "fio", ("kiops",), "randread", 4 * KiB, 32),
    Workload("randwrite-4k-qd16", "4 KiB random write, QD16", "fio", ("kiops",), "randwrite", 4 * KiB, 16),
    Workload("read-1m-qd4", "1 MiB sequential read, QD4", "fio", ("bw_mib_s",), "read", MiB, 4),
    Workload("write-1m-qd4", "1 MiB sequential write, QD4", "fio", ("bw_mib_s",), "write", MiB, 4),
    Workload(
        "randread-4k-qd1",
        "4 KiB random read, QD1",
        "fio",
        ("iops", "clat_mean_us", "clat_p99_us"),
        "randread",
        4 * KiB,
        1,
    ),
    Workload(
        "randread-4k-4conn-qd16",
        "4 KiB random read, 4 conns x QD16",
        "fio",
        ("kiops",),
        "randread",
        4 * KiB,
        16,
        numjobs=4,
    ),
    Workload("nbdcopy-null", "nbdcopy whole image → null:", "nbdcopy", ("bw_mib_s",)),
)


@dataclasses.dataclass(slots=True)
class RunResult:
    """Every figure of one workload on one server in one round (None: not measured).

    ``server`` is the contender's label: ``vblk``, ``vblk@1a2b3c4``, ``nbdkit-file``, ``vblk-wb``.
    """

    server: str
    workload: str
    round: int
    command: list[str]
    elapsed_s: float
    iops: float | None = None
    bw_mib_s: float | None = None
    io_bytes: int = 0
    total_ios: int | None = None
    clat_mean_us: float | None = None
    clat_p50_us: float | None = None
    clat_p90_us: float | None = None
    clat_p99_us: float | None = None
    clat_p999_us: float | None = None
    clat_max_us: float | None = None
    server_cpu_s: float | None = None
    cpu_s_per_gib: float | None = None
    rss_kib: int | None = None
    hwm_kib: int | None = None
    kicks_per_req: float | None = None
    irqs_per_req: float | None = None
    fio_error: int | None = None
    error: str | None = None

    def metric(self, metric: Metric) -> float | None:
        if metric == "kiops":
            return None if self.iops is None else self.iops / 1000
        value = getattr(self, metric)
        return None if value is None else float(value)


# -- the Ceph RBD row (rbd.py) ---------------------------------------------------------------------

RBD_WORKLOADS: tuple[Workload, ...] = (
    Workload("rbd-randread-4k-qd32", "4 KiB random read, QD32", "fio", ("kiops",), "randread", 4 * KiB, 32),
    Workload(
        "rbd-randwrite-4k-qd32", "4 KiB random write, QD32", "fio", ("kiops",), "randwrite", 4 * KiB, 32
    ),
)
RBD_CACHES: dict[str, str] = {
    "none": "librbd cache off",
    "writeback": "librbd writeback cache (rbd_cache_policy=writeback, write-back from the first write)",
}
RBD_POOL = "rbd"
RBD_IMAGE = "bench"


@dataclasses.dataclass(frozen=True, slots=True)
class RbdContender:
    """One column of the RBD row: a tool and the librbd cache mode it runs with."""

    key: str  # the results' server name
    tool: str  # "vblk", "qemu-nbd" or "fio-rbd"
    cache: str  # a key of RBD_CACHES
    title: str


RBD_CONTENDERS: tuple[RbdContender, ...] = (
    RbdContender("vblk", "vblk", "none", "vblk (rbd backend, cache=none)"),
    RbdContender("qemu-nbd", "qemu-nbd", "none", "qemu-nbd (rbd driver, --cache=none)"),
    RbdContender("fio-rbd", "fio-rbd", "none", "fio --ioengine=rbd (rbd_cache=false)"),
    RbdContender("vblk-wb", "vblk", "writeback", "vblk (rbd backend, cache=writeback)"),
    RbdContender("qemu-nbd-wb", "qemu-nbd", "writeback", "qemu-nbd (rbd driver, --cache=writeback)"),
    RbdContender("fio-rbd-wb", "fio-rbd", "writeback", "fio --ioengine=rbd (rbd_cache=true)"),
)
RBD_TARGETS = {"qemu-nbd": 2.0, "fio-rbd": 0.7}  # vblk IOPS ÷ contender IOPS (same cache mode), at least
