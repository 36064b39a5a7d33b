"""The clients of the harness: fio job command lines, running fio, reading its JSON report; nbdcopy.

Sits between model.py (a :class:`~bench.model.Workload`) and the runners (nbd_compare.py, rbd.py),
which sample the server around :func:`run_fio`'s measured window.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bench.common import MiB
from bench.model import RBD_IMAGE, RBD_POOL, Workload


def fio_command(workload: Workload, uri: str, runtime: float, ramp: float, output: Path) -> list[str]:
    """The fio command line for one workload against one NBD URI (JSON written to ``output``)."""
    return [
        "fio",
        f"--name={workload.key}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={workload.rw}",
        f"--bs={workload.bs}",
        f"--iodepth={workload.iodepth}",
        f"--numjobs={workload.numjobs}",
        "--group_reporting",
        "--time_based",
        f"--runtime={runtime:g}",
        f"--ramp_time={ramp:g}",
        "--norandommap",
        "--percentile_list=50:90:99:99.9",
        "--output-format=json",
        f"--output={output}",
    ]


def rbd_fio_command(workload: Workload, runtime: float, ramp: float, output: Path) -> list[str]:
    """fio straight to the cluster through librbd (the ceiling): the same job with the rbd engine."""
    command = [
        arg
        for arg in fio_command(workload, "", runtime, ramp, output)
        if not arg.startswith(("--ioengine=", "--uri="))
    ]
    return [*command, "--ioengine=rbd", "--clientname=admin", f"--pool={RBD_POOL}", f"--rbdname={RBD_IMAGE}"]


def nbdcopy_command(uri: str) -> list[str]:
    return ["nbdcopy", uri, "null:"]


def _percentile(clat: Mapping[str, Any], pct: str) -> float | None:
    value = clat.get("percentile", {}).get(pct)
    return None if value is None else float(value) / 1000


def parse_fio(report: Mapping[str, Any], workload: Workload) -> dict[str, Any]:
    """The figures of a ``--group_reporting`` fio JSON report for the workload's direction.

    Keys are :class:`~bench.model.RunResult` fields: IOPS, MiB/s, bytes and I/Os moved, completion
    latency in µs (mean, p50/p90/p99/p99.9 from ``--percentile_list``, max) and fio's error code.
    """
    job = report["jobs"][0]
    side = job[workload.direction]
    clat = side.get("clat_ns", {})
    return {
        "iops": float(side["iops"]),
        "bw_mib_s": float(side["bw_bytes"]) / MiB,
        "io_bytes": int(side["io_bytes"]),
        "total_ios": int(side["total_ios"]),
        "clat_mean_us": float(clat.get("mean", 0.0)) / 1000,
        "clat_p50_us": _percentile(clat, "50.000000"),
        "clat_p90_us": _percentile(clat, "90.000000"),
        "clat_p99_us": _percentile(clat, "99.000000"),
        "clat_p999_us": _percentile(clat, "99.900000"),
        "clat_max_us": float(clat.get("max", 0.0)) / 1000,
        "fio_error": int(job.get("error", 0)),
    }


def run_fio(
    command: list[str],
    output: Path,
    runtime: float,
    ramp: float,
    *,
    against: str,
    at_window_start: Callable[[], None] = lambda: None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run one fio job and return its JSON report (``output`` is read, then removed).

    ``at_window_start`` is called when the ramp is over and fio starts measuring, so that the
    caller's samples (server CPU, counters) cover the same window; it samples again on return.
    """
    fio = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=None if env is None else dict(env),
    )
    try:
        time.sleep(ramp)  # fio measures after its ramp; so does the caller's window
        at_window_start()
        out, err = fio.communicate(timeout=runtime + ramp + 120)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    if fio.returncode != 0 or not output.exists():
        raise RuntimeError(f"fio failed ({fio.returncode}) against {against}: {err.strip()} {out}")
    report: dict[str, Any] = json.loads(output.read_text())
    output.unlink()
    return report
