"""Test a throttled create (429): sent again with jitter within its deadline, never a "may exist".

A throttled create (429) waits its turn: sent again with jitter for as long as its caller's
deadline allows (else the connection's bound), then failing with a ``FluxKontextRateLimitError`` that
says nothing was created; never a "may exist". Reads keep their fixed count of retries.

Time is a fake clock that moves only by the waits the attempt loop asks for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import statistics
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from hook_api import CREATE_URL, DEV, GET_URL, INPUT, PRED_ID

from airflow_provider_kontext.edits.deadlines import create_deadline, wait_timeout
from airflow_provider_kontext.exceptions import (
    FluxKontextDeadlineError,
    FluxKontextError,
    FluxKontextPredictionMayExistError,
    FluxKontextRateLimitError,
)
from airflow_provider_kontext.hooks import retry as failures
from airflow_provider_kontext.hooks.api import (
    ClientSettings,
    create_prediction_request,
    get_prediction_request,
)
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.hooks.retry import (
    THROTTLE_SPREAD_GROWTH,
    THROTTLE_SPREAD_MIN,
    Attempts,
    RetryLimits,
    create_throttle_bound,
    final_error,
    throttle_wait,
)

#: The connection's defaults: max_retries 5, backoff_base 1, backoff_max 30, retry_after_max 60.
SETTINGS = ClientSettings(conn_id="c", base_url="https://api.example")
CREATE = create_prediction_request("owner/model", {"prompt": "x"})
GET = get_prediction_request("p1")
T0 = 1_800_000_000.0
DETAIL = "Request was throttled. Your rate limit resets in ~1s."


class Clock:
    """Unix time that moves only when the loop sleeps; records each wait."""

    def __init__(self) -> None:
        self.now = T0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


class Sender:
    """An attempt that fails with ``exc`` every time (or the first ``times`` times, then answers)."""

    def __init__(self, exc: FluxKontextError, times: int | None = None) -> None:
        self.exc = exc
        self.times = times
        self.numbers: list[int] = []

    def __call__(self, settings: ClientSettings, number: int) -> str:
        self.numbers.append(number)
        if self.times is None or len(self.numbers) <= self.times:
            raise self.exc
        return "created"


def throttled(retry_after: float | None = 1.0) -> FluxKontextRateLimitError:
    return FluxKontextRateLimitError(
        status=429, detail=DETAIL, method="POST", path=CREATE.path, retry_after=retry_after
    )


def no_refresh(stale: ClientSettings) -> ClientSettings | None:
    raise AssertionError("not an auth error")


def run(clock: Clock, send: Sender, *, request: Any = CREATE, **kwargs: Any) -> str:
    attempts = Attempts(kwargs.pop("settings", SETTINGS), request, clock=clock, **kwargs)
    return attempts.run_sync(send, no_refresh, clock.sleep)


# --- until the deadline -----------------------------------------------------------------------------


def test_a_throttled_create_is_sent_again_until_the_deadline_then_fails_safe_to_retry() -> None:
    clock = Clock()
    send = Sender(throttled())
    deadline = T0 + 600
    with pytest.raises(FluxKontextRateLimitError) as info:
        run(clock, send, retry_limits=RetryLimits(deadline=deadline))
    err = info.value
    assert not isinstance(err, FluxKontextPredictionMayExistError)
    # Far more than max_retries (5): the deadline, not a count, ended it.
    assert len(send.numbers) > 30
    assert send.numbers == list(range(1, len(send.numbers) + 1))
    # It kept trying to the very end: the last wait was cut to end at the deadline.
    assert clock.now == pytest.approx(deadline)
    assert all(wait >= 1.0 for wait in clock.waits)  # never before the reset the server named
    message = str(err)
    assert "still throttled (HTTP 429) when the deadline came" in message
    assert "2027-01-15 08:10:00 UTC" in message  # the deadline, in UTC
    assert "Nothing was created" in message
    assert "safe to retry" in message
    assert err.status == 429
    assert err.retry_after == 1.0
    assert err.path == CREATE.path


def test_a_create_throttled_past_its_deadline_fails_at_once() -> None:
    clock = Clock()
    send = Sender(throttled())
    with pytest.raises(FluxKontextRateLimitError, match="when the deadline came"):
        run(clock, send, retry_limits=RetryLimits(deadline=T0 - 1))
    assert send.numbers == [1]
    assert clock.waits == []


def test_the_last_wait_is_not_taken_when_not_even_the_reset_fits() -> None:
    clock = Clock()
    send = Sender(throttled(retry_after=5.0))
    with pytest.raises(FluxKontextRateLimitError):
        run(clock, send, retry_limits=RetryLimits(deadline=T0 + 3))
    assert send.numbers == [1]  # a retry before the reset the server named would be throttled again


def test_a_throttled_create_that_gets_through_returns_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    lines: list[tuple[int, str]] = []
    send = Sender(throttled(), times=7)

    def log(level: int, message: str, *args: object) -> None:
        lines.append((level, message % args))

    assert run(clock, send, retry_limits=RetryLimits(deadline=T0 + 600), log=log) == "created"
    assert len(send.numbers) == 8
    infos = [text for level, text in lines if level == logging.INFO]
    debugs = [text for level, text in lines if level == logging.DEBUG]
    # Thousands of creates: one info line when throttled, one when through, the rest at debug.
    assert len(infos) == 2
    assert len(debugs) == 6
    assert "throttled (429 #1: Request was throttled" in infos[0]
    assert "nothing was created" in infos[0]
    assert "until 2027-01-15 08:10:00 UTC at the latest" in infos[0]
    assert infos[1] == f"POST {CREATE.path} went through after 7 throttled attempts ({clock.now - T0:.1f} s)"


def test_without_a_deadline_the_connections_bound_holds() -> None:
    settings = ClientSettings(conn_id="c", base_url="https://x", max_retries=2, retry_after_max=10)
    assert create_throttle_bound(settings) == 20
    clock = Clock()
    send = Sender(throttled())
    with pytest.raises(FluxKontextRateLimitError, match=r"max_retries x retry_after_max = 20 s"):
        run(clock, send, settings=settings)
    assert clock.now == pytest.approx(T0 + 20)
    assert len(send.numbers) > 3  # more than max_retries + 1: the bound is time, not a count


def test_max_retries_zero_turns_the_retries_off() -> None:
    settings = ClientSettings(conn_id="c", base_url="https://x", max_retries=0)
    send = Sender(throttled())
    with pytest.raises(FluxKontextRateLimitError) as info:
        run(Clock(), send, settings=settings, retry_limits=RetryLimits(deadline=T0 + 600))
    assert send.numbers == [1]
    assert not isinstance(info.value, FluxKontextPredictionMayExistError)


def test_a_429_on_a_create_is_never_may_exist() -> None:
    exc = throttled()
    assert final_error(CREATE, exc) is exc
    assert not isinstance(final_error(CREATE, exc), FluxKontextPredictionMayExistError)


def test_reads_keep_their_fixed_count_and_the_named_reset() -> None:
    clock = Clock()
    send = Sender(FluxKontextRateLimitError(status=429, retry_after=1.0))
    with pytest.raises(FluxKontextRateLimitError) as info:
        run(clock, send, request=GET, retry_limits=RetryLimits(deadline=T0 + 600))
    assert len(send.numbers) == SETTINGS.max_retries + 1
    assert all(1.0 <= wait <= 1.1 for wait in clock.waits)
    assert "deadline" not in str(info.value)


def test_an_async_create_in_flight_at_the_deadline_is_not_abandoned() -> None:
    """Abandoning it would hide a prediction that may exist; a read is cut as before."""
    clock = Clock()

    async def slow(settings: ClientSettings, number: int) -> str:
        await asyncio.sleep(0.05)
        return "created"

    async def no_arefresh(stale: ClientSettings) -> ClientSettings | None:
        return None

    past = RetryLimits(deadline=T0 - 10, grace=0.0)
    create = Attempts(SETTINGS, CREATE, retry_limits=past, clock=clock)
    assert asyncio.run(create.run_async(slow, no_arefresh)) == "created"
    read = Attempts(SETTINGS, GET, retry_limits=past, clock=clock)
    with pytest.raises(FluxKontextDeadlineError):
        asyncio.run(read.run_async(slow, no_arefresh))


# --- the spread ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", [None, 0.0, 0.4, 1.0, 7.0, 500.0])
def test_each_wait_is_the_reset_plus_a_share_of_a_doubling_window(retry_after: float | None) -> None:
    named = SETTINGS.backoff_base if retry_after is None else retry_after
    reset = min(named, SETTINGS.retry_after_max)
    for throttled_count in range(1, 12):
        growth = min(2 ** (throttled_count - 1), THROTTLE_SPREAD_GROWTH)
        window = min(SETTINGS.backoff_max, max(reset, THROTTLE_SPREAD_MIN) * growth)
        low = throttle_wait(SETTINGS, throttled_count, retry_after, lambda a, b: a)
        high = throttle_wait(SETTINGS, throttled_count, retry_after, lambda a, b: b)
        assert low == pytest.approx(reset)
        assert high == pytest.approx(reset + window)
    # The window doubles up to eight times its start, and never beyond backoff_max.
    widths = [throttle_wait(SETTINGS, k, 1.0, lambda a, b: b) - 1.0 for k in range(1, 7)]
    assert widths == [1, 2, 4, 8, 8, 8]
    assert throttle_wait(SETTINGS, 9, 10.0, lambda a, b: b) == 10.0 + SETTINGS.backoff_max
    narrow = ClientSettings(conn_id="c", base_url="https://x", backoff_max=3)
    assert throttle_wait(narrow, 5, 1.0, lambda a, b: b) == 4.0


def test_creators_throttled_together_come_back_spread_out() -> None:
    """Check that creators throttled at the same instant spread over the window.

    64 creators answered the same "~1s" at the same instant: with the old policy all came back
    within 0.1 s of each other; now they spread over the window, wider with each 429.
    """
    rng = random.Random(7)
    first = [throttle_wait(SETTINGS, 1, 1.0, rng.uniform) for _ in range(64)]
    assert min(first) >= 1.0
    assert max(first) <= 2.0
    assert max(first) - min(first) > 0.9
    # No tenth of a second holds more than a fair share plus slack (the old policy: all 64 in one).
    per_slot = [sum(1 for w in first if 1.0 + i / 10 <= w < 1.0 + (i + 1) / 10) for i in range(10)]
    assert max(per_slot) <= 14
    fourth = [throttle_wait(SETTINGS, 4, 1.0, rng.uniform) for _ in range(64)]
    assert max(fourth) <= 9.0
    assert statistics.pstdev(fourth) > 3 * statistics.pstdev(first)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forked workers need os.fork")
def test_forked_workers_draw_different_jitter() -> None:
    """Check that forked task processes draw different random waits.

    Airflow forks task processes from one parent: a generator seeded before the fork would give
    every worker the same "random" waits, and they would come back together again.
    """
    random.seed(3)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first draw, then out without any cleanup of the parent's
        os.write(write, repr(throttle_wait(SETTINGS, 3, 1.0)).encode())
        os._exit(0)
    os.close(write)
    child = float(os.read(read, 64).decode())
    os.close(read)
    os.waitpid(pid, 0)
    assert child != throttle_wait(SETTINGS, 3, 1.0)


# --- through the hook and the operator's deadline -----------------------------------------------------


@pytest.fixture
def hook_clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Make the hook's sleeps move a fake clock that the attempt loop reads."""
    clock = Clock()
    conn = '{"conn_type": "fluxkontext", "password": "r8_x"}'
    monkeypatch.setenv("AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT", conn)
    monkeypatch.setattr(failures, "time", SimpleNamespace(time=clock))
    monkeypatch.setattr(FluxKontextHook, "_sleep", lambda self, seconds: clock.sleep(seconds))
    return clock


