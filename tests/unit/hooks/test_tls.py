"""Test TLS handshakes that fail for good: tried once on both paths, never an uncertain create.

TLS handshakes that fail for good (an untrusted certificate, a server without TLS): tried once, on
the sync and the async path, never reported as a create that may have been billed, and a task's
create or upload fails without retries. Real handshakes against servers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_kontext.compat import AirflowFailException
from airflow_provider_kontext.edits.request import fail_task_on_final_answers
from airflow_provider_kontext.exceptions import (
    FluxKontextPredictionMayExistError,
    FluxKontextTLSError,
    FluxKontextTransportError,
)
from airflow_provider_kontext.hooks.api import account_request
from airflow_provider_kontext.hooks.connection import CONN_TYPE, DEFAULT_CONN_ID, ClientSettings
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.hooks.retry import Verdict, classify
from airflow_provider_kontext.hooks.transports import transport_error

TOKEN = "r8_tls_secret_token"
#: A proxy-style token in the host's query: it shows up in URLs, so error texts must hide it.
QUERY_SECRET = "qkTlsCanary9f31"
MODEL = "black-forest-labs/flux-kontext-dev"
INPUT = {"prompt": "make it blue", "input_image": "https://example.com/mug.png"}


class _Conn:
    """The fields of an Airflow connection that the settings read."""

    def __init__(self, host: str) -> None:
        self.conn_id = "c"
        self.host = host
        self.port = None
        self.password = None
        self.extra_dejson: dict[str, Any] = {}


class Server:
    """Serve on loopback, counting the connections accepted; answer anything with a plain 400.

    A loopback server that counts the connections it accepts; with ``context`` it does TLS, and
    either way it answers whatever arrives with a plain 400.
    """

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.context = context
        self.connections = 0
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._socket.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            try:
                client.settimeout(5)
                if self.context is not None:
                    client = self.context.wrap_socket(client, server_side=True)
                client.recv(4096)
                client.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except (OSError, ssl.SSLError):
                pass  # the client gave up on the handshake, as it should
            finally:
                client.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close()


def _self_signed(directory: Path) -> ssl.SSLContext:
    """Return a server context with a fresh self-signed certificate for 127.0.0.1 (trusted by nobody)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


@pytest.fixture
def untrusted(tmp_path: Path) -> Iterator[Server]:
    server = Server(_self_signed(tmp_path))
    yield server
    server.close()


@pytest.fixture
def plain_http() -> Iterator[Server]:
    server = Server()
    yield server
    server.close()


