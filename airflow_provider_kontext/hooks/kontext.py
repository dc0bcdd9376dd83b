"""``FluxKontextHook``: every HTTP call of the provider, sync (requests) and async (aiohttp).

Request building, the retry decision and response parsing are shared by both paths
(:mod:`airflow_provider_kontext.hooks._http`); this module only sends bytes and waits.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from airflow.sdk import BaseHook
from pydantic import BaseModel, ValidationError

from airflow_provider_kontext.exceptions import KontextAPIError, KontextAuthError, KontextError
from airflow_provider_kontext.hooks._http import (
    ApiRequest,
    account_request,
    backoff_seconds,
    cancel_prediction_request,
    create_prediction_request,
    download_request,
    final_error,
    get_prediction_request,
    is_transient,
    parse_response,
    retry_kwargs,
    transport_error,
    upload_file_request,
)
from airflow_provider_kontext.hooks.connection import (
    CONN_TYPE,
    DEFAULT_CONN_ID,
    HOOK_NAME,
    USER_AGENT,
    ClientSettings,
    checked_overrides,
    ui_field_behaviour,
)
from airflow_provider_kontext.images import read_source
from airflow_provider_kontext.models import Account, Prediction, UploadedFile

if TYPE_CHECKING:
    import httpx
    import requests

__all__ = ["AiohttpClient", "FluxKontextHook"]


class AiohttpClient:
    """The async path's HTTP client: one ``aiohttp.ClientSession`` and its connection pool.

    httpx's own pool falls seconds behind at ~1000 concurrent pollers, and httpx over an aiohttp
    transport still spends as much CPU per request in httpx's request/response models as aiohttp
    spends on the whole request (see ``benchmarks/RESULTS.md``). So requests go to aiohttp directly;
    its exceptions are mapped to httpx's with httpx-aiohttp's own table, so that
    :func:`~airflow_provider_kontext.hooks._http.transport_error` judges them exactly as before.
    Auth and timeouts are set per request: one client serves connections with different tokens and
    base URLs. Must be created inside the event loop it serves.
    """

    def __init__(self) -> None:
        import aiohttp
        import httpx

        # The same trust store as httpx (certifi, or SSL_CERT_FILE / SSL_CERT_DIR).
        connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=30, ssl=httpx.create_ssl_context())
        # Not trust_env=True: aiohttp then looks proxies (and .netrc) up in a thread on every request.
        # The environment's HTTP(S)_PROXY / NO_PROXY are honoured all the same, decided once per origin.
        self._session = aiohttp.ClientSession(connector=connector)
        self._proxies = {
            scheme: url for scheme, url in urllib.request.getproxies().items() if scheme in ("http", "https")
        }
        self._proxy_by_origin: dict[str, str | None] = {}
        self._timeouts: dict[tuple[float, float], aiohttp.ClientTimeout] = {}

    def _proxy(self, url: str) -> str | None:
        """The proxy for ``url`` from the environment (as requests and httpx would pick it), if any."""
        if not self._proxies:
            return None
        scheme, _, rest = url.partition("://")
        origin = f"{scheme}://{rest.split('/', 1)[0]}"
        if origin not in self._proxy_by_origin:
            from urllib.parse import urlsplit

            host = urlsplit(origin).hostname or ""
            bypass = urllib.request.proxy_bypass(host)
            self._proxy_by_origin[origin] = None if bypass else self._proxies.get(scheme.lower())
        return self._proxy_by_origin[origin]

    @property
    def is_closed(self) -> bool:
        return self._session.closed

    async def send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        json: Any = None,
        files: Mapping[str, tuple[str, bytes, str]] | None = None,
        read_timeout: float,
        connect_timeout: float,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """Send one request and read the whole answer: ``(status, headers, body)``.

        :raises httpx.TransportError: what httpx-aiohttp maps the aiohttp failure to (its cause).
        """
        import aiohttp
        import httpx
        from httpx_aiohttp.transport import map_aiohttp_exceptions

        timeout = self._timeouts.get((read_timeout, connect_timeout))
        if timeout is None:
            # As httpx-aiohttp maps httpx.Timeout(read, connect=c): pool wait + connect within `read`.
            timeout = aiohttp.ClientTimeout(
                sock_connect=connect_timeout, sock_read=read_timeout, connect=read_timeout
            )
            self._timeouts[(read_timeout, connect_timeout)] = timeout
        data = None
        if files:
            data = aiohttp.FormData()
            for field, (filename, content, content_type) in files.items():
                data.add_field(field, content, filename=filename, content_type=content_type)
        with map_aiohttp_exceptions():
            try:
                return await self._exchange(method, url, headers, json, data, timeout)
            except aiohttp.ClientResponseError as exc:
                # A malformed answer (bad status line, broken chunking, a body on a 204, ...): no
                # usable response, and the request was sent. httpx-aiohttp's table leaves it unmapped.
                raise httpx.RemoteProtocolError(f"malformed HTTP response: {exc.message}") from exc

    async def _exchange(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        json: Any,
        data: Any,
        timeout: Any,
    ) -> tuple[int, Mapping[str, str], bytes]:
        async with self._session.request(
            method,
            url,
            headers=headers,
            json=json if data is None else None,
            data=data,
            allow_redirects=False,
            timeout=timeout,
            proxy=self._proxy(url),
        ) as response:
            body = await response.read()
            return response.status, response.headers, body

    async def aclose(self) -> None:
        await self._session.close()


#: How long hooks in one event loop (the triggerer's) reuse a connection's settings. Every trigger
#: builds its own hook, and each lookup goes through the secrets backends (in a triggerer, a round
#: trip over the supervisor to the API server): at 1000 triggers that was ~0.5 ms of CPU per trigger
#: here. A rotated token is picked up at once all the same: an auth error looks the connection up
#: again and retries with the new settings (see ``FluxKontextHook._arequest``).
SETTINGS_TTL_SECONDS = 60.0

_SettingsKey = tuple[Any, ...]  # the connection id, then the overrides as sorted (name, value) pairs


class _SettingsCache:
    """Connection settings per event loop, for :data:`SETTINGS_TTL_SECONDS`."""

    _entries: weakref.WeakKeyDictionary[
        asyncio.AbstractEventLoop, dict[_SettingsKey, tuple[ClientSettings, float]]
    ] = weakref.WeakKeyDictionary()

    @classmethod
    def get(cls, key: _SettingsKey) -> ClientSettings | None:
        entry = cls._entries.get(asyncio.get_running_loop(), {}).get(key)
        if entry is None or time.monotonic() >= entry[1]:
            return None
        return entry[0]

    @classmethod
    def put(cls, key: _SettingsKey, settings: ClientSettings) -> None:
        loop = asyncio.get_running_loop()
        entries = cls._entries.setdefault(loop, {})
        entries[key] = (settings, time.monotonic() + SETTINGS_TTL_SECONDS)

    @classmethod
    def drop(cls, key: _SettingsKey) -> None:
        cls._entries.get(asyncio.get_running_loop(), {}).pop(key, None)


class _SharedAsyncClient:
    """One :class:`AiohttpClient` per event loop, shared by every hook (so every trigger) in that
    loop, opened on first use and closed when its last user releases it."""

    _clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[AiohttpClient, list[int]]] = (
        weakref.WeakKeyDictionary()
    )

    @classmethod
    def acquire(cls) -> AiohttpClient:
        loop = asyncio.get_running_loop()
        entry = cls._clients.get(loop)
        if entry is None or entry[0].is_closed:
            entry = (AiohttpClient(), [0])
            cls._clients[loop] = entry
        entry[1][0] += 1
        return entry[0]

    @classmethod
    async def release(cls, client: AiohttpClient | httpx.AsyncClient) -> None:
        loop = asyncio.get_running_loop()
        entry = cls._clients.get(loop)
        if entry is None or entry[0] is not client:
            await client.aclose()
            return
        entry[1][0] -= 1
        if entry[1][0] <= 0:
            del cls._clients[loop]
            await client.aclose()


class FluxKontextHook(BaseHook):
    """Talks to Replicate's predictions API, or a Replicate-compatible proxy, for FLUX.1 Kontext.

    The connection (type ``fluxkontext``) holds the base URL in ``host`` (default
    ``https://api.replicate.com``; a proxy URL with a path prefix works) and the API token in
    ``password`` (else ``REPLICATE_API_TOKEN``; a proxy may need none). Extras: ``timeout`` (read,
    seconds), ``connect_timeout``, ``max_retries``, ``backoff_base``, ``backoff_max``,
    ``retry_after_max``; their defaults, minimums and meaning are in
    :data:`~airflow_provider_kontext.hooks.connection.SETTINGS`.

    Reads and cancels are retried on 429, 5xx and network errors with capped exponential backoff and
    jitter, honouring ``Retry-After``. Creating a prediction is retried only when the request provably
    did not create one (429, connection refused); otherwise it fails with
    :class:`~airflow_provider_kontext.exceptions.KontextPredictionMayExistError`.

    The async methods (``a``-prefixed) share one HTTP client per event loop; call :meth:`aclose` (or
    use ``async with``) when done so it can be closed once its last user is gone.

    :param flux_kontext_conn_id: the connection id.
    :param settings: overrides of the connection's extras, by the same names (``timeout``,
        ``max_retries``, ...: :data:`~airflow_provider_kontext.hooks.connection.SETTINGS`); what
        operators, sensors and the trigger pass on as ``hook_params``. A bad name or value raises
        ``ValueError`` naming it.
    """

    conn_name_attr = "flux_kontext_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = CONN_TYPE
    hook_name = HOOK_NAME

    def __init__(self, flux_kontext_conn_id: str = DEFAULT_CONN_ID, **settings: float | None) -> None:
        super().__init__()
        self.flux_kontext_conn_id = flux_kontext_conn_id
        self._overrides = checked_overrides(settings)
        self._settings: ClientSettings | None = None
        self._session: requests.Session | None = None
        self._aclient: AiohttpClient | httpx.AsyncClient | None = None
        self._aclient_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(flux_kontext_conn_id={self.flux_kontext_conn_id!r})"

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Labels, hidden fields and placeholders of the connection form (as in ``get_provider_info``)."""
        return ui_field_behaviour()

    # --- settings ---------------------------------------------------------------------------------

    def _build_settings(self, conn: Any) -> ClientSettings:
        """Settings from the connection, every secret in them registered with Airflow's masker."""
        settings = ClientSettings.from_connection(conn, **self._overrides)
        from airflow.sdk.log import mask_secret

        for secret in settings.secrets():
            mask_secret(secret)
        return settings

    async def _abuild_settings(self, conn: Any) -> ClientSettings:
        """:meth:`_build_settings` for the event loop: masks with ``amask_secret``, which does not
        block on the supervisor's channel."""
        settings = ClientSettings.from_connection(conn, **self._overrides)
        from airflow.sdk.log import amask_secret

        for secret in settings.secrets():
            await amask_secret(secret)
        return settings

    @property
    def settings(self) -> ClientSettings:
        """The connection's settings, looked up once (sync; use :meth:`aget_settings` in async code)."""
        if self._settings is None:
            self._settings = self._build_settings(self.get_connection(self.flux_kontext_conn_id))
        return self._settings

    async def aget_settings(self) -> ClientSettings:
        """The connection's settings, looked up without blocking the event loop: once per hook, and
        reused by the other hooks of the same event loop for :data:`SETTINGS_TTL_SECONDS`."""
        if self._settings is None:
            key = self._settings_key()
            settings = _SettingsCache.get(key)
            if settings is None:
                conn = await self.aget_connection(self.flux_kontext_conn_id)
                settings = await self._abuild_settings(conn)
                _SettingsCache.put(key, settings)
            self._settings = settings
        return self._settings

    def redact(self, text: str) -> str:
        """``text`` with the connection's secrets replaced by ``***`` (as is, before the first lookup)."""
        return self._settings.redact(text) if self._settings is not None else text

    def _settings_key(self) -> _SettingsKey:
        return (self.flux_kontext_conn_id, *sorted(self._overrides.items()))

    async def _arefreshed_settings(self, stale: ClientSettings) -> ClientSettings | None:
        """Look the connection up again; the new settings if they differ from ``stale``."""
        _SettingsCache.drop(self._settings_key())
        self._settings = None
        fresh = await self.aget_settings()
        return fresh if fresh != stale else None

    def get_conn(self) -> requests.Session:
        """The ``requests.Session`` used by the sync methods."""
        if self._session is None:
            import requests

            self._session = requests.Session()
        return self._session

    # --- the two transports -------------------------------------------------------------------------

    def _log_retry(self, request: ApiRequest, attempt: int, exc: BaseException, delay: float) -> None:
        self.log.info("%s attempt %d failed (%s); retrying in %.1fs", request.label, attempt, exc, delay)

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    async def _asleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def _request(self, request: ApiRequest, *, quiet: bool = False) -> Any:
        """Send ``request`` with the shared retry policy and return the decoded JSON body.

        :raises KontextError: the mapped error once retries are exhausted or the error is final.
        """
        from tenacity import Retrying

        settings = self.settings
        try:
            for attempt in Retrying(sleep=self._sleep, **retry_kwargs(settings, request, self._log_retry)):
                with attempt:
                    return self._send(settings, request, attempt.retry_state.attempt_number, quiet)
        except KontextError as exc:
            raise final_error(request, exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _send(self, settings: ClientSettings, request: ApiRequest, attempt: int, quiet: bool) -> Any:
        import requests

        self._log_attempt(request, attempt, quiet)
        files = request.files
        try:
            response = self.get_conn().request(
                request.method,
                settings.url(request.path),
                json=request.json if files is None else None,
                files=files,
                headers=settings.headers(request.headers),
                timeout=(settings.connect_timeout, request.read_timeout or settings.timeout),
                allow_redirects=False,
            )
        except requests.exceptions.RequestException as exc:
            raise transport_error(settings, request, exc) from None
        return parse_response(settings, request, response.status_code, response.headers, response.content)

    async def _arequest(self, request: ApiRequest, *, quiet: bool = False) -> Any:
        """Async twin of :meth:`_request`: the same policy (:func:`is_transient`, :func:`backoff_seconds`,
        ``max_retries``) and parsing, over the shared async client.

        A plain loop rather than tenacity's ``AsyncRetrying``, which costs tens of microseconds per
        call even when the first attempt succeeds: this runs once per poll of every trigger.

        An auth error looks the connection up again (settings are shared between hooks for a while)
        and, if it changed, for instance a rotated token, sends the request once more with it.
        """
        settings = await self.aget_settings()
        try:
            return await self._aretrying(settings, request, quiet)
        except KontextAuthError:
            fresh = await self._arefreshed_settings(settings)
            if fresh is None:
                raise
        return await self._aretrying(fresh, request, quiet)

    async def _aretrying(self, settings: ClientSettings, request: ApiRequest, quiet: bool) -> Any:
        attempt = 1
        while True:
            try:
                return await self._asend(settings, request, attempt, quiet)
            except KontextError as exc:
                if attempt > settings.max_retries or not is_transient(exc, request):
                    raise final_error(request, exc) from None
                delay = backoff_seconds(settings, attempt, exc)
                self._log_retry(request, attempt, exc, delay)
            await self._asleep(delay)
            attempt += 1

    async def _asend(self, settings: ClientSettings, request: ApiRequest, attempt: int, quiet: bool) -> Any:
        import httpx

        self._log_attempt(request, attempt, quiet)
        loop = asyncio.get_running_loop()
        client = self._aclient
        if (
            client is None
            or client.is_closed
            or self._aclient_loop is None
            or self._aclient_loop() is not loop
        ):
            # A client left from another (finished) event loop is bound to it: using it here raises
            # "Event loop is closed". It cannot be released from this loop either, so it is dropped.
            client = self._aclient = self._make_async_client()
            self._aclient_loop = weakref.ref(loop)
        read_timeout = request.read_timeout or settings.timeout
        try:
            if isinstance(client, AiohttpClient):
                status, headers, body = await client.send(
                    request.method,
                    settings.url(request.path),
                    headers=settings.headers(request.headers),
                    json=request.json,
                    files=request.files,
                    read_timeout=read_timeout,
                    connect_timeout=settings.connect_timeout,
                )
            else:  # an httpx client from an overridden _make_async_client (tests, custom transports)
                response = await client.request(
                    request.method,
                    settings.url(request.path),
                    json=request.json if request.files is None else None,
                    files=request.files,
                    headers=settings.headers(request.headers),
                    timeout=httpx.Timeout(read_timeout, connect=settings.connect_timeout),
                )
                status, headers, body = response.status_code, response.headers, response.content
        except httpx.TransportError as exc:
            raise transport_error(settings, request, exc) from None
        return parse_response(settings, request, status, headers, body)

    def _make_async_client(self) -> AiohttpClient | httpx.AsyncClient:
        """The async client: by default the loop's shared one. Tests may substitute an
        ``httpx.AsyncClient`` (e.g. over ``httpx.MockTransport``)."""
        return _SharedAsyncClient.acquire()

    def _log_attempt(self, request: ApiRequest, attempt: int, quiet: bool) -> None:
        if attempt > 1 or not quiet:
            self.log.info("%s (attempt %d)", request.label, attempt)
        else:
            # The class's logger: creating one per hook (so per trigger) costs more than the poll.
            type(self).logger().debug("%s (attempt %d)", request.label, attempt)

    async def aclose(self) -> None:
        """Release the async client (closed once no other hook in this event loop uses it)."""
        client, self._aclient = self._aclient, None
        same_loop = self._aclient_loop is not None and self._aclient_loop() is asyncio.get_running_loop()
        self._aclient_loop = None
        if client is not None and same_loop:
            await _SharedAsyncClient.release(client)

    async def __aenter__(self) -> FluxKontextHook:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def close(self) -> None:
        """Close the sync session."""
        if self._session is not None:
            self._session.close()
            self._session = None

    # --- API: sync ----------------------------------------------------------------------------------

    def create_prediction(
        self,
        model: str,
        input: Mapping[str, Any],
        *,
        wait: int | None = None,
        cancel_after: float | None = None,
        webhook: str | None = None,
        webhook_events_filter: list[str] | None = None,
    ) -> Prediction:
        """Start a prediction of ``model`` (``owner/name`` or ``owner/name:version``).

        ``input`` is sent as given: validate it first with
        :func:`airflow_provider_kontext.models.validate_input`.

        :param wait: hold the request open up to this many seconds (1..60) for the result.
        :param cancel_after: seconds after which Replicate cancels (or aborts) the prediction.
        :raises KontextPredictionMayExistError: the request failed after it may have reached the server.
        """
        request = create_prediction_request(
            model,
            dict(input),
            wait=wait,
            cancel_after=cancel_after,
            webhook=webhook,
            webhook_events_filter=webhook_events_filter,
        )
        return _created(request, self._request(request))

    def get_prediction(self, prediction_id: str) -> Prediction:
        """The prediction's current state."""
        return _parsed(Prediction, self._request(get_prediction_request(prediction_id), quiet=True))

    def cancel_prediction(self, prediction_id: str) -> Prediction:
        """Ask Replicate to cancel the prediction; returns its state after the request."""
        return _parsed(Prediction, self._request(cancel_prediction_request(prediction_id)))

    def get_account(self) -> Account:
        """The account the token belongs to (``GET /v1/account``, free and side-effect free)."""
        return _parsed(Account, self._request(account_request()))

    def upload_file(
        self,
        content: bytes | IO[bytes] | str | Path,
        *,
        filename: str | None = None,
        content_type: str,
    ) -> UploadedFile:
        """Upload a file with the Files API; pass its ``urls.get`` as a model input.

        :param content: the bytes, a binary file object, or a local path.
        """
        data, name = read_source(content, filename)
        return _parsed(UploadedFile, self._request(upload_file_request(data, name, content_type)))

    def download(self, url: str, dest: IO[bytes], *, max_bytes: int) -> str:
        """Stream an output file into ``dest``; return its content type.

        Only http(s) URLs are fetched. The token is sent only to the API's own origin (output files
        on other hosts, like ``replicate.delivery``, never see it). Transient failures are retried
        like any read; a retry starts the file over, so ``dest`` must be seekable.

        :raises KontextAPIError: an error status, a non-http(s) URL, or a body over ``max_bytes``.
        """
        import requests
        from tenacity import Retrying

        settings = self.settings
        request = download_request(settings, url)

        def attempt_once(number: int) -> str:
            self._log_attempt(request, number, quiet=False)
            dest.seek(0)
            dest.truncate()
            try:
                with self.get_conn().get(
                    url,
                    headers={"User-Agent": USER_AGENT, **request.headers},
                    timeout=(settings.connect_timeout, settings.timeout),
                    stream=True,
                    allow_redirects=True,
                ) as response:
                    if response.status_code >= 300:
                        parse_response(
                            settings, request, response.status_code, response.headers, response.content
                        )
                    size = 0
                    for chunk in response.iter_content(chunk_size=1 << 16):
                        size += len(chunk)
                        if size > max_bytes:
                            raise KontextAPIError(
                                title="output too large",
                                detail=f"more than {max_bytes} bytes",
                                method="GET",
                                path=request.path,
                            )
                        dest.write(chunk)
                    return str(response.headers.get("content-type", ""))
            except requests.exceptions.RequestException as exc:
                raise transport_error(settings, request, exc) from None

        for attempt in Retrying(sleep=self._sleep, **retry_kwargs(settings, request, self._log_retry)):
            with attempt:
                return attempt_once(attempt.retry_state.attempt_number)
        raise AssertionError("unreachable")  # pragma: no cover

    def test_connection(self) -> tuple[bool, str]:
        """Call ``GET /v1/account`` and say whose account the token opens, or why it failed."""
        try:
            account = self.get_account()
        except Exception as exc:  # the UI shows whatever went wrong, a missing connection included
            return False, f"{type(exc).__name__}: {exc}" if not isinstance(exc, KontextError) else str(exc)
        who = account.username + (f" ({account.name})" if account.name else "")
        message = f"Connected to {self.settings.redact(self.settings.base_url)} as {who}"
        # `airflow connections test` prints only the message of a failure; the log shows a success's.
        self.log.info("%s", message)
        return True, message

    # --- API: async ---------------------------------------------------------------------------------

    async def acreate_prediction(
        self,
        model: str,
        input: Mapping[str, Any],
        *,
        wait: int | None = None,
        cancel_after: float | None = None,
        webhook: str | None = None,
        webhook_events_filter: list[str] | None = None,
    ) -> Prediction:
        """Async twin of :meth:`create_prediction`."""
        request = create_prediction_request(
            model,
            dict(input),
            wait=wait,
            cancel_after=cancel_after,
            webhook=webhook,
            webhook_events_filter=webhook_events_filter,
        )
        return _created(request, await self._arequest(request))

    async def aget_prediction(self, prediction_id: str) -> Prediction:
        """Async twin of :meth:`get_prediction`."""
        return _parsed(Prediction, await self._arequest(get_prediction_request(prediction_id), quiet=True))

    async def acancel_prediction(self, prediction_id: str) -> Prediction:
        """Async twin of :meth:`cancel_prediction`."""
        return _parsed(Prediction, await self._arequest(cancel_prediction_request(prediction_id)))

    async def aget_account(self) -> Account:
        """Async twin of :meth:`get_account`."""
        return _parsed(Account, await self._arequest(account_request()))

    async def aupload_file(
        self, content: bytes | IO[bytes] | str | Path, *, filename: str | None = None, content_type: str
    ) -> UploadedFile:
        """Async twin of :meth:`upload_file` (a path or file object is read in a thread)."""
        data, name = await asyncio.to_thread(read_source, content, filename)
        return _parsed(UploadedFile, await self._arequest(upload_file_request(data, name, content_type)))


_M = TypeVar("_M", bound=BaseModel)


def _parsed(model: type[_M], data: Any) -> _M:
    """Validate a response body; an answer of the wrong shape is an API error, not a crash."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise KontextAPIError(
            title="unexpected response", detail=f"not a valid {model.__name__}: {problems}"
        ) from None


def _created(request: ApiRequest, body: Any) -> Prediction:
    """The prediction a create answered with; an unreadable answer to a create is an uncertain
    create (:class:`KontextPredictionMayExistError`), never a reason to create again."""
    try:
        return _parsed(Prediction, body)
    except KontextAPIError as exc:
        raise final_error(request, exc, body) from None
