"""I/O limits: QEMU's leaky-bucket throttling, its limit names, and throttle groups.

Block layer, at the entry of a disk's stack. :class:`ThrottleMember` is the admission gate of one
disk: the device's executor (:mod:`device.blk_executor`) hands it each request before the request
reaches the stack's top node, and the gate starts it now or, when a limit says so, later from a
timer on the event loop. That is where QEMU throttles too (its BlockBackend, above the graph, for
``throttling.*``): a waiting request holds no worker thread and no node sees it before it is
admitted. Every disk of a :class:`ThrottleGroup` shares the group's buckets; whose request goes next
is decided round robin among the members with requests waiting, one request per turn.

The arithmetic is QEMU's (``util/throttle.c``): six buckets (bytes and operations; total, read,
write), each a meter that leaks ``avg`` per second, with an optional burst (``max`` per second for
``max-length`` seconds); a request waits while a bucket it counts in is over its size, and pays
after admission, so a large request passes at once and delays the next ones. Reads count as reads;
writes, write-zeroes and discards as writes with their full length; flushes are free.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Final, Protocol

from mypy_extensions import mypyc_attr

THROTTLE_VALUE_MAX: Final = 10**15
MAX_BURST_LENGTH: Final = 2**32 - 1
WAIT_RESOLUTION: Final = 1e-9
READ: Final = 0
WRITE: Final = 1
DIRECTIONS: Final = ("read", "write")

# The six buckets, in QEMU's order (BPS_TOTAL ... OPS_WRITE), by the names of their limits.
BUCKETS: Final = ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
BPS_TOTAL: Final = 0
OPS_TOTAL: Final = 3
#: The limit keys, as ``--disk`` and the REST API write them (QEMU's ``throttling.*`` names).
LIMIT_KEYS: Final = (
    *BUCKETS,
    *(f"{name}-max" for name in BUCKETS),
    *(f"{name}-max-length" for name in BUCKETS),
    "iops-size",
)


class ThrottleError(ValueError):
    """Limits that QEMU would refuse; the message is QEMU's where QEMU has one."""


@dataclasses.dataclass(frozen=True, slots=True)
class BucketLimit:
    """One bucket's limit: ``avg`` units per second (0: none), bursts of ``max`` per second
    (0: no burst beyond a tenth of a second of ``avg``) lasting ``burst_length`` seconds."""

    avg: int = 0
    max: int = 0
    burst_length: int = 1


