"""The servers under test: ``--servers`` specs (vblk, vblk@REV, nbdkit, qemu-nbd, the RBD variants),
their command lines and processes, ready once nbdinfo answers, sampled for CPU and RSS from /proc.

Between revisions.py (where a ``vblk@REV`` runs from) and the runners (nbd_compare.py, rbd.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.common import EXPORT, HOST, PEER_PLUGIN, REPO, MiB, log
from bench.model import RBD_IMAGE, RBD_POOL, RbdContender
from bench.revisions import Revision, RevisionBuild, clean_environment

# The servers --servers knows, and their column titles; vblk also as vblk@REV.
KINDS: dict[str, str] = {
    "vblk": "vblk",
    "nbdkit-file": "nbdkit file",
    "qemu-nbd": "qemu-nbd",
    "nbdkit-python": "nbdkit python",
    # The same data in a qcow2 image (every cluster allocated), and an empty one (writes allocate).
    "vblk-qcow2": "vblk qcow2",
    "qemu-nbd-qcow2": "qemu-nbd qcow2",
    "vblk-qcow2-thin": "vblk qcow2 thin",
    "qemu-nbd-qcow2-thin": "qemu-nbd qcow2 thin",
    # vblk with one recording dirty bitmap (what dirty tracking costs), and with a point-in-time
    # view open (what copy-before-write costs: each first write to a 64 KiB cluster copies it).
    "vblk-bitmap": "vblk bitmap",
    "vblk-view": "vblk view",
    # vblk's driver and device on packed virtqueues (VIRTIO_F_RING_PACKED) instead of split ones.
    "vblk-packed": "vblk packed",
}
DEFAULT_SERVERS = "vblk,nbdkit-file,qemu-nbd,nbdkit-python"


def image_format(kind: str) -> str:
    """``raw``, ``qcow2`` (allocated) or ``qcow2-thin`` (empty): the image a kind serves."""
    return "qcow2-thin" if kind.endswith("-qcow2-thin") else "qcow2" if kind.endswith("-qcow2") else "raw"


# -- --servers -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ServerSpec:
    """One item of ``--servers``: a server kind, and for ``vblk@REV`` the git revision as written."""

    kind: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.kind if self.revision is None else f"{self.kind}@{self.revision}"


def parse_server(item: str) -> ServerSpec:
    """``vblk``, ``vblk@HEAD~3``, ``nbdkit-file``, ...; ValueError for anything else."""
    kind, at, revision = item.strip().partition("@")
    if kind not in KINDS:
        raise ValueError(f"unknown server {item.strip()!r}; known: {', '.join(KINDS)}, vblk@REV")
    if at and kind != "vblk" and not kind.startswith("vblk-"):
        raise ValueError(f"{item.strip()!r}: only vblk takes @REV")
    if at and not revision.strip():
        raise ValueError(f"{item.strip()!r}: a git revision goes after @ (vblk@HEAD~1, vblk@v1.0)")
    return ServerSpec(kind, revision.strip() if at else None)


def parse_servers(text: str) -> list[ServerSpec]:
    """The comma list of ``--servers``, in order; ValueError when empty, unknown or repeated."""
    specs = [parse_server(item) for item in text.split(",") if item.strip()]
    if not specs:
        raise ValueError("--servers names no server")
    seen: set[str] = set()
    for spec in specs:
        if str(spec) in seen:
            raise ValueError(f"{spec} is named twice in --servers")
        seen.add(str(spec))
    return specs


@dataclasses.dataclass(frozen=True, slots=True)
class VblkTree:
    """Where a vblk contender runs from: the working tree (this interpreter) or a revision's build."""

    root: Path
    python: str
    revision: Revision | None = None
    env: dict[str, str] | None = None  # None: this process's environment
    compiled: bool | None = None  # for a build, whether it has compiled modules; None: not known here

    @classmethod
    def working_tree(cls) -> VblkTree:
        """``python -m service.cli`` in this tree: not the venv's ``vblk`` script, which an editable
        install points at whichever checkout was installed, not necessarily the one measured."""
        return cls(REPO, sys.executable)

    @classmethod
    def from_build(cls, build: RevisionBuild) -> VblkTree:
        return cls(build.directory, str(build.python), build.revision, clean_environment(), build.compiled)

    def executable(self) -> list[str]:
        return [self.python, "-m", "service.cli"]


@dataclasses.dataclass(frozen=True, slots=True)
class Contender:
    """One column of a report: ``vblk`` (the working tree), ``vblk@1a2b3c4``, ``nbdkit-file``, ..."""

    label: str
    kind: str
    title: str
    spec: str  # as written in --servers
    vblk: VblkTree | None = None  # for the vblk kinds


