"""Configuration: command-line flags, a TOML file and ``VBLK_*`` variables, one set of names.

Service layer, beside the CLI. Each setting has one name, spelled ``--nbd-listen`` as a flag,
``nbd-listen`` (or ``nbd_listen``) in the TOML file and ``VBLK_NBD_LISTEN`` in the
environment. A flag beats the environment, which beats the file, which beats the default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from device.block.faults import FaultPlan
from device.block.locks import lock_mode
from device.block.rbd import CACHE_MODES
from device.block.throttle import LIMIT_KEYS, ThrottleError, ThrottleLimits
from device.machine import MAX_ROOT_PORTS
from service.model import CephOptions, DiskSpec, SecurityConfig, ServiceConfig
from service.nbd.settings import NbdLimits
from service.security import SecurityConfigError, Tokens
from service.values import DISK_NAME, boolean, format_size, parse_size

DISK_KEYS = (
    "name",
    "image",
    "size",
    "backend",
    "read-only",
    "force-share",
    "grow",
    "queues",
    "queue-size",
    "io-mode",
    "pool",
    "create",
    "cache",
    "format",
    "l2-cache-size",
    "snapshot",
    "fault",
    "group",
    *LIMIT_KEYS,
)
FORMATS = ("raw", "qcow2")
BACKENDS = ("file", "memory", "rbd")
IO_MODES = ("inline", "thread")
LOG_FORMATS = ("auto", "json", "console")


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting and where it came from."""


def parse_bool(text: str | bool) -> bool:
    """Yes or no as :func:`service.values.boolean` reads it; empty is no (``VBLK_READ_ONLY=``)."""
    if isinstance(text, bool):
        return text
    value = boolean(str(text)) if str(text).strip() else False
    if value is None:
        raise ValueError(f"not a boolean: {text!r}")
    return value


def _choice(choices: Sequence[str]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = str(value)
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return convert


def parse_backend(value: Any) -> str:
    """``file``, ``memory`` or ``vhost-user:SOCKET`` (the disk is that back end's device)."""
    text = str(value)
    if text.startswith("vhost-user:") and len(text) > len("vhost-user:"):
        return text
    return _choice(BACKENDS)(text)


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"not an integer: {value!r}")
    return int(value)


def _listen_list(value: Any) -> list[str]:
    items = value if isinstance(value, list) else re.split(r"[\s,]+", str(value).strip())
    return [str(item) for item in items if str(item)]


@dataclasses.dataclass(frozen=True, slots=True)
class Setting:
    name: str  # flag spelling without the dashes
    default: Any
    convert: Callable[[Any], Any]
    help: str
    metavar: str | None = None

    @property
    def shown_default(self) -> str:
        """The default as a user writes it (``1G``, ``127.0.0.1:10809``, ``10``), or empty."""
        default = self.default
        if default is None or default is False or default == []:
            return ""
        if self.convert is parse_size:
            return format_size(default)
        if isinstance(default, list):
            return ",".join(str(item) for item in default)
        if isinstance(default, float) and default.is_integer():
            return str(int(default))
        return str(default)

    @property
    def env(self) -> str:
        return "VBLK_" + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


