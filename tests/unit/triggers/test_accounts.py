"""Test several triggerers on one account: the adaptive request budget, sweeps cut into slices.

Several triggerers on one account: the adaptive request budget (additive increase, multiplicative
decrease on a 429) on a controllable clock, against the emulator's Replicate limit; how sweeps are
cut into slices (``triggers/slices.py``); a sweep that stops paging once its waits are found; and a
burst of waits on predictions already done, answered by sweeps.

The budget tests run on a simulated clock (no sleeping, no timing); the emulator tests assert what
was requested, never how long it took.
"""

from __future__ import annotations

import asyncio
import collections
import math
from typing import Any

import pytest

from airflow_provider_kontext.exceptions import FluxKontextAPIError
from airflow_provider_kontext.hooks import rate_limit as budget_module
from airflow_provider_kontext.hooks.accounts import AccountRateLimiters
from airflow_provider_kontext.hooks.api import parsed_page
from airflow_provider_kontext.hooks.connection import ClientSettings
from airflow_provider_kontext.hooks.rate_limit import AccountRateLimiter
from airflow_provider_kontext.models import PredictionPage
from airflow_provider_kontext.testing import FluxKontextEmulator
from airflow_provider_kontext.testing.ratelimit import RateLimit, RateLimiter
from airflow_provider_kontext.triggers import watcher as watcher_module
from airflow_provider_kontext.triggers.slices import (
    PAGE_SIZE,
    Slice,
    micros_to_iso,
    parse_time,
    plan_slices,
    to_micros,
)
from airflow_provider_kontext.triggers.sweep import (
    MAX_SWEEP_GAP,
    MAX_SWEEP_SHARE,
    MIN_SWEEP_GAP,
    MIN_SWEEP_SHARE,
    SweepReading,
    SweepShare,
    sweep_gap,
)

from .test_watcher import create, emu, trigger, wait_all  # noqa: F401 (emu: the fixture)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def spend(budget: AccountRateLimiter, clock: Clock, seconds: float, tick: float = 0.01) -> int:
    """Send as much as the budget allows for ``seconds``; return the number sent.

    Send as much as the budget allows for ``seconds`` (every refusal is a request that wanted to
    go); the number sent.
    """
    sent = 0
    end = clock.now + seconds
    while clock.now < end:
        while budget.try_acquire():
            sent += 1
        clock.now = round(clock.now + tick, 6)
    return sent


# --- the adaptive budget ------------------------------------------------------------------------


START = 40.0 * budget_module.START_SHARE  # a new budget's rate at the default ceiling, requests/s


def test_a_new_budget_starts_below_its_ceiling_and_doubles_while_used() -> None:
    """Check the slow start: a quarter of the ceiling, doubling each second it is used, up to the ceiling."""
    clock = Clock()
    budget = AccountRateLimiter(2400, clock=clock)
    assert budget.slow_start
    assert budget.rate == START < budget.ceiling
    spend(budget, clock, 1.05)  # the rate is adjusted every half second
    assert 1.8 * START <= budget.rate <= 2.2 * START
    spend(budget, clock, 1.0)
    assert 3.6 * START <= budget.rate <= budget.ceiling
    spend(budget, clock, 10.0)
    assert budget.rate == budget.ceiling  # and no further
    assert budget.slow_start  # no 429 came


def test_a_caller_holding_back_for_the_rate_counts_as_using_it() -> None:
    """Check that a sweep waiting out the gap the rate sets lets the rate grow, with no request meanwhile."""
    clock = Clock()
    budget = AccountRateLimiter(2400, clock=clock)
    for _ in range(2):  # the watcher measures its gap again every half second
        budget.hold_back(4.0)
        clock.now += 0.5
    budget.hold_back(4.0)
    assert 1.8 * START <= budget.rate <= 2.2 * START
    assert budget.granted == 0


def test_an_unused_new_budget_keeps_its_start_rate() -> None:
    clock = Clock()
    budget = AccountRateLimiter(2400, clock=clock)
    for _ in range(20):  # one request a second: far below the rate
        clock.now += 1.0
        assert budget.try_acquire()
    assert budget.rate == START


