"""Test the account's rate limiter shared per account per event loop (``hooks/rate_limit.py``).

The request budget shared per account per event loop (``hooks/rate_limit.py``): shared across hooks,
one per account, paused by a 429, polls ordered by their prediction's expected end, none starved.

Times are asserted only from below (a grant cannot come before the pause ends) or as an order, so a
busy machine makes these tests slower, never wrong.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from airflow_provider_kontext.hooks.accounts import AccountRateLimiters, account_key
from airflow_provider_kontext.hooks.connection import ClientSettings
from airflow_provider_kontext.hooks.kontext import FluxKontextHook
from airflow_provider_kontext.hooks.rate_limit import AccountRateLimiter

TOKEN = "r8_budget_test_token_0123456789"


def settings(token: str | None = TOKEN, base_url: str = "https://api.replicate.com", **extra: Any) -> Any:
    return ClientSettings("c", base_url, token=token, **extra)


async def test_one_budget_per_account_in_a_loop() -> None:
    first = AccountRateLimiters.get(settings())
    assert first is not None
    assert AccountRateLimiters.get(settings()) is first  # another hook of the same account
    assert AccountRateLimiters.get(settings(token="r8_other_token_000000")) is not first
    assert AccountRateLimiters.get(settings(base_url="https://proxy.example")) is not first
    assert AccountRateLimiters.get(settings(max_requests_per_minute=0)) is None


def test_each_event_loop_has_its_own() -> None:
    async def get() -> AccountRateLimiter | None:
        return AccountRateLimiters.get(settings())

    assert asyncio.run(get()) is not asyncio.run(get())


async def test_hooks_of_one_account_share_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two hooks with different connection ids but the same account draw from one budget."""
    seen = 0

    async def answer(request: web.Request) -> web.Response:
        nonlocal seen
        seen += 1
        return web.json_response({"id": "p1", "status": "processing"})

    app = web.Application()
    app.router.add_get("/v1/predictions/{pid}", answer)
    async with TestServer(app, host="127.0.0.1") as server:
        base = str(server.make_url("")).rstrip("/")
        for conn_id in ("a", "b"):
            conn = {"conn_type": "fluxkontext", "host": base, "password": TOKEN}
            conn["extra"] = {"max_requests_per_minute": 600}  # type: ignore[assignment]
            monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
        hooks = [FluxKontextHook("a"), FluxKontextHook("b")]
        try:
            for hook in hooks:
                await hook.aget_prediction("p1")
            budgets = {id(AccountRateLimiters.get(await hook.aget_settings())) for hook in hooks}
            assert len(budgets) == 1
            (budget,) = {AccountRateLimiters.get(await hook.aget_settings()) for hook in hooks}
            assert budget is not None
            assert budget.granted == 2
            assert seen == 2
        finally:
            for hook in hooks:
                await hook.aclose()


def test_the_token_never_shows() -> None:
    key = account_key(settings())
    assert TOKEN not in key
    assert key.startswith("https://api.replicate.com#")
    assert TOKEN not in repr(AccountRateLimiter(60))


async def test_a_429_pauses_every_request_until_the_reset_then_resumes_paced() -> None:
    budget = AccountRateLimiter(600)  # 10 per second
    assert budget.try_acquire()
    started = time.monotonic()
    budget.pause(0.3)
    assert not budget.try_acquire()  # nobody goes during the pause
    granted: list[float] = []

    async def one() -> None:
        await budget.acquire()
        granted.append(time.monotonic() - started)

    await asyncio.gather(*(one() for _ in range(4)))
    assert min(granted) >= 0.3
    gaps = [b - a for a, b in itertools.pairwise(granted)]
    # The bucket restarts empty: one request per 0.1 s, not all four at the reset.
    assert all(gap >= 0.08 for gap in gaps), gaps
    assert budget.pauses == 1


async def test_the_hook_pauses_the_account_on_a_429(monkeypatch: pytest.MonkeyPatch) -> None:
    """A throttled poll (Replicate's body, no header) pauses the other hooks of its account too."""
    calls: list[tuple[str, float]] = []
    throttled = True

    async def answer(request: web.Request) -> web.Response:
        nonlocal throttled
        calls.append((request.match_info["pid"], time.monotonic()))
        if throttled:
            throttled = False
            detail = "Request was throttled. Your rate limit resets in ~1s."
            return web.json_response({"detail": detail}, status=429)
        return web.json_response({"id": request.match_info["pid"], "status": "processing"})

    app = web.Application()
    app.router.add_get("/v1/predictions/{pid}", answer)
    async with TestServer(app, host="127.0.0.1") as server:
        conn = {"conn_type": "fluxkontext", "host": str(server.make_url("")), "password": TOKEN}
        monkeypatch.setenv("AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT", json.dumps(conn))
        first, second = FluxKontextHook(), FluxKontextHook()
        try:
            await first.aget_prediction("one")  # 429, then after the reset: answered
            await second.aget_prediction("two")
        finally:
            await first.aclose()
            await second.aclose()
    (_, throttled_at), (_, retried_at), (_, other_at) = calls
    assert retried_at - throttled_at >= 1.0
    assert other_at >= retried_at


async def test_polls_of_predictions_expected_to_end_first_go_first() -> None:
    budget = AccountRateLimiter(600, max_queue_seconds=100)
    budget.pause(0.05)  # the bucket is empty: everyone queues
    order: list[str] = []
    now = time.time()

    async def one(name: str, priority: float | None) -> None:
        await budget.acquire(priority)
        order.append(name)

    await asyncio.gather(
        one("ends in 30 s", now + 30),
        one("ends in 10 s", now + 10),
        one("no estimate (due now)", None),
        one("ends in 20 s", now + 20),
        one("overdue", now - 5),
    )
    assert order == ["overdue", "no estimate (due now)", "ends in 10 s", "ends in 20 s", "ends in 30 s"]


async def test_no_poll_starves() -> None:
    """Check that a poll expected to end far off still goes after ``max_queue_seconds``.

    A poll whose prediction is expected to end far off still goes once it has waited
    ``max_queue_seconds``, while polls expected to end sooner keep coming.
    """
    budget = AccountRateLimiter(1200, max_queue_seconds=0.3, adaptive=False)  # 20 per second
    budget.pause(0.0)
    order: list[str] = []
    flooding = True

    async def far() -> None:
        await budget.acquire(time.time() + 3600)
        order.append("far")

    async def urgent() -> None:
        while flooding:
            await budget.acquire(time.time() - 60)
            order.append("urgent")

    far_task = asyncio.create_task(far())
    flood = [asyncio.create_task(urgent()) for _ in range(5)]
    await asyncio.wait_for(far_task, timeout=30)
    flooding = False
    await asyncio.gather(*flood)
    assert "far" in order
    assert order.index("far") < len(order) - 1  # served while the urgent ones still came
    assert order.index("far") >= 1  # ... and not before they had their turn


async def test_a_canceled_wait_takes_nothing() -> None:
    budget = AccountRateLimiter(600)
    budget.pause(0.1)
    waiter = asyncio.create_task(budget.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    await budget.acquire()
    assert budget.granted == 1