SETTINGS: tuple[Setting, ...] = (
    Setting("name", "disk0", str, "disk (export) name", "NAME"),
    Setting(
        "backend",
        "file",
        parse_backend,
        "storage backend: file, memory, rbd (a Ceph RBD image; see --disk pool=,image=), "
        "or vhost-user:SOCKET (a vhost-user-blk back end's device)",
        "KIND",
    ),
    Setting("image", "disk.img", str, "raw image file (created sparse if missing)", "PATH"),
    Setting(
        "size",
        1 << 30,
        parse_size,
        "size of a new image (512, 64M, 1G, ...); an existing image must have it, if given",
        "SIZE",
    ),
    Setting("grow", False, parse_bool, "grow an existing image that is smaller than --size"),
    Setting("read-only", False, parse_bool, "export read-only (VIRTIO_BLK_F_RO)"),
    Setting("queues", 1, _int, "virtqueues per disk (VIRTIO_BLK_F_MQ)", "N"),
    Setting("queue-size", 256, _int, "descriptors per virtqueue", "N"),
    Setting("io-mode", "inline", _choice(IO_MODES), "backend I/O on the event loop or in threads", "MODE"),
    Setting(
        "ring",
        "split",
        _choice(("split", "packed")),
        "the virtqueue layout the driver asks for: split, or packed (VIRTIO_F_RING_PACKED)",
        "LAYOUT",
    ),
    Setting("disk", [], list, "a disk: name=N[,image=P][,size=S][,backend=B][,fault=PLAN]...", "SPEC"),
    Setting("ceph-conf", None, str, "ceph.conf for rbd disks (default: $CEPH_CONF, /etc/ceph)", "FILE"),
    Setting("ceph-id", "admin", str, "cephx user for rbd disks (client.ID)", "ID"),
    Setting("ceph-keyring", None, str, "keyring for the cephx user (default: ceph.conf's)", "FILE"),
    Setting("ceph-timeout", 30.0, float, "seconds for every Ceph operation before it fails", "SECONDS"),
    Setting("take-over", False, parse_bool, "rbd: break a dead vblk's image lock (blocklisting it)"),
    Setting(
        "malloc",
        "auto",
        _choice(("auto", "system")),
        "auto: preload tcmalloc when a disk is rbd and it is installed; system: the C library's",
        "KIND",
    ),
    Setting(
        "nbd-listen", ["127.0.0.1:10809"], _listen_list, "NBD TCP listener(s); 'none' for none", "HOST:PORT"
    ),
    Setting("nbd-socket", None, str, "also serve NBD on this unix socket", "PATH"),
    Setting(
        "http-listen", ["127.0.0.1:8080"], _listen_list, "HTTP listener(s); 'none' for none", "HOST:PORT"
    ),
    Setting("http-socket", None, str, "also serve HTTP on this unix socket", "PATH"),
    Setting(
        "hotplug-slots", 8, _int, "PCIe hot-plug slots for disks added at run time (POST /v1/disks)", "N"
    ),
    Setting(
        "state-dir",
        None,
        str,
        "keep disks added, resized or throttled at run time in DIR/vblk-state.json (restored at start)",
        "DIR",
    ),
    Setting("guest-memory", 256 << 20, parse_size, "guest RAM holding the rings and DMA buffers", "SIZE"),
    Setting("drain-timeout", 10.0, float, "seconds to finish in-flight requests on SIGTERM", "SECONDS"),
    Setting("max-connections", 4096, _int, "NBD connections at once; more are closed at once", "N"),
    Setting("negotiation-timeout", 30.0, float, "seconds an NBD client has for its handshake", "SECONDS"),
    Setting("idle-timeout", 600.0, float, "seconds an NBD client may idle; 0 for ever", "SECONDS"),
    Setting("send-timeout", 60.0, float, "seconds a reply waits for a client that does not read", "SECONDS"),
    Setting("max-inflight", 128, _int, "NBD requests in flight per connection", "N"),
    Setting("nbd-poll-us", 50.0, float, "busy-poll for a client's next request after its last reply", "US"),
    Setting(
        "tls", "off", _choice(("off", "on", "require")), "NBD TLS (STARTTLS): off, on or require", "MODE"
    ),
    Setting("tls-cert", None, str, "PEM certificate (chain) for TLS", "FILE"),
    Setting("tls-key", None, str, "PEM private key for TLS", "FILE"),
    Setting("tls-ca", None, str, "PEM CA that signs client certificates", "FILE"),
    Setting("tls-verify-client", False, parse_bool, "require client certificates signed by tls-ca"),
    Setting("http-tls", False, parse_bool, "serve HTTPS (with tls-cert/tls-key) on the HTTP listeners"),
    Setting("tokens-file", None, str, "REST bearer tokens, lines 'rw TOKEN' or 'ro TOKEN'", "FILE"),
    Setting(
        "public-paths",
        ["/healthz", "/readyz", "/metrics"],
        _listen_list,
        "paths open without a token",
        "PATHS",
    ),
    Setting("log-level", "info", _choice(("debug", "info", "warning", "error")), "log level", "LEVEL"),
    Setting("log-format", "auto", _choice(LOG_FORMATS), "auto: JSON unless stdout is a terminal", "FMT"),
    Setting("log-file", None, str, "also append every log line, as JSON, to this file", "FILE"),
)
BY_NAME = {s.name: s for s in SETTINGS}