def contenders(
    specs: Sequence[ServerSpec],
    resolve: Callable[[str], Revision],
    build: Callable[[Revision], RevisionBuild],
) -> list[Contender]:
    """The contenders of ``specs``: every revision resolved first (a typo fails at once), then built.

    ValueError when two specs are the same server (``vblk@main`` and ``vblk@HEAD`` on one commit).
    """
    revisions = {str(s): resolve(s.revision) for s in specs if s.revision is not None}
    labels = [revisions[str(s)].label if s.revision is not None else s.kind for s in specs]
    for label in labels:
        if labels.count(label) > 1:
            named = " and ".join(str(s) for s, lab in zip(specs, labels, strict=True) if lab == label)
            raise ValueError(f"{named} are the same server ({label})")
    chosen = []
    for spec, label in zip(specs, labels, strict=True):
        if spec.revision is not None:
            tree = VblkTree.from_build(build(revisions[str(spec)]))
            chosen.append(Contender(label, spec.kind, label, str(spec), tree))
        elif spec.kind.startswith("vblk"):
            chosen.append(Contender(label, spec.kind, KINDS[spec.kind], str(spec), VblkTree.working_tree()))
        else:
            chosen.append(Contender(label, spec.kind, KINDS[spec.kind], str(spec)))
    return chosen


def pick_baseline(
    text: str | None, chosen: Sequence[Contender], resolve: Callable[[str], Revision]
) -> Contender:
    """The contender ``--baseline`` names (a label, or a spec as in --servers); the first by default."""
    if not text:
        return chosen[0]
    by_label = {c.label: c for c in chosen}
    if text.strip() in by_label:
        return by_label[text.strip()]
    spec = parse_server(text)
    label = resolve(spec.revision).label if spec.revision is not None else spec.kind
    if label not in by_label:
        raise ValueError(f"--baseline {text}: {label} is not among --servers ({', '.join(by_label)})")
    return by_label[label]


# -- command lines ---------------------------------------------------------------------------------


def vblk_command(
    tree: VblkTree,
    image: Path,
    port: int,
    http_port: int | None,
    disk_options: str = "",
    extra: Sequence[str] = (),
) -> list[str]:
    """``vblk serve`` of one disk on ``image``, the same for every vblk contender but its interpreter
    (and ``extra`` arguments: ``--ring packed`` for ``vblk-packed``)."""
    disk = f"name={EXPORT},image={image}"
    if disk_options:
        disk += "," + disk_options
    command = [
        *tree.executable(),
        "serve",
        "--disk",
        disk,
        "--nbd-listen",
        f"{HOST}:{port}",
        "--log-level",
        "warning",
        *extra,
    ]
    if http_port is not None:
        command += ["--http-listen", f"{HOST}:{http_port}"]
    return command


