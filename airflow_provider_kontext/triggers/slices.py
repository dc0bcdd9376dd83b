"""How a sweep of the prediction list is cut into slices: concurrent ``created_after`` /
``created_before`` ranges of about one page each, only where the watcher has waits.

Replicate's list reads 100 predictions a page, newest first, and a cursor only leads to the next
older page: the window of a watcher's waits read as one range costs one request after another, and
its oldest predictions (which end first) come last. Cut at every 100th prediction the previous sweep
saw (or, before any sweep, at every 100th wait), each range is about one page, all are read at once,
and a range that holds none of the watcher's waits (the other triggerers' or other clients'
predictions, or waits that have all ended) is not read at all. A range that turns out to hold more
than a page is paged within its bounds, and stops as soon as every wait in it is found.

Times are integer microseconds since the Unix epoch (exact: the bounds of adjacent ranges are the
same number, so the ranges partition the window whatever the server's timestamps).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

__all__ = ["PAGE_SIZE", "Slice", "iso", "micros", "plan"]

#: Items per page of Replicate's list.
PAGE_SIZE = 100

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def micros(moment: datetime) -> int:
    """``moment`` (aware) in microseconds since the Unix epoch."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def iso(value: int) -> str:
    """Microseconds since the epoch as the list's ISO 8601 bound (UTC, ``Z``)."""
    return (_EPOCH + timedelta(microseconds=value)).isoformat().replace("+00:00", "Z")


@dataclass
class Slice:
    """One range of the list: created at or after ``after`` and before ``before`` (``None``: open),
    the waits expected in it, whether it also looks for waits whose ``created_at`` is unknown, and
    the most pages it reads (``None``: until its end)."""

    after: int | None
    before: int | None
    targets: set[str] = field(default_factory=set)
    unknown: bool = False
    cap: int | None = None

    def contains(self, value: int) -> bool:
        return (self.after is None or value >= self.after) and (self.before is None or value < self.before)


def plan(known: dict[str, int], unknown: int, sample: list[int], margin: int) -> list[Slice]:
    """The slices of one sweep, oldest first.

    :param known: the waits' ``created_at`` (microseconds) by prediction id.
    :param unknown: how many waits have no ``created_at`` yet: they are looked for in the newest
        pages (an open-ended top slice, at most the pages they could fill and one more where no wait
        has a known ``created_at``).
    :param sample: the ``created_at`` of the predictions the previous sweep read, sorted (empty:
        none yet; the waits' own times stand in).
    :param margin: microseconds added around the waits' oldest and newest ``created_at``.
    """
    if not known:
        return [Slice(None, None, unknown=True, cap=math.ceil(unknown / PAGE_SIZE) + 1)]
    times = sorted(known.values())
    low, high = times[0] - margin, times[-1] + margin + 1
    points = sample or times
    inside = points[bisect.bisect_left(points, low) : bisect.bisect_left(points, high)]
    cuts = sorted(set(inside[PAGE_SIZE::PAGE_SIZE]))
    edges: list[int | None] = [low, *cuts, None if unknown else high]
    slices = [Slice(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    for prediction_id, created in known.items():
        slices[bisect.bisect_right(cuts, created)].targets.add(prediction_id)
    if unknown:
        slices[-1].unknown = True
    return [one for one in slices if one.targets or one.unknown]
