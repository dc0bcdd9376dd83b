"""Cut one sweep of the prediction list into slices of about a page, read side by side.

Replicate's list reads 100 predictions a page, newest first, and a cursor only leads to the next
older page: the window of a watcher's waits read as one range costs one request after another, and
its oldest predictions (which end first) come last. Cut at every 100th prediction the previous sweep
saw (or, before any sweep, at every 100th wait), each ``created_after`` / ``created_before`` range is
about one page, all are read at once, and a range that holds none of the watcher's waits (the other
triggerers' or other clients' predictions, or waits that have all ended) is not read at all. A range
that turns out to hold more than a page is paged within its bounds, and stops as soon as every wait
in it is found.

Times are integer microseconds since the Unix epoch (exact: the bounds of adjacent ranges are the
same number, so the ranges partition the window whatever the server's timestamps).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

__all__ = ["PAGE_SIZE", "Slice", "micros_to_iso", "parse_time", "plan_slices", "to_micros"]

#: Items per page of Replicate's list.
PAGE_SIZE = 100

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def parse_time(value: Any) -> datetime | None:
    """Return a server's ISO 8601 time as an aware datetime (UTC where it names no zone).

    :returns: ``None`` where ``value`` is not a time (missing, empty or unparsable): the caller then
        treats the time as unknown.
    """
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def to_micros(moment: datetime) -> int:
    """Return ``moment`` (aware) in microseconds since the Unix epoch."""
    delta = moment - _EPOCH  # in whole parts: exact, and several times faster than dividing timedeltas
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def micros_to_iso(value: int) -> str:
    """Return microseconds since the epoch as the list's ISO 8601 bound (UTC, ``Z``)."""
    return (_EPOCH + timedelta(microseconds=value)).isoformat().replace("+00:00", "Z")


@dataclass
class Slice:
    """One range of the list, read page by page within its bounds.

    :param after: the range holds predictions created at or after this (microseconds; ``None``: open).
    :param before: ...and before this (``None``: open, where the newest predictions are).
    :param expected: the ids of the waits expected in it; a reader removes each as it finds it.
    :param finds_unknown: whether it also looks for the waits whose ``created_at`` is unknown.
    :param max_pages: the most pages it reads (``None``: until its end or its waits are found).
    """

    after: int | None
    before: int | None
    expected: set[str] = field(default_factory=set)
    finds_unknown: bool = False
    max_pages: int | None = None


def plan_slices(known: dict[str, int], unknown: int, last_seen: list[int], margin: int) -> list[Slice]:
    """Return the slices of one sweep, oldest first, leaving out those that hold no wait.

    :param known: the waits' ``created_at`` (microseconds) by prediction id.
    :param unknown: how many waits have no ``created_at`` yet: they are looked for in the newest
        pages (an open-ended top slice, at most the pages they could fill and one more where no wait
        has a known ``created_at``).
    :param last_seen: the ``created_at`` of the predictions the previous sweep read, sorted (empty:
        none yet; the waits' own times stand in).
    :param margin: microseconds added around the waits' oldest and newest ``created_at``.
    """
    if not known:
        return [Slice(None, None, finds_unknown=True, max_pages=math.ceil(unknown / PAGE_SIZE) + 1)]
    times = sorted(known.values())
    low, high = times[0] - margin, times[-1] + margin + 1
    points = last_seen or times
    inside = points[bisect.bisect_left(points, low) : bisect.bisect_left(points, high)]
    cuts = sorted(set(inside[PAGE_SIZE::PAGE_SIZE]))
    edges: list[int | None] = [low, *cuts, None if unknown else high]
    slices = [Slice(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    for prediction_id, created in known.items():
        slices[bisect.bisect_right(cuts, created)].expected.add(prediction_id)
    if unknown:
        slices[-1].finds_unknown = True
    return [piece for piece in slices if piece.expected or piece.finds_unknown]
