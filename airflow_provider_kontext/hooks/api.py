"""Build requests and parse responses for both the sync and the async paths of the hook.

Each fact lives here once; the hook only moves bytes (the connection's settings are in
:mod:`.connection`, the failure policy in :mod:`airflow_provider_kontext.hooks.retry`, the transports
in :mod:`.transports`).
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ValidationError

from airflow_provider_kontext.exceptions import (
    FluxKontextAPIError,
    FluxKontextAuthError,
    FluxKontextNotFoundError,
    FluxKontextRateLimitError,
    FluxKontextServerError,
)
from airflow_provider_kontext.hooks.connection import ClientSettings, auth_hint
from airflow_provider_kontext.models import MODEL_REFERENCE, Prediction, PredictionPage

# Replicate's 429 wordings: "Your rate limit resets in ~30s." (today) and "Expected available in
# 1 second." (older); minutes where the wait is long ("~2m", "in ~1 minute").
_RESETS_IN = re.compile(
    r"resets?\s+in\s*~?\s*(\d+(?:\.\d+)?)\s*(seconds?|secs?|s|minutes?|mins?|m)\b", re.IGNORECASE
)
_AVAILABLE_IN = re.compile(r"available\s+in\s*~?\s*(\d+(?:\.\d+)?)\s*seconds?\b", re.IGNORECASE)


_HEX_VERSION = re.compile(r"^[0-9a-f]{64}$")
_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class ApiRequest:
    """One API call as data, so the sync and async paths build and judge it identically.

    ``idempotent`` is ``False`` for calls that create billable work: those are retried only where
    the request provably did not reach the server.
    """

    method: str
    path: str
    json: dict[str, Any] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = field(default=None, repr=False)
    # May carry the token (a download from the API's own origin): never in a repr.
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    idempotent: bool = True
    read_timeout: float | None = None
    #: Polled often: its first attempt is logged at debug level only.
    quiet: bool = False

    @property
    def label(self) -> str:
        """Return the request's method and path, for logs and errors."""
        return f"{self.method} {self.path}"


def create_prediction_request(
    model: str,
    model_input: dict[str, Any],
    *,
    wait: int | None = None,
    cancel_after: float | None = None,
    webhook: str | None = None,
    webhook_events_filter: list[str] | None = None,
) -> ApiRequest:
    """``POST /v1/models/{owner}/{name}/predictions``, or ``/v1/predictions`` for a pinned version.

    :param wait: seconds (1..60) to hold the request open for the result (``Prefer: wait``).
    :param cancel_after: seconds after which Replicate cancels the prediction (``Cancel-After``).
    """
    body: dict[str, Any] = {"input": model_input}
    if webhook:
        body["webhook"] = webhook
        if webhook_events_filter:
            body["webhook_events_filter"] = list(webhook_events_filter)
    if not isinstance(model, str) or not MODEL_REFERENCE.fullmatch(model):
        # The name becomes part of the URL path: '?', '#', '/', '..' or spaces would retarget it.
        raise ValueError(f"model must be 'owner/name' or 'owner/name:version', got {model!r:.200}")
    name, _, version = model.partition(":")
    if version or _HEX_VERSION.match(name):
        path = "/v1/predictions"
        body["version"] = version or name
    else:
        owner, _, rest = name.partition("/")
        path = f"/v1/models/{owner}/{rest}/predictions"
    headers: dict[str, str] = {}
    read_timeout = None
    if wait is not None:
        if not 1 <= wait <= 60:
            raise ValueError(f"wait must be between 1 and 60 seconds, got {wait}")
        headers["Prefer"] = f"wait={wait}"
        read_timeout = wait + 15.0
    if cancel_after is not None:
        if not math.isfinite(cancel_after):
            raise ValueError(f"cancel_after must be a finite number of seconds, got {cancel_after}")
        headers["Cancel-After"] = f"{max(5, int(cancel_after))}s"
    return ApiRequest("POST", path, json=body, headers=headers, idempotent=False, read_timeout=read_timeout)


def _prediction_path(prediction_id: str) -> str:
    if not prediction_id or not re.fullmatch(r"[A-Za-z0-9_-]+", prediction_id):
        raise ValueError(f"not a prediction id: {prediction_id!r}")
    return f"/v1/predictions/{prediction_id}"


def get_prediction_request(prediction_id: str) -> ApiRequest:
    """Build ``GET /v1/predictions/{id}``: a prediction's current state (polled, so quiet)."""
    return ApiRequest("GET", _prediction_path(prediction_id), quiet=True)