def test_the_first_429_ends_the_slow_start() -> None:
    """Check that after the first 429 the rate is cut and then grows additively, never doubling again."""
    clock = Clock()
    budget = AccountRateLimiter(2400, clock=clock)
    spend(budget, clock, 1.05)
    grown = budget.rate
    budget.pause(0.0)
    assert not budget.slow_start
    assert budget.rate == grown * budget_module.DECREASE_FACTOR
    cut = budget.rate
    spend(budget, clock, 1.05)
    assert cut < budget.rate < 1.5 * cut


def test_a_429_cuts_the_rate_once_per_pause() -> None:
    clock = Clock()
    budget = AccountRateLimiter(2400, clock=clock)
    assert budget.rate == START
    budget.pause(1.0)
    assert budget.rate == START * budget_module.DECREASE_FACTOR
    for _ in range(5):  # the 429s of requests that were in flight: the same signal
        budget.pause(1.0)
    assert budget.rate == START * budget_module.DECREASE_FACTOR
    assert budget.decreases == 1
    clock.now += 1.5
    budget.pause(1.0)  # a new 429 after the pause: cut again
    assert budget.decreases == 2
    assert math.isclose(budget.rate, START * budget_module.DECREASE_FACTOR**2)


def test_the_rate_never_falls_below_its_floor() -> None:
    clock = Clock()
    budget = AccountRateLimiter(2400, clock=clock)
    for _ in range(100):
        budget.pause(0.0)
        clock.now += 0.1
    assert budget.rate == budget.floor == 40.0 * budget_module.FLOOR_SHARE


def test_the_ceiling_caps_a_slow_start() -> None:
    clock = Clock()
    budget = AccountRateLimiter(2400, clock=clock)
    budget.set_ceiling(1200)
    spend(budget, clock, 10.0)
    assert budget.rate == budget.ceiling == 20.0


def test_a_used_rate_grows_back_to_the_ceiling_and_no_further() -> None:
    clock = Clock()
    budget = AccountRateLimiter(2400, clock=clock)
    budget.pause(0.0)
    cut = budget.rate
    spend(budget, clock, 2.0)
    early = budget.rate
    assert cut < early < 40.0
    spend(budget, clock, 2.0)
    # The longer no 429 came, the faster it grows.
    assert budget.rate - early > early - cut
    spend(budget, clock, 60.0)
    assert budget.rate == 40.0


def test_an_unused_rate_does_not_grow() -> None:
    clock = Clock()
    budget = AccountRateLimiter(2400, clock=clock)
    budget.pause(0.0)
    cut = budget.rate
    for _ in range(100):  # one request a second: far below the rate
        clock.now += 1.0
        assert budget.try_acquire()
    assert budget.rate == cut


def test_a_fixed_budget_only_pauses() -> None:
    clock = Clock()
    budget = AccountRateLimiter(600, clock=clock, adaptive=False)
    assert budget.rate == 10.0  # a fixed budget starts at its ceiling
    budget.pause(1.0)
    assert budget.rate == 10.0
    assert budget.decreases == 0


ACCOUNT = budget_module.REPLICATE_PER_MINUTE / 60  # Replicate's limit, requests/s


def test_a_slow_start_stops_at_the_share_its_callers_expect_then_grows_additively() -> None:
    """Check that a slow start told its share (a third) stops there, and after the hold grows gently."""
    clock = Clock()
    budget = AccountRateLimiter(2400, clock=clock)
    budget.expect_share(1 / 3)
    spend(budget, clock, 1.55)
    assert budget.rate == pytest.approx(ACCOUNT / 3)  # grew, then held at a third of the account
    assert budget.slow_start
    spend(budget, clock, budget_module.SHARE_HOLD_SECONDS + 0.6)
    assert not budget.slow_start  # held long enough: the slow start is over...
    held = budget.rate
    spend(budget, clock, 1.05)
    assert held < budget.rate < 1.2 * held  # ...and the rate probes above the share additively


def test_a_rate_grown_past_the_expected_share_is_brought_back_never_below_the_start() -> None:
    clock = Clock()
    budget = AccountRateLimiter(2400, clock=clock)
    spend(budget, clock, 2.05)
    assert budget.rate > 3 * START
    budget.expect_share(0.4)
    assert budget.rate == pytest.approx(0.4 * ACCOUNT)
    assert budget.slow_start
    budget.expect_share(0.05)
    assert budget.rate == START  # a smaller share never takes it below where it started
    budget.expect_share(1.0)
    spend(budget, clock, 2.05)
    assert budget.rate == budget.ceiling  # a larger share lets the slow start go on, up to the ceiling


