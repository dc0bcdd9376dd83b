"""The failure policy: which failed request is sent again, after how long, and what is raised when
trying stops.

Every request of the provider (sync, async, downloads, polls) runs through one :class:`Attempts`
loop, driven by ``time.sleep`` (:meth:`Attempts.run_sync`) or ``asyncio.sleep``
(:meth:`Attempts.run_async`). :func:`classify` decides for each failure: retry it, tolerate it (an
unreadable answer to a read: only a caller that polls anyway, with ``Budget(tolerate=True)``, sends
it again), or fail. A create is never sent again where it may have reached the server; when
trying stops, :func:`final_error` says so with
:class:`~airflow_provider_kontext.exceptions.KontextPredictionMayExistError`.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import json
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from airflow_provider_kontext.exceptions import (
    KontextAPIError,
    KontextAuthError,
    KontextDeadlineError,
    KontextError,
    KontextNotFoundError,
    KontextPredictionMayExistError,
    KontextRateLimitError,
    KontextServerError,
    KontextTLSError,
    KontextTransportError,
)

if TYPE_CHECKING:
    from airflow_provider_kontext.hooks._http import ApiRequest
    from airflow_provider_kontext.hooks.connection import ClientSettings

__all__ = [
    "Attempts",
    "Budget",
    "Verdict",
    "backoff_seconds",
    "classify",
    "fail_task_on_final_answers",
    "final_error",
    "parse_retry_after",
]

_T = TypeVar("_T")

# Replicate's 429 wordings: "Your rate limit resets in ~30s." (today) and "Expected available in
# 1 second." (older); minutes where the wait is long ("~2m", "in ~1 minute").
_RESETS_IN = re.compile(
    r"resets?\s+in\s*~?\s*(\d+(?:\.\d+)?)\s*(seconds?|secs?|s|minutes?|mins?|m)\b", re.IGNORECASE
)
_AVAILABLE_IN = re.compile(r"available\s+in\s*~?\s*(\d+(?:\.\d+)?)\s*seconds?\b", re.IGNORECASE)


class Verdict(enum.Enum):
    """What to do after a failed attempt."""

    RETRY = "retry"  # send it again after a backoff
    TOLERATE = "tolerate"  # an unreadable answer to a read: again only where the caller polls anyway
    FAIL = "fail"  # no retry can fix it, or a retry could create a second prediction


def _unreadable(exc: BaseException) -> bool:
    """An answer arrived but could not be read (not JSON, not the documented shape)."""
    return (
        isinstance(exc, KontextAPIError)
        and not isinstance(exc, KontextTransportError)
        and (exc.status is None or 200 <= exc.status < 300)
    )


def classify(exc: BaseException, request: ApiRequest) -> Verdict:
    """Judge a failed attempt of ``request``.

    429 is always retried (nothing was done). Reads and other idempotent calls are retried on 5xx and
    transport errors; a create only where the connection never opened. A TLS handshake that fails
    for good (untrusted certificate, a server without TLS) is never retried. An unreadable answer to a
    read is tolerated; to a create it fails (the server may have acted). Everything else fails.
    """
    if isinstance(exc, KontextRateLimitError):
        return Verdict.RETRY
    if isinstance(exc, KontextTLSError):
        return Verdict.FAIL
    if isinstance(exc, KontextTransportError):
        return Verdict.RETRY if request.idempotent or not exc.request_sent else Verdict.FAIL
    if isinstance(exc, KontextServerError):
        return Verdict.RETRY if request.idempotent else Verdict.FAIL
    if _unreadable(exc) and request.idempotent:
        return Verdict.TOLERATE
    return Verdict.FAIL


def _may_have_created(exc: BaseException) -> bool:
    if isinstance(exc, KontextTransportError):
        return exc.request_sent
    return isinstance(exc, KontextServerError) or _unreadable(exc)


def final_error(request: ApiRequest, exc: BaseException, body: Any = None) -> BaseException:
    """The exception to raise once trying stops: a create that may have reached the server says so,
    so nobody retries it blindly and pays twice. ``body``: the decoded answer, if any, whose ``id``
    is named in the message."""
    if request.idempotent or not _may_have_created(exc):
        return exc
    named = body.get("id") if isinstance(body, dict) else None
    hint = f" The answer named prediction {named[:64]!r}." if isinstance(named, str) else ""
    return KontextPredictionMayExistError(
        f"{exc} -- the create request may have reached the server, so a prediction may exist and be "
        "billed. It was not retried automatically, to avoid starting a second one; look for it in the "
        f"account's prediction list before starting another.{hint}",
        status=getattr(exc, "status", None),
        method=request.method,
        path=request.path,
    )


def parse_retry_after(headers: Mapping[str, str], body: str | None) -> float | None:
    """Seconds a 429 asks to wait, from every form Replicate uses: the ``Retry-After`` header
    (seconds or an HTTP date), a JSON ``retry_after`` field, "resets in ~30s" (or "~2m", "in ~1
    minute"), "Expected available in 1 second". ``body``: the answer's text (or its detail).
    ``None`` when none of them is there or readable."""
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


def backoff_seconds(settings: ClientSettings, attempt: int, exc: BaseException | None) -> float:
    """Wait before retry number ``attempt`` (1-based): the server's ``retry_after`` when given
    (capped at ``retry_after_max``), else capped exponential backoff with jitter."""
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        return float(min(retry_after + random.uniform(0, 0.1), settings.retry_after_max))
    ceiling: float = min(settings.backoff_max, settings.backoff_base * (2 ** (attempt - 1)))
    return ceiling * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class Budget:
    """How long one caller keeps trying a request, where it differs from the connection's settings.

    :param retries: retries after the first attempt (``None``: the connection's ``max_retries``).
    :param tolerate: also send again after an unreadable answer (polls, which would poll again).
    :param deadline: Unix time past which no wait reaches: a retry that would start later raises
        :class:`~airflow_provider_kontext.exceptions.KontextDeadlineError` instead.
    :param grace: an attempt still in flight ``grace`` seconds after ``deadline`` is abandoned (async
        path) with the same error.
    :param priority: Unix time by which the request is most likely to be useful (a poll: when its
        prediction is expected to end); where the account's request budget is short, the smallest
        goes first (:mod:`airflow_provider_kontext.hooks.budget`). ``None``: now.
    """

    retries: int | None = None
    tolerate: bool = False
    deadline: float | None = None
    grace: float = 1.0
    priority: float | None = None


_DEFAULT_BUDGET = Budget()


class Attempts:
    """One request's attempt loop: the state both drivers share, and the two drivers.

    ``send(settings, attempt_number)`` makes one attempt. An auth error looks the connection up
    again once (``refresh(stale)``: the new settings, or ``None`` if unchanged) and, with new
    settings, sends at once again.

    :raises KontextError: :func:`final_error` of the last failure once trying stops.
    :raises KontextDeadlineError: the budget's deadline came first.
    """

    def __init__(
        self,
        settings: ClientSettings,
        request: ApiRequest,
        *,
        budget: Budget | None = None,
        log_retry: Callable[[ApiRequest, int, BaseException, float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.request = request
        self.budget = budget or _DEFAULT_BUDGET
        self.number = 1
        self._log_retry = log_retry
        self._refreshed = False

    def after(self, exc: KontextError) -> float | None:
        """Seconds to wait before the next attempt, ``None`` to refresh the settings first; raises
        the final error when trying stops."""
        if isinstance(exc, KontextAuthError) and not self._refreshed:
            self._refreshed = True
            return None
        verdict = classify(exc, self.request)
        retries = self.settings.max_retries if self.budget.retries is None else self.budget.retries
        if (
            verdict is Verdict.FAIL
            or (verdict is Verdict.TOLERATE and not self.budget.tolerate)
            or self.number > retries
        ):
            raise final_error(self.request, exc) from None
        delay = backoff_seconds(self.settings, self.number, exc)
        deadline = self.budget.deadline
        if deadline is not None and time.time() + delay >= deadline:
            raise KontextDeadlineError(f"{self.request.label} still failing at the deadline: {exc}") from None
        if self._log_retry is not None:
            self._log_retry(self.request, self.number, exc, delay)
        self.number += 1
        return delay

    def refreshed(self, fresh: ClientSettings | None, exc: KontextError) -> float:
        """Take the settings looked up again after ``exc`` (an auth error): no wait; re-raise ``exc``
        when they did not change (the same token would fail the same way)."""
        if fresh is None:
            raise exc
        self.settings = fresh
        self.number = 1
        return 0.0

    def run_sync(
        self,
        send: Callable[[ClientSettings, int], _T],
        refresh: Callable[[ClientSettings], ClientSettings | None],
        sleep: Callable[[float], None] = time.sleep,
    ) -> _T:
        """Drive the loop with blocking calls."""
        while True:
            try:
                return send(self.settings, self.number)
            except KontextError as exc:
                delay = self.after(exc)
                if delay is None:
                    delay = self.refreshed(refresh(self.settings), exc)
            if delay > 0:
                sleep(delay)

    async def run_async(
        self,
        send: Callable[[ClientSettings, int], Awaitable[_T]],
        refresh: Callable[[ClientSettings], Awaitable[ClientSettings | None]],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> _T:
        """Drive the loop in an event loop; an attempt in flight past the deadline is abandoned."""
        while True:
            try:
                return await self._cut(send(self.settings, self.number))
            except KontextError as exc:
                delay = self.after(exc)
                if delay is None:
                    delay = self.refreshed(await refresh(self.settings), exc)
            if delay > 0:
                await sleep(delay)

    async def _cut(self, attempt: Awaitable[_T]) -> _T:
        if self.budget.deadline is None:
            return await attempt
        remaining = self.budget.deadline + self.budget.grace - time.time()
        try:
            return await asyncio.wait_for(attempt, timeout=max(0.0, remaining))
        except asyncio.TimeoutError:
            raise KontextDeadlineError(f"{self.request.label} had no answer by the deadline") from None


#: Statuses of a create (or upload) answer that the same request would get again: the task fails
#: without retries (bad token or no access, unknown model, input the server rejects).
FINAL_CREATE_STATUSES = frozenset({401, 403, 404, 422})


@contextmanager
def fail_task_on_final_answers(what: str) -> Iterator[None]:
    """Turn an answer to a create or upload that the same request would get again (401, 403, 404,
    422, or a TLS handshake that fails for good) into an ``AirflowFailException``: retries would
    repeat the failure (and, on 401/403, knock on the account with a refused token), so the task
    fails once, saying why."""
    from airflow_provider_kontext.compat import AirflowFailException

    try:
        yield
    except KontextAPIError as exc:
        if exc.status not in FINAL_CREATE_STATUSES and not isinstance(exc, KontextTLSError):
            raise
        if isinstance(exc, KontextTLSError):
            why = "the TLS handshake fails the same way each time; fix the connection, then clear the task"
        elif isinstance(exc, KontextAuthError):
            why = "the token is refused; fix the connection, then clear the task"
        elif isinstance(exc, KontextNotFoundError):
            why = "the model or version does not exist for this token"
        else:
            why = "the server rejects this input"
        raise AirflowFailException(
            f"{exc} Not retried: the {what} would get the same answer ({why})."
        ) from None