@pytest.fixture
def set_conn(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    def _set(host: str) -> None:
        value = {"conn_type": CONN_TYPE, "host": host, "password": TOKEN, "extra": {"backoff_base": 0.01}}
        monkeypatch.setenv(f"AIRFLOW_CONN_{DEFAULT_CONN_ID.upper()}", json.dumps(value))

    return _set


def _sync_account(hook: FluxKontextHook) -> Any:
    return hook.get_account()


def _async_account(hook: FluxKontextHook) -> Any:
    async def run() -> Any:
        async with hook:
            return await hook.aget_account()

    return asyncio.run(run())


def _sync_create(hook: FluxKontextHook) -> Any:
    return hook.create_prediction(MODEL, INPUT)


def _async_create(hook: FluxKontextHook) -> Any:
    async def run() -> Any:
        async with hook:
            return await hook.acreate_prediction(MODEL, INPUT)

    return asyncio.run(run())


CALLS = {"sync read": _sync_account, "async read": _async_account}
CREATES = {"sync create": _sync_create, "async create": _async_create}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_an_untrusted_certificate_is_tried_once(
    untrusted: Server, set_conn: Callable[..., None], call: Callable[[FluxKontextHook], Any]
) -> None:
    set_conn(f"https://{untrusted.address}?key={QUERY_SECRET}")
    with pytest.raises(FluxKontextTLSError) as err:
        call(FluxKontextHook(max_retries=3))
    assert untrusted.connections == 1  # a read is retried on transport errors, but not on this one
    assert "CERTIFICATE_VERIFY_FAILED" in str(err.value) or "certificate verify failed" in str(err.value)
    assert "a retry would fail the same way" in str(err.value)
    assert "trust store" in str(err.value)
    assert QUERY_SECRET not in str(err.value)


@pytest.mark.parametrize("call", CREATES.values(), ids=CREATES.keys())
def test_a_create_that_fails_the_handshake_was_not_sent(
    untrusted: Server, set_conn: Callable[..., None], call: Callable[[FluxKontextHook], Any]
) -> None:
    set_conn(f"https://{untrusted.address}")
    with pytest.raises(FluxKontextTLSError) as err:
        call(FluxKontextHook(max_retries=3))
    assert not isinstance(err.value, FluxKontextPredictionMayExistError)  # nothing can have been billed
    assert err.value.request_sent is False
    assert untrusted.connections == 1


def test_a_server_without_tls_is_tried_once_where_the_connection_never_opened(
    plain_http: Server, set_conn: Callable[..., None]
) -> None:
    """Aiohttp says the handshake failed while connecting: nothing was sent, and no retry helps."""
    set_conn(plain_http.address)  # no scheme: https is assumed
    with pytest.raises(FluxKontextTLSError) as err:
        _async_account(FluxKontextHook(max_retries=3))
    assert plain_http.connections == 1
    assert f"did you mean 'http://{plain_http.address}'?" in str(err.value)


def test_a_server_without_tls_keeps_its_retries_where_the_phase_is_unknown(
    plain_http: Server, set_conn: Callable[..., None]
) -> None:
    """Check that an SSL error requests cannot place stays an ordinary, retried transport error.

    Requests cannot say whether the same words came from the handshake or from a record broken
    mid-answer (after the request went): the error stays an ordinary, retried transport error.
    """
    set_conn(plain_http.address)
    with pytest.raises(FluxKontextTransportError) as err:
        _sync_account(FluxKontextHook(max_retries=2))
    assert not isinstance(err.value, FluxKontextTLSError)
    assert plain_http.connections == 3
    assert f"did you mean 'http://{plain_http.address}'?" in str(err.value)


def _requests_ssl_error(message: str, cls: type[ssl.SSLError] = ssl.SSLError) -> Exception:
    """Return what requests raises for an SSL failure (a urllib3 error around the ``ssl`` one)."""
    import requests
    import urllib3.exceptions

    return requests.exceptions.SSLError(urllib3.exceptions.SSLError(cls(1, message)))


def test_only_a_certificate_refusal_or_a_failed_connect_is_lasting() -> None:
    settings = ClientSettings.from_connection(_Conn("https://api.example.com"))
    request = account_request()
    refused = _requests_ssl_error("certificate verify failed", ssl.SSLCertVerificationError)
    cut = _requests_ssl_error("EOF occurred in violation of protocol", ssl.SSLEOFError)
    broken = _requests_ssl_error("[SSL: RECORD_LAYER_FAILURE] record layer failure")
    assert isinstance(transport_error(settings, request, refused, sent=True), FluxKontextTLSError)
    for exc in (cut, broken):
        error = transport_error(settings, request, exc, sent=True)
        assert not isinstance(error, FluxKontextTLSError)
        assert error.request_sent is True
        assert classify(error, request) is Verdict.RETRY
    assert isinstance(transport_error(settings, request, broken, sent=False), FluxKontextTLSError)
    assert not isinstance(transport_error(settings, request, cut, sent=False), FluxKontextTLSError)


def test_a_create_whose_answer_broke_mid_record_may_exist(
    set_conn: Callable[..., None], requests_mock: Any
) -> None:
    """Check that a TLS record broken after the create went is an uncertain create.

    A record broken after the create went (OpenSSL's "record layer failure"): the prediction may
    exist, so the create is neither retried nor reported as not sent.
    """
    set_conn("https://api.example.com")
    url = f"https://api.example.com/v1/models/{MODEL}/predictions"
    requests_mock.post(url, exc=_requests_ssl_error("[SSL: RECORD_LAYER_FAILURE] record layer failure"))
    with pytest.raises(FluxKontextPredictionMayExistError):
        FluxKontextHook(max_retries=3).create_prediction(MODEL, INPUT)
    assert requests_mock.call_count == 1


def test_lasting_failures_fail_the_attempt_loop() -> None:
    request = account_request()
    assert classify(FluxKontextTLSError("refused"), request) is Verdict.FAIL
    assert classify(FluxKontextTransportError("cut", request_sent=False), request) is Verdict.RETRY


def test_a_task_fails_once_on_a_lasting_handshake_failure() -> None:
    with pytest.raises(AirflowFailException) as err, fail_task_on_final_answers("create"):
        raise FluxKontextTLSError("POST /v1/predictions failed (the TLS handshake failed)")
    assert "Not retried: the create would get the same answer" in str(err.value)
    assert "fix the connection" in str(err.value)
    with pytest.raises(FluxKontextTransportError), fail_task_on_final_answers("create"):
        raise FluxKontextTransportError("reset", request_sent=False)  # others keep Airflow's retries
