"""Configuration: one set of names across flags, ``VBLK_*`` variables and the TOML file."""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

import aiohttp
import pytest
import structlog

from service import logs
from service.cli import build_parser
from service.config import SETTINGS, ConfigError, disks_of, from_sources, load_toml, parse_disk, resolve
from tests.service.conftest import serving


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    config_file = tmp_path / "vblk.toml"
    config_file.write_text(
        'nbd-listen = ["127.0.0.1:2000"]\nhttp_listen = "127.0.0.1:2001"\nqueue-size = 64\n'
        'log-level = "debug"\n[[disk]]\nname = "a"\nsize = "8M"\nbackend = "memory"\n'
        '[[disk]]\nname = "b"\nimage = "b.img"\nread-only = true\n'
    )
    env = {"VBLK_HTTP_LISTEN": "127.0.0.1:3001", "VBLK_QUEUE_SIZE": "128", "VBLK_LOG_LEVEL": "warning"}
    config, values = from_sources({"queue_size": "32"}, env, config_file)
    assert config.nbd_listen == ("127.0.0.1:2000",)  # file
    assert config.http_listen == ("127.0.0.1:3001",)  # env beats file
    assert values["queue-size"] == 32  # flag beats env
    assert values["log-level"] == "warning"
    assert [d.name for d in config.disks] == ["a", "b"]
    a, b = config.disks
    assert (a.size, a.backend, a.queue_size) == (8 << 20, "memory", 32)
    assert (b.path, b.read_only, b.size) == (Path("b.img"), True, 1 << 30)
    # Defaults: the embedded service.
    config, values = from_sources({}, {})
    assert config.nbd_listen == ("127.0.0.1:10809",) and config.http_listen == ("127.0.0.1:8080",)
    assert [(d.name, d.path, d.size, d.backend) for d in config.disks] == [
        ("disk0", Path("disk.img"), 1 << 30, "file")
    ]
    # VBLK_DISK holds several specs; 'none' turns a listener off; VBLK_CONFIG names the file.
    env = {
        "VBLK_DISK": "name=x,backend=memory,size=1M; name=y,backend=memory,size=2M",
        "VBLK_NBD_LISTEN": "none",
        "VBLK_NBD_SOCKET": "/tmp/n.sock",
        "VBLK_CONFIG": str(config_file),
    }
    config, _ = from_sources({}, env)
    assert [(d.name, d.size) for d in config.disks] == [("x", 1 << 20), ("y", 2 << 20)]
    assert config.nbd_listen == ("unix:/tmp/n.sock",)


@pytest.mark.parametrize(
    ("flags", "env", "toml", "message"),
    [
        ({}, {"VBLK_QUEUE_SIZE": "many"}, "", "VBLK_QUEUE_SIZE"),
        ({}, {"VBLK_IO_MODE": "sideways"}, "", "VBLK_IO_MODE"),
        ({"size": "1000"}, {}, "", "multiple of 512"),
        ({}, {}, "colour = 'blue'\n", "unknown setting 'colour'"),
        ({}, {}, "queue-size = 100\n", "power of two"),
        ({}, {}, "[[disk]]\nsize = '1M'\n", "needs name"),
        ({}, {"VBLK_DISK": "name=a;name=a"}, "", "unique"),
        ({}, {"VBLK_DISK": "name=../x"}, "", "disk name"),
        ({}, {"VBLK_HTTP_LISTEN": "localhost"}, "", "HOST:PORT"),
        ({}, {}, "nbd-listen = [", "config file"),
        ({}, {"VBLK_NBD_POLL_US": "-1"}, "", "nbd-poll-us"),
        ({}, {"VBLK_DISK": "name=a,force-share"}, "", "disk a: force-share is for read-only disks"),
        ({}, {"VBLK_DISK": "name=a,backend=memory,read-only,force-share"}, "", "file disk"),
    ],
)
def test_bad_settings_name_their_source(
    tmp_path: Path, flags: dict[str, str], env: dict[str, str], toml: str, message: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        from_sources(flags, env, path)


def test_force_share_is_a_disk_key(tmp_path: Path) -> None:
    config_file = tmp_path / "vblk.toml"
    config_file.write_text("[[disk]]\nname = 'a'\nread-only = true\nforce-share = true\n")
    config, _ = from_sources({}, {"VBLK_DISK": "name=b,read-only,force-share; name=c"})
    assert [(d.name, d.read_only, d.force_share) for d in config.disks] == [
        ("b", True, True),
        ("c", False, False),
    ]
    config, _ = from_sources({}, {}, config_file)
    assert [(d.name, d.read_only, d.force_share) for d in config.disks] == [("a", True, True)]


def test_help_documents_every_setting_with_its_variable() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = subparsers.choices["serve"].format_help()
    for setting in SETTINGS:
        assert f"--{setting.name}" in text
        assert setting.env in text
    assert "--config" in text and "TOML" in text


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_toml(tmp_path / "absent.toml")
    assert resolve({}, {}, {})["drain-timeout"] == 10.0


@pytest.mark.expect_errors("from the standard library")
def test_logs_are_json_lines_with_context_and_stdlib_routed() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, structlog.get_config())
    try:
        logs.configure("info", "auto", stream)  # not a terminal: JSON
        with structlog.contextvars.bound_contextvars(peer="127.0.0.1:5", export="disk0"):
            structlog.get_logger("vblk.test").info("hello", n=1)
        structlog.get_logger("vblk.test").debug("hidden")
        logging.getLogger("aiohttp.server").error("from the standard library")
    finally:
        structlog.configure(**saved[2])
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["hello", "from the standard library"]
    assert lines[0]["peer"] == "127.0.0.1:5" and lines[0]["export"] == "disk0" and lines[0]["n"] == 1
    assert lines[0]["level"] == "info" and lines[0]["logger"] == "vblk.test" and "timestamp" in lines[0]
    assert lines[1]["level"] == "error" and lines[1]["logger"] == "aiohttp.server"


