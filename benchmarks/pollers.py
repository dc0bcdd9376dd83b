"""N concurrent pollers in one asyncio event loop, one client per process: the way the Airflow
triggerer runs triggers. Prints one JSON line with what was measured.

Usage: ``python -m benchmarks.pollers CLIENT N INTERVAL BASE_URL [options]``

CLIENT is one of:

- ``trigger``: the real :class:`FluxKontextPredictionTrigger`, built from its serialized kwargs and
  driven through ``run()`` as ``TriggerRunner.run_trigger`` does in Airflow 3.3: under the default
  asyncio loop (the triggerer calls ``asyncio.run``), each trigger in its own task with a greenback
  portal and the trigger's ids bound to the log context, logging configured as in the triggerer's
  runner process (structlog, JSON lines at INFO into a pipe that another process drains).
- ``hook``: a fixed-interval loop over ``FluxKontextHook.aget_prediction`` (no trigger, no logging):
  splits the trigger's cost into the hook's and the rest.
- ``aiohttp``: baseline (a), a minimal fixed-interval loop over one shared ``aiohttp.ClientSession``.
- ``aiohttp-trigger``: baseline (a) written by hand as an Airflow trigger and run as ``trigger`` is
  (the triggerer's harness and logging, the Task SDK imported): a control that tells the trigger's
  own CPU from what any trigger costs in the triggerer's process.
- ``httpx``: baseline (b), the same loop over one shared ``httpx.AsyncClient`` with httpx's own pool.
- ``replicate``: baseline (c), the ``replicate`` client's ``Prediction.async_wait`` per prediction.

Predictions are created by :mod:`benchmarks.feeder` in another process, spread over one interval;
each poller starts after a pickup delay drawn uniformly from one interval (the same seeded draws for
every client), so the moment a prediction completes falls at a random point between two polls.
CPU is this process's user + system time from the first prediction handed over to the last event;
detection latency is from the emulator's ``completed_at`` to the poller's terminal event.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import json
import os
import random
import resource
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.common import PYTHON, child_env

TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
UNUSED_TOKEN = "r8_bench_unused"  # noqa: S105 (the emulator runs without auth; replicate wants one)
PROFILES: list[str] = []  # pyinstrument's text, written out after the loop


class Tally:
    """What the pollers report: completion times, terminal statuses, errors, client-side polls."""

    def __init__(self) -> None:
        self.polls = 0
        self.finished: list[tuple[float, str | None]] = []  # (time seen, completed_at text)
        self.statuses: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def done(self, status: str, completed_at: Any) -> None:
        self.statuses[status] += 1
        if status == "succeeded":
            self.finished.append((time.time(), completed_at if isinstance(completed_at, str) else None))
        else:
            self.errors[f"status {status}"] += 1


Poller = Callable[[int, str], Awaitable[None]]


# --- clients --------------------------------------------------------------------------------------


async def make_aiohttp(
    base: str, interval: float, tally: Tally
) -> tuple[Poller, Callable[[], Awaitable[None]]]:
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def poll(index: int, prediction_id: str) -> None:
        url = f"{base}/v1/predictions/{prediction_id}"
        while True:
            async with session.get(url) as response:
                data = await response.json()
            tally.polls += 1
            if data["status"] in TERMINAL:
                tally.done(data["status"], data["completed_at"])
                return
            await asyncio.sleep(interval)

    return poll, session.close


async def make_aiohttp_reset(
    base: str, interval: float, tally: Tally
) -> tuple[Poller, Callable[[], Awaitable[None]]]:
    """Baseline (a) that honours Replicate's 429: it waits the reset the body names, then polls on."""
    import re

    import aiohttp

    resets = re.compile(r"resets in ~(\d+)s")
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def poll(index: int, prediction_id: str) -> None:
        url = f"{base}/v1/predictions/{prediction_id}"
        while True:
            async with session.get(url) as response:
                data = await response.json()
                status = response.status
            tally.polls += 1
            if status == 429:
                match = resets.search(str(data.get("detail", "")))
                await asyncio.sleep(float(match.group(1)) if match else interval)
                continue
            if data["status"] in TERMINAL:
                tally.done(data["status"], data["completed_at"])
                return
            await asyncio.sleep(interval)

    return poll, session.close