def test_the_expected_share_changes_nothing_after_the_slow_start() -> None:
    clock = Clock()
    budget = AccountRateLimiter(2400, clock=clock)
    spend(budget, clock, 2.05)
    budget.pause(0.0)
    cut = budget.rate
    budget.expect_share(0.05)
    assert budget.rate == cut
    assert budget.decreases == 1


def test_a_share_that_jitters_still_ends_the_slow_start_after_the_hold() -> None:
    """Check that the hold counts from the first time the share was reached, not from each new share."""
    clock = Clock()
    budget = AccountRateLimiter(2400, clock=clock)
    for step in range(40):  # 20 s of a share that moves a little at every sweep
        budget.expect_share(0.25 if step % 2 else 0.26)
        spend(budget, clock, 0.5)
    assert not budget.slow_start
    assert budget.rate > 0.26 * ACCOUNT  # probing above its share


def test_a_share_cut_during_the_hold_cuts_the_rate_and_the_hold_ends_as_it_would_have() -> None:
    clock = Clock()
    budget = AccountRateLimiter(2400, clock=clock)
    budget.expect_share(0.5)
    spend(budget, clock, 1.55)  # 10/s grown to half of the account (25/s): the hold begins
    assert budget.rate == pytest.approx(0.5 * ACCOUNT)
    spend(budget, clock, budget_module.SHARE_HOLD_SECONDS - 1.1)
    budget.expect_share(0.25)
    assert budget.rate == pytest.approx(0.25 * ACCOUNT)  # brought down at once
    assert budget.slow_start
    spend(budget, clock, 1.1)
    assert not budget.slow_start
    assert budget.rate < 0.3 * ACCOUNT  # probing from the new share, not the old one


def test_a_budget_told_no_share_doubles_up_to_its_ceiling() -> None:
    """Check that without a share a slow start is not capped, even above Replicate's limit."""
    clock = Clock()
    budget = AccountRateLimiter(6000, clock=clock)
    spend(budget, clock, 3.05)
    assert budget.rate == budget.ceiling == 100.0
    assert budget.slow_start


async def test_a_lower_ceiling_of_the_account_caps_the_rate() -> None:
    settings = ClientSettings("c", "https://api.replicate.com", token="r8_accounts_test_0123456789")
    budget = AccountRateLimiters.get(settings)
    assert budget is not None
    assert budget.rate == settings.max_requests_per_minute / 60 * budget_module.START_SHARE
    lower = ClientSettings(
        "d", "https://api.replicate.com", token="r8_accounts_test_0123456789", max_requests_per_minute=600
    )
    assert AccountRateLimiters.get(lower) is budget
    assert budget.rate == budget.ceiling == 10.0


