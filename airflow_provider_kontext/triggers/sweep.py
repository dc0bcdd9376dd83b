"""Read one sweep's slices of the prediction list, side by side, and report each wanted item found.

The reading knows nothing of waits: it is given the slices (:mod:`.slices`), the ids it looks for
and two callbacks, and pages each slice only until the ids expected in it are found. A throttled
slice (``429``: the account is paused until the reset it names) or a failing list ends that slice
unread to its end; the watcher decides what its waits do next.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Container
from typing import TYPE_CHECKING, Any

from airflow_provider_kontext.exceptions import FluxKontextError, FluxKontextRateLimitError
from airflow_provider_kontext.hooks.retry import RetryLimits
from airflow_provider_kontext.models import TERMINAL_STATUSES
from airflow_provider_kontext.triggers.slices import Slice, micros_to_iso, parse_time, to_micros

if TYPE_CHECKING:
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook
    from airflow_provider_kontext.hooks.rate_limit import AccountRateLimiter

__all__ = [
    "MAX_CONCURRENT_SLICES",
    "MAX_SWEEP_GAP",
    "MAX_SWEEP_SHARE",
    "MIN_SWEEP_GAP",
    "MIN_SWEEP_SHARE",
    "RECHECK_SECONDS",
    "SweepReading",
    "SweepShare",
    "sweep_gap",
]

#: Slices of one sweep read at once, at most.
MAX_CONCURRENT_SLICES = 8
#: The list's retries of one page; then the waits read alone.
PAGE_LIMITS = RetryLimits(retries=2, tolerate=True, priority=0.0)
#: Sweeps come at most this often (seconds).
MIN_SWEEP_GAP = 0.25
#: ...and at least this often while a wait is due: the bound on how long a due wait goes unanswered.
MAX_SWEEP_GAP = 10.0
#: A watcher waiting for its next sweep measures the gap again this often (seconds): the budget's
#: rate may have grown meanwhile.
RECHECK_SECONDS = 0.5
#: Sweeps take at least this share of the account's request budget (single reads keep the rest)...
MIN_SWEEP_SHARE = 0.5
#: ...and at most this share, however little the other requests take.
MAX_SWEEP_SHARE = 0.9


def sweep_gap(pages: int, rate: float, share: float = MIN_SWEEP_SHARE) -> float:
    """Return the seconds between sweeps of ``pages`` pages taking ``share`` of ``rate`` requests/s."""
    return min(MAX_SWEEP_GAP, max(MIN_SWEEP_GAP, pages / (share * rate)))


class SweepShare:
    """Measure what the account's other requests take of its budget; sweeps may take the rest.

    Single reads (a wait's logs or error, a wait the list cannot find) and other hooks of the account
    draw from the budget the sweeps draw from. Between two sweeps, the budget's grants that were not
    the sweeps' pages are what the others took; the sweeps' :attr:`share` of the rate is what they
    left, between :data:`MIN_SWEEP_SHARE` and :data:`MAX_SWEEP_SHARE` (the most before anything is
    measured: the first sweeps come before any single read). At the budget's ceiling (the
    connection's limit, not the account's, holds it), sweeps take what one sweep per poll interval
    needs, within what the others left and never below the least share: as many sweeps as the waits
    need, no more. Where the account has no budget, they keep to the least share.
    """

    def __init__(self) -> None:
        self.share = MAX_SWEEP_SHARE
        #: What the others left at the last measure.
        self.measured = MAX_SWEEP_SHARE
        self._mark: tuple[float, int] | None = None  # (when, the budget's grants less the sweeps' pages)

    def update(
        self, now: float, granted: int | None, pages: int, rate: float, ceiling: float = math.inf
    ) -> float:
        """Record, at a sweep's start, the budget's grants and the sweeps' pages so far; return the share.

        :param now: monotonic seconds.
        :param granted: the requests the budget granted so far (``None``: the account has no budget).
        :param pages: the pages the sweeps read so far.
        :param rate: the budget's rate, requests per second.
        :param ceiling: the budget's ceiling, requests per second.
        """
        if granted is None or not rate > 0:
            self._mark = None
            self.share = MIN_SWEEP_SHARE
            return self.share
        others = granted - pages
        if self._mark is not None and now > self._mark[0]:
            others_rate = (others - self._mark[1]) / (now - self._mark[0])
            self.measured = min(MAX_SWEEP_SHARE, max(MIN_SWEEP_SHARE, 1.0 - others_rate / rate))
        self._mark = (now, others)
        self.share = self.at(rate, ceiling)
        return self.share

    def at(self, rate: float, ceiling: float = math.inf, pages: int = 0, interval: float = math.inf) -> float:
        """Return the share for the budget's ``rate`` and ``ceiling`` as they are now.

        The last measure; at the ceiling, the share that reads ``pages`` once per ``interval``
        (seconds) within it, and at least the least share (a connection whose ceiling is set low
        still sweeps once per interval where its budget allows). Taken again when the gap to the
        next sweep is reckoned: a rate cut during a sweep (a ``429``, or the slow start brought back
        to its share of the account) must not be paired with a share picked at the ceiling before it.
        """
        if rate < ceiling:
            return self.measured
        wanted = pages / (interval * rate) if rate > 0 else 0.0
        return max(MIN_SWEEP_SHARE, min(wanted, self.measured))

    def measure(self, now: float, budget: AccountRateLimiter | None, pages: int) -> float:
        """Call :meth:`update` with the account's budget (``None``: the account has none)."""
        if budget is None:
            return self.update(now, None, pages, 0.0)
        return self.update(now, budget.granted, pages, budget.rate, budget.ceiling)


