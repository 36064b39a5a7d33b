"""Shared ground of the benchmark harness: units, the loopback address, paths, progress lines, workspaces.

The bottom of bench/: every other module imports from here, and this imports none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from service.values import parse_size

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

HOST = "127.0.0.1"
EXPORT = "disk0"
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
REVISIONS_DIR = BENCH_DIR / ".revisions"  # builds of other revisions (git-ignored)
PEER_PLUGIN = BENCH_DIR / "peer_plugin.py"


def log(message: str) -> None:
    """Progress goes to stderr, prefixed with the program's name; reports go to stdout."""
    program = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "bench"
    sys.stderr.write(f"[{program} {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def size_argument(text: str) -> int:
    """An argparse ``type=``: a size as vblk reads one (``64M``, ``1G``; service.values)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def first_line(command: Sequence[str]) -> str:
    """The first line a tool prints (``fio --version``), or why it could not be run."""
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every ``finally`` that stops a server


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP end the run the way ^C does: servers stopped, workspace removed."""
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)


@contextlib.contextmanager
def workspace(base: Path | None, keep: bool) -> Iterator[Path]:
    """A temporary directory for images, logs and fio output; removed at the end unless ``keep``."""
    path = Path(tempfile.mkdtemp(prefix="vblk-nbd-compare-", dir=base))
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
