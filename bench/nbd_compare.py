"""vblk against reference NBD servers: the same image, the same clients, servers taken in turn.

Not a test. Starts ``vblk serve``, ``nbdkit file``, ``qemu-nbd`` and ``nbdkit python`` (with
``bench/peer_plugin.py``) on free loopback ports over one raw image, runs fio (``--ioengine=nbd``) and
nbdcopy against each, round robin, and writes ``bench/results/<timestamp>.json`` and ``.md``.
``python -m bench.nbd_compare --help``; quick run: ``--size 256M --runs 1 --runtime 3``.

``--rbd`` runs the Ceph RBD row instead: a throwaway one-mon, one-memstore-OSD cluster on loopback
(tests/ceph/cluster.py), one filled image, and 4 KiB random read and write at QD32 through vblk
(``backend=rbd``, fio ``--ioengine=nbd``), through ``qemu-nbd`` with its rbd driver (the peer), and
straight to the cluster with fio ``--ioengine=rbd`` (the ceiling), one at a time, round robin; all
three with librbd's cache off, then all three with its writeback cache (``--rbd-cache``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import importlib.metadata
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Literal

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

HOST = "127.0.0.1"
EXPORT = "disk0"
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
PEER_PLUGIN = BENCH_DIR / "peer_plugin.py"

_SIZE_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}


def log(message: str) -> None:
    """Progress goes to stderr; the table goes to stdout."""
    sys.stderr.write(f"[nbd_compare {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


# -- workloads ---------------------------------------------------------------------------------------

Metric = Literal[
    "kiops",
    "iops",
    "bw_mib_s",
    "clat_mean_us",
    "clat_p99_us",
    "cpu_s_per_gib",
    "kicks_per_req",
    "irqs_per_req",
]

METRIC_LABELS: dict[Metric, str] = {
    "kiops": "kIOPS",
    "iops": "IOPS",
    "bw_mib_s": "MiB/s",
    "clat_mean_us": "clat mean µs",
    "clat_p99_us": "clat p99 µs",
    "cpu_s_per_gib": "server CPU s/GiB",
    "kicks_per_req": "kicks/req",
    "irqs_per_req": "interrupts/req",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Workload:
    """One cell row: a fio job (``rw``, block size, depth, connections) or an nbdcopy of the image."""

    key: str
    title: str
    tool: Literal["fio", "nbdcopy"]
    shown: tuple[Metric, ...]
    rw: str = ""
    bs: int = 4 * KiB
    iodepth: int = 1
    numjobs: int = 1

    @property
    def writes(self) -> bool:
        return "write" in self.rw

    @property
    def direction(self) -> Literal["read", "write"]:
        return "write" if self.writes else "read"


WORKLOADS: tuple[Workload, ...] = (
    Workload("randread-4k-qd16", "4 KiB random read, QD16", "fio", ("kiops",), "randread", 4 * KiB, 16),
    Workload("randread-4k-qd32", "4 KiB random read, QD32", "fio", ("kiops",), "randread", 4 * KiB, 32),
    Workload("randwrite-4k-qd16", "4 KiB random write, QD16", "fio", ("kiops",), "randwrite", 4 * KiB, 16),
    Workload("read-1m-qd4", "1 MiB sequential read, QD4", "fio", ("bw_mib_s",), "read", MiB, 4),
    Workload("write-1m-qd4", "1 MiB sequential write, QD4", "fio", ("bw_mib_s",), "write", MiB, 4),
    Workload(
        "randread-4k-qd1",
        "4 KiB random read, QD1",
        "fio",
        ("iops", "clat_mean_us", "clat_p99_us"),
        "randread",
        4 * KiB,
        1,
    ),
    Workload(
        "randread-4k-4conn-qd16",
        "4 KiB random read, 4 conns x QD16",
        "fio",
        ("kiops",),
        "randread",
        4 * KiB,
        16,
        numjobs=4,
    ),
    Workload("nbdcopy-null", "nbdcopy whole image → null:", "nbdcopy", ("bw_mib_s",)),
)


def fio_command(workload: Workload, uri: str, runtime: float, ramp: float, output: Path) -> list[str]:
    """The fio command line for one workload against one NBD URI (JSON written to ``output``)."""
    command = [
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
    return command


def nbdcopy_command(uri: str) -> list[str]:
    return ["nbdcopy", uri, "null:"]


# -- servers -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ServerKind:
    """How to start one NBD server on ``image`` at ``port`` (``extra`` is a second free port)."""

    name: str
    title: str
    command: Callable[[Path, int, int], list[str]]
    metrics_url: Callable[[int], str | None] = lambda _extra: None


def vblk_executable() -> list[str]:
    """``python -m service.cli``, run in :func:`vblk_cwd_env`'s directory: that tree's vblk.

    Not the venv's ``vblk`` script: an editable install points it at whichever checkout was
    installed, which need not be the tree being measured.
    """
    return [sys.executable, "-m", "service.cli"]


def vblk_cwd_env() -> tuple[Path, dict[str, str] | None]:
    """Working directory and environment for vblk: the exported revision first on the path, if any."""
    if VBLK.source is None:
        return REPO, None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(VBLK.source), env.get("PYTHONPATH", "")) if p)
    return VBLK.source, env


def export_revision(revision: str, destination: Path) -> str:
    """Extract ``device/ driver/ service/`` of a git revision into ``destination``; returns its hash.

    A revision with a ``setup.py`` is built there as ``make`` builds the working tree (its
    request path compiled in place), so that it is measured as it would run.
    """
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", f"{revision}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    build = ["setup.py", "pyproject.toml", "README.md"]
    probe = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}:setup.py"], check=False)
    has_setup = probe.returncode == 0
    paths = ["device", "driver", "service", *(build if has_setup else [])]
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit, *paths],
        capture_output=True,
        check=True,
    ).stdout
    destination.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        tar.extractall(destination, filter="data")
    if has_setup:
        subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
            cwd=destination,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return commit


@dataclasses.dataclass(slots=True)
class VblkOptions:
    """Extra ``--disk`` options for vblk (``io-mode=thread,queues=2``) and whether it serves /metrics."""

    disk_options: str = ""
    http_listen: bool = False
    source: Path | None = None  # an exported revision (--vblk-rev); None: the installed vblk


VBLK = VblkOptions()


def vblk_has_http_listen() -> bool:
    """True when this vblk's ``serve`` takes ``--http-listen`` (the REST/metrics front end)."""
    try:
        cwd, env = vblk_cwd_env()
        text = subprocess.run(
            [*vblk_executable(), "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=cwd,
            env=env,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--http-listen" in text


def vblk_command(image: Path, port: int, extra: int) -> list[str]:
    disk = f"name={EXPORT},image={image}"
    if VBLK.disk_options:
        disk += "," + VBLK.disk_options
    command = [
        *vblk_executable(),
        "serve",
        "--disk",
        disk,
        "--nbd-listen",
        f"{HOST}:{port}",
        "--log-level",
        "warning",
    ]
    if VBLK.http_listen:
        command += ["--http-listen", f"{HOST}:{extra}"]
    return command


def vblk_metrics_url(extra: int) -> str | None:
    return f"http://{HOST}:{extra}/metrics" if VBLK.http_listen else None


def _nbdkit(port: int, *plugin: str) -> list[str]:
    return ["nbdkit", "--foreground", "--exit-with-parent", "-i", HOST, "-p", str(port), *plugin]


def nbdkit_file_command(image: Path, port: int, _extra: int) -> list[str]:
    return _nbdkit(port, "file", f"file={image}")


def qemu_nbd_command(image: Path, port: int, _extra: int) -> list[str]:
    return [
        "qemu-nbd",
        "-t",
        "--cache=writeback",
        "--aio=threads",
        "-f",
        "raw",
        "-b",
        HOST,
        "-p",
        str(port),
        "-x",
        EXPORT,
        "--shared=16",  # default 1 would refuse the multi-connection jobs
        str(image),
    ]


def nbdkit_python_command(image: Path, port: int, _extra: int) -> list[str]:
    return _nbdkit(port, "python", str(PEER_PLUGIN), f"file={image}")


SERVERS: tuple[ServerKind, ...] = (
    ServerKind("vblk", "vblk", vblk_command, vblk_metrics_url),
    ServerKind("nbdkit-file", "nbdkit file", nbdkit_file_command),
    ServerKind("qemu-nbd", "qemu-nbd", qemu_nbd_command),
    ServerKind("nbdkit-python", "nbdkit python", nbdkit_python_command),
)

_issued_ports: set[int] = set()


def free_port() -> int:
    """A loopback TCP port nothing listens on (and that this run has not handed out before)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in _issued_ports:
            _issued_ports.add(port)
            return port
    raise RuntimeError("no free port")


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the benchmark process dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclasses.dataclass(frozen=True, slots=True)
class ProcSample:
    """CPU seconds and memory of a process, from /proc/PID/stat and /proc/PID/status."""

    cpu_s: float
    rss_kib: int
    hwm_kib: int


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def sample_process(pid: int) -> ProcSample:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime is field 14 and stime field 15 of proc(5).
    cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    status: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            status[key] = int(value.split()[0])
    return ProcSample(cpu, status.get("VmRSS", 0), status.get("VmHWM", 0))


class Server:
    """A running server process: started on enter, always terminated (then killed) on exit."""

    def __init__(self, kind: ServerKind, image: Path, size: int, log_dir: Path) -> None:
        self.kind = kind
        self.image = image
        self.size = size
        self.port = free_port()
        self.extra_port = free_port()
        self.metrics_url = kind.metrics_url(self.extra_port)
        self.log_path = log_dir / f"{kind.name}.log"
        self.command = kind.command(image, self.port, self.extra_port)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd://{HOST}:{self.port}/{EXPORT}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> Server:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        log(f"starting {self.kind.name}: {' '.join(self.command)}")
        cwd, env = vblk_cwd_env() if self.kind.name == "vblk" else (REPO, None)
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,  # a terminal's ^C reaches only us; we stop the servers
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - single-threaded caller
            )
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.kind.name} exited with {self.process.returncode}: {self.log_tail()}"
                )
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.kind.name} did not listen on {self.port}") from None
                time.sleep(0.1)
        info = subprocess.run(
            ["nbdinfo", "--size", self.uri], capture_output=True, text=True, timeout=30, check=False
        )
        if info.returncode != 0 or int(info.stdout.strip() or -1) != self.size:
            raise RuntimeError(f"{self.kind.name}: nbdinfo --size {self.uri}: {info.stdout}{info.stderr}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log(f"{self.kind.name} ignored SIGTERM; killing")
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def sample(self) -> ProcSample:
        return sample_process(self.pid)


# -- kicks and interrupts (vblk only) --------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class VirtioCounters:
    """Totals of vblk's virtio notifications, and its own count of requests if it exports one."""

    kicks: float
    interrupts: float
    requests: float | None


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")
_KICKS = re.compile(r"^vblk_(?:virtqueue_)?kicks(?:_sent)?_total$")
_INTERRUPTS = re.compile(r"^vblk_(?:virtqueue_|msix_)?interrupts(?:_raised)?_total$")
_REQUESTS = re.compile(r"^vblk_(?:virtio_|driver_)?requests(?:_completed)?_total$")


def parse_virtio_counters(text: str) -> VirtioCounters | None:
    """Sum vblk's kick, interrupt and request counters from a Prometheus text exposition.

    Samples labelled as suppressed (``{...suppressed...}``) are not counted: a suppressed kick or
    interrupt is one that did not happen. ``None`` when the exposition has no kick or interrupt counter.
    """
    kicks = interrupts = requests = 0.0
    seen_kicks = seen_interrupts = seen_requests = False
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        if "suppressed" in labels:
            continue
        if _KICKS.match(name):
            kicks, seen_kicks = kicks + value, True
        elif _INTERRUPTS.match(name):
            interrupts, seen_interrupts = interrupts + value, True
        elif _REQUESTS.match(name):
            requests, seen_requests = requests + value, True
    if not (seen_kicks and seen_interrupts):
        return None
    return VirtioCounters(kicks, interrupts, requests if seen_requests else None)


def vblk_counters(server: Server) -> VirtioCounters | None:
    """Hook: kick and interrupt totals of a running vblk, or None when they cannot be read.

    Today this scrapes ``/metrics`` when ``vblk serve`` has ``--http-listen`` and the exposition carries
    ``vblk_kicks*_total`` / ``vblk_interrupts*_total`` counters (see :func:`parse_virtio_counters`).
    Another source (a control socket, a log line) goes here; the caller divides deltas by requests.
    """
    if server.metrics_url is None:
        return None
    try:
        with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
            text = response.read().decode("utf-8", errors="replace")
    except (OSError, urllib.error.URLError):
        return None
    return parse_virtio_counters(text)


# -- one measurement -------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class RunResult:
    """Every figure of one workload on one server in one round (None: not measured)."""

    server: str
    workload: str
    round: int
    command: list[str]
    elapsed_s: float
    iops: float | None = None
    bw_mib_s: float | None = None
    io_bytes: int = 0
    total_ios: int | None = None
    clat_mean_us: float | None = None
    clat_p50_us: float | None = None
    clat_p90_us: float | None = None
    clat_p99_us: float | None = None
    clat_p999_us: float | None = None
    clat_max_us: float | None = None
    server_cpu_s: float | None = None
    cpu_s_per_gib: float | None = None
    rss_kib: int | None = None
    hwm_kib: int | None = None
    kicks_per_req: float | None = None
    irqs_per_req: float | None = None
    fio_error: int | None = None
    error: str | None = None

    def metric(self, metric: Metric) -> float | None:
        if metric == "kiops":
            return None if self.iops is None else self.iops / 1000
        value = getattr(self, metric)
        return None if value is None else float(value)


def _percentile(clat: dict[str, Any], pct: str) -> float | None:
    value = clat.get("percentile", {}).get(pct)
    return None if value is None else float(value) / 1000


def parse_fio(report: dict[str, Any], workload: Workload) -> dict[str, Any]:
    """The figures of a ``--group_reporting`` fio JSON report for the workload's direction."""
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


def _per_request(before: VirtioCounters | None, after: VirtioCounters | None, ios: int | None) -> list[Any]:
    if before is None or after is None:
        return [None, None]
    requests = (
        after.requests - before.requests
        if after.requests is not None and before.requests is not None
        else float(ios or 0)
    )
    if requests <= 0:
        return [None, None]
    return [(after.kicks - before.kicks) / requests, (after.interrupts - before.interrupts) / requests]


def run_workload(
    server: Server, workload: Workload, round_index: int, runtime: float, ramp: float, scratch: Path
) -> RunResult:
    """Run one workload against one server; server CPU and counters are sampled over fio's window."""
    is_vblk = server.kind.name == "vblk"
    if workload.tool == "nbdcopy":
        command = nbdcopy_command(server.uri)
        before, counters_before = server.sample(), vblk_counters(server) if is_vblk else None
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - started
        after, counters_after = server.sample(), vblk_counters(server) if is_vblk else None
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
        result = RunResult(server.kind.name, workload.key, round_index, command, elapsed)
        result.io_bytes = server.size
        result.bw_mib_s = server.size / MiB / elapsed
        requests = None
    else:
        output = scratch / f"fio-{server.kind.name}-{workload.key}-{round_index}.json"
        command = fio_command(workload, server.uri, runtime, ramp, output)
        started = time.perf_counter()
        fio = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(ramp)  # fio measures after its ramp; so does the CPU window
            before, counters_before = server.sample(), vblk_counters(server) if is_vblk else None
            out, err = fio.communicate(timeout=runtime + ramp + 120)
        finally:
            if fio.poll() is None:
                fio.kill()
                fio.wait()
        after, counters_after = server.sample(), vblk_counters(server) if is_vblk else None
        elapsed = time.perf_counter() - started
        if fio.returncode != 0 or not output.exists():
            raise RuntimeError(
                f"fio failed ({fio.returncode}) against {server.kind.name}: {err.strip()} {out}"
            )
        report = json.loads(output.read_text())
        output.unlink()
        result = RunResult(
            server.kind.name, workload.key, round_index, command, elapsed, **parse_fio(report, workload)
        )
        requests = result.total_ios
    result.server_cpu_s = after.cpu_s - before.cpu_s
    if result.io_bytes:
        result.cpu_s_per_gib = result.server_cpu_s / (result.io_bytes / GiB)
    result.rss_kib, result.hwm_kib = after.rss_kib, after.hwm_kib
    if is_vblk:
        result.kicks_per_req, result.irqs_per_req = _per_request(counters_before, counters_after, requests)
    if workload.writes:
        settle_image(server.image)
    return result


def settle_image(image: Path) -> None:
    """Write back dirty pages after a write job, so they do not land inside the next server's run."""
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


# -- image -----------------------------------------------------------------------------------------


def fill_image(path: Path, size: int) -> None:
    """Write every byte of ``path`` with non-zero data (no holes, all in the page cache)."""
    chunk = bytearray(os.urandom(MiB))
    chunk[:] = bytes(b | 1 for b in chunk)  # non-zero everywhere
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        while offset < size:
            length = min(MiB, size - offset)
            chunk[:8] = (offset // MiB + 1).to_bytes(8, "little")
            view = memoryview(chunk)[:length]
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        os.fdatasync(fd)
    finally:
        os.close(fd)


# -- environment -----------------------------------------------------------------------------------


def _first_line(command: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


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


def _git_revision() -> str:
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


def environment() -> dict[str, Any]:
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
        "vblk_git": _git_revision(),
        "fio": _first_line(["fio", "--version"]),
        "nbdkit": _first_line(["nbdkit", "--version"]),
        "nbdkit_python_plugin_python": _nbdkit_python_version(),
        "qemu_nbd": _first_line(["qemu-nbd", "--version"]),
        "nbdcopy": _first_line(["nbdcopy", "--version"]),
    }


def _meminfo(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


# -- report ----------------------------------------------------------------------------------------


def median_of(runs: Sequence[RunResult], metric: Metric) -> float | None:
    values = [v for v in (r.metric(metric) for r in runs) if v is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(value: float | None, reference: float | None, is_peer: bool) -> str:
    text = _fmt(value)
    if is_peer and value and reference is not None:
        text += f" ({reference / value:.2f}x)"
    return text


def markdown(
    results: Sequence[RunResult],
    servers: Sequence[ServerKind],
    workloads: Sequence[Workload],
    env: dict[str, Any],
    settings: dict[str, Any],
    hwm: dict[str, ProcSample],
) -> str:
    """Median tables; a peer's cell carries (vblk ÷ peer) in brackets."""
    by_cell: dict[tuple[str, str], list[RunResult]] = {}
    for result in results:
        by_cell.setdefault((result.server, result.workload), []).append(result)
    names = [s.name for s in servers]
    has_vblk = "vblk" in names
    header = "| workload | metric | " + " | ".join(s.title for s in servers) + " |"
    rule = "|---|---|" + "---:|" * len(servers)

    def row(workload: Workload, metric: Metric) -> str:
        medians = {n: median_of(by_cell.get((n, workload.key), []), metric) for n in names}
        reference = medians.get("vblk") if has_vblk else None
        cells = [_cell(medians[n], reference, n != "vblk") for n in names]
        return f"| {workload.title} | {METRIC_LABELS[metric]} | " + " | ".join(cells) + " |"

    lines = [
        f"## vblk vs NBD peers — {settings['timestamp']}",
        "",
        f"Image {settings['size'] // MiB} MiB raw (page cache), fio `--ioengine=nbd` over TCP loopback, "
        f"median of {settings['runs']} run(s), {settings['runtime']:g} s + {settings['ramp']:g} s ramp, "
        f"servers round robin. {env['cpu_model']}, {env['nproc']} CPUs, Linux {env['kernel']}, "
        f"Python {env['python']}, {env['fio']}, {env['nbdkit']}, {env['qemu_nbd']}.",
        "",
        "Bracketed: vblk ÷ peer. For IOPS and MiB/s above 1x means vblk is faster; "
        "for latency and CPU above 1x means vblk is slower / costlier.",
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
    memory = []
    for name in names:
        sample = hwm.get(name)
        memory.append("n/a" if sample is None else f"{sample.rss_kib / KiB:.0f} / {sample.hwm_kib / KiB:.0f}")
    lines += [
        "",
        "| server memory | " + " | ".join(s.title for s in servers) + " |",
        "|---|" + "---:|" * len(servers),
    ]
    lines += ["| VmRSS / VmHWM MiB at end | " + " | ".join(memory) + " |"]
    if has_vblk:
        source = (
            "vblk_kicks_total and vblk_interrupts_total deltas from /metrics ÷ vblk_requests_total delta"
            if settings["vblk_metrics"]
            else "n/a: this vblk serves no /metrics with kick and interrupt counters"
        )
        lines += ["", f"vblk virtio notifications per virtio-blk request ({source}):", ""]
        lines += ["| workload | kicks/req | interrupts/req |", "|---|---:|---:|"]
        for workload in workloads:
            runs = by_cell.get(("vblk", workload.key), [])
            kicks, irqs = median_of(runs, "kicks_per_req"), median_of(runs, "irqs_per_req")
            lines.append(f"| {workload.title} | {_fmt(kicks)} | {_fmt(irqs)} |")
    return "\n".join(lines) + "\n"


# -- Ceph RBD row ----------------------------------------------------------------------------------

RBD_WORKLOADS: tuple[Workload, ...] = (
    Workload("rbd-randread-4k-qd32", "4 KiB random read, QD32", "fio", ("kiops",), "randread", 4 * KiB, 32),
    Workload(
        "rbd-randwrite-4k-qd32", "4 KiB random write, QD32", "fio", ("kiops",), "randwrite", 4 * KiB, 32
    ),
)
RBD_CACHES: dict[str, str] = {
    "none": "librbd cache off",
    "writeback": "librbd writeback cache (rbd_cache_policy=writeback, write-back from the first write)",
}


@dataclasses.dataclass(frozen=True, slots=True)
class RbdContender:
    """One column of the RBD row: a tool and the librbd cache mode it runs with."""

    key: str  # the results' server name
    tool: str  # "vblk", "qemu-nbd" or "fio-rbd"
    cache: str  # a key of RBD_CACHES
    title: str


RBD_CONTENDERS: tuple[RbdContender, ...] = (
    RbdContender("vblk", "vblk", "none", "vblk (rbd backend, cache=none)"),
    RbdContender("qemu-nbd", "qemu-nbd", "none", "qemu-nbd (rbd driver, --cache=none)"),
    RbdContender("fio-rbd", "fio-rbd", "none", "fio --ioengine=rbd (rbd_cache=false)"),
    RbdContender("vblk-wb", "vblk", "writeback", "vblk (rbd backend, cache=writeback)"),
    RbdContender("qemu-nbd-wb", "qemu-nbd", "writeback", "qemu-nbd (rbd driver, --cache=writeback)"),
    RbdContender("fio-rbd-wb", "fio-rbd", "writeback", "fio --ioengine=rbd (rbd_cache=true)"),
)
RBD_TARGETS = {"qemu-nbd": 2.0, "fio-rbd": 0.7}  # vblk IOPS ÷ contender IOPS (same cache mode), at least
RBD_POOL = "rbd"
RBD_IMAGE = "bench"
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


def rbd_fio_command(workload: Workload, conf: Path, runtime: float, ramp: float, output: Path) -> list[str]:
    """fio straight to the cluster through librbd (the ceiling): the same job with the rbd engine."""
    command = [
        arg
        for arg in fio_command(workload, "", runtime, ramp, output)
        if not arg.startswith(("--ioengine=", "--uri="))
    ]
    return [*command, "--ioengine=rbd", "--clientname=admin", f"--pool={RBD_POOL}", f"--rbdname={RBD_IMAGE}"]


def rbd_server_command(contender: RbdContender, conf: Path, port: int) -> list[str]:
    if contender.tool == "vblk":
        return [
            *vblk_executable(), "serve",
            "--disk",
            f"name={EXPORT},backend=rbd,pool={RBD_POOL},image={RBD_IMAGE},cache={contender.cache}",
            "--ceph-conf", str(conf), "--nbd-listen", f"{HOST}:{port}", "--http-listen", "none",
            "--log-level", "warning",
        ]  # fmt: skip
    # --cache=none: librbd's cache off; --cache=writeback: on (QEMU sets rbd_cache from it)
    return [
        "qemu-nbd", "-t", f"--cache={contender.cache}", "-f", "raw", "-b", HOST, "-p", str(port),
        "-x", EXPORT, "--shared=16", f"rbd:{RBD_POOL}/{RBD_IMAGE}:conf={conf}:id=admin",
    ]  # fmt: skip


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
            command = rbd_fio_command(workload, conf, args.runtime, args.ramp, output)
        else:
            kind = ServerKind(
                contender.tool,
                contender.title,
                lambda _i, port, _e: rbd_server_command(contender, conf, port),
            )
            server = Server(kind, work / "unused", size, work)
            server.start()
            command = fio_command(workload, server.uri, args.runtime, args.ramp, output)
        started = time.perf_counter()
        fio = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            time.sleep(args.ramp)
            before = server.sample() if server is not None else None
            out, err = fio.communicate(timeout=args.runtime + args.ramp + 120)
        finally:
            if fio.poll() is None:
                fio.kill()
                fio.wait()
        after = server.sample() if server is not None else None
        if fio.returncode != 0 or not output.exists():
            raise RuntimeError(f"fio failed ({fio.returncode}) against {name}: {err.strip()} {out}")
        report = json.loads(output.read_text())
        output.unlink()
        result = RunResult(
            name,
            workload.key,
            round_index,
            command,
            time.perf_counter() - started,
            **parse_fio(report, workload),
        )
        if before is not None and after is not None:
            result.server_cpu_s = after.cpu_s - before.cpu_s
            if result.io_bytes:
                result.cpu_s_per_gib = result.server_cpu_s / (result.io_bytes / GiB)
            result.rss_kib, result.hwm_kib = after.rss_kib, after.hwm_kib
        return result
    finally:
        if server is not None:
            server.stop()


def rbd_markdown(results: Sequence[RunResult], env: dict[str, Any], settings: dict[str, Any]) -> str:
    by_cell: dict[tuple[str, str], list[RunResult]] = {}
    for result in results:
        by_cell.setdefault((result.server, result.workload), []).append(result)

    def median(key: str, workload: Workload, metric: Metric) -> float | None:
        return median_of(by_cell.get((key, workload.key), []), metric)

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
                medians = {c.key: median(c.key, workload, metric) for c in contenders}
                cells = [_cell(medians[c.key], medians[vblk_key], c.tool != "vblk") for c in contenders]
                lines.append(f"| {workload.title} | {METRIC_LABELS[metric]} | " + " | ".join(cells) + " |")
            vblk = median(vblk_key, workload, "kiops")
            for peer in contenders:
                target = RBD_TARGETS.get(peer.tool)
                if target is None:
                    continue
                theirs = median(peer.key, workload, "kiops")
                ratio = vblk / theirs if vblk is not None and theirs else None
                met = "met" if ratio is not None and ratio >= target else "NOT met"
                verdicts.append(
                    f"- {RBD_CACHES[cache].split(' (')[0]}, {workload.title}: vblk ÷ {peer.title} = "
                    f"{_fmt(ratio)} (≥ {target:g}x: {met})"
                )
    if len(caches) > 1:
        for workload in RBD_WORKLOADS:
            vblk = median("vblk-wb", workload, "kiops")
            theirs = median("fio-rbd", workload, "kiops")
            ratio = vblk / theirs if vblk is not None and theirs else None
            verdicts.append(
                f"- not like with like, {workload.title}: vblk with its writeback cache ÷ "
                f"fio --ioengine=rbd with the cache off = {_fmt(ratio)}"
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


def rbd_main(args: argparse.Namespace) -> int:
    """The RBD row: build a cluster, fill an image, measure the three contenders round robin."""
    from tests.ceph.cluster import Cluster, missing_tools  # noqa: PLC0415 - only this mode needs Ceph

    missing = missing_tools() + [t for t in ("fio", "qemu-nbd", "nbdinfo") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)}; run `make tools`")
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    timestamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    env = environment()
    env["ceph"] = _first_line(["ceph", "--version"])
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
                        kiops, cpu = _fmt(result.metric("kiops")), _fmt(result.cpu_s_per_gib)
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


# -- main ------------------------------------------------------------------------------------------


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every ``finally`` that stops a server


@contextlib.contextmanager
def workspace(base: Path | None, keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vblk-nbd-compare-", dir=base))
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.nbd_compare", description=__doc__)
    parser.add_argument("--size", type=parse_size, default=GiB, help="image size [1G]")
    parser.add_argument("--runs", type=int, default=3, help="rounds; each cell is the median [3]")
    parser.add_argument("--runtime", type=float, default=10.0, help="fio seconds measured per job [10]")
    parser.add_argument("--ramp", type=float, default=2.0, help="fio ramp seconds per job [2]")
    parser.add_argument(
        "--servers", default=",".join(s.name for s in SERVERS), help="comma list [%(default)s]"
    )
    parser.add_argument(
        "--workloads", default=",".join(w.key for w in WORKLOADS), help="comma list [%(default)s]"
    )
    parser.add_argument(
        "--vblk-disk-options", default="", help="extra vblk --disk options, e.g. io-mode=thread"
    )
    parser.add_argument(
        "--vblk-rev", help="benchmark this git revision of vblk (exported to the temp dir) [the working tree]"
    )
    parser.add_argument("--workdir", type=Path, help="where the temporary image goes [system temp dir]")
    parser.add_argument("--keep", action="store_true", help="keep the image and server logs")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory [bench/results]")
    parser.add_argument(
        "--rbd", action="store_true", help="run the Ceph RBD row (vblk, qemu-nbd, fio rbd) instead"
    )
    parser.add_argument("--rbd-size", type=parse_size, default=256 * MiB, help="RBD image size [256M]")
    parser.add_argument(
        "--rbd-cache",
        type=lambda text: [c for c in text.split(",") if c],
        default=list(RBD_CACHES),
        help="librbd cache modes to compare, each with all three contenders [none,writeback]",
    )
    return parser


def _select(text: str, known: Sequence[Any], what: str) -> list[Any]:
    by_name = {getattr(item, "name", None) or item.key: item for item in known}
    chosen = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name not in by_name:
            raise SystemExit(f"unknown {what} {name!r}; known: {', '.join(by_name)}")
        chosen.append(by_name[name])
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rbd:
        unknown = [c for c in args.rbd_cache if c not in RBD_CACHES]
        if unknown or not args.rbd_cache:
            raise SystemExit(f"--rbd-cache: choose from {', '.join(RBD_CACHES)} (not {', '.join(unknown)})")
        return rbd_main(args)
    servers: list[ServerKind] = _select(args.servers, SERVERS, "server")
    workloads: list[Workload] = _select(args.workloads, WORKLOADS, "workload")
    if args.runs < 1 or args.size < 16 * MiB or args.size % MiB:
        raise SystemExit("--runs must be ≥ 1 and --size a multiple of 1 MiB, at least 16 MiB")
    for tool in ("fio", "nbdcopy", "nbdinfo", "nbdkit", "qemu-nbd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found; run `make tools`")
    if any(s.name == "nbdkit-python" for s in servers) and _first_line(
        ["nbdkit", "python", "--version"]
    ).startswith(("unavailable", "nbdkit: error")):
        raise SystemExit("nbdkit's python plugin is missing (Debian: nbdkit-plugin-python); run `make tools`")
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    timestamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    env = environment()
    results: list[RunResult] = []
    final_samples: dict[str, ProcSample] = {}
    commands: dict[str, list[str]] = {}
    with workspace(args.workdir, args.keep) as work, contextlib.ExitStack() as stack:
        VBLK.disk_options = args.vblk_disk_options
        if args.vblk_rev:
            VBLK.source = work / "vblk-src"
            env["vblk_git"] = export_revision(args.vblk_rev, VBLK.source)
            log(f"vblk from revision {env['vblk_git']} ({VBLK.source})")
        VBLK.http_listen = vblk_has_http_listen()
        settings: dict[str, Any] = {
            "timestamp": timestamp,
            "size": args.size,
            "runs": args.runs,
            "runtime": args.runtime,
            "ramp": args.ramp,
            "servers": [s.name for s in servers],
            "workloads": [dataclasses.asdict(w) for w in workloads],
            "vblk_disk_options": args.vblk_disk_options,
            "vblk_revision": env["vblk_git"],
            "vblk_metrics": VBLK.http_listen,
        }
        image = work / "image.raw"
        log(f"writing {args.size // MiB} MiB of non-zero data to {image}")
        fill_image(image, args.size)
        running: dict[str, Server] = {}
        for kind in servers:
            running[kind.name] = stack.enter_context(Server(kind, image, args.size, work))
            commands[kind.name] = running[kind.name].command
        for round_index in range(args.runs):
            for workload in workloads:
                # rotate who goes first, so no server always follows another's writes
                order = servers[round_index % len(servers) :] + servers[: round_index % len(servers)]
                for kind in order:
                    server = running[kind.name]
                    if not server.alive:
                        continue
                    log(f"round {round_index + 1}/{args.runs} {workload.key} on {kind.name}")
                    try:
                        result = run_workload(server, workload, round_index, args.runtime, args.ramp, work)
                    except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
                        log(f"  FAILED: {exc}")
                        if not server.alive:
                            log(f"  {kind.name} died; its log ends with:\n{server.log_tail()}")
                        results.append(
                            RunResult(kind.name, workload.key, round_index, [], 0.0, error=str(exc))
                        )
                        continue
                    shown = ", ".join(f"{m}={_fmt(result.metric(m))}" for m in workload.shown)
                    log(f"  {shown}, server cpu/GiB={_fmt(result.cpu_s_per_gib)}")
                    results.append(result)
        for name, server in running.items():
            if server.alive:
                final_samples[name] = server.sample()
            if args.keep:
                log(f"{name} log: {server.log_path}")

    table = markdown(results, servers, workloads, env, settings, final_samples)
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "settings": settings,
        "environment": env,
        "server_commands": commands,
        "server_memory_kib": {n: dataclasses.asdict(s) for n, s in final_samples.items()},
        "medians": {
            f"{name}/{w.key}": {
                m: median_of([r for r in results if r.server == name and r.workload == w.key], m)
                for m in (*w.shown, "cpu_s_per_gib", "kicks_per_req", "irqs_per_req")
            }
            for name in (s.name for s in servers)
            for w in workloads
        },
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


if __name__ == "__main__":
    sys.exit(main())
