"""Test the failure policy (``hooks/retry.py``): verdicts, a 429's wait, the one attempt loop.

The failure policy (``airflow_provider_kontext.hooks.retry``): the verdict for every failure, the wait
a 429 names in each of Replicate's forms, and the one attempt loop driven sync and async.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from typing import Any

import pytest

from airflow_provider_kontext.exceptions import (
    FluxKontextAPIError,
    FluxKontextAuthError,
    FluxKontextDeadlineError,
    FluxKontextNotFoundError,
    FluxKontextPredictionMayExistError,
    FluxKontextRateLimitError,
    FluxKontextServerError,
    FluxKontextTransportError,
)
from airflow_provider_kontext.hooks.api import (
    ClientSettings,
    create_prediction_request,
    get_prediction_request,
    parse_response,
    parse_retry_after,
)
from airflow_provider_kontext.hooks.retry import Attempts, RetryLimits, Verdict, classify

SETTINGS = ClientSettings(conn_id="c", base_url="https://api.example", max_retries=2)
GET = get_prediction_request("p1")
CREATE = create_prediction_request("owner/model", {"prompt": "x"})


# --- 429: every form of the wait ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "body", "seconds"),
    [
        ({"Retry-After": "12"}, None, 12),
        ({"retry-after": " 1.5 "}, None, 1.5),
        ({"Retry-After": "-3"}, None, 0),
        ({}, '{"detail": "Request was throttled. Your rate limit resets in ~30s."}', 30),
        ({}, "Request was throttled. Your rate limit resets in ~2s.", 2),
        ({}, "Your rate limit resets in ~2m.", 120),
        ({}, "Your rate limit resets in ~1 minute.", 60),
        ({}, "Your rate limit resets in 45 seconds", 45),
        ({}, '{"detail": "Request was throttled. Expected available in 1 second."}', 1),
        ({}, "Request was throttled. Expected available in 4 seconds.", 4),
        ({}, "Expected available in 0.5 second.", 0.5),
        ({}, '{"detail": "slow down", "retry_after": 7}', 7),
        ({}, '{"retry_after": "2.5"}', 2.5),
        ({"Retry-After": "garbage"}, "Expected available in 4 seconds.", 4),
        ({"Retry-After": "3"}, "Your rate limit resets in ~30s.", 3),  # the header first
    ],
)
def test_every_form_of_the_wait(headers: dict[str, str], body: str | None, seconds: float) -> None:
    assert parse_retry_after(headers, body) == seconds


def test_retry_after_as_an_http_date() -> None:
    later = email.utils.formatdate(time.time() + 100, usegmt=True)
    assert 95 <= parse_retry_after({"Retry-After": later}, None) <= 100  # type: ignore[operator]
    past = email.utils.formatdate(time.time() - 100, usegmt=True)
    assert parse_retry_after({"Retry-After": past}, None) == 0


@pytest.mark.parametrize("body", [None, "", "throttled", '{"detail": "throttled"}', '{"retry_after": "x"}'])
def test_no_wait_named(body: str | None) -> None:
    assert parse_retry_after({}, body) is None


def test_a_429_answer_carries_the_wait() -> None:
    body = b'{"detail":"Request was throttled. Your rate limit resets in ~2s."}'
    with pytest.raises(FluxKontextRateLimitError) as info:
        parse_response(SETTINGS, CREATE, 429, {"Content-Type": "application/json"}, body)
    assert info.value.retry_after == 2


# --- verdicts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "on_get", "on_create"),
    [
        (FluxKontextRateLimitError(status=429), Verdict.RETRY, Verdict.RETRY),
        (FluxKontextServerError(status=503), Verdict.RETRY, Verdict.FAIL),
        (FluxKontextTransportError("reset", request_sent=True), Verdict.RETRY, Verdict.FAIL),
        (FluxKontextTransportError("refused", request_sent=False), Verdict.RETRY, Verdict.RETRY),
        (FluxKontextAPIError(title="unexpected response"), Verdict.TOLERATE, Verdict.FAIL),
        (FluxKontextAPIError(status=200, title="malformed response"), Verdict.TOLERATE, Verdict.FAIL),
        (FluxKontextAuthError(status=401), Verdict.FAIL, Verdict.FAIL),
        (FluxKontextNotFoundError(status=404), Verdict.FAIL, Verdict.FAIL),
        (FluxKontextAPIError(status=422), Verdict.FAIL, Verdict.FAIL),
        (FluxKontextDeadlineError("late"), Verdict.FAIL, Verdict.FAIL),
    ],
)
def test_classify(exc: Exception, on_get: Verdict, on_create: Verdict) -> None:
    assert classify(exc, GET) is on_get
    assert classify(exc, CREATE) is on_create


# --- the attempt loop ------------------------------------------------------------------------------------


class Script:
    """Attempts that raise (or return) in order; records the settings and numbers they were given."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[str | None, int]] = []

    def __call__(self, settings: ClientSettings, number: int) -> Any:
        self.calls.append((settings.token, number))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def no_refresh(stale: ClientSettings) -> ClientSettings | None:
    raise AssertionError("not an auth error")


