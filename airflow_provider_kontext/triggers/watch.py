"""Wait on a prediction through the account's shared watcher: the wait asks, the watcher answers.

A :class:`SharedSource` is one trigger's
:class:`~airflow_provider_kontext.triggers.source.PredictionSource` where its account has a
:class:`~airflow_provider_kontext.triggers.watcher.PredictionWatcher`. When the trigger wants to
look, the wait becomes *due*: it asks the watcher whether a sweep of the list can answer for it
(:meth:`SweepService.can_answer`, the one place that decides) and, if so, joins the watcher's queue
(:meth:`SweepService.enqueue`) and waits for the watcher to :meth:`~SharedSource.deliver` its
prediction. Otherwise, or when the watcher delivers :data:`NEEDS_OWN_READ`, it reads its prediction
on its own (a :class:`~airflow_provider_kontext.triggers.source.SoloSource`).

The wait holds its own part of the decision: whether a sweep can find it (not missed twice, its
``created_at`` known), when it needs a full read (its logs, every :data:`LOGS_EVERY_SECONDS` while
processing), and its fallback to a read of its own when no sweep came. :class:`SweepService` names
all it asks of the watcher, so this module does not import the watcher's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from pydantic import ValidationError

from airflow_provider_kontext.edits.progress import PROGRESS_LOG_SECONDS
from airflow_provider_kontext.models import TERMINAL_STATUSES, PredictionPage
from airflow_provider_kontext.triggers.slices import parse_time
from airflow_provider_kontext.triggers.source import SoloSource

if TYPE_CHECKING:
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook
    from airflow_provider_kontext.hooks.retry import RetryLimits
    from airflow_provider_kontext.models import Prediction

__all__ = [
    "LOGS_EVERY_SECONDS",
    "NEEDS_OWN_READ",
    "NeedsOwnRead",
    "SharedSource",
    "SweepService",
    "answer_from_item",
]

#: While a prediction processes, a full read (with ``logs``) at most this often.
LOGS_EVERY_SECONDS = PROGRESS_LOG_SECONDS


class NeedsOwnRead:
    """An answer that tells a wait to read its prediction on its own (the list cannot answer)."""


#: The one :class:`NeedsOwnRead`: the wait reads its prediction on its own.
NEEDS_OWN_READ = NeedsOwnRead()

#: What the watcher delivers to a pending look: the prediction, or :data:`NEEDS_OWN_READ`.
Answer: TypeAlias = "Prediction | NeedsOwnRead"


class SweepService(Protocol):
    """What a shared wait asks of its account's watcher."""

    #: A due wait not answered this long reads alone, unless the watcher still sweeps.
    fallback_seconds: float

    def can_answer(self, wait: SharedSource) -> bool:
        """Return whether a sweep can answer for ``wait`` now."""
        ...

    def still_sweeping(self) -> bool:
        """Return whether the sweeps go on (the loop runs and the list is usable)."""
        ...

    def enqueue(self, wait: SharedSource) -> None:
        """Queue the due ``wait`` for the next sweep and wake the sweeps."""
        ...

    def dequeue(self, wait: SharedSource) -> None:
        """Take ``wait`` off the queue (answered, or its look ended)."""
        ...

    async def leave(self, wait: SharedSource) -> None:
        """Forget ``wait`` for good (the last one out stops the watcher)."""
        ...


