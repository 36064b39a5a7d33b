"""Fixtures for deploy/ tests: the repository's deploy files, real tools, a running vblk."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.service.conftest import nbd_rig  # re-exported: an in-process vblk with NBD and HTTP

__all__ = ["DEPLOY", "REPO", "nbd_rig", "tool", "vblk_command"]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def tool(name: str) -> str:
    """The path of a real tool; a missing one fails the test (``make tools`` installs it)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make tools` (scripts/install-tools.sh) as root")
    return path


def vblk_command() -> str:
    """The installed ``vblk`` console script of the interpreter running the tests."""
    path = Path(sys.executable).with_name("vblk")
    if not path.exists():
        pytest.fail(f"{path} is missing: install vblk into the test environment (pip install -e .)")
    return str(path)
