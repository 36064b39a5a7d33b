"""The loop's deferred-work queue: later than the caller, in order, one pass for a whole chain."""

from __future__ import annotations

import asyncio

from device.platform import RunningLoop, work_queue


async def test_work_runs_after_the_caller_in_order_with_work_queued_meanwhile() -> None:
    queue = work_queue(asyncio.get_running_loop())
    ran: list[str] = []
    queue.defer(ran.append, "a")
    queue.defer(lambda: queue.defer(ran.append, "c"))  # queued while the queue runs
    queue.defer(ran.append, "b")
    assert ran == []  # never on the caller's stack
    await asyncio.sleep(0)  # one pass of the loop runs the whole chain
    assert ran == ["a", "b", "c"]


async def test_a_failing_step_is_reported_and_the_rest_still_runs() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        queue = work_queue(loop)
        ran: list[int] = []

        def broken() -> None:
            raise RuntimeError("boom")

        queue.defer(broken)
        queue.defer(ran.append, 1)
        await asyncio.sleep(0)
        assert ran == [1]
        assert len(reported) == 1 and isinstance(reported[0]["exception"], RuntimeError)
    finally:
        loop.set_exception_handler(None)


async def test_one_queue_per_loop_and_running_loop_caches_it() -> None:
    loop = asyncio.get_running_loop()
    running = RunningLoop()
    assert running.loop() is loop
    assert running.work() is work_queue(loop) is work_queue(loop)
