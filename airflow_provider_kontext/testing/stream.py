"""Server-sent events of a prediction (``urls.stream``), as Replicate sends them.

``logs`` events carry new log lines, an ``output`` event the output URL, an ``error`` event the
failure, and a final ``done`` event has data ``{}`` or ``{"reason": "canceled"}`` (or the like).
Every event has an ``id``: the official clients hand no event on without one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable

from airflow_provider_kontext.testing.lifecycle import Clock, PredictionRecord

#: How often (seconds) a wait or a stream looks at its prediction again.
POLL_STEP = 0.02


async def stream_events(
    record: PredictionRecord,
    clock: Clock,
    ensure_edit: Callable[[PredictionRecord], Awaitable[None]],
    closing: Callable[[], bool],
) -> AsyncIterator[str]:
    """Yield the prediction's events until it ends or the server stops.

    :param record: the prediction.
    :param clock: the emulator's clock.
    :param ensure_edit: starts (or awaits, when due) the prediction's edit before each look.
    :param closing: true once the server stops; the stream then ends without ``done``.
    """
    sent_logs = 0
    ids = itertools.count(1)
    while not closing():
        await ensure_edit(record)
        elapsed = record.elapsed(clock.monotonic())
        body = record.to_json(elapsed)
        logs = body.get("logs") or ""
        if len(logs) > sent_logs:
            for line in logs[sent_logs:].splitlines():
                yield _event("logs", line, next(ids))
            sent_logs = len(logs)
        if record.is_terminal(elapsed):
            status = body["status"]
            if status == "succeeded" and body.get("output") is not None:
                yield _event("output", str(body["output"]), next(ids))
            if status == "failed":
                yield _event("error", str(body.get("error") or "failed"), next(ids))
            reason = {} if status == "succeeded" else {"reason": status}
            yield _event("done", json.dumps(reason), next(ids))
            return
        await asyncio.sleep(POLL_STEP)


def _event(name: str, data: str, event_id: int) -> str:
    """Return one server-sent event with its ``id`` (multi-line data as several ``data:`` lines)."""
    lines = "".join(f"data: {line}\n" for line in (data.splitlines() or [""]))
    return f"event: {name}\nid: {event_id}\n{lines}\n"
