"""Other vblk revisions as contenders: a git revision resolved, built once by its own ``make venv``
(mypyc as the product; ``VBLK_COMPILE=0``: pure) in bench/.revisions/<full-sha>[-pure]/, then reused.

Under servers.py and virtio_micro.py, which run vblk and the micro-benchmark from a build.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bench.common import REPO, REVISIONS_DIR, log

STAMP = ".bench-build.json"  # written last: a directory without it is an interrupted build
# Variables of the caller's environment that would make the revision's make, venv or interpreter
# use something other than its own tree (make bench-nbd VENV=... reaches a sub-make via MAKEFLAGS).
_FOREIGN = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "VENV", "PYTHON", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
_VENV_TARGET = re.compile(r"^venv\s*:", re.MULTILINE)


class RevisionError(RuntimeError):
    """A revision that does not resolve, or a build of one that failed (with the log's tail)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Revision:
    """A git revision as written (``HEAD~3``, a tag, a branch) and the commit it names."""

    spec: str
    sha: str  # the full commit hash
    short: str  # git's abbreviation, unique in the repository

    @property
    def label(self) -> str:
        """The contender's name in reports: ``vblk@1a2b3c4``."""
        return f"vblk@{self.short}"


@dataclasses.dataclass(frozen=True, slots=True)
class RevisionBuild:
    """A revision built in its own directory, with its own interpreter."""

    revision: Revision
    directory: Path
    compiled: bool  # the build has compiled modules beside its sources

    @property
    def python(self) -> Path:
        return self.directory / ".venv" / "bin" / "python"


def _git(repo: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    except OSError as exc:
        raise RevisionError(f"git {' '.join(args)}: {exc}") from None
    if done.returncode != 0:
        raise RevisionError(f"git {' '.join(args)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout.strip()


def resolve_revision(spec: str, repo: Path = REPO) -> Revision:
    """The commit ``spec`` names in ``repo`` (``git rev-parse``); RevisionError when it names none."""
    if not spec or spec.startswith("-") or spec != spec.strip():
        raise RevisionError(f"not a git revision: {spec!r}")
    try:
        sha = _git(repo, "rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}")
    except RevisionError:
        raise RevisionError(f"{spec!r} names no commit in {repo}") from None
    return Revision(spec, sha, _git(repo, "rev-parse", "--short", sha))


def base_python() -> str:
    """The interpreter this venv was made from: a revision's venv is made from the same one."""
    return str(getattr(sys, "_base_executable", None) or sys.executable)


def clean_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without what would point a revision's processes at another tree."""
    return {k: v for k, v in (os.environ if environ is None else environ).items() if k not in _FOREIGN}


class RevisionCache:
    """Builds of revisions under ``root``, one directory each, made once and then reused.

    ``environ`` is read for ``VBLK_COMPILE`` (``0``: pure Python) and passed to the build.
    """

    def __init__(
        self,
        root: Path = REVISIONS_DIR,
        repo: Path = REPO,
        *,
        python: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        self.repo = repo
        self.python = python or base_python()
        self.environ = dict(os.environ if environ is None else environ)
        self.compile = self.environ.get("VBLK_COMPILE", "1") != "0"

    def directory(self, revision: Revision) -> Path:
        return self.root / (revision.sha if self.compile else f"{revision.sha}-pure")

    def build(self, revision: Revision) -> RevisionBuild:
        """The build of ``revision``: the cached one if it is complete, else made now (minutes)."""
        directory = self.directory(revision)
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked(directory):
            stale = self._why_not_reusable(directory, revision)
            if stale is None:
                log(f"{revision.label} ({revision.spec}): reusing the build in {directory}")
                return self._load(directory, revision)
            if directory.exists():
                log(f"{revision.label}: rebuilding {directory} ({stale})")
                shutil.rmtree(directory)
            self._make(directory, revision)
            return self._load(directory, revision)

    @contextlib.contextmanager
    def _locked(self, directory: Path) -> Iterator[None]:
        """One build of a revision at a time, across processes (two benchmark runs, say)."""
        with (self.root / f"{directory.name}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _stamp(self, directory: Path) -> dict[str, Any] | None:
        try:
            stamp = json.loads((directory / STAMP).read_text())
        except (OSError, ValueError):
            return None
        return stamp if isinstance(stamp, dict) else None

    def _why_not_reusable(self, directory: Path, revision: Revision) -> str | None:
        stamp = self._stamp(directory)
        if stamp is None:
            return "no complete build" if directory.exists() else "not built yet"
        if stamp.get("sha") != revision.sha or stamp.get("compile") != self.compile:
            return "built from something else"
        if stamp.get("python") != self.python:
            return f"built with {stamp.get('python')}, not {self.python}"
        if not (directory / ".venv" / "bin" / "python").exists():
            return "its venv is gone"
        missing = [name for name in stamp.get("extensions", []) if not (directory / name).exists()]
        if missing:
            return f"compiled modules gone ({missing[0]}, ...)"
        return None

    def _load(self, directory: Path, revision: Revision) -> RevisionBuild:
        stamp = self._stamp(directory) or {}
        return RevisionBuild(revision, directory, bool(stamp.get("extensions")))

    def _make(self, directory: Path, revision: Revision) -> None:
        """Extract the revision (git archive) and run its ``make venv``; the stamp marks success."""
        archive = subprocess.run(
            ["git", "-C", str(self.repo), "archive", "--format=tar", revision.sha],
            capture_output=True,
            check=False,
        )
        if archive.returncode != 0:
            raise RevisionError(f"git archive {revision.sha}: {archive.stderr.decode(errors='replace')}")
        directory.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout), mode="r:") as tar:
            tar.extractall(directory, filter="data")
        makefile = directory / "Makefile"
        if not makefile.exists() or not _VENV_TARGET.search(makefile.read_text(errors="replace")):
            raise RevisionError(f"{revision.label} ({revision.spec}) has no `make venv` to build it with")
        build_log = self.root / f"{directory.name}.log"
        mode = "compiled with mypyc" if self.compile else "pure Python (VBLK_COMPILE=0)"
        log(
            f"building {revision.label} ({revision.spec}) in {directory}: make venv, {mode}; "
            f"a few minutes the first time, log in {build_log}"
        )
        env = clean_environment(self.environ)
        env["VBLK_COMPILE"] = "1" if self.compile else "0"
        command = ["make", "-C", str(directory), "venv", f"PYTHON={self.python}", "VENV=.venv"]
        with build_log.open("wb") as out:
            done = subprocess.run(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, check=False
            )
        python = directory / ".venv" / "bin" / "python"
        if done.returncode == 0 and python.exists():
            probe = subprocess.run(
                [str(python), "-c", "import service.cli"],
                cwd=directory,
                env=clean_environment(self.environ),
                capture_output=True,
                text=True,
                check=False,
            )
            if probe.returncode != 0:
                raise RevisionError(f"{revision.label}: its vblk does not import: {probe.stderr.strip()}")
        else:
            tail = "\n".join(build_log.read_text(errors="replace").splitlines()[-20:])
            raise RevisionError(
                f"{revision.label}: make venv failed ({done.returncode}); {build_log}:\n{tail}"
            )
        extensions = sorted(
            str(path.relative_to(directory))
            for pattern in ("*.so", "device/**/*.so", "driver/**/*.so", "service/**/*.so")
            for path in directory.glob(pattern)
        )
        if self.compile and not extensions:
            log(f"{revision.label}: no compiled modules (a revision before mypyc, or no C compiler)")
        stamp = {
            "sha": revision.sha,
            "spec": revision.spec,
            "compile": self.compile,
            "python": self.python,
            "extensions": extensions,
            "built": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        (directory / f"{STAMP}.tmp").write_text(json.dumps(stamp, indent=2) + "\n")
        (directory / f"{STAMP}.tmp").rename(directory / STAMP)
        log(f"{revision.label}: built ({len(extensions)} compiled modules)")
