"""``FluxKontextHook``'s sync path (requests), against ``requests_mock``.

Connections come from ``AIRFLOW_CONN_<ID>`` environment variables holding JSON; ``_sleep`` is
replaced so retries do not wait and the waits they asked for can be asserted.
"""

from __future__ import annotations

import email.utils
import io
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from hook_api import (
    ACCOUNT_URL,
    API,
    CANCEL_URL,
    CREATE_URL,
    DEV,
    ENV_TOKEN,
    FILES_URL,
    GET_URL,
    INPUT,
    PRED_ID,
    PROBLEM,
    PROXY,
    TOKEN,
)
from urllib3.exceptions import MaxRetryError, NewConnectionError

from airflow_provider_kontext.exceptions import (
    FluxKontextAPIError,
    FluxKontextAuthError,
    FluxKontextError,
    FluxKontextNotFoundError,
    FluxKontextPredictionMayExistError,
    FluxKontextTransportError,
)
from airflow_provider_kontext.hooks import retry as failures
from airflow_provider_kontext.hooks.api import parse_retry_after
from airflow_provider_kontext.hooks.connection import ClientSettings, normalize_base_url
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.models import PredictionStatus

VERSION = "a" * 64


def prediction_json(status: str = "starting", **fields: Any) -> dict[str, Any]:
    return {
        "id": PRED_ID,
        "model": DEV,
        "version": "hidden",
        "input": INPUT,
        "status": status,
        "output": None,
        "logs": "",
        "error": None,
        "created_at": "2025-06-01T10:00:00Z",
        "urls": {"get": GET_URL, "cancel": CANCEL_URL, "web": f"https://replicate.com/p/{PRED_ID}"},
        **fields,
    }


ACCOUNT_JSON = {"type": "user", "username": "alice", "name": "Alice Example", "github_url": None}
FILE_JSON = {
    "id": "file-1",
    "name": "cat.png",
    "content_type": "image/png",
    "size": 4,
    "urls": {"get": f"{API}/v1/files/file-1"},
    "expires_at": "2025-06-02T10:00:00Z",
}


def refused() -> requests.exceptions.ConnectionError:
    """What requests raises when nothing listens on the port: the request never left."""
    reason = NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused")
    return requests.exceptions.ConnectionError(MaxRetryError(None, "/v1/x", reason=reason))  # type: ignore[arg-type]


