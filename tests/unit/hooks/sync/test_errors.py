"""Test how the sync hook maps failures: requests' own errors, HTTP errors, the token kept secret."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from hook_api import ACCOUNT_URL, API, CREATE_URL, DEV, GET_URL, INPUT, PRED_ID, PROBLEM, PROXY, TOKEN

from airflow_provider_kontext.exceptions import (
    FluxKontextAPIError,
    FluxKontextAuthError,
    FluxKontextNotFoundError,
    FluxKontextPredictionMayExistError,
    FluxKontextTransportError,
)
from airflow_provider_kontext.hooks import retry as failures
from airflow_provider_kontext.hooks.api import parse_retry_after
from airflow_provider_kontext.hooks.connection import ClientSettings
from airflow_provider_kontext.hooks.kontext import FluxKontextHook

from .helpers import assert_no_secret, prediction_json, raised

# --- retries --------------------------------------------------------------------------------------


def test_ssl_error_is_not_treated_as_refused(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.post(CREATE_URL, exc=requests.exceptions.SSLError("handshake failed"))
    raised(lambda: hook.create_prediction(DEV, INPUT), FluxKontextPredictionMayExistError)
    assert requests_mock.call_count == 1


# --- error mapping --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors(set_conn: Callable[..., None], requests_mock: Any, status: int) -> None:
    set_conn("kontext_prod", password=TOKEN)
    requests_mock.get(
        GET_URL,
        status_code=status,
        headers={"Content-Type": PROBLEM},
        json={"title": "Unauthenticated", "detail": "Invalid token.", "status": status},
    )
    err = raised(lambda: FluxKontextHook("kontext_prod").get_prediction(PRED_ID), FluxKontextAuthError)
    assert err.status == status
    assert (err.title, err.detail) == ("Unauthenticated", "Invalid token.")
    message = str(err)
    assert message.startswith(f"GET /v1/predictions/{PRED_ID} failed with HTTP {status} (Unauthenticated)")
    assert "Check the API token in connection 'kontext_prod'" in message
    assert "REPLICATE_API_TOKEN" in message
    assert "no token is configured" not in message
    assert_no_secret(message)


def test_a_rotated_token_is_used_after_an_auth_error(
    set_conn: Callable[..., None], requests_mock: Any, sleeps: list[float]
) -> None:
    requests_mock.get(
        GET_URL,
        [
            {"json": prediction_json()},
            {"status_code": 401, "json": {"detail": "Invalid token"}},
            {"json": prediction_json()},
        ],
    )
    hook = FluxKontextHook()
    hook.get_prediction(PRED_ID)
    set_conn(password="r8_NEWTOKEN_rotated")  # the connection changes while the hook holds its settings
    assert hook.get_prediction(PRED_ID).id == PRED_ID
    assert [r.headers["Authorization"] for r in requests_mock.request_history] == [
        f"Bearer {TOKEN}",
        f"Bearer {TOKEN}",
        "Bearer r8_NEWTOKEN_rotated",
    ]
    assert sleeps == []


def test_an_auth_error_with_unchanged_settings_is_not_resent(requests_mock: Any, sleeps: list[float]) -> None:
    requests_mock.get(GET_URL, status_code=401, json={"detail": "Invalid token"})
    raised(lambda: FluxKontextHook().get_prediction(PRED_ID), FluxKontextAuthError)
    assert requests_mock.call_count == 1
    assert sleeps == []


def test_auth_error_without_token_says_so(set_conn: Callable[..., None], requests_mock: Any) -> None:
    set_conn(host=PROXY)
    requests_mock.get(f"{PROXY}/v1/account", status_code=401, json={"detail": "Authentication required"})
    err = raised(lambda: FluxKontextHook().get_account(), FluxKontextAuthError)
    assert "no token is configured" in str(err)
    assert "'flux_kontext_default'" in str(err)


def test_404(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.get(
        GET_URL,
        status_code=404,
        headers={"Content-Type": PROBLEM},
        json={"title": "Not found", "status": 404},
    )
    err = raised(lambda: hook.get_prediction(PRED_ID), FluxKontextNotFoundError)
    assert err.status == 404
    assert err.title == "Not found"
    assert "Check the model name, version or prediction id" in str(err)


def test_422_problem_json_keeps_title_and_detail(hook: FluxKontextHook, requests_mock: Any) -> None:
    problem = {
        "type": "https://replicate.com/docs/errors#invalid-input",
        "title": "Input validation failed",
        "status": 422,
        "detail": "- input.num_inference_steps: Must be less than or equal to 50",
    }
    requests_mock.post(CREATE_URL, status_code=422, headers={"Content-Type": PROBLEM}, json=problem)
    err = raised(lambda: hook.create_prediction(DEV, INPUT), FluxKontextAPIError)
    assert type(err) is FluxKontextAPIError
    assert err.status == 422
    assert err.title == "Input validation failed"
    assert err.detail == "- input.num_inference_steps: Must be less than or equal to 50"
    assert str(err) == (
        f"POST /v1/models/{DEV}/predictions failed with HTTP 422 (Input validation failed): "
        "- input.num_inference_steps: Must be less than or equal to 50"
    )
    assert requests_mock.call_count == 1


def test_json_error_key_is_used_as_detail(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.get(GET_URL, status_code=400, json={"error": {"code": "bad", "message": "nope"}})
    err = raised(lambda: hook.get_prediction(PRED_ID), FluxKontextAPIError)
    assert json.loads(err.detail) == {"code": "bad", "message": "nope"}


def test_plain_text_error(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.get(
        GET_URL, status_code=400, headers={"Content-Type": "text/plain"}, text="  bad\n\n request  body "
    )
    err = raised(lambda: hook.get_prediction(PRED_ID), FluxKontextAPIError)
    assert err.status == 400
    assert err.title is None
    assert err.detail == "bad request body"
    assert str(err) == f"GET /v1/predictions/{PRED_ID} failed with HTTP 400: bad request body"


def test_long_plain_text_error_is_shortened(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.get(GET_URL, status_code=400, text="x" * 5000)
    err = raised(lambda: hook.get_prediction(PRED_ID), FluxKontextAPIError)
    assert len(err.detail) == 500


def test_html_error_page(hook: FluxKontextHook, requests_mock: Any) -> None:
    page = "<!DOCTYPE html><html><head><title>404 Not\n  Found</title></head><body>nginx</body></html>"
    requests_mock.get(GET_URL, status_code=404, headers={"Content-Type": "text/html"}, text=page)
    err = raised(lambda: hook.get_prediction(PRED_ID), FluxKontextNotFoundError)
    assert err.detail == "an HTML page (404 Not Found) instead of the API's JSON; is the base URL right?"
    assert "<html>" not in str(err)


def test_html_page_without_title_or_content_type(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.get(GET_URL, status_code=400, text="<html><body>Bad</body></html>")
    err = raised(lambda: hook.get_prediction(PRED_ID), FluxKontextAPIError)
    assert "an HTML page (no title)" in err.detail


def test_empty_error_body(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.get(GET_URL, status_code=409, content=b"")
    err = raised(lambda: hook.get_prediction(PRED_ID), FluxKontextAPIError)
    assert str(err) == f"GET /v1/predictions/{PRED_ID} failed with HTTP 409"


def test_2xx_with_html_body(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.get(
        GET_URL,
        status_code=200,
        headers={"Content-Type": "text/html"},
        text="<html><head><title>Welcome to nginx!</title></head></html>",
    )
    err = raised(lambda: hook.get_prediction(PRED_ID), FluxKontextAPIError)
    assert type(err) is FluxKontextAPIError
    assert err.status == 200
    assert err.title == "malformed response"
    assert "Welcome to nginx!" in err.detail
    assert err.detail.endswith("(expected JSON)")


def test_2xx_with_non_json_text(hook: FluxKontextHook, requests_mock: Any, sleeps: list[float]) -> None:
    requests_mock.post(CREATE_URL, status_code=201, text="OK")
    # Unreadable, yet the server may have created it: an uncertain create, not retried.
    err = raised(lambda: hook.create_prediction(DEV, INPUT), FluxKontextPredictionMayExistError)
    assert err.status == 201
    assert "(malformed response): OK (expected JSON)" in str(err)
    assert requests_mock.call_count == 1
    assert sleeps == []


@pytest.mark.parametrize("body", [b"", b"[]", b'{"unexpected": true}', b'{"status": "queued"}'])
def test_2xx_json_of_the_wrong_shape_is_an_api_error(
    hook: FluxKontextHook, requests_mock: Any, body: bytes
) -> None:
    requests_mock.get(GET_URL, status_code=200, content=body)
    err = raised(lambda: hook.get_prediction(PRED_ID), FluxKontextAPIError)
    assert "Prediction" in str(err)


# --- secrets --------------------------------------------------------------------------------------


ECHOES = {
    "problem-detail": {
        "headers": {"Content-Type": PROBLEM},
        "json": {"title": "Unauthenticated", "detail": f"Invalid token {TOKEN}"},
    },
    "problem-title": {"headers": {"Content-Type": PROBLEM}, "json": {"title": f"Bad token {TOKEN}"}},
    "json-error": {"json": {"error": {"message": f"token {TOKEN} rejected"}}},
    "plain-text": {"headers": {"Content-Type": "text/plain"}, "text": f"Authorization: Bearer {TOKEN}"},
    "html-title": {"headers": {"Content-Type": "text/html"}, "text": f"<html><title>{TOKEN}</title></html>"},
    # the token straddles the point where a long detail is cut (500 / 1000 characters)
    "straddles-truncation": {"text": "x" * 490 + TOKEN},
    "straddles-json-truncation": {"json": {"detail": "y" * 990 + TOKEN}},
}


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500])
@pytest.mark.parametrize("echo", ECHOES.values(), ids=ECHOES.keys())
def test_token_echoed_by_the_server_is_never_shown(
    requests_mock: Any, logs: Callable[[], str], status: int, echo: dict[str, Any]
) -> None:
    requests_mock.get(GET_URL, status_code=status, **echo)
    hook = FluxKontextHook(max_retries=1)
    err = raised(lambda: hook.get_prediction(PRED_ID), FluxKontextAPIError)
    assert err.status == status
    assert_no_secret(str(err), repr(err), err.title, err.detail, logs())


@pytest.mark.parametrize("echo", ECHOES.values(), ids=ECHOES.keys())
def test_token_echoed_to_a_create_is_never_shown(
    hook: FluxKontextHook, requests_mock: Any, logs: Callable[[], str], echo: dict[str, Any]
) -> None:
    requests_mock.post(CREATE_URL, status_code=500, **echo)
    err = raised(lambda: hook.create_prediction(DEV, INPUT), FluxKontextPredictionMayExistError)
    assert_no_secret(str(err), repr(err), err.title, err.detail, logs())


def test_token_echoed_in_a_2xx_non_json_body(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.get(GET_URL, status_code=200, text=f"hello {TOKEN}")
    err = raised(lambda: hook.get_prediction(PRED_ID), FluxKontextAPIError)
    assert err.detail == "hello *** (expected JSON)"
    assert_no_secret(str(err))


def test_token_in_a_transport_error_is_never_shown(
    hook: FluxKontextHook, requests_mock: Any, logs: Callable[[], str]
) -> None:
    requests_mock.get(GET_URL, exc=requests.exceptions.ConnectionError(f"proxy said Bearer {TOKEN}"))
    err = raised(lambda: FluxKontextHook(max_retries=1).get_prediction(PRED_ID), FluxKontextTransportError)
    assert "***" in str(err)
    assert_no_secret(str(err), repr(err), logs())


def test_token_from_env_is_redacted_too(
    set_conn: Callable[..., None], monkeypatch: pytest.MonkeyPatch, requests_mock: Any
) -> None:
    set_conn()
    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    requests_mock.get(ACCOUNT_URL, status_code=403, json={"detail": f"{TOKEN} lacks access"})
    ok, message = FluxKontextHook().test_connection()
    assert not ok
    assert "*** lacks access" in message
    assert_no_secret(message)


def test_logs_of_a_whole_failing_run_never_show_the_token(
    hook: FluxKontextHook, requests_mock: Any, logs: Callable[[], str]
) -> None:
    requests_mock.post(
        CREATE_URL,
        [
            {"status_code": 429, "json": {"detail": f"throttled {TOKEN}"}},
            {"status_code": 201, "json": prediction_json()},
        ],
    )
    requests_mock.get(
        GET_URL, [{"status_code": 503, "text": f"down {TOKEN}"}, {"json": prediction_json("succeeded")}]
    )
    hook.create_prediction(DEV, INPUT)
    hook.get_prediction(PRED_ID)
    text = logs()
    # the capture works: the retries were logged ...
    assert "attempt 1 failed" in text
    assert "throttled ***" in text
    assert "down ***" in text
    # ... and the token was not
    assert_no_secret(text, repr(hook), repr(hook.settings))


def test_secrets_in_the_base_url_are_redacted() -> None:
    settings = ClientSettings(
        conn_id="c", base_url="https://user:p4ssw0rd@proxy.example/replicate?key=querysecret", token=TOKEN
    )
    assert set(settings.secrets()) == {TOKEN, "p4ssw0rd", "querysecret"}
    assert settings.redact(f"{TOKEN} p4ssw0rd querysecret") == "*** *** ***"


# --- shared helpers -------------------------------------------------------------------------------


def test_parse_retry_after() -> None:
    assert parse_retry_after({"Retry-After": "12"}, None) == 12
    assert parse_retry_after({"retry-after": " 1.5 "}, None) == 1.5
    assert parse_retry_after({"Retry-After": "-3"}, None) == 0
    past = email.utils.formatdate(time.time() - 100, usegmt=True)
    assert parse_retry_after({"Retry-After": past}, None) == 0
    assert parse_retry_after({"Retry-After": "garbage"}, "Expected available in 4 seconds.") == 4
    assert parse_retry_after({}, "Request was throttled. Expected available in 0.5 second.") == 0.5
    assert parse_retry_after({}, "throttled") is None
    assert parse_retry_after({}, None) is None


def test_backoff_seconds_growth() -> None:
    settings = ClientSettings(conn_id="c", base_url=API, backoff_base=1, backoff_max=5)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 5), (10, 5)]:
        for _ in range(20):
            assert ceiling / 2 <= failures.backoff_seconds(settings, attempt, None) <= ceiling


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ('{"id": "p1", "status": "queued"}', "p1"),  # a status this provider does not know
        ("<html><body>OK</body></html>", None),  # not JSON at all
        ('{"id": "p2", "status": "starting", "created_at": "yesterday"}', "p2"),
    ],
)
def test_unreadable_answer_to_a_create_is_an_uncertain_create(
    hook: FluxKontextHook, requests_mock: Any, body: str, named: str | None
) -> None:
    """Check that an unreadable 2xx answer to a create is an uncertain create.

    A 2xx the hook cannot read may still have created (and billed) a prediction: never a plain
    error that would let a retry create a second one.
    """
    requests_mock.post(CREATE_URL, text=body, status_code=201)
    with pytest.raises(FluxKontextPredictionMayExistError) as info:
        hook.create_prediction(DEV, INPUT)
    assert requests_mock.call_count == 1
    if named:
        assert f"named prediction {named!r}" in str(info.value)
