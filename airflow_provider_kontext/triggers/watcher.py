"""Answer many waits of one account per request from its prediction list.

The triggers of one account in one event loop share a :class:`PredictionWatcher` that reads the
account's prediction list (``GET /v1/predictions``, newest first, 100 per page) and delivers each
wait its prediction. Polling each prediction on its own cannot scale under Replicate's budget (3000
requests per minute per account: 1000 waits cannot all be looked at in less than 20 s); one list
page answers for up to 100 waits. Each trigger still decides *when* it wants to look (its
:class:`~airflow_provider_kontext.edits.progress.PredictionPoller`); the watcher decides *how*.
:func:`open_source` gives a trigger its
:class:`~airflow_provider_kontext.triggers.source.PredictionSource`: a
:class:`~airflow_provider_kontext.triggers.watch.SharedSource` on the watcher, or a
:class:`~airflow_provider_kontext.triggers.source.SoloSource` where the list is off.

- **Sweep or single reads.** The list is used while the waits it can answer for outnumber the pages
  one sweep took last time (``list_min_waits`` at least): a sweep of P pages then costs fewer
  requests than the waits' own reads. Otherwise each wait reads its prediction alone, as without a
  watcher (one wait, or an account whose window holds many other predictions).
- **The window, in slices.** A sweep reads only from its waits' oldest to their newest
  ``created_at`` (server timestamps: they only bound the list, they never decide that time is up;
  deadlines run on the local clock), cut into ``created_after``/``created_before`` slices of about a
  page, read side by side, oldest first (:mod:`.slices`, :mod:`.sweep`); a slice that holds none of
  its waits is not read, and one that holds more than a page stops paging once its waits are found.
  A wait whose ``created_at`` is unknown (a trigger deferred without it) is looked for in the newest
  pages and learns it there, or reads its prediction alone once.
- **Pacing.** Sweeps come when a wait is due, and otherwise every half of the shortest poll
  interval (a prediction that ends is seen within about half an interval), at most every
  :func:`~.sweep.sweep_gap` seconds: never more of the account's adaptive request budget than
  single reads leave (:class:`~.sweep.SweepShare`). A ``429`` pauses the account until the reset
  it names; the throttled slice's due waits stay due for the next sweep. A sweep delivers a
  prediction to every wait that is due, whose prediction ended, or whose status changed.
- **Its share of the account.** During the budget's slow start, a sweep tells it what share of the
  unfinished predictions it read (up to its newest wait's) are its own, once no wait joined for
  :data:`SHARE_SETTLE_SECONDS`: triggerers starting together each stop near their part.
- **Single reads where the list cannot answer:** a prediction missing from the window, an item that
  does not parse, a prediction that ended other than ``succeeded`` (its error and log tail come
  from a full read), and, because list items carry no ``logs``, one full read per
  :data:`~airflow_provider_kontext.triggers.watch.LOGS_EVERY_SECONDS` of processing (progress
  lines for the task log and the adaptive estimate). A list that fails is left alone for
  :data:`LIST_RETRY_SECONDS`.
- **Bound.** A due wait is answered by the next sweep, at most :data:`MAX_SWEEP_GAP` seconds
  later while the account's budget lets a sweep through (sweeps go before any single read); one
  still unanswered :data:`FALLBACK_SECONDS` after it became due reads its prediction alone if the
  watcher has stopped sweeping.

The watcher owns its queue of due waits; a wait only asks (:class:`~.watch.SweepService`). Each
trigger stays correct alone: the watcher only reads, holds nothing that a restart would lose (a new
triggerer's triggers open a new watcher), and two triggerers watching one account each sweep for
their own waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
import weakref
from typing import TYPE_CHECKING

from airflow_provider_kontext.hooks.accounts import AccountRateLimiters, account_key
from airflow_provider_kontext.hooks.rate_limit import REPLICATE_PER_MINUTE, AccountRateLimiter
from airflow_provider_kontext.triggers.slices import PAGE_SIZE, parse_time, plan_slices, to_micros
from airflow_provider_kontext.triggers.source import PredictionSource, SoloSource
from airflow_provider_kontext.triggers.sweep import (
    MAX_SWEEP_GAP,
    RECHECK_SECONDS,
    SweepReading,
    SweepShare,
    sweep_gap,
)
from airflow_provider_kontext.triggers.watch import NEEDS_OWN_READ, SharedSource, answer_from_item

if TYPE_CHECKING:
    from airflow_provider_kontext.hooks.connection import ClientSettings
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook

__all__ = [
    "FALLBACK_SECONDS",
    "LIST_RETRY_SECONDS",
    "MAX_SWEEP_GAP",
    "SHARE_SETTLE_SECONDS",
    "PredictionWatcher",
    "open_source",
]

#: A due wait not answered this long reads its prediction alone.
FALLBACK_SECONDS = MAX_SWEEP_GAP + 5.0
#: After the list failed, waits read alone for this long before the list is tried again.
LIST_RETRY_SECONDS = 60.0
#: The rate assumed where the connection sets no budget: Replicate's, requests per second.
UNBUDGETED_RATE = REPLICATE_PER_MINUTE / 60.0
#: A sweep tells the budget its share (after each page) from this many unfinished predictions read...
MIN_SHARE_SAMPLE = PAGE_SIZE
#: ...once no wait joined for this long (seconds; before, others' may be its own, on their way).
SHARE_SETTLE_SECONDS = 1.0
#: How far around the waits' oldest and newest ``created_at`` the window reaches (servers round
#: timestamps), microseconds.
WINDOW_MARGIN_MICROS = 2_000_000


async def open_source(
    hook: FluxKontextHook, prediction_id: str, created_at: str | None = None, *, poll_interval: float = 2.0
) -> PredictionSource:
    """Return where a trigger gets ``prediction_id``'s state: its account's watcher, or its own reads.

    A :class:`~.source.SoloSource` where the connection turns the list off (``list_min_waits`` 0) or
    its settings cannot be read (its own reads then report why); else a
    :class:`~.watch.SharedSource` on the account's watcher in the running loop.

    :param created_at: the prediction's ``created_at`` (ISO 8601), if known.
    :param poll_interval: the trigger's poll interval (sweeps come every half of the shortest).
    """
    watch = await PredictionWatcher.join(hook, prediction_id, created_at, poll_interval=poll_interval)
    return SoloSource(hook, prediction_id) if watch is None else watch


class PredictionWatcher:
    """Sweep one account's prediction list in one event loop for the waits of its triggers.

    It implements :class:`~.watch.SweepService` for its :class:`~.watch.SharedSource` s, and is
    made by their first :meth:`join` and stopped by their last :meth:`leave`.

    :param key: the account's key (:func:`~airflow_provider_kontext.hooks.accounts.account_key`).
    :param conn_id: the connection its own hook reads the list with.
    :param settings: the connection's settings (``list_min_waits``, the account's request budget).
    """

    _watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, PredictionWatcher]] = (
        weakref.WeakKeyDictionary()
    )

    #: A due wait not answered this long reads its prediction alone (see :class:`~.watch.SharedSource`).
    fallback_seconds = FALLBACK_SECONDS

    def __init__(self, key: str, conn_id: str, settings: ClientSettings) -> None:
        self.key = key
        self.conn_id = conn_id
        self.settings = settings
        self._hook: FluxKontextHook | None = None
        self.waits: dict[str, list[SharedSource]] = {}
        self._due: set[SharedSource] = set()
        self.sweeping = False
        #: Pages the last sweep read (the cost of the next, until measured again).
        self.last_sweep_pages = 1
        #: Pages all its sweeps read, and the share of the budget they may take.
        self.pages_read = 0
        self.share = SweepShare()
        #: The ``created_at`` (microseconds) of what the last sweep read, sorted: where to cut.
        self.last_seen: list[int] = []
        self.list_failed_at: float | None = None
        self._woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_sweep = -math.inf
        #: The shortest poll interval of its waits (see :meth:`idle_sweep_gap`).
        self.shortest_interval = math.inf
        #: When the last wait joined (monotonic seconds).
        self._joined_at = -math.inf

    def __repr__(self) -> str:
        return (
            f"PredictionWatcher(waits={len(self.waits)}, sweeping={self.sweeping}, "
            f"pages={self.last_sweep_pages})"
        )

    @classmethod
    async def join(
        cls, hook: FluxKontextHook, prediction_id: str, created_at: str | None = None, *, poll_interval: float
    ) -> SharedSource | None:
        """Return a wait on ``prediction_id`` on its account's watcher in the running loop.

        :returns: ``None`` where the connection turns the list off (``list_min_waits`` 0) or its
            settings cannot be read.
        """
        try:
            settings = await hook.aget_settings()
        except ValueError:
            return None
        if settings.list_min_waits <= 0:
            return None
        key = account_key(settings)
        watchers = cls._watchers.setdefault(asyncio.get_running_loop(), {})
        watcher = watchers.get(key)
        if watcher is None:
            watcher = watchers[key] = cls(key, hook.flux_kontext_conn_id, settings)
        wait = SharedSource(watcher, prediction_id, parse_time(created_at), hook)
        watcher.waits.setdefault(prediction_id, []).append(wait)
        watcher._joined_at = time.monotonic()
        watcher.shortest_interval = min(watcher.shortest_interval, poll_interval)
        watcher._decide_sweeping(exact=False)
        if watcher.sweeping:
            watcher.wake()
        return wait

    @property
    def hook(self) -> FluxKontextHook:
        """Return the watcher's own hook for the list (made at the first sweep, closed with the watcher)."""
        if self._hook is None:
            from airflow_provider_kontext.hooks.kontext import FluxKontextHook

            self._hook = FluxKontextHook(self.conn_id)
        return self._hook

    # --- what a wait asks (SweepService) -------------------------------------------------------

    def can_answer(self, wait: SharedSource) -> bool:
        """Return whether a sweep can answer for ``wait`` now: the one place that decides it.

        Sweeps must be on and the list usable, the wait findable in the list, and its next look must
        not need a full read (its logs).
        """
        return (
            self.sweeping
            and wait.sweepable
            and self.list_usable()
            and not wait.needs_full_read(time.monotonic())
        )

    def still_sweeping(self) -> bool:
        """Return whether the sweep loop is alive and the list usable."""
        return self._task is not None and not self._task.done() and self.list_usable()

    def enqueue(self, wait: SharedSource) -> None:
        """Queue the due ``wait`` for the next sweep and wake the sweep loop."""
        self._due.add(wait)
        self.wake()

    def dequeue(self, wait: SharedSource) -> None:
        """Take ``wait`` off the queue of due waits (a no-op where it is not queued)."""
        self._due.discard(wait)

    async def leave(self, wait: SharedSource) -> None:
        """Forget ``wait``; the last wait out stops the sweeps and closes the watcher's hook."""
        waits = self.waits.get(wait.prediction_id, [])
        if wait in waits:
            waits.remove(wait)
        if not waits:
            self.waits.pop(wait.prediction_id, None)
        self._due.discard(wait)
        if self.waits:
            self._decide_sweeping(exact=False)
            return
        watchers = self._watchers.get(asyncio.get_running_loop(), {})
        if watchers.get(self.key) is self:
            del watchers[self.key]
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._hook is not None:
            await self._hook.aclose()

    # --- when to sweep ---------------------------------------------------------------------------

    def list_usable(self) -> bool:
        """Return whether the list may be read (it has not failed in the last :data:`LIST_RETRY_SECONDS`)."""
        return self.list_failed_at is None or time.monotonic() - self.list_failed_at >= LIST_RETRY_SECONDS

    def _sweep_gap(self) -> float:
        """Return the least seconds between sweeps; where the budget's rate holds them back, tell it."""
        budget = AccountRateLimiters.get(self.settings)
        if budget is None:
            return sweep_gap(self.last_sweep_pages, UNBUDGETED_RATE, self.share.share)
        pages, interval = self.last_sweep_pages, self.shortest_interval
        gap = sweep_gap(pages, budget.rate, self.share.at(budget.rate, budget.ceiling, pages, interval))
        if gap > interval / 2:
            budget.hold_back(gap)  # the rate is in use: it may grow
        return gap

    def _expect_share(self, budget: AccountRateLimiter, reading: SweepReading) -> None:
        """Tell ``budget`` what share of the unfinished predictions read this watcher waits on.

        Others' are likely polled by other triggerers or programs on the account
        (:meth:`~airflow_provider_kontext.hooks.rate_limit.AccountRateLimiter.expect_share`).
        """
        if reading.running >= MIN_SHARE_SAMPLE and time.monotonic() - self._joined_at >= SHARE_SETTLE_SECONDS:
            budget.expect_share(reading.running_own / reading.running)

    def _measure_share(self) -> None:
        self.share.measure(time.monotonic(), AccountRateLimiters.get(self.settings), self.pages_read)

    def _decide_sweeping(self, *, exact: bool = True) -> None:
        """Sweep while the waits a sweep answers for outnumber the pages it costs.

        :param exact: count only the waits a sweep can find; else all, cheaply, as waits come and go.
        """
        if exact:
            findable = sum(1 for waits in self.waits.values() if any(w.sweepable for w in waits))
        else:
            findable = len(self.waits)
        self.sweeping = (
            self.list_usable()
            and findable >= max(2, self.settings.list_min_waits)
            and findable > max(self.last_sweep_pages, math.ceil(findable / PAGE_SIZE))
        )

    def wake(self) -> None:
        """Wake the sweep loop (starting it where it is not running)."""
        self._woken.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def idle_sweep_gap(self) -> float:
        """Return the seconds between sweeps while no wait is due.

        Half the shortest poll interval of its waits, never sooner than :func:`~.sweep.sweep_gap`: waits
        answered by one sweep all become due one interval later, and sweeps on their own keep
        detection from falling into step with them.
        """
        return max(self._sweep_gap(), self.shortest_interval / 2)

    async def _run(self) -> None:
        while self.waits:
            if not self._due:
                if self.sweeping:
                    timeout = max(0.0, self._last_sweep + self.idle_sweep_gap() - time.monotonic())
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._woken.wait(), timeout=min(timeout, RECHECK_SECONDS))
                    if not self._woken.is_set() and timeout > RECHECK_SECONDS:
                        continue  # measured again: the budget's rate may have grown meanwhile
                else:
                    await self._woken.wait()
            self._woken.clear()
            if not self.sweeping and not self._due:
                continue
            gap = self._last_sweep + self._sweep_gap() - time.monotonic()
            if gap > 0:  # measured again after a while: the budget's rate may have grown meanwhile
                await asyncio.sleep(min(gap, RECHECK_SECONDS))
                self._woken.set()
                continue
            self._last_sweep = time.monotonic()
            self._measure_share()
            try:
                await self.sweep()
            except Exception as exc:  # a bug must not leave waits unanswered: they read alone
                self.hook.log.warning("Reading the prediction list failed; polling one by one: %r", exc)
                self.list_failed_at = time.monotonic()
                self._send_due_to_own_reads()
            self._decide_sweeping()
            if self._due:
                self._woken.set()

    # --- a sweep ---------------------------------------------------------------------------------

    def _send_due_to_own_reads(self) -> None:
        for wait in list(self._due):
            wait.deliver(NEEDS_OWN_READ)
        self._due.clear()

    async def sweep(self) -> None:
        """Read the list where the pending waits are and deliver each its prediction.

        The list is read in slices (:mod:`.slices`, :mod:`.sweep`); a wait gets its prediction where
        it is due, its prediction ended, or its status changed. Due waits the list did not answer for
        read alone. A throttled slice leaves its due waits due (the next sweep answers them, after
        the account's pause); a failing list is left alone for :data:`LIST_RETRY_SECONDS`.
        """
        targets = {
            pid: pending
            for pid, waits in self.waits.items()
            if (pending := [w for w in waits if w.waiting and w.sweepable])
        }
        if not targets:
            self._send_due_to_own_reads()  # due, but none the list can answer for
            return
        known: dict[str, int] = {}
        for pid, waits in targets.items():
            created = next((w.created_at for w in waits if w.created_at is not None), None)
            if created is not None:
                known[pid] = to_micros(created)
        unknown_ids = set(targets) - set(known)
        slices = plan_slices(known, len(unknown_ids), self.last_seen, WINDOW_MARGIN_MICROS)
        budget = AccountRateLimiters.get(self.settings)
        telling = budget if budget is not None and budget.slow_start else None  # only a slow start uses it
        reading = SweepReading(
            self.hook,
            set(targets),
            unknown_ids,
            on_item=lambda pid, item: self._due.difference_update(answer_from_item(item, targets[pid])),
            on_list_failed=lambda: setattr(self, "list_failed_at", time.monotonic()),
            own=self.waits.keys(),
            count_until=None if telling is None else max(known.values(), default=None),
            on_page=None if telling is None else functools.partial(self._expect_share, telling),
        )
        complete = await reading.read(slices)
        self.pages_read += reading.pages
        if reading.pages:
            self.last_sweep_pages = reading.pages
            self.last_seen = sorted(reading.seen)
        if not self.list_usable():
            self._send_due_to_own_reads()  # they read alone now; the list is tried again later
            return
        for piece, done in zip(slices, complete, strict=True):
            if not done:
                continue  # throttled or cut: its waits wait for the next sweep
            lost = (piece.expected | (unknown_ids if piece.finds_unknown else set())) & reading.missing
            for pid in lost:
                for wait in targets[pid]:
                    if wait.waiting and wait.due:
                        wait.note_missed()
                        self._due.discard(wait)
        # Waits that became due during the sweep stay due: the next sweep answers them.