async def test_a_disk_spec_can_name_a_fault_layer_and_the_api_shows_the_stack() -> None:
    values = resolve({"disk": [parse_disk("name=d,backend=memory,size=1M,fault=read=eio+count=1")]}, {}, {})
    [spec] = disks_of(values)
    assert spec.fault == "read=eio+count=1"
    with pytest.raises(ConfigError, match="fault"):
        disks_of(resolve({"disk": [parse_disk("name=d,backend=memory,fault=read=oops")]}, {}, {}))
    async with serving(spec) as rig, aiohttp.ClientSession() as http:
        async with http.get(f"{rig.base_url}/v1/disks/d/info") as r:
            stack = (await r.json())["stack"]
        assert [n["node"] for n in stack] == ["faults", "dirty", "memory"]
        assert stack[0]["read"] == "eio" and stack[0]["remaining"] == 1
        async with http.get(f"{rig.base_url}/v1/disks/d", headers={"Range": "bytes=0-511"}) as r:
            assert r.status == 500 and (await r.json())["error"] == "io_error"  # the planted fault
        async with http.get(f"{rig.base_url}/v1/disks/d", headers={"Range": "bytes=0-511"}) as r:
            assert r.status == 206 and await r.read() == bytes(512)  # healed after one


def _specs(*texts: str) -> tuple[object, ...]:
    return disks_of(resolve({"disk": [parse_disk(text) for text in texts]}, {}, {}))


def test_disk_specs_take_qemus_throttle_keys() -> None:
    [spec] = _specs("name=d,backend=memory,iops-total=500,bps-total=10M,iops-total-max=900,iops-size=4096")
    assert dict(spec.throttle) == {  # type: ignore[attr-defined]
        "iops-total": 500, "bps-total": 10 << 20, "iops-total-max": 900, "iops-size": 4096,
    }  # fmt: skip
    a, b = _specs("name=a,backend=memory,group=g,iops-read=50", "name=b,backend=memory,group=g")
    assert a.throttle_group == b.throttle_group == "g"  # type: ignore[attr-defined]
    for bad, message in (
        ("name=d,iops-total=5,iops-read=5", "cannot be used at the same time"),
        ("name=d,iops-size=512", "iops size requires"),
        ("name=d,iops-total=lots", "iops-total=lots: a whole number"),
        ("name=d,group=../x,iops-total=5", "group"),
        ("name=d,backend=vhost-user:/tmp/s,iops-total=5", "back end"),
    ):
        with pytest.raises(ConfigError, match=message):
            _specs(bad)
    with pytest.raises(ConfigError, match="throttle group g has other limits"):
        _specs("name=a,backend=memory,group=g,iops-total=5", "name=b,backend=memory,group=g,iops-total=6")