def vblk_has_http_listen(tree: VblkTree) -> bool:
    """True when this vblk's ``serve`` takes ``--http-listen`` (the REST/metrics front end)."""
    try:
        text = subprocess.run(
            [*tree.executable(), "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=tree.root,
            env=tree.env,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--http-listen" in text


def _nbdkit(port: int, *plugin: str) -> list[str]:
    return ["nbdkit", "--foreground", "--exit-with-parent", "-i", HOST, "-p", str(port), *plugin]


def nbdkit_file_command(image: Path, port: int) -> list[str]:
    return _nbdkit(port, "file", f"file={image}")


def nbdkit_python_command(image: Path, port: int) -> list[str]:
    return _nbdkit(port, "python", str(PEER_PLUGIN), f"file={image}")


def qemu_nbd_command(image: Path, port: int, image_format: str = "raw") -> list[str]:
    return [
        "qemu-nbd",
        "-t",
        "--cache=writeback",
        "--aio=threads",
        "-f",
        image_format,
        "-b",
        HOST,
        "-p",
        str(port),
        "-x",
        EXPORT,
        "--shared=16",  # default 1 would refuse the multi-connection jobs
        str(image),
    ]


PEER_COMMANDS: dict[str, Callable[[Path, int], list[str]]] = {
    "nbdkit-file": nbdkit_file_command,
    "qemu-nbd": qemu_nbd_command,
    "nbdkit-python": nbdkit_python_command,
    "qemu-nbd-qcow2": lambda image, port: qemu_nbd_command(image, port, "qcow2"),
    "qemu-nbd-qcow2-thin": lambda image, port: qemu_nbd_command(image, port, "qcow2"),
}


def rbd_server_command(contender: RbdContender, conf: Path, port: int, tree: VblkTree) -> list[str]:
    """vblk with an RBD disk, or qemu-nbd with its rbd driver, on the bench image of ``conf``'s cluster."""
    if contender.tool == "vblk":
        return [
            *tree.executable(), "serve",
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


# -- processes -------------------------------------------------------------------------------------

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

    def __init__(
        self,
        label: str,
        command: list[str],
        *,
        port: int,
        size: int,
        log_dir: Path,
        image: Path | None = None,
        metrics_url: str | None = None,
        cwd: Path = REPO,
        env: dict[str, str] | None = None,
        ready: Callable[[], None] | None = None,
    ) -> None:
        """``ready`` runs once the server answers (a contender's set-up over its REST API)."""
        self.label = label
        self.ready = ready
        self.command = command
        self.port = port
        self.size = size
        self.image = image
        self.metrics_url = metrics_url
        self.cwd = cwd
        self.env = env
        self.log_path = log_dir / f"{label}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd://{HOST}:{self.port}/{EXPORT}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.label} is not running")
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
        log(f"starting {self.label}: {' '.join(self.command)}")
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,  # a terminal's ^C reaches only us; we stop the servers
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - single-threaded caller
            )
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the port accepts and ``nbdinfo --size`` reads the expected size; RuntimeError if not."""
        process = self.process
        if process is None:
            raise RuntimeError(f"{self.label} is not started")
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {process.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.label} did not listen on {self.port}") from None
                time.sleep(0.1)
        info = subprocess.run(
            ["nbdinfo", "--size", self.uri], capture_output=True, text=True, timeout=30, check=False
        )
        if info.returncode != 0 or int(info.stdout.strip() or -1) != self.size:
            raise RuntimeError(f"{self.label}: nbdinfo --size {self.uri}: {info.stdout}{info.stderr}")
        if self.ready is not None:
            self.ready()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log(f"{self.label} ignored SIGTERM; killing")
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def sample(self) -> ProcSample:
        return sample_process(self.pid)


def server_for(
    contender: Contender,
    image: Path,
    size: int,
    log_dir: Path,
    *,
    disk_options: str = "",
    http_listen: bool = False,
) -> Server:
    """The (not yet started) server of one contender on ``image``, on free loopback ports."""
    port = free_port()
    if contender.vblk is not None:
        tree = contender.vblk
        setup = _SETUPS.get(contender.kind)
        http_port = free_port() if http_listen or setup is not None else None
        if image_format(contender.kind) != "raw":
            disk_options = ",".join(o for o in ("format=qcow2", disk_options) if o)
        return Server(
            contender.label,
            vblk_command(tree, image, port, http_port, disk_options, _EXTRA.get(contender.kind, ())),
            port=port,
            size=size,
            log_dir=log_dir,
            image=image,
            metrics_url=None if http_port is None else f"http://{HOST}:{http_port}/metrics",
            cwd=tree.root,
            env=tree.env,
            ready=functools.partial(setup, f"http://{HOST}:{http_port}") if setup is not None else None,
        )
    command = PEER_COMMANDS[contender.kind](image, port)
    return Server(contender.label, command, port=port, size=size, log_dir=log_dir, image=image)


def _post(url: str, body: dict[str, object]) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        if response.status != 201:
            raise RuntimeError(f"POST {url}: {response.status}")


def add_bitmap(base_url: str) -> None:
    """One recording dirty bitmap (64 KiB granularity, in memory) on the bench disk."""
    _post(f"{base_url}/v1/disks/{EXPORT}/bitmaps", {"name": "bench", "persistent": False})


def add_view(base_url: str) -> None:
    """A point-in-time view of the bench disk (its scratch file beside the image)."""
    _post(f"{base_url}/v1/disks/{EXPORT}/views", {"name": "bench-view"})


_SETUPS: dict[str, Callable[[str], None]] = {"vblk-bitmap": add_bitmap, "vblk-view": add_view}
_EXTRA: dict[str, tuple[str, ...]] = {"vblk-packed": ("--ring", "packed")}


# -- images ----------------------------------------------------------------------------------------


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


def prepare_image(path: Path, size: int, kind: str) -> Path:
    """The image a contender serves: raw filled with data, the same converted to qcow2 (every
    cluster allocated, 64 KiB clusters), or an empty qcow2 image. Returns its path."""
    shape = image_format(kind)
    if shape == "qcow2-thin":
        path = path.with_suffix(".qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
        return path
    fill_image(path, size)
    if shape == "raw":
        return path
    qcow2 = path.with_suffix(".qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(path), str(qcow2)], check=True)
    path.unlink()
    settle_image(qcow2)  # its pages written back now, not during the first round
    return qcow2


def settle_image(image: Path) -> None:
    """Write back dirty pages after a write job, so they do not land inside the next server's run."""
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
