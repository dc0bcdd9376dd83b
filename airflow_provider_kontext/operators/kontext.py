"""``FluxKontextEditOperator``: one FLUX.1 Kontext image edit as an Airflow task."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import re
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow.sdk import BaseOperator

from airflow_provider_kontext.compat import AirflowFailException
from airflow_provider_kontext.exceptions import (
    KontextError,
    KontextInputError,
    KontextNotFoundError,
    KontextPredictionFailed,
    KontextPredictionMayExistError,
)
from airflow_provider_kontext.get_provider_info import DEFAULT_CONN_ID
from airflow_provider_kontext.images import (
    EXTENSIONS,
    decode_data_uri,
    is_image_content_type,
    sniff_image_type,
    to_data_uri,
)
from airflow_provider_kontext.links.kontext import WEB_URL_XCOM_KEY, ReplicatePredictionLink
from airflow_provider_kontext.models import DEFAULT_MODEL, Prediction, PredictionStatus, validate_input
from airflow_provider_kontext.progress import PredictionPoller, prediction_event

if TYPE_CHECKING:
    from airflow.sdk import Context, ObjectStoragePath

    from airflow_provider_kontext.hooks.kontext import FluxKontextHook

__all__ = ["FluxKontextEditOperator", "KontextPredictionFailedNoRetry"]


class KontextPredictionFailedNoRetry(KontextPredictionFailed, AirflowFailException):
    """A prediction the model failed, or that was canceled: the task fails without retrying, since a
    retry would start (and bill) a new prediction likely to end the same way. Switched off with the
    operator's ``retry_failed_predictions=True``."""


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
#: Replicate stops any prediction after 30 minutes; the default deadline when none is given.
DEFAULT_TIMEOUT = timedelta(minutes=30)
#: The longest ``timeout`` and ``poll_interval`` accepted (a week): beyond any prediction's life, and
#: far inside what ``timedelta`` and the trigger's deadline arithmetic can hold.
MAX_WAIT = timedelta(days=7)
#: Output file names are built from the server's prediction id, cut to this many characters.
MAX_STEM = 100
#: Output files are deleted by Replicate about an hour after the prediction completes.
OUTPUT_RETENTION = timedelta(hours=1)
_PENDING_IMAGE = "data:image/png;base64,"


