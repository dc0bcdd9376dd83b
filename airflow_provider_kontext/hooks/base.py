"""Hold the plumbing under :class:`~airflow_provider_kontext.hooks.kontext.FluxKontextHook`.

That is the connection's settings, and sending a request.

Settings are looked up once per hook (in an event loop, shared by its hooks for
:data:`~airflow_provider_kontext.hooks.connection.SETTINGS_TTL_SECONDS`), every secret in them
registered with Airflow's masker, and looked up again after an auth error (a rotated token). A
request goes through the one attempt loop of :mod:`airflow_provider_kontext.hooks.retry` over requests
(sync) or the event loop's shared aiohttp client (async, drawing on the account's rate limiter of
:mod:`.rate_limit`); the final error of the loop is what the caller gets.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from airflow.sdk import BaseHook

from airflow_provider_kontext.exceptions import FluxKontextRateLimitError
from airflow_provider_kontext.hooks.accounts import AccountRateLimiters
from airflow_provider_kontext.hooks.api import ApiRequest, parse_response
from airflow_provider_kontext.hooks.connection import (
    DEFAULT_CONN_ID,
    ClientSettings,
    SettingsCache,
    SettingsKey,
    checked_overrides,
)
from airflow_provider_kontext.hooks.retry import Attempts, RetryLimits
from airflow_provider_kontext.hooks.transports import AiohttpClient, SharedAsyncClient, send_with_requests

if TYPE_CHECKING:
    import requests

__all__ = ["FluxKontextBaseHook"]

_Parse = Callable[[Any], Any]
_Hook = TypeVar("_Hook", bound="FluxKontextBaseHook")


def _raw(data: Any) -> Any:
    return data


class FluxKontextBaseHook(BaseHook):
    """A connection's settings and the two ways of sending, under the hook's API calls.

    Subclassed by :class:`~airflow_provider_kontext.hooks.kontext.FluxKontextHook`; not a hook of
    its own (it has no connection type).

    :param flux_kontext_conn_id: the connection id.
    :param settings: overrides of the connection's extras, by the same names; a bad name or value
        raises ``ValueError`` naming it.
    """

    def __init__(self, flux_kontext_conn_id: str = DEFAULT_CONN_ID, **settings: float | None) -> None:
        super().__init__()
        self.flux_kontext_conn_id = flux_kontext_conn_id
        self._overrides = checked_overrides(settings)
        self._settings: ClientSettings | None = None
        self._session: requests.Session | None = None
        self._aclient: AiohttpClient | None = None
        self._aclient_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(flux_kontext_conn_id={self.flux_kontext_conn_id!r})"

    # --- settings ---------------------------------------------------------------------------------

    def _build_settings(self, conn: Any) -> ClientSettings:
        """Read the settings from the connection, every secret in them registered with the masker."""
        settings = ClientSettings.from_connection(conn, **self._overrides)
        from airflow_provider_kontext.compat import mask_secret

        for secret in settings.secrets():
            mask_secret(secret)
        return settings

    async def _abuild_settings(self, conn: Any) -> ClientSettings:
        """Run :meth:`_build_settings` for the event loop.

        It masks with ``amask_secret``, which does not block on the supervisor's channel.
        """
        settings = ClientSettings.from_connection(conn, **self._overrides)
        from airflow_provider_kontext.compat import amask_secret

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
        """Return the connection's settings, looked up without blocking the event loop.

        Looked up once per hook, and reused by the other hooks of the same event loop for
        :data:`SETTINGS_TTL_SECONDS`.
        """
        if self._settings is None:
            key = self._settings_key()
            settings = SettingsCache.get(key)
            if settings is None:
                conn = await self.aget_connection(self.flux_kontext_conn_id)
                settings = await self._abuild_settings(conn)
                SettingsCache.put(key, settings)
            self._settings = settings
        return self._settings

    def redact(self, text: str) -> str:
        """``text`` with the connection's secrets replaced by ``***`` (as is, before the first lookup)."""
        return self._settings.redact(text) if self._settings is not None else text

    def _settings_key(self) -> SettingsKey:
        return (self.flux_kontext_conn_id, *sorted(self._overrides.items()))

    def _refreshed_settings(self, stale: ClientSettings) -> ClientSettings | None:
        """Look the connection up again (after an auth error); the new settings if they differ."""
        self._settings = None
        fresh = self.settings
        return fresh if fresh != stale else None

    async def _arefreshed_settings(self, stale: ClientSettings) -> ClientSettings | None:
        """:meth:`_refreshed_settings` without blocking, past the settings shared in the event loop."""
        SettingsCache.drop(self._settings_key())
        self._settings = None
        fresh = await self.aget_settings()
        return fresh if fresh != stale else None

    def get_conn(self) -> requests.Session:
        """Return the ``requests.Session`` used by the sync methods."""
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

    def _log_throttle(self, level: int, message: str, *args: object) -> None:
        self.log.log(level, message, *args)

    def _attempts(
        self, settings: ClientSettings, request: ApiRequest, retry_limits: RetryLimits | None
    ) -> Attempts:
        return Attempts(
            settings, request, retry_limits=retry_limits, log_retry=self._log_retry, log=self._log_throttle
        )

    def _request(
        self, request: ApiRequest, retry_limits: RetryLimits | None = None, parse: _Parse = _raw
    ) -> Any:
        """Send ``request`` through the attempt loop; return its JSON body decoded by ``parse``.

        ``parse`` runs inside each attempt, so an unreadable answer counts as that attempt's failure.

        :raises FluxKontextError: the final error once trying stops (see :class:`Attempts`).
        """
        attempts = self._attempts(self.settings, request, retry_limits)

        def send(settings: ClientSettings, attempt: int) -> Any:
            self._log_attempt(request, attempt, quiet=attempts.throttled > 0)
            answer = send_with_requests(self.get_conn(), settings, request)
            return parse(parse_response(settings, request, *answer))

        return attempts.run_sync(send, self._refreshed_settings, self._sleep)

    async def _arequest(
        self, request: ApiRequest, retry_limits: RetryLimits | None = None, parse: _Parse = _raw
    ) -> Any:
        """Async twin of :meth:`_request`, over the event loop's shared client."""
        priority = retry_limits.priority if retry_limits is not None else None
        attempts = self._attempts(await self.aget_settings(), request, retry_limits)

        async def send(settings: ClientSettings, attempt: int) -> Any:
            account = AccountRateLimiters.get(settings)
            if account is not None:
                await account.acquire(priority)
            self._log_attempt(request, attempt, quiet=attempts.throttled > 0)
            answer = await self._async_client().send(settings, request)
            try:
                return parse(parse_response(settings, request, *answer))
            except FluxKontextRateLimitError as exc:
                if account is not None:
                    wait = exc.retry_after
                    account.pause(None if wait is None else min(wait, settings.retry_after_max))
                raise

        return await attempts.run_async(send, self._arefreshed_settings, self._asleep)

    def _async_client(self) -> AiohttpClient:
        """Return this hook's share of the event loop's client, acquired on first use in this loop."""
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
            client = self._aclient = SharedAsyncClient.acquire()
            self._aclient_loop = weakref.ref(loop)
        return client

    def _log_attempt(self, request: ApiRequest, attempt: int, *, quiet: bool = False) -> None:
        """Log an attempt at info, except a quiet request's first and a throttled create's next ones.

        A create's throttling is logged once by the attempt loop.
        """
        if not quiet and (attempt > 1 or not request.quiet):
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
            await SharedAsyncClient.release(client)

    async def __aenter__(self: _Hook) -> _Hook:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def close(self) -> None:
        """Close the sync session."""
        if self._session is not None:
            self._session.close()
            self._session = None
