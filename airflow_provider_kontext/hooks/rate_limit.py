"""Pace the async requests of each account with one adaptive token bucket per event loop.

Every async request of the hooks of one event loop (the triggerer runs all triggers in one) that
talk to the same account draws from one token bucket, whose rate adapts to what the account answers.

Replicate limits each account to 3000 requests per minute for everything but creates (every poll of
every prediction counts), and tells nobody how much of it others spend: several triggerers, other
deployments and scripts may share one token. Each budget finds its share as congestion control does
(additive increase, multiplicative decrease). The connection's ``max_requests_per_minute`` is a
ceiling, never exceeded (``0``: no budget); a new budget starts at :data:`START_SHARE` of it and,
until its first ``429``, multiplies its rate by :data:`SLOW_START_GROWTH` per second its requests
use the rate (slow start, as TCP's). A ``429`` cuts the rate by :data:`DECREASE_FACTOR`; afterwards,
while no ``429`` comes and the rate is used, it adds :data:`INCREASE_SHARE` of the ceiling per
second, faster the longer no ``429`` came. Where its callers tell it what share of the account is
theirs (:meth:`AccountRateLimiter.expect_share`), a slow start holds at that share of Replicate's
limit, then grows additively: triggerers that start together do not all double their way into the
account's limit. Budgets of one account that all do this converge on the account's limit, in equal
shares, with no configuration.
Which budget a request draws from (its account, in its event loop) is
:mod:`airflow_provider_kontext.hooks.accounts`'s.

- A ``429`` for one request pauses every request of the account until the reset the server names;
  after it the bucket starts empty, so requests resume paced, never all at once. The ``429`` s of
  requests already in flight when the first came are one signal: the rate is cut once per pause.
- While requests wait, the one whose ``priority`` is smallest goes first (polls pass the time their
  prediction is expected to end, so the predictions most likely to have finished are looked at
  first), except that a request that has waited :data:`MAX_QUEUE_SECONDS` goes before any other:
  the ordering never starves a wait.

Requests of the sync path (creates and uploads in worker processes) draw from no budget: a process
budget cannot cover many workers. They retry a 429 after the reset the server names (see
:mod:`airflow_provider_kontext.hooks.retry`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import math
import time
from collections.abc import Callable

__all__ = [
    "DECREASE_FACTOR",
    "DEFAULT_PAUSE_SECONDS",
    "INCREASE_SHARE",
    "MAX_QUEUE_SECONDS",
    "REPLICATE_PER_MINUTE",
    "SHARE_HOLD_SECONDS",
    "SLOW_START_GROWTH",
    "START_SHARE",
    "AccountRateLimiter",
]

#: A request that has waited this long for the budget goes before any other, whatever its priority:
#: no poll is put off for ever by polls of predictions expected to end sooner.
MAX_QUEUE_SECONDS = 10.0
#: How long a 429 that names no reset pauses the account.
DEFAULT_PAUSE_SECONDS = 1.0
#: Seconds of the rate the bucket holds: the burst a quiet account may send at once. Short, so that
#: requests in flight when the account runs out (each answered ``429``) stay few.
BURST_SECONDS = 0.25
#: A ``429`` multiplies the rate by this.
DECREASE_FACTOR = 0.5
#: While no ``429`` comes and the rate is used, it grows by this share of the ceiling per second...
INCREASE_SHARE = 0.0075
#: ...times one more for every this many seconds since the last ``429`` (a budget far below its
#: share, or an account others stopped using, gets its rate back within seconds, while budgets near
#: the account's limit probe it gently).
INCREASE_ACCELERATION_SECONDS = 4.0
#: A new budget starts at this share of its ceiling (slow start, as TCP's: several triggerers that
#: start together, or join an account others already use, do not all send at their ceilings at once)...
START_SHARE = 0.25
#: ...and, until its first ``429``, multiplies its rate by this per second while the rate is used.
SLOW_START_GROWTH = 2.0
#: A slow start held this long (seconds) at the share its callers expect
#: (:meth:`AccountRateLimiter.expect_share`) ends there.
SHARE_HOLD_SECONDS = 5.0
#: Replicate's documented limit on each account's requests other than creates, per minute: the whole
#: that a share (:meth:`AccountRateLimiter.expect_share`) is a part of.
REPLICATE_PER_MINUTE = 3000.0
#: The rate never falls below this share of the ceiling...
FLOOR_SHARE = 0.02
#: ...nor below this many requests per second.
MIN_RATE = 0.1
#: The rate is adjusted at most this often (seconds).
ADJUST_SECONDS = 0.5
#: A step in which the budget granted at least this share of its rate counts as using it.
USED_SHARE = 0.5


class _Ticket:
    __slots__ = ("enqueued", "future")

    def __init__(self, future: asyncio.Future[None], enqueued: float) -> None:
        self.future = future
        self.enqueued = enqueued


class AccountRateLimiter:
    """A token bucket shared by the requests of one account in one event loop.

    Its rate adapts to the account's ``429`` s (see the module's docstring).

    :param per_minute: the ceiling: most requests per minute (an adaptive budget starts at
        :data:`START_SHARE` of it, a fixed one at it).
    :param clock: monotonic seconds (tests pass their own).
    :param max_queue_seconds: see :data:`MAX_QUEUE_SECONDS`.
    :param adaptive: ``False``: a fixed rate of ``per_minute``, ``429`` s only pause it.
    """

    def __init__(
        self,
        per_minute: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_queue_seconds: float = MAX_QUEUE_SECONDS,
        burst_seconds: float = BURST_SECONDS,
        adaptive: bool = True,
    ) -> None:
        if not per_minute > 0:
            raise ValueError(f"a request budget needs a positive rate, got {per_minute}")
        self.adaptive = adaptive
        self.burst_seconds = burst_seconds
        self.max_queue_seconds = max_queue_seconds
        self._clock = clock
        self.per_minute = per_minute
        #: Whether the budget is still in its slow start (no ``429`` yet: it grows multiplicatively).
        self.slow_start = adaptive
        #: Requests per second now.
        self.rate = per_minute / 60.0 * (START_SHARE if adaptive else 1.0)
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.tokens = self.capacity
        self._updated = clock()
        self.paused_until = 0.0
        self._heap: list[tuple[float, int, _Ticket]] = []
        self._fifo: collections.deque[_Ticket] = collections.deque()
        self._seq = itertools.count()
        self._dispatcher: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._step_started = self._updated
        self._step_granted = 0
        self._step_waited = False
        #: Since when the rate grows additively (the last ``429``, or the end of a held slow start).
        self._additive_since = self._updated
        #: The share of the account's requests its callers expect to be theirs (:meth:`expect_share`).
        self.expected_share: float | None = None
        #: When a slow start first reached its share.
        self._capped_since = math.inf
        self._held_back_until = -float("inf")
        #: Requests granted, 429s that paused the account, and cuts of the rate (logs, benchmarks).
        self.granted = 0
        self.pauses = 0
        self.decreases = 0

    def __repr__(self) -> str:
        return (
            f"AccountRateLimiter(per_minute={self.per_minute:g}, rate={self.rate * 60:.0f}/min, "
            f"waiting={self.waiting})"
        )

    @property
    def ceiling(self) -> float:
        """The most requests per second (the connection's ``max_requests_per_minute``)."""
        return self.per_minute / 60.0

    @property
    def floor(self) -> float:
        """The least requests per second a ``429`` leaves."""
        return min(self.ceiling, max(MIN_RATE, self.ceiling * FLOOR_SHARE))

    def set_ceiling(self, per_minute: float) -> None:
        """Lower (or raise) the ceiling; the rate never stays above it."""
        self.per_minute = per_minute
        self._set_rate(min(self.rate, self.ceiling) if self.adaptive else self.ceiling)

    def _set_rate(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate * self.burst_seconds)
        self.tokens = min(self.tokens, self.capacity)

    @property
    def waiting(self) -> int:
        """Requests waiting for a token."""
        return sum(1 for ticket in self._fifo if not ticket.future.done())

    def _refill(self, now: float) -> None:
        if now > self._updated:
            self.tokens = min(self.capacity, self.tokens + (now - self._updated) * self.rate)
            self._updated = now

    def _adjust(self, now: float) -> None:
        """Raise the rate, once per :data:`ADJUST_SECONDS`, while it is used and no ``429`` came.

        Used: a request waited, a caller held back (:meth:`hold_back`), or at least
        :data:`USED_SHARE` of the rate was granted. A slow start multiplies it, up to its share
        (:meth:`expect_share`); after the slow start it grows additively.
        """
        elapsed = now - self._step_started
        if elapsed < ADJUST_SECONDS:
            return
        used = (
            self._step_waited
            or self._step_granted >= USED_SHARE * self.rate * elapsed
            or self._held_back_until >= self._step_started
        )
        if self.adaptive and used and now >= self.paused_until and self.rate < self.ceiling:
            seconds = min(elapsed, 2 * ADJUST_SECONDS)
            if self.slow_start:
                rate = min(self.rate * SLOW_START_GROWTH**seconds, self._slow_start_cap)
                if rate >= self._slow_start_cap:
                    self._capped_since = min(self._capped_since, now)
                    if now - self._capped_since >= SHARE_HOLD_SECONDS:
                        self.slow_start = False  # held at its share long enough: probe above it gently
                        self._additive_since = now
            else:
                since = max(0.0, now - self._additive_since)
                step = INCREASE_SHARE * self.ceiling * (1.0 + since / INCREASE_ACCELERATION_SECONDS)
                rate = self.rate + step * seconds
            self._refill(now)
            self._set_rate(min(self.ceiling, rate))
        self._step_started = now
        self._step_granted = 0
        self._step_waited = bool(self._fifo)

    @property
    def _slow_start_cap(self) -> float:
        """The most a slow start grows to: its expected share of Replicate's limit, never below its start.

        The ceiling where no share was told.
        """
        if self.expected_share is None:
            return self.ceiling
        return max(self.ceiling * START_SHARE, REPLICATE_PER_MINUTE / 60.0 * self.expected_share)

    def expect_share(self, share: float) -> None:
        """Tell the budget what share of the account's requests its callers expect to be theirs.

        The list watcher reads how many of the account's unfinished predictions are its own: where
        the others' are many, other triggerers or programs are likely polling them. A slow start
        grows no further than ``share`` of :data:`REPLICATE_PER_MINUTE` (and the ceiling; a rate
        that grew past it is brought back to it, never below the start); held there for
        :data:`SHARE_HOLD_SECONDS` from when it first reached a share, the slow start ends and the
        rate grows additively. A guess, which the account's answers correct; after the slow start,
        it changes nothing.
        """
        self.expected_share = min(1.0, max(0.0, share))
        if self.adaptive and self.slow_start and self.rate > self._slow_start_cap:
            now = self._clock()
            self._refill(now)
            self._set_rate(self._slow_start_cap)
            self._capped_since = min(self._capped_since, now)

    def hold_back(self, seconds: float) -> None:
        """Record that a caller holds its requests back for ``seconds`` because of the rate.

        A caller that paces itself by :attr:`rate` (the list watcher's sweeps) never waits in the
        queue; while it holds back, the rate counts as used, so it may grow.
        """
        now = self._clock()
        self._held_back_until = max(self._held_back_until, now + seconds)
        if now >= self.paused_until:
            self._adjust(now)  # nobody may request meanwhile: the rate is brought up to date here

    def _take(self) -> None:
        self.tokens -= 1.0
        self.granted += 1
        self._step_granted += 1

    def _available(self, now: float) -> bool:
        if now < self.paused_until:
            return False
        self._adjust(now)
        self._refill(now)
        return self.tokens >= 1.0

    def spare(self, reserve: float = 0.5) -> bool:
        """Tell whether a request could go now without delaying any other.

        True when nobody waits and more than ``reserve`` of the bucket is full. Takes nothing (for
        optional reads).
        """
        now = self._clock()
        return not self._fifo and self._available(now) and self.tokens >= reserve * self.capacity

    def try_acquire(self) -> bool:
        """Take a token if one is there and nobody waits; never wait.

        A refusal counts as a request that wanted to go: the rate is in use.
        """
        now = self._clock()
        if self._fifo or not self._available(now):
            self._step_waited = True
            return False
        self._take()
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
        self._step_waited = True
        ticket = _Ticket(asyncio.get_running_loop().create_future(), now)
        heapq.heappush(self._heap, (key, next(self._seq), ticket))
        self._fifo.append(ticket)
        self._kick()
        await ticket.future

    def pause(self, seconds: float | None) -> None:
        """Pause the account after a 429 and cut its rate.

        Holds every request until the reset the answer named (``None``:
        :data:`DEFAULT_PAUSE_SECONDS`), then resumes from an empty bucket (paced), at a rate cut by
        :data:`DECREASE_FACTOR` (once per pause: the ``429`` s of requests that were in flight when
        it began are the same signal).
        """
        now = self._clock()
        if self.adaptive and now >= self.paused_until:
            self.slow_start = False
            self._set_rate(max(self.floor, self.rate * DECREASE_FACTOR))
            self.decreases += 1
            self._additive_since = now
            self._step_started, self._step_granted, self._step_waited = now, 0, False
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
                self._take()
                ticket.future.set_result(None)
                continue
            else:
                delay = (1.0 - self.tokens) / self.rate
            wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=delay)
