"""Check that both transports keep one retry contract, against the same server on 127.0.0.1.

The hook sends every call through one attempt loop (``hooks/retry.py``, unit-tested in
``test_retry.py``) and one of two transports: requests for the sync methods, the shared aiohttp
session for the ``a*`` methods. Every test here runs once per transport (the ``transport``
fixture), against a :class:`~scripted_api.FakeApi` served from a thread, so that both clients speak
real HTTP to the same scripted answers: what a 429, a 5xx, a dropped, reset, garbled, hanging or
refused connection does to a read and to a create, when retries stop, and what is logged. The sleep
of each path is replaced by a recorder, so retries do not wait and their waits can be asserted.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hook_api import (
    CANCEL_URL,
    CREATE_URL,
    DEV,
    GET_URL,
    INPUT,
    PRED_ID,
    PROBLEM,
    THROTTLED,
    TOKEN,
    prediction_json,
)
from scripted_api import Fail, FakeApi, patch_connects, serve_in_thread

from airflow_provider_kontext.exceptions import (
    FluxKontextAPIError,
    FluxKontextError,
    FluxKontextPredictionMayExistError,
    FluxKontextRateLimitError,
    FluxKontextServerError,
    FluxKontextTransportError,
)
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.models import Prediction, PredictionStatus


@dataclass(frozen=True)
class Transport:
    """Call a hook method through one transport: ``sync`` (requests) or ``async`` (aiohttp).

    ``resends_on_close`` is how many times the client itself sends a GET whose connection closed
    unanswered (aiohttp sends an idempotent request once more, requests does not).
    """

    name: str
    resends_on_close: int

    async def call(self, method: str, *args: Any, hook: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Return what ``method`` (the sync name) answers, through a hook made with ``hook``."""
        if self.name == "sync":
            sync_hook = FluxKontextHook(**(hook or {}))
            try:
                return getattr(sync_hook, method)(*args, **kwargs)
            finally:
                sync_hook.close()
        async with FluxKontextHook(**(hook or {})) as async_hook:
            return await getattr(async_hook, f"a{method}")(*args, **kwargs)

    async def raised(
        self, kind: type[BaseException], method: str, *args: Any, **kwargs: Any
    ) -> FluxKontextError:
        """Return the error of kind ``kind`` that ``method`` raises."""
        with pytest.raises(kind) as info:
            await self.call(method, *args, **kwargs)
        assert isinstance(info.value, FluxKontextError)
        return info.value


@pytest.fixture(params=[Transport("sync", 1), Transport("async", 2)], ids=lambda t: t.name)
def transport(request: pytest.FixtureRequest) -> Transport:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApi]:
    """Serve a FakeApi from a thread; the default connection points at it."""
    fake = FakeApi()
    patch_connects(monkeypatch, fake)
    with serve_in_thread(fake) as base:
        monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
        set_conn(monkeypatch, host=base, password=TOKEN)
        yield fake


