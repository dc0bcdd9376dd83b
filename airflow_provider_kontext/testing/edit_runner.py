"""Run a prediction's image edit in the background, with its ``input_image`` loaded offline.

The edit starts (once) when a poll first sees the prediction processing, runs in a worker thread
(Pillow) and stores its image or its error on the record; a poll waits for it only when the
prediction is due to end, so polls during processing answer at once. The input is a data: URI,
one of the emulator's own files or outputs (read from memory), or an http(s)://127.0.0.1 URL:
nothing else is fetched, and the prediction fails with a message saying so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import SplitResult, urlsplit

from airflow_provider_kontext.models import input_model_for
from airflow_provider_kontext.testing.imaging import ImageError, decode_data_uri, edit_image
from airflow_provider_kontext.testing.lifecycle import Clock, PredictionRecord

#: Largest input image fetched from an http://127.0.0.1 URL.
MAX_FETCH_BYTES = 100 * 1024 * 1024


class EditRunner:
    """The starter of predictions' edits, each run once in a worker thread.

    :param clock: the emulator's clock.
    :param output_scale: factor on the output size.
    :param own_url: the bytes behind one of the emulator's own URLs, ``None`` for other URLs
        (raises :class:`~airflow_provider_kontext.testing.imaging.ImageError` for a missing file).
    """

    def __init__(
        self, clock: Clock, output_scale: float, own_url: Callable[[SplitResult], bytes | None]
    ) -> None:
        self._clock = clock
        self._output_scale = output_scale
        self._own_url = own_url

    async def ensure(self, record: PredictionRecord) -> None:
        """Start the edit once processing has started; await it only when the prediction is due to end."""
        elapsed = record.elapsed(self._clock.monotonic())
        if not record.needs_edit(elapsed):
            return
        if record.edit_task is None:
            record.edit_task = asyncio.ensure_future(self._run(record))
        due = record.timing.start_seconds + record.timing.prediction_seconds
        if elapsed >= due and not record.is_terminal(elapsed):
            await asyncio.shield(record.edit_task)

    async def _run(self, record: PredictionRecord) -> None:
        """Edit the input image into the record's output, or record why it could not."""
        options = input_model_for(record.model).model_validate(record.input)
        image_ref = getattr(options, "input_image", None)
        try:
            source = await self._load_image(image_ref) if image_ref else None
            record.edit = await asyncio.to_thread(
                edit_image,
                source,
                prompt=record.prompt,
                seed=record.seed,
                aspect_ratio=str(getattr(options, "aspect_ratio", "match_input_image")),
                output_format=str(getattr(options, "output_format", "webp")),
                output_quality=int(getattr(options, "output_quality", 95)),
                scale=self._output_scale,
            )
        except ImageError as exc:
            record.edit_error = str(exc)
        except Exception as exc:  # the prediction must end rather than hang on an emulator bug
            record.edit_error = f"The emulator could not run the edit: {type(exc).__name__}: {exc}"
        finally:
            record.edit_done_at = record.elapsed(self._clock.monotonic())

    async def _load_image(self, reference: str) -> bytes:
        """Return the bytes ``input_image`` refers to.

        :raises ImageError: for a URL the offline emulator does not fetch, or one that fails.
        """
        if reference.startswith("data:"):
            return decode_data_uri(reference)
        parts = urlsplit(reference)
        local = self._own_url(parts)
        if local is not None:
            return local
        if parts.scheme not in ("http", "https") or parts.hostname != "127.0.0.1":
            where = parts.hostname or reference[:40]
            raise ImageError(
                f"The Kontext emulator is offline and does not download from {where!r}: "
                "pass input_image as a data: URI, a file uploaded to the emulator (POST /v1/files), "
                "or an http://127.0.0.1 URL"
            )
        return await _fetch_local(reference)


async def _fetch_local(url: str) -> bytes:
    """GET an http(s)://127.0.0.1 URL directly (no proxy from the environment, no redirects).

    :raises ImageError: for an answer other than 200, a body over :data:`MAX_FETCH_BYTES` or a
        connection error.
    """
    import httpx

    chunks: list[bytes] = []
    size = 0
    try:
        async with (
            httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=10.0) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise ImageError(f"input_image could not be downloaded: HTTP {response.status_code}")
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_FETCH_BYTES:
                    raise ImageError(f"input_image is larger than {MAX_FETCH_BYTES} bytes")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise ImageError(f"input_image could not be downloaded: {type(exc).__name__}: {exc}") from None
    return b"".join(chunks)