def _whole(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ThrottleError(f"{key}: a whole number, not {value!r}")
    try:
        number = float(value) if not isinstance(value, int) else value
    except ValueError:
        raise ThrottleError(f"{key}: a whole number, not {value!r}") from None
    if isinstance(number, float):
        if not number.is_integer():
            raise ThrottleError(f"{key}: a whole number, not {value!r}")
        number = int(number)
    if number < 0 or number > THROTTLE_VALUE_MAX:
        raise ThrottleError(f"{key} must be in 0..{THROTTLE_VALUE_MAX}")
    return number


@dataclasses.dataclass(frozen=True, slots=True)
class ThrottleLimits:
    """A group's limits: the six buckets and the size a large request counts as one operation of."""

    buckets: tuple[BucketLimit, ...] = (BucketLimit(),) * 6
    iops_size: int = 0

    @property
    def enabled(self) -> bool:
        """Some limit is set (else every request is admitted at once)."""
        return any(bucket.avg for bucket in self.buckets)

    @classmethod
    def parse(cls, values: Mapping[str, object], base: ThrottleLimits | None = None) -> ThrottleLimits:
        """Limits from their keys (``iops-total``, ``bps-read-max``, ``iops-size``...), each a whole
        number (0: none; ``-max-length`` in seconds, default 1). Keys not given keep ``base``'s
        values (a live change merges, as QEMU's ``qom-set`` of a throttle group's ``limits``)."""
        base = base or cls()
        avg = [bucket.avg for bucket in base.buckets]
        peak = [bucket.max for bucket in base.buckets]
        length = [bucket.burst_length for bucket in base.buckets]
        iops_size = base.iops_size
        for key, value in values.items():
            if key not in LIMIT_KEYS:
                raise ThrottleError(f"unknown limit {key!r} (known: {', '.join(LIMIT_KEYS)})")
            number = _whole(key, value)
            if key == "iops-size":
                iops_size = number
            elif key.endswith("-max-length"):
                if number > MAX_BURST_LENGTH:
                    raise ThrottleError(f"{key} must be in 1..{MAX_BURST_LENGTH}")
                length[BUCKETS.index(key[: -len("-max-length")])] = number
            elif key.endswith("-max"):
                peak[BUCKETS.index(key[: -len("-max")])] = number
            else:
                avg[BUCKETS.index(key)] = number
        limits = cls(tuple(BucketLimit(avg[i], peak[i], length[i]) for i in range(6)), iops_size)
        limits.check()
        return limits

    def check(self) -> None:
        """Refuse what QEMU's ``throttle_is_valid`` refuses, with its words."""
        b = self.buckets
        for total in (BPS_TOTAL, OPS_TOTAL):
            if (b[total].avg and (b[total + 1].avg or b[total + 2].avg)) or (
                b[total].max and (b[total + 1].max or b[total + 2].max)
            ):
                raise ThrottleError(
                    "bps/iops/max total values and read/write values cannot be used at the same time"
                )
        if self.iops_size and not any(b[i].avg for i in range(OPS_TOTAL, OPS_TOTAL + 3)):
            raise ThrottleError("iops size requires an iops value to be set")
        for name, bucket in zip(BUCKETS, b, strict=True):
            if bucket.burst_length == 0:
                raise ThrottleError(f"{name}-max-length: the burst length cannot be 0")
            if bucket.burst_length > 1 and not bucket.max:
                raise ThrottleError(f"{name}-max-length: burst length set without burst rate")
            if bucket.max and not bucket.avg:
                raise ThrottleError(f"{name}-max: bps_max/iops_max require corresponding bps/iops values")
            if bucket.max and bucket.max < bucket.avg:
                raise ThrottleError(f"{name}-max: bps_max/iops_max cannot be lower than bps/iops")
            if bucket.max * bucket.burst_length > THROTTLE_VALUE_MAX:
                raise ThrottleError(f"{name}-max-length: burst length too high for this burst rate")

    def keys(self) -> dict[str, int]:
        """The limits in force by their keys, unset ones left out (what ``parse`` reads back)."""
        out: dict[str, int] = {}
        for name, bucket in zip(BUCKETS, self.buckets, strict=True):
            if bucket.avg:
                out[name] = bucket.avg
            if bucket.max:
                out[f"{name}-max"] = bucket.max
            if bucket.burst_length != 1:
                out[f"{name}-max-length"] = bucket.burst_length
        if self.iops_size:
            out["iops-size"] = self.iops_size
        return out


class Admission(Protocol):
    """A request waiting at the gate: told once, to go on or that it will not be started."""

    def admitted(self) -> None: ...

    def refused(self) -> None: ...


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """What a group needs of the event loop: its time and a timer (``asyncio`` loops are ones)."""

    def time(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[int], None], direction: int, /) -> Timer: ...


