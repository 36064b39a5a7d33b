"""The Ceph RBD row (``nbd_compare --rbd``): vblk, qemu-nbd and fio's rbd engine on a throwaway cluster.

A runner beside nbd_compare.py's: servers.py starts the NBD servers, fio.py runs the jobs, report.py
writes the tables in the format bench/published/ keeps.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import MiB, exit_on_signals, first_line, log, workspace
from bench.fio import fio_command, parse_fio, rbd_fio_command, run_fio
from bench.model import (
    RBD_CACHES,
    RBD_CONTENDERS,
    RBD_IMAGE,
    RBD_POOL,
    RBD_WORKLOADS,
    Metric,
    RbdContender,
    RunResult,
    Workload,
)
from bench.report import cpu_per_gib, environment, fmt, median_of, rbd_markdown
from bench.servers import ProcSample, Server, VblkTree, free_port, rbd_server_command

# The [client] section of the cluster's ceph.conf (tests/ceph/cluster.py), and what the writeback
# contenders get instead: the same cache for all three (qemu-nbd sets rbd_cache itself from
# --cache; fio never flushes, so write-through-until-flush would keep the cache write-through).
RBD_CLIENT_NONE = "[client]\nrbd cache = false\n"
RBD_CLIENT_WRITEBACK = (
    "[client]\nrbd cache = true\nrbd cache policy = writeback\nrbd cache writethrough until flush = false\n"
)


def rbd_conf(conf: Path, cache: str, work: Path) -> Path:
    """The ceph.conf a contender with this cache mode runs with (the cluster's, or a copy)."""
    if cache == "none":
        return conf
    text = conf.read_text()
    if RBD_CLIENT_NONE not in text:
        raise RuntimeError(f"{conf} has no [client] section with the cache off to replace")
    path = work / f"ceph-{cache}.conf"
    path.write_text(text.replace(RBD_CLIENT_NONE, RBD_CLIENT_WRITEBACK))
    return path


def rbd_run(
    contender: RbdContender,
    workload: Workload,
    round_index: int,
    conf: Path,
    size: int,
    args: argparse.Namespace,
    work: Path,
) -> RunResult:
    """One contender, one workload: start its server (none for fio-rbd), run fio, stop the server."""
    name = contender.key
    output = work / f"fio-rbd-{name}-{workload.key}-{round_index}.json"
    conf = rbd_conf(conf, contender.cache, work)
    env = {**os.environ, "CEPH_CONF": str(conf)}
    server: Server | None = None
    try:
        if contender.tool == "fio-rbd":
            command = rbd_fio_command(workload, args.runtime, args.ramp, output)
        else:
            port = free_port()
            server_command = rbd_server_command(contender, conf, port, VblkTree.working_tree())
            server = Server(contender.tool, server_command, port=port, size=size, log_dir=work)
            server.start()
            command = fio_command(workload, server.uri, args.runtime, args.ramp, output)
        samples: list[ProcSample] = []

        def window_start() -> None:
            if server is not None:
                samples.append(server.sample())

        started = time.perf_counter()
        report = run_fio(
            command, output, args.runtime, args.ramp, against=name, at_window_start=window_start, env=env
        )
        if server is not None:
            samples.append(server.sample())
        result = RunResult(
            name,
            workload.key,
            round_index,
            command,
            time.perf_counter() - started,
            **parse_fio(report, workload),
        )
        if len(samples) == 2:
            before, after = samples
            result.server_cpu_s = after.cpu_s - before.cpu_s
            result.cpu_s_per_gib = cpu_per_gib(result.server_cpu_s, result.io_bytes)
            result.rss_kib, result.hwm_kib = after.rss_kib, after.hwm_kib
        return result
    finally:
        if server is not None:
            server.stop()


def rbd_main(args: argparse.Namespace) -> int:
    """The RBD row: build a cluster, fill an image, measure the three contenders round robin."""
    from tests.ceph.cluster import Cluster, missing_tools  # noqa: PLC0415 - only this mode needs Ceph

    missing = missing_tools() + [t for t in ("fio", "qemu-nbd", "nbdinfo") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)}; run `make tools`")
    exit_on_signals()
    timestamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    env = environment()
    env["ceph"] = first_line(["ceph", "--version"])
    results: list[RunResult] = []
    size = args.rbd_size
    contenders = [c for c in RBD_CONTENDERS if c.cache in args.rbd_cache]
    settings: dict[str, Any] = {
        "timestamp": timestamp,
        "size": size,
        "runs": args.runs,
        "runtime": args.runtime,
        "ramp": args.ramp,
        "contenders": [dataclasses.asdict(c) for c in contenders],
        "caches": args.rbd_cache,
        "workloads": [dataclasses.asdict(w) for w in RBD_WORKLOADS],
        "vblk_revision": env["vblk_git"],
    }
    with workspace(args.workdir, args.keep) as work:
        cluster = Cluster(work / "ceph", client_timeout=60)
        try:
            log(f"starting a throwaway Ceph cluster in {cluster.directory}")
            cluster.start()
            log(f"cluster up in {cluster.started_in:.1f} s; filling {size // MiB} MiB {RBD_POOL}/{RBD_IMAGE}")
            cluster.rbd("create", "--size", f"{size // MiB}M", f"{RBD_POOL}/{RBD_IMAGE}")
            subprocess.run(
                ["fio", "--name=fill", "--ioengine=rbd", "--clientname=admin", f"--pool={RBD_POOL}",
                 f"--rbdname={RBD_IMAGE}", "--rw=write", "--bs=4M", "--iodepth=4", f"--size={size}"],
                env=cluster.env(), check=True, capture_output=True, timeout=600,
            )  # fmt: skip
            for round_index in range(args.runs):
                shift = round_index % len(contenders)
                order = contenders[shift:] + contenders[:shift]
                for workload in RBD_WORKLOADS:
                    for contender in order:
                        name = contender.key
                        log(f"round {round_index + 1}/{args.runs} {workload.key} on {name}")
                        try:
                            result = rbd_run(contender, workload, round_index, cluster.conf, size, args, work)
                        except (
                            RuntimeError,
                            OSError,
                            ValueError,
                            KeyError,
                            subprocess.SubprocessError,
                        ) as exc:
                            log(f"  FAILED: {exc}")
                            results.append(
                                RunResult(name, workload.key, round_index, [], 0.0, error=str(exc))
                            )
                            continue
                        kiops, cpu = fmt(result.metric("kiops")), fmt(result.cpu_s_per_gib)
                        log(f"  kiops={kiops}, server cpu/GiB={cpu}")
                        results.append(result)
        finally:
            cluster.stop()
    table = rbd_markdown(results, env, settings)
    metrics: tuple[Metric, ...] = ("kiops", "clat_mean_us", "cpu_s_per_gib")
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "settings": settings,
        "environment": env,
        "medians": {
            f"{name}/{w.key}": {
                m: median_of([r for r in results if r.server == name and r.workload == w.key], m)
                for m in metrics
            }
            for name in (c.key for c in contenders)
            for w in RBD_WORKLOADS
        },
        "runs": [dataclasses.asdict(r) for r in results],
    }
    json_path = args.out / f"{timestamp}-rbd.json"
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    json_path.with_suffix(".md").write_text(table)
    sys.stdout.write(table)
    log(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    return 1 if any(r.error for r in results) else 0


def check_caches(caches: list[str]) -> None:
    """``--rbd-cache``: every mode one of RBD_CACHES, and at least one."""
    unknown = [c for c in caches if c not in RBD_CACHES]
    if unknown or not caches:
        raise SystemExit(f"--rbd-cache: choose from {', '.join(RBD_CACHES)} (not {', '.join(unknown)})")
