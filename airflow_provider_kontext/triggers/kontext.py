"""``FluxKontextPredictionTrigger``: waits for a prediction in the triggerer, off the worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_kontext.edits.events import error_event
from airflow_provider_kontext.edits.progress import DEFAULT_POLL_POLICY, POLL_POLICIES, PredictionPoller
from airflow_provider_kontext.exceptions import FluxKontextError
from airflow_provider_kontext.hooks.connection import DEFAULT_CONN_ID
from airflow_provider_kontext.triggers.source import PredictionSource
from airflow_provider_kontext.triggers.watcher import open_source

__all__ = [
    "SETTLE_SLACK_SECONDS",
    "FluxKontextPredictionTrigger",
    "default_min_defer_seconds",
    "settle_event",
]

#: Seconds added to ``[workers] min_heartbeat_interval`` for the default :func:`default_min_defer_seconds`:
#: the deferring process's exit, the worker's report and one loop of a busy scheduler.
SETTLE_SLACK_SECONDS = 10.0


def default_min_defer_seconds() -> float:
    """Return the least time a deferral lasts by default, in seconds.

    That is Airflow's ``[workers] min_heartbeat_interval`` (how late the supervisor may notice the
    deferring try's exit; 5 when unreadable) plus :data:`SETTLE_SLACK_SECONDS`. A resume sooner than
    the scheduler has processed the deferring try's exit is failed by Airflow 3.1-3.3 ("finished
    with state success, but the task instance's state attribute is queued/running") and waits out
    ``retry_delay``; see docs/deferral.md. In ``airflow dags test`` (the task runs in-process and the
    trigger in line, after the deferring run ended) there is no such race, and the default is ``0``.
    """
    if _runs_in_process():
        return 0.0
    try:
        from airflow.configuration import conf

        interval = float(conf.getint("workers", "min_heartbeat_interval", fallback=5))
    except Exception:  # an unreadable setting must not break a deferral
        interval = 5.0
    return max(0.0, interval) + SETTLE_SLACK_SECONDS


async def settle_event(deferred_at: float | None, min_defer_seconds: float | None, log: Any) -> None:
    """Hold a trigger's event until ``min_defer_seconds`` after ``deferred_at``, if it came sooner.

    The hold is never longer than ``min_defer_seconds`` (a clock that jumped back does not stall the
    event).

    :param deferred_at: Unix time at which the task deferred (``None``: no hold).
    :param min_defer_seconds: the least time the deferral lasts (``None``:
        :func:`default_min_defer_seconds`).
    :param log: the trigger's logger (the hold is logged at info).
    """
    if deferred_at is None:
        return
    settle = default_min_defer_seconds() if min_defer_seconds is None else min_defer_seconds
    hold = min(deferred_at + settle - time.time(), settle)
    if hold > 0:
        log.info(
            "Holding the event %.1f s: the task deferred %.1f s ago, and a resume sooner than %g s "
            "after deferring can be failed by Airflow before it records the deferral's exit",
            hold,
            settle - hold,
            settle,
        )
        await asyncio.sleep(hold)


def _runs_in_process() -> bool:
    """Return whether this task runs in-process under ``dag.test()`` (its supervisor comms are in-process)."""
    try:
        from airflow.sdk.execution_time import task_runner
        from airflow.sdk.execution_time.supervisor import InProcessSupervisorComms
    except ImportError:
        return False
    return isinstance(getattr(task_runner, "SUPERVISOR_COMMS", None), InProcessSupervisorComms)


class FluxKontextPredictionTrigger(BaseTrigger):
    """Wait for one prediction to end, then fire exactly one event.

    The event is a :class:`~airflow_provider_kontext.edits.events.PredictionEvent`: the terminal
    status, ``timeout`` once the deadline passes, or ``error``. It only reads: it never creates a
    prediction, so a restarted or duplicated trigger (triggerer restart, HA triggerers) is harmless.
    Its kwargs are ids and numbers only, never a secret: the token is looked up from the connection
    at run time. Status changes and new model log lines go to the task's log. A poll that fails
    transiently (network, 429, 5xx, an unreadable answer) is retried by the hook up to
    ``max_consecutive_errors`` times, never past ``end_time`` (then the event is ``timeout``); auth
    and not-found errors end the wait with an ``error`` event.

    :param prediction_id: the prediction to watch.
    :param flux_kontext_conn_id: the connection to poll with.
    :param poll_interval: seconds between polls (with the adaptive policy: while no better estimate
        of the end is known).
    :param end_time: Unix time at which to give up with a ``timeout`` event (``None``: no deadline).
    :param cancel_on_kill: cancel the prediction when a user kills the deferred task (Airflow >= 3.3).
    :param max_consecutive_errors: retries of a failing poll before an ``error`` event.
    :param poll_policy: ``"adaptive"`` (default: poll when the model's progress bar says it ends) or
        ``"fixed"`` (every ``poll_interval``); see
        :meth:`airflow_provider_kontext.edits.progress.PredictionPoller.delay`.
    :param hook_params: keyword arguments of the hook (``timeout``, ``max_retries``, ...); only JSON
        primitives are kept, since the kwargs are stored and logged (they are settings, never secrets).
    :param created_at: the prediction's ``created_at`` (ISO 8601), if known: where the account's
        waits share the list (:mod:`.watcher`), it bounds the list's window; unknown, the first
        sweeps or one read of its own find it.
    :param deferred_at: Unix time at which the task deferred (``None``: unknown, no hold).
    :param min_defer_seconds: an event found sooner than this many seconds after ``deferred_at`` is
        held until then, so that Airflow has recorded the deferring try's exit before the task
        resumes (see :func:`default_min_defer_seconds`; ``None``: that default; ``0``: no hold).

    The triggers of one account in one triggerer share a
    :class:`~airflow_provider_kontext.triggers.watcher.PredictionWatcher` (one list request answers
    for up to 100 waits) and one request budget; ``list_min_waits: 0`` in the connection makes each
    read on its own (a :class:`~airflow_provider_kontext.triggers.source.SoloSource`).
    """

    def __init__(
        self,
        prediction_id: str,
        flux_kontext_conn_id: str = DEFAULT_CONN_ID,
        poll_interval: float = 2.0,
        end_time: float | None = None,
        cancel_on_kill: bool = True,
        max_consecutive_errors: int = 10,
        poll_policy: str = DEFAULT_POLL_POLICY,
        hook_params: Mapping[str, Any] | None = None,
        created_at: str | None = None,
        deferred_at: float | None = None,
        min_defer_seconds: float | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if poll_policy not in POLL_POLICIES:
            raise ValueError(f"poll_policy must be one of {', '.join(POLL_POLICIES)}, got {poll_policy!r}")
        self.prediction_id = prediction_id
        self.flux_kontext_conn_id = flux_kontext_conn_id
        self.poll_interval = float(poll_interval)
        self.end_time = None if end_time is None else float(end_time)
        self.cancel_on_kill = bool(cancel_on_kill)
        self.max_consecutive_errors = int(max_consecutive_errors)
        self.poll_policy = str(poll_policy)
        self.hook_params = {
            str(name): value
            for name, value in (hook_params or {}).items()
            if value is None or type(value) in (str, int, float, bool)
        }
        self.created_at = None if created_at is None else str(created_at)
        self.deferred_at = None if deferred_at is None else float(deferred_at)
        self.min_defer_seconds = None if min_defer_seconds is None else float(min_defer_seconds)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the classpath and kwargs the triggerer rebuilds it from (JSON primitives, no secret)."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "prediction_id": self.prediction_id,
                "flux_kontext_conn_id": self.flux_kontext_conn_id,
                "poll_interval": self.poll_interval,
                "end_time": self.end_time,
                "cancel_on_kill": self.cancel_on_kill,
                "max_consecutive_errors": self.max_consecutive_errors,
                "poll_policy": self.poll_policy,
                "hook_params": self.hook_params,
                **({"created_at": self.created_at} if self.created_at is not None else {}),
                **({"deferred_at": self.deferred_at} if self.deferred_at is not None else {}),
                **(
                    {"min_defer_seconds": self.min_defer_seconds}
                    if self.min_defer_seconds is not None
                    else {}
                ),
            },
        )

    def _hook(self) -> Any:
        from airflow_provider_kontext.hooks.kontext import FluxKontextHook

        return FluxKontextHook(self.flux_kontext_conn_id, **self.hook_params)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Look at the prediction when its poller says, until the one event; yield it.

        Each look is one call to its source (:func:`~.watcher.open_source`). A failed look ends in an
        ``error`` or ``timeout`` event as the class docstring says, not in an exception.
        """
        hook = self._hook()
        poller = PredictionPoller(
            self.prediction_id,
            poll_interval=self.poll_interval,
            end_time=self.end_time,
            max_consecutive_errors=self.max_consecutive_errors,
            log=self.log.info,
            policy=self.poll_policy,
            redact=hook.redact,
            announce_end=False,  # the triggerer logs the event, its status with it
        )
        source: PredictionSource | None = None
        try:
            source = await open_source(
                hook, self.prediction_id, self.created_at, poll_interval=self.poll_interval
            )
            delay = poller.first_delay()
            while True:
                try:
                    prediction = await source.next(delay, poller.retry_limits)
                    event = poller.on_prediction(prediction)
                except FluxKontextError as exc:
                    event = poller.on_error(exc)
                except ValueError as exc:  # a malformed connection (bad extra): no point polling on
                    event = error_event(self.prediction_id, f"Cannot poll: {exc}")
                if event is not None:
                    await self._settle()
                    yield TriggerEvent(event.payload())  # type: ignore[no-untyped-call]
                    return
                delay = poller.delay()
        finally:
            if source is not None:
                await source.close()
            await hook.aclose()

    async def _settle(self) -> None:
        """Hold the event until ``min_defer_seconds`` after the deferral, if it came sooner."""
        await settle_event(self.deferred_at, self.min_defer_seconds, self.log)

    async def on_kill(self) -> None:
        """Cancel the prediction when a user kills the deferred task (not on triggerer restarts)."""
        if not self.cancel_on_kill:
            return
        hook = self._hook()
        try:
            prediction = await hook.acancel_prediction(self.prediction_id)
            self.log.info(
                "Prediction %s canceled on kill (status %s)", self.prediction_id, prediction.status.value
            )
        except FluxKontextError as exc:
            self.log.warning("Could not cancel prediction %s on kill: %s", self.prediction_id, exc)
        finally:
            await hook.aclose()
