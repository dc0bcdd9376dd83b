"""Give a trigger its prediction's next state: the :class:`PredictionSource` interface and its solo form.

The trigger's loop makes one call per look, ``await source.next(delay, retry_limits)``: *when* to
look is its :class:`~airflow_provider_kontext.edits.progress.PredictionPoller`'s decision, *how* is
the source's. A :class:`SoloSource` sleeps and reads ``GET /v1/predictions/{id}`` itself; it serves a
trigger that has no shared watcher (``list_min_waits`` 0, or a connection whose settings cannot be
read: its reads then report why). A :class:`~airflow_provider_kontext.triggers.watch.SharedSource`
lets the account's shared watcher answer from the list, and uses a :class:`SoloSource` for the looks
the list cannot answer.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook
    from airflow_provider_kontext.hooks.retry import RetryLimits
    from airflow_provider_kontext.models import Prediction

__all__ = ["PredictionSource", "SoloSource"]


class PredictionSource(Protocol):
    """Where a trigger gets its prediction's state, one look at a time."""

    async def next(self, delay: float, retry_limits: RetryLimits) -> Prediction:
        """Return the prediction as it is ``delay`` seconds from now (sooner if it is seen ending).

        :param retry_limits: the look's retry limits for a read of its own (retries, deadline).
        :raises FluxKontextError: a read failed for good (as
            :meth:`~airflow_provider_kontext.hooks.kontext.FluxKontextHook.aget_prediction`).
        """
        ...

    async def close(self) -> None:
        """Release what the source holds (the trigger closes its hook itself)."""
        ...


class SoloSource:
    """Read one prediction on its own, after the delay the trigger asks for.

    :param hook: the trigger's hook (it stays the trigger's to close).
    :param prediction_id: the prediction to read.
    """

    def __init__(self, hook: FluxKontextHook, prediction_id: str) -> None:
        self.hook = hook
        self.prediction_id = prediction_id

    async def wait(self, delay: float) -> None:
        """Sleep ``delay`` seconds (not at all where it is 0 or less)."""
        if delay > 0:
            await asyncio.sleep(delay)

    async def read(self, retry_limits: RetryLimits) -> Prediction:
        """Return the prediction read now, in full (with its logs).

        :raises FluxKontextError: the read failed for good, after the hook's retries.
        """
        return await self.hook.aget_prediction(self.prediction_id, retry_limits=retry_limits)

    async def next(self, delay: float, retry_limits: RetryLimits) -> Prediction:
        """Return the prediction read ``delay`` seconds from now (see :meth:`PredictionSource.next`)."""
        await self.wait(delay)
        return await self.read(retry_limits)

    async def close(self) -> None:
        """Do nothing: a solo source holds nothing of its own."""