def load_toml(path: Path) -> dict[str, Any]:
    """A TOML config file's settings, keys normalised to flag spelling."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    settings: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("_", "-")
        if name == "disks":
            name = "disk"
        if name not in BY_NAME:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        settings[name] = value
    return settings


GIVEN = "given"  # the key of resolve()'s set of the settings a source named (not defaulted)


def resolve(
    flags: Mapping[str, Any], environ: Mapping[str, str], file_settings: Mapping[str, Any]
) -> dict[str, Any]:
    """Each setting's value: flag, then ``VBLK_*``, then the file, then the default.

    ``values[GIVEN]`` is the set of settings some source named (the rest are defaults).
    """
    values: dict[str, Any] = {}
    given: set[str] = set()
    values[GIVEN] = given
    for setting in SETTINGS:
        for source, raw in (
            ("--" + setting.name, flags.get(setting.dest)),
            (setting.env, environ.get(setting.env)),
            ("config file", file_settings.get(setting.name)),
        ):
            if raw is None:
                continue
            if setting.name == "disk":
                values["disk"] = _disk_list(raw, source)
            else:
                try:
                    values[setting.name] = setting.convert(raw)
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"{source}: {exc}") from exc
            given.add(setting.name)
            break
        else:
            values[setting.name] = setting.default
    return values


def _disk_list(raw: Any, source: str) -> list[dict[str, str]]:
    if isinstance(raw, str):  # VBLK_DISK: specs separated by ';' or whitespace
        items: list[Any] = [part for part in re.split(r"[;\s]+", raw.strip()) if part]
    elif isinstance(raw, list):
        items = raw
    else:
        raise ConfigError(f"{source}: disk must be a list of disk specs")
    disks = []
    for item in items:
        try:
            if isinstance(item, str):
                disks.append(parse_disk(item))
            elif isinstance(item, dict):
                disks.append(_disk_table(item))
            else:
                raise ValueError(f"not a disk spec: {item!r}")
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
    return disks


def parse_disk(text: str) -> dict[str, str]:
    """``name=db,image=db.img,size=4G,read-only`` → a dict of disk options."""
    options: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if key not in DISK_KEYS:
            raise ValueError(f"unknown disk option {key!r} (known: {', '.join(DISK_KEYS)})")
        if not sep and key not in ("read-only", "force-share", "grow", "create"):
            raise ValueError(f"disk option {key!r} needs a value")
        options[key] = value if sep else "true"
    if "name" not in options:
        raise ValueError("a disk needs name=")
    return options


def _disk_table(table: Mapping[str, Any]) -> dict[str, str]:
    options: dict[str, str] = {}
    for key, value in table.items():
        name = key.replace("_", "-")
        if name not in DISK_KEYS:
            raise ValueError(f"unknown disk option {key!r} (known: {', '.join(DISK_KEYS)})")
        options[name] = str(value).lower() if isinstance(value, bool) else str(value)
    if "name" not in options:
        raise ValueError("a disk needs name")
    return options


def check_size(what: str, size: int) -> None:
    if size <= 0 or size % 512:
        raise ConfigError(f"{what}: size must be a positive multiple of 512, not {size}")


def check_queues(what: str, queues: int, queue_size: int) -> None:
    if not 1 <= queues <= 64:
        raise ConfigError(f"{what}: queues must be 1..64")
    if not 4 <= queue_size <= 32768 or queue_size & (queue_size - 1):
        raise ConfigError(f"{what}: queue-size must be a power of two in 4..32768")


def check_force_share(what: str, backend: str, read_only: bool) -> None:
    """force-share, as in QEMU: only a read-only file disk may share its image with writers."""
    if backend != "file":
        raise ConfigError(f"{what}: force-share is a file disk's option (QEMU's image locks)")
    try:
        lock_mode(read_only, force_share=True)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from exc


def vhost_user_throttle(text: str | None) -> tuple[tuple[str, int], ...]:
    """``vblk vhost-user --throttle``: ``key=value,...`` with the keys of a ``--disk``'s limits."""
    if not text:
        return ()
    options: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in LIMIT_KEYS:
            raise ConfigError(f"--throttle {item!r}: want KEY=VALUE, KEY one of {', '.join(LIMIT_KEYS)}")
        options[key] = value
    spec: dict[str, Any] = {"backend": "file"}
    try:
        _throttle_of(options, spec)
    except ValueError as exc:
        raise ConfigError(f"--throttle: {exc}") from exc
    throttle: tuple[tuple[str, int], ...] = spec["throttle"]
    return throttle


