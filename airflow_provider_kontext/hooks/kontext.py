"""``FluxKontextHook``: every API call of the provider, sync (requests) and async (aiohttp).

Request building and response parsing are shared by both paths
(:mod:`airflow_provider_kontext.hooks.api`), and so is the failure policy with its one attempt loop
(:mod:`airflow_provider_kontext.hooks.retry`); settings and sending live in :mod:`.base`, the bytes
move in :mod:`.transports`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from airflow_provider_kontext.exceptions import FluxKontextError
from airflow_provider_kontext.hooks.api import (
    account_request,
    cancel_prediction_request,
    create_prediction_request,
    download_request,
    file_id_of,
    get_file_request,
    get_prediction_request,
    list_predictions_request,
    parsed_as,
    parsed_page,
    parsed_prediction,
    upload_file_request,
)
from airflow_provider_kontext.hooks.base import FluxKontextBaseHook
from airflow_provider_kontext.hooks.connection import (
    CONN_TYPE,
    DEFAULT_CONN_ID,
    HOOK_NAME,
    ClientSettings,
    ui_field_behaviour,
)
from airflow_provider_kontext.hooks.retry import RetryLimits, parsed_created
from airflow_provider_kontext.hooks.transports import AiohttpClient, stream_with_requests
from airflow_provider_kontext.models import Account, Prediction, PredictionPage, UploadedFile
from airflow_provider_kontext.models.images import read_source

__all__ = ["AiohttpClient", "FluxKontextHook"]


class FluxKontextHook(FluxKontextBaseHook):
    """Talks to Replicate's predictions API, or a Replicate-compatible proxy, for FLUX.1 Kontext.

    The connection (type ``fluxkontext``) holds the base URL in ``host`` (default
    ``https://api.replicate.com``; a proxy URL with a path prefix works) and the API token in
    ``password`` (else ``REPLICATE_API_TOKEN``; a proxy may need none). Extras: ``timeout`` (read,
    seconds), ``connect_timeout``, ``max_retries``, ``backoff_base``, ``backoff_max``,
    ``retry_after_max``, ``max_requests_per_minute``, ``list_min_waits``; their defaults, minimums
    and meaning are in :data:`~airflow_provider_kontext.hooks.connection.SETTINGS`.

    Reads and cancels are retried on 429, 5xx and network errors with capped exponential backoff and
    jitter, honouring ``Retry-After``; a TLS handshake that fails for good (an untrusted certificate)
    is not retried. Creating a prediction is retried only when the request provably
    did not create one (429, connection refused); otherwise it fails with
    :class:`~airflow_provider_kontext.exceptions.FluxKontextPredictionMayExistError`. A throttled
    create is retried until its ``deadline``, each wait spread at random so that workers throttled
    together do not come back together.
    An auth error looks the connection up again once and, if it changed (a rotated token), sends again.
    The policy is :mod:`airflow_provider_kontext.hooks.retry`; a poll may pass its own
    :class:`~airflow_provider_kontext.hooks.retry.RetryLimits`.

    The async methods (``a``-prefixed) share one HTTP client per event loop; call :meth:`aclose` (or
    use ``async with``) when done so it can be closed once its last user is gone. They also share
    one rate limiter per account per event loop (:mod:`.rate_limit`): every attempt waits for it, and a
    429 pauses the whole account until the reset the server names.

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

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Labels, hidden fields and placeholders of the connection form (as in ``get_provider_info``)."""
        from airflow_provider_kontext.compat import hook_field_behaviour

        return hook_field_behaviour(ui_field_behaviour())

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Return the extra fields of the connection form on Airflow 3.1 (3.2+ read ``conn-fields``)."""
        from airflow_provider_kontext.compat import connection_form_widgets
        from airflow_provider_kontext.hooks.connection import conn_fields

        return connection_form_widgets(conn_fields())

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
        deadline: float | None = None,
    ) -> Prediction:
        """Start a prediction of ``model`` (``owner/name`` or ``owner/name:version``).

        ``input`` is sent as given: validate it first with
        :func:`airflow_provider_kontext.models.validate_input`.

        :param wait: hold the request open up to this many seconds (1..60) for the result.
        :param cancel_after: seconds after which Replicate cancels (or aborts) the prediction.
        :param deadline: Unix time until which a throttled create (429: nothing created) is sent
            again, with jitter; without one, for ``max_retries`` x ``retry_after_max`` seconds
            (:func:`~airflow_provider_kontext.hooks.retry.create_throttle_bound`).
        :raises FluxKontextPredictionMayExistError: the request failed after it may have reached the server.
        :raises FluxKontextRateLimitError: still throttled when that time was up (safe to retry).
        """
        request = create_prediction_request(
            model,
            dict(input),
            wait=wait,
            cancel_after=cancel_after,
            webhook=webhook,
            webhook_events_filter=webhook_events_filter,
        )
        return parsed_created(request, self._request(request, RetryLimits(deadline=deadline)))

    def get_prediction(self, prediction_id: str, *, retry_limits: RetryLimits | None = None) -> Prediction:
        """Return the prediction's current state.

        :param retry_limits: how long to keep trying, where not the connection's settings (polls pass
            theirs: one retry layer, tolerant of unreadable answers, never past their deadline).
        :raises FluxKontextDeadlineError: the retry limits' deadline came before an answer.
        """
        request = get_prediction_request(prediction_id)
        prediction: Prediction = self._request(request, retry_limits, parsed_prediction)
        return prediction

    def cancel_prediction(self, prediction_id: str) -> Prediction:
        """Ask Replicate to cancel the prediction; returns its state after the request."""
        return parsed_as(Prediction, self._request(cancel_prediction_request(prediction_id)))

    def list_predictions(
        self,
        *,
        created_after: str | None = None,
        created_before: str | None = None,
        cursor: str | None = None,
    ) -> PredictionPage:
        """Return one page of the account's predictions (``GET /v1/predictions``).

        Newest first, up to 100, without their logs. Retried as any read.

        :param created_after: ISO 8601 date-time: only predictions created at or after it.
        :param created_before: ISO 8601 date-time: only predictions created before it.
        :param cursor: the cursor of the previous page's ``next`` (:attr:`PredictionPage.next_cursor`).
        :raises FluxKontextAPIError: an error answer, or a body that is not a page of predictions.
        """
        request = list_predictions_request(
            created_after=created_after, created_before=created_before, cursor=cursor
        )
        page: PredictionPage = self._request(request, None, parsed_page)
        return page

    def get_file(self, file_id: str) -> UploadedFile:
        """Return a file's metadata (``GET /v1/files/{id}``): its name, size, checksums and URLs.

        :raises FluxKontextNotFoundError: no such file (or it expired).
        """
        return parsed_as(UploadedFile, self._request(get_file_request(file_id)))

    def get_account(self) -> Account:
        """Return the account the token belongs to (``GET /v1/account``, free and side-effect free)."""
        return parsed_as(Account, self._request(account_request()))

    def uploaded_file_id(self, url: str | None) -> str | None:
        """Return the Files API id ``url`` names when it is one of this connection's files, else ``None``.

        See :func:`~airflow_provider_kontext.hooks.api.file_id_of` for what counts as one.
        """
        return file_id_of(url, self.settings.base_url)

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
        return parsed_as(UploadedFile, self._request(upload_file_request(data, name, content_type)))

    def download(self, url: str, dest: IO[bytes], *, max_bytes: int) -> str:
        """Stream an output file into ``dest``; return its content type.

        Only http(s) URLs are fetched. The token is sent only to the API's own origin (output files
        on other hosts, like ``replicate.delivery``, never see it). Transient failures are retried
        like any read; a retry starts the file over, so ``dest`` must be seekable.

        :raises FluxKontextAPIError: an error status, a non-http(s) URL, or a body over ``max_bytes``.
        """
        request = download_request(self.settings, url)

        def attempt_once(settings: ClientSettings, number: int) -> str:
            self._log_attempt(request, number)
            current = download_request(settings, url)  # the token after a refresh, if any
            return stream_with_requests(self.get_conn(), settings, current, url, dest, max_bytes)

        attempts = self._attempts(self.settings, request, None)
        return attempts.run_sync(attempt_once, self._refreshed_settings, self._sleep)

    def test_connection(self) -> tuple[bool, str]:
        """Call ``GET /v1/account`` and say whose account the token opens, or why it failed."""
        try:
            account = self.get_account()
        except Exception as exc:  # the UI shows whatever went wrong, a missing connection included
            return False, f"{type(exc).__name__}: {exc}" if not isinstance(exc, FluxKontextError) else str(
                exc
            )
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
        deadline: float | None = None,
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
        return parsed_created(request, await self._arequest(request, RetryLimits(deadline=deadline)))

    async def aget_prediction(
        self, prediction_id: str, *, retry_limits: RetryLimits | None = None
    ) -> Prediction:
        """Async twin of :meth:`get_prediction`."""
        request = get_prediction_request(prediction_id)
        prediction: Prediction = await self._arequest(request, retry_limits, parsed_prediction)
        return prediction

    async def alist_predictions(
        self,
        *,
        created_after: str | None = None,
        created_before: str | None = None,
        cursor: str | None = None,
        retry_limits: RetryLimits | None = None,
    ) -> PredictionPage:
        """Return one page of the account's predictions (``GET /v1/predictions``).

        Newest first, up to 100, without their logs (the list leaves them out).

        :param created_after: ISO 8601 date-time: only predictions created at or after it.
        :param created_before: ISO 8601 date-time: only predictions created before it.
        :param cursor: the cursor of the previous page's ``next`` (:attr:`PredictionPage.next_cursor`).
        :raises FluxKontextAPIError: an error answer, or a body that is not a page of predictions.
        """
        request = list_predictions_request(
            created_after=created_after, created_before=created_before, cursor=cursor
        )
        page: PredictionPage = await self._arequest(request, retry_limits, parsed_page)
        return page

    async def acancel_prediction(self, prediction_id: str) -> Prediction:
        """Async twin of :meth:`cancel_prediction`."""
        return parsed_as(Prediction, await self._arequest(cancel_prediction_request(prediction_id)))

    async def aget_account(self) -> Account:
        """Async twin of :meth:`get_account`."""
        return parsed_as(Account, await self._arequest(account_request()))

    async def aupload_file(
        self, content: bytes | IO[bytes] | str | Path, *, filename: str | None = None, content_type: str
    ) -> UploadedFile:
        """Async twin of :meth:`upload_file` (a path or file object is read in a thread)."""
        data, name = await asyncio.to_thread(read_source, content, filename)
        return parsed_as(UploadedFile, await self._arequest(upload_file_request(data, name, content_type)))
