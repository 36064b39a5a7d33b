"""The benchmark CLI: vblk (the working tree, and vblk@REV builds) against reference NBD servers,
fio and nbdcopy round robin, medians and ratios against a baseline (``--rbd``: the Ceph row).

Wires servers.py, revisions.py, fio.py, scrape.py and report.py; ``python -m bench.nbd_compare --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    REVISIONS_DIR,
    GiB,
    MiB,
    exit_on_signals,
    first_line,
    log,
    size_argument,
    workspace,
)
from bench.fio import fio_command, nbdcopy_command, parse_fio, run_fio
from bench.model import RBD_CACHES, WORKLOADS, RunResult, Workload
from bench.rbd import check_caches, rbd_main
from bench.report import cpu_per_gib, environment, fmt, markdown, medians
from bench.revisions import RevisionCache, RevisionError, resolve_revision
from bench.scrape import fetch, parse_build_info, parse_virtio_counters, per_request, vblk_counters
from bench.servers import (
    DEFAULT_SERVERS,
    Contender,
    ProcSample,
    Server,
    ServerSpec,
    contenders,
    image_format,
    parse_servers,
    pick_baseline,
    prepare_image,
    server_for,
    settle_image,
    vblk_has_http_listen,
)

DESCRIPTION = """\
vblk against reference NBD servers, and against other vblk revisions: the same clients, one image
each, servers taken in turn.

Not a test. Starts vblk serve (the working tree, and vblk@REV: any git revision, built once in
bench/.revisions/ and reused), nbdkit file, qemu-nbd and nbdkit python (bench/peer_plugin.py) on
free loopback ports, each over its own copy of one raw image (vblk takes QEMU's image locks), runs
fio (--ioengine=nbd) and nbdcopy against each, round robin, and writes
bench/results/<timestamp>.json and .md: medians, each contender against the baseline.
Quick run: --size 256M --runs 1 --runtime 3; revisions: --servers vblk,vblk@HEAD~3,nbdkit-file.

--rbd runs the Ceph RBD row instead: a throwaway one-mon, one-memstore-OSD cluster on loopback
(tests/ceph/cluster.py), one filled image, and 4 KiB random read and write at QD32 through vblk
(backend=rbd, fio --ioengine=nbd), through qemu-nbd with its rbd driver (the peer), and straight to
the cluster with fio --ioengine=rbd (the ceiling), one at a time, round robin; all three with
librbd's cache off, then all three with its writeback cache (--rbd-cache).
"""


REST_SECONDS = 5.0  # the quiet before the at-rest memory sample


def run_workload(
    server: Server, workload: Workload, round_index: int, runtime: float, ramp: float, scratch: Path
) -> RunResult:
    """Run one workload against one server; server CPU and counters are sampled over fio's window."""
    window: list[Any] = []

    def window_start() -> None:
        window[:] = [server.sample(), vblk_counters(server.metrics_url)]

    if workload.tool == "nbdcopy":
        command = nbdcopy_command(server.uri)
        window_start()
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - started
        after, counters_after = server.sample(), vblk_counters(server.metrics_url)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
        result = RunResult(server.label, workload.key, round_index, command, elapsed)
        result.io_bytes = server.size
        result.bw_mib_s = server.size / MiB / elapsed
        requests = None
    else:
        output = scratch / f"fio-{server.label}-{workload.key}-{round_index}.json"
        command = fio_command(workload, server.uri, runtime, ramp, output)
        started = time.perf_counter()
        report = run_fio(command, output, runtime, ramp, against=server.label, at_window_start=window_start)
        after, counters_after = server.sample(), vblk_counters(server.metrics_url)
        elapsed = time.perf_counter() - started
        result = RunResult(
            server.label, workload.key, round_index, command, elapsed, **parse_fio(report, workload)
        )
        requests = result.total_ios
    before, counters_before = window
    result.server_cpu_s = after.cpu_s - before.cpu_s
    result.cpu_s_per_gib = cpu_per_gib(result.server_cpu_s, result.io_bytes)
    result.rss_kib, result.hwm_kib = after.rss_kib, after.hwm_kib
    if server.metrics_url is not None:
        result.kicks_per_req, result.irqs_per_req = per_request(counters_before, counters_after, requests)
    if workload.writes and server.image is not None:
        settle_image(server.image)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.nbd_compare",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", type=size_argument, default=GiB, help="image size [1G]")
    parser.add_argument("--runs", type=int, default=3, help="rounds; each cell is the median [3]")
    parser.add_argument("--runtime", type=float, default=10.0, help="fio seconds measured per job [10]")
    parser.add_argument("--ramp", type=float, default=2.0, help="fio ramp seconds per job [2]")
    parser.add_argument(
        "--servers",
        default=DEFAULT_SERVERS,
        help="comma list; vblk@REV is vblk built from a git revision (a commit, HEAD~3, a tag, a branch) "
        "[%(default)s]",
    )
    parser.add_argument(
        "--baseline",
        help="the contender the others are compared with, as in --servers (vblk@HEAD~3) or as labelled "
        "(vblk@1a2b3c4) [the first of --servers]",
    )
    parser.add_argument(
        "--workloads", default=",".join(w.key for w in WORKLOADS), help="comma list [%(default)s]"
    )
    parser.add_argument(
        "--vblk-disk-options", default="", help="extra vblk --disk options, e.g. io-mode=thread"
    )
    parser.add_argument(
        "--vblk-rev",
        metavar="REV",
        help="benchmark this git revision instead of the working tree: vblk in --servers becomes vblk@REV",
    )
    parser.add_argument(
        "--revisions-dir",
        type=Path,
        default=REVISIONS_DIR,
        help="where builds of vblk@REV are kept and reused [bench/.revisions]",
    )
    parser.add_argument("--workdir", type=Path, help="where the temporary images go [system temp dir]")
    parser.add_argument("--keep", action="store_true", help="keep the images and server logs")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory [bench/results]")
    parser.add_argument(
        "--rbd", action="store_true", help="run the Ceph RBD row (vblk, qemu-nbd, fio rbd) instead"
    )
    parser.add_argument("--rbd-size", type=size_argument, default=256 * MiB, help="RBD image size [256M]")
    parser.add_argument(
        "--rbd-cache",
        type=lambda text: [c for c in text.split(",") if c],
        default=list(RBD_CACHES),
        help="librbd cache modes to compare, each with all three contenders [none,writeback]",
    )
    return parser