def share(
    k: int, seconds: float, other_per_minute: float = 0.0, expected: float | None = None
) -> tuple[list[list[int]], int, int]:
    """Simulate ``k`` budgets against Replicate's limit on one clock; return their rates.

    ``k`` budgets at the connection's default ceiling, each wanting more than the account allows,
    against Replicate's limit on one simulated clock; a 429 is known 30 ms after it was sent.
    ``expected``: the share each is told is its own (as a list watcher tells it), from the start.
    (requests sent per budget per second, all sent, all answered 429).
    """
    clock = Clock()
    limiter = RateLimiter(RateLimit.replicate(), clock)
    budgets = [AccountRateLimiter(2400, clock=clock) for _ in range(k)]
    for budget in budgets:
        if expected is not None:
            budget.expect_share(expected)
    in_flight: collections.deque[tuple[float, int, float | None]] = collections.deque()
    per_second = [[0] for _ in range(k)]
    sent = throttled = 0
    other_due = 0.0
    start = clock.now
    while clock.now < start + seconds:
        while in_flight and in_flight[0][0] <= clock.now:
            _, index, wait = in_flight.popleft()
            if wait is not None:
                budgets[index].pause(max(1.0, math.ceil(wait)))
        for index, budget in enumerate(budgets):
            while budget.try_acquire():
                wait = limiter.acquire(create=False)
                sent += 1
                throttled += wait is not None
                per_second[index][-1] += 1
                in_flight.append((clock.now + 0.03, index, wait))
        other_due += other_per_minute / 60 * 0.001
        while other_due >= 1:
            other_due -= 1
            limiter.acquire(create=False)
        clock.now = round(clock.now + 0.001, 6)
        if round((clock.now - start) % 1.0, 6) == 0:
            for counts in per_second:
                counts.append(0)
    return [counts[:-1] for counts in per_second], sent, throttled


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def test_triggerers_converge_on_the_accounts_limit_in_fair_shares() -> None:
    """Check that 4 triggerers over an account's limit converge near it, in about equal shares.

    4 triggerers, each starting at 2400/min against an account of 3000/min: within 10 s their sum
    stays near the limit, the shares are about equal, and few requests are refused.
    """
    seconds, k = 60, 4
    per_second, sent, throttled = share(k, seconds)
    settled = [sum(budget[s] for budget in per_second) for s in range(10, seconds)]
    assert 0.7 * 50 <= sum(settled) / len(settled) <= 50 * 1.05  # the account's 50/s, well used
    totals = [float(sum(budget[10:])) for budget in per_second]
    assert jain(totals) > 0.85
    assert throttled / sent < 0.03


def test_triggerers_told_their_share_start_without_429s() -> None:
    """Check that 4 triggerers each told a quarter is theirs start together with no 429.

    Told nothing, their slow starts double into the account's limit together and many requests
    are refused; told their share, they stop below it, then probe above it additively, still
    converging on the account's limit.
    """
    _, sent, throttled = share(4, 10, expected=0.25)
    _, sent_untold, throttled_untold = share(4, 10)
    assert throttled_untold / sent_untold > 0.02
    assert throttled == 0
    per_second, sent, throttled = share(4, 60, expected=0.25)
    settled = [sum(budget[s] for budget in per_second) for s in range(30, 60)]
    assert 0.7 * 50 <= sum(settled) / len(settled) <= 50 * 1.05
    assert throttled / sent < 0.03


def test_another_client_leaves_the_triggerers_the_rest() -> None:
    per_second, sent, throttled = share(2, 60, other_per_minute=1000)
    assert throttled / sent < 0.03
    settled = [sum(budget[s] for budget in per_second) for s in range(10, 60)]
    left = (3000 - 1000) / 60
    assert 0.7 * left <= sum(settled) / len(settled) <= left * 1.05
    assert jain([float(sum(budget[10:])) for budget in per_second]) > 0.9


# --- the sweeps' share of the budget -----------------------------------------------------------------


def test_sweeps_take_what_the_other_requests_leave() -> None:
    """Check that the sweeps' share is the budget's rate less what single reads took since the last sweep."""
    share = SweepShare()
    assert share.update(0.0, granted=0, pages=0, rate=40.0) == MAX_SWEEP_SHARE  # nothing measured yet
    # 2 s later: 60 grants, 50 of them the sweeps' pages: the others took 5/s of 40/s.
    assert share.update(2.0, granted=60, pages=50, rate=40.0) == pytest.approx(1 - 5 / 40)
    # Then nothing but pages: the most sweeps may take.
    assert share.update(4.0, granted=100, pages=90, rate=40.0) == MAX_SWEEP_SHARE
    # Then single reads took 30/s: the sweeps keep their least share.
    assert share.update(5.0, granted=140, pages=100, rate=40.0) == MIN_SWEEP_SHARE


def test_at_the_budgets_ceiling_sweeps_take_their_least_share() -> None:
    """Check that where the connection's ceiling, not the account, holds the budget, sweeps keep half."""
    share = SweepShare()
    share.update(0.0, granted=0, pages=0, rate=40.0, ceiling=40.0)
    assert share.update(1.0, granted=40, pages=40, rate=40.0, ceiling=40.0) == MIN_SWEEP_SHARE
    assert share.update(2.0, granted=60, pages=60, rate=20.0, ceiling=40.0) == MAX_SWEEP_SHARE  # cut: below