async def make_httpx(
    base: str, interval: float, tally: Tally
) -> tuple[Poller, Callable[[], Awaitable[None]]]:
    import httpx

    client = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None), trust_env=False
    )

    async def poll(index: int, prediction_id: str) -> None:
        url = f"{base}/v1/predictions/{prediction_id}"
        while True:
            data = (await client.get(url)).json()
            tally.polls += 1
            if data["status"] in TERMINAL:
                tally.done(data["status"], data["completed_at"])
                return
            await asyncio.sleep(interval)

    return poll, client.aclose


async def make_replicate(
    base: str, interval: float, tally: Tally
) -> tuple[Poller, Callable[[], Awaitable[None]]]:
    os.environ["REPLICATE_POLL_INTERVAL"] = str(interval)
    from replicate.client import Client

    client = Client(api_token=UNUSED_TOKEN, base_url=base, trust_env=False)

    async def poll(index: int, prediction_id: str) -> None:
        prediction = await client.predictions.async_get(prediction_id)
        await prediction.async_wait()  # polls every client.poll_interval until terminal
        tally.done(prediction.status, prediction.completed_at)

    async def close() -> None:
        await client._async_client.aclose()

    return poll, close


async def make_hook(base: str, interval: float, tally: Tally) -> tuple[Poller, Callable[[], Awaitable[None]]]:
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook

    keeper = FluxKontextHook()
    await keeper.aget_account()  # warm: connection lookup, imports, the shared client

    async def poll(index: int, prediction_id: str) -> None:
        hook = FluxKontextHook()
        try:
            while True:
                prediction = await hook.aget_prediction(prediction_id)
                tally.polls += 1
                if prediction.is_terminal:
                    completed = prediction.completed_at.isoformat() if prediction.completed_at else None
                    tally.done(prediction.status.value, completed)
                    return
                await asyncio.sleep(interval)
        finally:
            await hook.aclose()

    return poll, keeper.aclose


async def enter_triggerer_harness(index: int, portal: bool) -> None:
    """Do for the current task what ``TriggerRunner.run_trigger`` does before a trigger's ``run()``:
    a greenback portal, and the trigger's ids bound to the log context.
    """
    import greenback
    from structlog.contextvars import bind_contextvars

    if portal:
        await greenback.ensure_portal()
    bind_contextvars(
        trigger_id=index,
        ti_id=f"0193e8a0-0000-7000-8000-{index:012d}",
        dag_id="bench",
        task_id="edit",
        run_id="bench_run",
        try_number=1,
        map_index=index,
    )


async def make_aiohttp_trigger(
    base: str, interval: float, tally: Tally, portal: bool
) -> tuple[Poller, Callable[[], Awaitable[None]]]:
    """Baseline (a) written as an Airflow trigger by hand, run in the triggerer's harness as ``trigger``
    is: the same loop over one shared session, in a process that has imported and set up what the
    triggerer's has (the Task SDK, its logging), so the two differ only in the trigger's own work.
    """
    import aiohttp
    from airflow.triggers.base import BaseTrigger, TriggerEvent

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    class BarePollTrigger(BaseTrigger):  # type: ignore[misc]
        def __init__(self, prediction_id: str, poll_interval: float) -> None:
            super().__init__()
            self.prediction_id = prediction_id
            self.poll_interval = poll_interval

        def serialize(self) -> tuple[str, dict[str, Any]]:
            return "bench.BarePollTrigger", {
                "prediction_id": self.prediction_id,
                "poll_interval": self.poll_interval,
            }

        async def run(self) -> Any:
            url = f"{base}/v1/predictions/{self.prediction_id}"
            while True:
                async with session.get(url) as response:
                    data = await response.json()
                tally.polls += 1
                if data["status"] in TERMINAL:
                    yield TriggerEvent(data)  # type: ignore[no-untyped-call]
                    return
                await asyncio.sleep(self.poll_interval)

    async def poll(index: int, prediction_id: str) -> None:
        _, kwargs = BarePollTrigger(prediction_id, interval).serialize()
        trigger = BarePollTrigger(**json.loads(json.dumps(kwargs)))
        del kwargs  # the triggerer keeps the trigger, not what it was built from
        trigger.trigger_id = index
        await enter_triggerer_harness(index, portal)
        async for event in trigger.run():
            tally.done(str(event.payload["status"]), event.payload["completed_at"])

    return poll, session.close


