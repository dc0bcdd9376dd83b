"""An offline emulator of Replicate's predictions API for FLUX.1 Kontext, served over real HTTP.

:class:`KontextEmulator` runs a FastAPI app under uvicorn in a background thread on 127.0.0.1::

    with KontextEmulator(prediction_seconds=0.2, output_scale=0.1) as emu:
        requests.post(f"{emu.base_url}/v1/models/black-forest-labs/flux-kontext-dev/predictions", ...)
        emu.faults.throttle(2, method="POST", path=faults.CREATE)

Or in the foreground, to drive it from another process::

    python -m airflow_provider_kontext.testing.emulator --port 8765 --token T --path-prefix /replicate

The endpoints are Replicate's, shaped as its OpenAPI description says (create by model or by
version, get, list, cancel, stream, models and versions, files, the webhook secret, account), plus
``{base}/_emulator/faults``, ``/_emulator/state`` and ``/_emulator/reset`` to control it over HTTP.
Every request except those passes a gateway that applies the armed faults, checks the token,
applies the rate limits when asked (``rate_limit=``) and logs ``(method, path, status)``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from types import FrameType, TracebackType
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from airflow_provider_kontext.models import Prediction
from airflow_provider_kontext.testing.faults import Faults, RequestFault
from airflow_provider_kontext.testing.imaging import warm_up
from airflow_provider_kontext.testing.lifecycle import REALISTIC_TIMING, Clock, PredictionRecord, Timing
from airflow_provider_kontext.testing.ratelimit import RateLimit, RateLimiter
from airflow_provider_kontext.testing.service import (
    ACCOUNT,
    EmulatorConfig,
    EmulatorService,
    ProblemError,
    RequestRecord,
)
from airflow_provider_kontext.testing.webhooks import Delivery

PROBLEM_JSON = "application/problem+json"
_CONTROL = "/_emulator"
_START_TIMEOUT = 15.0


def problem_response(error: ProblemError) -> JSONResponse:
    """An RFC 7807 response for ``error``."""
    return JSONResponse(
        error.body(), status_code=error.status, headers=error.headers, media_type=PROBLEM_JSON
    )


def _base_url(request: Request) -> str:
    """The base URL the client used, path prefix included, without a trailing slash."""
    return str(request.base_url).rstrip("/")


def build_api(service: EmulatorService) -> FastAPI:
    """The FastAPI app with Replicate's endpoints and the control endpoints (paths below the prefix)."""
    api = FastAPI(title="Kontext emulator", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> Response:
        return problem_response(exc)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        title = HTTPStatus(exc.status_code).phrase
        return problem_response(ProblemError(exc.status_code, title, str(exc.detail)))

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        fields = [".".join(str(p) for p in error["loc"] if p != "body") for error in exc.errors()]
        detail = "; ".join(f"{f}: {e['msg']}" for f, e in zip(fields, exc.errors(), strict=True))
        return problem_response(ProblemError(422, "Unprocessable Entity", detail))

    async def create(request: Request, model: str | None) -> Response:
        status, body = await service.create(
            base_url=_base_url(request),
            model=model,
            body=await request.body(),
            prefer=request.headers.get("prefer"),
            cancel_after=request.headers.get("cancel-after"),
        )
        return JSONResponse(body, status_code=status)

    @api.post("/v1/models/{owner}/{name}/predictions")
    async def create_for_model(owner: str, name: str, request: Request) -> Response:
        return await create(request, f"{owner}/{name}")

    @api.post("/v1/predictions")
    async def create_for_version(request: Request) -> Response:
        return await create(request, None)

    @api.get("/v1/predictions")
    async def list_predictions(
        request: Request,
        cursor: str | None = None,
        created_after: str | None = None,
        created_before: str | None = None,
    ) -> dict[str, Any]:
        return await service.list_predictions(
            _base_url(request), cursor=cursor, created_after=created_after, created_before=created_before
        )

    @api.get("/v1/predictions/{prediction_id}")
    async def get_prediction(prediction_id: str) -> dict[str, Any]:
        return await service.get(prediction_id)

    @api.get("/v1/predictions/{prediction_id}/stream")
    async def stream_prediction(prediction_id: str) -> Response:
        events = service.stream(prediction_id)
        first = await anext(events, None)  # an unknown id answers 404 before the stream starts

        async def body() -> Any:
            if first is not None:
                yield first
            async for event in events:
                yield event

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    @api.get("/v1/models/{owner}/{name}")
    async def get_model(owner: str, name: str, request: Request) -> dict[str, Any]:
        return service.model(_base_url(request), owner, name)

    @api.get("/v1/models/{owner}/{name}/versions")
    async def list_versions(owner: str, name: str) -> dict[str, Any]:
        return service.model_versions(owner, name)

    @api.get("/v1/models/{owner}/{name}/versions/{version_id}")
    async def get_version(owner: str, name: str, version_id: str) -> dict[str, Any]:
        return service.model_version(owner, name, version_id)

    @api.get("/v1/webhooks/default/secret")
    async def webhook_secret() -> dict[str, Any]:
        return service.webhook_secret()

    @api.post("/v1/predictions/{prediction_id}/cancel")
    async def cancel_prediction(prediction_id: str) -> dict[str, Any]:
        return await service.cancel(prediction_id)

    @api.get("/v1/account")
    async def account() -> dict[str, Any]:
        return dict(ACCOUNT)

    @api.post("/v1/files", status_code=201)
    async def upload(
        request: Request,
        content: Annotated[UploadFile, File()],
        filename: Annotated[str | None, Form()] = None,
        content_type: Annotated[str | None, Form(alias="type")] = None,
        metadata: Annotated[str | None, Form()] = None,
    ) -> dict[str, Any]:
        return service.upload(
            base_url=_base_url(request),
            data=await content.read(),
            filename=filename or content.filename,
            content_type=content_type or content.content_type,
            metadata=metadata,
        )

    @api.get("/v1/files")
    async def list_files(request: Request) -> dict[str, Any]:
        return service.list_files(_base_url(request))

    @api.get("/v1/files/{file_id}")
    async def uploaded_file(file_id: str, request: Request) -> dict[str, Any]:
        return service.uploaded_file(file_id).to_json(_base_url(request))

    @api.delete("/v1/files/{file_id}", status_code=204)
    async def delete_file(file_id: str) -> Response:
        service.delete_file(file_id)
        return Response(status_code=204)

    @api.get("/v1/files/{file_id}/download")
    async def download_file(file_id: str, owner: str = "", expiry: str = "", signature: str = "") -> Response:
        stored = service.download(file_id, owner, expiry, signature)
        return Response(stored.data, media_type=stored.content_type)

    @api.get("/files/{prediction_id}/{filename}")
    async def output_file(prediction_id: str, filename: str) -> Response:
        data, content_type = service.output_file(prediction_id, filename)
        return Response(data, media_type=content_type)

    @api.get("/p/{prediction_id}", response_class=HTMLResponse)
    async def web_page(prediction_id: str) -> str:
        return service.web_page(prediction_id)

    @api.get(f"{_CONTROL}/state")
    async def state() -> dict[str, Any]:
        return service.state()

    @api.post(f"{_CONTROL}/faults")
    async def arm_faults(request: Request) -> dict[str, Any]:
        try:
            specs = await request.json()
        except ValueError as exc:
            raise ProblemError(400, "Bad Request", f"The request body is not valid JSON: {exc}") from None
        for spec in specs if isinstance(specs, list) else [specs]:
            if not isinstance(spec, dict):
                raise ProblemError(
                    400, "Bad Request", 'each fault must be an object like {"fault": "throttle"}'
                )
            try:
                service.faults.apply(spec)
            except ValueError as exc:
                raise ProblemError(400, "Bad Request", str(exc)) from None
        return service.faults.describe()

    @api.post(f"{_CONTROL}/reset")
    async def reset() -> dict[str, Any]:
        service.reset()
        return service.state()

    return api


class _Gateway:
    """The outermost ASGI app: path prefix, fault injection, auth and the request log."""

    def __init__(self, api: ASGIApp, service: EmulatorService) -> None:
        self.api = api
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
        if path == _CONTROL or path.startswith(_CONTROL + "/"):
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
        self.service.log_request(method, path, response.status_code)
        await response(scope, receive, send)


def _needs_auth(method: str, path: str) -> bool:
    """API calls need the token; a signed file download and output files (``/files/...``) do not."""
    if not path.startswith("/v1/"):
        return False
    return not (method in ("GET", "HEAD") and path.startswith("/v1/files/") and path.endswith("/download"))


def _is_create(method: str, path: str) -> bool:
    """Whether a request creates a prediction (Replicate's separate, lower rate limit)."""
    return method == "POST" and (path == "/v1/predictions" or fnmatch.fnmatchcase(path, "/v1/*/predictions"))


class _CapturingSend:
    """Passes messages on, or holds them until :meth:`flush`; reports the status as it goes out
    (before the client can see it, so the request log is complete when the client has its answer)."""

    def __init__(self, send: Send, *, hold: bool, on_start: Callable[[int], None]) -> None:
        self._send = send
        self._hold = hold
        self._on_start = on_start
        self._held: list[Message] = []

    async def __call__(self, message: Message) -> None:
        if self._hold:
            self._held.append(message)
        else:
            await self._forward(message)

    async def flush(self) -> None:
        held, self._held, self._hold = self._held, [], False
        for message in held:
            await self._forward(message)

    async def _forward(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._on_start(int(message["status"]))
        await self._send(message)


def _fault_response(fault: RequestFault) -> Response:
    """The answer of a status fault: Replicate's 429 body, or a 5xx problem or HTML page."""
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


class _Server(uvicorn.Server):
    """uvicorn's server, stopped at once: a stop request wakes the main loop (instead of its
    0.1 s tick) and shutdown closes idle connections without uvicorn's fixed grace sleep, so a
    test's teardown costs milliseconds. In-flight requests get up to a second to finish."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def request_stop(self) -> None:
        """Ask the server to stop (from any thread)."""
        self.should_exit = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(wake.set)

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=0.1)
            counter = (counter + 1) % 864_000

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for listener in self.servers:
            listener.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        in_flight = set(self.server_state.tasks)
        if in_flight:
            await asyncio.wait(in_flight, timeout=1.0)
        for task in self.server_state.tasks:
            task.cancel()


class KontextEmulator:
    """Replicate's predictions API for FLUX.1 Kontext on 127.0.0.1, with faults on demand.

    :param token: the API token clients must send as ``Authorization: Bearer <token>``;
        ``None`` accepts any request (like a proxy without auth).
    :param path_prefix: a path the API lives under, like a proxy's ``/replicate``.
    :param prediction_seconds: how long ``processing`` lasts (the mean when ``spread`` > 0).
    :param start_seconds: how long ``starting`` lasts (the mean when ``spread`` > 0).
    :param retention_seconds: how long after a prediction ends its data stays (then the output file
        answers 404 and the prediction shows ``input: {}``, ``output: null``, ``logs: ""``,
        ``data_removed: true``).
    :param output_scale: factor on the output size (0.1 makes 1024x1024 into 102x102), for fast tests.
    :param host: the address to listen on.
    :param port: the port; 0 picks a free one.
    :param fault_seed: seed of the RNG behind ``probability`` faults.
    :param spread: each prediction's phases last ``mean * (1 ± spread)``, drawn uniformly (0: fixed).
    :param timing_seed: seed of the RNG behind ``spread`` (the same seed, the same durations in
        the order predictions are created).
    :param rate_limit: enforce an account's rate limits: ``"replicate"`` (600 creates/min, 3000/min
        for the rest, short bursts), ``"low-credit"`` (1/s, 6/min), ``"CREATES,OTHERS[,BURST_SECONDS]"``
        per minute, or a :class:`~airflow_provider_kontext.testing.ratelimit.RateLimit`; ``None``
        (the default) is unlimited.
    :param webhook_secret: the ``whsec_...`` key webhooks are signed with; a random one by default.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        path_prefix: str = "",
        prediction_seconds: float = 3.0,
        start_seconds: float = 0.3,
        retention_seconds: float = 3600.0,
        output_scale: float = 1.0,
        host: str = "127.0.0.1",
        port: int = 0,
        fault_seed: int = 0,
        spread: float = 0.0,
        timing_seed: int = 0,
        rate_limit: str | RateLimit | None = None,
        webhook_secret: str | None = None,
    ) -> None:
        for name, value in (
            ("prediction_seconds", prediction_seconds),
            ("start_seconds", start_seconds),
            ("retention_seconds", retention_seconds),
        ):
            if value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        if output_scale <= 0:
            raise ValueError(f"output_scale must be positive, got {output_scale}")
        if not 0.0 <= spread < 1.0:
            raise ValueError(f"spread must be at least 0 and below 1, got {spread}")
        if webhook_secret is not None and not webhook_secret.startswith("whsec_"):
            raise ValueError("webhook_secret must look like Replicate's: 'whsec_' + base64")
        prefix = "/" + path_prefix.strip("/") if path_prefix.strip("/") else ""
        self.config = EmulatorConfig(
            token=token,
            path_prefix=prefix,
            timing=Timing(start_seconds, prediction_seconds, retention_seconds, spread),
            output_scale=output_scale,
            rate_limit=RateLimit.parse(rate_limit) if isinstance(rate_limit, str) else rate_limit,
            timing_seed=timing_seed,
            webhook_secret=webhook_secret,
        )
        self.host = host
        self._requested_port = port
        #: The armed faults; see :class:`~airflow_provider_kontext.testing.faults.Faults`.
        self.faults = Faults(fault_seed)
        #: The emulator's clock; ``emu.clock.advance(seconds)`` moves every prediction, deadline,
        #: retention period and rate-limit window forward at once.
        self.clock = Clock()
        self._service = EmulatorService(self.config, self.faults, self.clock)
        #: The ASGI app (gateway and API), e.g. to serve it some other way.
        self.app: ASGIApp = _Gateway(build_api(self._service), self._service)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._port: int | None = None
        self._error: BaseException | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> KontextEmulator:
        """Start serving in a background thread; returns once the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the emulator is already running")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets; without it every
        # keep-alive response waits ~40 ms for a delayed ACK (Nagle).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        self._service.port = self._port
        self._service.closing = False
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            proxy_headers=False,
            server_header=False,
            backlog=2048,
        )
        server = _Server(config)
        self._server = server
        self._error = None
        self._thread = threading.Thread(
            target=self._run, args=(server, sock), name=f"kontext-emulator-{self._port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Kontext emulator did not start: {self._error!r}")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread to end (in-flight waits end at once)."""
        server, thread = self._server, self._thread
        self._service.closing = True
        if server is not None:
            server.request_stop()
        if thread is not None:
            thread.join(timeout=5)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(timeout=5)
        self._server = self._thread = self._loop = None

    def _run(self, server: _Server, sock: socket.socket) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            warming = self._loop.run_in_executor(None, warm_up)
            await server.serve(sockets=[sock])
            await warming

        try:
            asyncio.run(serve())
        except BaseException as exc:  # reported by start()
            self._error = exc
        finally:
            sock.close()

    def __enter__(self) -> KontextEmulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def port(self) -> int:
        """The port it listens on. :raises RuntimeError: not started."""
        if self._port is None:
            raise RuntimeError("the emulator has not been started")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port><path_prefix>``: what a client uses as the API base URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.config.path_prefix}"

    # --- introspection ----------------------------------------------------------------------

    @property
    def predictions(self) -> dict[str, PredictionRecord]:
        """Every prediction created since start or :meth:`reset`, by id (a snapshot of the dict)."""
        return self._service.predictions

    @property
    def created_count(self) -> int:
        """How many predictions were really created (not counting rejected or faulted creates)."""
        return self._service.created_count

    @property
    def requests(self) -> list[RequestRecord]:
        """``(method, path, status)`` of every request, path below the base URL, status ``None``
        for a dropped connection. Control endpoints are not logged."""
        return self._service.requests

    def prediction(self, prediction_id: str) -> Prediction:
        """The prediction as ``GET /v1/predictions/{id}`` would return it now.

        :raises KeyError: no such prediction.
        """
        loop = self._loop
        try:
            if loop is not None and loop.is_running():
                future = asyncio.run_coroutine_threadsafe(self._service.current(prediction_id), loop)
                return future.result(timeout=60)
            record = self._service.predictions[prediction_id]
            return record.to_prediction(record.elapsed(self.clock.monotonic()))
        except ProblemError:
            raise KeyError(prediction_id) from None

    @property
    def webhook_deliveries(self) -> list[Delivery]:
        """Every webhook message sent (or, to a target that is not loopback, not sent), in order."""
        return self._service.webhooks.deliveries

    @property
    def webhook_secret(self) -> str:
        """The ``whsec_...`` key webhooks are signed with (``GET /v1/webhooks/default/secret``)."""
        return self._service.webhooks.secret

    def file_download_url(self, file_id: str) -> str:
        """A signed URL that serves an uploaded file's bytes without a token, valid for an hour."""
        return self._service.download_url(self.base_url, file_id)

    def state(self) -> dict[str, Any]:
        """What ``GET {base}/_emulator/state`` returns."""
        return self._service.state()

    def reset(self) -> None:
        """Forget predictions, uploads and the request log; disarm every fault."""
        self._service.reset()


