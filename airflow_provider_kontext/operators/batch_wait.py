"""Wait for a batch's predictions: first here for the deferral's hold, then deferred, or all here.

The batch operator (:mod:`airflow_provider_kontext.operators.batch`) tells the story; this step
waits with the batch trigger's own loop (:class:`~airflow_provider_kontext.triggers.batch.BatchWatch`)
and hands the rest to one :class:`~airflow_provider_kontext.triggers.batch.FluxKontextBatchTrigger`.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook


class WaitingTask(Protocol):
    """What waiting for a batch needs of its operator: the wait settings, the hook, ``defer``."""

    deferrable: bool
    poll_interval: float
    flux_kontext_conn_id: str
    hook_params: dict[str, Any]
    cancel_on_kill: bool
    log: Any

    @property
    def hook(self) -> FluxKontextHook:
        """Return the hook of the batch's connection."""

    def defer(self, *, trigger: Any, method_name: str, timeout: timedelta | None = None) -> None:
        """Hand the task to ``trigger`` (``BaseOperator.defer``: raises ``TaskDeferred``)."""

    def _resume_floor(self) -> float: ...

    def _defer_backstop(self, end_time: float) -> timedelta: ...


def wait_for_batch(
    op: WaitingTask, pending: dict[str, float], window: str | None, finals: dict[str, dict[str, Any]]
) -> tuple[str, str | None]:
    """Wait for ``pending`` (prediction id -> deadline); return ``("done" | "timeout" | "error", why)``.

    A deferral lasts at least the hold (``min_defer_seconds``), and a batch's last edits often end
    sooner: a deferrable batch first waits that long here, then defers what still runs (the task
    resumes in ``execute_complete``). Otherwise it waits here for all. Each final state goes into
    ``finals``.

    :raises TaskDeferred: when predictions still run after the hold.
    """
    status: tuple[str, str | None] = ("done", None)
    if pending and op.deferrable and (hold := op._resume_floor()) > 0:
        until = min(max(pending.values()), time.time() + hold)
        status = asyncio.run(_watch_here(op, pending, window, finals, until))
        pending = {pid: end for pid, end in pending.items() if pid not in finals}
    if pending and op.deferrable:
        _defer(op, pending, window)
    if pending:
        status = asyncio.run(_watch_here(op, pending, window, finals))
    return status


def _defer(op: WaitingTask, pending: dict[str, float], window: str | None) -> None:
    """Hand the wait for all pending predictions to one trigger."""
    from airflow_provider_kontext.triggers.batch import FluxKontextBatchTrigger

    end_time = max(pending.values())
    op.log.info(
        "Waiting in the triggerer for %d predictions until %s",
        len(pending),
        datetime.fromtimestamp(end_time, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    )
    op.defer(
        trigger=FluxKontextBatchTrigger(
            prediction_ids=",".join(pending),
            created_after=window,
            end_time=end_time,
            flux_kontext_conn_id=op.flux_kontext_conn_id,
            poll_interval=op.poll_interval,
            hook_params=op.hook_params,
            deferred_at=time.time(),
            min_defer_seconds=op._resume_floor(),
            cancel_on_kill=op.cancel_on_kill,
        ),
        method_name="execute_complete",
        timeout=op._defer_backstop(end_time),
    )


async def _watch_here(
    op: WaitingTask,
    pending: dict[str, float],
    window: str | None,
    finals: dict[str, dict[str, Any]],
    until: float | None = None,
) -> tuple[str, str | None]:
    """Wait in the worker with the trigger's loop until all end, their deadline, or ``until``."""
    from airflow_provider_kontext.triggers.batch import BatchWatch

    end_time = max(pending.values()) if until is None else until
    op.log.info(
        "Waiting in the worker for %d predictions%s",
        len(pending),
        "" if until is None else f" for up to {max(0.0, until - time.time()):.0f}s before deferring",
    )
    watch = BatchWatch(
        list(pending),
        window,
        end_time,
        poll_interval=op.poll_interval,
        log=op.log.info,
        on_final=lambda pid, item: finals.__setitem__(pid, item),
    )
    hook = op.hook
    try:
        return await watch.run(hook)
    finally:
        await hook.aclose()
