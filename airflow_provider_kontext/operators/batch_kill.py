"""Cancel what a killed batch of edits still waits for, keeping every result already paid for.

As the single edit cancels its prediction when its task is killed (``cancel_on_kill``), a killed
batch stops creating and cancels each prediction it created that is not known to be over. What
already succeeded is never touched (its outputs are paid for: a retry saves them), nor is a
prediction whose cancel answers that it succeeded meanwhile. A prediction the kill canceled is
recorded ``killed``: a retry edits that image again, as the single edit's retry does. The kill
stores which predictions it cancels before the first cancel goes out (:func:`mark_killed`).

Airflow calls ``on_kill`` from the task's signal handler, on the thread it interrupted, which may
hold the ledger's lock or the channel to the task state store: the work runs on a thread of its
own, waited for a bounded time, so the handler never waits on the thread it interrupted. While the
task is deferred the trigger cancels instead (:meth:`FluxKontextBatchTrigger.on_kill`), and the
next try finds those predictions canceled and edits them again (:func:`redo_canceled`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from airflow_provider_kontext.edits.batch_ledger import CREATED, KILLED, ONLY_CREATED, TERMINAL, BatchLedger
from airflow_provider_kontext.exceptions import FluxKontextError

#: Longest ``on_kill`` waits for the cancels (the rest go on in the background while the process lives).
KILL_SECONDS = 20.0
#: Cancels in flight at once.
CANCEL_WORKERS = 8
#: Statuses a cancel may answer in which nothing usable remains: the image is edited again.
NOTHING_KEPT = frozenset({"canceled", "aborted"})
#: The entries a cancel that kept nothing records ``killed``: still waiting, or already recorded
#: ``canceled``/``aborted`` by the batch's finish, which read the prediction after this cancel (a
#: retry must edit the image again, not take the cancel for a final failure).
KILLABLE = frozenset({CREATED, "canceled", "aborted"})
#: Why a killed image was not edited (its ledger entry, the failure message, ``predictions``).
KILLED_WHY = "canceled because the task was killed"
#: Why an image whose prediction was canceled after the try that created it ended was not edited:
#: the kill of a deferred task cancels in the triggerer, which cannot record it.
CANCELED_AFTER_ITS_TRY = "canceled after the try that created it ended (a kill of the deferred task)"


def mark_killed(ledger: BatchLedger, targets: list[tuple[int, str]], log: Any) -> None:
    """Record, before any cancel goes out, that the kill cancels these ``(index, prediction id)``.

    Stored at once: a cancel whose answer is lost, or a process that dies before its records are
    written, still leaves the mark, and whichever finish reads the prediction canceled (this try's
    or a retry's) records the image ``killed``. A store that fails is logged; the marks stand in
    this process.
    """
    for index, prediction_id in targets:
        ledger.update(index, prediction_id, ONLY_CREATED, flush=False, k=1)
    try:
        ledger.flush()
    except Exception as exc:  # the kill goes on: its cancels matter more
        log.warning("Task killed: could not store which predictions it cancels: %s", exc)


def cancel_one(hook: Any, ledger: BatchLedger, index: int, prediction_id: str, log: Any) -> bool:
    """Cancel one prediction; record its image ``killed`` (not flushed) when nothing usable remains.

    Return whether it was recorded. A cancel that fails is logged and leaves the entry as it was (a
    retry waits for that prediction).
    """
    try:
        status = hook.cancel_prediction(prediction_id).status.value
    except FluxKontextError as exc:
        log.warning("Could not cancel prediction %s: %s", prediction_id, exc)
        return False
    if status not in NOTHING_KEPT:
        log.info("Prediction %s is %s: kept", prediction_id, status)
        return False
    return ledger.update(index, prediction_id, KILLABLE, flush=False, s=KILLED, e=KILLED_WHY)


def cancel_unfinished(
    hook: Any,
    ledger: BatchLedger,
    finals: Mapping[str, Mapping[str, Any]],
    log: Any,
    *,
    seconds: float = KILL_SECONDS,
) -> threading.Thread:
    """Cancel every prediction the batch created that is not known to be over, on a thread of its own.

    ``finals`` holds what the wait already saw end (by prediction id); entries recorded
    ``succeeded`` are not ``created``, so never canceled. Waits at most ``seconds`` for the thread
    and returns it; nothing is raised.
    """

    def work() -> None:
        targets = [
            (index, prediction_id)
            for prediction_id, index in ledger.waiting().items()
            if (finals.get(prediction_id) or {}).get("status") not in TERMINAL
        ]
        if not targets:
            return
        log.info("Task killed: canceling the %d predictions of the batch not yet finished", len(targets))
        mark_killed(ledger, targets, log)
        with ThreadPoolExecutor(min(CANCEL_WORKERS, len(targets)), thread_name_prefix="kontext-kill") as pool:
            killed = sum(pool.map(lambda t: cancel_one(hook, ledger, t[0], t[1], log), targets))
        ledger.flush()
        log.info("Task killed: %d of %d predictions canceled; the rest kept", killed, len(targets))

    thread = threading.Thread(target=work, name="kontext-kill", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        log.warning(
            "Task killed: still canceling after %.0fs; the rest go on while the process lives", seconds
        )
    return thread


def redo_canceled(op: Any, ledger: BatchLedger, log: Any) -> list[int]:
    """Return the images whose prediction an earlier try created and something canceled since.

    A kill of the deferred task cancels its predictions in the triggerer, which cannot record it:
    a retry edits those images again, as the single edit's retry does, and records them ``killed``
    until then. Read in one sweep of the account's list; where it cannot be read, the wait settles
    them (:meth:`~.batch_finish.BatchFinisher.settle` takes such a cancel for a kill too).
    """
    import asyncio

    from airflow_provider_kontext.triggers.batch import sweep

    created = ledger.waiting()
    if not created:
        return []

    async def read() -> dict[str, dict[str, Any]]:
        try:
            return await sweep(op.hook, set(created), ledger.window)
        finally:
            await op.hook.aclose()

    try:
        found = asyncio.run(read())
    except FluxKontextError as exc:
        log.warning("Could not read the earlier tries' predictions before creating (the wait will): %s", exc)
        return []
    canceled = {pid: created[pid] for pid, item in found.items() if item.get("status") in NOTHING_KEPT}
    for pid, index in canceled.items():
        ledger.update(index, pid, ONLY_CREATED, flush=False, s=KILLED, e=CANCELED_AFTER_ITS_TRY)
    redo = sorted(canceled.values())
    if redo:
        ledger.flush()
        log.info(
            "Batch: %d images whose predictions were canceled after an earlier try: edited again", len(redo)
        )
    return redo