@mypyc_attr(allow_interpreted_subclasses=True)
class ThrottleGroup:
    """Limits and bucket levels shared by its members; one timer per direction at most."""

    def __init__(self, name: str, clock: Clock, limits: ThrottleLimits | None = None) -> None:
        self.name = name
        self._clock = clock
        self.limits = limits or ThrottleLimits()
        self.members: list[ThrottleMember] = []
        self._level = [0.0] * 6
        self._burst_level = [0.0] * 6
        self._previous_leak = clock.time()
        self._timers: list[Timer | None] = [None, None]
        self._turn = [0, 0]  # index in members of the one served last, per direction
        self._serving = [False, False]  # _serve is running for the direction

    # -- control plane --------------------------------------------------------------------------

    def configure(self, limits: ThrottleLimits) -> None:
        """New limits for every member, in force at once: the levels start empty (as QEMU's
        ``throttle_config``), waiting requests are weighed again against the new limits."""
        limits.check()
        self.limits = limits
        self._level = [0.0] * 6
        self._burst_level = [0.0] * 6
        self._previous_leak = self._clock.time()
        for direction in (READ, WRITE):
            timer = self._timers[direction]
            if timer is not None:
                timer.cancel()
                self._timers[direction] = None
            self._serve(direction)

    def join(self, member: ThrottleMember) -> None:
        self.members.append(member)

    def leave(self, member: ThrottleMember) -> None:
        """``member`` goes (its waiting requests were let through or refused first)."""
        if member in self.members:
            self.members.remove(member)
        self._turn = [0, 0]
        for direction in (READ, WRITE):
            if self._timers[direction] is None:
                self._serve(direction)

    # -- the arithmetic -------------------------------------------------------------------------

    def _leak(self, now: float) -> None:
        elapsed = now - self._previous_leak
        if elapsed <= 0:
            return
        self._previous_leak = now
        level = self._level
        burst_level = self._burst_level
        for i, bucket in enumerate(self.limits.buckets):
            if level[i]:
                level[i] = max(level[i] - bucket.avg * elapsed, 0.0)
            if burst_level[i] and bucket.burst_length > 1:
                burst_level[i] = max(burst_level[i] - bucket.max * elapsed, 0.0)

    def _bucket_wait(self, i: int) -> float:
        bucket = self.limits.buckets[i]
        avg = bucket.avg
        if not avg:
            return 0.0
        if not bucket.max:
            bucket_size = avg / 10
            burst_bucket_size = 0.0
        else:
            bucket_size = float(bucket.max * bucket.burst_length)
            burst_bucket_size = bucket.max / 10
        # QEMU counts the wait in whole nanoseconds: less than one is none (a float rounding
        # remainder must not arm a timer that fires at the same instant for ever).
        wait = (self._level[i] - bucket_size) / avg
        if wait >= WAIT_RESOLUTION:
            return wait
        if bucket.burst_length > 1:
            wait = (self._burst_level[i] - burst_bucket_size) / bucket.max
            if wait >= WAIT_RESOLUTION:
                return wait
        return 0.0

    def wait(self, direction: int) -> float:
        """Seconds before a request of ``direction`` may start: the longest of its four buckets."""
        self._leak(self._clock.time())
        return max(
            self._bucket_wait(BPS_TOTAL),
            self._bucket_wait(OPS_TOTAL),
            self._bucket_wait(BPS_TOTAL + 1 + direction),
            self._bucket_wait(OPS_TOTAL + 1 + direction),
        )

    def account(self, direction: int, nbytes: int) -> None:
        """An admitted request pays: its bytes, and one operation (or ``nbytes/iops-size``)."""
        limits = self.limits
        units = 1.0
        if limits.iops_size and nbytes > limits.iops_size:
            units = nbytes / limits.iops_size
        buckets = limits.buckets
        level = self._level
        burst_level = self._burst_level
        for i, amount in (
            (BPS_TOTAL, float(nbytes)),
            (BPS_TOTAL + 1 + direction, float(nbytes)),
            (OPS_TOTAL, units),
            (OPS_TOTAL + 1 + direction, units),
        ):
            level[i] += amount
            if buckets[i].burst_length > 1:
                burst_level[i] += amount

    # -- scheduling -----------------------------------------------------------------------------

    def busy(self, direction: int) -> bool:
        """A timer is armed for ``direction``, or its queues are being served: newcomers queue
        behind the requests already waiting."""
        return self._timers[direction] is not None or self._serving[direction]

    def _next_member(self, direction: int) -> int:
        """The member whose turn it is: the next after the last served that has a request of
        ``direction`` waiting, the last served itself only when nobody else has; -1: none."""
        members = self.members
        count = len(members)
        start = self._turn[direction]
        for step in range(1, count + 1):
            index = (start + step) % count
            if members[index].queues[direction]:
                return index
        return -1

    def _serve(self, direction: int) -> None:
        """Start the waiting requests of ``direction`` the limits allow now, in turn; arm the
        timer for the next one. Not reentrant: a request started here may queue the next one at
        once (a client at full depth), which this loop then weighs, not a nested one."""
        if self._serving[direction]:
            return
        self._serving[direction] = True
        try:
            while True:
                index = self._next_member(direction)
                if index < 0:
                    return
                if self.limits.enabled:
                    delay = self.wait(direction)
                    if delay > 0:
                        self._timers[direction] = self._clock.call_later(delay, self._fire, direction)
                        return
                self._turn[direction] = index
                self.members[index].pop(direction)
        finally:
            self._serving[direction] = False

    def _fire(self, direction: int) -> None:
        self._timers[direction] = None
        self._serve(direction)

    def schedule(self, direction: int) -> None:
        """A request was queued: serve the queue unless a timer already will."""
        if self._timers[direction] is None:
            self._serve(direction)

    def close(self) -> None:
        for direction in (READ, WRITE):
            timer = self._timers[direction]
            if timer is not None:
                timer.cancel()
                self._timers[direction] = None


