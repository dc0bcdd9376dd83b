"""Webhooks as Replicate sends them: the requested events of a prediction, POSTed and signed.

Replicate signs every webhook the Standard Webhooks way (svix style): headers ``webhook-id``,
``webhook-timestamp`` (unix seconds) and ``webhook-signature`` = ``v1,<base64 HMAC-SHA256>`` of
``"{id}.{timestamp}.{body}"``, keyed with the base64-decoded part of the account's secret
``whsec_<base64>`` (``GET /v1/webhooks/default/secret``). The body is the prediction as
``GET /v1/predictions/{id}`` returns it.

The emulator is offline: it delivers only to loopback addresses (127.0.0.1, ::1, localhost) and
records every other target as not delivered. A delivery that fails (no connection, a 5xx) is
retried a few times, as Replicate does; the receiver must accept the same message twice.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

#: The events a webhook can ask for (``webhook_events_filter``).
WEBHOOK_EVENTS = ("start", "output", "logs", "completed")
#: The events sent when a create names a webhook without a filter: "whenever there are new outputs
#: or the prediction has finished" (Replicate's OpenAPI description).
DEFAULT_WEBHOOK_EVENTS = frozenset({"output", "completed"})
#: Hosts the emulator delivers to.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
#: Replicate sends ``logs`` and ``output`` webhooks at most this often (seconds) per prediction.
THROTTLE_SECONDS = 0.5
_ATTEMPTS = 3
_RETRY_SECONDS = 0.2
_TIMEOUT_SECONDS = 10.0


def new_secret() -> str:
    """Return a new signing secret in Replicate's format, ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """Return the ``webhook-signature`` header value for one message (``v1,<base64>``)."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def is_loopback(url: str) -> bool:
    """Return whether the emulator may deliver to ``url`` (http or https on a loopback host)."""
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and (parts.hostname or "") in LOOPBACK_HOSTS


@dataclass(frozen=True)
class Delivery:
    """One webhook message, as sent (or not) to its target.

    ``status`` is the receiver's HTTP status of the last attempt, ``None`` when no attempt got an
    answer; ``delivered`` is false for targets the emulator does not reach.
    """

    prediction_id: str
    event: str
    url: str
    message_id: str
    timestamp: int
    body: dict[str, Any]
    attempts: int
    status: int | None
    delivered: bool


class WebhookSender:
    """The sender of the webhooks of every prediction that asked for one, on the server's loop.

    :param secret: the ``whsec_...`` key messages are signed with.
    :param wall: the wall clock (Unix seconds) that dates the messages.
    """

    def __init__(self, secret: str, wall: Callable[[], float]) -> None:
        self.secret = secret
        self._wall = wall
        self._lock = threading.Lock()
        self._deliveries: list[Delivery] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def deliveries(self) -> list[Delivery]:
        """Every message sent (or not sent), in order (a copy)."""
        with self._lock:
            return list(self._deliveries)

    def clear(self) -> None:
        """Forget the sent messages."""
        with self._lock:
            self._deliveries.clear()

    def follow(
        self,
        prediction_id: str,
        url: str,
        events: frozenset[str],
        current: Callable[[], Awaitable[dict[str, Any]]],
        *,
        closing: Callable[[], bool],
        step: float = 0.02,
    ) -> None:
        """Watch one prediction and send the events in ``events`` until it ends.

        ``current`` returns its JSON now. ``start`` goes at once, ``logs`` when its logs grow,
        ``output`` when its output changes, ``completed`` when it ends: one message per change, at
        most one every :data:`THROTTLE_SECONDS` for logs and output. ``closing`` stops the watch.
        """
        task = asyncio.ensure_future(self._follow(prediction_id, url, events, current, closing, step))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(
        self,
        prediction_id: str,
        url: str,
        events: frozenset[str],
        current: Callable[[], Awaitable[dict[str, Any]]],
        closing: Callable[[], bool],
        step: float,
    ) -> None:
        body = await current()
        if "start" in events:
            await self._send(prediction_id, "start", url, body)
        logs, output = body.get("logs"), body.get("output")
        last_update = float("-inf")
        loop = asyncio.get_running_loop()
        while not closing():
            body = await current()
            if body["status"] in ("succeeded", "failed", "canceled", "aborted"):
                if "completed" in events:
                    await self._send(prediction_id, "completed", url, body)
                elif "output" in events and body.get("output") != output:
                    await self._send(prediction_id, "output", url, body)
                return
            due = loop.time() - last_update >= THROTTLE_SECONDS
            if due and "output" in events and body.get("output") != output:
                output, last_update = body.get("output"), loop.time()
                await self._send(prediction_id, "output", url, body)
            elif due and "logs" in events and body.get("logs") != logs:
                logs, last_update = body.get("logs"), loop.time()
                await self._send(prediction_id, "logs", url, body)
            await asyncio.sleep(step)

    async def _send(self, prediction_id: str, event: str, url: str, body: dict[str, Any]) -> None:
        message_id = "msg_" + secrets.token_hex(12)
        timestamp = int(self._wall())
        if not is_loopback(url):
            self._record(Delivery(prediction_id, event, url, message_id, timestamp, body, 0, None, False))
            return
        import httpx

        payload = json.dumps(body).encode()
        headers = {
            "content-type": "application/json",
            "user-agent": "kontext-emulator-webhooks",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.secret, message_id, timestamp, payload),
        }
        status: int | None = None
        attempts = 0
        async with httpx.AsyncClient(
            trust_env=False, follow_redirects=False, timeout=_TIMEOUT_SECONDS
        ) as client:
            for attempts in range(1, _ATTEMPTS + 1):
                try:
                    response = await client.post(url, content=payload, headers=headers)
                    status = response.status_code
                    if status < 500:
                        break
                except httpx.HTTPError:
                    status = None
                await asyncio.sleep(_RETRY_SECONDS * attempts)
        delivered = status is not None and 200 <= status < 300
        self._record(
            Delivery(prediction_id, event, url, message_id, timestamp, body, attempts, status, delivered)
        )

    def _record(self, delivery: Delivery) -> None:
        with self._lock:
            self._deliveries.append(delivery)


__all__ = [
    "DEFAULT_WEBHOOK_EVENTS",
    "WEBHOOK_EVENTS",
    "Delivery",
    "WebhookSender",
    "is_loopback",
    "new_secret",
    "sign",
]
