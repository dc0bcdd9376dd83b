"""Decide which failed request is sent again, after how long, and what is raised when trying stops.

Every request (sync, async, downloads, polls) runs through one :class:`Attempts` loop, driven by
``time.sleep`` or ``asyncio.sleep``. :func:`classify` judges each failure: retry it, tolerate it
(an unreadable answer to a read, sent again only by a caller that polls anyway), or fail. A create
is never sent again where it may have reached the server; :func:`final_error` then says so with
:class:`~airflow_provider_kontext.exceptions.FluxKontextPredictionMayExistError`.

A throttled create (429) provably created nothing, and worker processes that cannot coordinate
share the account's create limit: it is sent again until its caller's deadline (else
:func:`create_throttle_bound`), after waits that spread throttled creators out (:func:`throttle_wait`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from airflow_provider_kontext.exceptions import (
    FluxKontextAPIError,
    FluxKontextAuthError,
    FluxKontextDeadlineError,
    FluxKontextError,
    FluxKontextPredictionMayExistError,
    FluxKontextRateLimitError,
    FluxKontextServerError,
    FluxKontextTLSError,
    FluxKontextTransportError,
)
from airflow_provider_kontext.hooks.api import ApiRequest, parsed_as
from airflow_provider_kontext.models import Prediction

if TYPE_CHECKING:
    from airflow_provider_kontext.hooks.connection import ClientSettings

_T = TypeVar("_T")


class Verdict(enum.Enum):
    """What to do after a failed attempt."""

    RETRY = "retry"  # send it again after a backoff
    TOLERATE = "tolerate"  # an unreadable answer to a read: again only where the caller polls anyway
    FAIL = "fail"  # no retry can fix it, or a retry could create a second prediction


def _unreadable(exc: BaseException) -> bool:
    """Tell whether an answer arrived but could not be read (not JSON, not the documented shape)."""
    return (
        isinstance(exc, FluxKontextAPIError)
        and not isinstance(exc, FluxKontextTransportError)
        and (exc.status is None or 200 <= exc.status < 300)
    )


def classify(exc: BaseException, request: ApiRequest) -> Verdict:
    """Judge a failed attempt of ``request``.

    429 is always retried (nothing was done). Reads and other idempotent calls are retried on 5xx and
    transport errors; a create only where the connection never opened. A TLS handshake that fails
    for good (untrusted certificate, a server without TLS) is never retried. An unreadable answer to a
    read is tolerated; to a create it fails (the server may have acted). Everything else fails.
    """
    if isinstance(exc, FluxKontextRateLimitError):
        return Verdict.RETRY
    if isinstance(exc, FluxKontextTLSError):
        return Verdict.FAIL
    if isinstance(exc, FluxKontextTransportError):
        return Verdict.RETRY if request.idempotent or not exc.request_sent else Verdict.FAIL
    if isinstance(exc, FluxKontextServerError):
        return Verdict.RETRY if request.idempotent else Verdict.FAIL
    if _unreadable(exc) and request.idempotent:
        return Verdict.TOLERATE
    return Verdict.FAIL


def _may_have_created(exc: BaseException) -> bool:
    if isinstance(exc, FluxKontextTransportError):
        return exc.request_sent
    return isinstance(exc, FluxKontextServerError) or _unreadable(exc)


def final_error(request: ApiRequest, exc: BaseException, body: Any = None) -> BaseException:
    """Return the exception to raise once trying stops.

    A create that may have reached the server says so, so nobody retries it blindly and pays twice.
    ``body``: the decoded answer, if any, whose ``id`` is named in the message.
    """
    if request.idempotent or not _may_have_created(exc):
        return exc
    named = body.get("id") if isinstance(body, dict) else None
    hint = f" The answer named prediction {named[:64]!r}." if isinstance(named, str) else ""
    return FluxKontextPredictionMayExistError(
        f"{exc} -- the create request may have reached the server, so a prediction may exist and be "
        "billed. It was not retried automatically, to avoid starting a second one; look for it in the "
        f"account's prediction list before starting another.{hint}",
        status=getattr(exc, "status", None),
        method=request.method,
        path=request.path,
    )


def backoff_seconds(settings: ClientSettings, attempt: int, exc: BaseException | None) -> float:
    """Return the wait before retry number ``attempt`` (1-based).

    The server's ``retry_after`` when given (capped at ``retry_after_max``), else capped exponential
    backoff with jitter.
    """
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        return float(min(retry_after + random.uniform(0, 0.1), settings.retry_after_max))
    ceiling: float = min(settings.backoff_max, settings.backoff_base * (2 ** (attempt - 1)))
    return ceiling * random.uniform(0.5, 1.0)


#: The narrowest window a throttled create's waits are spread over, in seconds, when the server
#: names a shorter reset (or none): wide enough to part creators that were throttled together.
THROTTLE_SPREAD_MIN = 1.0
#: The widest window, as a multiple of the narrowest: wider, creates that have waited longest
#: would sit out spare capacity while fresh ones take it.
THROTTLE_SPREAD_GROWTH = 8


def throttle_wait(
    settings: ClientSettings,
    throttled: int,
    retry_after: float | None,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Return the wait before sending a throttled create again, after its ``throttled``-th 429 (from 1).

    The reset the server names (``backoff_base`` when it names none; at most ``retry_after_max``),
    then a random share of a window that starts at that reset (at least :data:`THROTTLE_SPREAD_MIN`)
    and doubles with every 429 of the same create, up to :data:`THROTTLE_SPREAD_GROWTH` times its
    start and never beyond ``backoff_max``. Creators throttled at the same instant come back spread
    over the window, and the more of them there are, the fewer attempts each makes.
    """
    named = settings.backoff_base if retry_after is None else retry_after
    reset = max(0.0, min(named, settings.retry_after_max))
    growth = min(2.0 ** (throttled - 1), THROTTLE_SPREAD_GROWTH)
    window = min(settings.backoff_max, max(reset, THROTTLE_SPREAD_MIN) * growth)
    return reset + uniform(0.0, max(0.0, window))


