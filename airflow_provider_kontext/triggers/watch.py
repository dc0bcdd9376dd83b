"""One trigger's wait on its account's shared
:class:`~airflow_provider_kontext.triggers.watcher.PredictionWatcher`: it looks when its poller wants
to, and is answered by the watcher's next sweep of the list or reads its prediction alone.

See :mod:`airflow_provider_kontext.triggers.watcher` for when the list is used and how sweeps are
paced; a :class:`Watch` holds one wait's part: whether a sweep can answer for it (not missed twice,
its ``created_at`` known), when it needs a full read of its own (its logs, every
:data:`LOGS_EVERY_SECONDS` while processing), and the fallback to a read alone when no sweep came.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from airflow_provider_kontext.edits.progress import PROGRESS_LOG_SECONDS

if TYPE_CHECKING:
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook
    from airflow_provider_kontext.hooks.retry import RetryLimits
    from airflow_provider_kontext.models import Prediction
    from airflow_provider_kontext.triggers.watcher import PredictionWatcher

__all__ = ["LOGS_EVERY_SECONDS", "READ_ALONE", "ReadAlone", "Watch", "parse_time"]

#: While a prediction processes, a full read (with ``logs``) at most this often.
LOGS_EVERY_SECONDS = PROGRESS_LOG_SECONDS


class ReadAlone:
    """What a watch is handed when the list cannot answer for it."""


READ_ALONE = ReadAlone()


def parse_time(value: Any) -> datetime | None:
    """A server's ISO 8601 time as an aware datetime (UTC where it names no zone), else ``None``."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


class Watch:
    """One trigger's wait on the shared watcher: :meth:`poll` returns the prediction at about the
    time the trigger wants to look, from a sweep or from its own read."""

    def __init__(
        self,
        watcher: PredictionWatcher,
        prediction_id: str,
        created_at: datetime | None,
        hook: FluxKontextHook,
    ) -> None:
        self.watcher = watcher
        self.prediction_id = prediction_id
        self.created_at = created_at
        self.hook = hook
        self.due = False
        self.misses = 0
        self.last_status: str | None = None
        self._processing_since: float | None = None  # time.monotonic()
        self._full_read_at: float | None = None
        self._future: asyncio.Future[Prediction | ReadAlone | BaseException] | None = None
        self._timers: list[asyncio.TimerHandle] = []

    @property
    def waiting(self) -> bool:
        return self._future is not None and not self._future.done()

    @property
    def sweepable(self) -> bool:
        """Whether a sweep can answer for it: not missed twice, and not missed while its
        ``created_at`` was unknown (then it reads once and learns it)."""
        return self.misses < 2 and not (self.misses and self.created_at is None)

    def _needs_full_read(self, now: float) -> bool:
        if self._processing_since is None:
            return False
        since = self._full_read_at if self._full_read_at is not None else self._processing_since
        return now - since >= LOGS_EVERY_SECONDS

    @property
    def shared(self) -> bool:
        """Whether its next look should come from the watcher (sweeps are on and can answer for it);
        else the trigger reads its prediction itself, as without a watcher."""
        watcher = self.watcher
        return (
            watcher.sweeping
            and self.sweepable
            and watcher.list_usable()
            and not self._needs_full_read(time.monotonic())
        )

    def saw(self, prediction: Prediction, *, full: bool) -> None:
        """Note what a look at the prediction showed (``full``: a read of its own, with logs)."""
        status = prediction.status.value
        now = time.monotonic()
        if status == "processing" and self._processing_since is None:
            self._processing_since = now
        if full:
            self._full_read_at = now
            if self.created_at is None and prediction.created_at is not None:
                self.created_at = parse_time(prediction.created_at)
        self.last_status = status

    def hand(self, result: Prediction | ReadAlone | BaseException) -> None:
        """Answer the pending :meth:`poll` (no-op where none is pending)."""
        if self._future is not None and not self._future.done():
            self._future.set_result(result)

    def _became_due(self) -> None:
        if not self.waiting:
            return
        self.due = True
        watcher = self.watcher
        if (
            not watcher.sweeping
            or not self.sweepable
            or self._needs_full_read(time.monotonic())
            or not watcher.list_usable()
        ):
            self.hand(READ_ALONE)
            return
        watcher.due.add(self)
        watcher.kick()
        self._later(self.watcher.fallback_seconds, self._fallback)

    def _fallback(self) -> None:
        """Still unanswered long after it became due: read alone if the watcher stopped sweeping;
        while it sweeps, the account's budget is what holds the sweep back, and reads of its own
        would only queue behind it."""
        if self.watcher.running and self.watcher.list_usable():
            self._later(self.watcher.fallback_seconds, self._fallback)
        else:
            self.hand(READ_ALONE)

    def _later(self, delay: float, callback: Any, *args: Any) -> None:
        """Call ``callback(*args)`` in ``delay`` seconds, unless the poll ends first."""
        self._timers.append(asyncio.get_running_loop().call_later(delay, callback, *args))

    async def poll(self, delay: float, retry_limits: RetryLimits) -> Prediction:
        """The prediction, looked at ``delay`` seconds from now (earlier if a sweep sees it end).

        :param retry_limits: the poll's retry limits, for a read alone (retries, deadline, priority).
        :raises FluxKontextError: a read alone failed for good (as
            :meth:`~airflow_provider_kontext.hooks.kontext.FluxKontextHook.aget_prediction`).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Prediction | ReadAlone | BaseException] = loop.create_future()
        self._future = future
        self.due = False
        if retry_limits.deadline is not None:
            # Waiting on sweeps never outlasts the deadline: a read alone then ends it as before.
            at_deadline = max(0.0, retry_limits.deadline - time.time())
            self._later(at_deadline, self.hand, READ_ALONE)
        if delay > 0:
            self._later(delay, self._became_due)
        else:
            self._became_due()
        try:
            result = await future
        finally:
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()
            self.watcher.due.discard(self)
            self._future = None
        if isinstance(result, BaseException):
            raise result
        if isinstance(result, ReadAlone):
            prediction = await self.hook.aget_prediction(self.prediction_id, retry_limits=retry_limits)
            self.saw(prediction, full=True)
            return prediction
        return result

    async def close(self) -> None:
        """Leave the watcher (the last one out stops it)."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        await self.watcher.leave(self)
