"""The reports: medians, ratios against the baseline, CPU per GiB, the Markdown tables (the NBD
comparison, and the RBD row in the format bench/published/ keeps), the environment they quote.

The top of bench/: reads :class:`~bench.model.RunResult` lists, starts nothing but ``--version`` probes.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.common import REPO, GiB, KiB, MiB, first_line
from bench.model import (
    METRIC_LABELS,
    RBD_CACHES,
    RBD_CONTENDERS,
    RBD_TARGETS,
    RBD_WORKLOADS,
    Metric,
    RunResult,
    Workload,
)
from bench.servers import Contender, ProcSample

# -- arithmetic ------------------------------------------------------------------------------------


def median_of(runs: Sequence[RunResult], metric: Metric) -> float | None:
    """The median of one metric over runs that measured it; None when none did."""
    values = [v for v in (r.metric(metric) for r in runs) if v is not None]
    return statistics.median(values) if values else None


def ratio(reference: float | None, value: float | None) -> float | None:
    """``reference ÷ value`` (the baseline over a contender), None when either is missing or 0."""
    if reference is None or not value:
        return None
    return reference / value


def cpu_per_gib(cpu_s: float | None, io_bytes: int) -> float | None:
    """Server CPU seconds per GiB moved; None without a CPU figure or without bytes."""
    if cpu_s is None or io_bytes <= 0:
        return None
    return cpu_s / (io_bytes / GiB)


def total_cpu_per_gib(runs: Sequence[RunResult]) -> float | None:
    """All the CPU seconds of ``runs`` over all the GiB they moved (runs without a CPU figure left out)."""
    measured = [r for r in runs if r.server_cpu_s is not None and r.io_bytes > 0 and r.error is None]
    return cpu_per_gib(sum(r.server_cpu_s or 0.0 for r in measured), sum(r.io_bytes for r in measured))


def by_cell(results: Sequence[RunResult]) -> dict[tuple[str, str], list[RunResult]]:
    """Runs grouped by (server label, workload key)."""
    cells: dict[tuple[str, str], list[RunResult]] = {}
    for result in results:
        cells.setdefault((result.server, result.workload), []).append(result)
    return cells


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(value: float | None, reference: float | None, is_peer: bool) -> str:
    """A table cell: the figure, and for a peer of the baseline ``(baseline ÷ peer)`` in brackets."""
    text = fmt(value)
    shown = ratio(reference, value) if is_peer else None
    if shown is not None:
        text += f" ({shown:.2f}x)"
    return text


def _mib(kib: int) -> str:
    return f"{kib / KiB:.0f}"


# -- the NBD comparison ----------------------------------------------------------------------------


def _contender_settings(settings: Mapping[str, Any], label: str) -> Mapping[str, Any]:
    return next((c for c in settings.get("contenders", []) if c.get("label") == label), {})


def _describe(contender: Contender, settings: Mapping[str, Any]) -> str:
    """``vblk@1a2b3c4 (HEAD~5, 1a2b3c4d5e6f, compiled)``: where a vblk contender comes from."""
    if contender.vblk is None:
        return contender.title
    revision = contender.vblk.revision
    origin = (
        f"working tree {settings.get('vblk_revision', '?')}"
        if revision is None
        else f"{revision.spec}, {revision.sha[:12]}"
    )
    compiled = _contender_settings(settings, contender.label).get("compiled")
    state = "" if compiled is None else (", compiled" if compiled else ", pure Python")
    return f"{contender.title} ({origin}{state})"


def _rss_after(samples: Sequence[ProcSample | None], index: int) -> str:
    sample = samples[index] if index < len(samples) else None
    return "n/a" if sample is None else _mib(sample.rss_kib)


def markdown(
    results: Sequence[RunResult],
    servers: Sequence[Contender],
    workloads: Sequence[Workload],
    env: Mapping[str, Any],
    settings: Mapping[str, Any],
    final: Mapping[str, ProcSample],
    rounds: Mapping[str, Sequence[ProcSample | None]] | None = None,
    baseline: str | None = None,
    rest: Mapping[str, ProcSample] | None = None,
) -> str:
    """Median tables; every other contender's cell carries (baseline ÷ contender) in brackets.

    ``final`` is each server's memory at the end, ``rounds`` its memory after each round, ``rest``
    its memory after :data:`bench.nbd_compare.REST_SECONDS` without requests;
    ``baseline`` a label (the first server's by default).
    """
    cells = by_cell(results)
    base = next((s for s in servers if s.label == baseline), servers[0])
    names = [s.label for s in servers]
    header = "| workload | metric | " + " | ".join(s.title for s in servers) + " |"
    rule = "|---|---|" + "---:|" * len(servers)

    def row(workload: Workload, metric: Metric) -> str:
        medians = {n: median_of(cells.get((n, workload.key), []), metric) for n in names}
        shown = [cell(medians[n], medians[base.label], n != base.label) for n in names]
        return f"| {workload.title} | {METRIC_LABELS[metric]} | " + " | ".join(shown) + " |"

    lines = [
        f"## vblk vs NBD peers — {settings['timestamp']}",
        "",
        f"Image {settings['size'] // MiB} MiB raw (page cache), fio `--ioengine=nbd` over TCP loopback, "
        f"median of {settings['runs']} run(s), {settings['runtime']:g} s + {settings['ramp']:g} s ramp, "
        f"servers round robin. {env['cpu_model']}, {env['nproc']} CPUs, Linux {env['kernel']}, "
        f"Python {env['python']}, {env['fio']}, {env['nbdkit']}, {env['qemu_nbd']}.",
        "",
    ]
    if any(s.vblk is not None and s.vblk.revision is not None for s in servers):
        lines += ["Contenders: " + ", ".join(_describe(s, settings) for s in servers) + ".", ""]
    lines += [
        f"Bracketed: {base.title} ÷ peer. For IOPS and MiB/s above 1x means {base.title} is faster; "
        f"for latency and CPU above 1x means {base.title} is slower / costlier.",
        "",
        header,
        rule,
    ]
    lines += [row(w, m) for w in workloads for m in w.shown]
    lines += [
        "",
        "Server CPU seconds per GiB moved (utime+stime over fio's measured window):",
        "",
        header,
        rule,
    ]
    lines += [row(w, "cpu_s_per_gib") for w in workloads]
    if len(workloads) > 1:
        totals = {n: total_cpu_per_gib([r for r in results if r.server == n]) for n in names}
        shown = [cell(totals[n], totals[base.label], n != base.label) for n in names]
        lines.append("| all workloads, all rounds | server CPU s/GiB | " + " | ".join(shown) + " |")
    memory = []
    for name in names:
        sample = final.get(name)
        memory.append("n/a" if sample is None else f"{_mib(sample.rss_kib)} / {_mib(sample.hwm_kib)}")
    lines += [
        "",
        "| server memory | " + " | ".join(s.title for s in servers) + " |",
        "|---|" + "---:|" * len(servers),
    ]
    lines += ["| VmRSS / VmHWM MiB at end | " + " | ".join(memory) + " |"]
    if rest:
        at_rest = [_mib(rest[n].rss_kib) if n in rest else "n/a" for n in names]
        lines.append("| VmRSS MiB at rest, 5 s later | " + " | ".join(at_rest) + " |")
    if rounds and settings["runs"] > 1:
        for index in range(settings["runs"]):
            shown = [_rss_after(rounds.get(n, []), index) for n in names]
            lines.append(f"| VmRSS MiB after round {index + 1} | " + " | ".join(shown) + " |")
    vblks = [s for s in servers if s.kind == "vblk"]
    if vblks:
        without = [s.title for s in vblks if not _contender_settings(settings, s.label).get("metrics")]
        if not without:
            source = (
                "vblk_kicks_total and vblk_interrupts_total deltas from /metrics ÷ vblk_requests_total delta"
            )
        elif len(vblks) == 1:
            source = "n/a: this vblk serves no /metrics with kick and interrupt counters"
        else:
            source = (
                "vblk_kicks_total and vblk_interrupts_total deltas from /metrics ÷ vblk_requests_total "
                f"delta; n/a for {', '.join(without)}: no /metrics with kick and interrupt counters"
            )
        lines += ["", f"vblk virtio notifications per virtio-blk request ({source}):", ""]
        if len(vblks) == 1:
            lines += ["| workload | kicks/req | interrupts/req |", "|---|---:|---:|"]
        else:
            titles = [f"{s.title} {m}" for s in vblks for m in ("kicks/req", "interrupts/req")]
            lines += ["| workload | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(titles)]
        for workload in workloads:
            figures = []
            for server in vblks:
                runs = cells.get((server.label, workload.key), [])
                figures += [fmt(median_of(runs, "kicks_per_req")), fmt(median_of(runs, "irqs_per_req"))]
            lines.append(f"| {workload.title} | " + " | ".join(figures) + " |")
    return "\n".join(lines) + "\n"


def medians(
    results: Sequence[RunResult], labels: Sequence[str], workloads: Sequence[Workload]
) -> dict[str, dict[str, float | None]]:
    """``{"label/workload": {metric: median}}`` for the JSON document."""
    cells = by_cell(results)
    return {
        f"{name}/{w.key}": {
            m: median_of(cells.get((name, w.key), []), m)
            for m in (*w.shown, "cpu_s_per_gib", "kicks_per_req", "irqs_per_req")
        }
        for name in labels
        for w in workloads
    }


# -- the Ceph RBD row ------------------------------------------------------------------------------


def rbd_markdown(results: Sequence[RunResult], env: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """The RBD row's report: one table per librbd cache mode, then the targets met or not."""
    cells = by_cell(results)

    def median(key: str, workload: Workload, metric: Metric) -> float | None:
        return median_of(cells.get((key, workload.key), []), metric)

    caches = [c for c in RBD_CACHES if c in settings["caches"]]
    lines = [
        f"## vblk on Ceph RBD — {settings['timestamp']}",
        "",
        "Throwaway cluster on loopback: one mon, one memstore OSD, pool size 1; "
        f"image {settings['size'] // MiB} MiB, filled. "
        f"Median of {settings['runs']} run(s), {settings['runtime']:g} s + {settings['ramp']:g} s ramp, "
        f"contenders one at a time, round robin. {env['cpu_model']}, {env['nproc']} CPUs "
        f"(fio, the server and the cluster share them), {env['fio']}, {env['qemu_nbd']}, {env['ceph']}.",
        "",
        "Each table compares like with like: the three contenders run librbd with the same cache. "
        "Bracketed: vblk ÷ contender. fio never sends a FLUSH.",
    ]
    verdicts = []
    metrics: tuple[Metric, ...] = ("kiops", "clat_mean_us", "cpu_s_per_gib")
    for cache in caches:
        contenders = [c for c in RBD_CONTENDERS if c.cache == cache]
        vblk_key = next(c.key for c in contenders if c.tool == "vblk")
        lines += [
            "",
            f"### {RBD_CACHES[cache]}",
            "",
            "| workload | metric | " + " | ".join(c.title for c in contenders) + " |",
            "|---|---|" + "---:|" * len(contenders),
        ]
        for workload in RBD_WORKLOADS:
            for metric in metrics:
                figures = {c.key: median(c.key, workload, metric) for c in contenders}
                shown = [cell(figures[c.key], figures[vblk_key], c.tool != "vblk") for c in contenders]
                lines.append(f"| {workload.title} | {METRIC_LABELS[metric]} | " + " | ".join(shown) + " |")
            vblk = median(vblk_key, workload, "kiops")
            for peer in contenders:
                target = RBD_TARGETS.get(peer.tool)
                if target is None:
                    continue
                theirs = ratio(vblk, median(peer.key, workload, "kiops"))
                met = "met" if theirs is not None and theirs >= target else "NOT met"
                verdicts.append(
                    f"- {RBD_CACHES[cache].split(' (')[0]}, {workload.title}: vblk ÷ {peer.title} = "
                    f"{fmt(theirs)} (≥ {target:g}x: {met})"
                )
    if len(caches) > 1:
        for workload in RBD_WORKLOADS:
            across = ratio(median("vblk-wb", workload, "kiops"), median("fio-rbd", workload, "kiops"))
            verdicts.append(
                f"- not like with like, {workload.title}: vblk with its writeback cache ÷ "
                f"fio --ioengine=rbd with the cache off = {fmt(across)}"
            )
    lines += [
        "",
        "Server CPU: utime+stime of the vblk or qemu-nbd process over fio's window, librbd's threads "
        "included (fio rbd runs librbd inside fio: n/a).",
        "",
        "Targets (issue 9: at least 2x qemu-nbd's IOPS and 0.7x fio's direct rbd IOPS):",
        "",
        *verdicts,
    ]
    return "\n".join(lines) + "\n"


# -- the environment a report quotes ---------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _nbdkit_python_version() -> str:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        text = subprocess.run(
            ["nbdkit", "python", "--dump-plugin"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
        for line in text.splitlines():
            if line.startswith("python_version="):
                return line.partition("=")[2]
    return "unknown"


def git_revision() -> str:
    """The working tree's commit, ``-dirty`` when device/, driver/ or service/ have changes."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "device", "driver", "service"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    return "unknown"


def _meminfo(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def environment() -> dict[str, Any]:
    """The machine, the interpreter and every tool's version, for the report's header and JSON."""

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    return {
        "cpu_model": _cpu_model(),
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "loadavg_at_start": os.getloadavg(),
        "mem_total_kib": _meminfo("MemTotal"),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "uvloop": version("uvloop"),
        "vblk": version("vblk"),
        "vblk_git": git_revision(),
        "fio": first_line(["fio", "--version"]),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "nbdkit_python_plugin_python": _nbdkit_python_version(),
        "qemu_nbd": first_line(["qemu-nbd", "--version"]),
        "nbdcopy": first_line(["nbdcopy", "--version"]),
    }
