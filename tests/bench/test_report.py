"""bench/report.py: medians, ratios against the baseline, CPU per GiB, and the tables that quote them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from bench.common import GiB, KiB
from bench.model import WORKLOADS, RunResult
from bench.report import cell, cpu_per_gib, markdown, median_of, medians, ratio, total_cpu_per_gib
from bench.revisions import Revision
from bench.servers import Contender, ProcSample, VblkTree

WORKLOAD = {w.key: w for w in WORKLOADS}
OLD = Revision("HEAD~5", "b39c6846e01f8cda740703732086ad0d2088dfd0", "b39c684")
VBLK = Contender("vblk", "vblk", "vblk", "vblk", VblkTree(Path("/tree"), "python"))
VBLK_OLD = Contender(OLD.label, "vblk", OLD.label, "vblk@HEAD~5", VblkTree(Path("/old"), "py", OLD))
NBDKIT = Contender("nbdkit-file", "nbdkit-file", "nbdkit file", "nbdkit-file")
ENV = {
    "cpu_model": "CPU",
    "nproc": 2,
    "kernel": "6.1",
    "python": "3.11",
    "fio": "fio-3.33",
    "nbdkit": "nbdkit 1.32",
    "qemu_nbd": "qemu-nbd 7.2",
}


def run(
    server: str, workload: str, iops: float | None, *, cpu: float | None = None, gib: float = 1.0
) -> RunResult:
    result = RunResult(server, workload, 0, [], 1.0, iops=iops, io_bytes=int(gib * GiB))
    result.server_cpu_s = cpu
    result.cpu_s_per_gib = cpu_per_gib(cpu, result.io_bytes)
    return result


def settings(runs: int = 3, **extra: Any) -> dict[str, Any]:
    return {"timestamp": "T", "size": 64 << 20, "runs": runs, "runtime": 1.0, "ramp": 0.0, **extra}


def test_median_skips_runs_without_the_figure() -> None:
    runs = [run("vblk", "w", 3000), run("vblk", "w", 1000), run("vblk", "w", None), run("vblk", "w", 2000)]
    assert median_of(runs, "iops") == 2000
    assert median_of(runs, "kiops") == 2.0
    assert median_of(runs[:2], "iops") == 2000  # even count: the mean of the middle two
    assert median_of([run("vblk", "w", None)], "iops") is None
    assert median_of([], "iops") is None


def test_ratio_is_the_baseline_over_the_contender() -> None:
    assert ratio(30.0, 20.0) == 1.5
    assert ratio(None, 20.0) is None and ratio(30.0, None) is None and ratio(30.0, 0.0) is None
    assert cell(20.0, 30.0, True) == "20.0 (1.50x)"
    assert cell(30.0, 30.0, False) == "30.0"  # the baseline's own column
    assert cell(None, 30.0, True) == "n/a"
    assert cell(0.123, 0.5, True) == "0.12 (4.07x)"
    assert cell(1234.0, None, True) == "1234"


def test_cpu_per_gib() -> None:
    assert cpu_per_gib(2.0, 4 * GiB) == 0.5
    assert cpu_per_gib(1.0, GiB // 2) == 2.0
    assert cpu_per_gib(None, GiB) is None and cpu_per_gib(1.0, 0) is None
    runs = [run("vblk", "a", 1, cpu=3.0, gib=1), run("vblk", "b", 1, cpu=1.0, gib=3), run("vblk", "c", 1)]
    assert total_cpu_per_gib(runs) == 1.0  # 4 s over 4 GiB, the run without CPU left out
    assert total_cpu_per_gib([run("vblk", "c", 1)]) is None


def table_row(text: str, title: str, metric: str) -> list[str]:
    [line] = [line for line in text.splitlines() if line.startswith(f"| {title} | {metric} |")]
    return [part.strip() for part in line.strip("|").split("|")][2:]


def test_report_ratios_against_a_chosen_baseline() -> None:
    qd16, write = WORKLOAD["randread-4k-qd16"], WORKLOAD["randwrite-4k-qd16"]
    results = [
        *(run("vblk", qd16.key, iops, cpu=2.0) for iops in (40_000, 44_000, 42_000)),
        *(run(OLD.label, qd16.key, iops, cpu=4.0) for iops in (21_000, 20_000, 22_000)),
        *(run("nbdkit-file", qd16.key, iops, cpu=1.0) for iops in (84_000, 80_000, 90_000)),
        run("vblk", write.key, 10_000, cpu=1.0),
        run(OLD.label, write.key, 10_000, cpu=1.0),
        run("nbdkit-file", write.key, None),
    ]
    servers = [VBLK, VBLK_OLD, NBDKIT]
    mem = {"vblk": ProcSample(1.0, 70 * KiB, 80 * KiB), OLD.label: ProcSample(1.0, 60 * KiB, 61 * KiB)}
    rounds = {"vblk": [ProcSample(0, 66 * KiB, 0), None, ProcSample(0, 70 * KiB, 0)], OLD.label: []}
    config = settings(
        contenders=[
            {"label": "vblk", "metrics": True, "compiled": True},
            {"label": OLD.label, "metrics": False},
        ],
        vblk_revision="5b2693c",
    )
    text = markdown(results, servers, [qd16, write], ENV, config, mem, rounds, baseline=OLD.label)
    assert f"Bracketed: {OLD.label} ÷ peer." in text
    assert (
        f"Contenders: vblk (working tree 5b2693c, compiled), {OLD.label} (HEAD~5, b39c6846e01f), nbdkit file."
        in text
    )
    assert "| workload | metric | vblk | vblk@b39c684 | nbdkit file |" in text
    # medians 42k, 21k, 84k; the baseline's column carries no ratio
    assert table_row(text, qd16.title, "kIOPS") == ["42.0 (0.50x)", "21.0", "84.0 (0.25x)"]
    assert table_row(text, write.title, "kIOPS") == ["10.0 (1.00x)", "10.0", "n/a"]
    assert table_row(text, qd16.title, "server CPU s/GiB") == ["2.00 (2.00x)", "4.00", "1.00 (4.00x)"]
    # every workload and round: vblk 7 s over 4 GiB, the old one 13 over 4, nbdkit 3 over 3
    assert table_row(text, "all workloads, all rounds", "server CPU s/GiB") == [
        "1.75 (1.86x)",
        "3.25",
        "1.00 (3.25x)",
    ]
    assert "| VmRSS / VmHWM MiB at end | 70 / 80 | 60 / 61 | n/a |" in text
    assert "| VmRSS MiB after round 1 | 66 | n/a | n/a |" in text
    assert "| VmRSS MiB after round 3 | 70 | n/a | n/a |" in text
    assert "n/a for vblk@b39c684: no /metrics" in text
    assert "| workload | vblk kicks/req | vblk interrupts/req | vblk@b39c684 kicks/req |" in text
    assert len(re.findall(r"\(\d+\.\d\dx\)", text)) == 8  # each figure the peers measured


def test_default_report_keeps_its_format() -> None:
    """One vblk, first: the tables as the README quotes them (vblk ÷ peer, one kicks table)."""
    qd16 = WORKLOAD["randread-4k-qd16"]
    results = [run("vblk", qd16.key, 30_000, cpu=1.0), run("nbdkit-file", qd16.key, 20_000, cpu=1.0)]
    config = settings(runs=1, contenders=[{"label": "vblk", "metrics": True}])
    text = markdown(results, [VBLK, NBDKIT], [qd16], ENV, config, {})
    assert "Contenders:" not in text and "after round" not in text and "all workloads" not in text
    assert "Bracketed: vblk ÷ peer. For IOPS and MiB/s above 1x means vblk is faster;" in text
    assert table_row(text, qd16.title, "kIOPS") == ["30.0", "20.0 (1.50x)"]
    assert "| VmRSS / VmHWM MiB at end | n/a | n/a |" in text
    assert (
        "(vblk_kicks_total and vblk_interrupts_total deltas from /metrics ÷ vblk_requests_total delta)"
        in text
    )
    assert "| workload | kicks/req | interrupts/req |" in text
    figures = medians(results, ["vblk", "nbdkit-file"], [qd16])
    assert figures["nbdkit-file/randread-4k-qd16"]["kiops"] == 20.0
    assert figures["vblk/randread-4k-qd16"]["cpu_s_per_gib"] == 1.0
    assert figures["vblk/randread-4k-qd16"]["kicks_per_req"] is None


@pytest.mark.parametrize("runs", [1, 2])
def test_memory_rows_follow_the_rounds(runs: int) -> None:
    qd16 = WORKLOAD["randread-4k-qd16"]
    rounds = {"vblk": [ProcSample(0, 10 * KiB, 0)] * runs}
    text = markdown([run("vblk", qd16.key, 1)], [VBLK], [qd16], ENV, settings(runs=runs), {}, rounds)
    assert text.count("after round") == (0 if runs == 1 else runs)
    assert "n/a: this vblk serves no /metrics" in text
