"""Test the real shared aiohttp client: one per event loop, released by the last hook, real I/O."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hook_api import CREATE_URL, DEV, INPUT, TOKEN, prediction_json
from scripted_api import FakeApi

from airflow_provider_kontext.exceptions import FluxKontextPredictionMayExistError, FluxKontextTransportError
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.hooks.transports import AiohttpClient, SharedAsyncClient

from .helpers import ACCOUNT_JSON, FILE_JSON, araised, assert_no_secret

# --- the real shared client -----------------------------------------------------------------------


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
    """Serve a tiny API on 127.0.0.1 (aiohttp, the test's loop); point the default connection at it."""
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