async def make_trigger(
    base: str,
    interval: float,
    tally: Tally,
    trigger_kwargs: dict[str, Any],
    portal: bool,
    created_at: dict[str, str] | None = None,
) -> tuple[Poller, Callable[[], Awaitable[None]]]:
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook
    from airflow_provider_kontext.triggers.kontext import FluxKontextPredictionTrigger

    keeper = FluxKontextHook()
    await (
        keeper.aget_account()
    )  # warm: connection lookup, imports, the shared client (as in a busy triggerer)
    classpath, _ = FluxKontextPredictionTrigger(prediction_id="warm").serialize()
    module, name = classpath.rsplit(".", 1)
    trigger_class = getattr(importlib.import_module(module), name)

    def known_created_at(prediction_id: str) -> dict[str, Any]:
        known = (created_at or {}).get(prediction_id)
        return {} if known is None else {"created_at": known}

    async def poll(index: int, prediction_id: str) -> None:
        # What the operator defers with, serialized and rebuilt as the triggerer does (the operator's
        # own instance stays on the worker: only the kwargs reach the triggerer).
        _, kwargs = FluxKontextPredictionTrigger(
            prediction_id=prediction_id,
            poll_interval=interval,
            end_time=time.time() + 600,
            **trigger_kwargs,
            **known_created_at(prediction_id),
        ).serialize()
        trigger = trigger_class(**json.loads(json.dumps(kwargs)))
        del kwargs  # the triggerer keeps the trigger, not what it was built from
        trigger.trigger_id = index
        await enter_triggerer_harness(index, portal)
        async for event in trigger.run():
            payload = event.payload
            tally.done(str(payload.get("status")), payload.get("completed_at"))

    return poll, keeper.aclose


# --- the run --------------------------------------------------------------------------------------


def configure_triggerer_logging(level: str) -> subprocess.Popen[bytes] | None:
    """Logging as in the triggerer's runner process: structlog JSON lines (no masking processor,
    the supervisor masks) written unbuffered to a pipe drained by another process. ``off`` keeps
    the same set-up at level CRITICAL, so nothing the pollers log is formatted or written.
    """
    from airflow.sdk.log import configure_logging

    drain = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)  # noqa: S607
    assert drain.stdin is not None
    output = os.fdopen(drain.stdin.fileno(), "wb", buffering=0, closefd=False)
    configure_logging(
        json_output=True,
        log_level="CRITICAL" if level == "off" else level,
        output=output,
        sending_to_supervisor=True,
    )
    return drain


def barrier(spec: str) -> None:
    """``DIR:K``: say this process is ready (a file in DIR), then wait until K processes are, so
    that several pollers processes start feeding together whenever each finished warming up.
    """
    folder, count = spec.rsplit(":", 1)
    Path(folder, str(os.getpid())).touch()
    while len(list(Path(folder).iterdir())) < int(count):
        time.sleep(0.05)


async def trace_budget(trace: list[list[float]], start: float) -> None:
    """Every 0.25 s, the account budget's [seconds, rate per minute, requests granted, cuts] (the
    trigger's; nothing where it has none).
    """
    from airflow_provider_kontext.hooks.accounts import AccountRateLimiters

    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(0.25)
        for budget in AccountRateLimiters._budgets.get(loop, {}).values():
            now = round(time.monotonic() - start, 2)
            trace.append([now, round(budget.rate * 60), budget.granted, budget.decreases])


