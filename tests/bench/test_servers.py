"""bench/servers.py: ``--servers`` with vblk@REV, the contenders and their labels, ``--baseline``."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.nbd_compare import build_parser, server_specs
from bench.revisions import Revision, RevisionBuild, RevisionError
from bench.servers import (
    DEFAULT_SERVERS,
    Contender,
    ServerSpec,
    VblkTree,
    contenders,
    parse_servers,
    pick_baseline,
    server_for,
    vblk_command,
)

SHAS = {
    "HEAD~3": "1111111aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "v1.0": "2222222bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
    "main": "3333333ccccccccccccccccccccccccccccccccc",
    "HEAD": "3333333ccccccccccccccccccccccccccccccccc",  # main and HEAD: one commit
}


def resolve(spec: str) -> Revision:
    if spec not in SHAS:
        raise RevisionError(f"{spec!r} names no commit")
    return Revision(spec, SHAS[spec], SHAS[spec][:7])


class FakeBuilds:
    """Stands in for RevisionCache.build: records what was built, builds nothing."""

    def __init__(self) -> None:
        self.built: list[str] = []

    def __call__(self, revision: Revision) -> RevisionBuild:
        self.built.append(revision.sha)
        return RevisionBuild(revision, Path("/cache") / revision.sha, compiled=True)


def test_parse_servers() -> None:
    assert parse_servers("vblk,vblk@HEAD~3,nbdkit-file,qemu-nbd") == [
        ServerSpec("vblk"),
        ServerSpec("vblk", "HEAD~3"),
        ServerSpec("nbdkit-file"),
        ServerSpec("qemu-nbd"),
    ]
    assert parse_servers(" vblk@v1.0 , nbdkit-python,") == [
        ServerSpec("vblk", "v1.0"),
        ServerSpec("nbdkit-python"),
    ]
    # only the first @ separates: a reflog revision keeps its own
    assert parse_servers("vblk@HEAD@{1}") == [ServerSpec("vblk", "HEAD@{1}")]
    assert [str(s) for s in parse_servers(DEFAULT_SERVERS)] == [
        "vblk",
        "nbdkit-file",
        "qemu-nbd",
        "nbdkit-python",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("vblk,nbd-server", "unknown server 'nbd-server'"),
        ("qemu-nbd@HEAD~1", "only vblk takes @REV"),
        ("vblk@", "a git revision goes after @"),
        ("vblk@HEAD,vblk@HEAD", "vblk@HEAD is named twice"),
        (" , ", "names no server"),
    ],
)
def test_parse_servers_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_servers(text)


def test_contenders_label_revisions_by_short_sha() -> None:
    builds = FakeBuilds()
    chosen = contenders(parse_servers("vblk,vblk@HEAD~3,vblk@v1.0,nbdkit-file"), resolve, builds)
    assert [c.label for c in chosen] == ["vblk", "vblk@1111111", "vblk@2222222", "nbdkit-file"]
    assert [c.title for c in chosen] == ["vblk", "vblk@1111111", "vblk@2222222", "nbdkit file"]
    assert builds.built == [SHAS["HEAD~3"], SHAS["v1.0"]]
    working, old = chosen[0].vblk, chosen[1].vblk
    assert working is not None and working.revision is None and working.env is None
    assert old is not None and old.root == Path("/cache") / SHAS["HEAD~3"]
    assert old.python == f"/cache/{SHAS['HEAD~3']}/.venv/bin/python" and old.compiled is True
    assert old.env is not None and "PYTHONPATH" not in old.env and "VIRTUAL_ENV" not in old.env
    assert chosen[3].vblk is None


def test_same_commit_twice_and_bad_revisions_fail_before_any_build() -> None:
    builds = FakeBuilds()
    with pytest.raises(ValueError, match=r"vblk@main and vblk@HEAD are the same server \(vblk@3333333\)"):
        contenders(parse_servers("vblk@HEAD~3,vblk@main,vblk@HEAD"), resolve, builds)
    with pytest.raises(RevisionError, match="'nope' names no commit"):
        contenders(parse_servers("vblk@HEAD~3,vblk@nope"), resolve, builds)
    assert builds.built == []


def test_baseline() -> None:
    chosen = contenders(parse_servers("nbdkit-file,vblk,vblk@HEAD~3"), resolve, FakeBuilds())
    assert pick_baseline(None, chosen, resolve).label == "nbdkit-file"  # the first by default
    assert pick_baseline("vblk", chosen, resolve).label == "vblk"
    assert pick_baseline("vblk@HEAD~3", chosen, resolve).label == "vblk@1111111"  # as in --servers
    assert pick_baseline("vblk@1111111", chosen, resolve).label == "vblk@1111111"  # as labelled
    with pytest.raises(ValueError, match="vblk@2222222 is not among --servers"):
        pick_baseline("vblk@v1.0", chosen, resolve)
    with pytest.raises(ValueError, match="unknown server"):
        pick_baseline("nbd-server", chosen, resolve)


def test_vblk_rev_replaces_the_working_tree() -> None:
    args = build_parser().parse_args(["--servers", "vblk,qemu-nbd", "--vblk-rev", "HEAD~1"])
    assert server_specs(args) == [ServerSpec("vblk", "HEAD~1"), ServerSpec("qemu-nbd")]
    args = build_parser().parse_args(["--servers", "qemu-nbd", "--vblk-rev", "HEAD~1"])
    with pytest.raises(SystemExit, match="has no vblk"):
        server_specs(args)


def test_every_vblk_gets_the_same_arguments(tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    mine = vblk_command(VblkTree(tmp_path, "/venv/bin/python"), image, 10809, 8080, "io-mode=thread")
    theirs = vblk_command(VblkTree(tmp_path, "/old/.venv/bin/python"), image, 10809, 8080, "io-mode=thread")
    assert mine[0] == "/venv/bin/python" and theirs[0] == "/old/.venv/bin/python"
    assert mine[1:] == theirs[1:]
    assert mine[1:] == [
        "-m", "service.cli", "serve", "--disk", f"name=disk0,image={image},io-mode=thread",
        "--nbd-listen", "127.0.0.1:10809", "--log-level", "warning", "--http-listen", "127.0.0.1:8080",
    ]  # fmt: skip
    assert "--http-listen" not in vblk_command(VblkTree(tmp_path, "python"), image, 1, None)
    tree = VblkTree(tmp_path, "python")
    packed = server_for(
        Contender("vblk-packed", "vblk-packed", "vblk packed", "vblk-packed", tree), image, 1 << 20, tmp_path
    )
    assert packed.command[packed.command.index("--ring") + 1] == "packed"
