"""``FluxKontextEditOperator``: one FLUX.1 Kontext image edit as an Airflow task."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_provider_kontext.compat import AirflowFailException
from airflow_provider_kontext.edits.deadlines import create_deadline, deadline_after_create, wait_timeout
from airflow_provider_kontext.edits.events import PredictionEvent, given_seed, prediction_event
from airflow_provider_kontext.edits.orphans import search_since, search_with_hook, wanted_for
from airflow_provider_kontext.edits.progress import PredictionPoller
from airflow_provider_kontext.edits.reattach import STATE_KEY, ReattachLedger, usable
from airflow_provider_kontext.edits.request import (
    EditRequest,
    check_literal_inputs,
    fail_task_on_final_answers,
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
from airflow_provider_kontext.hooks.connection import DEFAULT_CONN_ID, checked_overrides
from airflow_provider_kontext.links.kontext import WEB_URL_XCOM_KEY, FluxKontextPredictionLink
from airflow_provider_kontext.models import (
    DEFAULT_MODEL,
    Prediction,
)
from airflow_provider_kontext.models.arguments import check_number, default_deferrable
from airflow_provider_kontext.models.images import LocalImage, to_data_uri, trace_image

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_kontext.hooks.kontext import FluxKontextHook

__all__ = [
    "FluxKontextBatchEditOperator",
    "FluxKontextEditOperator",
    "FluxKontextPredictionFailedNoRetry",
]


#: The model inputs the operator takes as arguments (any other goes in ``extra_input``).
MODEL_ARGUMENTS = (
    "prompt",
    "aspect_ratio",
    "num_inference_steps",
    "guidance",
    "seed",
    "output_format",
    "output_quality",
    "disable_safety_checker",
    "go_fast",
)
#: The longest ``timeout`` and ``poll_interval`` accepted (a week): beyond any prediction's life, and
#: far inside what ``timedelta`` and the trigger's deadline arithmetic can hold.
MAX_WAIT = timedelta(days=7)
#: What a mapped edit shows in the UI instead of its map index (the input's file name), unless the
#: DAG sets its own ``map_index_template``. Airflow renders it with the templated fields already
#: rendered, before ``execute`` (so it shows while the task is deferred) and again after.
DEFAULT_MAP_INDEX_TEMPLATE = "{{ task.input_label }}"


class FluxKontextEditOperator(PredictionResultMixin, BaseOperator):
    """Edit one image with FLUX.1 Kontext and hand the result to downstream tasks.

    The inputs are validated against the model's schema after templating and before any HTTP call;
    a bad value fails the task at once (no retries) with a message naming the field and what is
    allowed. Then the prediction is created, its id stored where a retry of this task instance finds
    it (Airflow >= 3.3's task state store), and the task waits: by default deferred to the triggerer,
    which frees the worker slot while the model runs.

    The return value (XCom ``return_value``) is the list of output URLs, or of durable paths when
    ``output_path`` is set. XCom ``prediction_id`` and ``prediction_web_url`` are pushed right after the
    create; ``prediction`` (a summary: id, status, model, predict time, times, web URL, when the
    URLs expire, and what made the outputs: input image, its name, prompt) at the end. Outputs saved
    under ``output_path`` are named ``<input>-<prediction id>.<ext>``. A ``failed``, ``canceled`` or
    ``aborted`` prediction fails the task with the model's error and the tail of its logs; a
    prediction that outlives the timeout is canceled and fails the task. A create or upload answered
    401, 403, 404 or 422 fails the task without retries (the same request would get the same answer).

    :param prompt: the edit instruction (templated).
    :param input_image: the image to edit (templated): an http(s) URL or ``data:`` URI is passed on;
        a local path, ``file://`` URL, ``ObjectStoragePath`` or bytes is read, checked to be a jpeg,
        png, gif or webp, and sent as a data: URI when small or uploaded with the Files API.
    :param aspect_ratio: see :class:`~airflow_provider_kontext.models.FluxKontextDevInput` (as are
        ``num_inference_steps``, ``guidance``, ``seed``, ``output_format``, ``output_quality``,
        ``disable_safety_checker`` and ``go_fast``); unset ones take the model's defaults.
    :param extra_input: further inputs for other Kontext models (e.g. ``safety_tolerance`` on pro).
    :param model: ``owner/name`` or ``owner/name:version`` (default: FLUX.1 Kontext [dev]).
    :param flux_kontext_conn_id: the connection (type ``fluxkontext``).
    :param hook_params: settings of the hook that override the connection's extras for this task
        (``timeout``, ``connect_timeout``, ``max_retries``, ``backoff_base``, ``backoff_max``,
        ``retry_after_max``), passed on to the trigger too; checked when the DAG is parsed.
    :param deferrable: wait in the triggerer rather than in the worker; default: Airflow's
        ``[operators] default_deferrable`` setting.
    :param poll_interval: seconds between status polls.
    :param wait_seconds: hold the create request open up to this many seconds (1..60); a prediction
        finished by then completes without deferring.
    :param min_defer_seconds: a deferred task resumes no sooner than this many seconds after it
        deferred (a prediction that ends sooner is held in the triggerer), because Airflow 3.1-3.3
        can fail a task that resumes before the scheduler has seen its deferring try exit. Default:
        ``[workers] min_heartbeat_interval`` + 10; ``0`` resumes at once.
    :param timeout: how long the prediction may take (seconds or timedelta). Default: the task's
        ``execution_timeout`` less a margin, else 30 minutes. Also sent as Replicate's
        ``Cancel-After``, so the remote side stops it even when Airflow cannot.
    :param reattach_on_retry: on a retry, reattach to the prediction the earlier try started when it
        is still running or succeeded, instead of paying for a new one; one the try did not live to
        record is searched for in the account's list (:mod:`airflow_provider_kontext.edits.orphans`).
    :param retry_uncertain_create: when a create fails in a way that leaves open whether a prediction
        was started, let Airflow retry the task (may pay twice) instead of failing it for a human.
    :param retry_failed_predictions: let Airflow retry the task (a new, billed prediction) when the
        model fails the prediction or it is canceled; by default such a task fails without retrying.
        ``aborted`` predictions (never started, not billed) are always retryable.
    :param cancel_on_kill: cancel the prediction when the task is killed.
    :param output_path: a folder (string URL/path or ``ObjectStoragePath``, templated) to download the
        outputs to before Replicate deletes them; the task then returns those paths.
    :param max_output_bytes: the largest output file accepted.
    :param outlets: as for any operator; each ``Asset`` among them gets an event whose ``extra`` holds
        the prediction id, the outputs (paths or URLs), the input image, the prompt and the model.
    :param inline_image_max_bytes: local images up to this size are sent inline as data: URIs.
    :param map_index_template: as for any operator; by default a mapped edit shows its input's file
        name (``task.input_label``) in the UI instead of its index.

    Literal model inputs (not templates, not XCom references) are also checked when the DAG file is
    parsed, so a bad one is a DAG import error naming the task, the field and what is allowed.
    ``.partial()`` arguments are checked when the mapped task runs.
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
        if not isinstance(flux_kontext_conn_id, str) or not flux_kontext_conn_id:
            raise ValueError(f"flux_kontext_conn_id must be a non-empty string, got {flux_kontext_conn_id!r}")
        self.prompt = prompt
        self.input_image = input_image
        self.aspect_ratio = aspect_ratio
        self.num_inference_steps = num_inference_steps
        self.guidance = guidance
        self.seed = seed
        self.output_format = output_format
        self.output_quality = output_quality
        self.disable_safety_checker = disable_safety_checker
        self.go_fast = go_fast
        self.extra_input = extra_input
        self.model = model
        self.flux_kontext_conn_id = flux_kontext_conn_id
        self.hook_params = checked_overrides(hook_params or {})
        self.deferrable = default_deferrable() if deferrable is None else deferrable
        self.poll_interval = check_number("poll_interval", poll_interval, maximum=MAX_WAIT.total_seconds())
        self.wait_seconds = (
            None
            if wait_seconds is None
            else int(check_number("wait_seconds", wait_seconds, 1, 60, integer=True))
        )
        self.min_defer_seconds = (
            None
            if min_defer_seconds is None
            else check_number("min_defer_seconds", min_defer_seconds, 0, 600)
        )
        if timeout is not None:
            check_number(
                "timeout",
                timeout.total_seconds() if isinstance(timeout, timedelta) else timeout,
                maximum=MAX_WAIT.total_seconds(),
            )
        self.timeout = timeout
        self.reattach_on_retry = reattach_on_retry
        self.retry_uncertain_create = retry_uncertain_create
        self.retry_failed_predictions = retry_failed_predictions
        self.cancel_on_kill = cancel_on_kill
        self.output_path = output_path
        self.max_output_bytes = int(check_number("max_output_bytes", max_output_bytes, 1, integer=True))
        self.inline_image_max_bytes = int(
            check_number("inline_image_max_bytes", inline_image_max_bytes, 0, integer=True)
        )
        self._prediction_id: str | None = None
        self._finished = False
        self._check_literal_inputs()

    @cached_property
    def hook(self) -> FluxKontextHook:
        from airflow_provider_kontext.hooks.kontext import FluxKontextHook

        return FluxKontextHook(self.flux_kontext_conn_id, **self.hook_params)

    @property
    def input_label(self) -> str:
        """The input image's file name (``mug.png``), or what the input is when it has none; what a
        mapped edit shows in the UI (see :data:`DEFAULT_MAP_INDEX_TEMPLATE`)."""
        where, name = trace_image(self.input_image)
        if name:
            return name
        if isinstance(self.input_image, bytes | bytearray):
            return f"{len(self.input_image)} bytes"
        return where or "no input image"

    def _edit_trace(self, event: PredictionEvent) -> dict[str, Any]:
        where, name = trace_image(self.input_image)
        trace = {"input_image": where, "input_name": name, "prompt": self.prompt, "model": self.model}
        # The seed asked for, where the answers said none (its input deleted, no log line read).
        return trace if event.seed is not None else {**trace, "seed": given_seed(self.seed)}

    def _check_literal_inputs(self) -> None:
        """Validate the model inputs given as literals, when the DAG is parsed (no I/O, no HTTP).

        :raises FluxKontextInputError: naming the task, the field and what is allowed (an import error).
        """
        check_literal_inputs(
            self.task_id, self.model, self._model_arguments(), self.input_image, self.extra_input
        )

    def _model_arguments(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in MODEL_ARGUMENTS}

    # --- the story: execute, defer, complete --------------------------------------------------------

    def execute(self, context: Context) -> list[str]:
        try:
            request = self._validated_request()
        except FluxKontextInputError as exc:
            raise AirflowFailException(str(exc)) from exc
        ledger = ReattachLedger.from_context(context, enabled=self.reattach_on_retry)
        if self.reattach_on_retry and not ledger.enabled:
            self.log.warning(
                "No task state store (Airflow < 3.3): a retry finds an earlier try's prediction "
                "only by searching the account's predictions"
            )

        found = self._reattach(ledger, request) or self._adopt(context, ledger, request)
        prediction, deadline = found or self._start(request, ledger)
        self._prediction_id = prediction.id
        self._push_ids(context, prediction)
        if prediction.is_terminal or prediction.id is None:
            return self._complete(context, prediction_event(prediction, self.hook.redact))
        if self.deferrable:
            self._defer(prediction, deadline)
        return self._complete(context, self._poll_in_worker(prediction, deadline))

    def execute_complete(self, context: Context, event: Mapping[str, Any]) -> list[str]:
        """Resume after the trigger fired: turn its event into the task's result or failure."""
        finished = PredictionEvent.from_payload(event)
        self._prediction_id = finished.prediction_id
        return self._complete(context, finished)

    def on_kill(self) -> None:
        """Cancel the prediction this task is waiting for (in-worker waits; the trigger handles
        killed deferred tasks)."""
        if self.cancel_on_kill and self._prediction_id and not self._finished:
            self._cancel(self._prediction_id, "the task was killed")

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """The edit's lineage for the OpenLineage provider: the input image and the outputs as
        datasets, the prediction (model, id, predict time) as a run facet; ``None`` without the
        provider. See :mod:`airflow_provider_kontext.edits.lineage`."""
        from airflow_provider_kontext.edits.lineage import edit_lineage

        return edit_lineage(self.input_image, self._summary)

    # --- steps ------------------------------------------------------------------------------------

    def _validated_request(self) -> EditRequest:
        """Validate the inputs without any HTTP call. :raises FluxKontextInputError: naming the field."""
        return validated_request(
            self.model, self._model_arguments(), self.input_image, self.extra_input, self.output_path
        )

    def _timeout_seconds(self) -> float:
        return wait_timeout(self.timeout, self.execution_timeout)

    def _reattach(self, ledger: ReattachLedger, request: EditRequest) -> tuple[Prediction, float] | None:
        """The earlier try's prediction and deadline if it is still running or succeeded with its
        output, else ``None`` (then a new one is created)."""
        return ledger.reattach(
            self.hook.get_prediction, request.fingerprint, self._timeout_seconds(), self.log
        )

    def _adopt(
        self, context: Context, ledger: ReattachLedger, request: EditRequest
    ) -> tuple[Prediction, float] | None:
        """The prediction an earlier try created but did not record, found in the account's list
        (:mod:`airflow_provider_kontext.edits.orphans`), if exactly one matches and it is usable."""
        if not self.reattach_on_retry:
            return None
        since = search_since(ledger, context, request.fingerprint, self.retries or 0, self.log)
        if since is None:
            return None
        wanted = wanted_for(self.model, request.model_input, request.image, self.inline_image_max_bytes)
        prediction = search_with_hook(self.hook, wanted, since, self.log)
        if prediction is None or not usable(prediction, "created by an earlier try", self.log):
            return None
        # As the lost try's deadline was: from the create (not from a search window's start).
        deadline = (prediction.created_at or since).timestamp() + self._timeout_seconds()
        if prediction.id:
            ledger.record(prediction.id, request.fingerprint, deadline)
        return prediction, deadline

    def _start(self, request: EditRequest, ledger: ReattachLedger) -> tuple[Prediction, float]:
        """Send the local image if any, create the prediction and record it for a retry."""
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
                    if _refused(exc):  # nothing was created: nothing for a retry to search for
                        ledger.drop()
                    raise
        except FluxKontextPredictionMayExistError as exc:
            if self.retry_uncertain_create:
                raise
            raise AirflowFailException(
                f"{exc} Not retried automatically (retry_uncertain_create=False)."
            ) from exc
        returned = time.time()
        deadline = deadline_after_create(
            prediction, timeout, sent=sent, returned=returned, warn=self.log.warning
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
        if len(image.data) <= self.inline_image_max_bytes:
            return to_data_uri(image.data, image.content_type)
        uploaded = self.hook.upload_file(image.data, filename=image.name, content_type=image.content_type)
        self.log.info("Uploaded %s (%d bytes) as file %s", image.name, len(image.data), uploaded.id)
        return uploaded.urls.get

    def _push_ids(self, context: Context, prediction: Prediction) -> None:
        ti = context["ti"]
        ti.xcom_push(key="prediction_id", value=prediction.id)
        ti.xcom_push(key=WEB_URL_XCOM_KEY, value=prediction.web_url)

    def _announce_wait(self, prediction: Prediction, deadline: float, where: str, policy: str) -> None:
        """The line that says what the task now waits for, where, how it polls and until when.

        The prediction's web URL ends the line: a log viewer that turns URLs into links takes every
        character up to the next space, so nothing may follow it."""
        remaining = max(0.0, deadline - time.time())
        self.log.info(
            "Waiting %s for prediction %s (%s); poll policy %s, interval %gs; deadline %s (in %s)%s",
            where,
            prediction.id,
            prediction.status.value,
            policy,
            self.poll_interval,
            datetime.fromtimestamp(deadline, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            timedelta(seconds=round(remaining)),
            f" at {prediction.web_url}" if prediction.web_url else "",
        )

    def _defer(self, prediction: Prediction, deadline: float) -> None:
        from airflow_provider_kontext.triggers.kontext import (
            FluxKontextPredictionTrigger,
            default_min_defer_seconds,
        )

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
            min_defer_seconds=(
                default_min_defer_seconds() if self.min_defer_seconds is None else self.min_defer_seconds
            ),
        )
        self._announce_wait(prediction, deadline, "in the triggerer", trigger.poll_policy)
        self.defer(
            trigger=trigger,
            method_name="execute_complete",
            # A backstop only: the trigger's own deadline fires first and cancels remotely.
            timeout=timedelta(seconds=max(0.0, deadline - time.time()) + 10 * self.poll_interval + 60),
        )

    def _poll_in_worker(self, prediction: Prediction, end_time: float) -> PredictionEvent:
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


def _refused(error: FluxKontextAPIError) -> bool:
    """Whether a create's error is a client error the server answered (it created nothing)."""
    status = error.status
    return (
        not isinstance(error, FluxKontextPredictionMayExistError)
        and status is not None
        and 400 <= status < 500
    )


# The batch form lives in its own module; importable from here beside the single edit.
from airflow_provider_kontext.operators.batch import FluxKontextBatchEditOperator  # noqa: E402