def set_conn(monkeypatch: pytest.MonkeyPatch, **fields: Any) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT", json.dumps({"conn_type": "fluxkontext", **fields})
    )


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the waits the retry policy asked for, on both paths, instead of sleeping."""
    waits: list[float] = []

    async def _asleep(self: FluxKontextHook, seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(FluxKontextHook, "_sleep", lambda self, seconds: waits.append(seconds))
    monkeypatch.setattr(FluxKontextHook, "_asleep", _asleep)
    return waits


def get(api: FakeApi, *answers: Any) -> None:
    api.on("GET", GET_URL, *answers)


def create(api: FakeApi, *answers: Any) -> None:
    api.on("POST", CREATE_URL, *answers)


def with_extra(api: FakeApi, monkeypatch: pytest.MonkeyPatch, **extra: Any) -> None:
    set_conn(monkeypatch, host=api.base, password=TOKEN, extra=extra)


# --- 429: the wait the server names, else the backoff ---------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "low", "high"),
    [
        ({"status_code": 429, "headers": {"Retry-After": "3"}}, 3, 3.1),
        ({"status_code": 429, "json": THROTTLED}, 1, 1.1),
        (
            {
                "status_code": 429,
                "headers": {"Content-Type": PROBLEM},
                "json": {"detail": "Request was throttled. Expected available in 3 seconds.", "status": 429},
            },
            3,
            3.1,
        ),
        ({"status_code": 429, "text": "slow down"}, 0.5, 1.0),
    ],
    ids=["retry-after", "replicate-body", "problem-json-text", "no-hint-backoff"],
)
async def test_a_429_on_a_read_waits_what_the_server_names(
    transport: Transport, api: FakeApi, sleeps: list[float], answer: dict[str, Any], low: float, high: float
) -> None:
    get(api, answer, {"json": prediction_json("processing")})
    prediction = await transport.call("get_prediction", PRED_ID)
    assert isinstance(prediction, Prediction)
    assert prediction.status is PredictionStatus.PROCESSING
    assert len(api.requests) == 2
    (wait,) = sleeps
    assert low <= wait <= high


async def test_a_429_retry_after_as_an_http_date(
    transport: Transport, api: FakeApi, sleeps: list[float]
) -> None:
    when = email.utils.formatdate(time.time() + 4, usegmt=True)
    get(api, {"status_code": 429, "headers": {"Retry-After": when}}, {"json": prediction_json()})
    await transport.call("get_prediction", PRED_ID)
    (wait,) = sleeps
    assert 2 <= wait <= 4.1


@pytest.mark.parametrize(("retry_after", "cap"), [("500", 2), ("3600", 3)])
async def test_a_429_wait_is_capped_by_retry_after_max(
    transport: Transport,
    api: FakeApi,
    sleeps: list[float],
    monkeypatch: pytest.MonkeyPatch,
    retry_after: str,
    cap: float,
) -> None:
    with_extra(api, monkeypatch, retry_after_max=cap)
    get(api, {"status_code": 429, "headers": {"Retry-After": retry_after}}, {"json": prediction_json()})
    await transport.call("get_prediction", PRED_ID)
    (wait,) = sleeps
    assert cap <= wait <= cap + 0.1


async def test_a_throttled_create_is_sent_again(
    transport: Transport, api: FakeApi, sleeps: list[float]
) -> None:
    create(api, {"status_code": 429, "json": THROTTLED}, {"status_code": 201, "json": prediction_json()})
    assert (await transport.call("create_prediction", DEV, INPUT)).id == PRED_ID
    assert len(api.requests) == 2
    (wait,) = sleeps
    assert 1 <= wait <= 2  # the reset, then spread (test_create_throttling.py)


async def test_a_create_throttled_past_its_bound_fails_as_rate_limited(
    transport: Transport, api: FakeApi, sleeps: list[float]
) -> None:
    """Check that a throttled create without a deadline tries for max_retries x retry_after_max seconds.

    Here 0.5 s of the real clock (the waits are recorded, not slept; on the async path the
    account's rate limiter still pauses 0.05 s per 429): a bound in time, not a number of attempts.
    """
    create(api, {"status_code": 429, "headers": {"Retry-After": "0.05"}})
    err = await transport.raised(
        FluxKontextRateLimitError,
        "create_prediction",
        DEV,
        INPUT,
        hook={"max_retries": 1, "retry_after_max": 0.5},
    )
    assert isinstance(err, FluxKontextRateLimitError)
    assert err.retry_after == 0.05
    assert "max_retries x retry_after_max = 0.5 s" in str(err)
    assert len(api.requests) >= 3
    assert len(sleeps) == len(api.requests) - 1


# --- 5xx: a read is retried with capped backoff, a create never -------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_a_5xx_on_a_read_is_retried_with_backoff(
    transport: Transport, api: FakeApi, sleeps: list[float], status: int
) -> None:
    get(api, {"status_code": status}, {"status_code": status}, {"json": prediction_json("succeeded")})
    assert (await transport.call("get_prediction", PRED_ID)).status is PredictionStatus.SUCCEEDED
    assert len(api.requests) == 3
    first, second = sleeps
    # capped exponential backoff with jitter: base 1 s, then 2 s
    assert 0.5 <= first <= 1.0
    assert 1.0 <= second <= 2.0


async def test_the_backoff_is_capped_by_backoff_max(
    transport: Transport, api: FakeApi, sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    with_extra(api, monkeypatch, backoff_base=10, backoff_max=3, max_retries=4)
    get(api, *[{"status_code": 502}] * 4, {"json": prediction_json()})
    await transport.call("get_prediction", PRED_ID)
    assert len(sleeps) == 4
    assert all(1.5 <= wait <= 3.0 for wait in sleeps)


@pytest.mark.parametrize("status", [502, 503])
async def test_a_5xx_on_a_cancel_is_retried(
    transport: Transport, api: FakeApi, sleeps: list[float], status: int
) -> None:
    api.on("POST", CANCEL_URL, {"status_code": status}, {"json": prediction_json("canceled")})
    assert (await transport.call("cancel_prediction", PRED_ID)).status is PredictionStatus.CANCELED
    assert len(api.requests) == 2
    assert len(sleeps) == 1


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_a_5xx_on_a_create_is_not_retried(
    transport: Transport, api: FakeApi, sleeps: list[float], status: int
) -> None:
    create(api, {"status_code": status}, {"status_code": 201, "json": prediction_json()})
    err = await transport.raised(FluxKontextPredictionMayExistError, "create_prediction", DEV, INPUT)
    assert isinstance(err, FluxKontextPredictionMayExistError)
    assert len(api.requests) == 1
    assert sleeps == []
    assert err.status == status
    assert (err.method, err.path) == ("POST", f"/v1/models/{DEV}/predictions")
    assert f"HTTP {status}" in str(err)
    assert "may have reached the server" in str(err)


@pytest.mark.parametrize("max_retries", [0, 1, 3])
async def test_retries_stop_after_max_retries(
    transport: Transport,
    api: FakeApi,
    sleeps: list[float],
    monkeypatch: pytest.MonkeyPatch,
    max_retries: int,
) -> None:
    with_extra(api, monkeypatch, max_retries=max_retries)
    get(api, {"status_code": 503, "text": "upstream unavailable"})
    err = await transport.raised(FluxKontextServerError, "get_prediction", PRED_ID)
    assert isinstance(err, FluxKontextServerError)
    assert err.status == 503
    assert err.detail == "upstream unavailable"
    assert len(api.requests) == max_retries + 1
    assert len(sleeps) == max_retries


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
async def test_client_errors_are_not_retried(
    transport: Transport, api: FakeApi, sleeps: list[float], status: int
) -> None:
    get(api, {"status_code": status, "json": {"detail": "no"}})
    await transport.raised(FluxKontextAPIError, "get_prediction", PRED_ID)
    assert len(api.requests) == 1
    assert sleeps == []


async def test_a_retry_is_logged(
    transport: Transport,
    api: FakeApi,
    sleeps: list[float],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    get(api, {"status_code": 502, "text": "bad gateway"}, {"json": prediction_json()})
    await transport.call("get_prediction", PRED_ID)
    out = capsys.readouterr()
    text = caplog.text + out.out + out.err
    assert f"GET /v1/predictions/{PRED_ID} attempt 1 failed" in text
    assert "HTTP 502" in text
    assert "retrying in" in text


# --- connections that fail: a read is retried, a create only if it never left ----------------------------

SENT = ["hang", "drop", "reset", "bad-status"]
NOT_SENT = ["refuse", "connect-timeout"]


@pytest.mark.parametrize("kind", SENT + NOT_SENT)
async def test_a_failed_connection_on_a_read_is_retried(
    transport: Transport, api: FakeApi, sleeps: list[float], kind: str
) -> None:
    times = transport.resends_on_close if kind in ("drop", "reset") else 1
    get(api, *[Fail(kind)] * times, {"json": prediction_json()})
    assert (await transport.call("get_prediction", PRED_ID, hook={"timeout": 0.2})).id == PRED_ID
    assert len(api.requests) == times + 1
    assert len(sleeps) == 1


@pytest.mark.parametrize("kind", SENT)
async def test_a_create_that_may_have_been_sent_is_not_retried(
    transport: Transport, api: FakeApi, sleeps: list[float], kind: str
) -> None:
    create(api, Fail(kind), {"status_code": 201, "json": prediction_json()})
    err = await transport.raised(
        FluxKontextPredictionMayExistError, "create_prediction", DEV, INPUT, hook={"timeout": 0.2}
    )
    assert isinstance(err, FluxKontextPredictionMayExistError)
    assert len(api.requests) == 1
    assert sleeps == []
    assert err.status is None
    assert "no complete response" in str(err)


@pytest.mark.parametrize("kind", NOT_SENT)
async def test_a_create_that_never_left_is_retried(
    transport: Transport, api: FakeApi, sleeps: list[float], kind: str
) -> None:
    create(api, Fail(kind), {"status_code": 201, "json": prediction_json()})
    assert (await transport.call("create_prediction", DEV, INPUT)).id == PRED_ID
    assert len(api.requests) == 2
    assert len(sleeps) == 1


async def test_a_create_refused_until_retries_run_out(
    transport: Transport, api: FakeApi, sleeps: list[float]
) -> None:
    create(api, Fail("refuse"))
    err = await transport.raised(
        FluxKontextTransportError, "create_prediction", DEV, INPUT, hook={"max_retries": 2}
    )
    assert isinstance(err, FluxKontextTransportError)
    # nothing was sent, so it is not a "may exist" error
    assert not isinstance(err, FluxKontextPredictionMayExistError)
    assert err.request_sent is False
    assert "could not connect" in str(err)
    assert len(api.requests) == 3
    assert len(sleeps) == 2


async def test_a_read_timing_out_until_retries_run_out(
    transport: Transport, api: FakeApi, sleeps: list[float]
) -> None:
    get(api, Fail("hang"))
    err = await transport.raised(
        FluxKontextTransportError, "get_prediction", PRED_ID, hook={"max_retries": 2, "timeout": 0.2}
    )
    assert isinstance(err, FluxKontextTransportError)
    assert err.request_sent is True
    assert "GET /v1/predictions/" in str(err)
    assert "Timeout" in str(err)
    assert len(api.requests) == 3


@pytest.mark.parametrize("method", ["get_prediction", "create_prediction"])
async def test_an_unreadable_content_length(
    transport: Transport, api: FakeApi, sleeps: list[float], method: str
) -> None:
    """Check a 200 whose Content-Length no client can read: never a create sent twice.

    aiohttp rejects the answer (a transport failure after the request left: a read is retried);
    requests reads the body to the connection's end and finds no prediction in it (an unexpected
    answer: a read fails without retries). A create is an uncertain create on both.
    """
    args = (PRED_ID,) if method == "get_prediction" else (DEV, INPUT)
    url = GET_URL if method == "get_prediction" else CREATE_URL
    post = "GET" if method == "get_prediction" else "POST"
    api.on(post, url, Fail("garbled"), {"status_code": 201, "json": prediction_json()})
    if method == "create_prediction":
        err = await transport.raised(FluxKontextPredictionMayExistError, method, *args)
        assert len(api.requests) == 1
        assert sleeps == []
        if transport.name == "async":
            assert "no complete response" in str(err)
    elif transport.name == "async":
        assert (await transport.call(method, *args)).id == PRED_ID
        assert len(api.requests) == 2
        assert len(sleeps) == 1
    else:
        err = await transport.raised(FluxKontextAPIError, method, *args)
        assert "unexpected response" in str(err)
        assert len(api.requests) == 1
