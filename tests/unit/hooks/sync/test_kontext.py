"""Test ``FluxKontextHook``'s sync path (requests) against ``requests_mock``: settings and methods.

The retry behaviour both transports share is in ``../test_transport_contract.py``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
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

from airflow_provider_kontext.hooks.connection import ClientSettings, normalize_base_url
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.models import PredictionStatus

from .helpers import ACCOUNT_JSON, FILE_JSON, VERSION, assert_no_secret, prediction_json, raised, refused

# --- connection and settings ----------------------------------------------------------------------


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


# --- methods --------------------------------------------------------------------------------------


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
