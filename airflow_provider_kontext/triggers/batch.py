"""``FluxKontextBatchTrigger``: waits in the triggerer for a whole batch of predictions at once.

It reads the account's list of predictions (``GET /v1/predictions``, up to 100 a request, newest
first, from the batch's window on), so a batch of thousands costs a few dozen requests a sweep, not
one per prediction. Its event holds counts only; the task re-reads the results when it resumes
(:func:`sweep`, the same reading), so the event stays small however large the batch. The same loop
(:class:`BatchWatch`) waits in the worker when the task is not deferrable.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_kontext.edits.batch_ledger import PROGRESS_SECONDS, TERMINAL
from airflow_provider_kontext.exceptions import (
    FluxKontextAuthError,
    FluxKontextError,
    FluxKontextNotFoundError,
)
from airflow_provider_kontext.hooks.connection import DEFAULT_CONN_ID

__all__ = ["BatchWatch", "FluxKontextBatchTrigger", "sweep"]

#: Sweeps in a row that fail before the wait ends with an ``error`` event.
MAX_CONSECUTIVE_ERRORS = 10
#: Predictions the list has not shown for two sweeps are read one by one, this many a sweep.
MAX_SINGLE_READS = 20
#: Cancels in flight at once when the deferred task is killed.
CANCEL_CONCURRENCY = 8


async def sweep(hook: Any, wanted: Collection[str], created_after: str | None) -> dict[str, dict[str, Any]]:
    """Return the account's list items of the ``wanted`` predictions, by prediction id.

    The items are raw JSON objects without logs or input. It pages from the newest back to
    ``created_after`` and stops as soon as all were seen.

    :raises FluxKontextError: a page could not be read (after the hook's retries).
    """
    found: dict[str, dict[str, Any]] = {}
    cursor: str | None = None
    while True:
        page = await hook.alist_predictions(created_after=created_after, cursor=cursor)
        for item in page.results:
            prediction_id = item.get("id") if isinstance(item, dict) else None
            if isinstance(prediction_id, str) and prediction_id in wanted:
                # Without its input, which may hold an inline image: thousands are kept at once.
                found[prediction_id] = {key: value for key, value in item.items() if key != "input"}
        cursor = page.next_cursor
        if cursor is None or len(found) == len(wanted):
            return found


class BatchWatch:
    """Waits until every prediction of a batch is terminal or the deadline passes.

    :param ids: the predictions still to wait for.
    :param created_after: where the batch's creates start in the account's list (ISO 8601).
    :param end_time: Unix time at which to stop waiting (``None``: no deadline).
    :param on_final: called with each prediction's list item once it is terminal (the worker keeps
        them; the trigger only counts).
    """

    def __init__(
        self,
        ids: Collection[str],
        created_after: str | None,
        end_time: float | None,
        *,
        poll_interval: float,
        log: Callable[..., None],
        on_final: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.pending = set(ids)
        self.total = len(self.pending)
        self.created_after = created_after
        self.end_time = end_time
        self.poll_interval = poll_interval
        self.counts: Counter[str] = Counter()
        self._log = log
        self._on_final = on_final
        self._unseen: Counter[str] = Counter()
        self._running = 0
        self._logged = 0.0

    async def run(self, hook: Any) -> tuple[str, str | None]:
        """Wait; return ``("done" | "timeout" | "error", message)``."""
        errors = 0
        while self.pending:
            if self.end_time is not None and time.time() >= self.end_time:
                return "timeout", f"{len(self.pending)} of {self.total} predictions did not finish in time"
            try:
                await self._sweep_once(hook)
                errors = 0
            except FluxKontextAuthError as exc:
                return "error", f"Cannot read the account's predictions: {exc}"
            except FluxKontextError as exc:
                errors += 1
                if errors >= MAX_CONSECUTIVE_ERRORS:
                    return "error", f"Reading the account's predictions failed {errors} times: {exc}"
                self._log("Reading the account's predictions failed (%d in a row): %s", errors, exc)
            if self.pending:
                self.report()
                delay = self.poll_interval
                if self.end_time is not None:
                    delay = min(delay, max(0.0, self.end_time - time.time()))
                await asyncio.sleep(delay)
        self.report(final=True)
        return "done", None

    async def _sweep_once(self, hook: Any) -> None:
        found = await sweep(hook, self.pending, self.created_after)
        running = 0
        for prediction_id, item in found.items():
            self._unseen.pop(prediction_id, None)
            if item.get("status") in TERMINAL:
                self._finish(prediction_id, item)
            elif item.get("status") == "processing":
                running += 1
        self._running = running
        for prediction_id in self.pending - set(found):
            self._unseen[prediction_id] += 1
        # The list may lag behind a create: what it has not shown twice is read on its own.
        lagging = [pid for pid, count in self._unseen.items() if count >= 2][:MAX_SINGLE_READS]
        for prediction_id in lagging:
            try:
                prediction = await hook.aget_prediction(prediction_id)
            except FluxKontextNotFoundError:  # gone (or never created): the task creates it again
                self._finish(
                    prediction_id, {"id": prediction_id, "status": "lost", "error": "no longer exists"}
                )
                continue
            self._unseen.pop(prediction_id, None)
            if prediction.is_terminal:
                self._finish(prediction_id, prediction.model_dump(mode="json", exclude={"logs"}))

    def _finish(self, prediction_id: str, item: dict[str, Any]) -> None:
        if prediction_id not in self.pending:
            return
        self.pending.discard(prediction_id)
        self._unseen.pop(prediction_id, None)
        self.counts[str(item.get("status"))] += 1
        if self._on_final is not None:
            self._on_final(prediction_id, item)

    def report(self, *, final: bool = False) -> None:
        """Log a progress line, at most every :data:`PROGRESS_SECONDS` (and once at the end)."""
        now = time.monotonic()
        if not final and now - self._logged < PROGRESS_SECONDS:
            return
        self._logged = now
        finished = ", ".join(f"{count} {status}" for status, count in sorted(self.counts.items()))
        self._log(
            "Batch: %d of %d predictions finished (%s), %d running, %d waiting to start",
            self.total - len(self.pending),
            self.total,
            finished or "none yet",
            self._running,
            max(0, len(self.pending) - self._running),
        )


class FluxKontextBatchTrigger(BaseTrigger):
    """Fire one event when every prediction of a batch is terminal or the deadline passes.

    It only reads, so a restarted or duplicated trigger is harmless. Its kwargs hold the ids of the
    predictions still running when the task deferred, as one comma-separated string (about 27 bytes
    each: 10,000 fit in under 300 KB), the window and the deadline; never a secret. The event is
    ``{"status": "done" | "timeout" | "error", "counts": {status: n}, "pending": n, "message": ...}``.

    :param prediction_ids: the predictions to wait for, comma-separated.
    :param created_after: where the batch's creates start in the account's list (ISO 8601).
    :param end_time: Unix time at which to give up with a ``timeout`` event.
    :param poll_interval: seconds between sweeps of the list.
    :param hook_params: keyword arguments of the hook; only JSON primitives are kept.
    :param deferred_at: Unix time at which the task deferred (``None``: unknown, no hold).
    :param min_defer_seconds: an event found sooner than this many seconds after ``deferred_at`` is
        held until then, so the task does not resume before Airflow has recorded the deferral
        (``None``: ``default_min_defer_seconds``; ``0``: no hold).
    :param cancel_on_kill: cancel the predictions not yet finished when a user kills the deferred
        task (Airflow >= 3.3); those that succeeded are kept.
    """

    def __init__(
        self,
        prediction_ids: str,
        created_after: str | None,
        end_time: float | None,
        flux_kontext_conn_id: str = DEFAULT_CONN_ID,
        poll_interval: float = 2.0,
        hook_params: Mapping[str, Any] | None = None,
        deferred_at: float | None = None,
        min_defer_seconds: float | None = None,
        cancel_on_kill: bool = True,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.cancel_on_kill = bool(cancel_on_kill)
        self._watch: BatchWatch | None = None
        self.prediction_ids = str(prediction_ids)
        self.created_after = None if created_after is None else str(created_after)
        self.end_time = None if end_time is None else float(end_time)
        self.flux_kontext_conn_id = flux_kontext_conn_id
        self.poll_interval = float(poll_interval)
        self.hook_params = {
            str(name): value
            for name, value in (hook_params or {}).items()
            if value is None or type(value) in (str, int, float, bool)
        }
        self.deferred_at = None if deferred_at is None else float(deferred_at)
        self.min_defer_seconds = None if min_defer_seconds is None else float(min_defer_seconds)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the classpath and kwargs the triggerer rebuilds it from (JSON primitives, no secret)."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "prediction_ids": self.prediction_ids,
                "created_after": self.created_after,
                "end_time": self.end_time,
                "flux_kontext_conn_id": self.flux_kontext_conn_id,
                "poll_interval": self.poll_interval,
                "hook_params": self.hook_params,
                "deferred_at": self.deferred_at,
                "min_defer_seconds": self.min_defer_seconds,
                "cancel_on_kill": self.cancel_on_kill,
            },
        )

    def __repr__(self) -> str:  # the default would print thousands of ids in every log line
        count = len(self.ids())
        return f"<FluxKontextBatchTrigger {count} predictions, until {self.end_time}>"

    def ids(self) -> list[str]:
        """Return the ids of the predictions waited for."""
        return [pid for pid in self.prediction_ids.split(",") if pid]

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Sweep the list until the batch ends or the deadline passes; yield the one event.

        A connection that cannot be used and a list that keeps failing end in an ``error`` event.
        """
        from airflow_provider_kontext.hooks.kontext import FluxKontextHook

        watch = self._watch = BatchWatch(
            self.ids(), self.created_after, self.end_time, poll_interval=self.poll_interval, log=self.log.info
        )
        try:
            hook = FluxKontextHook(self.flux_kontext_conn_id, **self.hook_params)
        except ValueError as exc:
            yield TriggerEvent({"status": "error", "counts": {}, "pending": watch.total, "message": str(exc)})  # type: ignore[no-untyped-call]
            return
        try:
            status, message = await watch.run(hook)
        except ValueError as exc:  # a malformed connection (bad extra)
            status, message = "error", f"Cannot read the account's predictions: {exc}"
        finally:
            await hook.aclose()
        from airflow_provider_kontext.triggers.kontext import settle_event

        await settle_event(self.deferred_at, self.min_defer_seconds, self.log)
        yield TriggerEvent(  # type: ignore[no-untyped-call]
            {
                "status": status,
                "counts": dict(watch.counts),
                "pending": len(watch.pending),
                "message": message,
            }
        )

    async def on_kill(self) -> None:
        """Cancel the predictions not yet seen to end when a user kills the deferred task.

        Not called on triggerer restarts nor on the deferral's timeout. A prediction that succeeded
        meanwhile stays succeeded (a cancel does not undo it); failures to cancel are logged.
        """
        if not self.cancel_on_kill:
            return
        from airflow_provider_kontext.hooks.kontext import FluxKontextHook

        pending = sorted(self._watch.pending if self._watch is not None else self.ids())
        if not pending:
            return
        hook = FluxKontextHook(self.flux_kontext_conn_id, **self.hook_params)
        gate = asyncio.Semaphore(CANCEL_CONCURRENCY)
        outcomes: Counter[str] = Counter()

        async def cancel(prediction_id: str) -> None:
            async with gate:
                try:
                    outcomes[(await hook.acancel_prediction(prediction_id)).status.value] += 1
                except FluxKontextError as exc:
                    outcomes["not canceled"] += 1
                    self.log.warning("Could not cancel prediction %s on kill: %s", prediction_id, exc)

        try:
            await asyncio.gather(*(cancel(pid) for pid in pending))
        finally:
            await hook.aclose()
        self.log.info("Batch killed: %d predictions asked to cancel: %s", len(pending), dict(outcomes))
