"""A prediction's life, computed from the time since it was created (no task runs per prediction).

``starting`` lasts ``start_seconds``, ``processing`` lasts ``prediction_seconds`` (its logs grow
with progress lines the way the model's tqdm bar prints them), then the prediction ends
``succeeded`` with its output. What can end it earlier is known in advance, as a time: a
``Cancel-After`` deadline, a cancel request, a forced outcome, or a bad input image (found when
processing starts). The earliest of those wins, so every poll sees one consistent history.
"""

from __future__ import annotations

import base64
import random
import secrets
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from airflow_provider_kontext.models import Prediction, PredictionMetrics, PredictionStatus, PredictionUrls
from airflow_provider_kontext.testing.faults import Outcome, PredictionFault

if TYPE_CHECKING:
    import asyncio

    from airflow_provider_kontext.testing.imaging import EditedImage

#: How long after processing starts a prediction with an unusable input image fails (at the
#: earliest: the edit is tried in the background when processing starts, and it fails when the
#: edit has found out, but never later than the prediction would have ended).
INPUT_ERROR_SECONDS = 0.05

_BAR_WIDTH = 10
_PARTIAL_BLOCKS = " ▏▎▍▌▋▊▉"


def new_id() -> str:
    """Return a random, URL-safe prediction or file id in Replicate's style (26 lower-case base32 chars)."""
    return base64.b32encode(secrets.token_bytes(16)).decode("ascii").rstrip("=").lower()