class SweepReading:
    """Read the slices of one sweep and hand each wanted list item to ``on_item`` as it is found.

    :param hook: the watcher's hook, for ``GET /v1/predictions``.
    :param wanted: the prediction ids the sweep looks for.
    :param unknown_ids: those of them whose ``created_at`` is unknown (looked for in the slice that
        :attr:`~.slices.Slice.finds_unknown`).
    :param on_item: called with ``(prediction_id, item)`` for each wanted item, at once.
    :param on_list_failed: called when a page fails for good (not for a ``429``).
    :param own: every prediction the watcher holds a wait on, wanted now or not (counted in
        :attr:`running_own`).
    :param count_until: count in :attr:`running` only predictions created no later than this
        (microseconds; ``None``: count none). Newer ones may be the watcher's own whose waits have
        not joined yet.
    :param on_page: called with the reading after each page (its counts so far).

    After :meth:`read`, :attr:`missing` holds the wanted ids not found, :attr:`pages` the pages
    read, and :attr:`seen` the ``created_at`` (microseconds, unsorted) of every item read;
    :attr:`running` counts the unfinished predictions read (of the pages read, which stop once
    their waits are found) created by ``count_until``, :attr:`running_own` those of them in ``own``.
    """

    def __init__(
        self,
        hook: FluxKontextHook,
        wanted: set[str],
        unknown_ids: set[str],
        on_item: Callable[[str, dict[str, Any]], None],
        on_list_failed: Callable[[], None],
        own: Container[str] = frozenset(),
        count_until: int | None = None,
        on_page: Callable[[SweepReading], None] | None = None,
    ) -> None:
        self.hook = hook
        self.wanted = wanted
        self.unknown_ids = unknown_ids
        self.missing = set(wanted)
        self.seen: list[int] = []
        self.pages = 0
        self.running = 0
        self.running_own = 0
        self._own = own
        self._count_until = count_until
        self._on_item = on_item
        self._on_list_failed = on_list_failed
        self._on_page = on_page

    async def read(self, slices: list[Slice]) -> list[bool]:
        """Read every slice, at most :data:`MAX_CONCURRENT_SLICES` at once.

        :returns: per slice, whether it was read to its end or found all its waits (``False``: it
            was throttled or the list failed).
        """
        limit = asyncio.Semaphore(MAX_CONCURRENT_SLICES)
        return list(await asyncio.gather(*(self._read_slice(piece, limit) for piece in slices)))

    async def _read_slice(self, piece: Slice, limit: asyncio.Semaphore) -> bool:
        after = None if piece.after is None else micros_to_iso(piece.after)
        before = None if piece.before is None else micros_to_iso(piece.before)
        cursor: str | None = None
        pages = 0
        async with limit:
            while True:
                try:
                    page = await self.hook.alist_predictions(
                        created_after=after, created_before=before, cursor=cursor, retry_limits=PAGE_LIMITS
                    )
                except FluxKontextRateLimitError:
                    return False  # paused until the reset: the due waits wait for the next sweep
                except FluxKontextError:
                    self._on_list_failed()
                    return False
                pages += 1
                self.pages += 1
                for item in page.results:
                    self._take(piece, item)
                if self._on_page is not None:
                    self._on_page(self)
                cursor = page.next_cursor
                if cursor is None:
                    return True
                if not piece.expected and not (piece.finds_unknown and self.unknown_ids & self.missing):
                    return True  # every wait of the slice is answered
                if piece.max_pages is not None and pages >= piece.max_pages:
                    return True

    def _take(self, piece: Slice, item: dict[str, Any]) -> None:
        created = parse_time(item.get("created_at"))
        micros = None if created is None else to_micros(created)
        if micros is not None:
            self.seen.append(micros)
        raw_id, status = item.get("id"), item.get("status")
        prediction_id = raw_id if isinstance(raw_id, str) else None
        if (
            self._count_until is not None
            and micros is not None
            and micros <= self._count_until
            and isinstance(status, str)
            and status not in TERMINAL_STATUSES
        ):
            self.running += 1
            self.running_own += int(prediction_id is not None and prediction_id in self._own)
        if prediction_id is None or prediction_id not in self.wanted:
            return
        self.missing.discard(prediction_id)
        piece.expected.discard(prediction_id)
        self._on_item(prediction_id, item)
