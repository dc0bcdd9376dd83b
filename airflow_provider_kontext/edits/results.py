"""What a finished wait gives the task: its result, or the exception that fails it.

Shared by :class:`~airflow_provider_kontext.operators.kontext.FluxKontextEditOperator` and the
sensor, so an edit ends the same way whichever task waited for it: the outputs (URLs, or paths
under ``output_path``), the ``prediction`` XCom summary, asset events, and failures that retry only
where a retry can help.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_provider_kontext.edits.events import PredictionEvent
from airflow_provider_kontext.edits.outputs import (
    MAX_INLINE_OUTPUT_BYTES,
    UnusableOutputError,
    check_outputs,
    output_folder,
    output_stem,
    save_outputs,
)
from airflow_provider_kontext.edits.reattach import ReattachLedger
from airflow_provider_kontext.edits.thumbnails import write_thumbnails
from airflow_provider_kontext.exceptions import (
    FluxKontextError,
    FluxKontextPredictionFailed,
    FluxKontextPredictionFailedNoRetry,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_kontext.hooks.kontext import FluxKontextHook
    from airflow_provider_kontext.models import Prediction


class PredictionResultMixin:
    """Turns a :class:`PredictionEvent` into the task's result (for operators and sensors).

    The task class provides ``hook``, ``log``, ``outlets``, ``output_path``, ``max_output_bytes``,
    ``retry_failed_predictions`` and ``reattach_on_retry``, and may override :meth:`_edit_trace`.
    """

    if TYPE_CHECKING:

        @property
        def hook(self) -> FluxKontextHook:
            """Return the task's hook."""

    log: Any
    outlets: Any
    output_path: Any
    max_output_bytes: int
    retry_failed_predictions: bool
    reattach_on_retry: bool
    _finished: bool
    _summary: dict[str, Any] | None = None
    #: The prediction's web page, once this task start knows it: the extra link reads it here
    #: rather than from XCom (:class:`~airflow_provider_kontext.links.kontext.FluxKontextPredictionLink`).
    prediction_web_url: str | None = None
    #: Saved outputs get thumbnails for the UI (:mod:`.thumbnails`); ``False`` saves the worker
    #: the decoding (about 0.1 s of CPU per image), and the plugin makes them when first shown.
    save_thumbnails: bool = True
    #: Whether a retry starts a new prediction (the operator; not a sensor, which waits for a given
    #: one): then a prediction the server canceled at the deadline its create set fails as the
    #: timeout it is, with retries, not as a final ``canceled``.
    retry_starts_anew: bool = True

    def _edit_trace(self, event: PredictionEvent) -> dict[str, Any]:
        """Return what the task knows of the edit's inputs.

        For the ``prediction`` XCom, the asset events and the output file names: ``input_image`` (a
        path or URL, never a data: blob), ``input_name`` (its file name), ``prompt`` and ``model``.
        Here, what the finished prediction's own ``event`` says (a task that only waits for a
        prediction started elsewhere knows nothing else): where its input image is (a URL without
        query or user info; nothing for an inline image).
        """
        from airflow_provider_kontext.models.images import trace_image

        where, name = trace_image(event.input_location)
        return {"input_image": where, "input_name": name}

    def _complete(self, context: Context, event: PredictionEvent) -> list[str]:
        """Return the task's result for a final event, or raise the exception that fails it."""
        self.prediction_web_url = event.web_url or self.prediction_web_url
        self._raise_unless_succeeded(event)
        trace = self._edit_trace(event)
        result = self._keep_outputs(event, trace.get("input_name"), trace.get("input_image"))
        summary = event.summary(result, **trace)
        self._summary = summary  # also what get_openlineage_facets_on_complete reports
        self.log.info("%s", _success_line(summary, saved=bool(self.output_path)))
        context["ti"].xcom_push(key="prediction", value=summary)
        self._describe_outlets(context, summary)
        # Kept, marked finished by this try: Airflow may yet fail the try (its scheduler race, a
        # killed worker), and the retry then completes from this prediction without paying again.
        ReattachLedger.from_context(context, enabled=self.reattach_on_retry).finish(event.prediction_id)
        return result

    def _raise_unless_succeeded(self, event: PredictionEvent) -> None:
        """Fail the task for any event but ``succeeded``.

        Retryable unless a retry would pay for the same outcome again.
        """
        prediction_id = event.prediction_id
        if event.status == "timeout":
            if prediction_id:
                self._cancel(prediction_id, "it did not finish within the timeout")
            self._finished = True
            raise FluxKontextPredictionFailed(
                str(event.message), prediction_id=prediction_id, status="timeout"
            )
        if event.status == "error":
            raise FluxKontextPredictionFailed(str(event.message), prediction_id=prediction_id, status="error")
        self._finished = True
        if event.status == "canceled" and event.at_deadline and self.retry_starts_anew:
            raise FluxKontextPredictionFailed(  # the edit's own timeout, reached first on the server
                f"Prediction {prediction_id} did not finish within the timeout: the server canceled it "
                "at the deadline its create set (Cancel-After)",
                prediction_id=prediction_id,
                status="timeout",
            )
        if event.status == "succeeded":
            return
        message = f"Prediction {prediction_id} {event.status}" + (f": {event.error}" if event.error else "")
        if event.logs_tail:
            message += f"\nLast log lines:\n{event.logs_tail}"
        # aborted never ran (not billed), so a retry costs nothing extra; failed and canceled did.
        final = event.status != "aborted" and not self.retry_failed_predictions
        raise (FluxKontextPredictionFailedNoRetry if final else FluxKontextPredictionFailed)(
            message,
            prediction_id=prediction_id,
            status=event.status,
            error=event.error,
            logs_tail=event.logs_tail,
        )

    def _keep_outputs(
        self, event: PredictionEvent, input_name: str | None = None, input_image: Any = None
    ) -> list[str]:
        """Return the outputs of a succeeded prediction: its URLs, or the paths they were saved to.

        Saved copies are named after ``input_name`` and the prediction (:func:`.outputs.output_stem`).
        """
        urls = event.output
        try:
            check_outputs(urls, inline_limit=None if self.output_path else MAX_INLINE_OUTPUT_BYTES)
            if not urls:
                if event.data_removed:
                    # Gone from the server: a retry makes a new edit (the old one cannot be had).
                    raise FluxKontextPredictionFailed(
                        f"Prediction {event.prediction_id} succeeded but its outputs were already deleted",
                        prediction_id=event.prediction_id,
                        status=event.status,
                    )
                raise UnusableOutputError("it returned no output")
            if not self.output_path:
                return list(urls)
            saved = save_outputs(
                urls,
                output_folder(self.output_path),
                output_stem(input_name, event.prediction_id),
                download=lambda url, dest: self.hook.download(url, dest, max_bytes=self.max_output_bytes),
                max_bytes=self.max_output_bytes,
                log=self.log.info,
            )
            if self.save_thumbnails:
                write_thumbnails(saved, input_image, self.log.warning)
            return saved
        except UnusableOutputError as exc:
            why = f" (the answer was {event.shape})" if event.shape else ""
            final = not self.retry_failed_predictions
            raise (FluxKontextPredictionFailedNoRetry if final else FluxKontextPredictionFailed)(
                f"Prediction {event.prediction_id} succeeded but {exc}{why}"
                + ("; not retried, since a retry would pay for another edit" if final else ""),
                prediction_id=event.prediction_id,
                status=event.status,
            ) from None

    def _describe_outlets(self, context: Context, summary: dict[str, Any]) -> None:
        """Put the prediction id, the outputs and what made them in each outlet Asset's ``extra``.

        What made them: input image, prompt, model, as far as known. The Assets are the task's
        outlets (declared with ``outlets=[Asset(...)]``, which also works in ``.partial()``).
        """
        from airflow.sdk import Asset

        for outlet in self.outlets or []:
            if isinstance(outlet, Asset):
                extra: dict[str, Any] = {"prediction_id": summary["id"], "outputs": list(summary["outputs"])}
                extra.update({key: summary[key] for key in _TRACED if summary.get(key) is not None})
                context["outlet_events"][outlet].extra = extra

    def _cancel(self, prediction_id: str, why: str) -> Prediction | None:
        """Cancel a prediction; return what the cancel answered (``None``: it failed, logged)."""
        try:
            prediction = self.hook.cancel_prediction(prediction_id)
        except FluxKontextError as exc:
            self.log.warning("Could not cancel prediction %s: %s", prediction_id, exc)
            return None
        status = prediction.status.value
        self.log.info("Canceled prediction %s because %s (now %s)", prediction_id, why, status)
        return prediction


#: The inputs a finished edit records next to its outputs (see ``PredictionResultMixin._edit_trace``).
_TRACED = ("input_image", "prompt", "model")


def _success_line(summary: dict[str, Any], *, saved: bool) -> str:
    """Return the one line that ends a successful edit's log.

    Status, time, seed, outputs (last, each followed by a space or the end of the line, so
    linkified URLs stay whole).
    """
    took = (
        f" in {summary['predict_time']:.1f}s" if isinstance(summary.get("predict_time"), float | int) else ""
    )
    source = f" from {summary['input_name']}" if summary.get("input_name") else ""
    seed = f" with seed {summary['seed']}" if summary.get("seed") is not None else ""
    outputs = [str(o) if not str(o).startswith("data:") else "data:..." for o in summary["outputs"]]
    # Separated by spaces only: a log viewer's linkifier would take a comma into the URL before it.
    listed = " ".join(outputs[:5]) + (f" (and {len(outputs) - 5} more)" if len(outputs) > 5 else "")
    count = f"{len(outputs)} output{'s' if len(outputs) != 1 else ''}"
    return (
        f"Prediction {summary['id']} {summary['status']}{took}{source}{seed}: {count} "
        f"{'saved to' if saved else 'at'} {listed}"
    )