def test_the_hook_retries_a_throttled_create_until_its_deadline(
    hook_clock: Clock, requests_mock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    requests_mock.post(CREATE_URL, status_code=429, json={"detail": DETAIL})
    hook = FluxKontextHook()
    with pytest.raises(FluxKontextRateLimitError, match="safe to retry"):
        hook.create_prediction(DEV, INPUT, deadline=T0 + 120)
    assert requests_mock.call_count > hook.settings.max_retries + 1
    assert hook_clock.now == pytest.approx(T0 + 120)


def test_the_hook_creates_once_after_throttling(hook_clock: Clock, requests_mock: Any) -> None:
    answer = {
        "id": PRED_ID,
        "model": DEV,
        "version": "v",
        "input": INPUT,
        "status": "starting",
        "created_at": "2025-06-01T10:00:00Z",
        "urls": {"get": GET_URL, "cancel": f"{GET_URL}/cancel"},
    }
    throttle = {"status_code": 429, "json": {"detail": DETAIL}}
    requests_mock.post(CREATE_URL, [*[throttle] * 9, {"status_code": 201, "json": answer}])
    assert FluxKontextHook().create_prediction(DEV, INPUT, deadline=T0 + 600).id == PRED_ID
    assert requests_mock.call_count == 10


@pytest.mark.parametrize(
    ("timeout", "execution_timeout", "seconds"),
    [
        (None, None, 1800.0),  # the edit's default timeout
        (90.0, None, 90.0),
        (None, timedelta(minutes=10), 540.0),  # most of execution_timeout: the task fails, not killed
        (3600.0, timedelta(minutes=10), 540.0),  # never past it
        (60.0, timedelta(minutes=10), 60.0),
    ],
)
def test_the_operators_create_deadline(
    timeout: float | None, execution_timeout: timedelta | None, seconds: float
) -> None:
    edit_timeout = wait_timeout(timeout, execution_timeout)
    assert create_deadline(T0, edit_timeout, execution_timeout) == pytest.approx(T0 + seconds)