def create_throttle_bound(settings: ClientSettings) -> float:
    """Return how long a throttled create keeps trying when its caller gives no deadline.

    That is ``max_retries`` waits of the longest reset (``retry_after_max``), 300 s by default.
    """
    return settings.max_retries * settings.retry_after_max


@dataclass(frozen=True)
class RetryLimits:
    """How long one caller keeps trying a request, where it differs from the connection's settings.

    :param retries: retries after the first attempt (``None``: the connection's ``max_retries``).
    :param tolerate: also send again after an unreadable answer (polls, which would poll again).
    :param deadline: Unix time past which no wait reaches: a retry that would start later raises
        :class:`~airflow_provider_kontext.exceptions.FluxKontextDeadlineError` instead. For a create,
        also how long a throttled one keeps trying (:class:`Attempts`).
    :param grace: an attempt still in flight ``grace`` seconds after ``deadline`` is abandoned (async
        path) with the same error; never a create's, which may be creating the prediction.
    :param priority: Unix time by which the request is most likely to be useful (a poll: when its
        prediction is expected to end); where the account's rate limiter is short, the smallest
        goes first (:mod:`airflow_provider_kontext.hooks.rate_limit`). ``None``: now.
    """

    retries: int | None = None
    tolerate: bool = False
    deadline: float | None = None
    grace: float = 1.0
    priority: float | None = None