class FluxKontextEditOperator(BaseOperator):
    """Edit one image with FLUX.1 Kontext and hand the result to downstream tasks.

    The inputs are validated against the model's schema after templating and before any HTTP call;
    a bad value fails the task at once (no retries) with a message naming the field and what is
    allowed. Then the prediction is created, its id stored where a retry of this task instance finds
    it (Airflow >= 3.3's task state store), and the task waits: by default deferred to the triggerer,
    which frees the worker slot while the model runs.

    The return value (XCom ``return_value``) is the list of output URLs, or of durable paths when
    ``output_path`` is set. XCom ``prediction_id`` and ``prediction_web_url`` are pushed right after the
    create; ``prediction`` (a summary: id, status, model, predict time, times, web URL, when the
    URLs expire) at the end. A ``failed``, ``canceled`` or ``aborted`` prediction fails the task with
    the model's error and the tail of its logs; a prediction that outlives the timeout is canceled
    and fails the task.

    :param prompt: the edit instruction (templated).
    :param input_image: the image to edit (templated): an http(s) URL or ``data:`` URI is passed on;
        a local path, ``file://`` URL, ``ObjectStoragePath`` or bytes is read, checked to be a jpeg,
        png, gif or webp, and sent as a data: URI when small or uploaded with the Files API.
    :param aspect_ratio: see :class:`~airflow_provider_kontext.models.FluxKontextDevInput` (as are
        ``num_inference_steps``, ``guidance``, ``seed``, ``output_format``, ``output_quality``,
        ``disable_safety_checker`` and ``go_fast``); unset ones take the model's defaults.
    :param extra_input: further inputs for other Kontext models (e.g. ``safety_tolerance`` on pro).
    :param model: ``owner/name`` or ``owner/name:version`` (default: FLUX.1 Kontext [dev]).
    :param flux_kontext_conn_id: the connection (type ``flux_kontext``).
    :param deferrable: wait in the triggerer (default) rather than in the worker.
    :param poll_interval: seconds between status polls.
    :param wait_seconds: hold the create request open up to this many seconds (1..60); a prediction
        finished by then completes without deferring.
    :param timeout: how long the prediction may take (seconds or timedelta). Default: the task's
        ``execution_timeout`` less a margin, else 30 minutes. Also sent as Replicate's
        ``Cancel-After``, so the remote side stops it even when Airflow cannot.
    :param reattach_on_retry: on a retry, reattach to the prediction the earlier try started when it
        is still running or succeeded, instead of paying for a new one.
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
        the prediction id and the outputs (paths or URLs).
    :param inline_image_max_bytes: local images up to this size are sent inline as data: URIs.
    """

    template_fields: Sequence[str] = (
        "input_image",
        "model",
        *MODEL_ARGUMENTS,
        "extra_input",
        "output_path",
    )
    template_fields_renderers = {"extra_input": "json", "prompt": "py"}
    operator_extra_links = (ReplicatePredictionLink(),)
    ui_color = "#e4dcf7"

    #: Key of the prediction id in the task state store (survives retries; XComs do not).
    STATE_KEY = "flux_kontext_prediction"

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
        deferrable: bool = True,
        poll_interval: float = 2.0,
        wait_seconds: int | None = None,
        timeout: float | timedelta | None = None,
        reattach_on_retry: bool = True,
        retry_uncertain_create: bool = False,
        retry_failed_predictions: bool = False,
        cancel_on_kill: bool = True,
        output_path: Any = None,
        max_output_bytes: int = 50 * 1024 * 1024,
        inline_image_max_bytes: int = 256 * 1024,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
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
        self.deferrable = deferrable
        self.poll_interval = _number("poll_interval", poll_interval, maximum=MAX_WAIT.total_seconds())
        self.wait_seconds = (
            None if wait_seconds is None else int(_number("wait_seconds", wait_seconds, 1, 60, integer=True))
        )
        if timeout is not None:
            _number(
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
        self.max_output_bytes = int(_number("max_output_bytes", max_output_bytes, 1, integer=True))
        self.inline_image_max_bytes = int(
            _number("inline_image_max_bytes", inline_image_max_bytes, 0, integer=True)
        )
        self._prediction_id: str | None = None
        self._finished = False

    @cached_property
    def hook(self) -> FluxKontextHook:
        from airflow_provider_kontext.hooks.kontext import FluxKontextHook

        return FluxKontextHook(self.flux_kontext_conn_id)

    # --- execute ----------------------------------------------------------------------------------

    def execute(self, context: Context) -> list[str]:
        try:
            model_input, pending_image, fingerprint = self._prepare_input()
        except KontextInputError as exc:
            raise AirflowFailException(str(exc)) from exc
        store = context.get("task_state_store") if self.reattach_on_retry else None
        if self.reattach_on_retry and store is None:
            self.log.warning("No task state store (Airflow < 3.3): a retry cannot reattach to a prediction")
        timeout = self._timeout_seconds()

        prediction = self._reattach(store, fingerprint)
        if prediction is None:
            if pending_image is not None:
                model_input["input_image"] = self._send_image(*pending_image)
            prediction = self._create(model_input, timeout, store, fingerprint)
        self._prediction_id = prediction.id
        self._push_ids(context, prediction)
        if prediction.is_terminal or prediction.id is None:
            return self._complete(context, prediction_event(prediction, self.hook.redact))

        created = prediction.created_at.timestamp() if prediction.created_at else time.time()
        end_time = created + timeout
        if self.deferrable:
            from airflow_provider_kontext.triggers.kontext import FluxKontextPredictionTrigger

            self.defer(
                trigger=FluxKontextPredictionTrigger(
                    prediction_id=prediction.id,
                    flux_kontext_conn_id=self.flux_kontext_conn_id,
                    poll_interval=self.poll_interval,
                    end_time=end_time,
                    cancel_on_kill=self.cancel_on_kill,
                ),
                method_name="execute_complete",
                # A backstop only: the trigger's own deadline fires first and cancels remotely.
                timeout=timedelta(seconds=max(0.0, end_time - time.time()) + 10 * self.poll_interval + 60),
            )
        return self._complete(context, self._poll_in_worker(prediction.id, end_time))

    def execute_complete(self, context: Context, event: dict[str, Any]) -> list[str]:
        """Resume after the trigger fired: turn its event into the task's result or failure."""
        self._prediction_id = event.get("prediction_id")
        return self._complete(context, event)

    def on_kill(self) -> None:
        """Cancel the prediction this task is waiting for (in-worker waits; the trigger handles
        killed deferred tasks)."""
        if self.cancel_on_kill and self._prediction_id and not self._finished:
            self._cancel(self._prediction_id, "the task was killed")

    # --- steps ------------------------------------------------------------------------------------

    def _prepare_input(self) -> tuple[dict[str, Any], tuple[bytes, str, str] | None, str]:
        """Validate the inputs without any HTTP call.

        :return: the model input (``input_image`` still a placeholder when the image has to be
            sent), the local image ``(bytes, content type, file name)`` if any, and a fingerprint of
            the whole request used to recognise the earlier try's prediction.
        """
        values: dict[str, Any] = {
            name: value for name in MODEL_ARGUMENTS if (value := getattr(self, name)) is not None
        }
        extra = self.extra_input or {}
        if not isinstance(extra, dict):
            raise KontextInputError(f"extra_input: must be a dict, got {type(extra).__name__}")
        if clash := sorted(set(extra) & {*values, "input_image"}):
            raise KontextInputError(f"extra_input: repeats arguments given directly: {', '.join(clash)}")
        values.update(extra)
        pending = None
        image = self.input_image
        if isinstance(image, str) and image.startswith(("http://", "https://", "data:")):
            values["input_image"] = image
        elif image is not None:
            pending = _read_local_image(image)
            values["input_image"] = _PENDING_IMAGE
        model_input = validate_input(self.model, values)
        if self.output_path is not None:
            self._output_folder()  # an unusable output_path fails now, not after paying for the edit
        identity = dict(model_input)
        if pending is not None:
            identity["input_image"] = "sha256:" + hashlib.sha256(pending[0]).hexdigest()
        fingerprint = hashlib.sha256(
            json.dumps({"model": self.model, "input": identity}, sort_keys=True, default=str).encode()
        ).hexdigest()
        return model_input, pending, fingerprint

    def _timeout_seconds(self) -> float:
        if isinstance(self.timeout, timedelta):
            return self.timeout.total_seconds()
        if self.timeout is not None:
            return float(self.timeout)
        if self.execution_timeout is not None:
            total = self.execution_timeout.total_seconds()
            return max(total * 0.5, total - min(60.0, total * 0.1))
        return DEFAULT_TIMEOUT.total_seconds()

    def _reattach(self, store: Any, fingerprint: str) -> Prediction | None:
        """The earlier try's prediction if it is still running or succeeded with its output, else
        ``None`` (then a new one is created)."""
        if store is None:
            return None
        saved = store.get(self.STATE_KEY)
        if not isinstance(saved, dict) or not isinstance(saved.get("id"), str):
            return None
        previous = saved["id"]
        if saved.get("fingerprint") != fingerprint:
            self.log.warning("Inputs changed since prediction %s was started; starting a new one", previous)
            return None
        try:
            prediction = self.hook.get_prediction(previous)
        except KontextNotFoundError:
            self.log.warning(
                "Prediction %s from an earlier try no longer exists; starting a new one", previous
            )
            return None
        if not prediction.is_terminal:
            self.log.info(
                "Reattaching to prediction %s (%s) started by an earlier try",
                previous,
                prediction.status.value,
            )
            return prediction
        if prediction.status is PredictionStatus.SUCCEEDED and prediction.output_urls:
            self.log.info("Prediction %s from an earlier try already succeeded; using its output", previous)
            return prediction
        self.log.info(
            "Prediction %s from an earlier try ended %s; starting a new one",
            previous,
            prediction.status.value,
        )
        return None

    def _send_image(self, data: bytes, content_type: str, filename: str) -> str:
        if len(data) <= self.inline_image_max_bytes:
            return to_data_uri(data, content_type)
        uploaded = self.hook.upload_file(data, filename=filename, content_type=content_type)
        self.log.info("Uploaded %s (%d bytes) as file %s", filename, len(data), uploaded.id)
        return uploaded.urls.get

    def _create(
        self, model_input: dict[str, Any], timeout: float, store: Any, fingerprint: str
    ) -> Prediction:
        try:
            prediction = self.hook.create_prediction(
                self.model, model_input, wait=self.wait_seconds, cancel_after=timeout
            )
        except KontextPredictionMayExistError as exc:
            if self.retry_uncertain_create:
                raise
            raise AirflowFailException(
                f"{exc} Not retried automatically (retry_uncertain_create=False)."
            ) from exc
        # Store the id before anything else, to keep the window in which a crash orphans it small.
        if prediction.id and store is not None:
            store.set(self.STATE_KEY, {"id": prediction.id, "fingerprint": fingerprint})
        self.log.info(
            "Created prediction %s (%s)%s",
            prediction.id,
            prediction.status.value,
            f": {prediction.web_url}" if prediction.web_url else "",
        )
        return prediction

    def _push_ids(self, context: Context, prediction: Prediction) -> None:
        ti = context["ti"]
        ti.xcom_push(key="prediction_id", value=prediction.id)
        ti.xcom_push(key=WEB_URL_XCOM_KEY, value=prediction.web_url)

    def _poll_in_worker(self, prediction_id: str, end_time: float) -> dict[str, Any]:
        poller = PredictionPoller(
            prediction_id,
            poll_interval=self.poll_interval,
            end_time=end_time,
            log=self.log.info,
            redact=self.hook.redact,
        )
        while True:
            try:
                event = poller.on_prediction(self.hook.get_prediction(prediction_id))
            except KontextError as exc:
                event = poller.on_error(exc)
            if event is not None:
                return event
            time.sleep(poller.delay())

    def _cancel(self, prediction_id: str, why: str) -> None:
        try:
            prediction = self.hook.cancel_prediction(prediction_id)
            self.log.info(
                "Canceled prediction %s because %s (now %s)", prediction_id, why, prediction.status.value
            )
        except KontextError as exc:
            self.log.warning("Could not cancel prediction %s: %s", prediction_id, exc)

    def _complete(self, context: Context, event: dict[str, Any]) -> list[str]:
        """The task's result for a final event, or the exception that fails it."""
        status = event.get("status")
        prediction_id = event.get("prediction_id")
        if status == "timeout":
            if prediction_id:
                self._cancel(prediction_id, "it did not finish within the timeout")
            self._finished = True
            raise KontextPredictionFailed(
                str(event.get("message")), prediction_id=prediction_id, status="timeout"
            )
        if status == "error":
            raise KontextPredictionFailed(
                str(event.get("message")), prediction_id=prediction_id, status="error"
            )
        self._finished = True
        if status != PredictionStatus.SUCCEEDED.value:
            error = event.get("error")
            tail = event.get("logs_tail") or ""
            message = f"Prediction {prediction_id} {status}" + (f": {error}" if error else "")
            if tail:
                message += f"\nLast log lines:\n{tail}"
            # aborted never ran (not billed), so a retry costs nothing extra; failed and canceled did.
            final = status != PredictionStatus.ABORTED.value and not self.retry_failed_predictions
            raise (KontextPredictionFailedNoRetry if final else KontextPredictionFailed)(
                message, prediction_id=prediction_id, status=status, error=error, logs_tail=tail
            )
        urls = [url for url in event.get("output") or [] if isinstance(url, str)]
        for index, url in enumerate(urls):
            if not _usable_output(url):
                scheme = url.partition(":")[0] if ":" in url else ""
                raise KontextPredictionFailed(
                    f"Prediction {prediction_id} succeeded but output {index} is not an http(s) URL or a "
                    f"data: URI (scheme {scheme[:20]!r}); it is neither returned nor downloaded",
                    prediction_id=prediction_id,
                    status=status,
                )
        if not urls:
            why = "its outputs were already deleted" if event.get("data_removed") else "it returned no output"
            raise KontextPredictionFailed(
                f"Prediction {prediction_id} succeeded but {why}", prediction_id=prediction_id, status=status
            )
        result = self._persist(urls, prediction_id) if self.output_path else urls
        context["ti"].xcom_push(key="prediction", value=_summary(event, result))
        self._describe_outlets(context, prediction_id, result)
        store = context.get("task_state_store") if self.reattach_on_retry else None
        if store is not None:
            store.delete(self.STATE_KEY)  # done: a later clear of this task edits afresh
        return result

    def _describe_outlets(self, context: Context, prediction_id: str | None, outputs: list[str]) -> None:
        """Put the outputs in the ``extra`` of each Asset among the task's outlets (declared with
        ``outlets=[Asset(...)]``, which also works in ``.partial()``)."""
        from airflow.sdk import Asset

        for outlet in self.outlets or []:
            if isinstance(outlet, Asset):
                extra: dict[str, Any] = {"prediction_id": prediction_id, "outputs": list(outputs)}
                context["outlet_events"][outlet].extra = extra

    def _persist(self, urls: list[str], prediction_id: str | None) -> list[str]:
        """Download each output into ``output_path``: size-capped, checked to be an image, written
        under a name of our choosing to a temporary name and renamed when complete."""
        folder = self._output_folder()
        folder.mkdir(parents=True, exist_ok=True)
        # The id comes from the server: keep only safe characters, and not too many of them, so it
        # can neither leave the folder nor make a name the file system refuses.
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", prediction_id or "")[:MAX_STEM] or (
            f"edit-{int(time.time() * 1000)}"
        )
        paths = []
        for index, url in enumerate(urls):
            with tempfile.TemporaryFile() as buffer:
                declared: str | None
                if url.startswith("data:"):
                    declared = url[5:].partition(",")[0].split(";", 1)[0]
                    try:
                        buffer.write(decode_data_uri(url, self.max_output_bytes))
                    except ValueError as exc:
                        raise KontextPredictionFailed(
                            f"Output {index} of prediction {prediction_id}: {exc}",
                            prediction_id=prediction_id,
                            status="succeeded",
                        ) from None
                else:
                    declared = self.hook.download(url, buffer, max_bytes=self.max_output_bytes)
                buffer.seek(0)
                head = buffer.read(16)
                kind = sniff_image_type(head)
                if kind is None:
                    raise KontextPredictionFailed(
                        f"Output {index} of prediction {prediction_id} is not a jpeg/png/gif/webp image",
                        prediction_id=prediction_id,
                        status="succeeded",
                    )
                if not is_image_content_type(declared):
                    raise KontextPredictionFailed(
                        f"Output {index} of prediction {prediction_id} was served as {declared[:100]!r}, "
                        "not as an image",
                        prediction_id=prediction_id,
                        status="succeeded",
                    )
                target = folder / f"{stem}-{index}.{EXTENSIONS[kind]}"
                partial = folder / f".{stem}-{index}.{EXTENSIONS[kind]}.partial"
                buffer.seek(0)
                try:
                    with partial.open("wb") as out:  # type: ignore[no-untyped-call]
                        while chunk := buffer.read(1 << 20):
                            out.write(chunk)
                    partial.rename(target)
                except BaseException:
                    partial.unlink(missing_ok=True)  # never leave a half-written file behind
                    raise
            self.log.info("Saved output %d of prediction %s to %s", index, prediction_id, target)
            paths.append(str(target))
        return paths

    def _output_folder(self) -> ObjectStoragePath:
        """``output_path`` as an ``ObjectStoragePath`` (no I/O).

        :raises KontextInputError: a path with a NUL byte, or a URL no file system is known for.
        """
        from airflow.sdk import ObjectStoragePath

        if isinstance(self.output_path, ObjectStoragePath):
            return self.output_path
        text = str(self.output_path)
        try:
            if "\x00" in text:
                raise ValueError("contains a NUL byte")
            folder = ObjectStoragePath(text if "://" in text else Path(text).absolute().as_uri())
            folder.fs  # noqa: B018 (resolves the file system for the URL's scheme, or raises)
        except (ValueError, TypeError, ImportError, OSError) as exc:
            raise KontextInputError(f"output_path: cannot write to {text[:200]!r}: {exc}") from None
        return folder