class Clock:
    """The emulator's clock: the real clocks plus an offset a test can move forward.

    :meth:`advance` makes every prediction, deadline, retention period and rate-limit window see
    that much more time pass at once, so a test of a 5 s ``Cancel-After`` or of an hour's
    retention does not have to sleep through it. :meth:`freeze` stops it (only :meth:`advance`
    moves it then), for tests that count exactly, like rate-limit windows; while frozen, nothing
    that waits for time (``Prefer: wait``, streams, webhooks) gets anywhere by itself.
    """

    def __init__(self) -> None:
        self._mono_offset = 0.0
        self._wall_offset = 0.0
        self._frozen: tuple[float, float] | None = None

    def monotonic(self) -> float:
        """Return the emulator's monotonic time in seconds."""
        frozen = self._frozen
        return (frozen[0] if frozen else time.monotonic()) + self._mono_offset

    def wall(self) -> float:
        """Return the seconds since the epoch (what ``created_at`` and other timestamps are made from)."""
        frozen = self._frozen
        return (frozen[1] if frozen else time.time()) + self._wall_offset

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward.

        :raises ValueError: for negative ``seconds``.
        """
        if seconds < 0:
            raise ValueError(f"the clock only moves forward, got {seconds}")
        self._mono_offset += seconds
        self._wall_offset += seconds

    def freeze(self) -> None:
        """Stop the clock where it is."""
        if self._frozen is None:
            self._frozen = (time.monotonic(), time.time())

    def unfreeze(self) -> None:
        """Let the clock run again from where it stands."""
        frozen, self._frozen = self._frozen, None
        if frozen is not None:
            self._mono_offset += frozen[0] - time.monotonic()
            self._wall_offset += frozen[1] - time.time()


@dataclass(frozen=True)
class Timing:
    """How long each phase of a prediction lasts, and how long its data is kept after it ends.

    ``start_seconds`` and ``prediction_seconds`` are the means; with ``spread`` > 0 each
    prediction draws its own durations uniformly within ``mean * (1 ± spread)`` (see :meth:`draw`).
    """

    start_seconds: float = 0.3
    prediction_seconds: float = 3.0
    retention_seconds: float = 3600.0
    spread: float = 0.0

    def draw(self, rng: random.Random) -> Timing:
        """Return the fixed timing of one prediction, drawn from ``rng`` (the same seed, the same times)."""
        if self.spread <= 0:
            return self
        low, high = 1.0 - self.spread, 1.0 + self.spread
        return replace(
            self,
            start_seconds=self.start_seconds * rng.uniform(low, high),
            prediction_seconds=self.prediction_seconds * rng.uniform(low, high),
            spread=0.0,
        )


#: Durations like flux-kontext-dev's on Replicate when warm: 0.3-0.9 s ``starting``, 2-6 s running.
REALISTIC_TIMING = Timing(start_seconds=0.6, prediction_seconds=4.0, spread=0.5)


@dataclass(frozen=True)
class Ending:
    """When (seconds after creation) and how a prediction ends."""

    at: float
    status: PredictionStatus
    error: str | None = None


@dataclass(frozen=True)
class Snapshot:
    """A prediction as seen at one moment; times are seconds after creation."""

    status: PredictionStatus
    started: float | None
    completed: float | None
    error: str | None
    logs: str
    data_removed: bool

    @property
    def is_terminal(self) -> bool:
        """Whether the prediction has ended."""
        return self.status.is_terminal


@dataclass
class PredictionRecord:
    """Everything the emulator knows about one prediction. Its status is derived, never stored."""

    id: str
    model: str
    version: str
    input: dict[str, Any]
    base_url: str
    created_wall: float
    created_mono: float
    timing: Timing
    seed: int
    steps: int
    prompt: str
    cancel_after: float | None = None
    forced: PredictionFault | None = None
    webhook: str | None = None
    webhook_events: frozenset[str] = frozenset()
    canceled_at: float | None = None
    edit: EditedImage | None = None
    edit_error: str | None = None
    edit_done_at: float | None = None
    purged: bool = False
    edit_task: asyncio.Task[None] | None = field(default=None, repr=False, compare=False)

    # --- the timeline -----------------------------------------------------------------------

    def known_ending(self) -> Ending | None:
        """Return the earliest ending known now, ``None`` if none is.

        A natural ending (success, or failure on a bad input) is known only once the edit has been
        tried, which the server starts when processing starts and waits for when the prediction is
        due to end.
        """
        start = self.timing.start_seconds
        end = start + self.timing.prediction_seconds
        candidates: list[Ending] = []
        if self.cancel_after is not None:
            status = PredictionStatus.ABORTED if self.cancel_after < start else PredictionStatus.CANCELED
            candidates.append(Ending(self.cancel_after, status))
        if self.canceled_at is not None:
            candidates.append(Ending(self.canceled_at, PredictionStatus.CANCELED))
        if self.forced is not None:
            if self.forced.outcome is Outcome.ABORTED:
                candidates.append(Ending(start, PredictionStatus.ABORTED))
            elif self.forced.outcome is Outcome.CANCELED:
                candidates.append(
                    Ending(start + self.timing.prediction_seconds / 2, PredictionStatus.CANCELED)
                )
            else:
                candidates.append(Ending(end, PredictionStatus.FAILED, self.forced.error))
        elif self.edit_error is not None:
            found = max(start + INPUT_ERROR_SECONDS, self.edit_done_at or 0.0)
            candidates.append(Ending(min(found, end), PredictionStatus.FAILED, self.edit_error))
        elif self.edit is not None:
            candidates.append(Ending(end, PredictionStatus.SUCCEEDED))
        return min(candidates, key=lambda ending: ending.at, default=None)

    def needs_edit(self, elapsed: float) -> bool:
        """Return whether the edit must be tried before this prediction can be shown at ``elapsed``."""
        if self.forced is not None or self.edit is not None or self.edit_error is not None:
            return False
        start = self.timing.start_seconds
        ending = self.known_ending()
        return elapsed >= start and (ending is None or ending.at > start)

    def is_terminal(self, elapsed: float) -> bool:
        """Return whether the prediction has ended ``elapsed`` seconds after creation, as far as known."""
        ending = self.known_ending()
        return ending is not None and ending.at <= elapsed

    def snapshot(self, elapsed: float) -> Snapshot:
        """Return the prediction ``elapsed`` seconds after creation.

        It shows ``processing`` while an edit that is due has not been tried yet.
        """
        start = self.timing.start_seconds
        ending = self.known_ending()
        if ending is not None and ending.at <= elapsed:
            ran = ending.at >= start and ending.status is not PredictionStatus.ABORTED
            started = start if ran else None
            removed = elapsed >= ending.at + self.timing.retention_seconds
            logs = self._logs(ending.at - start, ending.status) if ran else ""
            return Snapshot(ending.status, started, ending.at, ending.error, logs, removed)
        if elapsed < start:
            return Snapshot(PredictionStatus.STARTING, None, None, None, "", False)
        logs = self._logs(elapsed - start, PredictionStatus.PROCESSING)
        return Snapshot(PredictionStatus.PROCESSING, start, None, None, logs, False)

    def elapsed(self, now_mono: float) -> float:
        """Return the seconds since creation at monotonic time ``now_mono``."""
        return now_mono - self.created_mono

    # --- presentation -----------------------------------------------------------------------

    @property
    def urls(self) -> dict[str, str]:
        """The prediction's ``urls``: get, cancel, web page and stream."""
        base = f"{self.base_url}/v1/predictions/{self.id}"
        return {
            "get": base,
            "cancel": f"{base}/cancel",
            "web": f"{self.base_url}/p/{self.id}",
            "stream": f"{base}/stream",
        }

    @property
    def output_url(self) -> str | None:
        """Where the output file is served, once the edit is done."""
        if self.edit is None:
            return None
        return f"{self.base_url}/files/{self.id}/output.{self.edit.extension}"

    def to_prediction(self, elapsed: float) -> Prediction:
        """Return the prediction object the API returns ``elapsed`` seconds after creation."""
        snap = self.snapshot(elapsed)
        created = datetime.fromtimestamp(self.created_wall, timezone.utc)

        def at(offset: float | None) -> datetime | None:
            return None if offset is None else created + timedelta(seconds=offset)

        metrics: dict[str, float] = {}
        if snap.completed is not None:
            metrics["total_time"] = round(snap.completed, 6)
            if snap.started is not None:
                metrics["predict_time"] = round(snap.completed - snap.started, 6)
        succeeded = snap.status is PredictionStatus.SUCCEEDED
        extra: dict[str, Any] = {"source": "api"}
        if self.cancel_after is not None:
            extra["deadline"] = _iso(created + timedelta(seconds=self.cancel_after))
        return Prediction(
            id=self.id,
            model=self.model,
            version=self.version,
            input={} if snap.data_removed else self.input,
            output=self.output_url if succeeded and not snap.data_removed else None,
            logs="" if snap.data_removed else snap.logs,
            error=snap.error,
            status=snap.status,
            created_at=created,
            started_at=at(snap.started),
            completed_at=at(snap.completed),
            data_removed=snap.data_removed,
            urls=PredictionUrls(**self.urls),
            metrics=PredictionMetrics(**metrics),
            **extra,
        )

    def to_json(self, elapsed: float, *, logs: bool = True) -> dict[str, Any]:
        """Return the JSON the API answers ``elapsed`` seconds after creation.

        It is shaped as Replicate's OpenAPI description says: times that are not known yet are
        left out (they are not nullable there), and so are URLs that do not exist. ``logs=False``
        leaves the logs out, as the list endpoint does.
        """
        return _json_shape(self.to_prediction(elapsed).model_dump(mode="json"), logs=logs)

    def _logs(self, running: float, status: PredictionStatus) -> str:
        """Return the logs after ``running`` seconds of processing.

        They are the seed, then one progress line per finished step, all of them once the
        prediction has succeeded or failed after running.
        """
        seconds_per_step = self.timing.prediction_seconds / self.steps
        if (
            seconds_per_step <= 0
            or status is PredictionStatus.SUCCEEDED
            or (status is PredictionStatus.FAILED and self.forced is not None)
        ):
            done = self.steps
        else:
            done = min(self.steps, int(max(0.0, running) / seconds_per_step + 1e-9))
        lines = [f"Using seed: {self.seed}"]
        lines.extend(progress_line(step, self.steps, seconds_per_step) for step in range(done + 1))
        return "\n".join(lines) + "\n"


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _json_shape(body: dict[str, Any], *, logs: bool) -> dict[str, Any]:
    for key in ("started_at", "completed_at", "deadline"):
        if body.get(key) is None:
            body.pop(key, None)
    body["urls"] = {k: v for k, v in (body.get("urls") or {}).items() if v is not None}
    body["metrics"] = {k: v for k, v in (body.get("metrics") or {}).items() if v is not None}
    if not logs:
        body.pop("logs", None)
    return body


