"""How the adaptive request budgets of several triggerers share one account: k
:class:`~airflow_provider_kontext.hooks.rate_limit.AccountRateLimiter` s, each wanting more than the account
allows, against the emulator's Replicate limit (:class:`~airflow_provider_kontext.testing.ratelimit.
RateLimiter`), on one simulated clock (milliseconds, so a minute of it runs in a second): how fast
their rates converge on the limit, how evenly they share it, and what share of requests is answered
``429``. Requests learn their answer ``rtt`` seconds after they are sent (a ``429`` for every request
still in flight when the account runs dry); another client may spend a fixed part of the account.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_kontext.hooks.rate_limit import AccountRateLimiter
from airflow_provider_kontext.testing.ratelimit import RateLimit, RateLimiter

#: The connection's default ceiling (requests per minute) and Replicate's limit.
CEILING_PER_MINUTE = 2400.0
LIMIT_PER_MINUTE = 3000.0
TICK = 0.001
#: The start the figures look at on their own: about how long the real benchmark's runs last.
START_SECONDS = 10


@dataclass
class Simulation:
    """What one run showed, per budget and in total."""

    k: int
    seconds: float
    other_per_minute: float
    rates: list[list[float]] = field(default_factory=list)  # per second, per budget: requests/s
    sent: list[int] = field(default_factory=list)
    throttled: list[int] = field(default_factory=list)
    other_sent: int = 0
    throttled_rates: list[float] = field(default_factory=list)  # per second, all budgets: 429s/s

    @property
    def throttled_pct(self) -> float:
        total = sum(self.sent)
        return sum(self.throttled) / total * 100 if total else math.nan

    @property
    def target(self) -> float:
        """Requests per second the account leaves the budgets: its limit less the other client's
        part, at most their ceilings.
        """
        return min(self.k * CEILING_PER_MINUTE, LIMIT_PER_MINUTE - self.other_per_minute) / 60.0

    def throttled_start_pct(self, seconds: int = START_SECONDS) -> float:
        """The share of the budgets' requests answered ``429`` in the first ``seconds``."""
        sent = sum(sum(rates[:seconds]) for rates in self.rates)
        return sum(self.throttled_rates[:seconds]) / sent * 100 if sent else math.nan

    def peak_over_target(self, seconds: int = START_SECONDS) -> float:
        """The budgets' highest summed rate in the first ``seconds``, as a share of :attr:`target`."""
        sums = [sum(second) for second in zip(*self.rates, strict=True)][:seconds]
        return max(sums) / self.target if sums else math.nan

    def converged_after(self, tolerance: float = 0.15, window: int = 3) -> float:
        """Seconds until the budgets' summed rate, averaged over ``window`` seconds, first comes
        within ``tolerance`` of :attr:`target`.
        """
        sums = [sum(second) for second in zip(*self.rates, strict=True)]
        for end in range(window, len(sums) + 1):
            if abs(sum(sums[end - window : end]) / window - self.target) <= tolerance * self.target:
                return float(end)
        return math.nan

    def used(self, skip: int = 10) -> float:
        """The budgets' summed rate after ``skip`` seconds as a share of :attr:`target`."""
        sums = [sum(second) for second in zip(*self.rates, strict=True)][skip:]
        return sum(sums) / len(sums) / self.target if sums else math.nan

    def fairness(self, skip: float = 10.0) -> float:
        """Jain's index of the budgets' requests granted after ``skip`` seconds (1: equal shares)."""
        shares = [sum(rates[int(skip) :]) for rates in self.rates]
        total = sum(shares)
        return total * total / (len(shares) * sum(x * x for x in shares)) if total else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "seconds": self.seconds,
            "other_per_minute": self.other_per_minute,
            "sent": self.sent,
            "throttled": self.throttled,
            "throttled_pct": round(self.throttled_pct, 2),
            "throttled_start_pct": round(self.throttled_start_pct(), 2),
            "peak_over_target": round(self.peak_over_target(), 3),
            "converged_after_s": self.converged_after(),
            "used": round(self.used(), 3),
            "fairness": round(self.fairness(), 4),
            "mean_rates": [round(sum(r[10:]) / max(1, len(r[10:])), 1) for r in self.rates],
        }


def _other_client(limiter: RateLimiter, due: float, per_minute: float) -> tuple[float, int]:
    """Send the other client's requests of one tick; return what it still owes and how many it sent."""
    sent = 0
    if per_minute:
        due += per_minute / 60.0 * TICK
        while due >= 1.0:
            due -= 1.0
            limiter.acquire(create=False)
            sent += 1
    return due, sent


