"""Read one sweep's slices of the prediction list, side by side, and report each wanted item found.

The reading knows nothing of waits: it is given the slices (:mod:`.slices`), the ids it looks for
and two callbacks, and pages each slice only until the ids expected in it are found. A throttled
slice (``429``: the account is paused until the reset it names) or a failing list ends that slice
unread to its end; the watcher decides what its waits do next.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from airflow_provider_kontext.exceptions import FluxKontextError, FluxKontextRateLimitError
from airflow_provider_kontext.hooks.retry import RetryLimits
from airflow_provider_kontext.triggers.slices import Slice, micros_to_iso, parse_time, to_micros

if TYPE_CHECKING:
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook

__all__ = ["MAX_CONCURRENT_SLICES", "SweepReading"]

#: Slices of one sweep read at once, at most.
MAX_CONCURRENT_SLICES = 8
#: The list's retries of one page; then the waits read alone.
PAGE_LIMITS = RetryLimits(retries=2, tolerate=True, priority=0.0)


class SweepReading:
    """Read the slices of one sweep and hand each wanted list item to ``on_item`` as it is found.

    :param hook: the watcher's hook, for ``GET /v1/predictions``.
    :param wanted: the prediction ids the sweep looks for.
    :param unknown_ids: those of them whose ``created_at`` is unknown (looked for in the slice that
        :attr:`~.slices.Slice.finds_unknown`).
    :param on_item: called with ``(prediction_id, item)`` for each wanted item, at once.
    :param on_list_failed: called when a page fails for good (not for a ``429``).

    After :meth:`read`, :attr:`missing` holds the wanted ids not found, :attr:`pages` the pages
    read, and :attr:`seen` the ``created_at`` (microseconds, unsorted) of every item read.
    """

    def __init__(
        self,
        hook: FluxKontextHook,
        wanted: set[str],
        unknown_ids: set[str],
        on_item: Callable[[str, dict[str, Any]], None],
        on_list_failed: Callable[[], None],
    ) -> None:
        self.hook = hook
        self.wanted = wanted
        self.unknown_ids = unknown_ids
        self.missing = set(wanted)
        self.seen: list[int] = []
        self.pages = 0
        self._on_item = on_item
        self._on_list_failed = on_list_failed

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
                cursor = page.next_cursor
                if cursor is None:
                    return True
                if not piece.expected and not (piece.finds_unknown and self.unknown_ids & self.missing):
                    return True  # every wait of the slice is answered
                if piece.max_pages is not None and pages >= piece.max_pages:
                    return True

    def _take(self, piece: Slice, item: dict[str, Any]) -> None:
        created = parse_time(item.get("created_at"))
        if created is not None:
            self.seen.append(to_micros(created))
        prediction_id = item.get("id")
        if not isinstance(prediction_id, str) or prediction_id not in self.wanted:
            return
        self.missing.discard(prediction_id)
        piece.expected.discard(prediction_id)
        self._on_item(prediction_id, item)
