"""Fault injection for the emulator: the misbehaviour a client of Replicate must survive.

One :class:`Faults` object per emulator holds the armed faults. Tests arm them from Python
(``emu.faults.throttle(2)``) or, for an emulator in another process, over HTTP with the same names
and keyword arguments (``POST {base}/_emulator/faults`` with ``{"fault": "throttle", "count": 2}``).

Request faults match a method (``None`` = any) and a path glob below the base URL
(:func:`fnmatch.fnmatchcase`, ``*`` also matches ``/``). :data:`CREATE`, :data:`PREDICTION` and
:data:`ANY` are the usual patterns. Each fires on the next ``count`` matching requests, or on a share
``probability`` of them drawn from a seeded RNG (unlimited unless ``count`` is also given).
Prediction faults decide how the next predictions created end.
"""

from __future__ import annotations

import enum
import fnmatch
import random
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

#: Path glob of both create endpoints (``/v1/models/{owner}/{name}/predictions``, ``/v1/predictions``).
CREATE = "/v1/*predictions"
#: Path glob of one prediction's endpoints (get and cancel).
PREDICTION = "/v1/predictions/*"
#: Every path.
ANY = "*"

#: The body Replicate answers a throttled request with; ``{seconds}`` is filled in.
THROTTLE_DETAIL = "Request was throttled. Expected available in {seconds} second{plural}."
#: The error of a prediction whose output tripped the safety checker.
NSFW_ERROR = "NSFW content detected. Try running it again, or try a different prompt."
#: The error of a prediction told to fail without a message of its own.
GENERIC_ERROR = "Prediction failed: the Kontext emulator was told to fail it (fault injection)."

FaultKind = Literal["status", "drop", "delay"]


class Outcome(str, enum.Enum):
    """How a prediction told to misbehave ends."""

    FAILED = "failed"
    CANCELED = "canceled"
    ABORTED = "aborted"


@dataclass
class RequestFault:
    """One armed request fault; ``remaining`` is ``None`` for "until cleared"."""

    kind: FaultKind
    method: str | None
    path: str
    remaining: int | None
    probability: float | None = None
    status: int | None = None
    retry_after: float | None = None
    available_in: float = 1.0
    detail: str | None = None
    html: bool = False
    after_processing: bool = False
    seconds: float = 0.0
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        """Return whether a request with ``method`` and ``path`` (below the base URL) is a target."""
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return fnmatch.fnmatchcase(path, self.path)

    def throttle_detail(self) -> str:
        """Return Replicate's 429 text for this fault's ``available_in``."""
        seconds = f"{self.available_in:g}"
        return THROTTLE_DETAIL.format(seconds=seconds, plural="" if seconds == "1" else "s")


@dataclass
class PredictionFault:
    """How the next ``remaining`` created predictions end."""

    outcome: Outcome
    remaining: int
    error: str | None = None


@dataclass(frozen=True)
class FaultDecision:
    """What the server does to one request: wait, then answer it, drop it, or serve it normally."""

    delay_before: float = 0.0
    delay_after: float = 0.0
    respond: RequestFault | None = None
    drop: RequestFault | None = None


@dataclass
class _Armed:
    requests: list[RequestFault] = field(default_factory=list)
    predictions: list[PredictionFault] = field(default_factory=list)
    images_api_shape: int | None = 0  # None: every create until cleared


#: The fault calls accepted over HTTP, by name.
HTTP_FAULTS = frozenset(
    {
        "throttle",
        "server_error",
        "drop_connection",
        "slow",
        "fail_predictions",
        "cancel_predictions",
        "abort_predictions",
        "images_api_shape",
        "seed",
        "clear",
    }
)


def _budget(count: int | None, probability: float | None) -> int | None:
    if probability is not None and not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be between 0 and 1, got {probability}")
    if count is None:
        return None if probability is not None else 1
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    return count


