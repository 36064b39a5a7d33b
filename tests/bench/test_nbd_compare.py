"""``python -m bench.nbd_compare`` end to end, briefly: vblk and nbdkit file, one round of one job."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import REPO

TOOLS = ("fio", "nbdkit", "nbdinfo")


@pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS), reason=f"needs {', '.join(TOOLS)}")
def test_a_short_comparison_reports_ratios(tmp_path: Path) -> None:
    out = tmp_path / "results"
    command = [
        sys.executable, "-m", "bench.nbd_compare", "--servers", "vblk,nbdkit-file",
        "--workloads", "randread-4k-qd16", "--size", "32M", "--runs", "1", "--runtime", "1",
        "--ramp", "0", "--out", str(out), "--workdir", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Bracketed: vblk ÷ peer." in done.stdout
    # the peer's figure carries vblk ÷ nbdkit file; vblk's own carries none
    row = r"\| 4 KiB random read, QD16 \| kIOPS \| \d+(\.\d+)? \| \d+(\.\d+)? \(\d+\.\d\dx\) \|"
    assert re.search(row, done.stdout), done.stdout
    assert re.search(r"\| VmRSS / VmHWM MiB at end \| \d+ / \d+ \| \d+ / \d+ \|", done.stdout)
    [report] = out.glob("*.md")
    assert report.read_text() == done.stdout
    [document] = (json.loads(path.read_text()) for path in out.glob("*.json"))
    assert document["settings"]["servers"] == ["vblk", "nbdkit-file"]
    assert document["settings"]["baseline"] == "vblk"
    [vblk, _] = document["settings"]["contenders"]
    assert vblk["metrics"] is True and vblk["compiled"] in (True, False)
    runs = {run["server"]: run for run in document["runs"]}
    run_vblk, run_nbdkit = runs["vblk"], runs["nbdkit-file"]
    assert run_vblk["error"] is None and run_vblk["iops"] > 0 and run_vblk["cpu_s_per_gib"] > 0
    assert run_vblk["kicks_per_req"] is not None and run_nbdkit["kicks_per_req"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # the workspace removed


def test_bad_specs_are_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.nbd_compare", "--servers", "vblk,vblk@no-such-revision-anywhere"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("'no-such-revision-anywhere' names no commit")
