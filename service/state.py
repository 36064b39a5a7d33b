"""What vblk keeps across restarts: the disks added, resized and throttled at run time.

Service layer, beside :mod:`service.config` (the user's configuration, which vblk never
writes). With ``--state-dir DIR``, every control-plane change that succeeds is written to
``DIR/vblk-state.json`` before its answer goes out, atomically (a temporary file written and
fsynced, renamed over the old one, the directory fsynced): a crash at any instant leaves the old
file or the new one, never a torn one. At start the file is read back: disks added at run time
are hot-plugged again with their options, and a configured disk's size and limits changed at run
time are applied over the configuration's, unless the configuration has changed them itself
since (then the configuration wins, and the kept change is dropped).
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import structlog

from service.model import DiskSpec, StartupError

log = structlog.get_logger("vblk.service")

STATE_FILE: Final = "vblk-state.json"
LOCK_FILE: Final = "vblk-state.lock"  # held (flock) by the vblk that keeps the directory's state
VERSION: Final = 1

Limits = tuple[tuple[str, int], ...]


@dataclasses.dataclass(slots=True)
class DiskState:
    """One disk's run-time changes. ``added``: the options of a disk added at run time (its
    ``POST /v1/disks`` body, kept up to date: a resize changes its size, a throttle its limits).
    For a configured disk, the changes and the configuration's values they were made over."""

    added: dict[str, object] | None = None
    size: int | None = None
    limits: tuple[Limits, str] | None = None  # (limits, group) set live
    base_size: int | None = None  # the configuration's size when the disk was resized
    base_limits: tuple[Limits, str] | None = None  # ... and its limits when they were changed

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.added is not None:
            out["added"] = self.added
        if self.size is not None:
            out["size"] = self.size
            out["base_size"] = self.base_size
        if self.limits is not None:
            out["limits"] = _limits_json(self.limits)
            if self.base_limits is not None:
                out["base_limits"] = _limits_json(self.base_limits)
        return out

    @classmethod
    def from_json(cls, value: object) -> DiskState:
        if not isinstance(value, dict):
            raise ValueError("a disk's entry is not an object")
        added = value.get("added")
        if added is not None and not isinstance(added, dict):
            raise ValueError("added is not an object")
        size = value.get("size")
        base_size = value.get("base_size")
        for what, number in (("size", size), ("base_size", base_size)):
            if number is not None and (not isinstance(number, int) or isinstance(number, bool)):
                raise ValueError(f"{what} is not an integer")
        limits = value.get("limits")
        base_limits = value.get("base_limits")
        return cls(
            added=added,
            size=size,
            limits=None if limits is None else _limits_of(limits),
            base_size=base_size,
            base_limits=None if base_limits is None else _limits_of(base_limits),
        )


def _limits_json(limits: tuple[Limits, str]) -> dict[str, Any]:
    keys, group = limits
    return {"keys": dict(keys), "group": group}


def _limits_of(value: object) -> tuple[Limits, str]:
    if not isinstance(value, dict) or not isinstance(value.get("keys"), dict):
        raise ValueError("limits is not {keys, group}")
    group = value.get("group", "")
    if not isinstance(group, str):
        raise ValueError("limits.group is not a string")
    keys: dict[str, object] = value["keys"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in keys.values()):
        raise ValueError("a limit is not an integer")
    return tuple(sorted((str(k), int(str(v))) for k, v in keys.items())), group