def _text(value: str) -> str:
    return value


# The plain keys of --disk: the DiskSpec field each sets, and how its value is read.
_DISK_KEYS: dict[str, tuple[str, Callable[[str], object]]] = {
    "size": ("size", parse_size),
    "grow": ("grow", parse_bool),
    "backend": ("backend", parse_backend),
    "read-only": ("read_only", parse_bool),
    "force-share": ("force_share", parse_bool),
    "queues": ("num_queues", int),
    "queue-size": ("queue_size", int),
    "io-mode": ("io_mode", _choice(IO_MODES)),
    "pool": ("pool", _text),
    "create": ("create", parse_bool),
    "format": ("format", _choice(FORMATS)),
    "l2-cache-size": ("l2_cache_size", parse_size),
    "snapshot": ("snapshot", _text),
}


def disk_defaults(values: Mapping[str, Any]) -> DiskSpec:
    """What a disk that does not say otherwise gets (the service-wide flags): a template."""
    return DiskSpec(
        backend=values["backend"],
        size=values["size"],
        size_explicit="size" in values.get(GIVEN, set()),
        grow=values["grow"],
        read_only=values["read-only"],
        num_queues=values["queues"],
        queue_size=values["queue-size"],
        io_mode=values["io-mode"],
        ceph=CephOptions(
            conf=values["ceph-conf"],
            client_id=values["ceph-id"],
            keyring=values["ceph-keyring"],
            timeout=values["ceph-timeout"],
            take_over=values["take-over"],
        ),
    )


_TEMPLATE_FIELDS = (
    "backend",
    "size",
    "size_explicit",
    "grow",
    "read_only",
    "num_queues",
    "queue_size",
    "io_mode",
    "ceph",
)


def disks_of(values: Mapping[str, Any]) -> tuple[DiskSpec, ...]:
    template = disk_defaults(values)
    if not values["disk"]:
        disks = [_checked(dataclasses.replace(template, name=values["name"], path=Path(values["image"])))]
    else:
        disks = [disk_spec(options, template) for options in values["disk"]]
    names = [d.name for d in disks]
    if len(set(names)) != len(names):
        raise ConfigError(f"disk names must be unique: {names}")
    _check_groups(disks)
    return tuple(disks)


def disk_of_table(table: Mapping[str, Any], template: DiskSpec) -> DiskSpec:
    """A disk from a table of its options (a config file's ``[[disk]]``, a JSON object): values
    as ``--disk`` writes them, or as numbers and booleans. :class:`ConfigError` if it is not one."""
    try:
        options = _disk_table(table)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return disk_spec(options, template)


