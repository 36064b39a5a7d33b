"""deploy/prometheus and deploy/grafana against a real Prometheus scraping a running vblk.

Debian's ``prometheus`` scrapes the in-process service every second with the shipped scrape
job; a workload runs through NBD (fio) and REST (with a deliberate out-of-range request, so
error panels have data); then every PromQL expression of the Grafana dashboard is evaluated
through Prometheus' HTTP API and must return data. The dashboard and the provisioning files
are checked for what Grafana needs to load them from files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from driver.blk import BlkIOError
from tests.deploy.conftest import DEPLOY, tool
from tests.service.conftest import SYSTEM_PYTHON, NbdRig, run

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "vblk.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"

# What Grafana puts in place of the dashboard's variables, for evaluating its queries here.
VARIABLES = {
    "__rate_interval": "20s",
    "__interval": "5s",
    "__range": "1m",
    "instance": ".*",
    "disk": ".*",
}
PANEL_TYPES = {"row", "timeseries", "stat", "heatmap", "gauge", "bargauge", "table", "state-timeline", "text"}
METRIC = re.compile(r"\bvblk_[a-z0-9_]+")


async def load_yaml(path: Path) -> Any:
    """A YAML file as data (Debian's python3-yaml: vblk itself does not depend on a YAML parser)."""
    script = "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"
    return json.loads((await run(SYSTEM_PYTHON, "-c", script, str(path))).stdout)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in all_panels(board["panels"])
        for target in panel.get("targets", [])
    ]


def variable_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    queries = []
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append((variable["name"], query["query"] if isinstance(query, dict) else query))
    return queries


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in VARIABLES:
            raise AssertionError(f"unknown variable ${name} in {expr}")
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


# -- the files Grafana and Prometheus load ------------------------------------------------------


async def test_scrape_config_is_valid_for_promtool() -> None:
    result = await run(tool("promtool"), "check", "config", str(SCRAPE_CONFIG))
    assert "SUCCESS" in result.stdout + result.stderr
    config = await load_yaml(SCRAPE_CONFIG)
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "vblk"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8080"]  # vblk's default http-listen


