"""``FluxKontextHook``'s async path, through its production client (one shared ``aiohttp`` session
per event loop) against servers on 127.0.0.1 started by the tests themselves; nothing leaves the machine.

:class:`~scripted_api.FakeApi` scripts the answers of an aiohttp server in the test's loop; the
tests' URLs (``API``, ``PROXY``) are mapped to it, and so is the connection's host. Failures a server
cannot script (a refused connection, a connect timeout) are raised where aiohttp raises them, in its
connector. ``_asleep`` is replaced by a recorder, so retries do not wait and their waits can be
asserted. The retry behaviour both transports share is in ``test_transport_contract.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
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
from scripted_api import Fail, FakeApi, app_for, patch_connects

from airflow_provider_kontext.exceptions import (
    FluxKontextAPIError,
    FluxKontextAuthError,
    FluxKontextDeadlineError,
    FluxKontextError,
    FluxKontextNotFoundError,
    FluxKontextPredictionMayExistError,
    FluxKontextServerError,
    FluxKontextTransportError,
)
from airflow_provider_kontext.hooks import connection as connection_module
from airflow_provider_kontext.hooks.connection import ClientSettings
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.hooks.retry import RetryLimits
from airflow_provider_kontext.hooks.transports import AiohttpClient, SharedAsyncClient
from airflow_provider_kontext.models import PredictionStatus

VERSION = "b" * 64
THROTTLED = {"detail": "Request was throttled. Expected available in 1 second."}


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
        "urls": {"get": GET_URL, "cancel": CANCEL_URL, "web": f"https://replicate.com/p/{PRED_ID}"},
        **fields,
    }


ACCOUNT_JSON = {"type": "user", "username": "alice", "name": "Alice Example"}
FILE_JSON = {"id": "file-1", "size": 4, "urls": {"get": f"{API}/v1/files/file-1"}}


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture
def routing() -> dict[str, Any]:
    """Where ``set_conn`` sends the tests' hosts (filled by the ``api`` fixture)."""
    return {}


