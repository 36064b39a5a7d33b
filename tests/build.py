"""The compiled request path as built in this tree (setup.py, pyproject.toml [tool.vblk])."""

from __future__ import annotations

import importlib.machinery
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def compiled_sources() -> list[Path]:
    """The modules setup.py compiles with mypyc."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [REPO / name for name in pyproject["tool"]["vblk"]["compiled"]]


def extension_of(source: Path) -> Path | None:
    """The compiled module built in place beside ``source``, if there is one."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_suffix(suffix)
        if candidate.exists():
            return candidate
    return None


def stale_sources() -> list[Path]:
    """Compiled modules edited since ``make`` last compiled them (its stamp in the venv).

    Python would import the compiled old code. Without the stamp (not built by make) there is
    nothing to compare with; a source with no compiled module beside it (a tree built without
    them, a second work tree of the repository) is imported as it is, never stale.
    """
    stamp = Path(sys.prefix) / ".compiled"
    if not stamp.exists():
        return []
    built = stamp.stat().st_mtime
    return [
        source
        for source in compiled_sources()
        if source.stat().st_mtime > built and extension_of(source) is not None
    ]