def test_retries_then_the_answer() -> None:
    send = Script(
        FluxKontextServerError(status=502), FluxKontextRateLimitError(status=429, retry_after=3), "ok"
    )
    waits: list[float] = []
    assert Attempts(SETTINGS, GET).run_sync(send, no_refresh, waits.append) == "ok"
    assert [number for _, number in send.calls] == [1, 2, 3]
    assert 0.5 <= waits[0] <= 1.0
    assert 3 <= waits[1] <= 3.1


def test_max_retries_then_the_last_error() -> None:
    send = Script(*[FluxKontextServerError(status=502)] * 3)
    with pytest.raises(FluxKontextServerError):
        Attempts(SETTINGS, GET).run_sync(send, no_refresh, lambda _: None)
    assert len(send.calls) == 3  # max_retries=2


def test_an_uncertain_create_is_said_as_such() -> None:
    send = Script(FluxKontextTransportError("reset", request_sent=True))
    with pytest.raises(FluxKontextPredictionMayExistError):
        Attempts(SETTINGS, CREATE).run_sync(send, no_refresh, lambda _: None)
    assert len(send.calls) == 1


def test_an_auth_error_refreshes_the_settings_once() -> None:
    rotated = ClientSettings(conn_id="c", base_url="https://api.example", token="r8_new")
    send = Script(FluxKontextAuthError(status=401), FluxKontextAuthError(status=401))
    refreshed: list[ClientSettings] = []

    def refresh(stale: ClientSettings) -> ClientSettings | None:
        refreshed.append(stale)
        return rotated

    with pytest.raises(FluxKontextAuthError):
        Attempts(SETTINGS, GET).run_sync(send, refresh, lambda _: None)
    assert send.calls == [(None, 1), ("r8_new", 1)]
    assert refreshed == [SETTINGS]


def test_the_async_driver_runs_the_same_loop() -> None:
    send = Script(FluxKontextServerError(status=502), "ok")
    waits: list[float] = []

    async def asend(settings: ClientSettings, number: int) -> Any:
        return send(settings, number)

    async def refresh(stale: ClientSettings) -> ClientSettings | None:
        return None

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    assert asyncio.run(Attempts(SETTINGS, GET).run_async(asend, refresh, sleep)) == "ok"
    assert len(waits) == 1


def test_a_wait_past_the_deadline_is_not_slept() -> None:
    send = Script(FluxKontextRateLimitError(status=429, retry_after=30))
    retry_limits = RetryLimits(retries=10, deadline=time.time() + 5)
    with pytest.raises(FluxKontextDeadlineError):
        Attempts(SETTINGS, GET, retry_limits=retry_limits).run_sync(send, no_refresh, lambda _: None)
    assert len(send.calls) == 1
