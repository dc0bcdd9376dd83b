"""Test ``FluxKontextHook``'s async path (its production aiohttp client): settings and methods.

Every server is on 127.0.0.1, started by the tests. The retry behaviour both transports share is
in ``../test_transport_contract.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
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
    PROXY,
    TOKEN,
    prediction_json,
)
from scripted_api import FakeApi

from airflow_provider_kontext.exceptions import FluxKontextAuthError
from airflow_provider_kontext.hooks import connection as connection_module
from airflow_provider_kontext.hooks.connection import ClientSettings
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.models import PredictionStatus

from .helpers import ACCOUNT_JSON, FILE_JSON, VERSION, araised, assert_no_secret, read_timeout

# --- settings -------------------------------------------------------------------------------------


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
    """Return the connection ids the hooks look up (the real lookup still runs)."""
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


# --- methods --------------------------------------------------------------------------------------


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