async def test_dashboard_and_provisioning_load_from_files() -> None:
    board = dashboard()
    # File provisioning takes the JSON model as is: no import-time ${DS_...} inputs.
    assert "__inputs" not in board and "${DS_" not in DASHBOARD.read_text()
    for key in ("title", "uid", "panels", "templating", "schemaVersion", "time"):
        assert key in board, key
    assert board["id"] is None and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", board["uid"])
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = list(all_panels(board["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        assert panel["type"] in PANEL_TYPES, panel["type"]
        assert panel["title"]
        pos = panel["gridPos"]
        assert pos["w"] >= 1 and pos["h"] >= 1 and pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells.get((x, y))}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in targets:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"]
    titles = {p["title"] for p in panels}
    for expected in (
        "IOPS by operation",
        "Throughput",
        "virtio latency percentiles",
        "Virtqueue depth",
        "Average queue size",
        "Utilisation",
        "Kicks and interrupts per second",
        "Kicks and interrupts per request",
        "Errors by status",
        "Device resets",
        "NBD connections",
        "HTTP requests",
    ):
        assert expected in titles, expected

    providers = await load_yaml(PROVISIONING / "dashboards" / "vblk.yaml")
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    datasources = await load_yaml(PROVISIONING / "datasources" / "prometheus.yaml")
    assert datasources["apiVersion"] == 1
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["uid"] and source["url"].startswith("http")
    assert source["isDefault"] is True  # what the ${datasource} variable selects by default
    scrape = await load_yaml(SCRAPE_CONFIG)
    [job] = [j for j in scrape["scrape_configs"] if j["job_name"] == "vblk"]
    assert source["jsonData"]["timeInterval"] == job["scrape_interval"]


# -- a real Prometheus ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def prometheus(config: dict[str, Any], directory: Path) -> AsyncIterator[str]:
    """Prometheus on a free loopback port with ``config``; yields its base URL."""
    config_file = directory / "prometheus.yml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    await run(tool("promtool"), "check", "config", str(config_file))
    proc = await asyncio.create_subprocess_exec(
        tool("prometheus"),
        f"--config.file={config_file}",
        f"--storage.tsdb.path={directory / 'data'}",
        "--web.listen-address=127.0.0.1:0",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    log: list[str] = []
    try:
        async with asyncio.timeout(30):
            while True:
                line = (await proc.stderr.readline()).decode()
                if not line:
                    raise AssertionError("prometheus exited:\n" + "".join(log))
                log.append(line)
                match = re.search(r'msg="Listening on" address=127\.0\.0\.1:(\d+)', line)
                if match:
                    port = int(match.group(1))
                    break

        async def drain() -> None:
            assert proc.stderr is not None
            while line := await proc.stderr.readline():
                log.append(line.decode())

        drainer = asyncio.get_running_loop().create_task(drain())
        try:
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as http, asyncio.timeout(30):
                while True:  # 503 until the TSDB is open
                    async with http.get(f"{base}/-/ready") as r:
                        if r.status == 200:
                            break
                    await asyncio.sleep(0.05)
            yield base
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 20)
            await drainer
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def query(http: aiohttp.ClientSession, base: str, expr: str) -> list[dict[str, Any]]:
    async with http.get(f"{base}/api/v1/query", params={"query": expr}) as r:
        body = await r.json()
    assert r.status == 200 and body["status"] == "success", f"{expr}: {body}"
    data = body["data"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    assert data["resultType"] == "vector", expr
    result: list[dict[str, Any]] = data["result"]
    return result


async def wait_for_scrapes(http: aiohttp.ClientSession, base: str, scrapes: int) -> None:
    """Until Prometheus has scraped vblk ``scrapes`` times (20 s at most), and found it up."""
    async with asyncio.timeout(20):
        while True:
            samples = await query(http, base, 'count_over_time(up{job="vblk"}[1m])')
            up = await query(http, base, 'up{job="vblk"}')
            if samples and float(samples[0]["value"][1]) >= scrapes:
                assert up[0]["value"][1] == "1"
                return
            await asyncio.sleep(0.2)


async def panels_without_data(http: aiohttp.ClientSession, base: str, board: dict[str, Any]) -> list[str]:
    """``title: expr -> values`` of every dashboard query that returns no finite value."""
    empty = []
    for title, expr in expressions(board):
        values = [float(s["value"][1]) for s in await query(http, base, substitute(expr))]
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{title}: {expr} -> {values}")
    return empty


async def metrics_on_no_panel(http: aiohttp.ClientSession, rig: NbdRig, *dashboards: Path) -> list[str]:
    """The metric families ``rig``'s /metrics exports that no query of ``dashboards`` names."""
    async with http.get(f"{rig.base_url}/metrics") as r:
        exposed = {
            family.name
            for family in text_string_to_metric_families(await r.text())
            if not family.name.endswith("_created")
        }
    text = "".join(dashboard.read_text() for dashboard in dashboards)
    series = "(_total|_bucket|_sum|_count)?"  # the family's own series, not a longer name
    return [name for name in sorted(exposed) if not re.search(rf"\b{name}{series}\b", text)]


async def workload(rig: NbdRig, stop: asyncio.Event) -> dict[str, int]:
    """REST writes, reads and flushes, and an out-of-range virtio read now and then."""
    counts = {"rest": 0, "ioerr": 0}
    driver = rig.service.disks["disk0"].driver
    async with aiohttp.ClientSession(rig.base_url) as http:
        i = 0
        while not stop.is_set():
            async with http.put(
                f"/v1/disks/disk0/sectors/{i % 1024}?flush=n", data=bytes([i % 256]) * 4096
            ) as r:
                assert r.status == 200
            async with http.get(
                "/v1/disks/disk0", headers={"Range": f"bytes={i * 4096}-{i * 4096 + 65535}"}
            ) as r:
                assert r.status == 206
                await r.read()
            async with http.patch("/v1/disks/disk0", json={"op": "flush"}) as r:
                assert r.status == 200
            async with http.get("/v1/disks/disk0/rings") as r:
                assert r.status == 200
            counts["rest"] += 4
            if i % 5 == 0:
                with contextlib.suppress(BlkIOError):
                    await driver.read(driver.capacity, 512)  # the device answers IOERR
                counts["ioerr"] += 1
            i += 1
            await asyncio.sleep(0.02)
    return counts


async def test_every_dashboard_query_returns_data_from_a_real_prometheus(nbd_rig: NbdRig) -> None:
    board = dashboard()
    scrape = await load_yaml(SCRAPE_CONFIG)
    [job] = [j for j in scrape["scrape_configs"] if j["job_name"] == "vblk"]
    job = {**job, "scrape_interval": "1s", "scrape_timeout": "1s"}
    job["static_configs"] = [{**job["static_configs"][0], "targets": [nbd_rig.http]}]
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": [job]}

    fio = await asyncio.create_subprocess_exec(
        tool("fio"),
        "--name=vblk",
        "--ioengine=nbd",
        f"--uri={nbd_rig.uri()}",
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=8",
        "--size=16M",
        "--time_based",
        "--runtime=60",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with aiohttp.ClientSession(nbd_rig.base_url) as http:  # a bitmap, a view and limits to show
        async with http.post("/v1/disks/disk0/bitmaps", json={"name": "b0"}) as r:
            assert r.status == 201
        async with http.post("/v1/disks/disk0/views", json={"name": "v0"}) as r:
            assert r.status == 201
        # limits to show, far above what the load reaches
        async with http.patch("/v1/disks/disk0", json={"op": "throttle", "iops-total": 10**6}) as r:
            assert r.status == 200
    stop = asyncio.Event()
    rest = asyncio.get_running_loop().create_task(workload(nbd_rig, stop))
    try:
        with tempfile.TemporaryDirectory(prefix="vblk-prometheus-") as directory:
            async with prometheus(config, Path(directory)) as base, aiohttp.ClientSession() as http:
                await wait_for_scrapes(http, base, 2)  # two scrapes of vblk under load
                assert fio.returncode is None, "fio stopped early"
                async with http.get(f"{base}/api/v1/label/__name__/values") as r:
                    known = set((await r.json())["data"])
                for title, expr in expressions(board):
                    for name in METRIC.findall(expr):
                        assert name in known, f"{title}: unknown metric {name}"
                empty = await panels_without_data(http, base, board)
                assert not empty, "panels without data:\n" + "\n".join(empty)
                by_frontend = await query(
                    http, base, "sum by (frontend) (vblk_request_duration_seconds_count)"
                )
                assert {s["metric"]["frontend"] for s in by_frontend} == {"nbd", "http"}
                for name, variable_query in variable_queries(board):
                    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable_query)
                    assert match, variable_query
                    selector, label = substitute(match.group(1)), match.group(2)
                    async with http.get(
                        f"{base}/api/v1/label/{label}/values", params={"match[]": selector}
                    ) as r:
                        assert (await r.json())["data"], f"variable {name}: {variable_query}"
                # The dashboard covers every metric vblk exports.
                uncovered = await metrics_on_no_panel(http, nbd_rig, DASHBOARD)
                assert not uncovered, f"metrics on no panel: {uncovered}"
    finally:
        stop.set()
        counts = await rest
        if fio.returncode is None:
            fio.terminate()
        _, fio_err = await fio.communicate()
    assert counts["ioerr"] >= 1 and counts["rest"] >= 8
    assert fio.returncode in (0, 128, -15), fio_err.decode()  # 128: stopped by SIGTERM