class RuntimeState:
    """The state file of one state directory (None: run-time changes are not kept)."""

    def __init__(self, directory: Path | None) -> None:
        self.path = None if directory is None else directory / STATE_FILE
        self.disks: dict[str, DiskState] = {}
        self._writing = asyncio.Lock()
        self.writes = 0
        self._lock_fd: int | None = None

    @property
    def kept(self) -> bool:
        return self.path is not None

    def load(self) -> None:
        """Read the file (none yet: nothing was changed). A file that is not vblk's state is a
        :class:`StartupError`: vblk will not start over changes it cannot read."""
        if self.path is None:
            return
        if not self.path.parent.is_dir():
            raise StartupError("state_unreadable", f"state directory {self.path.parent} does not exist")
        self._lock()
        try:
            self._read()
        except StartupError:
            self.close()  # not started: the directory is free again
            raise

    def _read(self) -> None:
        assert self.path is not None
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # a write a crash cut short
            stale.unlink(missing_ok=True)
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            raise StartupError("state_unreadable", f"state file {self.path}: {exc}") from exc
        try:
            document = json.loads(text)
            if not isinstance(document, dict) or document.get("version") != VERSION:
                raise ValueError(f"not a vblk state file of version {VERSION}")
            disks = document.get("disks")
            if not isinstance(disks, dict):
                raise ValueError("disks is not an object")
            self.disks = {str(name): DiskState.from_json(entry) for name, entry in disks.items()}
        except ValueError as exc:  # json.JSONDecodeError included
            raise StartupError(
                "state_unreadable",
                f"state file {self.path}: {exc} (move it away to start without the run-time changes)",
            ) from exc
        log.info("disk_state_loaded", path=str(self.path), disks=sorted(self.disks))

    def _lock(self) -> None:
        """Hold the directory's lock file for as long as this process keeps the state: a second
        vblk on the same directory would write over this one's changes (and it over the second's).
        The lock file says whose it is."""
        assert self.path is not None
        lock_path = self.path.parent / LOCK_FILE
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StartupError(
                "state_unreadable", f"state lock {lock_path}: {exc.strerror}", exc.errno
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StartupError(
                "state_dir_in_use",
                f"state directory {self.path.parent} is kept by another vblk (pid {holder}): two would "
                "write over each other's run-time changes; give this one a --state-dir of its own",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        """Let the state directory go (another vblk may keep it now)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes with the last descriptor of the file
            self._lock_fd = None

    def entry(self, name: str) -> DiskState:
        return self.disks.setdefault(name, DiskState())

    def document(self) -> bytes:
        disks = {name: entry for name, state in self.disks.items() if (entry := state.to_json())}
        return (json.dumps({"version": VERSION, "disks": disks}, indent=2, sort_keys=True) + "\n").encode()

    async def save(self) -> None:
        """Write the state as it is now, atomically; saves happen in the order they are asked. A
        failed write (a full or read-only file system) is an error log line: the change it was to
        keep stays made, and the next save writes it."""
        if self.path is None:
            return
        async with self._writing:
            data = self.document()
            try:
                await asyncio.to_thread(write_atomically, self.path, data)
            except OSError as exc:  # the change is made; only its keeping failed: say so loudly
                log.error("disk_state_write_failed", path=str(self.path), error=str(exc))
                return
            self.writes += 1

    # -- applied at start -----------------------------------------------------------------------

    def configured(self, spec: DiskSpec) -> DiskSpec:
        """A configured disk's spec with its kept run-time changes, where the configuration has
        not changed since they were made."""
        state = self.disks.get(spec.name)
        if state is None or state.added is not None:
            return spec
        if state.size is not None:
            if state.base_size == spec.size:
                spec = dataclasses.replace(spec, size=state.size)
            else:
                log.info("disk_state_superseded", disk=spec.name, change="size", kept=state.size)
                state.size = state.base_size = None
        if state.limits is not None:
            if state.base_limits == (spec.throttle, spec.throttle_group):
                limits, group = state.limits
                spec = dataclasses.replace(spec, throttle=limits, throttle_group=group)
            else:
                log.info("disk_state_superseded", disk=spec.name, change="limits")
                state.limits = state.base_limits = None
        return spec

    def forget_missing(self, configured: Mapping[str, DiskSpec]) -> None:
        """Changes to configured disks that are no longer configured are dropped; a disk added
        at run time whose name the configuration now uses too gives way to it."""
        for name, state in list(self.disks.items()):
            if state.added is None and name not in configured:
                del self.disks[name]
            elif state.added is not None and name in configured:
                log.warning(
                    "disk_state_dropped", disk=name, reason="the configuration has a disk of this name"
                )
                del self.disks[name]

    def added(self) -> list[tuple[str, dict[str, object]]]:
        return [(name, state.added) for name, state in self.disks.items() if state.added is not None]


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` as ``path``'s content, all or nothing: a temporary file beside it, fsynced,
    renamed over it, and the directory fsynced so the rename itself is on disk."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
