"""``FluxKontextHook``: every HTTP call of the provider, sync (requests) and async (httpx).

Request building, the retry decision and response parsing are shared by both paths
(:mod:`airflow_provider_kontext.hooks._http`); this module only sends bytes and waits.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from airflow.sdk import BaseHook
from pydantic import BaseModel, ValidationError

from airflow_provider_kontext.exceptions import KontextAPIError, KontextError
from airflow_provider_kontext.get_provider_info import (
    CONN_TYPE,
    DEFAULT_CONN_ID,
    UI_FIELD_BEHAVIOUR,
)
from airflow_provider_kontext.hooks._http import (
    USER_AGENT,
    ApiRequest,
    ClientSettings,
    account_request,
    cancel_prediction_request,
    create_prediction_request,
    download_request,
    final_error,
    get_prediction_request,
    parse_response,
    retry_kwargs,
    transport_error,
    upload_file_request,
)
from airflow_provider_kontext.models import Account, Prediction, UploadedFile

if TYPE_CHECKING:
    import httpx
    import requests

__all__ = ["FluxKontextHook"]


class _SharedAsyncClient:
    """One ``httpx.AsyncClient`` over an aiohttp transport per event loop, shared by every hook
    (so every trigger) in that loop, opened on first use and closed when its last user releases it.

    httpx's own pool falls seconds behind at ~1000 concurrent pollers; aiohttp's carries them (see
    the project's performance baseline). Auth and timeouts are set per request, so one client can
    serve connections with different tokens and base URLs.
    """

    _clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[httpx.AsyncClient, list[int]]] = (
        weakref.WeakKeyDictionary()
    )

    @classmethod
    def acquire(cls) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        entry = cls._clients.get(loop)
        if entry is None or entry[0].is_closed:
            import httpx
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport(limits=httpx.Limits(max_connections=256, keepalive_expiry=30))
            entry = (httpx.AsyncClient(transport=transport, follow_redirects=False), [0])
            cls._clients[loop] = entry
        entry[1][0] += 1
        return entry[0]

    @classmethod
    async def release(cls, client: httpx.AsyncClient) -> None:
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

    The connection (type ``flux_kontext``) holds the base URL in ``host`` (default
    ``https://api.replicate.com``; a proxy URL with a path prefix works) and the API token in
    ``password`` (else ``REPLICATE_API_TOKEN``; a proxy may need none). Extras: ``timeout`` (read,
    seconds), ``connect_timeout``, ``max_retries``, ``backoff_max``, ``retry_after_max``.

    Reads and cancels are retried on 429, 5xx and network errors with capped exponential backoff and
    jitter, honouring ``Retry-After``. Creating a prediction is retried only when the request provably
    did not create one (429, connection refused); otherwise it fails with
    :class:`~airflow_provider_kontext.exceptions.KontextPredictionMayExistError`.

    The async methods (``a``-prefixed) share one HTTP client per event loop; call :meth:`aclose` (or
    use ``async with``) when done so it can be closed once its last user is gone.

    :param flux_kontext_conn_id: the connection id.
    :param timeout: read timeout in seconds, overriding the connection's extra.
    :param max_retries: retries of transient errors, overriding the connection's extra.
    """

    conn_name_attr = "flux_kontext_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = CONN_TYPE
    hook_name = "Flux Kontext"

    def __init__(
        self,
        flux_kontext_conn_id: str = DEFAULT_CONN_ID,
        *,
        timeout: float | None = None,
        max_retries: int | None = None,
    ) -> None:
        super().__init__()
        self.flux_kontext_conn_id = flux_kontext_conn_id
        self._timeout = timeout
        self._max_retries = max_retries
        self._settings: ClientSettings | None = None
        self._session: requests.Session | None = None
        self._aclient: httpx.AsyncClient | None = None
        self._aclient_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(flux_kontext_conn_id={self.flux_kontext_conn_id!r})"

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Labels and hidden fields of the connection form (the same as in ``get_provider_info``)."""
        return UI_FIELD_BEHAVIOUR

    # --- settings ---------------------------------------------------------------------------------

    def _build_settings(self, conn: Any) -> ClientSettings:
        settings = ClientSettings.from_connection(conn, timeout=self._timeout, max_retries=self._max_retries)
        from airflow.sdk.log import mask_secret

        for secret in settings.secrets():
            mask_secret(secret)
        return settings

    @property
    def settings(self) -> ClientSettings:
        """The connection's settings, looked up once (sync; use :meth:`aget_settings` in async code)."""
        if self._settings is None:
            self._settings = self._build_settings(self.get_connection(self.flux_kontext_conn_id))
        return self._settings

    async def aget_settings(self) -> ClientSettings:
        """The connection's settings, looked up once without blocking the event loop."""
        if self._settings is None:
            conn = await self.aget_connection(self.flux_kontext_conn_id)
            self._settings = self._build_settings(conn)
        return self._settings

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
        """Async twin of :meth:`_request`: same policy, same parsing, over the shared async client."""
        from tenacity import AsyncRetrying

        settings = await self.aget_settings()
        try:
            async for attempt in AsyncRetrying(
                sleep=self._asleep, **retry_kwargs(settings, request, self._log_retry)
            ):
                with attempt:
                    return await self._asend(settings, request, attempt.retry_state.attempt_number, quiet)
        except KontextError as exc:
            raise final_error(request, exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _asend(self, settings: ClientSettings, request: ApiRequest, attempt: int, quiet: bool) -> Any:
        import httpx

        self._log_attempt(request, attempt, quiet)
        loop = asyncio.get_running_loop()
        if (
            self._aclient is None
            or self._aclient.is_closed
            or self._aclient_loop is None
            or self._aclient_loop() is not loop
        ):
            # A client left from another (finished) event loop is bound to it: using it here raises
            # "Event loop is closed". It cannot be released from this loop either, so it is dropped.
            self._aclient = self._make_async_client()
            self._aclient_loop = weakref.ref(loop)
        try:
            response = await self._aclient.request(
                request.method,
                settings.url(request.path),
                json=request.json if request.files is None else None,
                files=request.files,
                headers=settings.headers(request.headers),
                timeout=httpx.Timeout(
                    request.read_timeout or settings.timeout, connect=settings.connect_timeout
                ),
            )
        except httpx.TransportError as exc:
            raise transport_error(settings, request, exc) from None
        return parse_response(settings, request, response.status_code, response.headers, response.content)

    def _make_async_client(self) -> httpx.AsyncClient:
        """The async client: by default the loop's shared one. Tests may substitute their own."""
        return _SharedAsyncClient.acquire()

    def _log_attempt(self, request: ApiRequest, attempt: int, quiet: bool) -> None:
        if attempt > 1 or not quiet:
            self.log.info("%s (attempt %d)", request.label, attempt)
        else:
            self.log.debug("%s (attempt %d)", request.label, attempt)

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
        return _parsed(Prediction, self._request(request))

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
        data, name = _read_content(content, filename)
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
        return True, f"Connected to {self.settings.base_url} as {who}"

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
        return _parsed(Prediction, await self._arequest(request))

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
        data, name = await asyncio.to_thread(_read_content, content, filename)
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


def _read_content(content: bytes | IO[bytes] | str | Path, filename: str | None) -> tuple[bytes, str]:
    if isinstance(content, bytes | bytearray):
        return bytes(content), filename or "input"
    if isinstance(content, str | Path):
        path = Path(content)
        return path.read_bytes(), filename or path.name
    return content.read(), filename or Path(str(getattr(content, "name", "input"))).name
