"""The outermost ASGI app: the path prefix, injected faults, the token, rate limits, the request log.

Every request except the control endpoints (``/_emulator/...``) passes :class:`Gateway` before the
routes of ``app.py``: a path outside the prefix answers 404; an armed fault (``faults.py``) may
delay the request, answer it with a status, or drop the connection before or after processing;
``/v1/`` calls need the token; the rate limiter (``ratelimit.py``) may answer 429. Each answer is
logged as ``(method, path, status)`` when its status goes out, ``None`` for a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import socket
import struct
from collections.abc import Callable
from http import HTTPStatus

from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from airflow_provider_kontext.testing.app import CONTROL
from airflow_provider_kontext.testing.faults import RequestFault
from airflow_provider_kontext.testing.problems import ProblemError, problem_response
from airflow_provider_kontext.testing.ratelimit import RateLimiter
from airflow_provider_kontext.testing.service import EmulatorService


class Gateway:
    """The API app wrapped in the path prefix, faults, auth, rate limits and the request log.

    :param api: the app with the routes (``app.build_api``).
    :param service: the emulator's state (config, faults, limiter, request log).
    """

    def __init__(self, api: ASGIApp, service: EmulatorService) -> None:
        self.api = api
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope."""
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        method: str = scope["method"]
        path: str = scope["path"]
        prefix = self.service.config.path_prefix
        if prefix:
            if path != prefix and not path.startswith(prefix + "/"):
                error = ProblemError(404, "Not Found", f"{path} is not below the path prefix {prefix}")
                await self._answer(scope, receive, send, problem_response(error), method, path)
                return
            scope = {**scope, "root_path": scope.get("root_path", "") + prefix}
            path = path[len(prefix) :] or "/"
        if path == CONTROL or path.startswith(CONTROL + "/"):
            await self.api(scope, receive, send)
            return
        decision = self.service.faults.decide(method, path)
        if decision.delay_before:
            await asyncio.sleep(decision.delay_before)
        if decision.respond is not None:
            await self._answer(scope, receive, send, _fault_response(decision.respond), method, path)
            return
        if decision.drop is not None and not decision.drop.after_processing:
            self.service.log_request(method, path, None)
            await _drop_connection(send)
            return
        if _needs_auth(method, path):
            headers = dict(scope["headers"])
            try:
                self.service.check_auth(headers.get(b"authorization", b"").decode("latin-1") or None)
            except ProblemError as error:
                await self._answer(scope, receive, send, problem_response(error), method, path)
                return
        limiter = self.service.limiter
        if limiter is not None and path.startswith("/v1/"):
            wait = limiter.acquire(create=_is_create(method, path))
            if wait is not None:
                throttled = JSONResponse({"detail": RateLimiter.detail(wait)}, status_code=429)
                await self._answer(scope, receive, send, throttled, method, path)
                return

        def log(status: int) -> None:
            self.service.log_request(method, path, status)

        capture = _CapturingSend(
            send, hold=decision.drop is not None or decision.delay_after > 0, on_start=log
        )
        await self.api(scope, receive, capture)
        if decision.drop is not None:
            self.service.log_request(method, path, None)
            await _drop_connection(send)
            return
        if decision.delay_after:
            await asyncio.sleep(decision.delay_after)
        await capture.flush()

    async def _answer(
        self, scope: Scope, receive: Receive, send: Send, response: Response, method: str, path: str
    ) -> None:
        """Log and send an answer the gateway gives itself."""
        self.service.log_request(method, path, response.status_code)
        await response(scope, receive, send)


def _needs_auth(method: str, path: str) -> bool:
    """Return whether a request needs the token.

    API calls do; a signed file download and output files (``/files/...``) do not.
    """
    if not path.startswith("/v1/"):
        return False
    return not (method in ("GET", "HEAD") and path.startswith("/v1/files/") and path.endswith("/download"))


def _is_create(method: str, path: str) -> bool:
    """Return whether a request creates a prediction (Replicate's separate, lower rate limit)."""
    return method == "POST" and (path == "/v1/predictions" or fnmatch.fnmatchcase(path, "/v1/*/predictions"))


class _CapturingSend:
    """An ASGI ``send`` that passes messages on, or holds them until :meth:`flush`.

    The status is reported as it goes out, before the client can see it, so the request log is
    complete when the client has its answer.

    :param send: the server's ``send``.
    :param hold: hold the messages until :meth:`flush` (for a drop or delay after processing).
    :param on_start: called with the status when the response starts.
    """

    def __init__(self, send: Send, *, hold: bool, on_start: Callable[[int], None]) -> None:
        self._send = send
        self._hold = hold
        self._on_start = on_start
        self._held: list[Message] = []

    async def __call__(self, message: Message) -> None:
        """Send or hold one message."""
        if self._hold:
            self._held.append(message)
        else:
            await self._forward(message)

    async def flush(self) -> None:
        """Send the held messages and stop holding."""
        held, self._held, self._hold = self._held, [], False
        for message in held:
            await self._forward(message)

    async def _forward(self, message: Message) -> None:
        """Send one message, reporting the status of a response start."""
        if message["type"] == "http.response.start":
            self._on_start(int(message["status"]))
        await self._send(message)


def _fault_response(fault: RequestFault) -> Response:
    """Return the answer of a status fault: Replicate's 429 body, or a 5xx problem or HTML page."""
    headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
    status = fault.status or 500
    if status == 429:
        return JSONResponse(
            {"detail": fault.detail or fault.throttle_detail()}, status_code=429, headers=headers
        )
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Server Error"
    if fault.html:
        page = (
            f"<html><head><title>{status} {phrase}</title></head><body><center><h1>{status} {phrase}"
            "</h1></center><hr><center>nginx</center></body></html>"
        )
        return HTMLResponse(page, status_code=status, headers=headers)
    detail = fault.detail or f"{phrase} (injected by the Kontext emulator)"
    return problem_response(ProblemError(status, phrase, detail, headers=headers))


async def _drop_connection(send: Send) -> None:
    """Reset the client's connection without a response (an RST, so the client sees a reset).

    uvicorn's ``send`` is a method of its request cycle, which holds the connection's transport.

    :raises RuntimeError: when the app is not served by uvicorn.
    """
    transport: asyncio.BaseTransport | None = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise RuntimeError("the emulator can only drop connections when served by uvicorn")
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if isinstance(transport, asyncio.WriteTransport):
        transport.abort()
    else:
        transport.close()
    for _ in range(2):  # let connection_lost run so uvicorn does not try to answer
        await asyncio.sleep(0)