def list_predictions_request(
    *, created_after: str | None = None, created_before: str | None = None, cursor: str | None = None
) -> ApiRequest:
    """Build ``GET /v1/predictions``: the account's predictions, optionally bounded and paged.

    ``created_after`` and ``created_before`` are ISO 8601; ``cursor`` picks the page.
    """
    bounds = (("created_after", created_after), ("created_before", created_before), ("cursor", cursor))
    params = {name: value for name, value in bounds if value}
    query = f"?{urlencode(params)}" if params else ""
    return ApiRequest("GET", f"/v1/predictions{query}", quiet=True)


def cancel_prediction_request(prediction_id: str) -> ApiRequest:
    """Build ``POST /v1/predictions/{id}/cancel``."""
    return ApiRequest("POST", _prediction_path(prediction_id) + "/cancel")


#: What a Files API id may hold (the API's own are base32-ish; no ``/``, ``.`` or ``%``).
_FILE_ID = re.compile(r"[A-Za-z0-9_-]+")


def get_file_request(file_id: str) -> ApiRequest:
    """Build ``GET /v1/files/{id}``: a file's metadata (its checksums among them)."""
    if not _FILE_ID.fullmatch(file_id or ""):
        raise ValueError(f"not a file id: {file_id!r}")
    return ApiRequest("GET", f"/v1/files/{file_id}", quiet=True)


def file_id_of(url: str | None, base_url: str) -> str | None:
    """Return the Files API id ``url`` names when it is a file of the API at ``base_url``, else ``None``.

    ``url`` must be ``<base URL>/v1/files/<id>``, with one trailing ``/`` allowed: the same scheme,
    host and port (user info and query aside), under the base URL's path (its ``/v1``, if any,
    dropped), and an id of letters, digits, ``_`` and ``-`` only (so ``../predictions`` or
    ``<id>/download`` name no file). Anything unreadable is ``None``.
    """
    if not url:
        return None
    try:
        base, parts = urlsplit(base_url.rstrip("/")), urlsplit(url)
        if (parts.scheme, parts.hostname, parts.port) != (base.scheme, base.hostname, base.port):
            return None
    except ValueError:  # a port that is no number
        return None
    prefix = base.path.rstrip("/").removesuffix("/v1") + "/v1/files/"
    if not parts.path.startswith(prefix):
        return None
    file_id = parts.path[len(prefix) :].removesuffix("/")
    return file_id if _FILE_ID.fullmatch(file_id) else None


def account_request() -> ApiRequest:
    """Build ``GET /v1/account``: the account the token belongs to."""
    return ApiRequest("GET", "/v1/account")


def upload_file_request(content: bytes, filename: str, content_type: str) -> ApiRequest:
    """Build ``POST /v1/files``, retried like a read: a duplicate upload costs nothing."""
    return ApiRequest(
        "POST", "/v1/files", files={"content": (filename, content, content_type)}, read_timeout=120.0
    )


def download_request(settings: ClientSettings, url: str) -> ApiRequest:
    """Build the ``GET`` of an output file.

    ``path`` is the URL without query (which may hold a signature); ``headers`` carry the token only
    when the file is on the API's own origin.

    :raises FluxKontextAPIError: the URL is not http(s) (``file:``, ``javascript:``, ...).
    """
    parts = urlsplit(url)
    shown = urlunsplit(parts._replace(query="", fragment="", netloc=parts.netloc.rpartition("@")[2]))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FluxKontextAPIError(
            title="refused",
            detail=f"output URL {shown[:200]!r} is not an http(s) URL; it is not downloaded",
        )
    base = urlsplit(settings.base_url)
    same_origin = (parts.scheme, parts.hostname, parts.port) == (base.scheme, base.hostname, base.port)
    headers = {"Authorization": f"Bearer {settings.token}"} if same_origin and settings.token else {}
    return ApiRequest("GET", shown, headers=headers)


# --- responses ---------------------------------------------------------------------------------


def _problem(body: bytes, content_type: str) -> tuple[str | None, str | None]:
    """(title, detail) from a problem+json document, a JSON error, an HTML page or plain text."""
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        return None, None
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        title = doc.get("title")
        detail = doc.get("detail") or doc.get("error") or doc.get("message")
        if isinstance(detail, dict | list):
            detail = json.dumps(detail)[:500]
        return (str(title) if title else None), (str(detail)[:1000] if detail else None)
    if "html" in content_type or text.lstrip().startswith("<"):
        match = _HTML_TITLE.search(text)
        page = re.sub(r"\s+", " ", match.group(1)).strip() if match else "no title"
        return None, f"an HTML page ({page[:200]}) instead of the API's JSON; is the base URL right?"
    return None, re.sub(r"\s+", " ", text)[:500]


