"""A throwaway single-node Ceph cluster: one mon, one memstore OSD, cephx, loopback only.

Used by the Ceph tests and the RBD bench row. The daemons run in the foreground as children
(``-f``, their own session) so that SIGKILL plus ``wait`` ends them at once; every port comes from
a random free block; ``paxos propose interval = 0.01`` makes start-up take about a second.
Nothing is written outside the cluster directory.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

PORTS_PER_CLUSTER = 110  # mon v2, mon v1, then daemons from base+10 to base+109
REQUIRED_TOOLS = ("ceph-mon", "ceph-osd", "monmaptool", "rbd", "ceph")


class ClusterError(RuntimeError):
    """The cluster did not come up (the message has the daemon log's tail)."""


def missing_tools() -> list[str]:
    return [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]


def cephx_key() -> str:
    """A fresh cephx secret (what ``ceph-authtool --gen-print-key`` prints)."""
    header = struct.pack("<HIIH", 1, int(time.time()), 0, 16)  # AES, created, 16 bytes
    return base64.b64encode(header + os.urandom(16)).decode()


def _free_block(count: int) -> int:
    """A base port such that ``base .. base+count-1`` are all free on 127.0.0.1 right now."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - count)
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise ClusterError("no free block of ports")


CONF = """\
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon2},v1:127.0.0.1:{mon1}]
mon initial members = a
public network = 127.0.0.0/8
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
ms bind port min = {pmin}
ms bind port max = {pmax}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {d}/keyring
run dir = {d}/run
log file = {d}/log/$name.log
mon cluster log file = {d}/log/cluster.log
crash dir = {d}/crash
log to stderr = false
err to stderr = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
client mount timeout = {timeout}
rados mon op timeout = {timeout}
rados osd op timeout = {timeout}

[client]
rbd cache = false

[mon]
mon data = {d}/mon/$cluster-$id
admin socket = {d}/run/$name.asok
mon data avail warn = 1
mon data avail crit = 0
auth allow insecure global id reclaim = false
paxos propose interval = 0.01
paxos min wait = 0.01