def simulate(
    k: int,
    seconds: float = 60.0,
    *,
    other_per_minute: float = 0.0,
    rtt: float = 0.03,
    start_offsets: list[float] | None = None,
) -> Simulation:
    """Run ``k`` saturated budgets (and the other client) for ``seconds`` of simulated time."""
    now = 0.0

    def clock() -> float:
        return now

    limiter = RateLimiter(RateLimit.replicate(), clock)
    budgets = [AccountRateLimiter(CEILING_PER_MINUTE, clock=clock) for _ in range(k)]
    offsets = start_offsets or [0.0] * k
    result = Simulation(k, seconds, other_per_minute, [[] for _ in range(k)], [0] * k, [0] * k)
    in_flight: collections.deque[tuple[float, int, float | None]] = collections.deque()
    granted_in_second = [0] * k
    throttled_in_second = 0
    other_due = 0.0
    second = 1.0
    while now < seconds:
        while in_flight and in_flight[0][0] <= now:
            _, index, wait = in_flight.popleft()
            if wait is not None:
                budgets[index].pause(max(1.0, math.ceil(wait)))
        for index, budget in enumerate(budgets):
            if now < offsets[index]:
                continue
            while budget.try_acquire():
                wait = limiter.acquire(create=False)
                result.sent[index] += 1
                granted_in_second[index] += 1
                if wait is not None:
                    result.throttled[index] += 1
                    throttled_in_second += 1
                in_flight.append((now + rtt, index, wait))
        other_due, sent = _other_client(limiter, other_due, other_per_minute)
        result.other_sent += sent
        now = round(now + TICK, 6)
        if now >= second:
            for index in range(k):
                result.rates[index].append(float(granted_in_second[index]))
                granted_in_second[index] = 0
            result.throttled_rates.append(float(throttled_in_second))
            throttled_in_second = 0
            second += 1.0
    return result


@dataclass
class SweepRun:
    """What k simulated watchers, each sweeping ``pages`` pages, showed (see :func:`simulate_sweeps`)."""

    k: int
    other_per_minute: float
    sent: int = 0
    throttled: int = 0
    gaps: list[float] = field(default_factory=list)  # seconds between a watcher's finished sweeps

    @property
    def throttled_pct(self) -> float:
        return self.throttled / self.sent * 100 if self.sent else math.nan

    def to_json(self) -> dict[str, Any]:
        gaps = sorted(self.gaps)
        return {
            "k": self.k,
            "other_per_minute": self.other_per_minute,
            "sent": self.sent,
            "throttled": self.throttled,
            "throttled_pct": round(self.throttled_pct, 2),
            "gap_p50_s": round(gaps[len(gaps) // 2], 2) if gaps else math.nan,
            "gap_max_s": round(gaps[-1], 2) if gaps else math.nan,
        }


def simulate_sweeps(
    k: int,
    seconds: float = 15.0,
    *,
    pages: int = 20,
    interval: float = 1.0,
    other_per_minute: float = 0.0,
    rtt: float = 0.03,
    settle: float = 2.0,
) -> SweepRun:
    """Run ``k`` watchers' sweeps of ``pages`` pages each, paced as the watcher paces them.

    Each watcher sweeps when :func:`~airflow_provider_kontext.triggers.sweep.sweep_gap` (its
    :class:`~airflow_provider_kontext.triggers.sweep.SweepShare` of its budget's rate) and half the
    ``interval`` have passed since its last sweep began, tells its budget when the rate holds it back,
    and reads a throttled page again after the pause. The gaps between a watcher's finished sweeps
    after ``settle`` seconds bound how late it sees a prediction end.
    """
    from airflow_provider_kontext.triggers.sweep import SweepShare, sweep_gap

    now = 0.0

    def clock() -> float:
        return now

    limiter = RateLimiter(RateLimit.replicate(), clock)
    budgets = [AccountRateLimiter(CEILING_PER_MINUTE, clock=clock) for _ in range(k)]
    shares = [SweepShare() for _ in range(k)]
    result = SweepRun(k, other_per_minute)
    last_start = [-math.inf] * k
    last_done = [math.nan] * k
    pending = [0] * k
    flying = [0] * k
    read = [0] * k
    in_flight: collections.deque[tuple[float, int, float | None]] = collections.deque()
    other_due = 0.0
    while now < seconds:
        while in_flight and in_flight[0][0] <= now:
            _, index, wait = in_flight.popleft()
            flying[index] -= 1
            if wait is None:
                read[index] += 1
            else:
                budgets[index].pause(max(1.0, math.ceil(wait)))
                pending[index] += 1
            if not pending[index] and not flying[index]:
                if now >= settle and not math.isnan(last_done[index]):
                    result.gaps.append(now - last_done[index])
                last_done[index] = now
        for index, budget in enumerate(budgets):
            if not pending[index] and not flying[index]:
                share = shares[index].at(budget.rate, budget.ceiling, pages, interval)
                gap = sweep_gap(pages, budget.rate, share)
                if gap > interval / 2:
                    budget.hold_back(gap)
                if now >= last_start[index] + max(gap, interval / 2):
                    shares[index].measure(now, budget, read[index])
                    last_start[index] = now
                    pending[index] = pages
            while pending[index] and budget.try_acquire():
                wait = limiter.acquire(create=False)
                result.sent += 1
                result.throttled += wait is not None
                pending[index] -= 1
                flying[index] += 1
                in_flight.append((now + rtt, index, wait))
        other_due, _ = _other_client(limiter, other_due, other_per_minute)
        now = round(now + TICK, 6)
    return result


#: (k, other client per minute): the cases of the report.
CASES: tuple[tuple[int, float], ...] = ((1, 0.0), (2, 0.0), (4, 0.0), (2, 1000.0), (4, 1000.0))


def run(seconds: float = 120.0) -> list[Simulation]:
    return [simulate(k, seconds, other_per_minute=other) for k, other in CASES]


def run_sweeps() -> list[SweepRun]:
    return [simulate_sweeps(k, other_per_minute=other) for k, other in CASES]


if __name__ == "__main__":
    import json

    for sim in run():
        print(json.dumps(sim.to_json()))
    for sweeps in run_sweeps():
        print(json.dumps(sweeps.to_json()))