def _usable_output(url: str) -> bool:
    """Whether an output URL the server returned may be handed on or downloaded: an http(s) URL
    with a host, or a data: URI. ``file:``, ``javascript:``, ``ftp:`` and the like may not."""
    if url[:5].lower() == "data:":
        return True
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def _number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    integer: bool = False,
) -> float:
    """``value`` as a finite number within bounds (``minimum=None``: must be positive).

    :raises ValueError: naming the argument, for anything else (a string that is not a number,
        ``None``, NaN, infinity, a fraction where an integer is needed, out of range).
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a number, got {value!r:.100}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r:.100}")
    if integer and not number.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r:.100}")
    if (number <= 0 if minimum is None else number < minimum) or (maximum is not None and number > maximum):
        allowed = "positive" if minimum is None else f"at least {minimum:g}"
        if maximum is not None:
            allowed += f" and at most {maximum:g}"
        raise ValueError(f"{name} must be {allowed}, got {value!r:.100}")
    return number


#: Read errors that no retry mends: the path names nothing readable.
_PERMANENT_ERRNOS = frozenset(
    {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ELOOP}
)


def _read_local_image(image: Any) -> tuple[bytes, str, str]:
    """Read an image given as bytes, a path, a ``file://`` URL or an ``ObjectStoragePath``.

    :raises KontextInputError: missing, a folder, not permitted, or not a jpeg, png, gif or webp
        image (permanent: no retry helps). Other I/O errors (a storage hiccup) propagate as they
        are, so Airflow's retries apply.
    """
    if isinstance(image, bytes | bytearray):
        data, name = bytes(image), "input"
    else:
        text = str(image)
        try:
            if hasattr(image, "read_bytes") and "://" in text:
                data, name = image.read_bytes(), text.rsplit("/", 1)[-1]
            else:
                path = Path(text[len("file://") :] if text.startswith("file://") else text)
                data, name = path.read_bytes(), path.name
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            if isinstance(exc, OSError) and exc.errno not in _PERMANENT_ERRNOS:
                raise  # a storage hiccup, not bad input: let Airflow's retries apply
            reason = getattr(exc, "strerror", None) or exc
            raise KontextInputError(f"input_image: cannot read {text[:200]!r}: {reason}") from None
    kind = sniff_image_type(data[:16])
    if kind is None:
        raise KontextInputError(
            f"input_image: {name!r} is not a jpeg, png, gif or webp image (the model accepts only those)"
        )
    if "." not in name:
        name = f"{name}.{EXTENSIONS[kind]}"
    return data, kind, name


def _summary(event: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
    from datetime import datetime

    completed = event.get("completed_at")
    expires = None
    if isinstance(completed, str):
        expires = (datetime.fromisoformat(completed) + OUTPUT_RETENTION).isoformat()
    return {
        "id": event.get("prediction_id"),
        "status": event.get("status"),
        "model": event.get("model"),
        "predict_time": event.get("predict_time"),
        "created_at": event.get("created_at"),
        "completed_at": completed,
        "web_url": event.get("web_url"),
        "output_urls": event.get("output"),
        "urls_expire_at": expires,
        "outputs": outputs,
    }
