"""Pages of ``GET /v1/predictions``: date filters, newest first, opaque cursors in ``next``/``previous``.

Replicate's list is 100 predictions a page, newest first; ``created_after`` (inclusive) and
``created_before`` (exclusive) take ISO 8601 date-times compared to the microsecond. A cursor names
the item a page starts after (or, for ``previous``, ends before), so pages stay stable while new
predictions arrive. A bad date-time or cursor answers 400.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

from airflow_provider_kontext.testing.lifecycle import PredictionRecord
from airflow_provider_kontext.testing.problems import ProblemError

#: Predictions on one page.
PAGE_SIZE = 100
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def page_of(
    records: Iterable[PredictionRecord],
    base_url: str,
    *,
    cursor: str | None = None,
    created_after: str | None = None,
    created_before: str | None = None,
) -> tuple[list[PredictionRecord], dict[str, Any]]:
    """Return one page of ``records`` and its ``next``/``previous`` links (``None`` at either end).

    :raises ProblemError: 400 for a bad date-time or cursor.
    """
    after = _parse_time("created_after", created_after)
    before = _parse_time("created_before", created_before)
    chosen = [
        r
        for r in records
        if (after is None or _micros(r.created_wall) >= after)
        and (before is None or _micros(r.created_wall) < before)
    ]
    chosen.sort(key=lambda r: (r.created_wall, r.id), reverse=True)
    keys = [(r.created_wall, r.id) for r in chosen]
    if cursor is None:
        start = 0
    else:
        position, record_id, reverse = _decode_cursor(cursor)
        if reverse:  # the page that ends just before (newer than) the given item
            end = sum(1 for key in keys if key > (position, record_id))
            start = max(0, end - PAGE_SIZE)
        else:  # the page that starts just after (older than) the given item
            start = sum(1 for key in keys if key >= (position, record_id))
    page = chosen[start : start + PAGE_SIZE]
    bounds = (("created_after", created_after), ("created_before", created_before))
    params = {name: value for name, value in bounds if value}

    def link(target: PredictionRecord, *, reverse: bool) -> str:
        query = {**params, "cursor": _encode_cursor(target.created_wall, target.id, reverse=reverse)}
        return f"{base_url}/v1/predictions?{urlencode(query)}"

    has_next = start + PAGE_SIZE < len(chosen)
    links = {
        "next": link(page[-1], reverse=False) if has_next and page else None,
        "previous": link(page[0], reverse=True) if start > 0 and page else None,
    }
    return page, links


def _micros(wall: float) -> int:
    """Return Unix time in whole microseconds (the precision of the timestamps the API shows)."""
    return round(wall * 1_000_000)


def _parse_time(name: str, value: str | None) -> int | None:
    """Return the Unix microseconds of an ISO 8601 query parameter, ``None`` when it is empty.

    :raises ProblemError: 400 for a value that is not a date-time.
    """
    if value is None or not value.strip():
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise ProblemError(400, "Bad Request", f"{name}: {value!r} is not an ISO 8601 date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _encode_cursor(created_wall: float, record_id: str, *, reverse: bool) -> str:
    """Return the opaque cursor of a page boundary."""
    text = f"p={created_wall!r}&i={record_id}" + ("&r=1" if reverse else "")
    return base64.urlsafe_b64encode(text.encode()).decode("ascii")


def _decode_cursor(cursor: str) -> tuple[float, str, bool]:
    """Return ``(created, id, reverse)`` of an opaque list cursor.

    :raises ProblemError: 400 for a cursor this emulator did not make.
    """
    try:
        fields = dict(
            part.split("=", 1) for part in base64.urlsafe_b64decode(cursor.encode()).decode().split("&")
        )
        return float(fields["p"]), fields["i"], fields.get("r") == "1"
    except (ValueError, KeyError, binascii.Error, UnicodeDecodeError):
        raise ProblemError(400, "Bad Request", "Invalid cursor") from None
