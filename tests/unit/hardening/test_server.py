"""A scripted HTTP server on 127.0.0.1 for the hardening tests, and tests that it really misbehaves.

The emulator answers like Replicate (with faults Replicate can produce); the hardening tests also need
answers no well-behaved server gives: any status line and headers, bodies cut short, endless bodies,
resets mid-body, redirects to ``file:`` URLs. :class:`ScriptedServer` answers each request with the
next scripted :data:`Answer` (the last one repeats), with ``Connection: close`` so every request opens
a connection of its own. The other hardening test modules import it from here.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import requests

#: Writes one answer on the connection's socket (after the request has been read).
Answer = Callable[[socket.socket], None]


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]


def response(
    status: int = 200,
    body: bytes | str = b"",
    content_type: str | None = "application/json",
    *,
    headers: dict[str, str] | None = None,
    length: int | None = None,
    reason: str = "Scripted",
) -> Answer:
    """Return a complete answer; ``length`` claims a ``Content-Length`` other than the body's (a cut body)."""
    data = body.encode("utf-8", errors="surrogatepass") if isinstance(body, str) else body
    lines = [f"HTTP/1.1 {status} {reason}", "Connection: close"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(data) if length is None else length}")
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def send(sock: socket.socket) -> None:
        sock.sendall(head + data)

    return send


def raw(data: bytes) -> Answer:
    """Send ``data`` as it is (a broken status line, headers, chunking...), then close."""

    def send(sock: socket.socket) -> None:
        sock.sendall(data)

    return send


def reset_connection(after: bytes = b"") -> Answer:
    """Send ``after`` (e.g. half a response), then reset the connection (RST, no FIN)."""

    def send(sock: socket.socket) -> None:
        if after:
            sock.sendall(after)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    return send


def endless(content_type: str = "image/png", chunk: bytes = b"\x89PNG\r\n\x1a\n" + bytes(65528)) -> Answer:
    """Return a 200 whose body never ends (no Content-Length, close-delimited): only a size cap stops it."""

    def send(sock: socket.socket) -> None:
        sock.sendall(f"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: {content_type}\r\n\r\n".encode())
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                sock.sendall(chunk)
        except OSError:
            return  # the client hung up: what a size cap should do

    return send


def stall(seconds: float) -> Answer:
    """Say nothing for ``seconds``, then close."""

    def send(sock: socket.socket) -> None:
        time.sleep(seconds)

    return send


class ScriptedServer:
    """Answers requests with the scripted answers in order; the last one repeats."""

    def __init__(self) -> None:
        self.answers: list[Answer] = [response(404, b'{"detail": "nothing scripted"}')]
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                server._handle(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    def script(self, *answers: Answer) -> None:
        with self._lock:
            self.answers = list(answers)
            self.seen.clear()

    def _next(self) -> Answer:
        with self._lock:
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def _handle(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        length = int(headers.get("content-length") or 0)
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        method, path, *_ = request_line.split(" ")
        with self._lock:
            self.seen.append(Seen(method, path, headers))
        try:
            self._next()(sock)
        except OSError:
            pass

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    with ScriptedServer() as server:
        yield server


# --- the server does what the other modules rely on ----------------------------------------------


def test_scripted_answers_in_order_and_the_last_repeats(scripted: ScriptedServer) -> None:
    scripted.script(response(503, "down", "text/plain"), response(200, b'{"ok": true}'))
    statuses = [requests.get(f"{scripted.base_url}/x", timeout=5).status_code for _ in range(3)]
    assert statuses == [503, 200, 200]
    assert [s.path for s in scripted.seen] == ["/x"] * 3


def test_a_cut_body_is_an_error_for_the_client(scripted: ScriptedServer) -> None:
    scripted.script(response(200, b'{"id": "abc"', length=1000))
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(scripted.base_url, timeout=5).json()


def test_a_reset_is_an_error_for_the_client(scripted: ScriptedServer) -> None:
    scripted.script(reset_connection())
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(scripted.base_url, timeout=5)


def test_an_endless_body_does_not_end(scripted: ScriptedServer) -> None:
    scripted.script(endless())
    with requests.get(scripted.base_url, stream=True, timeout=5) as r:
        size = 0
        for chunk in r.iter_content(1 << 16):
            size += len(chunk)
            if size > 4 << 20:
                break
    assert size > 4 << 20
