"""Provide the async hook tests' fixtures: a scripted API on 127.0.0.1 in the test's loop.

:class:`~scripted_api.FakeApi` scripts the answers of an aiohttp server in the test's loop; the
tests' URLs (``API``, ``PROXY``) are mapped to it, and so is the connection's host. Failures a server
cannot script (a refused connection, a connect timeout) are raised where aiohttp raises them, in its
connector. ``_asleep`` is replaced by a recorder, so retries do not wait and their waits can be
asserted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hook_api import API, TOKEN
from scripted_api import FakeApi, app_for, patch_connects

from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.hooks.transports import AiohttpClient

from .helpers import ACCOUNT_JSON


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


@pytest.fixture
def local_api_thread(set_conn: Callable[..., None]) -> Any:
    """Serve the account endpoint on 127.0.0.1 from its own loop in a thread (for sync tests)."""
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