class Attempts:
    """One request's attempt loop: the state both drivers share, and the two drivers.

    ``send(settings, attempt_number)`` makes one attempt. An auth error looks the connection up
    again once (``refresh(stale)``: the new settings, or ``None`` if unchanged) and, with new
    settings, sends at once again. A throttled create is sent again until its time is up (see the
    module); its first 429 is logged at info, the rest at debug, and one line says when it went through.

    :param log: ``logging.Logger.log``-like, for the throttled create's lines.
    :param clock: Unix time (tests pass their own).
    :param uniform: the jitter's random draw; the ``random`` module's by default, which is reseeded
        in forked workers (a private generator would repeat the parent's draws in every worker).
    :raises FluxKontextError: :func:`final_error` of the last failure once trying stops.
    :raises FluxKontextDeadlineError: the retry limits' deadline came first.
    :raises FluxKontextRateLimitError: a create still throttled when its time was up (nothing created).
    """

    def __init__(
        self,
        settings: ClientSettings,
        request: ApiRequest,
        *,
        retry_limits: RetryLimits | None = None,
        log_retry: Callable[[ApiRequest, int, BaseException, float], None] | None = None,
        log: Callable[..., None] | None = None,
        clock: Callable[[], float] | None = None,
        uniform: Callable[[float, float], float] | None = None,
    ) -> None:
        self.settings = settings
        self.request = request
        self.limits = retry_limits or RetryLimits()
        self.number = 1
        #: 429s this create has had (reads do not count them).
        self.throttled = 0
        self._log_retry = log_retry
        self._log = log
        self._clock = clock or time.time
        self._uniform = uniform or random.uniform
        self._started = self._clock()
        self._refreshed = False

    def after(self, exc: FluxKontextError) -> float | None:
        """Return the seconds to wait before the next attempt, ``None`` to refresh the settings first.

        :raises FluxKontextError: the final error, when trying stops.
        """
        if isinstance(exc, FluxKontextAuthError) and not self._refreshed:
            self._refreshed = True
            return None
        verdict = classify(exc, self.request)
        retries = self.settings.max_retries if self.limits.retries is None else self.limits.retries
        if isinstance(exc, FluxKontextRateLimitError) and not self.request.idempotent and retries > 0:
            return self._throttled_create(exc)
        gives_up = verdict is Verdict.FAIL or (verdict is Verdict.TOLERATE and not self.limits.tolerate)
        if gives_up or self.number > retries:
            raise final_error(self.request, exc) from None
        delay = backoff_seconds(self.settings, self.number, exc)
        if self.limits.deadline is not None and self._clock() + delay >= self.limits.deadline:
            raise FluxKontextDeadlineError(
                f"{self.request.label} still failing at the deadline: {exc}"
            ) from None
        if self._log_retry is not None:
            self._log_retry(self.request, self.number, exc, delay)
        self.number += 1
        return delay

    def _throttled_create(self, exc: FluxKontextRateLimitError) -> float:
        """Return the wait after a create's 429: jittered, the last one cut to end at the deadline."""
        self.throttled += 1
        now = self._clock()
        if self.limits.deadline is not None:
            until, why = self.limits.deadline, "the deadline"
        else:
            bound = create_throttle_bound(self.settings)
            until = self._started + bound
            why = f"the create's bound without a deadline (max_retries x retry_after_max = {bound:g} s)"
        delay = throttle_wait(self.settings, self.throttled, exc.retry_after, self._uniform)
        left = until - now
        if delay >= left:
            named = 0.0 if exc.retry_after is None else min(exc.retry_after, self.settings.retry_after_max)
            if left <= max(named, 0.0):  # not even the reset fits: the next attempt would be throttled
                raise FluxKontextRateLimitError(
                    f"{self.request.label} still throttled (HTTP 429) when {why} came "
                    f"({_utc(until)}), after {self.throttled} throttled attempts over "
                    f"{now - self._started:.0f} s: more creates share the account's limit than it "
                    "lets through. Nothing was created (a 429 creates nothing), so it is safe to "
                    f"retry. Last answer: {exc}",
                    status=exc.status,
                    detail=exc.detail,
                    method=self.request.method,
                    path=self.request.path,
                    retry_after=exc.retry_after,
                ) from None
            delay = left  # the last attempt goes at the deadline
        if self._log is not None:
            first = self.throttled == 1
            self._log(
                logging.INFO if first else logging.DEBUG,
                "%s throttled (429 #%d: %s); nothing was created. Sending it again in %.1fs (with "
                "jitter), until %s at the latest%s",
                self.request.label,
                self.throttled,
                exc.detail or exc,
                delay,
                _utc(until),
                "; further 429s of it are logged at debug level" if first else "",
            )
        self.number += 1
        return delay

    def _succeeded(self) -> None:
        if self.throttled and self._log is not None:
            took = (self.request.label, self.throttled, self._clock() - self._started)
            self._log(logging.INFO, "%s went through after %d throttled attempts (%.1f s)", *took)

    def refreshed(self, fresh: ClientSettings | None, exc: FluxKontextError) -> float:
        """Take the settings looked up again after ``exc`` (an auth error) and return no wait.

        Re-raises ``exc`` when they did not change (the same token would fail the same way).
        """
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
                result = send(self.settings, self.number)
            except FluxKontextError as exc:
                delay = self.after(exc)
                if delay is None:
                    delay = self.refreshed(refresh(self.settings), exc)
            else:
                self._succeeded()
                return result
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
                result = await self._within_deadline(send(self.settings, self.number))
            except FluxKontextError as exc:
                delay = self.after(exc)
                if delay is None:
                    delay = self.refreshed(await refresh(self.settings), exc)
            else:
                self._succeeded()
                return result
            if delay > 0:
                await sleep(delay)

    async def _within_deadline(self, attempt: Awaitable[_T]) -> _T:
        """Await ``attempt``, abandoned ``grace`` after the deadline unless it is a create.

        A create in flight is never abandoned: it may be creating the prediction.
        """
        if self.limits.deadline is None or not self.request.idempotent:
            return await attempt
        remaining = self.limits.deadline + self.limits.grace - self._clock()
        try:
            return await asyncio.wait_for(attempt, timeout=max(0.0, remaining))
        except asyncio.TimeoutError:
            raise FluxKontextDeadlineError(f"{self.request.label} had no answer by the deadline") from None


def _utc(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


#: Statuses of a create (or upload) answer that the same request would get again: the task fails
#: without retries (bad token or no access, unknown model, input the server rejects).
FINAL_CREATE_STATUSES = frozenset({401, 403, 404, 422})


def parsed_created(request: ApiRequest, body: Any) -> Prediction:
    """Return the prediction a create answered with.

    An unreadable answer to a create is an uncertain create
    (:class:`FluxKontextPredictionMayExistError`), never a reason to create again.
    """
    try:
        return parsed_as(Prediction, body)
    except FluxKontextAPIError as exc:
        raise final_error(request, exc, body) from None


def refused_create(error: FluxKontextAPIError) -> bool:
    """Return whether a create's error is a 4xx answer, so the server created nothing.

    An uncertain create is never one: there may be a prediction for a retry to look for.
    """
    status = error.status
    maybe = isinstance(error, FluxKontextPredictionMayExistError)
    return not maybe and status is not None and 400 <= status < 500
