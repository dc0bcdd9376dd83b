"""Check what an edit asks for before any money is spent, and fail the task when it is refused.

Literal model inputs are checked when the DAG file is parsed (a bad one is an import error that
names the field); after templating, every input is validated against the model's schema, the local
image read, a seed drawn where the model would draw one unseen (:func:`drawn_seed`), and the
request fingerprinted so a retry can recognise the prediction an earlier try started. None of it
makes an HTTP call. :func:`fail_task_on_final_answers` turns the server's
lasting refusal of a create or upload into a task failure without retries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from airflow_provider_kontext.edits.outputs import output_folder
from airflow_provider_kontext.edits.reattach import Series, fingerprint
from airflow_provider_kontext.exceptions import (
    FluxKontextAPIError,
    FluxKontextAuthError,
    FluxKontextInputError,
    FluxKontextNotFoundError,
    FluxKontextTLSError,
)
from airflow_provider_kontext.hooks.retry import FINAL_CREATE_STATUSES
from airflow_provider_kontext.models import check_literal_input, validate_input
from airflow_provider_kontext.models.images import LocalImage, read_local_image
from airflow_provider_kontext.models.inputs import input_model_for

#: Stands in for a local image in the input until it is sent (inline or uploaded).
_PENDING_IMAGE = "data:image/png;base64,"
#: Markers of a Jinja template: a string holding one is checked after rendering, not when parsed.
_JINJA_MARKERS = ("{{", "{%", "{#")
_URL_PREFIXES = ("http://", "https://", "data:")
#: Seeds the provider draws lie in 1 .. 2**31 - 1: never 0 (random to the model), in any model's range.
_SEED_SPAN = 2**31 - 1


class EditRequest(NamedTuple):
    """A validated edit.

    The model input (``input_image`` a placeholder while ``image`` is still to be sent), the local
    image if any, and the fingerprint that recognises an earlier try's prediction.
    """

    model_input: dict[str, Any]
    image: LocalImage | None
    fingerprint: str


def is_literal(value: Any) -> bool:
    """Tell whether ``value`` is a literal worth checking at parse time.

    That is a number, a bool, or a string that is no Jinja template (anything else, an XCom
    reference say, is known only at run time).
    """
    if isinstance(value, str):
        return not any(marker in value for marker in _JINJA_MARKERS)
    return isinstance(value, int | float)


def check_literal_inputs(
    task_id: str, model: Any, arguments: dict[str, Any], input_image: Any, extra_input: Any
) -> None:
    """Validate the model inputs given as literals, at DAG parse time (no I/O, no HTTP).

    Templated strings, XCom references and other objects are left for run time, as is
    ``input_image`` unless it is a literal URL or data: URI.

    :param arguments: the operator's model arguments by name (``None`` where not given).
    :raises FluxKontextInputError: naming the task, the field and what is allowed (a DAG import error).
    """
    if not is_literal(model):
        return
    values = {name: value for name, value in arguments.items() if is_literal(value)}
    if is_literal(input_image) and str(input_image)[:8].lower().startswith(_URL_PREFIXES):
        values["input_image"] = input_image
    extra: dict[str, Any] = {}
    if isinstance(extra_input, dict):
        # A key that repeats a direct argument is reported at run time (with the others).
        given = {*arguments, "input_image"}
        extra = {
            key: value
            for key, value in extra_input.items()
            if isinstance(key, str) and key not in given and is_literal(value)
        }
    try:
        check_literal_input(model, {**values, **extra})
    except FluxKontextInputError as exc:
        from_extra = [field for field, _ in exc.errors if field not in values and field != "model"]
        where = " (in extra_input)" if extra and from_extra else ""
        raise FluxKontextInputError(f"Task {task_id!r}: {exc}{where}", errors=exc.errors) from None


def seed_key(context: Any) -> str:
    """Return what names a task instance's series of tries: the source of the seeds it draws.

    The DAG, run, task and map index, with ``max_tries`` and the run's ``clear_number``: a retry
    keeps them all (it draws the seed its earlier try sent, so it recognises that try's prediction),
    a clear changes one (a fresh edit, with a fresh seed).
    """
    ti = context.get("ti")
    series = Series.of(context)
    parts = [getattr(ti, name, None) for name in ("dag_id", "run_id", "task_id", "map_index")]
    return repr([*parts, series.max_tries, series.clear_number])


def drawn_seed(model: str, model_input: dict[str, Any], image: bytes | None, key: str) -> int | None:
    """Return the seed to send where the model would otherwise draw one at random, else ``None``.

    The model reports a seed it draws only in its logs, which an edit whose end was read from the
    account's list never sees; a seed sent is in the prediction's input, so every answer shows it
    and the edit can be made again. It is derived from ``key`` (:func:`seed_key`) and everything
    else the edit asks for, so it is as random as the model's own, stable across retries and new on
    a clear. ``None`` when a seed other than 0 is given or the model takes no ``seed`` input.
    """
    if model_input.get("seed") not in (None, 0) or "seed" not in input_model_for(model).model_fields:
        return None
    unseeded = {name: value for name, value in model_input.items() if name != "seed"}
    digest = hashlib.sha256(f"{key}:{fingerprint(model, unseeded, image)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _SEED_SPAN + 1


def validated_request(
    model: str,
    arguments: dict[str, Any],
    input_image: Any,
    extra_input: Any,
    output_path: Any,
    seed_from: str | None = None,
) -> EditRequest:
    """Validate the rendered inputs against the model's schema and read the local image.

    :param seed_from: with it, a seed is drawn where none is given (:func:`drawn_seed`).
    :raises FluxKontextInputError: naming the field and what is allowed.
    """
    values = {name: value for name, value in arguments.items() if value is not None}
    extra = extra_input or {}
    if not isinstance(extra, dict):
        raise FluxKontextInputError(f"extra_input: must be a dict, got {type(extra).__name__}")
    if clash := sorted(set(extra) & {*values, "input_image"}):
        raise FluxKontextInputError(f"extra_input: repeats arguments given directly: {', '.join(clash)}")
    values.update(extra)
    image = None
    if isinstance(input_image, str) and input_image.startswith(_URL_PREFIXES):
        values["input_image"] = input_image
    elif input_image is not None:
        image = read_local_image(input_image)
        values["input_image"] = _PENDING_IMAGE
    model_input = validate_input(model, values)
    if output_path is not None:
        output_folder(output_path)  # an unusable output_path fails now, not after paying
    data = image.data if image else None
    if seed_from is not None and (seed := drawn_seed(model, model_input, data, seed_from)) is not None:
        model_input["seed"] = seed
    return EditRequest(model_input, image, fingerprint(model, model_input, data))


@contextmanager
def fail_task_on_final_answers(what: str) -> Iterator[None]:
    """Fail the task without retries on an answer the same create or upload would get again.

    Those are :data:`~airflow_provider_kontext.hooks.retry.FINAL_CREATE_STATUSES` (401, 403, 404,
    422) and a TLS handshake that fails for good: retries would repeat the failure (and, on
    401/403, knock on the account with a refused token), so the task fails once, saying why.

    :param what: the request, for the message ("create", "upload").
    :raises AirflowFailException: on such an answer; any other error passes unchanged.
    """
    from airflow_provider_kontext.compat import AirflowFailException

    try:
        yield
    except FluxKontextAPIError as exc:
        if exc.status not in FINAL_CREATE_STATUSES and not isinstance(exc, FluxKontextTLSError):
            raise
        if isinstance(exc, FluxKontextTLSError):
            why = "the TLS handshake fails the same way each time; fix the connection, then clear the task"
        elif isinstance(exc, FluxKontextAuthError):
            why = "the token is refused; fix the connection, then clear the task"
        elif isinstance(exc, FluxKontextNotFoundError):
            why = "the model or version does not exist for this token"
        else:
            why = "the server rejects this input"
        raise AirflowFailException(
            f"{exc} Not retried: the {what} would get the same answer ({why})."
        ) from None