def test_a_share_picked_at_the_ceiling_is_not_kept_once_the_rate_is_cut() -> None:
    """Check that the share follows the rate the gap is reckoned with, not the one a sweep began at.

    A slow start at its ceiling when a sweep begins, brought back to its share of the account
    during it: paired with the least share picked at the ceiling, the cut rate made a 20-page
    sweep wait 3 s for the next, 1.5 s of it idle.
    """
    share = SweepShare()
    share.update(0.0, granted=0, pages=0, rate=10.0, ceiling=40.0)
    assert share.update(1.0, granted=20, pages=20, rate=40.0, ceiling=40.0) == MIN_SWEEP_SHARE
    assert share.at(12.5, ceiling=40.0) == MAX_SWEEP_SHARE  # what the others left: nothing taken
    assert sweep_gap(20, 12.5, share.at(12.5, 40.0)) == pytest.approx(20 / (0.9 * 12.5))
    assert share.at(40.0, ceiling=40.0) == MIN_SWEEP_SHARE


async def test_the_watchers_gap_after_a_rate_cut_uses_the_share_for_the_cut_rate() -> None:
    settings = ClientSettings("c", "https://api.replicate.com", token="r8_accounts_gap_test_0123456789")
    watcher = watcher_module.PredictionWatcher("account", "c", settings)
    budget = AccountRateLimiters.get(settings)
    assert budget is not None
    budget._set_rate(budget.ceiling)
    watcher._measure_share()  # a sweep begins with the slow start at its ceiling
    assert watcher.share.share == MIN_SWEEP_SHARE
    watcher.last_sweep_pages = 20
    budget._set_rate(12.5)  # brought back to its share of the account during that sweep
    assert watcher._sweep_gap() == pytest.approx(20 / (MAX_SWEEP_SHARE * 12.5))


def test_at_a_low_ceiling_sweeps_take_what_one_sweep_per_interval_needs() -> None:
    """Check that a budget held by a low ceiling still sweeps once per interval where it allows.

    Half of a 500/min ceiling read 20 pages once every 4.8 s: a connection set to its triggerer's
    part of a shared account saw its waits 5.5 s late at p99, later than with the default ceiling.
    """
    share = SweepShare()
    low = 500 / 60
    assert share.at(low, low, pages=20, interval=1.0) == MAX_SWEEP_SHARE  # needs 2.4: the most
    assert share.at(40.0, 40.0, pages=20, interval=1.0) == MIN_SWEEP_SHARE  # needs 0.5
    assert share.at(40.0, 40.0, pages=28, interval=1.0) == pytest.approx(0.7)
    assert share.at(40.0, 40.0, pages=50, interval=5.0) == MIN_SWEEP_SHARE  # 5000 waits at 5 s
    share.update(0.0, granted=0, pages=0, rate=low, ceiling=low)
    share.update(10.0, granted=80, pages=50, rate=low, ceiling=low)  # single reads took 3/s
    assert share.at(low, low, pages=20, interval=1.0) == pytest.approx(1 - 3 / low)  # what they left


async def test_a_watcher_under_a_low_ceiling_sweeps_once_per_interval_where_the_budget_allows() -> None:
    settings = ClientSettings(
        "c", "https://api.replicate.com", token="r8_accounts_low_test_0123456789", max_requests_per_minute=500
    )
    watcher = watcher_module.PredictionWatcher("account", "c", settings)
    watcher.shortest_interval = 1.0
    budget = AccountRateLimiters.get(settings)
    assert budget is not None
    budget._set_rate(budget.ceiling)
    watcher._measure_share()
    watcher.last_sweep_pages = 20
    assert watcher._sweep_gap() == pytest.approx(20 / (MAX_SWEEP_SHARE * 500 / 60))  # was 20 / (0.5 x 8.3)


def test_without_a_budget_sweeps_take_their_least_share() -> None:
    share = SweepShare()
    share.update(0.0, granted=0, pages=0, rate=40.0)
    share.update(1.0, granted=40, pages=40, rate=40.0)
    assert share.share == MAX_SWEEP_SHARE
    assert share.update(2.0, granted=None, pages=80, rate=50.0) == MIN_SWEEP_SHARE


