"""The emulator's state, one store per resource, independent of the web framework that serves it.

:class:`EmulatorService` holds the stores and what spans them: :attr:`~EmulatorService.predictions`
(``predictions.py``), :attr:`~EmulatorService.files` (``files.py``), :attr:`~EmulatorService.models`
(``model_catalog.py``), :attr:`~EmulatorService.webhooks` (``webhooks.py``), the account's rate
limiter (``ratelimit.py``), the armed faults (``faults.py``), the token check, the request log and
the counts of ``GET /_emulator/state``. ``app.py`` maps HTTP onto the stores' methods, which
return JSON-ready data or raise :class:`~airflow_provider_kontext.testing.problems.ProblemError`.
They run on the server's event loop; every store guards its state with a lock, so tests can
inspect and reset it from their own thread.
"""

from __future__ import annotations

import secrets
import threading
from collections import Counter
from typing import Any, NamedTuple

from airflow_provider_kontext.testing.config import EmulatorConfig
from airflow_provider_kontext.testing.faults import Faults
from airflow_provider_kontext.testing.files import FileStore
from airflow_provider_kontext.testing.lifecycle import Clock
from airflow_provider_kontext.testing.model_catalog import ModelCatalog
from airflow_provider_kontext.testing.predictions import PredictionStore
from airflow_provider_kontext.testing.problems import ProblemError
from airflow_provider_kontext.testing.ratelimit import RateLimiter
from airflow_provider_kontext.testing.webhooks import WebhookSender, new_secret

#: ``GET /v1/account`` (``github_url`` and ``avatar_url`` left out: not nullable in the description).
ACCOUNT = {"type": "user", "username": "emulator", "name": "Kontext Emulator"}
_RECENT_REQUESTS = 50

__all__ = ["ACCOUNT", "EmulatorConfig", "EmulatorService", "RequestRecord"]


class RequestRecord(NamedTuple):
    """One request the emulator saw, as logged.

    ``path`` is below the base URL; ``status`` is ``None`` when the connection was dropped without
    a response.
    """

    method: str
    path: str
    status: int | None


class EmulatorService:
    """The emulator's state: its per-resource stores, request log, rate limiter and token check.

    :param config: the emulator's options.
    :param faults: the armed faults.
    :param clock: the emulator's clock; a fresh one by default.
    """

    def __init__(self, config: EmulatorConfig, faults: Faults, clock: Clock | None = None) -> None:
        self.config = config
        self.faults = faults
        self.clock = clock or Clock()
        self._lock = threading.Lock()
        self._requests: list[RequestRecord] = []
        #: The account's rate limiter, ``None`` when unlimited.
        self.limiter = RateLimiter(config.rate_limit, self.clock.monotonic) if config.rate_limit else None
        #: Sends and records webhooks.
        self.webhooks = WebhookSender(config.webhook_secret or new_secret(), self.clock.wall)
        #: Uploaded files.
        self.files = FileStore(self.clock, config.upload_ttl_seconds, ACCOUNT["username"])
        #: Predictions, their output files and web pages.
        self.predictions = PredictionStore(config, faults, self.clock, self.files, self.webhooks)
        #: The models and versions served.
        self.models = ModelCatalog(lambda: self.predictions.created_count)

    @property
    def port(self) -> int | None:
        """Return the port the server listens on, ``None`` when not started."""
        return self.predictions.port

    @port.setter
    def port(self, value: int | None) -> None:
        self.predictions.port = value

    @property
    def closing(self) -> bool:
        """Return whether the server is stopping (waits and streams then end at once)."""
        return self.predictions.closing

    @closing.setter
    def closing(self, value: bool) -> None:
        self.predictions.closing = value

    # --- request log ------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Return every logged request, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def log_request(self, method: str, path: str, status: int | None) -> None:
        """Log a request's answer (``status`` ``None``: the connection was dropped)."""
        with self._lock:
            self._requests.append(RequestRecord(method, path, status))

    # --- control ----------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget predictions, uploads, webhooks and the request log, and disarm every fault."""
        self.predictions.clear()
        self.files.clear()
        with self._lock:
            self._requests.clear()
            if self.config.rate_limit is not None:
                self.limiter = RateLimiter(self.config.rate_limit, self.clock.monotonic)
        self.webhooks.clear()
        self.faults.clear()

    def state(self) -> dict[str, Any]:
        """Return the counts of ``GET /_emulator/state``."""
        now = self.clock.monotonic()
        records = list(self.predictions.snapshot().values())
        created = self.predictions.created_count
        uploads = len(self.files)
        requests = self.requests
        statuses = Counter(record.snapshot(record.elapsed(now)).status.value for record in records)
        responses = Counter("dropped" if r.status is None else str(r.status) for r in requests)
        timing = self.config.timing
        return {
            "created_count": created,
            "prediction_count": len(records),
            "statuses": dict(statuses),
            "upload_count": uploads,
            "request_count": len(requests),
            "responses": dict(responses),
            "recent_requests": [list(r) for r in requests[-_RECENT_REQUESTS:]],
            "faults": self.faults.describe(),
            "config": {
                "auth": self.config.token is not None,
                "path_prefix": self.config.path_prefix,
                "start_seconds": timing.start_seconds,
                "prediction_seconds": timing.prediction_seconds,
                "retention_seconds": timing.retention_seconds,
                "spread": timing.spread,
                "output_scale": self.config.output_scale,
                "rate_limit": self.config.rate_limit.name if self.config.rate_limit else None,
            },
            "webhook_deliveries": len(self.webhooks.deliveries),
        }

    # --- auth -------------------------------------------------------------------------------

    def check_auth(self, authorization: str | None) -> None:
        """Check the ``Authorization`` header against the configured token (any passes without one).

        :raises ProblemError: 401 when a token is configured and the header does not carry it.
        """
        token = self.config.token
        if token is None:
            return
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() in ("bearer", "token") and secrets.compare_digest(given.strip(), token):
            return
        raise ProblemError(
            401,
            "Unauthenticated",
            "You did not pass a valid authentication token",
            headers={"WWW-Authenticate": "Bearer"},
        )
