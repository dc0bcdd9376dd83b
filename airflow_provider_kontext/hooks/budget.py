"""One request budget per account per event loop: every async request of the hooks of one event
loop (the triggerer runs all triggers in one) that talk to the same account draws from one token
bucket.

Replicate limits each account to 3000 requests per minute for everything but creates (every poll of
every prediction counts). A trigger that polls and backs off on its own cannot know what the others
of its account spend; the bucket paces them all together. The account is the base URL and the
token; the token is only ever held here as a short SHA-256 digest, so no key, repr or log line can
show it.

- The rate comes from the connection's ``max_requests_per_minute`` extra (``0``: no budget).
- A ``429`` for one request pauses every request of the account until the reset the server names;
  after it the bucket starts empty, so requests resume paced, never all at once.
- While requests wait, the one whose ``priority`` is smallest goes first (polls pass the time their
  prediction is expected to end, so the predictions most likely to have finished are looked at
  first), except that a request that has waited :data:`MAX_QUEUE_SECONDS` goes before any other:
  the ordering never starves a wait.

Requests of the sync path (creates and uploads in worker processes) draw from no budget: a process
budget cannot cover many workers. They retry a 429 after the reset the server names (see
:mod:`airflow_provider_kontext.failures`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import heapq
import itertools
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow_provider_kontext.hooks.connection import ClientSettings

__all__ = [
    "DEFAULT_PAUSE_SECONDS",
    "MAX_QUEUE_SECONDS",
    "AccountBudgets",
    "RequestBudget",
    "account_key",
]

#: A request that has waited this long for the budget goes before any other, whatever its priority:
#: no poll is put off for ever by polls of predictions expected to end sooner.
MAX_QUEUE_SECONDS = 10.0
#: How long a 429 that names no reset pauses the account.
DEFAULT_PAUSE_SECONDS = 1.0
#: Seconds of the rate the bucket holds: the burst a quiet account may send at once. Replicate allows
#: short bursts above its rate; one second of it stays well inside them.
BURST_SECONDS = 1.0


def account_key(settings: ClientSettings) -> str:
    """The account a request counts against: the base URL and a digest of the token (never the
    token itself)."""
    digest = hashlib.sha256(settings.token.encode()).hexdigest()[:16] if settings.token else "-"
    return f"{settings.base_url}#{digest}"


class _Ticket:
    __slots__ = ("enqueued", "future")

    def __init__(self, future: asyncio.Future[None], enqueued: float) -> None:
        self.future = future
        self.enqueued = enqueued


class RequestBudget:
    """A token bucket shared by the requests of one account in one event loop.

    :param per_minute: sustained requests per minute.
    :param clock: monotonic seconds (tests pass their own).
    :param max_queue_seconds: see :data:`MAX_QUEUE_SECONDS`.
    """

    def __init__(
        self,
        per_minute: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_queue_seconds: float = MAX_QUEUE_SECONDS,
        burst_seconds: float = BURST_SECONDS,
    ) -> None:
        if not per_minute > 0:
            raise ValueError(f"a request budget needs a positive rate, got {per_minute}")
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.max_queue_seconds = max_queue_seconds
        self._clock = clock
        self.tokens = self.capacity
        self._updated = clock()
        self.paused_until = 0.0
        self._heap: list[tuple[float, int, _Ticket]] = []
        self._fifo: collections.deque[_Ticket] = collections.deque()
        self._seq = itertools.count()
        self._dispatcher: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        #: Requests granted, and 429s that paused the account (for logs and benchmarks).
        self.granted = 0
        self.pauses = 0

    def __repr__(self) -> str:
        return f"RequestBudget(per_minute={self.per_minute:g}, waiting={self.waiting})"

    @property
    def waiting(self) -> int:
        """Requests waiting for a token."""
        return sum(1 for ticket in self._fifo if not ticket.future.done())

    def _refill(self, now: float) -> None:
        if now > self._updated:
            self.tokens = min(self.capacity, self.tokens + (now - self._updated) * self.rate)
            self._updated = now

    def _available(self, now: float) -> bool:
        if now < self.paused_until:
            return False
        self._refill(now)
        return self.tokens >= 1.0

    def spare(self, reserve: float = 0.5) -> bool:
        """Whether a request could go now without delaying any other: nobody waits and more than
        ``reserve`` of the bucket is full. Takes nothing (for optional reads)."""
        now = self._clock()
        return not self._fifo and self._available(now) and self.tokens >= reserve * self.capacity

    def try_acquire(self) -> bool:
        """Take a token if one is there and nobody waits; never waits."""
        now = self._clock()
        if self._fifo or not self._available(now):
            return False
        self.tokens -= 1.0
        self.granted += 1
        return True

    async def acquire(self, priority: float | None = None) -> None:
        """Wait for a token.

        :param priority: Unix time by which this request is most likely to be useful (a poll: the
            expected end of its prediction); the smallest goes first among waiting requests.
            ``None``: now.
        """
        if self.try_acquire():
            return
        now = self._clock()
        key = now if priority is None else now + (priority - time.time())
        key = min(key, now + self.max_queue_seconds)
        ticket = _Ticket(asyncio.get_running_loop().create_future(), now)
        heapq.heappush(self._heap, (key, next(self._seq), ticket))
        self._fifo.append(ticket)
        self._kick()
        await ticket.future

    def pause(self, seconds: float | None) -> None:
        """A request of this account was answered 429: hold every request until the reset it named
        (``None``: :data:`DEFAULT_PAUSE_SECONDS`), then resume from an empty bucket (paced)."""
        now = self._clock()
        until = now + (DEFAULT_PAUSE_SECONDS if seconds is None else max(0.0, seconds))
        if until > self.paused_until:
            self.pauses += 1
            self.paused_until = until
        self.tokens = 0.0
        self._updated = max(self._updated, self.paused_until)
        self._kick()

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()
        if self._fifo and (self._dispatcher is None or self._dispatcher.done()):
            self._wake = asyncio.Event()
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    def _next_ticket(self, now: float) -> _Ticket | None:
        while self._fifo and self._fifo[0].future.done():  # granted or canceled
            self._fifo.popleft()
        if self._fifo and now - self._fifo[0].enqueued >= self.max_queue_seconds:
            return self._fifo.popleft()
        while self._heap:
            ticket = heapq.heappop(self._heap)[2]
            if not ticket.future.done():
                return ticket
        return None

    async def _dispatch(self) -> None:
        """Hand out tokens to waiting requests, one at a time, at the bucket's pace."""
        wake = self._wake
        assert wake is not None
        while True:
            while self._fifo and self._fifo[0].future.done():
                self._fifo.popleft()
            if not self._fifo:
                self._heap.clear()
                return
            now = self._clock()
            if now < self.paused_until:
                delay = self.paused_until - now
            elif self._available(now):
                ticket = self._next_ticket(now)
                if ticket is None:
                    continue
                self.tokens -= 1.0
                self.granted += 1
                ticket.future.set_result(None)
                continue
            else:
                delay = (1.0 - self.tokens) / self.rate
            wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=delay)


class AccountBudgets:
    """The :class:`RequestBudget` of each account, per event loop (created on first use)."""

    _budgets: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, RequestBudget]] = (
        weakref.WeakKeyDictionary()
    )

    @classmethod
    def get(cls, settings: ClientSettings) -> RequestBudget | None:
        """The budget ``settings``' account draws from in the running loop; ``None`` where its
        connection sets ``max_requests_per_minute`` to 0. Hooks of one account that configure
        different rates share the lowest."""
        per_minute = settings.max_requests_per_minute
        if not per_minute > 0:
            return None
        budgets = cls._budgets.setdefault(asyncio.get_running_loop(), {})
        key = account_key(settings)
        budget = budgets.get(key)
        if budget is None:
            budget = budgets[key] = RequestBudget(per_minute)
        elif per_minute < budget.per_minute:
            budget.per_minute, budget.rate = per_minute, per_minute / 60.0
            budget.capacity = max(1.0, budget.rate * BURST_SECONDS)
            budget.tokens = min(budget.tokens, budget.capacity)
        return budget
