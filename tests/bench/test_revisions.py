"""bench/revisions.py on a throwaway git repository: revisions resolved, built by ``make venv`` once
and then reused, rebuilt when the build is incomplete or its compiled modules are gone.

The repository's ``make venv`` only writes a stand-in interpreter: nothing is compiled here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.revisions import STAMP, RevisionCache, RevisionError, clean_environment, resolve_revision

pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or shutil.which("make") is None, reason="needs git and make"
)

# The stand-in for a revision's Makefile: a "venv" whose python runs the given interpreter, a
# compiled module when VBLK_COMPILE is not 0, and a line in $BUILDS for each build.
MAKEFILE = """\
PYTHON ?= python3
VENV ?= .venv
venv:
\tmkdir -p $(VENV)/bin
\tprintf '#!/bin/sh\\nexec %s "$$@"\\n' '$(PYTHON)' > $(VENV)/bin/python
\tchmod +x $(VENV)/bin/python
\ttest "$$VBLK_COMPILE" = 0 || touch service/blk.cpython-311-x86_64-linux-gnu.so
\techo "$(notdir $(CURDIR)) VBLK_COMPILE=$$VBLK_COMPILE VENV=$(VENV)" >> $$BUILDS
"""


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@e"
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, env=env
    )
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """Three commits: the first without a Makefile, the second tagged v1 (on branch old), then HEAD."""
    repo = tmp_path / "repo"
    (repo / "service").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "service" / "__init__.py").write_text("")
    (repo / "service" / "cli.py").write_text("VERSION = 0\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "no Makefile")
    (repo / "Makefile").write_text(MAKEFILE)
    (repo / "service" / "cli.py").write_text("VERSION = 1\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "one")
    git(repo, "tag", "v1")
    git(repo, "branch", "old")
    (repo / "service" / "cli.py").write_text("VERSION = 2\n")
    git(repo, "commit", "-q", "-am", "two")
    return repo


def cache(tmp_path: Path, repo: Path, **environ: str) -> RevisionCache:
    env = {**os.environ, "BUILDS": str(tmp_path / "builds"), "PYTHONPATH": "/elsewhere", **environ}
    env["MAKEFLAGS"] = "VENV=elsewhere"  # as make bench-nbd VENV=... would hand down
    return RevisionCache(tmp_path / "revisions", repo, python=sys.executable, environ=env)


def builds(tmp_path: Path) -> list[str]:
    path = tmp_path / "builds"
    return path.read_text().splitlines() if path.exists() else []


def test_resolve(repo: Path) -> None:
    head, one = git(repo, "rev-parse", "HEAD"), git(repo, "rev-parse", "HEAD~1")
    for spec in ("v1", "old", "HEAD~1", one, one[:10]):
        revision = resolve_revision(spec, repo)
        assert revision.sha == one and revision.spec == spec
        assert revision.short == git(repo, "rev-parse", "--short", one)
        assert revision.label == f"vblk@{revision.short}"
    assert resolve_revision("main", repo).sha == head
    for bad in ("nope", "HEAD~9", "-h", "", " v1", "v1^{tree}"):
        with pytest.raises(RevisionError):
            resolve_revision(bad, repo)


def test_built_once_then_reused(tmp_path: Path, repo: Path) -> None:
    revisions = cache(tmp_path, repo)
    revision = resolve_revision("v1", repo)
    build = revisions.build(revision)
    assert build.directory == tmp_path / "revisions" / revision.sha
    assert build.compiled
    assert (build.directory / "service" / "cli.py").read_text() == "VERSION = 1\n"  # that revision's files
    stamp = json.loads((build.directory / STAMP).read_text())
    assert stamp["sha"] == revision.sha and stamp["compile"] is True
    assert stamp["extensions"] == ["service/blk.cpython-311-x86_64-linux-gnu.so"]
    # the revision's own interpreter, from its own directory, imports its own vblk
    probe = subprocess.run(
        [str(build.python), "-c", "import service.cli as c; print(c.VERSION)"],
        cwd=build.directory,
        env=clean_environment(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout == "1\n"
    # the caller's PYTHONPATH, VENV (through MAKEFLAGS) did not reach the build
    assert builds(tmp_path) == [f"{revision.sha} VBLK_COMPILE=1 VENV=.venv"]
    again = revisions.build(resolve_revision("old", repo))  # the same commit: reused
    assert again.directory == build.directory and again.revision.spec == "old"
    assert len(builds(tmp_path)) == 1


def test_incomplete_builds_are_made_again(tmp_path: Path, repo: Path) -> None:
    revisions = cache(tmp_path, repo)
    revision = resolve_revision("v1", repo)
    build = revisions.build(revision)
    (build.directory / "service" / "blk.cpython-311-x86_64-linux-gnu.so").unlink()  # make clean did
    revisions.build(revision)
    (build.directory / STAMP).unlink()  # as a build interrupted before its end leaves it
    (build.directory / "leftover").write_text("")
    revisions.build(revision)
    assert len(builds(tmp_path)) == 3
    assert not (build.directory / "leftover").exists()


def test_vblk_compile_0_is_a_build_of_its_own(tmp_path: Path, repo: Path) -> None:
    revision = resolve_revision("HEAD", repo)
    compiled = cache(tmp_path, repo).build(revision)
    pure = cache(tmp_path, repo, VBLK_COMPILE="0").build(revision)
    assert pure.directory.name == f"{revision.sha}-pure" and not pure.compiled
    assert compiled.directory.name == revision.sha and compiled.compiled
    assert builds(tmp_path)[1] == f"{revision.sha}-pure VBLK_COMPILE=0 VENV=.venv"


def test_failures_say_why(tmp_path: Path, repo: Path) -> None:
    revisions = cache(tmp_path, repo)
    with pytest.raises(RevisionError, match="has no `make venv`"):
        revisions.build(resolve_revision("HEAD~2", repo))
    broken = cache(tmp_path, repo, BUILDS="/nonexistent/dir/builds")
    with pytest.raises(RevisionError, match=r"make venv failed \(2\)(.|\n)*nonexistent"):
        broken.build(resolve_revision("HEAD", repo))
    assert not (broken.directory(resolve_revision("HEAD", repo)) / STAMP).exists()
