"""The I/O limits of the service's disks: their throttle groups, set at start and changed live.

Service layer, over :mod:`device.block.throttle`: :class:`Throttling` gives each local disk with
limits (``--disk ...,iops-total=500``) a gate into its group (``group=NAME``, else a group of its
own named as the disk), installs it in the disk's device, applies live changes
(``PATCH /v1/disks/{name}`` with ``{"op": "throttle", ...}``) and answers what the REST API and
the metrics show: the limits in force, requests waiting, time spent waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

from device.blk import VirtioBlkDevice
from device.block.throttle import (
    DIRECTIONS,
    ThrottleError,
    ThrottleGroups,
    ThrottleLimits,
    ThrottleMember,
)

# The front ends refuse bad limits by this error without reaching into the device layer.
__all__ = ["ThrottleError", "Throttled", "Throttling", "throttleable"]


class Throttled(Protocol):
    """A device with a throttle gate (the in-process virtio-blk device)."""

    throttle: ThrottleMember | None


class Throttling:
    """Every throttle group of the process and each disk's gate in one."""

    def __init__(self) -> None:
        self._groups: ThrottleGroups | None = None
        self.members: dict[str, ThrottleMember] = {}

    def _registry(self) -> ThrottleGroups:
        if self._groups is None:  # the loop's clock: made on first use, on the running loop
            self._groups = ThrottleGroups(asyncio.get_running_loop())
        return self._groups

    def attach(
        self, disk: str, device: Throttled, limits: Mapping[str, int], group: str = ""
    ) -> ThrottleMember:
        """Give ``disk`` its gate into ``group`` (its own when empty); ``limits``, when any, become
        the group's."""
        name = group or disk
        throttle_group = self._registry().get(name)
        if limits:
            throttle_group.configure(ThrottleLimits.parse(limits))
        member = ThrottleMember(disk, throttle_group)
        self.members[disk] = member
        device.throttle = member
        return member

    def change(self, disk: str, device: Throttled, changes: Mapping[str, object]) -> dict[str, Any]:
        """A live change: ``group`` moves the disk, the limit keys given are merged into its
        group's limits (0 removes one); in force at once. Raises :class:`ThrottleError`."""
        changes = dict(changes)
        group_name = changes.pop("group", None)
        if group_name is not None and not isinstance(group_name, str):
            raise ThrottleError("group: a name")
        member = self.members.get(disk)
        registry = self._registry()
        if isinstance(group_name, str):
            target = registry.get(group_name or disk)
        elif member is not None:
            target = member.group
        else:
            target = registry.get(disk)
        limits = ThrottleLimits.parse(changes, target.limits)  # refused before anything changes
        if member is None:
            member = self.attach(disk, device, {}, target.name)
        else:
            member.move(target)
        if changes:
            target.configure(limits)
        registry.prune()
        return self.describe(disk) or {}

    def detach(self, disk: str, device: Throttled) -> None:
        """``disk`` goes: its gate closes (requests waiting pass), its group may go with it."""
        member = self.members.pop(disk, None)
        if member is None:
            return
        device.throttle = None
        member.close()
        self._registry().prune()

    def describe(self, disk: str) -> dict[str, Any] | None:
        """What ``GET /v1/disks/{name}`` shows under ``throttle``; None without a gate."""
        member = self.members.get(disk)
        if member is None:
            return None
        group = member.group
        return {
            "group": group.name,
            "limits": group.limits.keys(),
            "members": [m.disk for m in group.members],
            "waiting": member.waiting,
            "throttled": dict(zip(DIRECTIONS, member.throttled, strict=True)),
            "throttled_seconds": {
                d: round(s, 6) for d, s in zip(DIRECTIONS, member.throttled_seconds, strict=True)
            },
        }

    def group_limits(self, group: str) -> dict[str, int]:
        """The limits group ``group`` has now ({} for none, or no such group)."""
        for member in self.members.values():
            if member.group.name == group:
                return dict(member.group.limits.keys())
        return {}

    def spec_of(self, disk: str) -> tuple[tuple[tuple[str, int], ...], str]:
        """The disk's limits and group as ``--disk`` writes them (for the state kept across restarts)."""
        member = self.members.get(disk)
        if member is None:
            return (), ""
        group = member.group
        return tuple(sorted(group.limits.keys().items())), "" if group.name == disk else group.name

    def close(self) -> None:
        for disk in list(self.members):
            self.members.pop(disk).close()
        if self._groups is not None:
            self._groups.prune()


def throttleable(device: object) -> VirtioBlkDevice | None:
    """The in-process device behind a disk, or None (a vhost-user front end's is not ours)."""
    return device if isinstance(device, VirtioBlkDevice) else None
