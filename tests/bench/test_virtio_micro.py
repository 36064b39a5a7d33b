"""bench/virtio_micro.py: a cell's figures are medians over runs; one short run in this process."""

from __future__ import annotations

import json

import pytest

from bench.virtio_micro import main, median_rows


def test_median_rows() -> None:
    def row(op: str, iops: float, kicks: float) -> dict[str, object]:
        return {"op": op, "depth": 1, "iops": iops, "kicks_per_request": kicks, "interrupts_per_request": 1.0}

    runs = [[row("read", 10, 1.0), row("write", 5, 0.5)], [row("read", 30, 0.0), row("write", 7, 0.5)]]
    runs.append([row("read", 20, 0.25), row("write", 6, 0.25)])
    assert median_rows(runs) == [row("read", 20, 0.25), row("write", 6, 0.5)]


def test_a_short_run_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seconds", "0.05", "--runs", "1", "--depths", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["op"], r["depth"], r["io_mode"]) for r in rows] == [
        ("read", 4, "inline"),
        ("write", 4, "inline"),
    ]
    assert all(r["iops"] > 0 and 0 < r["kicks_per_request"] <= 1 for r in rows)
