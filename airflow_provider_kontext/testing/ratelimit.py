"""Replicate's rate limits, enforced by the emulator when asked (it is unlimited by default).

Replicate limits each account: 600 creates per minute, 3000 requests per minute to every other
endpoint, with short bursts above that; accounts low on credit get 1 request per second and at most
6 per minute. A throttled request is answered ``429`` with the body
``{"detail": "Request was throttled. Your rate limit resets in ~Ns."}`` and no ``Retry-After``.

Each limit is a token bucket: it holds up to ``burst`` requests and refills at ``per_minute / 60``
per second. A request must find a token in every bucket of its class (creates or the rest).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

#: What Replicate answers a throttled request with; ``{seconds}`` is filled in.
RESETS_DETAIL = "Request was throttled. Your rate limit resets in ~{seconds}s."
#: Seconds of a limit's rate a bucket holds when no burst is given (Replicate's "short bursts").
DEFAULT_BURST_SECONDS = 2.0

_NUMBERS = re.compile(r"(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)(?:\s*,\s*(\d+(?:\.\d+)?))?")


@dataclass(frozen=True)
class Limit:
    """One token bucket: ``per_minute`` sustained, up to ``burst`` at once."""

    per_minute: float
    burst: float

    def __post_init__(self) -> None:
        if not (self.per_minute > 0 and math.isfinite(self.per_minute)):
            raise ValueError(f"a rate limit must be a positive number per minute, got {self.per_minute}")
        if not self.burst >= 1:
            raise ValueError(f"a rate limit's burst must be at least 1, got {self.burst}")


@dataclass(frozen=True)
class RateLimit:
    """The limits of one account: the buckets creates draw from and those other requests draw from.

    Use :meth:`parse` for ``"replicate"``, ``"low-credit"`` or explicit numbers.
    """

    creates: tuple[Limit, ...]
    others: tuple[Limit, ...]
    name: str = "custom"
    #: Whether creates and other requests share the same buckets (low credit counts them together).
    shared: bool = False

    @classmethod
    def per_minute(
        cls, creates: float, others: float, *, burst_seconds: float = DEFAULT_BURST_SECONDS
    ) -> RateLimit:
        """Return limits of ``creates`` and ``others`` requests per minute.

        Each is allowed a burst of ``burst_seconds`` of its rate.

        :raises ValueError: a rate or ``burst_seconds`` that is not positive.
        """
        if not burst_seconds > 0:
            raise ValueError(f"burst_seconds must be positive, got {burst_seconds}")
        return cls(
            (Limit(creates, max(1.0, creates / 60 * burst_seconds)),),
            (Limit(others, max(1.0, others / 60 * burst_seconds)),),
            name=f"{creates:g}/min creates, {others:g}/min others",
        )

    @classmethod
    def replicate(cls) -> RateLimit:
        """Return Replicate's default account limits: 600 creates/min, 3000/min for everything else."""
        return replace(cls.per_minute(600, 3000), name="replicate")

    @classmethod
    def low_credit(cls) -> RateLimit:
        """Return the limits of an account low on credit.

        1 request per second and at most 6 per minute, creates and others together.
        """
        limits = (Limit(60, 1), Limit(6, 6))
        return cls(limits, limits, name="low-credit", shared=True)

    @classmethod
    def parse(cls, spec: str) -> RateLimit:
        """Return the limits a command-line spec names.

        The spec is ``replicate``, ``low-credit``, or ``CREATES,OTHERS[,BURST_SECONDS]`` per minute.

        :raises ValueError: for anything else.
        """
        text = spec.strip().lower()
        if text == "replicate":
            return cls.replicate()
        if text in ("low-credit", "low_credit"):
            return cls.low_credit()
        match = _NUMBERS.fullmatch(text)
        if match is None:
            raise ValueError(
                f"unknown rate limit {spec!r}: use 'replicate', 'low-credit' or "
                "'CREATES,OTHERS[,BURST_SECONDS]' (requests per minute)"
            )
        creates, others, burst = match.groups()
        burst_seconds = float(burst) if burst is not None else DEFAULT_BURST_SECONDS
        return cls.per_minute(float(creates), float(others), burst_seconds=burst_seconds)


class _Bucket:
    """A token bucket: ``burst`` tokens at most, refilled at ``per_minute`` a minute."""

    def __init__(self, limit: Limit, now: float) -> None:
        self.rate = limit.per_minute / 60.0
        self.capacity = limit.burst
        self.tokens = limit.burst
        self.updated = now

    def refill(self, now: float) -> None:
        """Add the tokens earned since the last refill."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)

    def wait(self) -> float:
        """Return the seconds until this bucket has a whole token (after :meth:`refill`)."""
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate


class RateLimiter:
    """The buckets of one emulator; thread-safe.

    :param limit: the account's limits.
    :param clock: monotonic seconds (the emulator's clock).
    """

    def __init__(self, limit: RateLimit, clock: Callable[[], float]) -> None:
        self.limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        now = clock()
        self._creates = [_Bucket(one, now) for one in limit.creates]
        self._others = self._creates if limit.shared else [_Bucket(one, now) for one in limit.others]

    def acquire(self, *, create: bool) -> float | None:
        """Take a token for one request; return ``None`` when it may go ahead.

        Otherwise return the seconds until it could; the refused request takes nothing.
        """
        buckets: Sequence[_Bucket] = self._creates if create else self._others
        with self._lock:
            now = self._clock()
            for bucket in buckets:
                bucket.refill(now)
            wait = max(bucket.wait() for bucket in buckets)
            if wait > 0:
                return wait
            for bucket in buckets:
                bucket.tokens -= 1
            return None

    @staticmethod
    def detail(wait: float) -> str:
        """Return the 429 body's ``detail`` for a request that could go ahead in ``wait`` seconds."""
        return RESETS_DETAIL.format(seconds=max(1, math.ceil(wait)))


__all__ = ["DEFAULT_BURST_SECONDS", "RESETS_DETAIL", "Limit", "RateLimit", "RateLimiter"]
