"""``FluxKontextEditOperator``: one FLUX.1 Kontext image edit as an Airflow task.

The class reads as the edit's story: ``execute`` (check, find or start, wait here or defer),
``execute_complete`` (the result, :mod:`airflow_provider_kontext.edits.results`), then its steps.
``FluxKontextBatchEditOperator`` (:mod:`.batch`) is importable from here too, loaded on first use.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_provider_kontext.compat import AirflowFailException
from airflow_provider_kontext.edits.deadlines import create_deadline, deadline_after_create
from airflow_provider_kontext.edits.events import PredictionEvent, given_seed, prediction_event
from airflow_provider_kontext.edits.progress import PredictionPoller
from airflow_provider_kontext.edits.reattach import STATE_KEY, ReattachLedger
from airflow_provider_kontext.edits.request import (
    EditRequest,
    check_literal_inputs,
    fail_task_on_final_answers,
    seed_key,
    validated_request,
)
from airflow_provider_kontext.edits.results import PredictionResultMixin
from airflow_provider_kontext.exceptions import (
    FluxKontextAPIError,
    FluxKontextError,
    FluxKontextInputError,
    FluxKontextPredictionFailedNoRetry,
    FluxKontextPredictionMayExistError,
)
from airflow_provider_kontext.hooks.connection import DEFAULT_CONN_ID
from airflow_provider_kontext.hooks.retry import refused_create
from airflow_provider_kontext.links.kontext import WEB_URL_XCOM_KEY, FluxKontextPredictionLink
from airflow_provider_kontext.models import DEFAULT_MODEL, Prediction
from airflow_provider_kontext.models.arguments import check_number
from airflow_provider_kontext.models.images import LocalImage, to_data_uri, trace_image
from airflow_provider_kontext.operators.arguments import MODEL_INPUTS, EditArguments
from airflow_provider_kontext.operators.reattach import earlier_prediction, retry_ledger

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_kontext.operators.batch import FluxKontextBatchEditOperator

__all__ = ["FluxKontextBatchEditOperator", "FluxKontextEditOperator", "FluxKontextPredictionFailedNoRetry"]

#: The model inputs the operator takes as arguments (any other goes in ``extra_input``).
MODEL_ARGUMENTS = ("prompt", *MODEL_INPUTS)
#: What a mapped edit shows in the UI instead of its map index: the input's file name. Airflow renders
#: it with the templated fields rendered, before ``execute`` (shown while deferred) and again after.
DEFAULT_MAP_INDEX_TEMPLATE = "{{ task.input_label }}"


def __getattr__(name: str) -> Any:
    """Load the batch operator on first use: a DAG of single edits does not pay for its import."""
    if name == "FluxKontextBatchEditOperator":
        from airflow_provider_kontext.operators.batch import FluxKontextBatchEditOperator

        return FluxKontextBatchEditOperator
    if name == "KontextPredictionFailedNoRetry":  # its name before 0.2
        return FluxKontextPredictionFailedNoRetry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class FluxKontextEditOperator(EditArguments, PredictionResultMixin, BaseOperator):
    """Edit one image with FLUX.1 Kontext and hand the result to downstream tasks.

    Checks the inputs before any HTTP call (a bad one fails the task without retries, naming the
    field), creates the prediction, records it for a retry, and waits in the triggerer
    (``deferrable``) or the worker. Returns the output URLs, or their copies' paths under
    ``output_path``; pushes ``prediction_id`` and ``prediction_web_url`` after the create and the
    ``prediction`` summary at the end. A failed, canceled or timed-out prediction fails the task; an
    answer the same request would get again (401, 403, 404, 422) fails it without retries.

    :param prompt: the edit instruction (templated).
    :param input_image: the image (templated): an http(s) URL or ``data:`` URI, or a local path,
        ``file://`` URL, ``ObjectStoragePath`` or bytes (jpeg, png, gif, webp; sent inline or uploaded).
    :param aspect_ratio: a model input, as are ``num_inference_steps``, ``guidance``, ``seed``,
        ``output_format``, ``output_quality``, ``disable_safety_checker`` and ``go_fast`` (see
        :class:`~airflow_provider_kontext.models.FluxKontextDevInput`); unset: the model's default.
    :param extra_input: further inputs for other Kontext models (e.g. ``safety_tolerance``).
    :param model: ``owner/name`` or ``owner/name:version`` (default: FLUX.1 Kontext [dev]).
    :param flux_kontext_conn_id: the connection (type ``fluxkontext``).
    :param hook_params: hook settings overriding the connection's extras (``timeout``,
        ``max_retries``, ...), passed on to the trigger.
    :param deferrable: wait in the triggerer; default: ``[operators] default_deferrable``.
    :param poll_interval: seconds between status polls.
    :param wait_seconds: hold the create open up to this many seconds (1..60); a prediction finished
        by then completes without deferring.
    :param min_defer_seconds: resume a deferred task no sooner than this (default: Airflow's
        ``[workers] min_heartbeat_interval`` + 10; ``0``: at once).
    :param timeout: how long the prediction may take (seconds or timedelta; default: from
        ``execution_timeout``, else 30 minutes); also sent as Replicate's ``Cancel-After``.
    :param reattach_on_retry: let a retry reattach to the prediction an earlier try started.
    :param retry_uncertain_create: let Airflow retry a create that may have started a prediction.
    :param retry_failed_predictions: let Airflow retry a failed or canceled prediction (paid again).
    :param cancel_on_kill: cancel the prediction when the task is killed.
    :param output_path: a folder (templated) to save the outputs to; the task returns their paths.
    :param max_output_bytes: the largest output file accepted.
    :param inline_image_max_bytes: local images up to this size are sent inline as data: URIs.
    :param map_index_template: default: a mapped edit shows its input's file name in the UI.
    """

    template_fields: Sequence[str] = (
        "input_image",
        "model",
        *MODEL_ARGUMENTS,
        "extra_input",
        "output_path",
    )
    template_fields_renderers = {"extra_input": "json", "prompt": "py"}
    operator_extra_links = (FluxKontextPredictionLink(),)
    ui_color = "#e4dcf7"

    #: Key of the prediction id in the task state store (survives retries; XComs do not).
    STATE_KEY = STATE_KEY

    def __init__(
        self,
        *,
        prompt: str,
        input_image: Any = None,
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
        wait_seconds: int | None = None,
        min_defer_seconds: float | None = None,
        timeout: float | timedelta | None = None,
        reattach_on_retry: bool = True,
        retry_uncertain_create: bool = False,
        retry_failed_predictions: bool = False,
        cancel_on_kill: bool = True,
        output_path: Any = None,
        max_output_bytes: int = 50 * 1024 * 1024,
        inline_image_max_bytes: int = 256 * 1024,
        map_index_template: str | None = DEFAULT_MAP_INDEX_TEMPLATE,
        **kwargs: Any,
    ) -> None:
        # A default in the signature (not in the body): ``.partial()`` reads operator defaults from it.
        super().__init__(map_index_template=map_index_template, **kwargs)
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
        self.prompt = prompt
        self.input_image = input_image
        self.wait_seconds = (
            None
            if wait_seconds is None
            else int(check_number("wait_seconds", wait_seconds, 1, 60, integer=True))
        )
        self.reattach_on_retry = reattach_on_retry
        self.retry_uncertain_create = retry_uncertain_create
        self.retry_failed_predictions = retry_failed_predictions
        self.cancel_on_kill = cancel_on_kill
        self._prediction_id: str | None = None
        self._finished = False
        check_literal_inputs(self.task_id, model, self._model_arguments(), input_image, extra_input)

    @property
    def input_label(self) -> str:
        """Return what a mapped edit shows in the UI: the input's file name, else what the input is."""
        where, name = trace_image(self.input_image)
        if name:
            return name
        if isinstance(self.input_image, bytes | bytearray):
            return f"{len(self.input_image)} bytes"
        return where or "no input image"

    def _model_arguments(self) -> dict[str, Any]:
        return {"prompt": self.prompt, **super()._model_arguments()}

    def _edit_trace(self, event: PredictionEvent) -> dict[str, Any]:
        where, name = trace_image(self.input_image)
        trace = {"input_image": where, "input_name": name, "prompt": self.prompt, "model": self.model}
        # The seed asked for, where the answers said none (its input deleted, no log line read).
        return trace if event.seed is not None else {**trace, "seed": given_seed(self.seed)}

    # --- the story: execute, defer, complete --------------------------------------------------------

    def execute(self, context: Context) -> list[str]:
        """Check the inputs, find or start the prediction, and wait for it (deferred or here)."""
        request = self._checked_request(seed_key(context))
        ledger = retry_ledger(context, enabled=self.reattach_on_retry, log=self.log)
        found = self._earlier_prediction(context, ledger, request) if self.reattach_on_retry else None
        prediction, deadline = found or self._start(request, ledger)
        self._prediction_id = prediction.id
        self._push_ids(context, prediction)
        if prediction.is_terminal or prediction.id is None:
            return self._complete(context, prediction_event(prediction, self.hook.redact))
        if self.deferrable:
            self._defer(prediction, deadline)
        return self._complete(context, self._poll_in_worker(prediction, deadline))

    def _defer(self, prediction: Prediction, deadline: float) -> None:
        """Hand the wait to the triggerer; Airflow resumes the task in :meth:`execute_complete`."""
        from airflow_provider_kontext.triggers.kontext import FluxKontextPredictionTrigger

        trigger = FluxKontextPredictionTrigger(
            prediction_id=str(prediction.id),  # id-less predictions are completed at once
            flux_kontext_conn_id=self.flux_kontext_conn_id,
            poll_interval=self.poll_interval,
            end_time=deadline,
            cancel_on_kill=self.cancel_on_kill,
            hook_params=self.hook_params,
            # Bounds the shared list's window only; the deadline stays on our own clock.
            created_at=prediction.created_at.isoformat() if prediction.created_at else None,
            # This worker's settings decide how late its deferral's exit can be recorded.
            deferred_at=time.time(),
            min_defer_seconds=self._resume_floor(),
        )
        self._announce_wait(prediction, deadline, "in the triggerer", trigger.poll_policy)
        self.defer(trigger=trigger, method_name="execute_complete", timeout=self._defer_backstop(deadline))

    def execute_complete(self, context: Context, event: Mapping[str, Any]) -> list[str]:
        """Resume after the trigger fired: turn its event into the task's result or failure."""
        finished = PredictionEvent.from_payload(event)
        self._prediction_id = finished.prediction_id
        return self._complete(context, finished)

    def on_kill(self) -> None:
        """Cancel the prediction a killed task waited for in the worker (deferred: the trigger does)."""
        if self.cancel_on_kill and self._prediction_id and not self._finished:
            self._cancel(self._prediction_id, "the task was killed")

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """Return the edit's lineage: input and outputs as datasets, the prediction as a run facet."""
        from airflow_provider_kontext.edits.lineage import edit_lineage

        return edit_lineage(self.input_image, self._summary)

    # --- steps ------------------------------------------------------------------------------------

    def _checked_request(self, seed_from: str) -> EditRequest:
        """Return the rendered inputs validated, the local image read, without any HTTP call.

        :raises AirflowFailException: a bad input, naming the field (no retry would mend it).
        """
        given = (self.model, self._model_arguments(), self.input_image, self.extra_input, self.output_path)
        try:
            return validated_request(*given, seed_from=seed_from)
        except FluxKontextInputError as exc:
            raise AirflowFailException(str(exc)) from exc

    def _earlier_prediction(
        self, context: Context, ledger: ReattachLedger, request: EditRequest
    ) -> tuple[Prediction, float] | None:
        """Return the prediction an earlier try started and its deadline, if a retry may wait for it."""
        return earlier_prediction(
            context,
            ledger,
            request,
            hook=self.hook,
            model=self.model,
            timeout=self._timeout_seconds(),
            retries=self.retries or 0,
            inline_image_max_bytes=self.inline_image_max_bytes,
            log=self.log,
        )

    def _start(self, request: EditRequest, ledger: ReattachLedger) -> tuple[Prediction, float]:
        """Send the local image if any, create the prediction and record it for a retry.

        :raises AirflowFailException: an answer the same request would get again, or a create that
            may have started a prediction (unless ``retry_uncertain_create``).
        """
        started = time.time()
        model_input = dict(request.model_input)
        if request.image is not None:
            with fail_task_on_final_answers("upload"):
                model_input["input_image"] = self._send_image(request.image)
        timeout = self._timeout_seconds()
        sent = time.time()
        # Before the request: a try that dies before recording the id leaves its retry a trace.
        ledger.begin_create(request.fingerprint, sent)
        try:
            with fail_task_on_final_answers("create"):
                try:
                    prediction = self.hook.create_prediction(
                        self.model,
                        model_input,
                        wait=self.wait_seconds,
                        cancel_after=timeout,
                        deadline=create_deadline(started, timeout, self.execution_timeout),
                    )
                except FluxKontextAPIError as exc:
                    if refused_create(exc):  # nothing was created: nothing for a retry to search for
                        ledger.drop()
                    raise
        except FluxKontextPredictionMayExistError as exc:
            if self.retry_uncertain_create:
                raise
            raise AirflowFailException(
                f"{exc} Not retried automatically (retry_uncertain_create=False)."
            ) from exc
        deadline = deadline_after_create(
            prediction, timeout, sent=sent, returned=time.time(), warn=self.log.warning
        )
        # Record the id before anything else, to keep the window in which a crash orphans it small.
        if prediction.id:
            ledger.record(prediction.id, request.fingerprint, deadline)
        else:
            ledger.drop()
        self.log.info(
            "Created prediction %s (%s)%s",
            prediction.id,
            prediction.status.value,
            f": {prediction.web_url}" if prediction.web_url else "",
        )
        return prediction, deadline

    def _send_image(self, image: LocalImage) -> str:
        """Return the local image as the model input takes it: a data: URI, or an uploaded file's URL."""
        if len(image.data) <= self.inline_image_max_bytes:
            return to_data_uri(image.data, image.content_type)
        uploaded = self.hook.upload_file(image.data, filename=image.name, content_type=image.content_type)
        self.log.info("Uploaded %s (%d bytes) as file %s", image.name, len(image.data), uploaded.id)
        return uploaded.urls.get

    def _push_ids(self, context: Context, prediction: Prediction) -> None:
        ti = context["ti"]
        ti.xcom_push(key="prediction_id", value=prediction.id)
        ti.xcom_push(key=WEB_URL_XCOM_KEY, value=prediction.web_url)
        self.prediction_web_url = prediction.web_url

    def _poll_in_worker(self, prediction: Prediction, end_time: float) -> PredictionEvent:
        """Poll the prediction from the worker until it ends or ``end_time`` passes; return its event."""
        prediction_id = str(prediction.id)
        poller = PredictionPoller(
            prediction_id,
            poll_interval=self.poll_interval,
            end_time=end_time,
            log=self.log.info,
            redact=self.hook.redact,
        )
        self._announce_wait(prediction, end_time, "in the worker", poller.policy)
        while True:
            try:
                event = poller.on_prediction(
                    self.hook.get_prediction(prediction_id, retry_limits=poller.retry_limits)
                )
            except FluxKontextError as exc:
                event = poller.on_error(exc)
            if event is not None:
                return event
            time.sleep(poller.delay())

    def _announce_wait(self, prediction: Prediction, deadline: float, where: str, policy: str) -> None:
        """Log what the task now waits for, where, how it polls and until when.

        The prediction's web URL ends the line: a log viewer that turns URLs into links takes every
        character up to the next space, so nothing may follow it.
        """
        self.log.info(
            "Waiting %s for prediction %s (%s); poll policy %s, interval %gs; deadline %s (in %s)%s",
            where,
            prediction.id,
            prediction.status.value,
            policy,
            self.poll_interval,
            datetime.fromtimestamp(deadline, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            timedelta(seconds=round(max(0.0, deadline - time.time()))),
            f" at {prediction.web_url}" if prediction.web_url else "",
        )