@dataclasses.dataclass(slots=True)
class _Waiting:
    request: Admission
    nbytes: int
    since: float


@mypyc_attr(allow_interpreted_subclasses=True)
class ThrottleMember:
    """One disk's gate into its group: per direction a FIFO of the requests waiting."""

    def __init__(self, disk: str, group: ThrottleGroup) -> None:
        self.disk = disk
        self.group = group
        self.queues: list[collections.deque[_Waiting]] = [collections.deque(), collections.deque()]
        self.throttled = [0, 0]  # requests that had to wait, per direction
        self.throttled_seconds = [0.0, 0.0]  # the time they waited
        self.admitted = [0, 0]  # requests through the gate, per direction
        self.admitted_bytes = [0, 0]
        self.closed = False
        group.join(self)

    @property
    def waiting(self) -> int:
        """Requests held at the gate now."""
        return len(self.queues[READ]) + len(self.queues[WRITE])

    def admit(self, write: bool, nbytes: int, request: Admission) -> None:
        """Start ``request`` (a read, or a write, write-zeroes or discard of ``nbytes``) now if the
        limits allow, else when they do; it never fails for being throttled."""
        direction = WRITE if write else READ
        group = self.group
        queue = self.queues[direction]
        if self.closed or not group.limits.enabled:
            self._go(direction, nbytes, request)
            return
        if not queue and not group.busy(direction) and group.wait(direction) <= 0:
            group.account(direction, nbytes)
            self._go(direction, nbytes, request)
            return
        self.throttled[direction] += 1
        queue.append(_Waiting(request, nbytes, time.monotonic()))
        group.schedule(direction)

    def _go(self, direction: int, nbytes: int, request: Admission) -> None:
        self.admitted[direction] += 1
        self.admitted_bytes[direction] += nbytes
        request.admitted()

    def pop(self, direction: int) -> None:
        """The group's turn for this member: account and start its oldest waiting request."""
        waiting = self.queues[direction].popleft()
        self.throttled_seconds[direction] += time.monotonic() - waiting.since
        self.group.account(direction, waiting.nbytes)
        self._go(direction, waiting.nbytes, waiting.request)

    def _drain(self) -> Iterator[tuple[int, _Waiting]]:
        now = time.monotonic()
        for direction in (READ, WRITE):
            queue = self.queues[direction]
            while queue:
                waiting = queue.popleft()
                self.throttled_seconds[direction] += now - waiting.since
                yield direction, waiting

    def release(self) -> None:
        """Start every waiting request now, whatever the limits (a drained section must not wait
        for the group's timers, as QEMU lets a draining member's queue through)."""
        for direction, waiting in list(self._drain()):
            self.group.account(direction, waiting.nbytes)
            self._go(direction, waiting.nbytes, waiting.request)

    def refuse(self) -> None:
        """Start none of the waiting requests (the device was reset: they are not its any more)."""
        for _direction, waiting in list(self._drain()):
            waiting.request.refused()

    def move(self, group: ThrottleGroup) -> None:
        """Join ``group`` instead (waiting requests are let through first)."""
        if group is self.group:
            return
        self.release()
        self.group.leave(self)
        self.group = group
        group.join(self)

    def close(self) -> None:
        """Leave the group; later requests pass at once (waiting ones are let through)."""
        if self.closed:
            return
        self.closed = True
        self.release()
        self.group.leave(self)


class ThrottleGroups:
    """The groups of one process by name; a group lives while it has members."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._groups: dict[str, ThrottleGroup] = {}

    def get(self, name: str) -> ThrottleGroup:
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = ThrottleGroup(name, self._clock)
        return group

    def find(self, name: str) -> ThrottleGroup | None:
        return self._groups.get(name)

    def prune(self) -> None:
        """Forget the groups nobody is in."""
        for name, group in list(self._groups.items()):
            if not group.members:
                group.close()
                del self._groups[name]

    def __iter__(self) -> Iterator[ThrottleGroup]:
        return iter(list(self._groups.values()))