def _completed_at(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tally = Tally()
    extra = json.loads(args.trigger_kwargs) if args.trigger_kwargs else {}
    makers: dict[str, Callable[[], Awaitable[tuple[Poller, Callable[[], Awaitable[None]]]]]] = {
        "aiohttp": lambda: make_aiohttp(args.base, args.interval, tally),
        "aiohttp-reset": lambda: make_aiohttp_reset(args.base, args.interval, tally),
        "aiohttp-trigger": lambda: make_aiohttp_trigger(args.base, args.interval, tally, not args.no_portal),
        "httpx": lambda: make_httpx(args.base, args.interval, tally),
        "replicate": lambda: make_replicate(args.base, args.interval, tally),
        "hook": lambda: make_hook(args.base, args.interval, tally),
        "trigger": lambda: make_trigger(
            args.base, args.interval, tally, extra, not args.no_portal, created if args.created_at else None
        ),
    }
    created: dict[str, str] = {}
    poll, close = await makers[args.client]()
    if args.barrier:
        await asyncio.to_thread(barrier, args.barrier)
    rng = random.Random(args.seed)
    pickup_window = args.interval if args.pickup is None else args.pickup
    pickup = [rng.uniform(0, pickup_window) for _ in range(args.n)]

    async def one(index: int, prediction_id: str) -> None:
        await asyncio.sleep(pickup[index])
        try:
            await poll(index, prediction_id)
        except Exception as exc:
            tally.errors[type(exc).__name__] += 1

    feeder = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "benchmarks.feeder",
        args.base,
        str(args.n),
        str(args.interval if args.spread is None else args.spread),
        str(args.touch_after),
        args.output_format,
        stdout=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    assert feeder.stdout is not None
    gc.collect()
    profiler = None
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.monotonic()
    trace: list[list[float]] = []
    tracer = asyncio.create_task(trace_budget(trace, wall0)) if args.client == "trigger" else None
    tasks: list[asyncio.Task[None]] = []
    feed_failures = touches = 0
    while line := await feeder.stdout.readline():
        first, second, *rest = line.decode().split()
        if first == "done":
            feed_failures, touches = int(second), int(rest[0])
            break
        if rest and rest[0] != "-":
            created[second] = rest[0]
        tasks.append(asyncio.create_task(one(int(first), second)))
    deadline = wall0 + args.cap
    unfinished = 0
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
        unfinished = len(pending)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=10)
    wall = time.monotonic() - wall0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    if tracer is not None:
        tracer.cancel()
        await asyncio.gather(tracer, return_exceptions=True)
    await feeder.wait()
    if profiler is not None:
        profiler.stop()
        PROFILES.append(profiler.output_text(unicode=False, color=False, show_all=True))
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    with contextlib.suppress(Exception):
        await close()
    latencies = [
        (seen - completed) * 1000
        for seen, text in tally.finished
        if (completed := _completed_at(text)) is not None
    ]
    errors = dict(tally.errors)
    if unfinished:
        errors["not finished within the cap"] = unfinished
    if feed_failures:
        errors["create failed"] = feed_failures
    return {
        "client": args.client,
        "n": args.n,
        "interval": args.interval,
        "trigger_kwargs": extra,
        "portal": not args.no_portal,
        "log_level": args.log_level,
        "conn_extra": json.loads(args.conn_extra) if args.conn_extra else {},
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 4),
        "client_polls": tally.polls,
        "succeeded": tally.statuses.get("succeeded", 0),
        "statuses": dict(tally.statuses),
        "errors": errors,
        "latencies_ms": [round(x, 2) for x in latencies],
        "rss_kb_per_poller": round((usage1.ru_maxrss - rss0) / args.n, 2),
        "rss_peak_kb": usage1.ru_maxrss,
        "feeder_touches": touches,
        "budget_trace": trace,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pollers")
    parser.add_argument(
        "client",
        choices=["trigger", "hook", "aiohttp", "aiohttp-reset", "aiohttp-trigger", "httpx", "replicate"],
    )
    parser.add_argument("n", type=int)
    parser.add_argument("interval", type=float)
    parser.add_argument("base")
    parser.add_argument("--cap", type=float, default=60.0, help="seconds before unfinished pollers are cut")
    parser.add_argument("--seed", type=int, default=20261125)
    parser.add_argument("--spread", type=float, default=None, help="creates spread over (default: interval)")
    parser.add_argument("--pickup", type=float, default=None, help="max pickup delay (default: interval)")
    parser.add_argument("--touch-after", type=float, default=0.4, help="the feeder's read after creation")
    parser.add_argument("--trigger-kwargs", default="", help="JSON: extra kwargs of the trigger")
    parser.add_argument("--no-portal", action="store_true", help="no greenback portal per trigger")
    parser.add_argument("--log-level", default="INFO", help="INFO (as the triggerer), DEBUG, or off")
    parser.add_argument("--profile", default="", help="write a pyinstrument profile of the run here")
    parser.add_argument("--conn-extra", default="", help="JSON: the connection's extras")
    parser.add_argument("--created-at", action="store_true", help="defer with created_at, as the operator")
    parser.add_argument("--output-format", default="", help="the edits' output_format (feeder.py)")
    parser.add_argument("--barrier", default="", help="DIR:K: start with K processes (see barrier())")
    args = parser.parse_args()
    conn: dict[str, Any] = {"conn_type": "fluxkontext", "host": args.base}
    if args.conn_extra:
        conn["extra"] = json.loads(args.conn_extra)
    os.environ["AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT"] = json.dumps(conn)
    in_triggerer = ("trigger", "hook", "aiohttp-trigger")
    drain = configure_triggerer_logging(args.log_level) if args.client in in_triggerer else None
    result = asyncio.run(run(args))
    if args.profile and PROFILES:
        Path(args.profile).write_text(PROFILES[0])
    if drain is not None and drain.stdin is not None:
        drain.stdin.close()
        drain.wait(timeout=10)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
