"""The hook's two transports: requests (sync) and one shared aiohttp session per event loop (async).

Each sends one request and returns ``(status, headers, body)``, or raises
:class:`~airflow_provider_kontext.exceptions.FluxKontextTransportError` with ``request_sent`` decided
from its own library's exception: ``False`` only where the request provably never left this
machine (the connection could not be opened), so a create may be sent again.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import urllib.request
import weakref
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING
from urllib.parse import urlsplit

from airflow_provider_kontext.exceptions import (
    FluxKontextAPIError,
    FluxKontextTLSError,
    FluxKontextTransportError,
    exception_chain,
)
from airflow_provider_kontext.hooks.connection import tls_hint

if TYPE_CHECKING:
    import aiohttp
    import requests

    from airflow_provider_kontext.hooks.api import ApiRequest
    from airflow_provider_kontext.hooks.connection import ClientSettings

__all__ = [
    "AiohttpClient",
    "SharedAsyncClient",
    "requests_error",
    "send_with_requests",
    "ssl_context",
    "stream_with_requests",
    "transport_error",
]

Answer = tuple[int, Mapping[str, str], bytes]


#: OpenSSL's words for a first record that is no TLS: a server that answers the handshake in plain
#: HTTP (the same words can also mean a record corrupted later, once the request may have gone).
_NOT_TLS = ("WRONG_VERSION_NUMBER", "wrong version number", "RECORD_LAYER_FAILURE", "record layer failure")


def is_lasting_tls_failure(exc: BaseException, *, connecting: bool) -> bool:
    """Tell whether ``exc`` wraps a handshake failure that a retry would repeat.

    That is a certificate that is not trusted, expired or names another host (checked only in the
    handshake, before anything is sent), or, where the transport proves the failure came while
    ``connecting``, a server that does not speak TLS. Other SSL errors (an EOF or a reset
    mid-handshake, a record broken mid-answer) may pass and stay retryable.
    """
    for item in exception_chain(exc):
        if isinstance(item, ssl.SSLCertVerificationError):
            return True
        if connecting and isinstance(item, ssl.SSLError) and any(word in str(item) for word in _NOT_TLS):
            return True
    return False


def transport_error(
    settings: ClientSettings, request: ApiRequest, exc: BaseException, *, sent: bool
) -> FluxKontextTransportError:
    """Return our error for a request that got no usable answer; the message never holds a secret."""
    reason = settings.redact(f"{type(exc).__name__}: {exc}")[:500]
    hint = tls_hint(settings, exc)
    if is_lasting_tls_failure(exc, connecting=not sent):
        return FluxKontextTLSError(
            f"{request.label} failed (the TLS handshake failed; nothing was sent, and a retry would "
            f"fail the same way): {reason}"
            + (f" -- {hint}" if hint else " -- check the URL's host and scheme, or the trust store"),
            method=request.method,
            path=request.path,
        )
    where = "no complete response" if sent else "could not connect"
    return FluxKontextTransportError(
        f"{request.label} failed ({where}): {reason}" + (f" -- {hint}" if hint else ""),
        request_sent=sent,
        method=request.method,
        path=request.path,
    )


# --- requests -----------------------------------------------------------------------------------------


def requests_error(
    settings: ClientSettings, request: ApiRequest, exc: requests.exceptions.RequestException
) -> FluxKontextTransportError:
    """Classify a requests failure by whether the request may have been sent.

    Only a connect timeout or a refused/unresolvable connection (urllib3's ``NewConnectionError``,
    TLS aside) proves nothing was sent.
    """
    import requests
    from urllib3.exceptions import NewConnectionError

    not_sent = isinstance(exc, requests.exceptions.ConnectTimeout)
    if not not_sent and isinstance(exc, requests.exceptions.ConnectionError):
        cause = exc.args[0] if exc.args else None
        not_sent = not isinstance(exc, requests.exceptions.SSLError) and (
            isinstance(getattr(cause, "reason", None), NewConnectionError)
            or isinstance(cause, NewConnectionError)
        )
    return transport_error(settings, request, exc, sent=not not_sent)


def send_with_requests(session: requests.Session, settings: ClientSettings, request: ApiRequest) -> Answer:
    """Send ``request`` with ``session`` and read the whole answer."""
    import requests

    try:
        response = session.request(
            request.method,
            settings.url(request.path),
            json=request.json if request.files is None else None,
            files=request.files,
            headers=settings.headers(request.headers),
            timeout=(settings.connect_timeout, request.read_timeout or settings.timeout),
            allow_redirects=False,
        )
    except requests.exceptions.RequestException as exc:
        raise requests_error(settings, request, exc) from None
    return response.status_code, response.headers, response.content


def stream_with_requests(
    session: requests.Session,
    settings: ClientSettings,
    request: ApiRequest,
    url: str,
    dest: IO[bytes],
    max_bytes: int,
) -> str:
    """Stream the file at ``url`` into ``dest`` (emptied first); return its content type.

    :raises FluxKontextAPIError: an error status, or a body over ``max_bytes``.
    :raises FluxKontextTransportError: no complete answer.
    """
    import requests

    from airflow_provider_kontext.hooks.api import parse_response
    from airflow_provider_kontext.hooks.connection import USER_AGENT

    dest.seek(0)
    dest.truncate()
    try:
        with session.get(
            url,
            headers={"User-Agent": USER_AGENT, **request.headers},
            timeout=(settings.connect_timeout, settings.timeout),
            stream=True,
            allow_redirects=True,
        ) as response:
            if response.status_code >= 300:
                parse_response(settings, request, response.status_code, response.headers, response.content)
            size = 0
            for chunk in response.iter_content(chunk_size=1 << 16):
                size += len(chunk)
                if size > max_bytes:
                    raise FluxKontextAPIError(
                        title="output too large",
                        detail=f"more than {max_bytes} bytes",
                        method="GET",
                        path=request.path,
                    )
                dest.write(chunk)
            return str(response.headers.get("content-type", ""))
    except requests.exceptions.RequestException as exc:
        raise requests_error(settings, request, exc) from None


# --- aiohttp ------------------------------------------------------------------------------------------


def ssl_context() -> ssl.SSLContext:
    """Return the TLS trust store: ``SSL_CERT_FILE`` or ``SSL_CERT_DIR`` when set, else certifi's.

    certifi's bundle is the one requests uses.
    """
    if cafile := os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=cafile)
    if capath := os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=capath)
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def _aiohttp_not_sent(exc: BaseException) -> bool:
    """Tell whether an aiohttp failure proves the request was not sent.

    Only connector failures (refused, DNS, TLS handshake, proxy, connect or pool timeout) prove
    nothing was sent; a dropped keep-alive connection, a reset or a read timeout do not.
    """
    import aiohttp

    return isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)


class AiohttpClient:
    """The async path's HTTP client: one ``aiohttp.ClientSession`` and its connection pool.

    Auth and timeouts are set per request: one client serves connections with different tokens and
    base URLs. Must be created inside the event loop it serves.
    """

    def __init__(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=30, ssl=ssl_context())
        # Not trust_env=True: aiohttp then looks proxies (and .netrc) up in a thread on every request.
        # The environment's HTTP(S)_PROXY / NO_PROXY are honoured all the same, decided once per origin.
        self._session = aiohttp.ClientSession(connector=connector)
        self._proxies = {
            scheme: url for scheme, url in urllib.request.getproxies().items() if scheme in ("http", "https")
        }
        self._proxy_by_origin: dict[str, str | None] = {}
        self._timeouts: dict[tuple[float, float], aiohttp.ClientTimeout] = {}

    def _proxy(self, url: str) -> str | None:
        """Return the proxy for ``url`` from the environment (as requests would pick it), if any."""
        if not self._proxies:
            return None
        scheme, _, rest = url.partition("://")
        origin = f"{scheme}://{rest.split('/', 1)[0]}"
        if origin not in self._proxy_by_origin:
            host = urlsplit(origin).hostname or ""
            bypass = urllib.request.proxy_bypass(host)
            self._proxy_by_origin[origin] = None if bypass else self._proxies.get(scheme.lower())
        return self._proxy_by_origin[origin]

    @property
    def is_closed(self) -> bool:
        """Tell whether the session is closed."""
        return self._session.closed

    def _timeout(self, read_timeout: float, connect_timeout: float) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get((read_timeout, connect_timeout))
        if timeout is None:
            import aiohttp

            # Waiting for a pooled connection plus connecting within `read`; each read within `read`.
            timeout = aiohttp.ClientTimeout(
                sock_connect=connect_timeout, sock_read=read_timeout, connect=read_timeout
            )
            self._timeouts[(read_timeout, connect_timeout)] = timeout
        return timeout

    async def send(self, settings: ClientSettings, request: ApiRequest) -> Answer:
        """Send ``request`` and read the whole answer.

        :raises FluxKontextTransportError: no usable answer (``request_sent`` as judged above).
        """
        import aiohttp

        data = None
        if request.files:
            data = aiohttp.FormData()
            for name, (filename, content, content_type) in request.files.items():
                data.add_field(name, content, filename=filename, content_type=content_type)
        url = settings.url(request.path)
        try:
            async with self._session.request(
                request.method,
                url,
                headers=settings.headers(request.headers),
                json=request.json if data is None else None,
                data=data,
                allow_redirects=False,
                timeout=self._timeout(request.read_timeout or settings.timeout, settings.connect_timeout),
                proxy=self._proxy(url),
            ) as response:
                body = await response.read()
                return response.status, response.headers, body
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # ClientResponseError too: a malformed answer (bad status line, broken chunking, a body
            # on a 204) is no usable answer, and the request was sent.
            raise transport_error(settings, request, exc, sent=not _aiohttp_not_sent(exc)) from None

    async def aclose(self) -> None:
        """Close the session and its connection pool."""
        await self._session.close()


class SharedAsyncClient:
    """One :class:`AiohttpClient` per event loop, shared by every hook (so every trigger) in it.

    Opened on first use and closed when its last user releases it.
    """

    _clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[AiohttpClient, list[int]]] = (
        weakref.WeakKeyDictionary()
    )

    @classmethod
    def acquire(cls) -> AiohttpClient:
        """Return the running loop's client, opening it if needed, and count one more user."""
        loop = asyncio.get_running_loop()
        entry = cls._clients.get(loop)
        if entry is None or entry[0].is_closed:
            entry = (AiohttpClient(), [0])
            cls._clients[loop] = entry
        entry[1][0] += 1
        return entry[0]

    @classmethod
    async def release(cls, client: AiohttpClient) -> None:
        """Count one user less of ``client``; close it when it was the last."""
        loop = asyncio.get_running_loop()
        entry = cls._clients.get(loop)
        if entry is None or entry[0] is not client:
            await client.aclose()
            return
        entry[1][0] -= 1
        if entry[1][0] <= 0:
            del cls._clients[loop]
            await client.aclose()
