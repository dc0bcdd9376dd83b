"""``FluxKontextPredictionSensor``: wait for a prediction started elsewhere and hand on its result."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from airflow_provider_kontext.compat import AirflowFailException, AirflowSensorTimeout, AirflowSkipException
from airflow_provider_kontext.edits.events import PredictionEvent, seed_of
from airflow_provider_kontext.edits.progress import PredictionPoller
from airflow_provider_kontext.edits.results import PredictionResultMixin
from airflow_provider_kontext.exceptions import FluxKontextError
from airflow_provider_kontext.hooks.connection import DEFAULT_CONN_ID
from airflow_provider_kontext.links.kontext import WEB_URL_XCOM_KEY, FluxKontextPredictionLink
from airflow_provider_kontext.models import Prediction
from airflow_provider_kontext.models.arguments import check_number
from airflow_provider_kontext.operators.arguments import ConnectionArguments

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = ["FluxKontextPredictionSensor"]


class FluxKontextPredictionSensor(ConnectionArguments, PredictionResultMixin, BaseSensorOperator):
    """Wait for a FLUX.1 Kontext prediction started elsewhere, then hand on its outputs.

    For a prediction another task or system started (its id from a template such as
    ``"{{ ti.xcom_pull(task_ids='start', key='prediction_id') }}"``). Polls once, then waits in the
    triggerer (``deferrable``) or pokes from the worker. Ends as the operator does
    (:mod:`airflow_provider_kontext.edits.results`): returns the output URLs or saved paths, pushes
    ``prediction`` and ``prediction_web_url``; a failed or canceled prediction, or an unusable paid
    output, fails the task without retries. Past ``timeout`` the task fails with
    ``AirflowSensorTimeout`` (skipped with ``soft_fail``); the prediction is never canceled for it.

    :param prediction_id: the prediction to wait for (templated).
    :param flux_kontext_conn_id: the connection (type ``fluxkontext``) of the account that owns it.
    :param hook_params: settings of the hook overriding the connection's extras (``timeout``,
        ``max_retries``, ...), as for the operator; checked when the DAG is parsed.
    :param deferrable: wait in the triggerer; default: ``[operators] default_deferrable``.
    :param poke_interval: seconds (or timedelta) between polls; in the triggerer, as the operator's
        ``poll_interval``.
    :param timeout: the longest wait (seconds or timedelta; default ``[sensors] default_timeout``).
    :param cancel_on_kill: cancel the prediction when this task is killed. Off by default: the
        sensor watches a prediction someone else started and may not be the only one waiting for it.
    :param output_path: a folder (templated) to download the outputs to before Replicate deletes
        them; the task then returns those paths.
    :param max_output_bytes: the largest output file accepted.
    :param retry_failed_predictions: let a failed or canceled prediction fail the task with retries
        (a retry waits for the same prediction again, so this rarely helps).
    """

    template_fields: Sequence[str] = ("prediction_id", "output_path")
    operator_extra_links = (FluxKontextPredictionLink(),)
    ui_color = "#e4dcf7"
    #: It waits for a prediction it did not start: a retry would find the same one.
    retry_starts_anew = False

    def __init__(
        self,
        *,
        prediction_id: str,
        flux_kontext_conn_id: str = DEFAULT_CONN_ID,
        hook_params: dict[str, Any] | None = None,
        deferrable: bool | None = None,
        poke_interval: float | timedelta = 2.0,
        cancel_on_kill: bool = False,
        output_path: Any = None,
        max_output_bytes: int = 50 * 1024 * 1024,
        retry_failed_predictions: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(poke_interval=poke_interval, **kwargs)
        self._take_connection(flux_kontext_conn_id, hook_params, deferrable)
        check_number("poke_interval", self.poke_interval)
        self.prediction_id = prediction_id
        self.cancel_on_kill = cancel_on_kill
        self.output_path = output_path
        self.max_output_bytes = int(check_number("max_output_bytes", max_output_bytes, 1, integer=True))
        self.retry_failed_predictions = retry_failed_predictions
        #: The sensor records no state for retries: the prediction's id is given, not started here.
        self.reattach_on_retry = False
        self._finished = False
        self._poller: PredictionPoller | None = None
        self._input_location: str | None = None
        #: The prediction's ``created_at`` from the first poll: where the shared watcher's window starts.
        self._created_at: str | None = None

    # --- the story: first poll, defer or poke, complete --------------------------------------------

    def execute(self, context: Context) -> Any:
        """Poll once, then defer (or poke from the worker when not ``deferrable``)."""
        self._checked_id()
        if not self.deferrable:
            return super().execute(context)
        try:
            done = self.poke(context)
        except (AirflowSensorTimeout, AirflowFailException) as exc:
            # What BaseSensorOperator.execute does around its pokes, for this first one.
            if self.soft_fail or self.never_fail:
                raise AirflowSkipException(f"Skipping due to soft_fail/never_fail: {exc}") from exc
            raise
        if done:
            return done.xcom_value
        self.defer(
            trigger=self._trigger(end_time=time.time() + self.timeout),
            method_name="execute_complete",
            # A backstop only: the trigger's own deadline fires first.
            timeout=timedelta(seconds=self.timeout + 10 * self.poke_interval + 60),
        )

    def poke(self, context: Context) -> PokeReturnValue:
        """Poll once: return not done yet, or done with the task's result (or raise what fails it)."""
        prediction_id = self._checked_id()
        if self._poller is None:
            self._poller = PredictionPoller(
                prediction_id,
                poll_interval=self.poke_interval,
                end_time=None,  # the sensor's timeout bounds the wait
                log=self.log.info,
                redact=self.hook.redact,
            )
        event: PredictionEvent | None
        try:
            # The hook retries transient failures within the poller's budget; what escapes is final.
            prediction = self.hook.get_prediction(prediction_id, retry_limits=self._poller.retry_limits)
        except FluxKontextError as exc:
            event = self._poller.on_error(exc)
        else:
            self._first_sight(context, prediction)
            event = self._poller.on_prediction(prediction)
        if event is None:
            return PokeReturnValue(is_done=False)
        return PokeReturnValue(is_done=True, xcom_value=self._complete(context, event))

    def execute_complete(self, context: Context, event: Mapping[str, Any]) -> list[str]:
        """Resume after the trigger fired: return the task's result, or raise its failure (or timeout)."""
        finished = PredictionEvent.from_payload(event)
        if finished.status == "timeout":
            self._finished = True
            raise AirflowSensorTimeout(
                f"{finished.message}; the prediction is left running (the sensor did not start it)"
            )
        if finished.seed is None and finished.status == "succeeded" and finished.prediction_id:
            finished = finished.model_copy(update={"seed": self._logged_seed(finished.prediction_id)})
        return self._complete(context, finished)

    def on_kill(self) -> None:
        """Cancel the prediction when the poking task is killed, with ``cancel_on_kill``.

        The trigger does the same for a killed deferred task.
        """
        if self.cancel_on_kill and isinstance(self.prediction_id, str) and not self._finished:
            self._cancel(self.prediction_id, "the sensor waiting for it was killed")

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """Return the edit's lineage for the OpenLineage provider (``None`` without it).

        As the operator reports it, with the input image as the prediction's input names it.
        """
        from airflow_provider_kontext.edits.lineage import edit_lineage

        return edit_lineage(self._input_location, self._summary)

    def _edit_trace(self, event: PredictionEvent) -> dict[str, Any]:
        """Return what the prediction's own input says of the edit.

        A Files-API input is named by its file's record (``mug.png``) rather than by its upload id;
        the id stays when the record cannot be read.
        """
        trace = super()._edit_trace(event)
        file_id = self.hook.uploaded_file_id(event.input_location)
        if file_id is not None:
            try:
                name = self.hook.get_file(file_id).name
            except (FluxKontextError, ValueError) as exc:
                self.log.info("Could not read the name of input file %s: %s", file_id, exc)
            else:
                if name and name != "file":
                    trace["input_name"] = name
        return trace

    def _complete(self, context: Context, event: PredictionEvent) -> list[str]:
        self._input_location = event.input_location  # the input the prediction read, for lineage
        return super()._complete(context, event)

    # --- steps ------------------------------------------------------------------------------------

    def _checked_id(self) -> str:
        """Return the rendered prediction id; a missing one fails the task without retries."""
        value = self.prediction_id
        if not isinstance(value, str) or not value.strip() or value.strip() == "None":
            raise AirflowFailException(
                f"prediction_id: expected a prediction id, got {value!r:.100} (an XCom that was never "
                "pushed renders as None)"
            )
        self.prediction_id = value.strip()
        return self.prediction_id

    def _logged_seed(self, prediction_id: str) -> int | None:
        """Return the seed the model logged, from one read of the prediction (``None`` if it fails).

        A seed the model drew is only in its logs, which an end seen in the account's list lacks.
        """
        try:
            return seed_of(self.hook.get_prediction(prediction_id))
        except FluxKontextError as exc:
            self.log.info("Could not read the seed of prediction %s: %s", prediction_id, exc)
            return None

    def _first_sight(self, context: Context, prediction: Prediction) -> None:
        """Push the web URL (the extra link) on the first poll; note when the prediction was created.

        The creation time bounds the window of the trigger's shared list.
        """
        if self._poller is None or self._poller.tracker.status is None:
            context["ti"].xcom_push(key=WEB_URL_XCOM_KEY, value=prediction.web_url)
            self.prediction_web_url = prediction.web_url
            self._created_at = prediction.created_at.isoformat() if prediction.created_at else None

    def _trigger(self, end_time: float) -> Any:
        from airflow_provider_kontext.triggers.kontext import (
            FluxKontextPredictionTrigger,
            default_min_defer_seconds,
        )

        return FluxKontextPredictionTrigger(
            prediction_id=self._checked_id(),
            flux_kontext_conn_id=self.flux_kontext_conn_id,
            poll_interval=self.poke_interval,
            end_time=end_time,
            cancel_on_kill=self.cancel_on_kill,
            hook_params=self.hook_params,
            created_at=self._created_at,
            # Resumes no sooner than this worker's settings make safe (see the operator's).
            deferred_at=time.time(),
            min_defer_seconds=default_min_defer_seconds(),
        )
