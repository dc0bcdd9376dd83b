"""``FluxKontextBatchEditOperator``: hundreds or thousands of FLUX.1 Kontext edits in one task."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_provider_kontext.compat import AirflowFailException
from airflow_provider_kontext.edits.batch_ledger import (
    CREATED,
    CREATING,
    FINAL_FAILURES,
    SUCCEEDED,
    BatchLedger,
)
from airflow_provider_kontext.edits.request import check_literal_inputs, seed_key
from airflow_provider_kontext.edits.results import PredictionResultMixin
from airflow_provider_kontext.exceptions import FluxKontextInputError
from airflow_provider_kontext.hooks.connection import DEFAULT_CONN_ID
from airflow_provider_kontext.models import DEFAULT_MODEL
from airflow_provider_kontext.models.arguments import check_number
from airflow_provider_kontext.operators.arguments import MODEL_INPUTS, EditArguments
from airflow_provider_kontext.operators.batch_finish import BatchFinisher
from airflow_provider_kontext.operators.batch_kill import redo_canceled
from airflow_provider_kontext.operators.batch_steps import BatchCreator, adopt_orphans
from airflow_provider_kontext.operators.batch_wait import wait_for_batch

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_kontext.edits.batch_items import BatchItem

__all__ = ["FluxKontextBatchEditOperator"]

#: How far before its first create a batch's window in the account's list opens: covers a worker
#: clock behind the server's by up to this much.
WINDOW_MARGIN = timedelta(minutes=5)


class FluxKontextBatchEditOperator(EditArguments, PredictionResultMixin, BaseOperator):
    """Edit many images with FLUX.1 Kontext in one task, paced to the account's create limit.

    Checks every image before the first create (bad ones fail the task without retries, each
    named), sends the creates paced to ``creates_per_minute`` and records each image's state as it
    goes (a retry or a killed worker never edits an image twice nor loses one), then waits once for
    the whole batch, deferred or in the worker. Returns one list of outputs per input image, in
    order (empty for an image not edited); pushes ``predictions`` (one row per image, split over
    ``predictions_1``, ... for a large batch) and ``batch`` (counts, the fields every row shares,
    where the rows and the manifest are), and with ``output_path`` writes ``manifest.json`` beside
    the outputs. When some images were not edited
    the task fails naming them, keeping what succeeded; its retry redoes only those.

    :param input_images: the images (templated): a list of anything the single operator's
        ``input_image`` takes (an upstream task's XCom list included), or a folder or object-storage
        prefix whose jpeg/png/gif/webp files are listed at run time, sorted by name.
    :param prompt: the edit instruction (templated): one for all images, or a list with one per image.
    :param creates_per_minute: the most creates sent per minute (Replicate allows 600; lower it for a
        low-credit account or when other programs create with the same token).
    :param max_concurrent_creates: creates (with their uploads) in flight at once.
    :param max_concurrent_downloads: outputs saved at once (with ``output_path``).
    :param timeout: how long each prediction may take, from its create (seconds or timedelta);
        default as for the single operator. Sent as ``Cancel-After`` too.
    :param fail_on_partial: fail the task when some images were not edited (default); ``False``
        succeeds with the failures in ``predictions`` and the manifest.
    :param retry_failed_predictions: let a retry redo images whose prediction failed or was canceled.
    :param cancel_on_kill: when the task is killed, stop creating and cancel the predictions not yet
        finished (deferred: the trigger does, Airflow >= 3.3); those that succeeded are kept, and a
        retry edits the canceled ones again.

    The model inputs, ``model``, ``flux_kontext_conn_id``, ``hook_params``, ``deferrable``,
    ``poll_interval``, ``min_defer_seconds``, ``output_path``, ``max_output_bytes``,
    ``inline_image_max_bytes`` and ``outlets`` are as for
    :class:`~airflow_provider_kontext.operators.kontext.FluxKontextEditOperator`.
    """

    template_fields: Sequence[str] = (
        "input_images",
        "prompt",
        "model",
        *MODEL_INPUTS,
        "extra_input",
        "output_path",
    )
    template_fields_renderers = {"extra_input": "json", "prompt": "py", "input_images": "py"}
    ui_color = "#d6cdf2"

    def __init__(
        self,
        *,
        input_images: Any,
        prompt: str | list[str],
        aspect_ratio: str | None = None,
        num_inference_steps: int | str | None = None,
        guidance: float | str | None = None,
        seed: int | str | None = None,
        output_format: str | None = None,
        output_quality: int | str | None = None,
        disable_safety_checker: bool | str | None = None,
        go_fast: bool | str | None = None,
        extra_input: dict[str, Any] | None = None,
        model: str = DEFAULT_MODEL,
        flux_kontext_conn_id: str = DEFAULT_CONN_ID,
        hook_params: dict[str, Any] | None = None,
        deferrable: bool | None = None,
        poll_interval: float = 2.0,
        min_defer_seconds: float | None = None,
        timeout: float | timedelta | None = None,
        creates_per_minute: float = 600,
        max_concurrent_creates: int = 8,
        max_concurrent_downloads: int = 8,
        fail_on_partial: bool = True,
        retry_failed_predictions: bool = False,
        cancel_on_kill: bool = True,
        output_path: Any = None,
        max_output_bytes: int = 50 * 1024 * 1024,
        inline_image_max_bytes: int = 256 * 1024,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._take_edit_arguments(
            aspect_ratio=aspect_ratio,
            num_inference_steps=num_inference_steps,
            guidance=guidance,
            seed=seed,
            output_format=output_format,
            output_quality=output_quality,
            disable_safety_checker=disable_safety_checker,
            go_fast=go_fast,
            extra_input=extra_input,
            model=model,
            flux_kontext_conn_id=flux_kontext_conn_id,
            hook_params=hook_params,
            deferrable=deferrable,
            poll_interval=poll_interval,
            min_defer_seconds=min_defer_seconds,
            timeout=timeout,
            output_path=output_path,
            max_output_bytes=max_output_bytes,
            inline_image_max_bytes=inline_image_max_bytes,
        )
        self.input_images = input_images
        self.prompt = prompt
        self.creates_per_minute = check_number("creates_per_minute", creates_per_minute)
        self.max_concurrent_creates = int(
            check_number("max_concurrent_creates", max_concurrent_creates, 1, 64, integer=True)
        )
        self.max_concurrent_downloads = int(
            check_number("max_concurrent_downloads", max_concurrent_downloads, 1, 64, integer=True)
        )
        self.fail_on_partial = bool(fail_on_partial)
        self.retry_failed_predictions = retry_failed_predictions
        self.reattach_on_retry = True
        self._finished = False
        #: Why creating stopped early (a refused token, an unknown model), if it did.
        self._abort: str | None = None
        #: Why an image's create failed, by index (this try's, for the failure message).
        self._create_errors: dict[int, str] = {}
        self.cancel_on_kill = cancel_on_kill
        #: What ``on_kill`` needs: this try's record, its creator, the predictions seen to end.
        self._record: BatchLedger | None = None
        self._creator: BatchCreator | None = None
        self._finals: dict[str, dict[str, Any]] = {}
        literal_prompt = {"prompt": prompt} if isinstance(prompt, str) else {}
        check_literal_inputs(
            self.task_id, model, {**self._model_arguments(), **literal_prompt}, None, extra_input
        )

    # --- the story: check, create, wait, finish -------------------------------------------------------

    def execute(self, context: Context) -> list[list[str]]:
        """Check the images, create what is not yet created, and wait for all (deferred or here)."""
        seed_from = seed_key(context)
        items = self._items(check=True, seed_from=seed_from)
        ledger = self._ledger(context, len(items))
        to_create = [] if self._finished_earlier(context, ledger) else self._plan(items, ledger, seed_from)
        window = (datetime.now(timezone.utc) - WINDOW_MARGIN).isoformat()
        creator = BatchCreator(
            self,
            ledger,
            timeout=self._timeout_seconds(),
            log=self.log,
            seed_from=seed_from,
            try_number=_try_number(context),
        )
        self._record, self._creator, finals = ledger, creator, self._finals
        if to_create:
            ledger.open_window(window)
            creator.create(items, to_create)
        self._abort = creator.abort
        self._create_errors = creator.errors
        pending = {} if creator.killed else self._pending(ledger)
        status, message = wait_for_batch(self, pending, ledger.window, finals)
        return self._finish(context, items, ledger, finals, status, message)

    def execute_complete(self, context: Context, event: Mapping[str, Any]) -> list[list[str]]:
        """Resume after the batch trigger fired: read every result back and finish the batch."""
        items = self._items(check=False)
        ledger = self._ledger(context, len(items))
        if ledger.recorded_size != len(items):
            from airflow_provider_kontext.exceptions import FluxKontextBatchFailed

            raise FluxKontextBatchFailed(
                f"input_images changed while the batch ran ({ledger.recorded_size} images then, "
                f"{len(items)} now); a retry matches the images to their edits by content"
            )
        status = str(event.get("status"))
        message = event.get("message")
        self.log.info("Batch wait ended (%s): %s", status, dict(event.get("counts") or {}))
        return self._finish(context, items, ledger, {}, status, message if isinstance(message, str) else None)

    def on_kill(self) -> None:
        """Stop creating and cancel what the batch still waits for in the worker, keeping what succeeded."""
        if not self.cancel_on_kill or self._finished or self._record is None:
            return
        from airflow_provider_kontext.operators.batch_kill import cancel_unfinished

        if self._creator is not None:
            self._creator.killed = True
        cancel_unfinished(self.hook, self._record, self._finals, self.log)

    # --- steps ------------------------------------------------------------------------------------

    def _items(self, *, check: bool, seed_from: str | None = None) -> list[BatchItem]:
        """Return the batch's images with their prompts; checked (each image read) before creating.

        :raises AirflowFailException: bad input (no retry mends it), naming every bad image.
        """
        from airflow_provider_kontext.edits.batch_items import (
            BatchItem,
            checked_items,
            resolve_images,
            resolve_prompts,
        )
        from airflow_provider_kontext.models.images import trace_image

        try:
            images = resolve_images(self.input_images)
            prompts = resolve_prompts(self.prompt, len(images))
            if check:
                return checked_items(
                    images,
                    prompts,
                    model=self.model,
                    arguments=self._model_arguments(),
                    extra_input=self.extra_input,
                    output_path=self.output_path,
                    seed_from=seed_from,
                )
        except FluxKontextInputError as exc:
            raise AirflowFailException(str(exc)) from exc
        return [
            BatchItem(index, image, prompt, *trace_image(image), "")
            for index, (image, prompt) in enumerate(zip(images, prompts, strict=True))
        ]

    def _ledger(self, context: Context, size: int) -> BatchLedger:
        """Return the record of every image's state (the task state store), loaded."""
        ledger = BatchLedger.from_context(context, size)
        if not ledger.durable:
            self.log.warning(
                "No task state store (Airflow < 3.3): a retry cannot tell which images were already edited"
            )
        ledger.load()
        return ledger

    def _finished_earlier(self, context: Context, ledger: BatchLedger) -> bool:
        """Return whether a try of this series already finished the batch.

        Airflow may fail or kill a try after it finished: this try then completes from the recorded
        outcomes and creates nothing. A record finished before a clear of the task is dropped: the
        batch is edited afresh.
        """
        if ledger.finished is None or ledger.recorded_size != ledger.size:
            return False
        from airflow_provider_kontext.edits.reattach import Series

        if Series.of(context).continues(ledger.finished):
            self.log.info(
                "Try %s finished this batch but Airflow did not record its success; completing from it",
                ledger.finished.get("try_number"),
            )
            return True
        self.log.info(
            "The batch finished in try %s before this task instance was cleared; editing it afresh",
            ledger.finished.get("try_number"),
        )
        ledger.reset()
        return False

    def _plan(self, items: list[BatchItem], ledger: BatchLedger, seed_from: str) -> list[int]:
        """Return the images to create now: those without a prediction, or whose prediction a retry may redo.

        Creates whose answer was lost are first looked for in the account's list.
        """
        to_create: list[int] = []
        lost: list[int] = []
        for item in items:
            entry = ledger.entry(item.position)
            if entry is None or entry.get("fp") != item.fingerprint[:16]:
                entry = ledger.claim(item.position, item.fingerprint[:16]) or entry
            if entry is None:
                to_create.append(item.position)
            elif entry.get("fp") != item.fingerprint[:16]:
                self.log.warning(
                    "Image %d changed since its edit was started; editing it afresh", item.position
                )
                to_create.append(item.position)
            elif entry.get("s") == CREATING:
                lost.append(item.position)
            elif entry.get("s") in (CREATED, SUCCEEDED):
                continue
            elif entry.get("s") not in FINAL_FAILURES or self.retry_failed_predictions:
                to_create.append(item.position)
        if ledger.recorded_size not in (None, len(items)):
            self.log.warning(
                "input_images changed since an earlier try (%d images then, %d now): the edits already "
                "made are matched to the images by content",
                ledger.recorded_size,
                len(items),
            )
            ledger.rewrite()
        ledger.flush()
        to_create += redo_canceled(self, ledger, self.log)
        if lost:
            to_create += adopt_orphans(self, ledger, items, lost, self.log, seed_from)
        done = len(items) - len(to_create)
        if done:
            self.log.info("Batch: %d of %d images already started by an earlier try", done, len(items))
        return sorted(to_create)

    def _pending(self, ledger: BatchLedger) -> dict[str, float]:
        """Return the predictions still to wait for, with each one's deadline (Unix time)."""
        timeout = self._timeout_seconds()
        return {
            prediction_id: float((ledger.entry(index) or {}).get("t", time.time())) + timeout
            for prediction_id, index in ledger.waiting().items()
        }

    def _finish(
        self,
        context: Context,
        items: list[BatchItem],
        ledger: BatchLedger,
        finals: dict[str, dict[str, Any]],
        status: str,
        message: str | None,
    ) -> list[list[str]]:
        """Record every outcome, save the outputs, return the task's result (or fail naming the images)."""
        finisher = BatchFinisher(self, ledger, log=self.log, try_number=_try_number(context))
        finisher.settle(items, self._pending(ledger), finals, message)
        try:
            return finisher.conclude(context, items, abort=self._abort, create_errors=self._create_errors)
        finally:
            self._finished = True


def _try_number(context: Context) -> int:
    """Return this try's number (``0`` where the task instance gives none)."""
    number = getattr(context["ti"], "try_number", None)
    return number if isinstance(number, int) else 0
