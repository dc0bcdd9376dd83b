"""Finish a batch of edits: read back and record every outcome, save the outputs, build the result.

What the task leaves behind is its return value, the ``batch`` and ``predictions`` XComs (see
:mod:`~airflow_provider_kontext.edits.batch_results`), the manifest and the asset events; or the
failure that names the images not edited.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from airflow_provider_kontext.edits.batch_ledger import KILLED, ONLY_CREATED, SUCCEEDED, TERMINAL, BatchLedger
from airflow_provider_kontext.edits.batch_results import (
    counts_of,
    failure_message,
    image_summary,
    retryable,
    write_manifest,
    xcom_values,
)
from airflow_provider_kontext.edits.reattach import Series
from airflow_provider_kontext.exceptions import (
    FluxKontextBatchFailed,
    FluxKontextBatchFailedNoRetry,
    FluxKontextError,
    FluxKontextNotFoundError,
    FluxKontextPredictionFailed,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_kontext.edits.batch_items import BatchItem
    from airflow_provider_kontext.edits.events import PredictionEvent
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook
    from airflow_provider_kontext.models import Prediction

#: Why a retryable partial failure fails without retries on Airflow < 3.3.
NO_STORE = (
    "Not retried: this Airflow has no task state store (3.3+), and the batch's record in XCom is "
    "cleared when a retry starts, so a retry would pay again for the images that succeeded. Clear "
    "the task to redo all of them, or use Airflow >= 3.3."
)
#: Finished images recorded per write of the ledger while outputs are saved.
FLUSH_EVERY = 50


class FinishingTask(Protocol):
    """What finishing a batch needs of its operator: its settings, the hook, the single edit's ending."""

    model: str
    output_path: Any
    outlets: list[Any]
    fail_on_partial: bool
    retry_failed_predictions: bool
    max_concurrent_downloads: int

    @property
    def hook(self) -> FluxKontextHook:
        """Return the hook of the batch's connection."""

    def _timeout_seconds(self) -> float: ...

    def _cancel(self, prediction_id: str, why: str) -> Prediction | None: ...

    def _keep_outputs(
        self, event: PredictionEvent, input_name: str | None = None, input_image: Any = None
    ) -> list[str]: ...