def disk_spec(options: Mapping[str, str], template: DiskSpec) -> DiskSpec:
    """One ``--disk``'s options over ``template`` (:func:`disk_defaults`), checked."""
    name = options["name"]
    defaults = {field: getattr(template, field) for field in _TEMPLATE_FIELDS}
    spec: dict[str, Any] = dict(defaults, name=name, path=Path(options.get("image", f"{name}.img")))
    try:
        for key, (field, parse) in _DISK_KEYS.items():
            if key in options:
                spec[field] = parse(options[key])
        if "size" in options:
            spec["size_explicit"] = True
        if "cache" in options:
            if options["cache"] not in CACHE_MODES:
                raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, not {options['cache']!r}")
            spec["cache"] = options["cache"]
        if "fault" in options:
            FaultPlan.parse(options["fault"])  # refused now, not at start-up
            spec["fault"] = options["fault"]
        _throttle_of(options, spec)
        if spec.get("format", "raw") == "qcow2":
            _check_qcow2(spec)
        elif "l2-cache-size" in options or "snapshot" in options:
            key = "l2-cache-size" if "l2-cache-size" in options else "snapshot"
            raise ValueError(f"{key} is a qcow2 disk's option (format=qcow2)")
        if spec["backend"] == "rbd":
            spec["rbd_image"] = options.get("image", name)
        elif "cache" in options:
            raise ValueError("cache= is an rbd disk's option (librbd's cache)")
    except ValueError as exc:
        raise ConfigError(f"disk {name}: {exc}") from exc
    return _checked(DiskSpec(**spec))


def _checked(disk: DiskSpec) -> DiskSpec:
    """A disk's name, size, queues and sharing checked."""
    name = disk.name
    if not DISK_NAME.fullmatch(name):
        raise ConfigError(f"disk name {name!r}: use 1-64 of A-Z a-z 0-9 . _ - (not starting with . _ -)")
    check_size(f"disk {name}", disk.size)
    if disk.backend == "rbd":
        rbd_image = disk.rbd_image or name
        if not disk.pool or "/" in disk.pool or "/" in rbd_image:
            raise ConfigError(f"disk {name}: rbd pool and image are names without '/'")
        timeout = disk.ceph.timeout
        if not (1 <= timeout <= 86400 and float(timeout).is_integer()):  # nan, inf: refused
            raise ConfigError(f"ceph-timeout must be a whole number of seconds, 1..86400: {timeout:g}")
        if rbd_image != disk.rbd_image:
            disk = dataclasses.replace(disk, rbd_image=rbd_image)
    check_queues(f"disk {name}", disk.num_queues, disk.queue_size)
    if disk.force_share:
        check_force_share(f"disk {name}", disk.backend, disk.read_only)
    return disk


def _throttle_of(options: Mapping[str, str], spec: dict[str, Any]) -> None:
    """The I/O limit keys of one ``--disk`` (QEMU's names), checked as QEMU checks them."""
    limits: dict[str, object] = {}
    for key in LIMIT_KEYS:
        if key in options:
            try:
                limits[key] = parse_size(options[key])
            except ValueError:
                raise ValueError(f"{key}={options[key]}: a whole number (K, M, G: binary units)") from None
    try:
        parsed = ThrottleLimits.parse(limits)
    except ThrottleError as exc:
        raise ValueError(str(exc)) from exc
    spec["throttle"] = tuple(sorted(parsed.keys().items()))
    if "group" in options:
        group = options["group"]
        if not DISK_NAME.fullmatch(group):
            raise ValueError(f"group {group!r}: use 1-64 of A-Z a-z 0-9 . _ - (not starting with . _ -)")
        spec["throttle_group"] = group
    if spec["throttle"] and spec["backend"].startswith("vhost-user:"):
        raise ValueError("I/O limits go on the vhost-user back end's disk, not its front end")