def reset() -> requests.exceptions.ConnectionError:
    """What requests raises when the server drops the connection after the request was written."""
    return requests.exceptions.ConnectionError(
        "('Connection aborted.', RemoteDisconnected('Remote end closed connection without response'))"
    )


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture
def set_conn(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Define a connection through ``AIRFLOW_CONN_<ID>`` (JSON), as deployments without a DB do."""

    def _set(conn_id: str = "flux_kontext_default", **fields: Any) -> None:
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "fluxkontext", **fields})
        )

    return _set


@pytest.fixture(autouse=True)
def default_conn(monkeypatch: pytest.MonkeyPatch, set_conn: Callable[..., None]) -> None:
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    set_conn(password=TOKEN)


@pytest.fixture(autouse=True)
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits the retry policy asked for, instead of real sleeping."""
    waits: list[float] = []
    monkeypatch.setattr(FluxKontextHook, "_sleep", lambda self, seconds: waits.append(seconds))
    return waits


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> Callable[[], str]:
    """Everything logged: stdlib records (caplog) and the hook's structlog lines (printed)."""
    caplog.set_level(logging.DEBUG)

    def read() -> str:
        out = capsys.readouterr()
        return caplog.text + out.out + out.err

    return read


@pytest.fixture
def hook() -> FluxKontextHook:
    return FluxKontextHook()


def raised(call: Callable[[], Any], kind: type[BaseException] = FluxKontextError) -> Any:
    with pytest.raises(kind) as info:
        call()
    return info.value


def assert_no_secret(*texts: Any) -> None:
    for text in texts:
        assert TOKEN not in str(text)
        assert TOKEN[:10] not in str(text)


# --- connection and settings ---------------------------------------------------------------------------


def test_settings_from_env_connection(set_conn: Callable[..., None]) -> None:
    set_conn(
        "kontext_proxy",
        host=PROXY,
        password=TOKEN,
        extra={
            "timeout": "45",
            "connect_timeout": 3,
            "max_retries": 2,
            "backoff_base": 0.5,
            "backoff_max": 4,
            "retry_after_max": 9,
        },
    )
    settings = FluxKontextHook("kontext_proxy").settings
    assert settings == ClientSettings(
        conn_id="kontext_proxy",
        base_url=PROXY,
        token=TOKEN,
        timeout=45.0,
        connect_timeout=3.0,
        max_retries=2,
        backoff_base=0.5,
        backoff_max=4.0,
        retry_after_max=9.0,
    )


def test_settings_defaults(hook: FluxKontextHook) -> None:
    settings = hook.settings
    assert settings.base_url == API
    assert (settings.timeout, settings.connect_timeout, settings.max_retries) == (30.0, 10.0, 5)
    assert (settings.backoff_base, settings.backoff_max, settings.retry_after_max) == (1.0, 30.0, 60.0)


def test_hook_arguments_override_extras(set_conn: Callable[..., None]) -> None:
    set_conn(password=TOKEN, extra={"timeout": 45, "max_retries": 2})
    settings = FluxKontextHook(timeout=7, max_retries=0).settings
    assert (settings.timeout, settings.max_retries) == (7, 0)


@pytest.mark.parametrize(
    ("extra", "key"),
    [({"timeout": "soon"}, "timeout"), ({"timeout": 0.5}, "timeout"), ({"max_retries": -1}, "max_retries")],
)
def test_bad_extra_is_a_value_error(set_conn: Callable[..., None], extra: dict[str, Any], key: str) -> None:
    set_conn(password=TOKEN, extra=extra)
    err = raised(lambda: FluxKontextHook().settings, ValueError)
    assert f"connection extra {key!r}" in str(err)


def test_bad_extra_fails_test_connection(set_conn: Callable[..., None], requests_mock: Any) -> None:
    set_conn(password=TOKEN, extra={"max_retries": "many"})
    ok, message = FluxKontextHook().test_connection()
    assert not ok
    assert "max_retries" in message
    assert requests_mock.call_count == 0


@pytest.mark.parametrize(
    ("host", "base_url"),
    [
        (None, API),
        ("", API),
        (PROXY, PROXY),
        (f"{PROXY}/", PROXY),
        (f"{PROXY}/v1", PROXY),
        (f"{PROXY}/v1/", PROXY),
        ("https://api.replicate.com/v1", API),
        ("api.replicate.com", API),
        ("proxy.example/replicate", PROXY),
        ("http://localhost:8000", "http://localhost:8000"),
        ("  https://proxy.example/replicate  ", PROXY),
    ],
)
def test_base_url_handling(
    set_conn: Callable[..., None], requests_mock: Any, host: str | None, base_url: str
) -> None:
    fields: dict[str, Any] = {"password": TOKEN}
    if host is not None:
        fields["host"] = host
    set_conn(**fields)
    requests_mock.get(f"{base_url}/v1/predictions/{PRED_ID}", json=prediction_json())
    hook = FluxKontextHook()
    assert hook.settings.base_url == base_url
    assert hook.get_prediction(PRED_ID).id == PRED_ID
    assert requests_mock.last_request.url == f"{base_url}/v1/predictions/{PRED_ID}"


def test_base_url_port_is_appended() -> None:
    assert normalize_base_url("localhost", 8443) == "https://localhost:8443"
    assert normalize_base_url("http://localhost:8000", 9999) == "http://localhost:8000"


def test_proxy_create_path_keeps_the_prefix(set_conn: Callable[..., None], requests_mock: Any) -> None:
    set_conn(host=PROXY)
    requests_mock.post(f"{PROXY}/v1/models/{DEV}/predictions", status_code=201, json=prediction_json())
    FluxKontextHook().create_prediction(DEV, INPUT)
    assert requests_mock.call_count == 1


def test_token_from_environment_when_connection_has_none(
    set_conn: Callable[..., None], monkeypatch: pytest.MonkeyPatch, requests_mock: Any
) -> None:
    set_conn(host=PROXY)
    monkeypatch.setenv("REPLICATE_API_TOKEN", ENV_TOKEN)
    requests_mock.get(f"{PROXY}/v1/account", json=ACCOUNT_JSON)
    FluxKontextHook().get_account()
    assert requests_mock.last_request.headers["Authorization"] == f"Bearer {ENV_TOKEN}"


def test_connection_token_wins_over_environment(monkeypatch: pytest.MonkeyPatch, requests_mock: Any) -> None:
    monkeypatch.setenv("REPLICATE_API_TOKEN", ENV_TOKEN)
    requests_mock.get(ACCOUNT_URL, json=ACCOUNT_JSON)
    FluxKontextHook().get_account()
    assert requests_mock.last_request.headers["Authorization"] == f"Bearer {TOKEN}"


def test_no_token_sends_no_authorization(set_conn: Callable[..., None], requests_mock: Any) -> None:
    set_conn(host=PROXY)
    requests_mock.get(f"{PROXY}/v1/account", json=ACCOUNT_JSON)
    hook = FluxKontextHook()
    hook.get_account()
    assert hook.settings.token is None
    assert "Authorization" not in requests_mock.last_request.headers


def test_repr_never_shows_the_token(hook: FluxKontextHook) -> None:
    assert hook.settings.token == TOKEN
    assert_no_secret(repr(hook), repr(hook.settings), str(hook.settings))
    assert "flux_kontext_default" in repr(hook)


# --- methods -------------------------------------------------------------------------------------------


def test_create_prediction_by_model(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.post(CREATE_URL, status_code=201, json=prediction_json())
    result = hook.create_prediction(DEV, INPUT)
    assert result.id == PRED_ID
    assert result.status is PredictionStatus.STARTING
    assert result.urls.get == GET_URL
    req = requests_mock.last_request
    assert req.method == "POST"
    assert req.json() == {"input": INPUT}
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["Accept"] == "application/json"
    assert req.headers["User-Agent"] == "airflow-provider-kontext"
    assert "Prefer" not in req.headers
    assert "Cancel-After" not in req.headers
    assert req.timeout == (10.0, 30.0)
    assert requests_mock.call_count == 1


def test_create_prediction_wait_and_cancel_after(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.post(
        CREATE_URL, status_code=201, json=prediction_json("succeeded", output="https://x/o.webp")
    )
    result = hook.create_prediction(DEV, INPUT, wait=30, cancel_after=90)
    assert result.output_urls == ["https://x/o.webp"]
    req = requests_mock.last_request
    assert req.headers["Prefer"] == "wait=30"
    assert req.headers["Cancel-After"] == "90s"
    # the read timeout outlasts the server-side wait
    assert req.timeout == (10.0, 45.0)


@pytest.mark.parametrize(("cancel_after", "header"), [(2, "5s"), (300, "300s"), (90.9, "90s")])
def test_cancel_after_header_format(
    hook: FluxKontextHook, requests_mock: Any, cancel_after: float, header: str
) -> None:
    requests_mock.post(CREATE_URL, status_code=201, json=prediction_json())
    hook.create_prediction(DEV, INPUT, cancel_after=cancel_after)
    assert requests_mock.last_request.headers["Cancel-After"] == header


@pytest.mark.parametrize("wait", [0, 61])
def test_create_prediction_wait_out_of_range(hook: FluxKontextHook, requests_mock: Any, wait: int) -> None:
    err = raised(lambda: hook.create_prediction(DEV, INPUT, wait=wait), ValueError)
    assert "wait must be between 1 and 60" in str(err)
    assert requests_mock.call_count == 0


def test_create_prediction_webhook(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.post(CREATE_URL, status_code=201, json=prediction_json())
    hook.create_prediction(
        DEV, INPUT, webhook="https://hooks.example/k", webhook_events_filter=["start", "completed"]
    )
    assert requests_mock.last_request.json() == {
        "input": INPUT,
        "webhook": "https://hooks.example/k",
        "webhook_events_filter": ["start", "completed"],
    }


def test_create_prediction_by_version(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.post(f"{API}/v1/predictions", status_code=201, json=prediction_json())
    hook.create_prediction(f"{DEV}:{VERSION}", INPUT)
    assert requests_mock.last_request.json() == {"input": INPUT, "version": VERSION}


def test_create_prediction_by_bare_version_hash(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.post(f"{API}/v1/predictions", status_code=201, json=prediction_json())
    hook.create_prediction(VERSION, INPUT)
    assert requests_mock.last_request.json() == {"input": INPUT, "version": VERSION}


@pytest.mark.parametrize("model", ["flux-kontext-dev", "a/b/c", "/name", "owner/", ""])
def test_create_prediction_bad_model(hook: FluxKontextHook, requests_mock: Any, model: str) -> None:
    raised(lambda: hook.create_prediction(model, INPUT), ValueError)
    assert requests_mock.call_count == 0


def test_create_prediction_proxy_images_shape(set_conn: Callable[..., None], requests_mock: Any) -> None:
    set_conn(host=PROXY, password=TOKEN)
    requests_mock.post(
        f"{PROXY}/v1/models/{DEV}/predictions",
        json={"created": 1589478378, "data": [{"url": "https://proxy.example/out/1.png"}]},
    )
    result = FluxKontextHook().create_prediction(DEV, INPUT, wait=60)
    assert result.status is PredictionStatus.SUCCEEDED
    assert result.output_urls == ["https://proxy.example/out/1.png"]


@pytest.mark.parametrize("status", ["starting", "processing", "succeeded", "failed", "canceled", "aborted"])
def test_get_prediction(hook: FluxKontextHook, requests_mock: Any, status: str) -> None:
    requests_mock.get(GET_URL, json=prediction_json(status, logs="a\nb\n"))
    result = hook.get_prediction(PRED_ID)
    assert result.status.value == status
    assert result.is_terminal is (status in ("succeeded", "failed", "canceled", "aborted"))
    req = requests_mock.last_request
    assert req.method == "GET"
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    assert req.body is None


@pytest.mark.parametrize("bad_id", ["", "../account", "abc/cancel", "a b", "abc?x=1"])
def test_get_prediction_rejects_bad_ids(hook: FluxKontextHook, requests_mock: Any, bad_id: str) -> None:
    raised(lambda: hook.get_prediction(bad_id), ValueError)
    assert requests_mock.call_count == 0


def test_cancel_prediction(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.post(CANCEL_URL, json=prediction_json("canceled"))
    result = hook.cancel_prediction(PRED_ID)
    assert result.status is PredictionStatus.CANCELED
    assert requests_mock.last_request.method == "POST"
    assert requests_mock.last_request.headers["Authorization"] == f"Bearer {TOKEN}"


def test_get_account(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.get(ACCOUNT_URL, json=ACCOUNT_JSON)
    account = hook.get_account()
    assert (account.username, account.name, account.type) == ("alice", "Alice Example", "user")


def test_upload_file_bytes(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.post(FILES_URL, status_code=201, json=FILE_JSON)
    uploaded = hook.upload_file(b"\x89PNG", content_type="image/png")
    assert uploaded.urls.get == f"{API}/v1/files/file-1"
    req = requests_mock.last_request
    assert req.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert b'name="content"; filename="input"' in req.body
    assert b"Content-Type: image/png" in req.body
    assert b"\x89PNG" in req.body
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    assert req.timeout == (10.0, 120.0)


def test_upload_file_bytes_with_filename(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.post(FILES_URL, status_code=201, json=FILE_JSON)
    hook.upload_file(bytearray(b"GIF89a"), filename="anim.gif", content_type="image/gif")
    body = requests_mock.last_request.body
    assert b'name="content"; filename="anim.gif"' in body
    assert b"Content-Type: image/gif" in body
    assert b"GIF89a" in body


@pytest.mark.parametrize("as_str", [False, True])
def test_upload_file_path(hook: FluxKontextHook, requests_mock: Any, tmp_path: Any, as_str: bool) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(b"\x89PNG-from-disk")
    requests_mock.post(FILES_URL, status_code=201, json=FILE_JSON)
    hook.upload_file(str(path) if as_str else path, content_type="image/png")
    body = requests_mock.last_request.body
    assert b'filename="cat.png"' in body
    assert b"\x89PNG-from-disk" in body


def test_upload_file_object(hook: FluxKontextHook, requests_mock: Any, tmp_path: Any) -> None:
    path = tmp_path / "dog.webp"
    path.write_bytes(b"RIFF-webp")
    requests_mock.post(FILES_URL, status_code=201, json=FILE_JSON)
    with path.open("rb") as fh:
        hook.upload_file(fh, content_type="image/webp")
    body = requests_mock.last_request.body
    assert b'filename="dog.webp"' in body
    assert b"RIFF-webp" in body


def test_upload_nameless_file_object(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.post(FILES_URL, status_code=201, json=FILE_JSON)
    hook.upload_file(io.BytesIO(b"jpegbytes"), content_type="image/jpeg")
    body = requests_mock.last_request.body
    assert b'filename="input"' in body
    assert b"jpegbytes" in body


def test_upload_is_retried_on_server_error(
    hook: FluxKontextHook, requests_mock: Any, sleeps: list[float]
) -> None:
    requests_mock.post(FILES_URL, [{"status_code": 503}, {"status_code": 201, "json": FILE_JSON}])
    hook.upload_file(b"x", content_type="image/png")
    assert requests_mock.call_count == 2
    assert len(sleeps) == 1


def test_test_connection_success(set_conn: Callable[..., None], requests_mock: Any) -> None:
    set_conn(host=PROXY, password=TOKEN)
    requests_mock.get(f"{PROXY}/v1/account", json=ACCOUNT_JSON)
    assert FluxKontextHook().test_connection() == (True, f"Connected to {PROXY} as alice (Alice Example)")


def test_test_connection_message_hides_credentials_in_the_base_url(
    set_conn: Callable[..., None], requests_mock: Any
) -> None:
    set_conn(host="https://user:PROXYPASS99@proxy.example/replicate?key=QUERYKEY77", password=TOKEN)
    requests_mock.get("https://user:PROXYPASS99@proxy.example/replicate/v1/account", json=ACCOUNT_JSON)
    ok, message = FluxKontextHook().test_connection()
    assert ok
    assert "PROXYPASS99" not in message
    assert "QUERYKEY77" not in message
    assert "proxy.example/replicate" in message


def test_test_connection_success_without_name(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.get(ACCOUNT_URL, json={"type": "organization", "username": "acme"})
    assert hook.test_connection() == (True, f"Connected to {API} as acme")


def test_test_connection_failure(set_conn: Callable[..., None], requests_mock: Any) -> None:
    set_conn("kontext_prod", password=TOKEN)
    requests_mock.get(
        ACCOUNT_URL,
        status_code=401,
        headers={"Content-Type": PROBLEM},
        json={
            "title": "Unauthenticated",
            "detail": "You did not pass a valid authentication token",
            "status": 401,
        },
    )
    ok, message = FluxKontextHook("kontext_prod").test_connection()
    assert not ok
    assert "GET /v1/account failed with HTTP 401 (Unauthenticated)" in message
    assert "'kontext_prod'" in message
    assert_no_secret(message)
    assert requests_mock.call_count == 1


def test_test_connection_failure_network(requests_mock: Any) -> None:
    hook = FluxKontextHook(max_retries=1)
    requests_mock.get(ACCOUNT_URL, exc=refused())
    ok, message = hook.test_connection()
    assert not ok
    assert "could not connect" in message
    assert requests_mock.call_count == 2


def test_close_drops_the_session(hook: FluxKontextHook) -> None:
    session = hook.get_conn()
    assert hook.get_conn() is session
    hook.close()
    assert hook.get_conn() is not session


# --- retries -------------------------------------------------------------------------------------------
# The retry behaviour both transports share is in test_transport_contract.py (real HTTP on 127.0.0.1);
# here, what only requests raises.


def test_ssl_error_is_not_treated_as_refused(hook: FluxKontextHook, requests_mock: Any) -> None:
    requests_mock.post(CREATE_URL, exc=requests.exceptions.SSLError("handshake failed"))
    raised(lambda: hook.create_prediction(DEV, INPUT), FluxKontextPredictionMayExistError)
    assert requests_mock.call_count == 1


# --- error mapping -------------------------------------------------------------------------------------


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


# --- secrets -------------------------------------------------------------------------------------------


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


# --- shared helpers ------------------------------------------------------------------------------------


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
    """A 2xx the hook cannot read may still have created (and billed) a prediction: never a plain
    error that would let a retry create a second one."""
    requests_mock.post(CREATE_URL, text=body, status_code=201)
    with pytest.raises(FluxKontextPredictionMayExistError) as info:
        hook.create_prediction(DEV, INPUT)
    assert requests_mock.call_count == 1
    if named:
        assert f"named prediction {named!r}" in str(info.value)