def test_the_gap_between_sweeps_follows_the_share() -> None:
    assert sweep_gap(20, 40.0, MIN_SWEEP_SHARE) == pytest.approx(1.0)
    assert sweep_gap(20, 40.0, MAX_SWEEP_SHARE) == pytest.approx(20 / 36)
    assert sweep_gap(1, 40.0) == MIN_SWEEP_GAP
    assert sweep_gap(10_000, 1.0) == MAX_SWEEP_GAP


def test_a_well_formed_page_is_taken_as_it_is_and_a_malformed_one_refused() -> None:
    body = {"results": [{"id": "a", "status": "starting"}], "next": "https://h/v1/predictions?cursor=c2"}
    page = parsed_page({**body, "previous": None, "more": 1})
    assert page == PredictionPage.model_validate({**body, "more": 1})
    assert (page.results, page.next_cursor, page.model_extra) == (body["results"], "c2", {"more": 1})
    assert parsed_page({}).results == []
    for bad in ({"results": [1]}, {"results": {}}, {"results": [], "next": 3}, []):
        with pytest.raises(FluxKontextAPIError, match="not a valid PredictionPage"):
            parsed_page(bad)


# --- slices ---------------------------------------------------------------------------------------


def test_slices_are_cut_every_page_of_what_the_last_sweep_saw() -> None:
    sample = list(range(0, 1000, 2))  # 500 predictions, 2 µs apart
    known = {"a": 10, "b": 450, "c": 990}  # pages 1, 3 and 5 of them
    slices = plan_slices(known, 0, sample, margin=5)
    assert [sorted(s.expected) for s in slices] == [["a"], ["b"], ["c"]]
    assert [(s.after, s.before) for s in slices] == [(5, 206), (406, 606), (806, 996)]
    assert all(not s.finds_unknown and s.max_pages is None for s in slices)


def test_before_any_sweep_the_waits_own_times_cut_the_slices() -> None:
    known = {f"p{i}": 1000 + i for i in range(250)}
    slices = plan_slices(known, 0, [], margin=0)
    assert [len(s.expected) for s in slices] == [PAGE_SIZE, PAGE_SIZE, 50]
    # Adjacent slices share their bound: together they cover the window exactly once.
    assert [s.before for s in slices[:-1]] == [s.after for s in slices[1:]]


def test_waits_without_created_at_are_looked_for_in_the_newest_pages() -> None:
    (only,) = plan_slices({}, 150, [], margin=0)
    assert (only.after, only.before, only.finds_unknown, only.max_pages) == (None, None, True, 3)
    slices = plan_slices({"a": 100}, 1, [], margin=10)
    assert slices[-1].before is None  # open above: where new ones are
    assert slices[-1].finds_unknown


def test_times_round_trip_through_the_lists_bounds() -> None:
    moment = parse_time("2026-12-06T01:55:50.123456Z")
    assert moment is not None
    assert micros_to_iso(to_micros(moment)) == "2026-12-06T01:55:50.123456Z"


# --- sweeps against the emulator -------------------------------------------------------------------


@pytest.fixture
def list_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Return the arguments of every list request the watchers make."""
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook

    calls: list[dict[str, Any]] = []
    original = FluxKontextHook.alist_predictions

    async def recorded(self: FluxKontextHook, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return await original(self, **kwargs)

    monkeypatch.setattr(FluxKontextHook, "alist_predictions", recorded)
    return calls


async def test_a_sweep_stops_paging_once_its_waits_are_found(
    emu: FluxKontextEmulator,  # noqa: F811
    list_calls: list[dict[str, Any]],
) -> None:
    """Check that three waits on the newest of 350 predictions read one page per sweep.

    Three waits on the newest of 350 predictions: every sweep reads one page, never the three
    older ones behind it.
    """
    predictions = create(emu, 350)
    newest = predictions[-3:]
    events = await wait_all([trigger(p, created_at=p["created_at"]) for p in newest])
    assert [e["status"] for e in events] == ["succeeded"] * 3
    assert list_calls
    assert not any(call["cursor"] for call in list_calls)
    assert all(call["created_before"] and call["created_after"] for call in list_calls)


class OnePage:
    """A hook whose list answers one page of ``items``."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    async def alist_predictions(self, **_: Any) -> PredictionPage:
        return PredictionPage(results=self.items)