def select_workloads(text: str) -> list[Workload]:
    by_key = {w.key: w for w in WORKLOADS}
    chosen = []
    for key in (k.strip() for k in text.split(",") if k.strip()):
        if key not in by_key:
            raise SystemExit(f"unknown workload {key!r}; known: {', '.join(by_key)}")
        chosen.append(by_key[key])
    if not chosen:
        raise SystemExit("--workloads names no workload")
    return chosen


def server_specs(args: argparse.Namespace) -> list[ServerSpec]:
    """``--servers`` with ``--vblk-rev`` applied; SystemExit with the reason when it does not parse."""
    try:
        specs = parse_servers(args.servers)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if args.vblk_rev:
        if ServerSpec("vblk") not in specs:
            raise SystemExit("--vblk-rev replaces vblk in --servers, and --servers has no vblk")
        specs = [ServerSpec("vblk", args.vblk_rev) if s == ServerSpec("vblk") else s for s in specs]
    return specs


def check_tools(specs: Sequence[ServerSpec], workloads: Sequence[Workload]) -> None:
    """The clients and servers this run needs are installed (`make tools`)."""
    kinds = {s.kind for s in specs}
    needed = ["nbdinfo"]
    needed += ["fio"] if any(w.tool == "fio" for w in workloads) else []
    needed += ["nbdcopy"] if any(w.tool == "nbdcopy" for w in workloads) else []
    needed += ["nbdkit"] if kinds & {"nbdkit-file", "nbdkit-python"} else []
    needed += ["qemu-nbd"] if any(k.startswith("qemu-nbd") for k in kinds) else []
    needed += ["qemu-img"] if any(image_format(k) != "raw" for k in kinds) else []
    for tool in needed:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found; run `make tools`")
    if "nbdkit-python" in kinds and first_line(["nbdkit", "python", "--version"]).startswith(
        ("unavailable", "nbdkit: error")
    ):
        raise SystemExit("nbdkit's python plugin is missing (Debian: nbdkit-plugin-python); run `make tools`")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rbd:
        check_caches(args.rbd_cache)
        return rbd_main(args)
    specs = server_specs(args)
    workloads = select_workloads(args.workloads)
    if args.runs < 1 or args.size < 16 * MiB or args.size % MiB:
        raise SystemExit("--runs must be ≥ 1 and --size a multiple of 1 MiB, at least 16 MiB")
    if args.runs < 3:
        log(f"--runs {args.runs}: fewer than 3 rounds, so a cell is not a median of much")
    check_tools(specs, workloads)
    cache = RevisionCache(args.revisions_dir)
    try:
        chosen = contenders(specs, resolve_revision, cache.build)
        baseline = pick_baseline(args.baseline, chosen, resolve_revision)
    except (ValueError, RevisionError) as exc:
        raise SystemExit(str(exc)) from None
    exit_on_signals()
    timestamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    env = environment()
    results: list[RunResult] = []
    final_samples: dict[str, ProcSample] = {}
    rest_samples: dict[str, ProcSample] = {}
    round_samples: dict[str, list[ProcSample | None]] = {c.label: [] for c in chosen}
    commands: dict[str, list[str]] = {}
    details = {c.label: contender_settings(c) for c in chosen}
    with workspace(args.workdir, args.keep) as work, contextlib.ExitStack() as stack:
        running: dict[str, Server] = {}
        for contender in chosen:
            http_listen = contender.vblk is not None and vblk_has_http_listen(contender.vblk)
            image = work / f"image-{contender.label}.raw"
            shape = image_format(contender.kind)
            log(f"preparing the {shape} image of {contender.label} ({args.size // MiB} MiB)")
            image = prepare_image(image, args.size, contender.kind)
            server = server_for(
                contender,
                image,
                args.size,
                work,
                disk_options=args.vblk_disk_options if contender.vblk is not None else "",
                http_listen=http_listen,
            )
            try:
                running[contender.label] = stack.enter_context(server)
            except RuntimeError as exc:
                raise SystemExit(f"{contender.label} did not start: {exc}") from None
            commands[contender.label] = server.command
            details[contender.label].update(build_info(server, contender))
        for round_index in range(args.runs):
            for workload in workloads:
                # rotate who goes first, so no server always follows another's writes
                shift = round_index % len(chosen)
                for contender in chosen[shift:] + chosen[:shift]:
                    server = running[contender.label]
                    if not server.alive:
                        continue
                    log(f"round {round_index + 1}/{args.runs} {workload.key} on {contender.label}")
                    try:
                        result = run_workload(server, workload, round_index, args.runtime, args.ramp, work)
                    except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
                        log(f"  FAILED: {exc}")
                        if not server.alive:
                            log(f"  {contender.label} died; its log ends with:\n{server.log_tail()}")
                        results.append(
                            RunResult(contender.label, workload.key, round_index, [], 0.0, error=str(exc))
                        )
                        continue
                    shown = ", ".join(f"{m}={fmt(result.metric(m))}" for m in workload.shown)
                    log(f"  {shown}, server cpu/GiB={fmt(result.cpu_s_per_gib)}")
                    results.append(result)
            for label, server in running.items():
                round_samples[label].append(server.sample() if server.alive else None)
        for label, server in running.items():
            if server.alive:
                final_samples[label] = server.sample()
        # Then once more at rest: what each keeps when no client asks anything (memory a
        # server returns after a burst shows here, not in the sample just after it).
        time.sleep(REST_SECONDS)
        for label, server in running.items():
            if server.alive:
                rest_samples[label] = server.sample()
            if args.keep:
                log(f"{label} log: {server.log_path}")

    settings: dict[str, Any] = {
        "timestamp": timestamp,
        "size": args.size,
        "runs": args.runs,
        "runtime": args.runtime,
        "ramp": args.ramp,
        "servers": [c.label for c in chosen],
        "baseline": baseline.label,
        "contenders": list(details.values()),
        "workloads": [dataclasses.asdict(w) for w in workloads],
        "vblk_disk_options": args.vblk_disk_options,
        "vblk_revision": env["vblk_git"],
        "vblk_metrics": all(d["metrics"] for d in details.values() if d["kind"] == "vblk"),
    }
    table = markdown(
        results, chosen, workloads, env, settings, final_samples, round_samples, baseline.label, rest_samples
    )
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "settings": settings,
        "environment": env,
        "server_commands": commands,
        "server_memory_kib": {n: dataclasses.asdict(s) for n, s in final_samples.items()},
        "server_memory_at_rest_kib": {n: dataclasses.asdict(s) for n, s in rest_samples.items()},
        "server_rss_kib_by_round": {
            n: [None if s is None else s.rss_kib for s in samples] for n, samples in round_samples.items()
        },
        "medians": medians(results, [c.label for c in chosen], workloads),
        "runs": [dataclasses.asdict(r) for r in results],
    }
    json_path = args.out / f"{timestamp}.json"
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    (args.out / f"{timestamp}.md").write_text(table)
    sys.stdout.write(table)
    log(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    failures = sum(1 for r in results if r.error)
    if failures:
        log(f"{failures} run(s) failed; see 'error' in the JSON")
    return 1 if failures else 0


def contender_settings(contender: Contender) -> dict[str, Any]:
    """What the JSON records of a contender: where it comes from (metrics and build added later)."""
    tree = contender.vblk
    revision = None if tree is None else tree.revision
    return {
        "label": contender.label,
        "spec": contender.spec,
        "kind": contender.kind,
        "revision": None if revision is None else revision.spec,
        "sha": None if revision is None else revision.sha,
        "root": None if tree is None else str(tree.root),
        "python": None if tree is None else tree.python,
        "metrics": False,
        "compiled": None if tree is None else tree.compiled,
    }


def build_info(server: Server, contender: Contender) -> dict[str, Any]:
    """From a started vblk's /metrics: whether it serves them, its version and compiled request path."""
    if contender.vblk is None:
        return {}
    text = fetch(server.metrics_url)
    info = None if text is None else parse_build_info(text)
    found: dict[str, Any] = {"metrics": text is not None and parse_virtio_counters(text) is not None}
    if info is not None:
        found["version"] = info.get("version")
        if info.get("compiled") in ("true", "false"):
            found["compiled"] = info["compiled"] == "true"
    return found


if __name__ == "__main__":
    sys.exit(main())
