"""The README and docs/ stay true: links resolve, every option is documented, the first hour works.

README.md is what a newcomer reads first, so it stays short and names what they need: the two
commands, how to run the command line, the client tools. Its options table lists every ``serve``
setting; its links, and those of every docs/ page, lead somewhere; ``make run`` installs only what
running needs and says what it is doing; ``make client-tools`` installs the walk-through's clients.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from service.config import SETTINGS
from tests.build import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings."""
    out = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return out


def test_every_relative_link_and_anchor_resolves() -> None:
    broken = []
    for page in PAGES:
        for target in _LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert broken == []


def test_the_readme_is_what_a_user_needs() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) < 26_000, "internals belong in docs/"
    for needed in ("make run", "make test", ".venv/bin/vblk", "pipx install", "make client-tools", "xxd"):
        assert needed in text, needed


def test_the_readme_documents_every_serve_option() -> None:
    text = (REPO / "README.md").read_text()
    missing = [s.name for s in SETTINGS if f"`--{s.name}" not in text]
    assert missing == []


def _make_dry_run(target: str, tmp_path: Path) -> str:
    """What ``make TARGET`` would run from scratch (a venv that does not exist yet)."""
    result = subprocess.run(
        ["make", "-n", target, f"VENV={tmp_path}/venv"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return result.stdout


def test_make_run_installs_only_what_running_needs_and_says_what_it_does(tmp_path: Path) -> None:
    plan = _make_dry_run("run", tmp_path)
    installs = [line for line in plan.splitlines() if "pip" in line and " install " in line]
    assert installs and not any("[test]" in line for line in installs), installs
    steps = re.findall(r"vblk: \[(\d)/3\]", plan)
    assert steps == ["1", "2", "3"], plan
    assert "build_ext --inplace" in plan and "serve" in plan


def test_make_client_tools_installs_the_walk_through_clients(tmp_path: Path) -> None:
    plan = _make_dry_run("client-tools", tmp_path)
    assert "install-tools.sh client" in plan
    script = (REPO / "scripts" / "install-tools.sh").read_text()
    client = script[script.index("# The walk-through's clients.") : script.index('if [ "$group" != client ]')]
    for package in ("libnbd-bin", "qemu-utils", "curl", "xxd"):
        assert package in client, package