def _check_groups(disks: Sequence[DiskSpec]) -> None:
    """The disks of one throttle group share its limits: the ones naming limits name the same."""
    limits: dict[str, tuple[str, tuple[tuple[str, int], ...]]] = {}
    for disk in disks:
        if not disk.throttle:
            continue
        group = disk.throttle_group or disk.name
        first = limits.setdefault(group, (disk.name, disk.throttle))
        if first[1] != disk.throttle:
            raise ConfigError(
                f"disk {disk.name}: throttle group {group} has other limits (disk {first[0]}): "
                "give a group's limits once, or the same on each disk"
            )


def _check_qcow2(spec: dict[str, Any]) -> None:
    """A qcow2 disk: a file disk; a missing image is created empty at the size (64 KiB clusters)."""
    if spec["backend"] != "file":
        raise ValueError("format=qcow2 is a file disk's option")
    if spec.get("l2_cache_size", 1) <= 0:
        raise ValueError("l2-cache-size must be positive (bytes of L2 tables, 1M, 32M...)")
    if spec.get("snapshot") is not None and not spec.get("read_only", False):
        raise ValueError("snapshot= serves an internal snapshot, read-only: add read-only")


def service_config(values: Mapping[str, Any]) -> ServiceConfig:
    nbd = [a for a in values["nbd-listen"] if a != "none"]
    if values["nbd-socket"]:
        nbd.append("unix:" + values["nbd-socket"])
    http = [a for a in values["http-listen"] if a != "none"]
    if values["http-socket"]:
        http.append("unix:" + values["http-socket"])
    for key in ("max-connections", "max-inflight"):
        if values[key] < 1:
            raise ConfigError(f"{key} must be at least 1")
    if not 0 <= values["hotplug-slots"] <= MAX_ROOT_PORTS:
        raise ConfigError(f"hotplug-slots must be in 0..{MAX_ROOT_PORTS}")
    for key in ("negotiation-timeout", "send-timeout"):
        if values[key] <= 0:
            raise ConfigError(f"{key} must be positive")
    if not 0 <= values["nbd-poll-us"] <= 10_000:
        raise ConfigError("nbd-poll-us must be in 0..10000 (microseconds)")
    for address in (*nbd, *http):
        if not address.startswith("unix:"):
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise ConfigError(f"listen address {address!r}: want HOST:PORT")
    security = SecurityConfig(
        tls=values["tls"],
        tls_cert=_path(values["tls-cert"]),
        tls_key=_path(values["tls-key"]),
        tls_ca=_path(values["tls-ca"]),
        tls_verify_client=values["tls-verify-client"],
        http_tls=values["http-tls"],
        tokens_file=_path(values["tokens-file"]),
        public_paths=tuple(values["public-paths"]),
    )
    try:  # load certificates and tokens now, so a bad file is a usage error
        security.context()
        if security.tokens_file is not None:
            Tokens.load(security.tokens_file)
    except SecurityConfigError as exc:
        raise ConfigError(str(exc)) from exc
    return ServiceConfig(
        security=security,
        disks=disks_of(values),
        disk_template=disk_defaults(values),
        hotplug_slots=values["hotplug-slots"],
        state_dir=Path(values["state-dir"]) if values["state-dir"] else None,
        ring=values["ring"],
        guest_memory=values["guest-memory"],
        nbd_listen=tuple(nbd),
        http_listen=tuple(http),
        drain_timeout=values["drain-timeout"],
        nbd_limits=NbdLimits(
            max_connections=values["max-connections"],
            negotiation_timeout=values["negotiation-timeout"],
            idle_timeout=values["idle-timeout"],
            send_timeout=values["send-timeout"],
            max_inflight=values["max-inflight"],
            poll_us=values["nbd-poll-us"],
        ),
    )


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def from_sources(
    flags: Mapping[str, Any], environ: Mapping[str, str] | None = None, config_file: Path | None = None
) -> tuple[ServiceConfig, dict[str, Any]]:
    environ = os.environ if environ is None else environ
    path = config_file or (Path(environ["VBLK_CONFIG"]) if environ.get("VBLK_CONFIG") else None)
    file_settings = load_toml(path) if path is not None else {}
    values = resolve(flags, environ, file_settings)
    return service_config(values), values
