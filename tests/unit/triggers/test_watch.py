"""A shared wait's timing: when it becomes due, falls back to a read of its own, and meets its deadline.

The watcher is a fake :class:`~airflow_provider_kontext.triggers.watch.SweepService` that never
answers unless told to, and the reads of its own come from a fake hook: what is checked is which
answer the wait takes and when, on the event loop's own clock, with bounds generous enough for a busy
machine.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from airflow_provider_kontext.hooks.retry import RetryLimits
from airflow_provider_kontext.models import Prediction
from airflow_provider_kontext.triggers.watch import NEEDS_OWN_READ, SharedSource

pytestmark = pytest.mark.asyncio

RUNNING = Prediction.model_validate({"id": "p1", "status": "processing"})
DONE = Prediction.model_validate({"id": "p1", "status": "succeeded", "output": "https://x/out.png"})


class FakeWatcher:
    """Answers nothing by itself; records what the wait asked of it."""

    def __init__(
        self, *, fallback_seconds: float = 0.05, sweeping: bool = True, answers: bool = True
    ) -> None:
        self.fallback_seconds = fallback_seconds
        self.sweeping = sweeping
        self.answers = answers
        self.queued: list[tuple[SharedSource, float]] = []
        self.enqueued = asyncio.Event()
        self.dequeued = 0

    def can_answer(self, wait: SharedSource) -> bool:
        return self.answers

    def still_sweeping(self) -> bool:
        return self.sweeping

    def enqueue(self, wait: SharedSource) -> None:
        self.queued.append((wait, asyncio.get_running_loop().time()))
        self.enqueued.set()

    def dequeue(self, wait: SharedSource) -> None:
        self.dequeued += 1

    async def leave(self, wait: SharedSource) -> None:
        return None


class FakeHook:
    def __init__(self, prediction: Prediction) -> None:
        self.prediction = prediction
        self.reads: list[float] = []

    async def aget_prediction(self, prediction_id: str, **_: Any) -> Prediction:
        self.reads.append(asyncio.get_running_loop().time())
        return self.prediction


def _wait(watcher: FakeWatcher, hook: FakeHook) -> SharedSource:
    return SharedSource(watcher, "p1", None, hook)  # type: ignore[arg-type]


def _live_timers(wait: SharedSource) -> int:
    return 0 if wait._timer is None or wait._timer.cancelled() else 1


async def test_a_wait_becomes_due_after_its_delay_and_takes_the_sweeps_answer() -> None:
    watcher, hook = FakeWatcher(fallback_seconds=30), FakeHook(RUNNING)
    wait = _wait(watcher, hook)
    loop = asyncio.get_running_loop()
    started = loop.time()
    # A delay of 1 s, looked at after 0.02 s: a busy machine would have to stall the loop ~1 s.
    look = asyncio.create_task(wait.next(1.0, RetryLimits()))
    await asyncio.sleep(0.02)
    assert not wait.due  # not yet
    assert not watcher.queued
    await asyncio.wait_for(watcher.enqueued.wait(), 10)
    assert watcher.queued[0][1] - started >= 1.0
    assert wait.due
    wait.deliver(DONE)
    assert await look is DONE
    assert hook.reads == []  # the sweep answered: no read of its own
    assert _live_timers(wait) == 0
    assert watcher.dequeued == 1


async def test_a_wait_reads_alone_once_the_sweeps_stop() -> None:
    watcher, hook = FakeWatcher(fallback_seconds=0.05), FakeHook(DONE)
    wait = _wait(watcher, hook)
    look = asyncio.create_task(wait.next(0, RetryLimits()))
    await asyncio.wait_for(watcher.enqueued.wait(), 5)
    await asyncio.sleep(0.2)
    assert hook.reads == []  # the watcher still sweeps: it keeps waiting for it
    watcher.sweeping = False
    assert await asyncio.wait_for(look, 5) is DONE
    assert len(hook.reads) == 1
    assert _live_timers(wait) == 0


@pytest.mark.parametrize(
    ("delay", "becomes_due"),
    [
        (0, True),  # due at once, the sweeps never answer: the deadline, not the 30 s fallback, ends it
        (60, False),  # the deadline comes before the delay: it never becomes due
    ],
)
async def test_a_wait_reads_alone_at_its_deadline(delay: float, becomes_due: bool) -> None:
    watcher, hook = FakeWatcher(fallback_seconds=30), FakeHook(DONE)
    wait = _wait(watcher, hook)
    started = asyncio.get_running_loop().time()
    result = await asyncio.wait_for(wait.next(delay, RetryLimits(deadline=time.time() + 0.2)), 5)
    assert result is DONE
    assert len(hook.reads) == 1
    assert 0.15 <= hook.reads[0] - started < 5
    assert bool(watcher.queued) is becomes_due


async def test_a_deadline_already_past_reads_at_once() -> None:
    watcher, hook = FakeWatcher(fallback_seconds=30), FakeHook(DONE)
    wait = _wait(watcher, hook)
    assert await asyncio.wait_for(wait.next(0, RetryLimits(deadline=time.time() - 1)), 5) is DONE
    assert not watcher.queued
    assert len(hook.reads) == 1


async def test_a_wait_holds_one_timer_at_a_time() -> None:
    watcher, hook = FakeWatcher(fallback_seconds=0.02), FakeHook(DONE)
    wait = _wait(watcher, hook)
    look = asyncio.create_task(wait.next(0.05, RetryLimits(deadline=time.time() + 60)))
    seen: list[asyncio.TimerHandle | None] = []
    for _ in range(20):  # through the due time and several fallback checks
        await asyncio.sleep(0.01)
        seen.append(wait._timer)
        assert _live_timers(wait) == 1
    assert len({id(timer) for timer in seen}) > 2  # re-armed, never added to
    wait.deliver(NEEDS_OWN_READ)
    assert await asyncio.wait_for(look, 5) is DONE
    assert _live_timers(wait) == 0


async def test_a_wait_the_sweeps_cannot_answer_reads_alone_after_its_delay() -> None:
    watcher, hook = FakeWatcher(answers=False), FakeHook(DONE)
    wait = _wait(watcher, hook)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(wait.next(0.1, RetryLimits()), 5) is DONE
    assert hook.reads[0] - started >= 0.1
    assert not watcher.queued