async def test_a_sweep_counts_the_unfinished_predictions_up_to_its_newest_and_its_own_among_them() -> None:
    """Check what a sweep counts towards its share: unfinished, created by its newest wait, its own."""
    at = [micros_to_iso(to_micros(parse_time("2026-12-06T10:00:00Z")) + n * 1_000_000) for n in range(6)]  # type: ignore[arg-type]
    items: list[dict[str, Any]] = [
        {"id": "own-1", "status": "processing", "created_at": at[0]},
        {"id": "other-1", "status": "starting", "created_at": at[1]},
        {"id": "other-2", "status": "succeeded", "created_at": at[1]},  # ended: not counted
        {"id": "other-3", "status": "processing"},  # no created_at: not counted
        {"id": ["odd"], "status": {"odd": 1}, "created_at": at[2]},  # malformed: not counted, no error
        {"id": "own-2", "status": "processing", "created_at": at[3]},
        {"id": "other-4", "status": "processing", "created_at": at[5]},  # newer than its newest
    ]
    reading = SweepReading(
        OnePage(items),  # type: ignore[arg-type]
        {"own-2"},
        set(),
        on_item=lambda _pid, _item: None,
        on_list_failed=lambda: None,
        own={"own-1", "own-2"},
        count_until=to_micros(parse_time(at[3])),  # type: ignore[arg-type]
    )
    assert await reading.read([Slice(None, None, expected={"own-2"})]) == [True]
    assert (reading.running, reading.running_own) == (3, 2)
    assert reading.missing == set()


@pytest.fixture
def told_shares(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Return every share the watchers tell their budgets is their own."""
    told: list[float] = []
    original = AccountRateLimiter.expect_share

    def recorded(self: AccountRateLimiter, share: float) -> None:
        told.append(share)
        original(self, share)

    monkeypatch.setattr(AccountRateLimiter, "expect_share", recorded)
    return told


@pytest.mark.parametrize(
    ("settle_seconds", "tells"), [(0.0, True), (3600.0, False)], ids=["settled", "joining"]
)
async def test_a_watcher_tells_its_budget_what_share_of_the_running_predictions_is_its_own(
    emu: FluxKontextEmulator,  # noqa: F811
    told_shares: list[float],
    monkeypatch: pytest.MonkeyPatch,
    settle_seconds: float,
    tells: bool,
) -> None:
    """Check that waits on every fourth of 80 running predictions tell the budget about a quarter.

    Only once no wait has joined for the settle time: while waits keep joining, others'
    predictions may be its own on their way, and it tells nothing.
    """
    monkeypatch.setattr(watcher_module, "SHARE_SETTLE_SECONDS", settle_seconds)
    monkeypatch.setattr(watcher_module, "MIN_SHARE_SAMPLE", 20)  # told from a page of 80, not 100
    predictions = create(emu, 80)
    events = await wait_all([trigger(p, created_at=p["created_at"]) for p in predictions[::4]])
    assert [e["status"] for e in events] == ["succeeded"] * 20
    if not tells:
        assert told_shares == []
        return
    assert told_shares
    # Counted up to the newest of its own: at most 20 of about 77 running predictions are its own.
    assert all(0.2 <= told <= 0.45 for told in told_shares), told_shares


async def test_a_burst_on_predictions_already_done_is_answered_by_sweeps(emu: FluxKontextEmulator) -> None:  # noqa: F811
    """Check that 300 triggers on ended predictions are answered from the list, in slices.

    300 triggers opened at once on predictions that have ended: answered from the list, in
    slices of a page read side by side, none reading alone.
    """
    predictions = create(emu, 300)
    await asyncio.sleep(1.5)  # the last ends 0.7 s after its create
    done = len(emu.requests)
    events = await wait_all([trigger(p, created_at=p["created_at"]) for p in predictions])
    assert [e["status"] for e in events] == ["succeeded"] * 300
    later = emu.requests[done:]
    singles = [r for r in later if r.method == "GET" and r.path.startswith("/v1/predictions/")]
    lists = [r for r in later if r.method == "GET" and r.path.split("?")[0] == "/v1/predictions"]
    assert len(singles) <= 1  # at most the first trigger, before a second one joined
    # Three slices of a page a sweep; a sweep or two as the others join (before any sweep, a slice
    # is cut at every 100th wait and may page through the others' predictions).
    assert len(lists) <= 12
