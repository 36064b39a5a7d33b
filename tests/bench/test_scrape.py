"""bench/scrape.py: vblk's kick, interrupt and request totals, and its build info, from /metrics."""

from __future__ import annotations

import pytest

from bench.scrape import VirtioCounters, parse_build_info, parse_virtio_counters, per_request

EXPOSITION = """\
# HELP vblk_kicks_total kicks
# TYPE vblk_kicks_total counter
vblk_kicks_total{disk="disk0",queue="0"} 120.0
vblk_kicks_total{disk="disk0",queue="1"} 30.0
vblk_kicks_total{disk="disk0",queue="0",result="suppressed"} 900.0
vblk_interrupts_total{disk="disk0",vector="1"} 75.0
vblk_requests_total{disk="disk0",op="read",status="ok"} 1000.0
vblk_requests_total{disk="disk0",op="write",status="ok"} 500.0
vblk_build_info{version="0.1.0",compiled="true"} 1.0
"""


def test_counters_sum_and_skip_suppressed() -> None:
    assert parse_virtio_counters(EXPOSITION) == VirtioCounters(150.0, 75.0, 1500.0)


def test_no_counters_is_none() -> None:
    assert parse_virtio_counters("vblk_requests_total 3.0\n") is None
    without_requests = "vblk_kicks_total 4.0\nvblk_interrupts_total 2.0\n"
    assert parse_virtio_counters(without_requests) == VirtioCounters(4.0, 2.0, None)


def test_build_info() -> None:
    assert parse_build_info(EXPOSITION) == {"version": "0.1.0", "compiled": "true"}
    assert parse_build_info("vblk_kicks_total 1.0\n") is None


def test_per_request_divides_by_vblks_requests_else_the_clients() -> None:
    before, after = VirtioCounters(100, 50, 1000), VirtioCounters(150, 75, 1500)
    assert per_request(before, after, 99) == pytest.approx((0.1, 0.05))
    no_count = VirtioCounters(100, 50, None), VirtioCounters(150, 75, None)
    assert per_request(*no_count, 250) == pytest.approx((0.2, 0.1))
    assert per_request(*no_count, 0) == (None, None)
    assert per_request(None, after, 10) == (None, None)