def parse_response(
    settings: ClientSettings,
    request: ApiRequest,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
) -> Any:
    """Decode a 2xx JSON body, or raise the matching exception for any other answer.

    :raises FluxKontextAuthError: 401/403. :raises FluxKontextNotFoundError: 404.
    :raises FluxKontextRateLimitError: 429 (with ``retry_after``). :raises FluxKontextServerError: 5xx.
    :raises FluxKontextAPIError: any other error status, or a 2xx body that is not JSON.
    """
    content_type = headers.get("content-type") or headers.get("Content-Type") or ""
    if 200 <= status < 300:
        try:
            return json.loads(body) if body else None
        except ValueError:
            _, detail = _problem(_redacted(settings, body), content_type)
            raise FluxKontextAPIError(
                status=status,
                title="malformed response",
                detail=settings.redact(detail or "empty body") + " (expected JSON)",
                method=request.method,
                path=request.path,
            ) from None
    # Redact the whole body before it is parsed and shortened: a token echoed in the problem's title,
    # or cut in half by the truncation of a long detail, must not show either.
    title, detail = _problem(_redacted(settings, body), content_type)
    kwargs: dict[str, Any] = {
        "status": status,
        "title": title,
        "detail": detail,
        "method": request.method,
        "path": request.path,
    }
    if status in (401, 403):
        return _raise(
            FluxKontextAuthError,
            kwargs,
            hint=auth_hint(settings),
        )
    if status == 404:
        return _raise(FluxKontextNotFoundError, kwargs, hint="Check the model name, version or prediction id")
    if status == 429:
        text = _redacted(settings, body).decode()
        return _raise(FluxKontextRateLimitError, kwargs, retry_after=parse_retry_after(headers, text))
    if status >= 500:
        return _raise(FluxKontextServerError, kwargs)
    return _raise(FluxKontextAPIError, kwargs)


def _redacted(settings: ClientSettings, body: bytes) -> bytes:
    return settings.redact(body.decode("utf-8", errors="replace")).encode()


def _raise(cls: type[FluxKontextAPIError], kwargs: dict[str, Any], **more: Any) -> Any:
    raise cls(**kwargs, **more)


# --- response bodies as models ------------------------------------------------------------------


_M = TypeVar("_M", bound=BaseModel)


def parsed_as(model: type[_M], data: Any) -> _M:
    """Parse a response body as ``model``; an answer of the wrong shape is an API error, not a crash."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise FluxKontextAPIError(
            title="unexpected response", detail=f"not a valid {model.__name__}: {problems}"
        ) from None


def parsed_prediction(data: Any) -> Prediction:
    """Parse a response body as a :class:`Prediction`."""
    return parsed_as(Prediction, data)


def parsed_page(data: Any) -> PredictionPage:
    """Parse a response body as a :class:`PredictionPage` (one page of the prediction list).

    A well-formed page (a list of JSON objects, cursors that are strings or null) is taken as it is,
    its items not copied one by one: a page holds up to 100, mostly of predictions nobody waits for.
    Anything else is validated, and refused as :func:`parsed_as` refuses it.
    """
    if (
        isinstance(data, dict)
        and isinstance(results := data.get("results", []), list)
        and all(isinstance(item, dict) for item in results)
        and all(isinstance(data.get(name), (str, type(None))) for name in ("next", "previous"))
        and "_fields_set" not in data
    ):
        return PredictionPage.model_construct(**data)
    return parsed_as(PredictionPage, data)


def parse_retry_after(headers: Mapping[str, str], body: str | None) -> float | None:
    """Return the seconds a 429 asks to wait, from any form Replicate uses.

    The forms: the ``Retry-After`` header (seconds or an HTTP date), a JSON ``retry_after`` field,
    "resets in ~30s" (or "~2m", "in ~1 minute"), "Expected available in 1 second". ``body``: the
    answer's text (or its detail). ``None`` when none of them is there or readable.
    """
    value = headers.get("retry-after") or headers.get("Retry-After")
    if value:
        value = value.strip()
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                when = None
            if when is not None:
                return max(0.0, when.timestamp() - time.time())
    if not body:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and (field := doc.get("retry_after")) is not None:
        try:
            return max(0.0, float(field))
        except (TypeError, ValueError):
            pass
    if match := _RESETS_IN.search(body):
        return float(match.group(1)) * (60.0 if match.group(2).lower().startswith("m") else 1.0)
    if match := _AVAILABLE_IN.search(body):
        return float(match.group(1))
    return None