[osd]
osd data = {d}/osd/$cluster-$id
keyring = {d}/osd/$cluster-$id/keyring
admin socket = {d}/run/$name.asok
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
memstore page set = true
memstore page size = 4096
osd op num shards = 1
osd op num threads per shard = 2
"""


class Cluster:
    """A running throwaway cluster; :meth:`start` builds it, :meth:`stop` kills it and removes all."""

    def __init__(
        self,
        directory: Path | None = None,
        *,
        client_timeout: float = 10.0,
        memstore_bytes: int = 4 << 30,
        pool: str = "rbd",
    ) -> None:
        self.directory = Path(directory or tempfile.mkdtemp(prefix="vblk-ceph-"))
        self.client_timeout = client_timeout
        self.memstore_bytes = memstore_bytes
        self.pool = pool
        self.fsid = str(uuid.uuid4())
        self.base_port = 0
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started_in = 0.0

    @property
    def conf(self) -> Path:
        return self.directory / "ceph.conf"

    @property
    def keyring(self) -> Path:
        return self.directory / "keyring"

    @property
    def mon_address(self) -> str:
        return f"127.0.0.1:{self.base_port}"

    def env(self) -> dict[str, str]:
        """The environment for Ceph command-line tools aimed at this cluster."""
        return {**os.environ, "CEPH_CONF": str(self.conf)}

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, attempts: int = 3) -> Cluster:
        missing = missing_tools()
        if missing:
            raise ClusterError(f"Ceph tools missing: {', '.join(missing)} (make tools installs them)")
        started = time.monotonic()
        last: Exception | None = None
        for _ in range(attempts):  # a port probed free may be taken before the daemon binds it
            try:
                self._bootstrap()
                self.started_in = time.monotonic() - started
                return self
            except ClusterError as exc:
                last = exc
                self.kill()
                for child in self.directory.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise ClusterError(f"cluster did not start after {attempts} attempts: {last}")

    def _bootstrap(self) -> None:
        d = self.directory
        for sub in ("run", "log", "crash", "mon/ceph-a", "osd/ceph-0"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        self.base_port = _free_block(PORTS_PER_CLUSTER)
        b = self.base_port
        self.conf.write_text(
            CONF.format(
                fsid=self.fsid,
                d=d,
                mon2=b,
                mon1=b + 1,
                pmin=b + 10,
                pmax=b + PORTS_PER_CLUSTER - 1,
                timeout=f"{self.client_timeout:g}",
                memstore_bytes=self.memstore_bytes,
            )
        )
        mon_key, admin_key, osd_key = cephx_key(), cephx_key(), cephx_key()
        self.keyring.write_text(
            f'[mon.]\n\tkey = {mon_key}\n\tcaps mon = "allow *"\n'
            f'[client.admin]\n\tkey = {admin_key}\n\tcaps mds = "allow *"\n\tcaps mgr = "allow *"\n'
            f'\tcaps mon = "allow *"\n\tcaps osd = "allow *"\n'
        )
        self.keyring.chmod(0o600)
        conf = str(self.conf)
        self._run(
            "monmaptool", "--create", "--fsid", self.fsid,
            "--addv", "a", f"[v2:127.0.0.1:{b},v1:127.0.0.1:{b + 1}]", str(d / "monmap"),
        )  # fmt: skip
        self._run("ceph-mon", "-c", conf, "--mkfs", "-i", "a", "--monmap", str(d / "monmap"))
        self._spawn("mon.a", "ceph-mon", "-f", "-c", conf, "-i", "a")
        osd_uuid = str(uuid.uuid4())
        out = self._run(
            "ceph", "-c", conf, "--connect-timeout", "20", "osd", "new", osd_uuid, "-i", "-",
            stdin=f'{{"cephx_secret": "{osd_key}"}}'.encode(),
        )  # fmt: skip
        osd_id = out.strip() or "0"
        (d / "osd" / f"ceph-{osd_id}" / "keyring").write_text(f"[osd.{osd_id}]\n\tkey = {osd_key}\n")
        self._run("ceph-osd", "-c", conf, "-i", osd_id, "--mkfs", "--key", osd_key, "--osd-uuid", osd_uuid)
        self._spawn(f"osd.{osd_id}", "ceph-osd", "-f", "-c", conf, "-i", osd_id)
        self._run("ceph", "-c", conf, "--connect-timeout", "20", "osd", "pool", "create", self.pool, "8", "8")
        self._run("rbd", "-c", conf, "pool", "init", self.pool, timeout=60)

    def _spawn(self, name: str, *argv: str) -> None:
        log = (self.directory / "log" / f"{name}.stderr").open("wb")
        # If this process dies without stop() (a killed test run), the daemons die with it. The
        # signal follows the thread that started them: call start() from the main thread.
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
        self.procs[name] = subprocess.Popen(
            [*prefix, *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        log.close()

    def _run(self, *argv: str, stdin: bytes | None = None, timeout: float = 30) -> str:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited with {proc.returncode}: {self.log_tail(name)}")
        try:
            done = subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                timeout=timeout,
                env=self.env(),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{argv[0]} {argv[-1]} timed out: {self.log_tail()}") from exc
        if done.returncode != 0:
            raise ClusterError(
                f"{' '.join(argv[:4])} exited {done.returncode}: {done.stderr.decode(errors='replace')}"
                f" {self.log_tail()}"
            )
        return done.stdout.decode()

    def log_tail(self, name: str | None = None, lines: int = 15) -> str:
        names = [name] if name else list(self.procs)
        out = []
        for n in names:
            for suffix in (".log", ".stderr"):
                path = self.directory / "log" / f"{n}{suffix}"
                with contextlib.suppress(OSError):
                    out.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-lines:]))
        return "\n".join(out)

    def kill(self) -> None:
        """SIGKILL every daemon and reap it (the cluster is gone; the directory stays)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.procs.clear()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- helpers for tests ----------------------------------------------------------------------

    def rbd(self, *args: str, timeout: float = 60) -> str:
        """Run the ``rbd`` tool against this cluster; its standard output."""
        return self._run("rbd", "-c", str(self.conf), *args, timeout=timeout)

    def ceph(self, *args: str, timeout: float = 60) -> str:
        return self._run("ceph", "-c", str(self.conf), "--connect-timeout", "20", *args, timeout=timeout)


@contextlib.contextmanager
def running_cluster(**options: float) -> Iterator[Cluster]:
    cluster = Cluster(**options)  # type: ignore[arg-type]
    try:
        yield cluster.start()
    finally:
        cluster.stop()