def starting_json(body: dict[str, Any]) -> dict[str, Any]:
    """Return ``body`` as Replicate answers a ``Prefer: wait`` create whose wait ran out.

    The answer is in the ``starting`` state, whatever the prediction is really doing (the official
    clients keep waiting only on ``starting``).
    """
    body = {**body, "status": "starting", "logs": "", "output": None, "error": None}
    body.pop("started_at", None)
    body.pop("completed_at", None)
    body["metrics"] = {}
    return body


def progress_line(step: int, steps: int, seconds_per_step: float) -> str:
    """Return one tqdm progress line, e.g. ``  4%|▎         | 1/28 [00:00<00:02, 11.20it/s]``."""
    fraction = step / steps
    filled = fraction * _BAR_WIDTH
    full = int(filled)
    bar = "█" * full
    if full < _BAR_WIDTH:
        bar += _PARTIAL_BLOCKS[int((filled - full) * len(_PARTIAL_BLOCKS))]
    bar = bar.ljust(_BAR_WIDTH)
    if step == 0:
        return f"  0%|{bar}| 0/{steps} [00:00<?, ?it/s]"
    elapsed = _clock(step * seconds_per_step)
    remaining = _clock((steps - step) * seconds_per_step)
    if seconds_per_step <= 1:
        rate = f"{1 / max(seconds_per_step, 1e-6):.2f}it/s"
    else:
        rate = f"{seconds_per_step:.2f}s/it"
    return f"{int(fraction * 100):3d}%|{bar}| {step}/{steps} [{elapsed}<{remaining}, {rate}]"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"