@pytest.fixture
def set_conn(monkeypatch: pytest.MonkeyPatch, routing: dict[str, Any]) -> Callable[..., None]:
    def _set(conn_id: str = "flux_kontext_default", **fields: Any) -> None:
        if routing:  # a fake API runs: the tests' hosts go to it, a missing host (the default) too
            host = fields.get("host") or API
            fields["host"] = routing["local"](host)
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
    waits: list[float] = []

    async def _asleep(self: FluxKontextHook, seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(FluxKontextHook, "_asleep", _asleep)
    return waits


@pytest.fixture
async def api(
    monkeypatch: pytest.MonkeyPatch, routing: dict[str, Any], set_conn: Callable[..., None]
) -> AsyncIterator[FakeApi]:
    fake = FakeApi()
    server = TestServer(app_for(fake), host="127.0.0.1")
    await server.start_server()
    fake.base = f"http://127.0.0.1:{server.port}"
    routing["local"] = fake.local
    set_conn(password=TOKEN)
    patch_connects(monkeypatch, fake)
    make_timeout = AiohttpClient._timeout

    def timeout(self: AiohttpClient, read: float, connect_: float) -> aiohttp.ClientTimeout:
        fake.timeouts.append(make_timeout(self, read, connect_))
        return fake.timeouts[-1]

    monkeypatch.setattr(AiohttpClient, "_timeout", timeout)
    try:
        yield fake
    finally:
        fake.release.set()
        await server.close()


@pytest.fixture
async def hook(api: FakeApi) -> AsyncIterator[FluxKontextHook]:
    async with FluxKontextHook() as h:
        yield h


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> Callable[[], str]:
    """Everything logged: stdlib records (caplog, aiohttp's included) and the hook's structlog lines."""
    caplog.set_level(logging.DEBUG)

    def read() -> str:
        out = capsys.readouterr()
        return caplog.text + out.out + out.err

    return read


async def araised(coro: Any, kind: type[BaseException] = FluxKontextError) -> Any:
    with pytest.raises(kind) as info:
        await coro
    return info.value


def assert_no_secret(*texts: Any) -> None:
    for text in texts:
        assert TOKEN not in str(text)
        assert TOKEN[:10] not in str(text)


def read_timeout(api: FakeApi) -> float | None:
    """The read timeout the client set for the last request."""
    return api.timeouts[-1].sock_read


# --- settings ----------------------------------------------------------------------------------------


async def test_aget_settings_from_env_connection(set_conn: Callable[..., None]) -> None:
    set_conn(
        "kontext_proxy",
        host=f"{PROXY}/v1/",
        password=TOKEN,
        extra={"timeout": 45, "connect_timeout": "3", "max_retries": 2, "retry_after_max": 9},
    )
    hook = FluxKontextHook("kontext_proxy")
    settings = await hook.aget_settings()
    assert settings == ClientSettings(
        conn_id="kontext_proxy",
        base_url=PROXY,
        token=TOKEN,
        timeout=45.0,
        connect_timeout=3.0,
        max_retries=2,
        retry_after_max=9.0,
    )
    # looked up once
    assert await hook.aget_settings() is settings


async def test_aget_settings_arguments_override_extras(set_conn: Callable[..., None]) -> None:
    set_conn(extra={"timeout": 45, "max_retries": 4})
    settings = await FluxKontextHook(timeout=5, max_retries=1).aget_settings()
    assert (settings.timeout, settings.max_retries, settings.base_url, settings.token) == (5, 1, API, None)


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The connection ids the hooks look up (the real lookup still runs)."""
    seen: list[str] = []
    original = FluxKontextHook.aget_connection

    async def counting(cls: type[FluxKontextHook], conn_id: str) -> Any:
        seen.append(conn_id)
        return await original(conn_id)

    monkeypatch.setattr(FluxKontextHook, "aget_connection", classmethod(counting))
    return seen


async def test_hooks_in_one_event_loop_share_the_settings(api: FakeApi, lookups: list[str]) -> None:
    api.on("GET", GET_URL, {"json": prediction_json()})
    for _ in range(3):  # three triggers, one lookup
        async with FluxKontextHook() as hook:
            await hook.aget_prediction(PRED_ID)
    assert lookups == ["flux_kontext_default"]
    async with FluxKontextHook(timeout=5) as other:  # other overrides: their own settings
        assert (await other.aget_settings()).timeout == 5
    assert lookups == ["flux_kontext_default", "flux_kontext_default"]


async def test_shared_settings_expire(
    api: FakeApi, lookups: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection_module, "SETTINGS_TTL_SECONDS", 0.0)
    api.on("GET", GET_URL, {"json": prediction_json()})
    for _ in range(2):
        async with FluxKontextHook() as hook:
            await hook.aget_prediction(PRED_ID)
    assert len(lookups) == 2


def test_settings_are_not_shared_across_event_loops(local_api_thread: str, lookups: list[str]) -> None:
    async def poll() -> None:
        async with FluxKontextHook() as hook:
            await hook.aget_account()

    asyncio.run(poll())
    asyncio.run(poll())
    assert len(lookups) == 2


async def test_a_rotated_token_is_used_after_an_auth_error(
    api: FakeApi, lookups: list[str], set_conn: Callable[..., None]
) -> None:
    unauthorized = {"status_code": 401, "json": {"detail": "Invalid token"}}
    api.on("GET", GET_URL, {"json": prediction_json()}, unauthorized, {"json": prediction_json()})
    async with FluxKontextHook() as first:
        await first.aget_prediction(PRED_ID)
    set_conn(password="r8_NEWTOKEN_rotated")  # the connection changes while its settings are shared
    async with FluxKontextHook() as second:
        assert (await second.aget_prediction(PRED_ID)).id == PRED_ID
    assert [r.headers["Authorization"] for r in api.requests] == [
        f"Bearer {TOKEN}",
        f"Bearer {TOKEN}",
        "Bearer r8_NEWTOKEN_rotated",
    ]
    assert len(lookups) == 2


async def test_an_auth_error_with_unchanged_settings_is_not_resent(
    api: FakeApi, lookups: list[str], sleeps: list[float]
) -> None:
    api.on("GET", GET_URL, {"status_code": 401, "json": {"detail": "Invalid token"}})
    async with FluxKontextHook() as hook:
        await araised(hook.aget_prediction(PRED_ID), FluxKontextAuthError)
    assert len(api.requests) == 1
    assert len(lookups) == 2  # looked up again, found the same
    assert sleeps == []


@pytest.mark.parametrize(
    ("host", "base_url"),
    [
        (None, API),
        ("", API),
        (PROXY, PROXY),
        (f"{PROXY}/v1", PROXY),
        ("proxy.example/replicate/", PROXY),
        ("https://api.replicate.com/v1/", API),
    ],
)
async def test_base_url_handling(set_conn: Callable[..., None], host: str | None, base_url: str) -> None:
    set_conn(**({"password": TOKEN} if host is None else {"host": host, "password": TOKEN}))
    async with FluxKontextHook() as hook:
        assert (await hook.aget_settings()).base_url == base_url


async def test_requests_go_below_the_base_url_path(set_conn: Callable[..., None], api: FakeApi) -> None:
    set_conn(host=f"{PROXY}/v1/", password=TOKEN)
    api.on("GET", f"{PROXY}/v1/predictions/{PRED_ID}", {"json": prediction_json()})
    async with FluxKontextHook() as hook:
        assert (await hook.aget_prediction(PRED_ID)).id == PRED_ID
    assert api.last.url == f"{PROXY}/v1/predictions/{PRED_ID}"


async def test_token_from_environment(
    set_conn: Callable[..., None], monkeypatch: pytest.MonkeyPatch, api: FakeApi
) -> None:
    set_conn(host=PROXY)
    monkeypatch.setenv("REPLICATE_API_TOKEN", ENV_TOKEN)
    api.on("GET", f"{PROXY}/v1/account", {"json": ACCOUNT_JSON})
    async with FluxKontextHook() as hook:
        await hook.aget_account()
    assert api.last.headers["Authorization"] == f"Bearer {ENV_TOKEN}"


async def test_no_token_sends_no_authorization(set_conn: Callable[..., None], api: FakeApi) -> None:
    set_conn(host=PROXY)
    api.on("GET", f"{PROXY}/v1/account", {"json": ACCOUNT_JSON})
    async with FluxKontextHook() as hook:
        await hook.aget_account()
    assert "authorization" not in api.last.headers


async def test_repr_never_shows_the_token(hook: FluxKontextHook) -> None:
    settings = await hook.aget_settings()
    assert settings.token == TOKEN
    assert_no_secret(repr(hook), repr(settings))


# --- methods -------------------------------------------------------------------------------------------


async def test_acreate_prediction_by_model(hook: FluxKontextHook, api: FakeApi) -> None:
    api.on("POST", CREATE_URL, {"status_code": 201, "json": prediction_json()})
    result = await hook.acreate_prediction(DEV, INPUT)
    assert (result.id, result.status) == (PRED_ID, PredictionStatus.STARTING)
    req = api.last
    assert json.loads(req.content) == {"input": INPUT}
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["User-Agent"] == "airflow-provider-kontext"
    assert "prefer" not in req.headers
    assert "cancel-after" not in req.headers
    assert api.timeouts[-1] == aiohttp.ClientTimeout(sock_connect=10.0, sock_read=30.0, connect=30.0)
    assert len(api.requests) == 1


async def test_acreate_prediction_wait_and_cancel_after(hook: FluxKontextHook, api: FakeApi) -> None:
    api.on(
        "POST",
        CREATE_URL,
        {"status_code": 201, "json": prediction_json("succeeded", output="https://x/o.png")},
    )
    result = await hook.acreate_prediction(DEV, INPUT, wait=60, cancel_after=300)
    assert result.output_urls == ["https://x/o.png"]
    assert api.last.headers["Prefer"] == "wait=60"
    assert api.last.headers["Cancel-After"] == "300s"
    assert read_timeout(api) == 75.0


async def test_acreate_prediction_webhook(hook: FluxKontextHook, api: FakeApi) -> None:
    api.on("POST", CREATE_URL, {"status_code": 201, "json": prediction_json()})
    await hook.acreate_prediction(
        DEV, INPUT, webhook="https://hooks.example/k", webhook_events_filter=["completed"]
    )
    assert json.loads(api.last.content) == {
        "input": INPUT,
        "webhook": "https://hooks.example/k",
        "webhook_events_filter": ["completed"],
    }


async def test_acreate_prediction_by_version(hook: FluxKontextHook, api: FakeApi) -> None:
    api.on("POST", f"{API}/v1/predictions", {"status_code": 201, "json": prediction_json()})
    await hook.acreate_prediction(f"{DEV}:{VERSION}", INPUT)
    assert json.loads(api.last.content) == {"input": INPUT, "version": VERSION}


async def test_acreate_prediction_bad_arguments_send_nothing(hook: FluxKontextHook, api: FakeApi) -> None:
    await araised(hook.acreate_prediction("no-owner", INPUT), ValueError)
    await araised(hook.acreate_prediction(DEV, INPUT, wait=0), ValueError)
    await araised(hook.aget_prediction("../account"), ValueError)
    assert api.requests == []


async def test_acreate_prediction_proxy_images_shape(set_conn: Callable[..., None], api: FakeApi) -> None:
    set_conn(host=PROXY)
    api.on(
        "POST",
        f"{PROXY}/v1/models/{DEV}/predictions",
        {"json": {"created": 1589478378, "data": [{"url": "https://proxy.example/o/1.png"}]}},
    )
    async with FluxKontextHook() as hook:
        result = await hook.acreate_prediction(DEV, INPUT)
    assert result.status is PredictionStatus.SUCCEEDED
    assert result.output_urls == ["https://proxy.example/o/1.png"]


@pytest.mark.parametrize("status", ["starting", "processing", "succeeded", "failed", "canceled", "aborted"])
async def test_aget_prediction(hook: FluxKontextHook, api: FakeApi, status: str) -> None:
    api.on("GET", GET_URL, {"json": prediction_json(status)})
    result = await hook.aget_prediction(PRED_ID)
    assert result.status.value == status
    assert result.is_terminal is (status in ("succeeded", "failed", "canceled", "aborted"))
    assert api.last.method == "GET"
    assert api.last.headers["Authorization"] == f"Bearer {TOKEN}"


async def test_acancel_prediction(hook: FluxKontextHook, api: FakeApi) -> None:
    api.on("POST", CANCEL_URL, {"json": prediction_json("canceled")})
    assert (await hook.acancel_prediction(PRED_ID)).status is PredictionStatus.CANCELED
    assert api.last.method == "POST"


async def test_aget_account(hook: FluxKontextHook, api: FakeApi) -> None:
    api.on("GET", ACCOUNT_URL, {"json": ACCOUNT_JSON})
    account = await hook.aget_account()
    assert (account.username, account.name) == ("alice", "Alice Example")


async def test_aupload_file_bytes(hook: FluxKontextHook, api: FakeApi) -> None:
    api.on("POST", FILES_URL, {"status_code": 201, "json": FILE_JSON})
    uploaded = await hook.aupload_file(b"\x89PNG", content_type="image/png")
    assert uploaded.urls.get == f"{API}/v1/files/file-1"
    req = api.last
    assert req.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert b'name="content"; filename="input"' in req.content
    assert b"Content-Type: image/png" in req.content
    assert b"\x89PNG" in req.content
    assert read_timeout(api) == 120.0


async def test_aupload_file_path(hook: FluxKontextHook, api: FakeApi, tmp_path: Any) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(b"from-disk")
    api.on("POST", FILES_URL, {"status_code": 201, "json": FILE_JSON})
    await hook.aupload_file(path, content_type="image/png")
    await hook.aupload_file(str(path), filename="renamed.png", content_type="image/png")
    first, second = api.requests
    assert b'filename="cat.png"' in first.content
    assert b"from-disk" in first.content
    assert b'filename="renamed.png"' in second.content


async def test_aupload_file_object(hook: FluxKontextHook, api: FakeApi, tmp_path: Any) -> None:
    path = tmp_path / "dog.webp"
    path.write_bytes(b"RIFF-webp")
    api.on("POST", FILES_URL, {"status_code": 201, "json": FILE_JSON})
    with path.open("rb") as fh:
        await hook.aupload_file(fh, content_type="image/webp")
    assert b'filename="dog.webp"' in api.last.content
    assert b"RIFF-webp" in api.last.content


async def test_aclose_closes_the_client(api: FakeApi) -> None:
    api.on("GET", ACCOUNT_URL, {"json": ACCOUNT_JSON})
    hook = FluxKontextHook()
    await hook.aclose()  # nothing opened yet: a no-op
    await hook.aget_account()
    client = hook._aclient
    assert client is not None
    assert not client.is_closed
    await hook.aclose()
    assert client.is_closed
    # the hook reopens a client when used again
    await hook.aget_account()
    assert hook._aclient is not None
    assert hook._aclient is not client
    await hook.aclose()


# --- error mapping -------------------------------------------------------------------------------------


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


# --- secrets -------------------------------------------------------------------------------------------


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


# --- the real shared client ------------------------------------------------------------------------------


async def test_shared_client_is_shared_and_closed_after_the_last_release() -> None:
    first = SharedAsyncClient.acquire()
    second = SharedAsyncClient.acquire()
    try:
        assert first is second
        assert isinstance(first, AiohttpClient)
        await SharedAsyncClient.release(first)
        assert not first.is_closed
        assert asyncio.get_running_loop() in SharedAsyncClient._clients
    finally:
        await SharedAsyncClient.release(second)
    assert first.is_closed
    assert asyncio.get_running_loop() not in SharedAsyncClient._clients
    # a later user gets a fresh client
    third = SharedAsyncClient.acquire()
    try:
        assert third is not first
        assert not third.is_closed
    finally:
        await SharedAsyncClient.release(third)
    assert third.is_closed


async def test_shared_client_is_per_event_loop() -> None:
    here = SharedAsyncClient.acquire()
    elsewhere: list[AiohttpClient] = []

    async def in_other_loop() -> None:
        client = SharedAsyncClient.acquire()
        elsewhere.append(client)
        await SharedAsyncClient.release(client)

    thread = threading.Thread(target=lambda: asyncio.run(in_other_loop()))
    thread.start()
    thread.join()
    try:
        (other,) = elsewhere
        assert other is not here
        assert other.is_closed
        assert not here.is_closed
    finally:
        await SharedAsyncClient.release(here)


async def test_releasing_a_foreign_client_closes_it() -> None:
    shared = SharedAsyncClient.acquire()
    own = AiohttpClient()
    try:
        await SharedAsyncClient.release(own)
        assert own.is_closed
        assert not shared.is_closed
    finally:
        await SharedAsyncClient.release(shared)


@pytest.fixture
async def local_api(set_conn: Callable[..., None]) -> AsyncIterator[dict[str, Any]]:
    """A tiny API on 127.0.0.1 (aiohttp server in the test's loop); the default connection points at it."""
    seen: list[web.Request] = []
    uploads: list[dict[str, Any]] = []
    release = asyncio.Event()

    async def account(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response(ACCOUNT_JSON)

    async def prediction(request: web.Request) -> web.Response:
        seen.append(request)
        if request.match_info["id"] == "slow":
            await release.wait()
        if request.match_info["id"] == "flaky" and len(seen) == 1:  # the first call fails
            return web.json_response({"detail": "try again"}, status=503)
        return web.json_response(prediction_json("processing", id=request.match_info["id"]))

    async def slow(request: web.Request) -> web.Response:
        seen.append(request)
        await release.wait()
        return web.json_response(prediction_json())

    async def files(request: web.Request) -> web.Response:
        seen.append(request)
        form = await request.post()
        field = form["content"]
        uploads.append({"filename": field.filename, "type": field.content_type, "data": field.file.read()})
        return web.json_response(FILE_JSON, status=201)

    app = web.Application()
    app.router.add_get("/replicate/v1/account", account)
    app.router.add_get("/replicate/v1/predictions/{id}", prediction)
    app.router.add_post("/replicate/v1/models/{owner}/{name}/predictions", slow)
    app.router.add_post("/replicate/v1/files", files)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    base = f"http://127.0.0.1:{server.port}/replicate"
    set_conn(host=base, password=TOKEN)
    try:
        yield {"base": base, "seen": seen, "uploads": uploads}
    finally:
        release.set()
        await server.close()


async def test_two_hooks_share_the_real_client_until_the_last_aclose(local_api: dict[str, Any]) -> None:
    first, second = FluxKontextHook(), FluxKontextHook()
    assert (await first.aget_account()).username == "alice"
    assert (await second.aget_prediction("p1")).id == "p1"
    client = first._aclient
    assert client is not None
    assert second._aclient is client
    assert local_api["seen"][0].headers["Authorization"] == f"Bearer {TOKEN}"

    await first.aclose()
    assert not client.is_closed
    # the other hook keeps working on the same client
    assert (await second.aget_prediction("p2")).id == "p2"
    assert second._aclient is client

    await second.aclose()
    assert client.is_closed
    assert asyncio.get_running_loop() not in SharedAsyncClient._clients

    # a hook used after that opens a new shared client
    async with FluxKontextHook() as third:
        await third.aget_account()
        assert third._aclient is not None
        assert third._aclient is not client
        reopened = third._aclient
    assert reopened.is_closed


async def test_concurrent_calls_on_one_hook_acquire_once(local_api: dict[str, Any]) -> None:
    hook = FluxKontextHook()
    results = await asyncio.gather(*(hook.aget_prediction(f"p{i}") for i in range(10)))
    assert [r.id for r in results] == [f"p{i}" for i in range(10)]
    client = hook._aclient
    assert client is not None
    await hook.aclose()
    # one release was enough: the use count was one
    assert client.is_closed


async def test_real_upload_through_the_shared_client(local_api: dict[str, Any], tmp_path: Any) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(b"\x89PNG real bytes")
    async with FluxKontextHook() as hook:
        uploaded = await hook.aupload_file(path, content_type="image/png")
    assert uploaded.id == "file-1"
    assert local_api["uploads"] == [
        {"filename": "cat.png", "type": "image/png", "data": b"\x89PNG real bytes"}
    ]


async def test_real_read_timeout_on_a_create_is_not_retried(
    local_api: dict[str, Any], sleeps: list[float]
) -> None:
    async with FluxKontextHook(timeout=0.2, max_retries=3) as hook:
        err = await araised(hook.acreate_prediction(DEV, INPUT), FluxKontextPredictionMayExistError)
    assert len(local_api["seen"]) == 1
    assert sleeps == []
    assert "no complete response" in str(err)


async def test_real_read_timeout_on_a_get_is_retried(local_api: dict[str, Any], sleeps: list[float]) -> None:
    async with FluxKontextHook(timeout=0.2, max_retries=1) as hook:
        err = await araised(hook.aget_prediction("slow"), FluxKontextTransportError)
    assert err.request_sent is True
    assert len(local_api["seen"]) == 2
    assert len(sleeps) == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_real_connection_refused_create_is_retried(
    set_conn: Callable[..., None], sleeps: list[float]
) -> None:
    set_conn(host=f"http://127.0.0.1:{free_port()}", password=TOKEN)
    async with FluxKontextHook(max_retries=2) as hook:
        err = await araised(hook.acreate_prediction(DEV, INPUT), FluxKontextTransportError)
    assert not isinstance(err, FluxKontextPredictionMayExistError)
    assert err.request_sent is False
    assert "could not connect" in str(err)
    assert len(sleeps) == 2
    assert_no_secret(str(err))


async def test_real_dropped_connection_create_is_not_retried(
    set_conn: Callable[..., None], sleeps: list[float]
) -> None:
    connections: list[bytes] = []

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    set_conn(host=f"http://127.0.0.1:{port}", password=TOKEN)
    try:
        async with FluxKontextHook(max_retries=3) as hook:
            await araised(hook.acreate_prediction(DEV, INPUT), FluxKontextPredictionMayExistError)
    finally:
        server.close()
        await server.wait_closed()
    assert len(connections) == 1
    assert connections[0].startswith(f"POST /v1/models/{DEV}/predictions HTTP/1.1".encode())
    assert sleeps == []


def test_a_hook_survives_being_used_from_two_event_loops(local_api_thread: str) -> None:
    """``asyncio.run`` twice with one hook (and no aclose in between) must not hit the dead loop's client."""
    hook = FluxKontextHook()
    assert asyncio.run(hook.aget_account()).username == "alice"
    assert asyncio.run(hook.aget_account()).username == "alice"

    async def close() -> None:
        await hook.aclose()

    asyncio.run(close())


@pytest.fixture
def local_api_thread(set_conn: Callable[..., None]) -> Any:
    """The account endpoint on 127.0.0.1, served from its own loop in a thread (for sync tests)."""
    loop = asyncio.new_event_loop()

    async def account(request: web.Request) -> web.Response:
        return web.json_response(ACCOUNT_JSON)

    app = web.Application()
    app.router.add_get("/v1/account", account)
    server = TestServer(app, host="127.0.0.1")
    loop.run_until_complete(server.start_server())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    set_conn(host=f"http://127.0.0.1:{server.port}", password=TOKEN)
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


async def test_real_server_error_is_retried(local_api: dict[str, Any], sleeps: list[float]) -> None:
    async with FluxKontextHook(max_retries=2) as hook:
        prediction = await hook.aget_prediction("flaky")
    assert prediction.id == "flaky"
    assert len(sleeps) == 1
    assert [r.path for r in local_api["seen"]].count("/replicate/v1/predictions/flaky") == 2
    first = local_api["seen"][0]
    assert first.headers["Authorization"] == f"Bearer {TOKEN}"
    assert first.headers["User-Agent"] == "airflow-provider-kontext"


async def test_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    for name in ("HTTP_PROXY", "http_proxy", "https_proxy", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    client = AiohttpClient()
    try:
        assert client._proxy("https://api.replicate.com/v1/account") == "http://proxy.corp:3128"
        assert client._proxy("https://internal.example/v1/account") is None
        assert client._proxy("http://api.replicate.com/v1/account") is None  # no HTTP_PROXY
    finally:
        await client.aclose()


async def test_unreadable_answer_to_a_create_is_an_uncertain_create_async(
    hook: FluxKontextHook, api: FakeApi
) -> None:
    api.on("POST", CREATE_URL, {"status_code": 201, "text": '{"id": "p1", "status": "queued"}'})
    with pytest.raises(FluxKontextPredictionMayExistError, match="named prediction 'p1'"):
        await hook.acreate_prediction(DEV, INPUT)
    assert len(api.requests) == 1


# --- a poll's budget: the one retry layer of a wait ------------------------------------------------------


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
