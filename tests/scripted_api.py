"""A scripted Replicate API on 127.0.0.1 for the hook tests: answers and failures per request.

:class:`FakeApi` is an aiohttp handler that answers each (method, URL) with scripted answers; the
tests' URLs (``API``, ``PROXY`` of ``hook_api``) are mapped to the local server. It runs in the
test's event loop (the async hook tests) or in a thread of its own (:func:`serve_in_thread`, for the
transport contract suite, where the sync hook blocks the test's thread). Failures a server cannot
script (a refused connection, a connect timeout) are raised where each client connects
(:func:`patch_connects`).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hook_api import API, PROXY
from multidict import CIMultiDict, CIMultiDictProxy
from urllib3.connection import HTTPConnection
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError


@dataclass
class Seen:
    """Record a request as it reached the server (or, for a connect failure, as it was about to)."""

    method: str
    url: str  # in the tests' terms (API / PROXY), not the local server's
    headers: CIMultiDictProxy[str]
    content: bytes


@dataclass(frozen=True)
class Fail:
    """Answer with a failure instead of a response.

    Server side: ``drop`` (close the connection unanswered), ``reset`` (abort it), ``hang`` (never
    answer), ``garbled`` (a broken HTTP answer, ``detail`` in a header), ``bad-status`` (a status line
    no client can read, ``detail`` in it). Client side, raised where
    the client connects (:func:`patch_connects`): ``refuse``, ``connect-timeout``.
    """

    kind: str
    detail: str = ""


CONNECTOR_FAILURES = ("refuse", "connect-timeout")


class FakeApi:
    """Answer with scripted answers per (method, URL), in order; the last one repeats.

    Unknown calls fail the test.

    An answer is a dict of ``status_code``, ``json``, ``text``, ``content``, ``headers``, or a
    :class:`Fail`.
    """

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[Any]] = {}
        self.requests: list[Seen] = []
        self.timeouts: list[aiohttp.ClientTimeout] = []
        self.base = ""
        self.release = threading.Event()  # set at teardown: every hanging answer returns

    def on(self, method: str, url: str, *answers: Any) -> None:
        self.routes[(method, url)] = list(answers)

    def local(self, url: str) -> str:
        """Return the local server's URL for one of the tests' URLs."""
        if url.startswith(PROXY):
            return self.base + "/replicate" + url[len(PROXY) :]
        if url.startswith(API):
            return self.base + url[len(API) :]
        return url

    def logical(self, path_qs: str) -> str:
        if path_qs.startswith("/replicate/"):
            return PROXY + path_qs[len("/replicate") :]
        return API + path_qs

    def next_answer(self, method: str, url: str) -> Any:
        answers = self.routes.get((method, url))
        if not answers:
            raise AssertionError(f"unexpected request {method} {url}")
        return answers.pop(0) if len(answers) > 1 else answers[0]

    def peek(self, method: str, url: str) -> Any:
        answers = self.routes.get((method, url))
        return answers[0] if answers else None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        url = self.logical(request.path_qs)
        self.requests.append(Seen(request.method, url, request.headers, await request.read()))
        answer = self.next_answer(request.method, url)
        if isinstance(answer, Fail):
            return await self._fail(request, answer)
        kwargs = dict(answer)
        headers = dict(kwargs.pop("headers", {}))
        status = kwargs.pop("status_code", 200)
        if "json" in kwargs:
            body = json.dumps(kwargs["json"]).encode()
            headers.setdefault("Content-Type", "application/json")
        elif "text" in kwargs:
            body = kwargs["text"].encode()
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        else:
            body = kwargs.get("content", b"")
        return web.Response(status=status, body=body, headers=headers)

    async def _fail(self, request: web.Request, failure: Fail) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        if failure.kind == "hang":
            await asyncio.to_thread(self.release.wait)
        elif failure.kind == "drop":
            transport.close()
        elif failure.kind == "reset":
            transport.abort()
        elif failure.kind == "bad-status":
            transport.write(f"HTTP/1.1 2xx {failure.detail}\r\n\r\n".encode())
            transport.close()
        elif failure.kind == "garbled":
            transport.write(f"HTTP/1.1 200 OK\r\nContent-Length: x {failure.detail}\r\n\r\n".encode())
            transport.close()
        else:
            raise AssertionError(f"not a server-side failure: {failure}")
        return web.Response()

    def connector_failure(self, method: str, url: str, key: Any) -> BaseException | None:
        """Return the connect failure scripted for this request, if that is its next answer."""
        logical = self.logical(url[len(self.base) :])
        answer = self.peek(method, logical)
        if not isinstance(answer, Fail) or answer.kind not in CONNECTOR_FAILURES:
            return None
        self.next_answer(method, logical)
        self.requests.append(Seen(method, logical, CIMultiDictProxy(CIMultiDict()), b""))
        if answer.kind == "refuse":
            return aiohttp.ClientConnectorError(
                key, ConnectionRefusedError(111, answer.detail or "Connection refused")
            )
        return aiohttp.ConnectionTimeoutError(f"Connection timeout to host {url}")

    @property
    def last(self) -> Seen:
        return self.requests[-1]


def app_for(fake: FakeApi) -> web.Application:
    """Return an aiohttp application that sends every request to ``fake``."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    return app


@contextmanager
def serve_in_thread(fake: FakeApi) -> Iterator[str]:
    """Serve ``fake`` on 127.0.0.1 from an event loop in a thread; yield its base URL.

    On exit, hanging answers are released and the server closed.
    """
    loop = asyncio.new_event_loop()
    server = TestServer(app_for(fake), host="127.0.0.1")
    loop.run_until_complete(server.start_server())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fake.base = f"http://127.0.0.1:{server.port}"
    try:
        yield fake.base
    finally:
        fake.release.set()
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def patch_connects(monkeypatch: pytest.MonkeyPatch, fake: FakeApi) -> None:
    """Raise the scripted connect failures where aiohttp and urllib3 (requests) connect.

    aiohttp: in its connector, as for a real refused or timed-out connect. urllib3: as its
    connection raises them on the first write of a request to a socket that never connected.
    """
    create_connection = aiohttp.TCPConnector._create_connection

    async def connect(self: aiohttp.TCPConnector, req: Any, traces: Any, timeout: Any) -> Any:
        failure = fake.connector_failure(req.method, str(req.url), req.connection_key)
        if failure is not None:
            raise failure
        return await create_connection(self, req, traces, timeout)

    monkeypatch.setattr(aiohttp.TCPConnector, "_create_connection", connect)
    request = HTTPConnection.request

    def send(self: HTTPConnection, method: str, url: str, *args: Any, **kwargs: Any) -> None:
        failure = fake.connector_failure(method, fake.base + url, None)
        if isinstance(failure, aiohttp.ClientConnectorError):
            raise NewConnectionError(self, f"Failed to establish a new connection: {failure.os_error}")
        if failure is not None:
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out.")
        request(self, method, url, *args, **kwargs)

    monkeypatch.setattr(HTTPConnection, "request", send)
