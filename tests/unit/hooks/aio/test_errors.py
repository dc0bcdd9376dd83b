"""Test how the async hook maps failures, keeps the token secret, and retries a poll in its budget."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from hook_api import ACCOUNT_URL, CREATE_URL, DEV, GET_URL, INPUT, PRED_ID, PROBLEM, TOKEN, prediction_json
from scripted_api import Fail, FakeApi

from airflow_provider_kontext.exceptions import (
    FluxKontextAPIError,
    FluxKontextAuthError,
    FluxKontextDeadlineError,
    FluxKontextNotFoundError,
    FluxKontextPredictionMayExistError,
    FluxKontextServerError,
    FluxKontextTransportError,
)
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.hooks.retry import RetryLimits

from .helpers import araised, assert_no_secret

# --- error mapping --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_errors(set_conn: Callable[..., None], api: FakeApi, status: int) -> None:
    set_conn("kontext_prod", password=TOKEN)
    api.on(
        "GET",
        ACCOUNT_URL,
        {
            "status_code": status,
            "headers": {"Content-Type": PROBLEM},
            "json": {"title": "Unauthenticated", "detail": "Invalid token.", "status": status},
        },
    )
    async with FluxKontextHook("kontext_prod") as hook:
        err = await araised(hook.aget_account(), FluxKontextAuthError)
    assert err.status == status
    assert (err.title, err.detail) == ("Unauthenticated", "Invalid token.")
    assert "Check the API token in connection 'kontext_prod'" in str(err)
    assert_no_secret(str(err))


async def test_404(hook: FluxKontextHook, api: FakeApi) -> None:
    api.on("GET", GET_URL, {"status_code": 404, "json": {"title": "Not found", "status": 404}})
    err = await araised(hook.aget_prediction(PRED_ID), FluxKontextNotFoundError)
    assert (err.status, err.title) == (404, "Not found")


async def test_422_problem_json_keeps_title_and_detail(hook: FluxKontextHook, api: FakeApi) -> None:
    problem = {"title": "Input validation failed", "status": 422, "detail": "- input.guidance: Must be <= 10"}
    api.on("POST", CREATE_URL, {"status_code": 422, "headers": {"Content-Type": PROBLEM}, "json": problem})
    err = await araised(hook.acreate_prediction(DEV, INPUT), FluxKontextAPIError)
    assert type(err) is FluxKontextAPIError
    assert (err.status, err.title, err.detail) == (
        422,
        "Input validation failed",
        "- input.guidance: Must be <= 10",
    )
    assert str(err) == (
        f"POST /v1/models/{DEV}/predictions failed with HTTP 422 (Input validation failed): "
        "- input.guidance: Must be <= 10"
    )


async def test_plain_text_error(hook: FluxKontextHook, api: FakeApi) -> None:
    api.on(
        "GET",
        GET_URL,
        {"status_code": 400, "headers": {"Content-Type": "text/plain"}, "text": "bad\n request"},
    )
    err = await araised(hook.aget_prediction(PRED_ID), FluxKontextAPIError)
    assert (err.title, err.detail) == (None, "bad request")


async def test_html_error_page(hook: FluxKontextHook, api: FakeApi) -> None:
    api.on(
        "GET",
        GET_URL,
        {
            "status_code": 404,
            "headers": {"Content-Type": "text/html"},
            "text": "<html><title>Oops</title></html>",
        },
    )
    err = await araised(hook.aget_prediction(PRED_ID), FluxKontextNotFoundError)
    assert err.detail == "an HTML page (Oops) instead of the API's JSON; is the base URL right?"


async def test_2xx_with_non_json_body(hook: FluxKontextHook, api: FakeApi, sleeps: list[float]) -> None:
    api.on(
        "POST", CREATE_URL, {"status_code": 201, "headers": {"Content-Type": "text/html"}, "text": "<html/>"}
    )
    err = await araised(hook.acreate_prediction(DEV, INPUT), FluxKontextPredictionMayExistError)
    assert err.status == 201
    assert "(malformed response)" in str(err)
    assert "(expected JSON)" in str(err)
    assert len(api.requests) == 1


@pytest.mark.parametrize("body", [b"", b"[]", b'{"unexpected": true}'])
async def test_2xx_json_of_the_wrong_shape_is_an_api_error(
    hook: FluxKontextHook, api: FakeApi, body: bytes
) -> None:
    api.on("GET", GET_URL, {"status_code": 200, "content": body})
    err = await araised(hook.aget_prediction(PRED_ID), FluxKontextAPIError)
    assert "Prediction" in str(err)


# --- secrets --------------------------------------------------------------------------------------


ECHOES = {
    "problem-detail": {
        "headers": {"Content-Type": PROBLEM},
        "json": {"title": "No", "detail": f"bad {TOKEN}"},
    },
    "problem-title": {"headers": {"Content-Type": PROBLEM}, "json": {"title": f"Bad token {TOKEN}"}},
    "plain-text": {"headers": {"Content-Type": "text/plain"}, "text": f"Authorization: Bearer {TOKEN}"},
    "html-title": {"headers": {"Content-Type": "text/html"}, "text": f"<html><title>{TOKEN}</title></html>"},
    "straddles-truncation": {"text": "x" * 490 + TOKEN},
}


@pytest.mark.parametrize("status", [401, 422, 429, 503])
@pytest.mark.parametrize("echo", ECHOES.values(), ids=ECHOES.keys())
async def test_token_echoed_by_the_server_is_never_shown(
    api: FakeApi, logs: Callable[[], str], status: int, echo: dict[str, Any]
) -> None:
    api.on("GET", GET_URL, {"status_code": status, **echo})
    async with FluxKontextHook(max_retries=1) as hook:
        err = await araised(hook.aget_prediction(PRED_ID), FluxKontextAPIError)
    assert err.status == status
    assert_no_secret(str(err), repr(err), err.title, err.detail, logs())


@pytest.mark.parametrize("echo", ECHOES.values(), ids=ECHOES.keys())
async def test_token_echoed_to_a_create_is_never_shown(
    hook: FluxKontextHook, api: FakeApi, logs: Callable[[], str], echo: dict[str, Any]
) -> None:
    api.on("POST", CREATE_URL, {"status_code": 502, **echo})
    err = await araised(hook.acreate_prediction(DEV, INPUT), FluxKontextPredictionMayExistError)
    assert_no_secret(str(err), repr(err), logs())


async def test_token_in_a_transport_error_is_never_shown(api: FakeApi, logs: Callable[[], str]) -> None:
    api.on("GET", GET_URL, Fail("garbled", f"peer said Bearer {TOKEN}"))
    async with FluxKontextHook(max_retries=1) as hook:
        err = await araised(hook.aget_prediction(PRED_ID), FluxKontextTransportError)
    assert "***" in str(err)
    assert_no_secret(str(err), repr(err), logs())


async def test_logs_of_a_failing_run_never_show_the_token(
    hook: FluxKontextHook, api: FakeApi, logs: Callable[[], str]
) -> None:
    api.on(
        "POST",
        CREATE_URL,
        {"status_code": 429, "json": {"detail": f"slow {TOKEN}"}},
        {"json": prediction_json()},
    )
    api.on(
        "GET", GET_URL, {"status_code": 500, "text": f"down {TOKEN}"}, {"json": prediction_json("succeeded")}
    )
    await hook.acreate_prediction(DEV, INPUT)
    await hook.aget_prediction(PRED_ID)
    text = logs()
    assert "attempt 1 failed" in text
    assert "slow ***" in text
    assert "down ***" in text
    assert_no_secret(text)


# --- a poll's budget: the one retry layer of a wait -----------------------------------------------


async def test_a_poll_budget_replaces_max_retries(
    hook: FluxKontextHook, api: FakeApi, sleeps: list[float]
) -> None:
    api.on("GET", GET_URL, {"status_code": 503})
    await araised(hook.aget_prediction(PRED_ID, retry_limits=RetryLimits(retries=7)), FluxKontextServerError)
    assert len(api.requests) == 8
    assert len(sleeps) == 7


async def test_a_poll_budget_tolerates_unreadable_answers(
    hook: FluxKontextHook, api: FakeApi, sleeps: list[float]
) -> None:
    api.on(
        "GET", GET_URL, {"content": b"<html/>"}, {"json": {"unexpected": True}}, {"json": prediction_json()}
    )
    prediction = await hook.aget_prediction(PRED_ID, retry_limits=RetryLimits(retries=3, tolerate=True))
    assert prediction.id == PRED_ID
    assert len(api.requests) == 3
    assert len(sleeps) == 2


async def test_without_a_poll_budget_an_unreadable_answer_fails_at_once(
    hook: FluxKontextHook, api: FakeApi, sleeps: list[float]
) -> None:
    api.on("GET", GET_URL, {"json": {"unexpected": True}}, {"json": prediction_json()})
    await araised(hook.aget_prediction(PRED_ID), FluxKontextAPIError)
    assert len(api.requests) == 1
    assert sleeps == []


async def test_a_poll_never_waits_past_its_deadline(
    hook: FluxKontextHook, api: FakeApi, sleeps: list[float]
) -> None:
    api.on("GET", GET_URL, {"status_code": 429, "json": {"detail": "Your rate limit resets in ~30s."}})
    retry_limits = RetryLimits(retries=10, tolerate=True, deadline=time.time() + 5)
    err = await araised(hook.aget_prediction(PRED_ID, retry_limits=retry_limits), FluxKontextDeadlineError)
    assert "still failing at the deadline" in str(err)
    assert len(api.requests) == 1
    assert sleeps == []


async def test_a_poll_in_flight_is_cut_at_the_deadline(
    hook: FluxKontextHook, api: FakeApi, sleeps: list[float]
) -> None:
    api.on("GET", GET_URL, Fail("hang"))  # the read timeout (30 s) is far away
    started = time.monotonic()
    retry_limits = RetryLimits(retries=10, deadline=time.time() + 0.1, grace=0.2)
    err = await araised(hook.aget_prediction(PRED_ID, retry_limits=retry_limits), FluxKontextDeadlineError)
    assert "no answer by the deadline" in str(err)
    assert time.monotonic() - started < 10
    assert sleeps == []


def test_the_trust_store_honours_ssl_cert_file_and_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    import certifi

    from airflow_provider_kontext.hooks.transports import ssl_context

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    default = ssl_context().get_ca_certs()
    assert default  # certifi's bundle
    bundle = tmp_path / "one.pem"
    with open(certifi.where()) as src:  # the first certificate of certifi's bundle alone
        text = src.read()
    first = text[text.index("-----BEGIN CERTIFICATE-----") :]
    bundle.write_text(
        first[: first.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")] + "\n"
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    assert len(ssl_context().get_ca_certs()) == 1
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    with pytest.raises(OSError):
        ssl_context()
    monkeypatch.delenv("SSL_CERT_FILE")
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    assert ssl_context().get_ca_certs() == []  # a directory is read lazily, and holds no hashed certs
