"""I/O limits measured by a real client: fio --ioengine=nbd against throttled disks.

The expectation is QEMU's: the limit plus the initial allowance (a tenth of a second of it, or
the burst) over the run; a burst at its rate for its length and no longer; the members of a
group sharing its limit in turns; a live change in force within a second.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from device.blk_executor import IoMode
from service.model import DiskSpec, SecurityConfig
from tests.service.conftest import MiB, NbdRig, run, serving

SIZE = 64 * MiB


def throttled(name: str, group: str = "", io_mode: IoMode = "inline", **limits: int) -> DiskSpec:
    keys = tuple(sorted((key.replace("_", "-"), value) for key, value in limits.items()))
    return DiskSpec(
        name=name, backend="memory", size=SIZE, io_mode=io_mode, throttle=keys, throttle_group=group
    )


async def fio(
    rig: NbdRig, export: str, tmp: Path, *, seconds: int, rw: str = "randread", bs: str = "4k", depth: int = 8
) -> tuple[dict[str, Any], list[float]]:
    """fio's JSON summary and its per-second IOPS (read plus write) for one job on ``export``."""
    prefix = tmp / f"{export}-{rw}"
    output = tmp / f"{export}-{rw}.json"
    await run(
        "fio", f"--name={export}", "--ioengine=nbd", f"--uri={rig.uri(export)}", f"--rw={rw}", f"--bs={bs}",
        f"--size={SIZE}", f"--iodepth={depth}", "--time_based", f"--runtime={seconds}",
        f"--write_iops_log={prefix}", "--log_avg_msec=1000", "--output-format=json", f"--output={output}",
        timeout=seconds + 60,
    )  # fmt: skip
    summary = json.loads(output.read_text())
    per_second: dict[int, float] = {}
    for log in tmp.glob(f"{prefix.name}_iops*.log"):
        for line in log.read_text().splitlines():
            msec, value, *_ = (field.strip() for field in line.split(","))
            second = round(int(msec) / 1000)
            per_second[second] = per_second.get(second, 0.0) + float(value)
    return summary, [per_second[s] for s in sorted(per_second)]


def iops(summary: dict[str, Any]) -> float:
    job = summary["jobs"][0]
    return float(job["read"]["iops"] + job["write"]["iops"])


@pytest.mark.parametrize("io_mode", ["inline", "thread"])
async def test_an_iops_limit_holds_within_five_percent(tmp_path: Path, io_mode: IoMode) -> None:
    async with serving(
        throttled("disk0", io_mode=io_mode, iops_total=200),
        DiskSpec(name="free", backend="memory", size=SIZE),
    ) as rig:
        summary, per_second = await fio(rig, "disk0", tmp_path, seconds=10)
        assert iops(summary) == pytest.approx(200 + 20 / 10, rel=0.05)
        assert all(180 <= n <= 222 for n in per_second[1:-1]), per_second
        # The other disk is not limited.
        free, _ = await fio(rig, "free", tmp_path, seconds=2)
        assert iops(free) > 1000
        member = rig.service.throttling.members["disk0"]
        assert member.throttled[0] > 1000 and member.throttled_seconds[0] > 1


async def test_a_bandwidth_limit_holds_within_five_percent(tmp_path: Path) -> None:
    async with serving(throttled("disk0", bps_write=8 * MiB)) as rig:
        summary, _ = await fio(rig, "disk0", tmp_path, seconds=10, rw="write", bs="64k", depth=4)
        bw = summary["jobs"][0]["write"]["bw_bytes"]
        assert bw == pytest.approx(8 * MiB * 1.01, rel=0.05)


async def test_a_burst_is_allowed_for_its_length_and_no_longer(tmp_path: Path) -> None:
    # 1000/s for 1000*2/(1000-100) = 2.2 s, then 100/s.
    async with serving(
        throttled("disk0", iops_total=100, iops_total_max=1000, iops_total_max_length=2)
    ) as rig:
        _, per_second = await fio(rig, "disk0", tmp_path, seconds=7)
        assert all(n >= 850 for n in per_second[:2]), per_second
        assert all(90 <= n <= 110 for n in per_second[4:]), per_second


