"""Status for many predictions per request: the triggers of one account in one event loop share a
:class:`PredictionWatcher` that reads the account's prediction list (``GET /v1/predictions``,
newest first, 100 per page) and hands each trigger its prediction.

Polling each prediction on its own cannot scale under Replicate's budget (3000 requests per minute
per account: 1000 waits cannot all be looked at in less than 20 s). One list page answers for up to
100 waits. Each trigger still decides *when* it wants to look (its
:class:`~airflow_provider_kontext.edits.progress.PredictionPoller`); the watcher decides *how*:

- **Sweep or single reads.** The list is used while the waits it can answer for outnumber the pages
  one sweep took last time (``list_min_waits`` at least): a sweep of P pages then costs fewer
  requests than the waits' own reads. Otherwise each wait reads its prediction alone, as without a
  watcher (one wait, or an account whose window holds many other predictions).
- **The window, in slices.** A sweep reads only from its waits' oldest to their newest
  ``created_at`` (server timestamps: they only bound the list, they never decide that time is up;
  deadlines run on the local clock), cut into ``created_after``/``created_before`` slices of about a
  page, read side by side, oldest first (:mod:`.slices`); a slice that holds none of its waits (the
  other triggerers' predictions, or waits that ended) is not read, and one that holds more than a
  page stops paging once its waits are found. A wait whose ``created_at`` is unknown (a trigger
  deferred without it) is looked for in the newest pages and learns it there, or reads its
  prediction alone once.
- **Pacing.** Sweeps come when a wait is due, and otherwise every half of the shortest poll
  interval (so a prediction that ends is seen within about half an interval, whenever it ends), at
  most every :func:`sweep_gap` seconds: never more than :data:`SWEEP_SHARE` of the account's
  request budget (whose rate adapts to the account's ``429`` s: several triggerers find their
  shares), so single reads keep the rest. A ``429`` pauses the account until the reset it names; the
  throttled slice is read again after it, and its due waits stay due for the next sweep. A sweep
  hands a prediction to every wait that is due, whose prediction ended, or whose status changed.
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

Each wait's own part (whether a sweep can answer for it, its full reads, its fallback) is a
:class:`~airflow_provider_kontext.triggers.watch.Watch`. Each trigger stays correct alone: the
watcher only reads, holds nothing that a restart would lose (a new triggerer's triggers open a new
watcher), and two triggerers watching one account each sweep for their own waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import weakref
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from airflow_provider_kontext.exceptions import FluxKontextError, FluxKontextRateLimitError
from airflow_provider_kontext.hooks.rate_limit import AccountRateLimiters, account_key
from airflow_provider_kontext.hooks.retry import RetryLimits
from airflow_provider_kontext.models import Prediction, PredictionPage
from airflow_provider_kontext.triggers.slices import PAGE_SIZE, Slice, iso, micros, plan
from airflow_provider_kontext.triggers.watch import READ_ALONE, Watch, parse_time

if TYPE_CHECKING:
    from airflow_provider_kontext.hooks.connection import ClientSettings
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook

__all__ = [
    "FALLBACK_SECONDS",
    "LIST_RETRY_SECONDS",
    "MAX_SWEEP_GAP",
    "MIN_SWEEP_GAP",
    "SWEEP_SHARE",
    "PredictionWatcher",
    "sweep_gap",
]

#: Sweeps come at most this often (seconds).
MIN_SWEEP_GAP = 0.25
#: ...and at least this often while a wait is due: the bound on how long a due wait goes unanswered.
MAX_SWEEP_GAP = 10.0
#: The share of the account's request budget sweeps may take; single reads keep the rest.
SWEEP_SHARE = 0.5
#: A due wait not answered this long reads its prediction alone.
FALLBACK_SECONDS = MAX_SWEEP_GAP + 5.0
#: After the list failed, waits read alone for this long before the list is tried again.
LIST_RETRY_SECONDS = 60.0
#: The rate assumed where the connection sets no budget: Replicate's, requests per second.
UNBUDGETED_RATE = 3000 / 60.0
#: How far around the waits' oldest and newest ``created_at`` the window reaches (servers round
#: timestamps), microseconds.
WINDOW_MARGIN_MICROS = 2_000_000
#: Slices of one sweep read at once, at most.
MAX_CONCURRENT_SLICES = 8
#: The list's retries of one page; then the waits read alone.
_PAGE_LIMITS = RetryLimits(retries=2, tolerate=True, priority=0.0)

_TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})


def sweep_gap(pages: int, rate: float) -> float:
    """Seconds between sweeps of ``pages`` pages under a budget of ``rate`` requests per second."""
    return min(MAX_SWEEP_GAP, max(MIN_SWEEP_GAP, pages / (SWEEP_SHARE * rate)))


class PredictionWatcher:
    """The sweeps of one account in one event loop, shared by its triggers' :class:`Watch` es."""

    _watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, PredictionWatcher]] = (
        weakref.WeakKeyDictionary()
    )

    #: A due wait not answered this long reads its prediction alone (see :class:`Watch`).
    fallback_seconds = FALLBACK_SECONDS

    def __init__(self, key: str, conn_id: str, settings: ClientSettings) -> None:
        self.key = key
        self.conn_id = conn_id
        self.settings = settings
        self._hook: FluxKontextHook | None = None
        self.watches: dict[str, list[Watch]] = {}
        self.due: set[Watch] = set()
        self.sweeping = False
        #: Pages the last sweep read (the cost of the next, until measured again).
        self.pages = 1
        #: The ``created_at`` (microseconds) of what the last sweep read, sorted: where to cut.
        self.sample: list[int] = []
        self.sweeps = 0
        self.list_failed_at: float | None = None
        self._kicked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_sweep = -math.inf
        #: The shortest poll interval of its waits (see :meth:`period`).
        self.interval = math.inf

    def __repr__(self) -> str:
        return f"PredictionWatcher(waits={len(self.watches)}, sweeping={self.sweeping}, pages={self.pages})"

    @classmethod
    async def open(
        cls,
        hook: FluxKontextHook,
        prediction_id: str,
        created_at: str | None = None,
        *,
        poll_interval: float = 2.0,
    ) -> Watch | None:
        """A watch of ``prediction_id`` on its account's watcher in the running loop; ``None`` where
        the connection turns the list off (``list_min_waits`` 0) or cannot be read (the caller's
        own reads then report why)."""
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
        watch = Watch(watcher, prediction_id, parse_time(created_at), hook)
        watcher.watches.setdefault(prediction_id, []).append(watch)
        watcher.interval = min(watcher.interval, poll_interval)
        watcher._decide(exact=False)
        if watcher.sweeping:
            watcher.kick()
        return watch

    @property
    def hook(self) -> FluxKontextHook:
        """The watcher's own hook for the list (made at the first sweep, closed with the watcher)."""
        if self._hook is None:
            from airflow_provider_kontext.hooks.kontext import FluxKontextHook

            self._hook = FluxKontextHook(self.conn_id)
        return self._hook

    # --- bookkeeping ----------------------------------------------------------------------------

    def _rate(self) -> float:
        budget = AccountRateLimiters.get(self.settings)
        return budget.rate if budget is not None else UNBUDGETED_RATE

    @property
    def running(self) -> bool:
        """Whether its sweep loop is alive."""
        return self._task is not None and not self._task.done()

    def list_usable(self) -> bool:
        return self.list_failed_at is None or time.monotonic() - self.list_failed_at >= LIST_RETRY_SECONDS

    def _decide(self, *, exact: bool = True) -> None:
        """Sweep while the waits a sweep answers for outnumber the pages it costs (``exact``: count
        only the waits a sweep can answer for; else all, cheaply, as waits come and go)."""
        if exact:
            sweepable = sum(1 for watches in self.watches.values() if any(w.sweepable for w in watches))
        else:
            sweepable = len(self.watches)
        self.sweeping = (
            self.list_usable()
            and sweepable >= max(2, self.settings.list_min_waits)
            and sweepable > max(self.pages, math.ceil(sweepable / PAGE_SIZE))
        )

    def kick(self) -> None:
        self._kicked.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def leave(self, watch: Watch) -> None:
        watches = self.watches.get(watch.prediction_id, [])
        if watch in watches:
            watches.remove(watch)
        if not watches:
            self.watches.pop(watch.prediction_id, None)
        self.due.discard(watch)
        if self.watches:
            self._decide(exact=False)
            return
        watchers = self._watchers.get(asyncio.get_running_loop(), {})
        if watchers.get(self.key) is self:
            del watchers[self.key]
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._hook is not None:
            await self._hook.aclose()

    # --- sweeps ---------------------------------------------------------------------------------

    def period(self) -> float:
        """Seconds between sweeps while no wait is due: half the shortest poll interval of its
        waits, never sooner than :func:`sweep_gap`. Waits answered by one sweep all become due one
        interval later; sweeps on their own keep detection from falling into step with them."""
        return max(sweep_gap(self.pages, self._rate()), self.interval / 2)

    async def _run(self) -> None:
        while self.watches:
            if not self.due:
                if self.sweeping:
                    timeout = max(0.0, self._last_sweep + self.period() - time.monotonic())
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._kicked.wait(), timeout=timeout)
                else:
                    await self._kicked.wait()
            self._kicked.clear()
            if not self.sweeping and not self.due:
                continue
            wait = self._last_sweep + sweep_gap(self.pages, self._rate()) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last_sweep = time.monotonic()
            try:
                await self.sweep()
            except Exception as exc:  # a bug must not leave waits unanswered: they read alone
                self.hook.log.warning("Reading the prediction list failed; polling one by one: %r", exc)
                self.list_failed_at = time.monotonic()
                self._release_due()
            self._decide()
            if self.due:
                self._kicked.set()

    def _release_due(self) -> None:
        for watch in list(self.due):
            watch.hand(READ_ALONE)
        self.due.clear()

    async def sweep(self) -> None:
        """Read the list where the waiting watches are (see :mod:`.slices`: concurrent ranges of
        about a page, oldest first, each paged only until its waits are found) and hand each its
        prediction where it is due, ended, or changed; the due ones the list did not answer for
        read alone. A throttled range leaves its due waits due (the next sweep answers them, after
        the account's pause); a failing list is left alone for :data:`LIST_RETRY_SECONDS`."""
        targets = {
            pid: ws
            for pid, watches in self.watches.items()
            if (ws := [w for w in watches if w.waiting and w.sweepable])
        }
        if not targets:
            self._release_due()  # due, but none the list can answer for
            return
        known: dict[str, int] = {}
        for pid, watches in targets.items():
            created = next((w.created_at for w in watches if w.created_at is not None), None)
            if created is not None:
                known[pid] = micros(created)
        unknown = len(targets) - len(known)
        ranges = plan(known, unknown, self.sample, WINDOW_MARGIN_MICROS)
        unknown_ids = set(targets) - set(known)
        missing = set(targets)
        seen: list[int] = []
        limit = asyncio.Semaphore(MAX_CONCURRENT_SLICES)
        read = await asyncio.gather(
            *(self._read(one, targets, unknown_ids, missing, seen, limit) for one in ranges)
        )
        self.sweeps += 1
        pages = sum(count for count, _complete in read)
        if pages:
            self.pages = pages
            seen.sort()
            self.sample = seen
        if not self.list_usable():
            self._release_due()  # they read alone now; the list is tried again later
            return
        for one, (_count, complete) in zip(ranges, read, strict=True):
            if not complete:
                continue  # throttled or cut: its waits wait for the next sweep
            lost = (one.targets | (unknown_ids if one.unknown else set())) & missing
            for pid in lost:
                for watch in targets[pid]:
                    if watch.waiting and watch.due:
                        watch.misses += 1
                        watch.hand(READ_ALONE)
                        self.due.discard(watch)
        # Waits that became due during the sweep stay due: the next sweep answers them.

    async def _read(
        self,
        one: Slice,
        targets: dict[str, list[Watch]],
        unknown_ids: set[str],
        missing: set[str],
        seen: list[int],
        limit: asyncio.Semaphore,
    ) -> tuple[int, bool]:
        """Page through one slice; (pages read, whether it was read to its end or found all its
        waits)."""
        after = None if one.after is None else iso(one.after)
        before = None if one.before is None else iso(one.before)
        cursor: str | None = None
        pages = 0
        async with limit:
            while True:
                try:
                    page = await self.hook.alist_predictions(
                        created_after=after, created_before=before, cursor=cursor, retry_limits=_PAGE_LIMITS
                    )
                except FluxKontextRateLimitError:
                    return pages, False  # paused until the reset: the due waits wait for the next sweep
                except FluxKontextError:
                    self.list_failed_at = time.monotonic()
                    return pages, False
                pages += 1
                for item in page.results:
                    created = parse_time(item.get("created_at"))
                    if created is not None:
                        seen.append(micros(created))
                    pid = item.get("id")
                    watches = targets.get(pid) if isinstance(pid, str) else None
                    if watches is None:
                        continue
                    missing.discard(pid)
                    one.targets.discard(pid)
                    self._deliver(item, watches)
                cursor = page.next_cursor
                if cursor is None:
                    return pages, True
                if not one.targets and not (one.unknown and unknown_ids & missing):
                    return pages, True  # every wait of the slice is answered
                if one.cap is not None and pages >= one.cap:
                    return pages, True

    def _deliver(self, item: dict[str, Any], watches: list[Watch]) -> None:
        status = item.get("status")
        prediction: Prediction | None = None
        for watch in watches:
            if watch.created_at is None:
                watch.created_at = parse_time(item.get("created_at"))
            if not watch.waiting or not (watch.due or status in _TERMINAL or status != watch.last_status):
                continue
            if status in _TERMINAL and status != "succeeded":
                watch.hand(READ_ALONE)  # its error and log tail come from a full read
                continue
            if prediction is None:
                try:
                    prediction = PredictionPage.prediction(item)
                except ValidationError:
                    watch.hand(READ_ALONE)
                    continue
            watch.saw(prediction, full=False)
            watch.hand(prediction)
            self.due.discard(watch)
