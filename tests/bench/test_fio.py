"""bench/fio.py: fio's JSON report read into a run's figures, and the job command lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.common import MiB
from bench.fio import fio_command, parse_fio, rbd_fio_command
from bench.model import WORKLOADS, RunResult, Workload

DATA = Path(__file__).parent / "data"
WORKLOAD = {w.key: w for w in WORKLOADS}


def report(name: str) -> dict[str, Any]:
    """A report fio 3.33 wrote (``--group_reporting --output-format=json``, against nbdkit memory)."""
    loaded: dict[str, Any] = json.loads((DATA / f"fio-{name}.json").read_text())
    return loaded


def test_random_read_report() -> None:
    figures = parse_fio(report("randread"), WORKLOAD["randread-4k-qd16"])
    assert figures["iops"] == pytest.approx(37900.0999)
    assert figures["bw_mib_s"] == pytest.approx(155238809 / MiB)
    assert figures["io_bytes"] == 155394048
    assert figures["total_ios"] == 37938
    assert figures["clat_mean_us"] == pytest.approx(404.431962201)  # ns in the report, µs here
    assert figures["clat_p50_us"] == pytest.approx(391.168)
    assert figures["clat_p90_us"] == pytest.approx(460.8)
    assert figures["clat_p99_us"] == pytest.approx(1384.448)
    assert figures["clat_p999_us"] == pytest.approx(4882.432)
    assert figures["clat_max_us"] == pytest.approx(6682.982)
    assert figures["fio_error"] == 0
    # the figures are RunResult fields, and kIOPS derives from them
    result = RunResult("vblk", "randread-4k-qd16", 0, [], 1.0, **figures)
    assert result.metric("kiops") == pytest.approx(37.9000999)


def test_a_write_job_is_read_from_the_write_side() -> None:
    """Two jobs grouped (--numjobs=2 --group_reporting): one entry, the write side's figures."""
    data = report("write")
    assert len(data["jobs"]) == 1 and data["jobs"][0]["read"]["io_bytes"] == 0
    figures = parse_fio(data, WORKLOAD["write-1m-qd4"])
    assert figures["iops"] == pytest.approx(2969.215492)
    assert figures["io_bytes"] == 3135242240
    assert figures["total_ios"] == 2990
    assert figures["clat_p99_us"] == pytest.approx(13697.024)


def test_missing_latency_figures_are_none_or_zero() -> None:
    bare = {"jobs": [{"read": {"iops": 10, "bw_bytes": MiB, "io_bytes": 4096, "total_ios": 1}}]}
    figures = parse_fio(bare, WORKLOAD["randread-4k-qd1"])
    assert figures["bw_mib_s"] == 1.0
    assert figures["clat_p99_us"] is None and figures["clat_p50_us"] is None
    assert figures["clat_mean_us"] == 0.0 and figures["fio_error"] == 0
    with pytest.raises(KeyError):
        parse_fio({"jobs": [{"read": {}}]}, WORKLOAD["randread-4k-qd1"])


def test_fio_command_line(tmp_path: Path) -> None:
    workload = Workload("w", "w", "fio", ("kiops",), "randread", 4096, 16, numjobs=4)
    command = fio_command(workload, "nbd://127.0.0.1:1/disk0", 1.5, 0, tmp_path / "out.json")
    assert command[0] == "fio"
    for arg in (
        "--ioengine=nbd",
        "--uri=nbd://127.0.0.1:1/disk0",
        "--rw=randread",
        "--bs=4096",
        "--iodepth=16",
        "--numjobs=4",
        "--group_reporting",
        "--runtime=1.5",
        "--ramp_time=0",
        "--output-format=json",
        f"--output={tmp_path / 'out.json'}",
    ):
        assert arg in command
    rbd = rbd_fio_command(workload, 1.5, 0, tmp_path / "out.json")
    assert "--ioengine=rbd" in rbd and "--ioengine=nbd" not in rbd
    assert not any(arg.startswith("--uri=") for arg in rbd)
    assert "--pool=rbd" in rbd and "--rbdname=bench" in rbd
