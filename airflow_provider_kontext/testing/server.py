"""Serve the emulator over real HTTP: :class:`FluxKontextEmulator` runs it on 127.0.0.1 in a thread.

The emulator is a FastAPI app (routes in ``app.py``) behind a gateway (``gateway.py``), served by
uvicorn in a background thread with its own event loop. :meth:`FluxKontextEmulator.start` returns once
the port accepts connections and raises if the server could not start; :meth:`~FluxKontextEmulator.stop`
ends waits and streams at once and gives in-flight requests a second. The properties and methods
below ``introspection`` read the state from the test's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from airflow_provider_kontext.models import Prediction
from airflow_provider_kontext.testing.app import build_api
from airflow_provider_kontext.testing.config import EmulatorConfig
from airflow_provider_kontext.testing.faults import Faults
from airflow_provider_kontext.testing.gateway import Gateway
from airflow_provider_kontext.testing.imaging import warm_up
from airflow_provider_kontext.testing.lifecycle import Clock, PredictionRecord, Timing
from airflow_provider_kontext.testing.problems import ProblemError
from airflow_provider_kontext.testing.ratelimit import RateLimit
from airflow_provider_kontext.testing.service import EmulatorService, RequestRecord
from airflow_provider_kontext.testing.webhooks import Delivery

_START_TIMEOUT = 15.0


class _Server(uvicorn.Server):
    """uvicorn's server, stopped at once.

    A stop request wakes the main loop (instead of its 0.1 s tick) and shutdown closes idle
    connections without uvicorn's fixed grace sleep, so a test's teardown costs milliseconds.
    In-flight requests get up to a second to finish.
    """

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


class FluxKontextEmulator:
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
        self.app: ASGIApp = Gateway(build_api(self._service), self._service)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._port: int | None = None
        self._error: BaseException | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> FluxKontextEmulator:
        """Start serving in a background thread; return once the port accepts connections.

        :raises RuntimeError: when it is already running or the server did not start.
        :raises OSError: when the address cannot be bound (the port is taken).
        """
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

    def __enter__(self) -> FluxKontextEmulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def port(self) -> int:
        """The port it listens on.

        :raises RuntimeError: when the emulator has not been started.
        """
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
        return self._service.predictions.snapshot()

    @property
    def created_count(self) -> int:
        """How many predictions were really created (not counting rejected or faulted creates)."""
        return self._service.predictions.created_count

    @property
    def requests(self) -> list[RequestRecord]:
        """``(method, path, status)`` of every request, oldest first.

        The path is below the base URL; the status is ``None`` for a dropped connection. Control
        endpoints are not logged.
        """
        return self._service.requests

    def prediction(self, prediction_id: str) -> Prediction:
        """Return the prediction as ``GET /v1/predictions/{id}`` would return it now.

        :raises KeyError: for an unknown prediction.
        """
        loop = self._loop
        try:
            if loop is not None and loop.is_running():
                future = asyncio.run_coroutine_threadsafe(
                    self._service.predictions.current(prediction_id), loop
                )
                return future.result(timeout=60)
            record = self._service.predictions.snapshot()[prediction_id]
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
        """Return a signed URL that serves an uploaded file's bytes without a token for an hour."""
        return self._service.files.download_url(self.base_url, file_id)

    def state(self) -> dict[str, Any]:
        """Return what ``GET {base}/_emulator/state`` returns."""
        return self._service.state()

    def reset(self) -> None:
        """Forget predictions, uploads and the request log; disarm every fault."""
        self._service.reset()


#: The name of releases before 0.2 (one class prefix since).
KontextEmulator = FluxKontextEmulator