class SharedSource:
    """Answer one trigger's looks from the watcher's sweeps, or from a read of its own.

    :param watcher: the account's watcher in this event loop.
    :param prediction_id: the prediction waited for.
    :param created_at: its ``created_at`` if known (it bounds the sweeps' window); learnt otherwise.
    :param hook: the trigger's hook, for the reads of its own.
    """

    def __init__(
        self,
        watcher: SweepService,
        prediction_id: str,
        created_at: datetime | None,
        hook: FluxKontextHook,
    ) -> None:
        self.watcher = watcher
        self.prediction_id = prediction_id
        self.created_at = created_at
        self.solo = SoloSource(hook, prediction_id)
        #: Whether the trigger wants to look now (set at the look's time, cleared at its next).
        self.due = False
        #: Sweeps that did not find it although they read where it should be.
        self.misses = 0
        self.last_status: str | None = None
        self._processing_since: float | None = None  # time.monotonic()
        self._full_read_at: float | None = None
        self._answer: asyncio.Future[Answer] | None = None
        # One timer per look at a time (a look's due time, then its fallback checks), each cut
        # to the look's deadline: thousands of waits keep the loop's timer heap small.
        self._timer: asyncio.TimerHandle | None = None
        self._deadline_at: float | None = None  # the look's deadline on the loop's clock

    def __repr__(self) -> str:
        return f"SharedSource({self.prediction_id!r}, due={self.due}, misses={self.misses})"

    @property
    def waiting(self) -> bool:
        """Return whether a look is pending (an answer would be taken)."""
        return self._answer is not None and not self._answer.done()

    @property
    def sweepable(self) -> bool:
        """Return whether a sweep can find it: missed at most once, and then with ``created_at`` known.

        A wait missed while its ``created_at`` was unknown reads once on its own and learns it there.
        """
        return self.misses < 2 and not (self.misses and self.created_at is None)

    def needs_full_read(self, now: float) -> bool:
        """Return whether its next look must be a full read: processing, logs last read too long ago."""
        if self._processing_since is None:
            return False
        since = self._full_read_at if self._full_read_at is not None else self._processing_since
        return now - since >= LOGS_EVERY_SECONDS

    def note_seen(self, prediction: Prediction, *, full: bool) -> None:
        """Record what a look showed (``full``: a read of its own, with logs and ``created_at``)."""
        status = prediction.status.value
        now = time.monotonic()
        if status == "processing" and self._processing_since is None:
            self._processing_since = now
        if full:
            self._full_read_at = now
            if self.created_at is None and prediction.created_at is not None:
                self.created_at = parse_time(prediction.created_at)
        self.last_status = status

    def note_missed(self) -> None:
        """Record that a sweep read where it should be and did not find it; it reads on its own now."""
        self.misses += 1
        self.deliver(NEEDS_OWN_READ)

    def deliver(self, answer: Answer) -> None:
        """Answer the pending look (a no-op where none is pending).

        :param answer: the prediction from a sweep, or :data:`NEEDS_OWN_READ`.
        """
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(answer)

    async def next(self, delay: float, retry_limits: RetryLimits) -> Prediction:
        """Return the prediction ``delay`` seconds from now, sooner if a sweep sees it end.

        :param retry_limits: the look's retry limits, for a read of its own (retries, deadline).
        :raises FluxKontextError: a read of its own failed for good (as
            :meth:`~airflow_provider_kontext.hooks.kontext.FluxKontextHook.aget_prediction`).
        """
        if not self.watcher.can_answer(self):
            await self.solo.wait(delay)
            if not self.watcher.can_answer(self):  # unless others joined in the meantime
                return await self._read_own(retry_limits)
            delay = 0.0
        answer = await self._await_answer(delay, retry_limits)
        if isinstance(answer, NeedsOwnRead):
            return await self._read_own(retry_limits)
        return answer

    async def _read_own(self, retry_limits: RetryLimits) -> Prediction:
        prediction = await self.solo.read(retry_limits)
        self.note_seen(prediction, full=True)
        return prediction

    async def _await_answer(self, delay: float, retry_limits: RetryLimits) -> Answer:
        """Become due in ``delay`` seconds and return what the watcher delivers then (or before)."""
        loop = asyncio.get_running_loop()
        self._answer = loop.create_future()
        self.due = False
        # Waiting on sweeps never outlasts the deadline: a read of its own then ends it.
        deadline = retry_limits.deadline
        self._deadline_at = None if deadline is None else loop.time() + max(0.0, deadline - time.time())
        if delay > 0:
            self._arm(delay, self._become_due)
        else:
            self._become_due()
        try:
            return await self._answer
        finally:
            self._disarm()
            self.watcher.dequeue(self)
            self._answer = None

    def _become_due(self) -> None:
        """Ask the watcher for an answer now; read alone at once where no sweep can give it."""
        if not self.waiting:
            return
        if self._past_deadline():
            self.deliver(NEEDS_OWN_READ)
            return
        self.due = True
        if not self.watcher.can_answer(self):
            self.deliver(NEEDS_OWN_READ)
            return
        self.watcher.enqueue(self)
        self._arm(self.watcher.fallback_seconds, self._check_unanswered)

    def _check_unanswered(self) -> None:
        """Read alone if the watcher stopped sweeping or the deadline came; else keep waiting for it.

        While the watcher sweeps, the account's request budget is what holds the sweep back, and a
        read of its own would only queue behind it.
        """
        if self.watcher.still_sweeping() and not self._past_deadline():
            self._arm(self.watcher.fallback_seconds, self._check_unanswered)
        else:
            self.deliver(NEEDS_OWN_READ)

    def _past_deadline(self) -> bool:
        return self._deadline_at is not None and asyncio.get_running_loop().time() >= self._deadline_at

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        """Call ``callback`` in ``delay`` seconds (at the look's deadline if that comes first)."""
        self._disarm()
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        if self._deadline_at is not None and self._deadline_at < when:
            when = self._deadline_at
        self._timer = loop.call_at(when, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def close(self) -> None:
        """Leave the watcher (the last one out stops it)."""
        self._disarm()
        await self.watcher.leave(self)


def answer_from_item(item: dict[str, Any], waits: list[SharedSource]) -> list[SharedSource]:
    """Deliver a list item to the waits on its prediction that want it (due, ended or changed).

    A prediction that ended other than ``succeeded``, or an item that does not parse, is
    :data:`NEEDS_OWN_READ` (its error and log tail come from a full read).

    :returns: the waits it delivered the prediction to.
    """
    status = item.get("status")
    prediction: Prediction | None = None
    answered: list[SharedSource] = []
    for wait in waits:
        if wait.created_at is None:
            wait.created_at = parse_time(item.get("created_at"))
        if not wait.waiting or not (wait.due or status in TERMINAL_STATUSES or status != wait.last_status):
            continue
        if status in TERMINAL_STATUSES and status != "succeeded":
            wait.deliver(NEEDS_OWN_READ)
            continue
        if prediction is None:
            try:
                prediction = PredictionPage.prediction(item)
            except ValidationError:
                wait.deliver(NEEDS_OWN_READ)
                continue
        wait.note_seen(prediction, full=False)
        wait.deliver(prediction)
        answered.append(wait)
    return answered