class BatchFinisher:
    """Settle a batch: read back what the wait did not bring, record every outcome, save the outputs.

    Then :meth:`conclude` builds the task's result.
    """

    def __init__(self, op: FinishingTask, ledger: BatchLedger, *, log: Any, try_number: int = 0) -> None:
        self.op = op
        #: This try's number: a prediction an earlier try created and nobody recorded ending is
        #: taken for a kill's where it was canceled.
        self.try_number = try_number
        self.ledger = ledger
        self.log = log
        #: Why an image is still without an outcome (still running, its outputs not saved), by index.
        self.unsettled: dict[int, str] = {}
        self._lock = threading.Lock()
        self._saved = 0
        self._names: dict[int, str | None] = {}
        self._wheres: dict[int, str | None] = {}

    def settle(
        self,
        items: list[BatchItem],
        pending: dict[str, float],
        finals: dict[str, dict[str, Any]],
        message: str | None,
    ) -> None:
        """Record the outcome of each prediction waited for; cancel those past their deadline.

        :raises FluxKontextError: the account's list could not be read (a retry reads it again).
        """
        self._names = {item.position: item.name for item in items}
        self._wheres = {item.position: item.where for item in items}
        unread = [pid for pid in pending if finals.get(pid, {}).get("status") not in TERMINAL]
        if unread:
            finals.update(asyncio.run(self._read(unread)))
        index_of = self.ledger.waiting()
        to_save: list[tuple[int, str, dict[str, Any]]] = []
        now = time.time()
        for prediction_id, deadline in pending.items():
            index = index_of.get(prediction_id)
            if index is None:  # recorded since ``pending`` was read (a kill canceled it): that stands
                continue
            item = finals.get(prediction_id) or {}
            outcome = item.get("status")
            if outcome == "succeeded":
                to_save.append((index, prediction_id, item))
            elif outcome in TERMINAL or outcome == "lost":
                ending = self._ending(index, item)
                self.ledger.update(index, prediction_id, ONLY_CREATED, flush=False, **ending)
            elif now >= deadline:
                answer = self.op._cancel(prediction_id, "it did not finish within the timeout")
                if answer is None:  # not canceled: a retry waits for it, as for one still running
                    self.unsettled[index] = f"prediction {prediction_id} is past its timeout and not canceled"
                elif answer.status.value == "succeeded":  # it ended first: its outputs are paid for
                    to_save.append((index, prediction_id, answer.model_dump(mode="json", exclude={"logs"})))
                else:
                    why = f"did not finish within {self.op._timeout_seconds():.0f}s"
                    self.ledger.update(index, prediction_id, ONLY_CREATED, flush=False, s="timeout", e=why)
            else:
                self.unsettled[index] = (
                    message or f"prediction {prediction_id} is still {outcome or 'unknown'}"
                )
        self.ledger.flush()
        if to_save:
            workers = min(self.op.max_concurrent_downloads, len(to_save))
            with ThreadPoolExecutor(workers, thread_name_prefix="kontext-save") as pool:
                list(pool.map(lambda args: self._save(*args), to_save))
            self.ledger.flush()

    def _ending(self, index: int, item: dict[str, Any]) -> dict[str, Any]:
        """Return the entry's state and error for a prediction that ended other than ``succeeded``.

        Canceled by this batch's kill (marked before the cancel went out), or canceled after the try
        that created it ended (a kill of the deferred task cancels in the triggerer, which cannot
        record it): ``killed``, which a retry edits again. Canceled by the server at the deadline
        its create set (``Cancel-After``, the batch's timeout): ``timeout``, redone too. Otherwise
        how it ended.
        """
        from airflow_provider_kontext.operators.batch_kill import (
            CANCELED_AFTER_ITS_TRY,
            KILLED_WHY,
            NOTHING_KEPT,
        )

        outcome = item.get("status")
        entry = self.ledger.entry(index) or {}
        if outcome in NOTHING_KEPT and entry.get("k"):
            return {"s": KILLED, "e": KILLED_WHY}
        if outcome == "canceled" and _canceled_at_deadline(item):  # the timeout, reached on the server
            return {"s": "timeout", "e": "did not finish within the timeout (canceled at its deadline)"}
        if outcome == "canceled" and int(entry.get("r") or 0) < self.try_number:
            return {"s": KILLED, "e": CANCELED_AFTER_ITS_TRY}
        return {"s": outcome, "e": _error_text(item, self.op.hook.redact)}

    async def _read(self, unread: list[str]) -> dict[str, dict[str, Any]]:
        """Return the current state of predictions the wait did not report (the trigger sends counts)."""
        from airflow_provider_kontext.triggers.batch import sweep

        hook = self.op.hook
        try:
            found = await sweep(hook, set(unread), self.ledger.window)
            for prediction_id in set(unread) - set(found):
                try:
                    prediction = await hook.aget_prediction(prediction_id)
                except FluxKontextNotFoundError:
                    found[prediction_id] = {
                        "id": prediction_id,
                        "status": "lost",
                        "error": "no longer exists",
                    }
                    continue
                found[prediction_id] = prediction.model_dump(mode="json", exclude={"logs", "input"})
            return found
        finally:
            await hook.aclose()

    def _save(self, index: int, prediction_id: str, item: dict[str, Any]) -> None:
        """Hand on one succeeded prediction's outputs (saved under ``output_path``) and record it."""
        from airflow_provider_kontext.edits.events import prediction_event
        from airflow_provider_kontext.exceptions import FluxKontextPredictionFailedNoRetry
        from airflow_provider_kontext.models import Prediction

        op = self.op
        event = prediction_event(Prediction.model_validate(item), op.hook.redact)
        outcome: dict[str, Any]
        if not op.output_path and any(url.startswith("data:") for url in event.output):
            outcome = {"s": "unusable", "e": "inline data: outputs need output_path in a batch"}
        else:
            try:
                outputs = op._keep_outputs(event, self._names[index], self._wheres[index])
            except FluxKontextPredictionFailedNoRetry as exc:
                outcome = {"s": "unusable", "e": op.hook.redact(str(exc))}
            except FluxKontextPredictionFailed as exc:
                outcome = {"s": "lost", "e": op.hook.redact(str(exc))}
            except (FluxKontextError, OSError) as exc:
                with self._lock:
                    self.unsettled[index] = op.hook.redact(f"saving its outputs failed: {exc}")
                return
            else:
                outcome = {"s": SUCCEEDED, "o": outputs}
        self.ledger.update(index, prediction_id, ONLY_CREATED, flush=False, **outcome)
        with self._lock:
            self._saved += 1
            flush = self._saved % FLUSH_EVERY == 0
        if flush:
            self.ledger.flush()

    def conclude(
        self, context: Context, items: list[BatchItem], *, abort: str | None, create_errors: dict[int, str]
    ) -> list[list[str]]:
        """Return the task's result after pushing its XCom, writing the manifest and the asset events.

        :raises FluxKontextBatchFailed: some images were not edited (names them); a retry redoes them.
        :raises FluxKontextBatchFailedNoRetry: the same, where a retry cannot help or would pay again.
        """
        from airflow.sdk import Asset

        op = self.op
        summaries = []
        for item in items:
            entry = dict(self.ledger.entry(item.position) or {})
            why = self.unsettled.get(item.position) or create_errors.get(item.position)
            if why and not entry.get("e"):
                entry["e"] = why
            summaries.append(image_summary(item, entry, op.model))
        counts = counts_of(summaries)
        manifest = None
        if op.output_path:
            from airflow_provider_kontext.edits.outputs import output_folder

            folder = output_folder(op.output_path)
            folder.mkdir(parents=True, exist_ok=True)
            manifest = write_manifest(folder, summaries, counts)
        for key, value in xcom_values(summaries, counts, manifest).items():
            context["ti"].xcom_push(key=key, value=value)
        extra: dict[str, Any] = {"images": len(items), "counts": counts, "manifest": manifest}
        for outlet in op.outlets or []:
            if isinstance(outlet, Asset):
                context["outlet_events"][outlet].extra = extra
        listed = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        self.log.info(
            "Batch finished: %d images: %s%s",
            len(items),
            listed,
            f"; manifest {manifest}" if manifest else "",
        )
        failed = [row for row in summaries if row["status"] != SUCCEEDED]
        if abort:
            raise FluxKontextBatchFailedNoRetry(
                f"Creating stopped: {abort}\n{failure_message(failed, len(items))}"
            )
        if failed:
            message = failure_message(failed, len(items))
            if op.fail_on_partial:
                final = not retryable(failed, op.retry_failed_predictions)
                if not final and not self.ledger.durable:
                    raise FluxKontextBatchFailedNoRetry(f"{message}\n{NO_STORE}")
                raise (FluxKontextBatchFailedNoRetry if final else FluxKontextBatchFailed)(message)
            self.log.warning("%s", message)
        self.ledger.finish(Series.of(context)._asdict())
        return [list(row["outputs"]) if row["status"] == SUCCEEDED else [] for row in summaries]


def _canceled_at_deadline(item: dict[str, Any]) -> bool:
    """Return whether the list item is of a prediction the server canceled at its ``Cancel-After``."""
    from pydantic import ValidationError

    from airflow_provider_kontext.edits.deadlines import canceled_at_deadline
    from airflow_provider_kontext.models import Prediction

    try:
        return canceled_at_deadline(Prediction.model_validate(item))
    except ValidationError:
        return False


def _error_text(item: dict[str, Any], redact: Any) -> str | None:
    """Return a finished prediction's error, redacted, or ``None`` without one."""
    error = item.get("error")
    if error in (None, ""):
        return None
    return str(redact(error if isinstance(error, str) else repr(error)))
