"""Define every exception of the provider: one small hierarchy for every way an edit can fail.

Every message is written for the person who has to fix the cause, and none ever contains the API
token: messages are built from the status, the server's problem document and the request path only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any


class FluxKontextError(Exception):
    """Base class of every error this provider raises."""


class FluxKontextInputError(FluxKontextError, ValueError):
    """The model inputs or operator arguments are invalid; raised before any HTTP call is made.

    ``errors`` holds one ``(field, message)`` pair per problem, for programs that want them.
    """

    def __init__(self, message: str, errors: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class FluxKontextAPIError(FluxKontextError):
    """The API answered with an error status, or with a body that is not what the API documents.

    :param status: the HTTP status code (``None`` when no response arrived or it was malformed).
    :param title: the problem's title (RFC 7807 ``title``) or the HTTP reason.
    :param detail: the problem's detail, or the start of a plain-text body.
    :param method: the HTTP method of the failed request.
    :param path: the request path below the base URL (never a full URL, which may carry secrets).
    :param hint: what the user can do about it.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        status: int | None = None,
        title: str | None = None,
        detail: str | None = None,
        method: str | None = None,
        path: str | None = None,
        hint: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.method = method
        self.path = path
        self.hint = hint
        self.retry_after = retry_after
        super().__init__(message or self._compose())

    def _compose(self) -> str:
        msg = f"{self.method} {self.path}" if self.method and self.path else (self.path or "Request")
        msg += " failed"
        if self.status is not None:
            msg += f" with HTTP {self.status}"
        if self.title:
            msg += f" ({self.title})"
        if self.detail:
            msg += f": {self.detail}"
        if self.hint:
            msg += f". {self.hint}"
        return msg


class FluxKontextAuthError(FluxKontextAPIError):
    """401 or 403: the token is missing, wrong, or lacks access."""


class FluxKontextNotFoundError(FluxKontextAPIError):
    """404: the model, version or prediction does not exist (or is not visible to this token)."""


class FluxKontextRateLimitError(FluxKontextAPIError):
    """429: the API throttled the request. ``retry_after`` holds the seconds it asked us to wait."""


class FluxKontextServerError(FluxKontextAPIError):
    """5xx: the API (or a proxy in front of it) failed."""


class FluxKontextTransportError(FluxKontextAPIError):
    """No response arrived: connection refused or reset, DNS failure, timeout.

    ``request_sent`` is ``False`` only where the request provably never left this machine
    (the connection could not be opened); otherwise the server may have acted on it.
    """

    def __init__(
        self, message: str, *, request_sent: bool, method: str | None = None, path: str | None = None
    ) -> None:
        self.request_sent = request_sent
        super().__init__(message, method=method, path=path)


class FluxKontextTLSError(FluxKontextTransportError):
    """The TLS handshake failed the way it will fail again.

    The server's certificate is not trusted or names another host, or the server does not speak TLS
    at all.

    Nothing was sent (the handshake comes first), and no retry can change the answer: the
    connection's host, its scheme or the trust store (``SSL_CERT_FILE``) must be fixed.
    """

    def __init__(self, message: str, *, method: str | None = None, path: str | None = None) -> None:
        super().__init__(message, request_sent=False, method=method, path=path)


class FluxKontextPredictionMayExistError(FluxKontextAPIError):
    """A create request failed in a way that does not prove the prediction was not created.

    Creating is not idempotent, so it is not retried: a retry could start, and bill, a second
    prediction. Check the account's predictions list before starting another.
    """


class FluxKontextDeadlineError(FluxKontextError):
    """A request was still failing, or had no answer, when its caller's deadline came.

    A poll at the end of the wait, say: the caller reports a timeout, not an error.
    """


class FluxKontextPredictionFailed(FluxKontextError):
    """The prediction ended in ``failed``, ``canceled`` or ``aborted``, or did not finish in time.

    :param prediction_id: the prediction's id.
    :param status: its terminal status (or ``timeout``).
    :param error: the model's error text, if any.
    :param logs_tail: the last lines of its logs, to see how far it got.
    """

    def __init__(
        self,
        message: str,
        *,
        prediction_id: str | None = None,
        status: str | None = None,
        error: Any = None,
        logs_tail: str | None = None,
    ) -> None:
        self.prediction_id = prediction_id
        self.status = status
        self.error = error
        self.logs_tail = logs_tail
        super().__init__(message)


class FluxKontextBatchFailed(FluxKontextError):
    """Some images of a batch were not edited; a retry of the task redoes only those."""


_NO_RETRY_DOCS = {
    "FluxKontextPredictionFailedNoRetry": (
        "FluxKontextPredictionFailed",
        """Fail the task without retries: a prediction failed, was canceled, or its paid output is unusable.

        A retry would start (and bill) a new prediction likely to end the same way. Switched off with
        ``retry_failed_predictions=True``.
        """,
    ),
    "FluxKontextBatchFailedNoRetry": (
        "FluxKontextBatchFailed",
        """Fail a batch without retries: the images left unedited are ones no retry would mend.

        The model failed them, or the server rejects their input.
        """,
    ),
}

if TYPE_CHECKING:
    from airflow_provider_kontext.compat import AirflowFailException

    class FluxKontextPredictionFailedNoRetry(FluxKontextPredictionFailed, AirflowFailException):
        """Fail the task without retries (see ``_NO_RETRY_DOCS``)."""

    class FluxKontextBatchFailedNoRetry(FluxKontextBatchFailed, AirflowFailException):
        """Fail a batch without retries (see ``_NO_RETRY_DOCS``)."""


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """Yield ``exc`` and everything it wraps (cause, context, ``reason``, args), each once.

    Transports wrap the error that tells what happened (an SSL error in a connector error, say);
    the hooks look for it in the whole chain.
    """
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo.extend([item.__cause__, item.__context__, getattr(item, "reason", None), *item.args])


def __getattr__(name: str) -> Any:
    """Build the two exceptions that are also Airflow's ``AirflowFailException`` on first use.

    They fail a task without retries, so they derive from Airflow's class; built lazily, this module
    stays free of Airflow imports for the emulator and the provider's metadata.
    """
    name = {"KontextPredictionFailedNoRetry": "FluxKontextPredictionFailedNoRetry"}.get(name, name)
    name = {"KontextBatchFailedNoRetry": "FluxKontextBatchFailedNoRetry"}.get(name, name)
    if name in globals():
        return globals()[name]
    if name not in _NO_RETRY_DOCS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from airflow_provider_kontext.compat import AirflowFailException

    base, doc = _NO_RETRY_DOCS[name]
    cls = type(name, (globals()[base], AirflowFailException), {"__doc__": doc, "__module__": __name__})
    globals()[name] = cls
    return cls


# The names of releases before 0.2 (one class prefix since): importable, the same classes.
KontextError = FluxKontextError
KontextInputError = FluxKontextInputError
KontextAPIError = FluxKontextAPIError
KontextAuthError = FluxKontextAuthError
KontextNotFoundError = FluxKontextNotFoundError
KontextRateLimitError = FluxKontextRateLimitError
KontextServerError = FluxKontextServerError
KontextTransportError = FluxKontextTransportError
KontextTLSError = FluxKontextTLSError
KontextPredictionMayExistError = FluxKontextPredictionMayExistError
KontextDeadlineError = FluxKontextDeadlineError
KontextPredictionFailed = FluxKontextPredictionFailed
KontextBatchFailed = FluxKontextBatchFailed