class Faults:
    """The faults armed on one emulator. Thread-safe: tests arm them while the server runs.

    :param seed: seed of the RNG behind ``probability`` faults.
    """

    def __init__(self, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._armed = _Armed()
        self._rng = random.Random(seed)

    # --- request faults ---------------------------------------------------------------------

    def throttle(
        self,
        count: int | None = None,
        *,
        probability: float | None = None,
        method: str | None = None,
        path: str = ANY,
        retry_after: float | None = None,
        available_in: float = 1.0,
    ) -> RequestFault:
        """Answer matching requests 429, as Replicate throttles.

        The body is Replicate's ``{"detail": "Request was throttled. Expected available in 1
        second."}`` (``available_in`` seconds), with a ``Retry-After`` header only when
        ``retry_after`` is given.
        """
        return self._add(
            RequestFault(
                "status",
                method,
                path,
                _budget(count, probability),
                probability,
                status=429,
                retry_after=retry_after,
                available_in=available_in,
            )
        )

    def server_error(
        self,
        count: int | None = None,
        *,
        status: int = 500,
        probability: float | None = None,
        method: str | None = None,
        path: str = ANY,
        detail: str | None = None,
        html: bool = False,
        retry_after: float | None = None,
    ) -> RequestFault:
        """Answer matching requests ``status`` (500..599) without processing them.

        The answer is a problem document, or a proxy's HTML error page when ``html`` is true;
        nothing is created.
        """
        if not 500 <= status <= 599:
            raise ValueError(f"status must be a 5xx code, got {status}")
        return self._add(
            RequestFault(
                "status",
                method,
                path,
                _budget(count, probability),
                probability,
                status=status,
                detail=detail,
                html=html,
                retry_after=retry_after,
            )
        )

    def drop_connection(
        self,
        count: int | None = None,
        *,
        probability: float | None = None,
        method: str | None = None,
        path: str = ANY,
        after_processing: bool = False,
    ) -> RequestFault:
        """Reset the connection of matching requests without any response.

        With ``after_processing`` the request is handled first (a create really creates its
        prediction) and only the response is lost.
        """
        return self._add(
            RequestFault(
                "drop",
                method,
                path,
                _budget(count, probability),
                probability,
                after_processing=after_processing,
            )
        )

    def slow(
        self,
        seconds: float,
        count: int | None = None,
        *,
        probability: float | None = None,
        method: str | None = None,
        path: str = ANY,
        after_processing: bool = False,
    ) -> RequestFault:
        """Sleep ``seconds`` before handling matching requests.

        With ``after_processing`` the sleep comes after handling and before sending the response:
        a client that times out has still created the work.
        """
        if seconds < 0:
            raise ValueError(f"seconds must not be negative, got {seconds}")
        return self._add(
            RequestFault(
                "delay",
                method,
                path,
                _budget(count, probability),
                probability,
                seconds=seconds,
                after_processing=after_processing,
            )
        )

    # --- prediction faults ------------------------------------------------------------------

    def fail_predictions(self, count: int = 1, *, nsfw: bool = False, error: str | None = None) -> None:
        """Make the next ``count`` predictions end ``failed`` after running.

        The error is the NSFW message when ``nsfw`` is true, else ``error`` (or a generic message).
        """
        message = NSFW_ERROR if nsfw else (error or GENERIC_ERROR)
        self._add_outcome(Outcome.FAILED, count, message)

    def cancel_predictions(self, count: int = 1) -> None:
        """Make the next ``count`` predictions end ``canceled`` halfway through processing."""
        self._add_outcome(Outcome.CANCELED, count, None)

    def abort_predictions(self, count: int = 1) -> None:
        """Make the next ``count`` predictions end ``aborted`` when they would have started."""
        self._add_outcome(Outcome.ABORTED, count, None)

    def images_api_shape(self, count: int | None = None, *, enabled: bool = True) -> None:
        """Answer creates like the seed's proxy: ``{"created": <unix>, "data": [{"url": ...}]}``.

        The answer is already complete (the edit is done before answering). ``count=None`` means
        every create until cleared; ``enabled=False`` turns it off.
        """
        if count is not None and count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        with self._lock:
            self._armed.images_api_shape = count if enabled else 0

    # --- control ----------------------------------------------------------------------------

    def seed(self, seed: int) -> None:
        """Reseed the RNG that decides ``probability`` faults."""
        with self._lock:
            self._rng.seed(seed)

    def clear(self) -> None:
        """Disarm every fault."""
        with self._lock:
            self._armed = _Armed()

    def apply(self, spec: Mapping[str, Any]) -> None:
        """Arm the fault ``spec`` describes: ``{"fault": <method name>, <keyword arguments>...}``.

        Names and arguments are those of the Python methods (``throttle``, ``server_error``,
        ``drop_connection``, ``slow``, ``fail_predictions``, ``cancel_predictions``,
        ``abort_predictions``, ``images_api_shape``, ``seed``, ``clear``).

        :raises ValueError: unknown fault or arguments.
        """
        arguments = dict(spec)
        name = arguments.pop("fault", None)
        if name not in HTTP_FAULTS:
            raise ValueError(f"unknown fault {name!r}; known: {', '.join(sorted(HTTP_FAULTS))}")
        try:
            getattr(self, name)(**arguments)
        except TypeError as exc:
            raise ValueError(f"bad arguments for fault {name!r}: {exc}") from None

    def describe(self) -> dict[str, Any]:
        """Return the armed faults as JSON-ready data."""
        with self._lock:
            return {
                "requests": [asdict(fault) for fault in self._armed.requests],
                "predictions": [
                    {"outcome": f.outcome.value, "remaining": f.remaining, "error": f.error}
                    for f in self._armed.predictions
                ],
                "images_api_shape": self._armed.images_api_shape,
            }

    # --- used by the server -----------------------------------------------------------------

    def decide(self, method: str, path: str) -> FaultDecision:
        """Fire the faults matching this request and say what to do with it.

        Delays add up; the first answering or dropping fault wins and later ones are not consumed.
        """
        delay_before = delay_after = 0.0
        chosen: RequestFault | None = None
        with self._lock:
            for fault in self._armed.requests:
                if fault.remaining == 0 or not fault.matches(method, path):
                    continue
                if fault.kind != "delay" and chosen is not None:
                    continue
                if fault.probability is not None and self._rng.random() >= fault.probability:
                    continue
                fault.fired += 1
                if fault.remaining is not None:
                    fault.remaining -= 1
                if fault.kind == "delay":
                    if fault.after_processing:
                        delay_after += fault.seconds
                    else:
                        delay_before += fault.seconds
                else:
                    chosen = fault
            self._armed.requests = [f for f in self._armed.requests if f.remaining != 0]
        if chosen is None:
            return FaultDecision(delay_before, delay_after)
        if chosen.kind == "drop":
            return FaultDecision(delay_before, delay_after, drop=chosen)
        return FaultDecision(delay_before, delay_after, respond=chosen)

    def next_outcome(self) -> PredictionFault | None:
        """Take the forced outcome of the prediction being created, if one is armed."""
        with self._lock:
            if not self._armed.predictions:
                return None
            head = self._armed.predictions[0]
            head.remaining -= 1
            if head.remaining <= 0:
                self._armed.predictions.pop(0)
            return PredictionFault(head.outcome, 1, head.error)

    def take_images_api_shape(self) -> bool:
        """Return whether the create being answered uses the images-API shape (consumes one use)."""
        with self._lock:
            remaining = self._armed.images_api_shape
            if remaining is None:
                return True
            if remaining > 0:
                self._armed.images_api_shape = remaining - 1
                return True
            return False

    def _add(self, fault: RequestFault) -> RequestFault:
        with self._lock:
            self._armed.requests.append(fault)
        return fault

    def _add_outcome(self, outcome: Outcome, count: int, error: str | None) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        with self._lock:
            self._armed.predictions.append(PredictionFault(outcome, count, error))
