"""deploy/container/Containerfile: multi-stage, non-root, volume, ports, a healthcheck that works.

No container runtime is assumed: the file is parsed, its environment is fed to vblk's own
configuration loader (so the listeners really are 0.0.0.0:10809 and 0.0.0.0:8080 and the image
really is in the volume), and its HEALTHCHECK command is run against a live vblk.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import socket
import sys
import tomllib
from pathlib import Path

from service.config import from_sources
from tests.deploy.conftest import DEPLOY, REPO
from tests.service.conftest import NbdRig, run

CONTAINERFILE = DEPLOY / "container" / "Containerfile"


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    assert not pending, "dangling line continuation"
    return result


def expand(text: str, args: dict[str, str]) -> str:
    for name, value in args.items():
        text = text.replace("${" + name + "}", value)
    return text


def stages() -> list[list[tuple[str, str]]]:
    """Each stage's instructions, its FROM first (global ARGs substituted)."""
    found: list[list[tuple[str, str]]] = []
    global_args: dict[str, str] = {}
    for keyword, arguments in instructions():
        if keyword == "ARG" and not found:
            name, _, default = arguments.partition("=")
            global_args[name] = default
        if keyword == "FROM":
            found.append([(keyword, expand(arguments, global_args))])
        elif found:
            found[-1].append((keyword, arguments))
    return found


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in stage:
        if keyword == "ENV":
            for item in shlex.split(arguments):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def test_multi_stage_build_copies_only_the_installed_venv() -> None:
    build, final = stages()
    assert build[0][1].endswith(" AS build") and "slim" in build[0][1]
    assert final[0][1] == build[0][1].removesuffix(" AS build")  # same base: the venv's python is there
    copies = [a for k, a in final if k == "COPY"]
    assert copies == ["--from=build /opt/vblk /opt/vblk"]  # no sources, no build tools
    for keyword, arguments in build:
        if keyword == "COPY" and not arguments.startswith("--"):
            *sources, _target = arguments.split()
            for source in sources:
                assert (REPO / source).exists(), source
    assert any(k == "RUN" and "pip install ." in a for k, a in build)
    # mypyc compiles the request path at pip install: the build stage has setup.py and a
    # compiler, and fails if the result is not compiled.
    build_runs = " ".join(a for k, a in build if k == "RUN")
    assert "gcc" in build_runs and "m.compiled()" in build_runs
    assert any(k == "COPY" and "setup.py" in a.split() for k, a in build)


def test_final_stage_runs_vblk_unprivileged_on_all_addresses_with_a_volume() -> None:
    _, final = stages()
    settings = {k: a for k, a in final}
    user = settings["USER"].split(":")[0]
    assert user not in ("root", "0")
    assert json.loads(settings["VOLUME"]) == ["/var/lib/vblk"]
    assert set(settings["EXPOSE"].split()) == {"10809/tcp", "8080/tcp"}
    assert json.loads(settings["ENTRYPOINT"]) == ["vblk"] and json.loads(settings["CMD"]) == ["serve"]
    assert settings["STOPSIGNAL"] == "SIGTERM"
    env = env_of(final)
    config, values = from_sources({}, environ=env)
    assert config.nbd_listen == ("0.0.0.0:10809",)
    assert config.http_listen == ("0.0.0.0:8080",)
    [disk] = config.disks
    assert disk.backend == "file" and disk.path.parent == Path("/var/lib/vblk")
    assert values["log-format"] == "json"
    assert config.drain_timeout < 10  # flushed before the runtime's SIGKILL
    # Root creates the volume directory for the unprivileged user.
    run_lines = " ".join(a for k, a in final if k == "RUN")
    assert "useradd" in run_lines and "/var/lib/vblk" in run_lines


def test_the_ui_page_ships_in_the_package() -> None:
    """pip install . (the build stage) installs the package data the /ui page needs."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["service.http"]
    static = sorted(
        p.relative_to(REPO / "service" / "http") for p in (REPO / "service/http/static").iterdir()
    )
    assert static
    for path in static:
        assert any(fnmatch.fnmatch(str(path), pattern) for pattern in patterns), path


def healthcheck_command() -> list[str]:
    _, final = stages()
    [arguments] = [a for k, a in final if k == "HEALTHCHECK"]
    options, _, command = arguments.partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv: list[str] = json.loads(command)
    assert argv[0] == "python" and "/healthz" in argv[-1]
    return [sys.executable, *argv[1:]]


async def test_healthcheck_passes_on_a_live_vblk_and_fails_without_one(nbd_rig: NbdRig) -> None:
    command = healthcheck_command()
    environ = {
        "PATH": os.environ.get("PATH", ""),
        "VBLK_HTTP_LISTEN": f"0.0.0.0:{nbd_rig.http.rsplit(':', 1)[1]}",
    }
    await run("/usr/bin/env", "-i", *(f"{k}={v}" for k, v in environ.items()), *command)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    result = await run("/usr/bin/env", "-i", f"VBLK_HTTP_LISTEN=0.0.0.0:{closed_port}", *command, check=False)
    assert result.returncode != 0