async def test_two_disks_in_a_group_share_its_limit(tmp_path: Path) -> None:
    async with serving(throttled("a", group="shared", iops_total=200), throttled("b", group="shared")) as rig:
        (a, _), (b, _) = await asyncio.gather(
            fio(rig, "a", tmp_path, seconds=10, depth=1), fio(rig, "b", tmp_path, seconds=10, depth=16)
        )
        assert iops(a) + iops(b) == pytest.approx(200, rel=0.05)
        assert abs(iops(a) - iops(b)) <= 0.1 * max(iops(a), iops(b)), (iops(a), iops(b))


async def test_a_live_change_is_in_force_within_a_second(tmp_path: Path) -> None:
    async with serving(throttled("disk0", iops_total=50)) as rig:
        job = asyncio.ensure_future(fio(rig, "disk0", tmp_path, seconds=8))
        await asyncio.sleep(3)
        async with aiohttp.ClientSession(base_url=rig.base_url) as http:
            async with http.patch("/v1/disks/disk0", json={"op": "throttle", "iops-total": 400}) as response:
                answer = await response.json()
                assert response.status == 200, answer
                assert answer["limits"] == {"iops-total": 400} and answer["group"] == "disk0"
            _, per_second = await job
            # the change at ~3 s: the samples from the second after it on are at the new limit
            assert all(40 <= n <= 60 for n in per_second[:2]), per_second
            assert all(360 <= n <= 440 for n in per_second[5:7]), per_second
            async with http.get("/v1/disks/disk0/info") as response:
                described = await response.json()
            assert described["throttle"]["limits"] == {"iops-total": 400}
            async with http.get("/metrics") as response:
                text = await response.text()
            assert 'vblk_throttle_limit{disk="disk0",group="disk0",limit="iops-total"} 400.0' in text
            assert 'vblk_throttle_wait_seconds_total{direction="read",disk="disk0"}' in text


async def test_throttle_calls_are_checked_and_leave_the_limits_alone(tmp_path: Path) -> None:
    async with serving(throttled("disk0", iops_total=500)) as rig:
        async with aiohttp.ClientSession(base_url=rig.base_url) as http:
            for body, code in (
                ({"op": "throttle", "iops-read": 10}, "bad_field"),  # total and read together
                ({"op": "throttle", "iops-total": -5}, "bad_field"),
                ({"op": "throttle", "iops-total": "lots"}, "bad_field"),
                ({"op": "throttle", "nonsense": 1}, "bad_field"),
                ({"op": "throttle", "group": 7}, "bad_field"),
            ):
                async with http.patch("/v1/disks/disk0", json=body) as response:
                    error = await response.json()
                    assert (response.status, error["error"]) == (400, code), error
            async with http.get("/v1/disks/disk0/info") as response:
                assert (await response.json())["throttle"]["limits"] == {"iops-total": 500}
            # a disk without limits gets them live, and loses them again
            async with http.patch(
                "/v1/disks/disk0", json={"op": "throttle", "iops-total": 0, "bps-total": "10M"}
            ) as response:
                assert (await response.json())["limits"] == {"bps-total": 10 * MiB}
        await run(
            "qemu-io", "-f", "raw", "-c", "write -P 0x33 0 1M", "-c", "read -P 0x33 0 1M", rig.uri("disk0")
        )


async def test_only_an_admin_token_sets_limits(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    admin, writer = "admin-0123456789abcdef", "rw-0123456789abcdef"
    tokens.write_text(f"admin {admin}\nrw {writer}\n")
    async with serving(throttled("disk0"), security=SecurityConfig(tokens_file=tokens)) as rig:
        body = {"op": "throttle", "iops-total": 100}
        async with aiohttp.ClientSession(base_url=rig.base_url) as http:
            async with http.patch(
                "/v1/disks/disk0", json=body, headers={"Authorization": f"Bearer {writer}"}
            ) as response:
                assert (response.status, (await response.json())["error"]) == (403, "admin_required")
            assert rig.service.throttling.describe("disk0") is None  # nothing changed
            async with http.patch(
                "/v1/disks/disk0", json=body, headers={"Authorization": f"Bearer {admin}"}
            ) as response:
                assert response.status == 200
                assert (await response.json())["limits"] == {"iops-total": 100}
            # data stays a read-write token's
            async with http.patch(
                "/v1/disks/disk0", json={"op": "flush"}, headers={"Authorization": f"Bearer {writer}"}
            ) as response:
                assert response.status == 200