# --- command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_provider_kontext.testing.emulator",
        description="Serve an offline emulator of Replicate's predictions API for FLUX.1 Kontext.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    parser.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN'")
    parser.add_argument("--path-prefix", default="", help="serve the API below this path, e.g. /replicate")
    parser.add_argument(
        "--prediction-seconds", type=float, default=None, help="how long processing lasts (mean; default 3)"
    )
    parser.add_argument(
        "--start-seconds", type=float, default=None, help="how long starting lasts (mean; default 0.3)"
    )
    parser.add_argument(
        "--spread",
        type=float,
        default=None,
        help="each prediction's phases last mean*(1±SPREAD), drawn per prediction (default 0: fixed)",
    )
    parser.add_argument(
        "--realistic",
        action="store_true",
        help="flux-kontext-dev's timing on Replicate: 0.6 s starting, 4 s processing, spread 0.5 "
        "(explicit --start-seconds, --prediction-seconds, --spread win)",
    )
    parser.add_argument("--timing-seed", type=int, default=0, help="seed for the per-prediction durations")
    parser.add_argument(
        "--rate-limit",
        default=None,
        help="enforce rate limits: 'replicate' (600 creates/min, 3000/min others, short bursts), "
        "'low-credit' (1/s, 6/min) or 'CREATES,OTHERS[,BURST_SECONDS]' per minute (default: none)",
    )
    parser.add_argument("--retention-seconds", type=float, default=3600.0, help="how long outputs are kept")
    parser.add_argument("--output-scale", type=float, default=1.0, help="factor on output image sizes")
    parser.add_argument("--fault-seed", type=int, default=0, help="seed for probability faults")
    return parser


def emulator_from_args(args: argparse.Namespace) -> KontextEmulator:
    """The (not yet started) emulator the command line asks for. :raises ValueError: bad options."""
    base = REALISTIC_TIMING if args.realistic else Timing()
    return KontextEmulator(
        token=args.token,
        path_prefix=args.path_prefix,
        prediction_seconds=_given(args.prediction_seconds, base.prediction_seconds),
        start_seconds=_given(args.start_seconds, base.start_seconds),
        spread=_given(args.spread, base.spread),
        timing_seed=args.timing_seed,
        retention_seconds=args.retention_seconds,
        output_scale=args.output_scale,
        host=args.host,
        port=args.port,
        fault_seed=args.fault_seed,
        rate_limit=args.rate_limit,
    )


def _given(value: float | None, default: float) -> float:
    return default if value is None else value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator in the foreground: print its base URL, serve until SIGTERM or SIGINT."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        emulator = emulator_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            emulator.start()
        except OSError as exc:
            print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
        print(emulator.base_url, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        emulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("Kontext emulator stopped", file=sys.stderr, flush=True)
    return 0


__all__ = ["KontextEmulator", "build_api", "emulator_from_args", "main", "problem_response"]

if __name__ == "__main__":
    sys.exit(main())
