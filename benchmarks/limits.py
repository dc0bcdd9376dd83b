"""Scenario 5: under Replicate's limits. The real trigger with its shared budget and watcher, the
provider as it was before them (each trigger polling and backing off alone), and a bare aiohttp loop
that honours the reset, against one emulator process enforcing 3000 requests/min; the low-credit
case end to end; and what one list page costs beside one read (the sweep-or-read rule).

``python -m benchmarks.limits lowcredit BASE_URL`` and ``python -m benchmarks.limits costs
BASE_URL`` are the child processes of the last two (one JSON line each).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.common import MODEL, PROMPT, PYTHON, TINY_PNG, EmulatorProcess, child_env, connection_json
from benchmarks.scale import PollRun, run_pollers

#: Replicate's limit on everything but creates, requests per minute.
OTHERS_PER_MINUTE = 3000
#: Creates are left (almost) unlimited here: the waits are what is measured, and at 600 creates/min
#: 5000 of them would take over 8 minutes to exist. Replicate's burst allowance: 2 s of the rate.
RATE_LIMIT = f"100000,{OTHERS_PER_MINUTE}"
#: (N concurrent waits, poll interval s).
CASES: tuple[tuple[int, float], ...] = ((1000, 1.0), (5000, 1.0))
#: The emulator's timing: flux-kontext-dev's on Replicate (its ``--realistic``).
START_SECONDS, PREDICTION_SECONDS, SPREAD = 0.6, 4.0, 0.5
#: Longest a run may take before unfinished waits count as errors (the run's time is bounded).
MAX_CAP_SECONDS = 60.0
LOW_CREDIT_EDITS = 10

CLIENTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # key: (label, pollers client, connection extras)
    "trigger": (
        "FluxKontextPredictionTrigger: shared budget (3000/min) + list watcher",
        "trigger",
        {"max_requests_per_minute": OTHERS_PER_MINUTE},
    ),
    "before": (
        "the provider before: each trigger polling and backing off alone",
        "trigger",
        {"max_requests_per_minute": 0, "list_min_waits": 0},
    ),
    "aiohttp-reset": ("bare aiohttp loop that waits the named reset on 429", "aiohttp-reset", {}),
}


@dataclass
class LimitRun:
    """One client at one N, with what the emulator answered."""

    key: str
    run: PollRun
    cap: float

    @property
    def requests(self) -> int:
        return self.run.gets

    @property
    def throttled(self) -> int:
        return int(self.run.raw.get("emulator_responses", {}).get("429", 0))

    @property
    def throttled_pct(self) -> float:
        return self.throttled / self.requests * 100 if self.requests else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "cap_s": self.cap,
            "requests": self.requests,
            "throttled": self.throttled,
            **self.run.to_json(),
        }


def bound_seconds(n: int, per_minute: float = OTHERS_PER_MINUTE) -> float:
    """The last of ``n`` predictions polled one by one cannot be seen before this."""
    return n / (per_minute / 60.0)


def cap_for(key: str, n: int, interval: float) -> float:
    if key == "trigger":
        return min(MAX_CAP_SECONDS, START_SECONDS + PREDICTION_SECONDS * (1 + SPREAD) + 4 * interval + 30)
    return min(MAX_CAP_SECONDS, bound_seconds(n) * 1.5 + 30)


def emulator(rate_limit: str = RATE_LIMIT) -> EmulatorProcess:
    return EmulatorProcess(
        prediction_seconds=PREDICTION_SECONDS,
        start_seconds=START_SECONDS,
        extra_args=("--spread", str(SPREAD), "--rate-limit", rate_limit),
    )


def run_cases(cases: tuple[tuple[int, float], ...] = CASES) -> list[LimitRun]:
    runs: list[LimitRun] = []
    with emulator() as emu:
        for n, interval in cases:
            for key, (label, program, extras) in CLIENTS.items():
                if key == "aiohttp-reset" and n > 1000:
                    continue  # its time is the cap (60 s) at 5000: left out so make bench fits 12 min
                cap = cap_for(key, n, interval)
                started = time.monotonic()
                extra = ["--touch-after", "-1"]  # a feeder's read would spend the pollers' budget
                if extras:
                    extra += ["--conn-extra", json.dumps(extras)]
                result = run_pollers(
                    emu, key, n, interval, label=label, extra=extra, cap=cap, program=program
                )
                one = LimitRun(key, result, cap)
                print(
                    f"  limits N={n} {key}: {result.succeeded}/{n} ok, {one.requests} requests "
                    f"({one.throttled} 429), p99 {result.p99_ms:.0f} ms ({time.monotonic() - started:.0f} s)",
                    flush=True,
                )
                runs.append(one)
    return runs


def _child(args: list[str], rate_limit: str | None, timeout: float) -> dict[str, Any]:
    extra = ("--spread", str(SPREAD)) + (("--rate-limit", rate_limit) if rate_limit else ())
    with EmulatorProcess(
        prediction_seconds=PREDICTION_SECONDS, start_seconds=START_SECONDS, extra_args=extra
    ) as emu:
        try:
            out = subprocess.run(
                [PYTHON, "-m", "benchmarks.limits", *args, emu.base_url],
                env=child_env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"killed after {timeout:.0f} s"}
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        result: dict[str, Any] = (
            json.loads(lines[-1]) if lines else {"error": f"exit {out.returncode}: {out.stderr[-1500:]}"}
        )
        result["emulator"] = emu.state()
        return result


def run() -> dict[str, Any]:
    """Every part of the scenario: the cases, the low-credit edits, the page-vs-read costs."""
    print("  list page vs single read", flush=True)
    costs = _child(["costs"], None, 180)
    runs = run_cases()
    print("  low credit", flush=True)
    low = _child(["lowcredit"], "low-credit", 300)
    return {"runs": runs, "low_credit": low, "costs": costs}


# --- child: the low-credit case ---------------------------------------------------------------------


def _lowcredit(base: str) -> dict[str, Any]:
    """10 edits end to end on an account low on credit (1 request/s, 6/min, creates included):
    creates from 'workers' (threads, sync hook, retrying 429 after the named reset), then the
    triggers in one event loop (shared budget at 6/min, watcher).
    """
    os.environ["AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT"] = json.dumps(
        {
            "conn_type": "fluxkontext",
            "host": base,
            "extra": {"max_retries": 30, "max_requests_per_minute": 6, "retry_after_max": 60},
        }
    )
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook
    from airflow_provider_kontext.triggers.kontext import FluxKontextPredictionTrigger

    started = time.monotonic()
    created: dict[int, Any] = {}
    failures: list[str] = []

    def worker(index: int) -> None:
        hook = FluxKontextHook()
        try:
            body = {"prompt": PROMPT, "input_image": TINY_PNG, "aspect_ratio": "1:1"}
            created[index] = hook.create_prediction(MODEL, body)
        except Exception as exc:  # reported, not raised: the run goes on
            failures.append(f"create {index}: {type(exc).__name__}: {exc}"[:300])
        finally:
            hook.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(LOW_CREDIT_EDITS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    created_after = time.monotonic() - started

    async def wait(prediction: Any) -> dict[str, Any]:
        trigger = FluxKontextPredictionTrigger(
            prediction_id=prediction.id, poll_interval=2.0, end_time=time.time() + 600
        )
        async for event in trigger.run():
            payload: dict[str, Any] = event.payload
            return payload
        return {"status": "no event"}

    async def all_waits() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(wait(p) for p in created.values())))

    events = asyncio.run(all_waits())
    return {
        "edits": LOW_CREDIT_EDITS,
        "created": len(created),
        "create_failures": failures,
        "statuses": [e.get("status") for e in events],
        "creates_done_s": round(created_after, 1),
        "wall_s": round(time.monotonic() - started, 1),
    }


# --- child: what a list page costs beside a single read ---------------------------------------------


def _costs(base: str) -> dict[str, Any]:
    """CPU and wall time of one list page of 100 and of one single read, through the hook."""
    os.environ["AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT"] = connection_json(base).replace(
        '"host"', '"extra": {"max_requests_per_minute": 0}, "host"'
    )
    import urllib.request

    from airflow_provider_kontext.hooks.kontext import FluxKontextHook

    ids = []
    body = json.dumps({"input": {"prompt": PROMPT, "input_image": TINY_PNG}}).encode()
    for _ in range(100):
        request = urllib.request.Request(  # noqa: S310 (http://127.0.0.1 only)
            f"{base}/v1/models/{MODEL}/predictions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            ids.append(json.load(response)["id"])
    time.sleep(START_SECONDS * (1 + SPREAD) + PREDICTION_SECONDS * (1 + SPREAD) + 0.5)
    rounds = 60

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    async def measure() -> dict[str, float]:
        hook = FluxKontextHook()
        try:
            await hook.aget_prediction(ids[0])
            await hook.alist_predictions()
            cpu0, wall0 = cpu(), time.perf_counter()
            for i in range(rounds):
                await hook.aget_prediction(ids[i % len(ids)])
            get_cpu, get_wall = cpu() - cpu0, time.perf_counter() - wall0
            cpu0, wall0 = cpu(), time.perf_counter()
            items = 0
            for _ in range(rounds):
                page = await hook.alist_predictions()
                items += len(page.results)
                for item in page.results:  # what a sweep does with each: look its id up
                    item.get("id")
            list_cpu, list_wall = cpu() - cpu0, time.perf_counter() - wall0
        finally:
            await hook.aclose()
        return {
            "get_cpu_us": get_cpu / rounds * 1e6,
            "get_wall_ms": get_wall / rounds * 1e3,
            "page_cpu_us": list_cpu / rounds * 1e6,
            "page_wall_ms": list_wall / rounds * 1e3,
            "items_per_page": items / rounds,
        }

    return asyncio.run(measure())


def main() -> None:
    what, base = sys.argv[1], sys.argv[2]
    result = _lowcredit(base) if what == "lowcredit" else _costs(base)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()


# --- the report's section ---------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def headline(result: dict[str, Any]) -> list[str]:
    """The headline's lines for this scenario."""
    lines = []
    for n, interval in CASES:
        case = {r.key: r for r in result["runs"] if r.run.n == n and r.run.interval == interval}
        trigger, before = case.get("trigger"), case.get("before")
        if trigger is None or before is None:
            continue
        lines.append(
            f"- Under Replicate's limits (3000 requests/min), N = {n} waits: the trigger finished "
            f"{trigger.run.succeeded}/{n} with {_num(trigger.run.requests_per_edit, 2)} requests per edit, "
            f"{_num(trigger.throttled_pct, 1)} % answered 429, p99 detection {_num(trigger.run.p99_ms)} ms "
            f"(one-by-one polling cannot see the last before {bound_seconds(n):,.0f} s); the provider "
            f"before: {before.run.succeeded}/{n} ({before.run.errors} errors: "
            f"{before.run.error_kinds or '-'}), "
            f"{_num(before.throttled_pct, 0)} % of its requests answered 429."
        )
    low = result.get("low_credit") or {}
    if "statuses" in low:
        ok = sum(1 for s in low["statuses"] if s == "succeeded")
        lines.append(
            f"- Low credit (1 request/s, 6/min): {ok}/{low['edits']} edits succeeded, "
            f"{low['emulator']['created_count']} predictions created, in {low['wall_s']:.0f} s."
        )
    return lines


def section(result: dict[str, Any]) -> list[str]:
    runs: list[LimitRun] = result["runs"]
    costs = result.get("costs") or {}
    out = [
        "## 5. Under Replicate's limits",
        "",
        f"The emulator enforces Replicate's account limit on everything but creates ({OTHERS_PER_MINUTE} "
        "requests/min, a burst of 2 s of it; a throttled request gets the documented body "
        '`{"detail": "Request was throttled. Your rate limit resets in ~Ns."}` and no header). Creates '
        "are left almost unlimited (`--rate-limit 100000,3000`): the *waits* are measured, and 5000 "
        "creates at 600/min would take over 8 minutes just to exist. Predictions have flux-kontext-dev's "
        f"timing on Replicate (`--realistic`: {START_SECONDS:g} s `starting` + {PREDICTION_SECONDS:g} s "
        f"processing, each phase ±{SPREAD:.0%} per prediction). The feeder creates N predictions over 1 s "
        "and reads none of them (its read would spend the pollers' budget); each poller starts within "
        "one interval. Every client runs in its own process against the same emulator, reset between "
        "runs, which counts every request and every 429. The triggers are the real "
        "`FluxKontextPredictionTrigger`, deferred without `created_at` (the operator passes it now; "
        "without it the watcher must find each wait in the newest pages, the harder case), driven "
        "as in section 1.",
        "",
        "- **trigger**: the connection sets `max_requests_per_minute: 3000` (the server's limit; the "
        "default is 2400), so the shared budget and the list watcher are on.",
        "- **before**: the same trigger with `max_requests_per_minute: 0, list_min_waits: 0`: each "
        "trigger polls and backs off on its own, as the provider did before.",
        "- **aiohttp + reset**: baseline (a) of section 1 that, on a 429, waits the reset the body names.",
        f"- **bound**: one-by-one polling at {OTHERS_PER_MINUTE}/min cannot look at the last of N "
        "predictions before N / 50 s, however it is done.",
        "- A run is cut after its cap (seconds in the table); waits still open then count as errors.",
        "",
    ]
    rows = []
    for r in runs:
        rows.append(
            [
                f"{r.run.n:,}",
                r.run.label,
                f"{r.run.succeeded}/{r.run.n}",
                (f"{r.run.errors} ({r.run.error_kinds})" if r.run.errors else "0"),
                f"{r.requests:,}",
                f"{r.throttled:,} ({_num(r.throttled_pct, 1)} %)",
                _num(r.run.requests_per_edit, 2),
                f"{_num(r.run.p50_ms)} / {_num(r.run.p99_ms)}",
                _num(r.run.wall_s, 1),
                _num(r.run.cpu_ms_per_edit, 2),
                f"{r.cap:.0f}",
            ]
        )
    for n, _interval in CASES:
        rows.append(
            [
                f"{n:,}",
                "bound: one by one at 3000/min",
                "-",
                "-",
                f"{n:,}",
                "-",
                "1.00",
                "-",
                f"≥ {bound_seconds(n):,.0f}",
                "-",
                "-",
            ]
        )
    header = [
        "N",
        "client",
        "edits done",
        "errors",
        "requests",
        "answered 429",
        "req/edit",
        "detection p50 / p99 ms",
        "all done after s",
        "CPU ms/edit",
        "cap s",
    ]
    out += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    out.append("")
    for n, interval in CASES:
        trigger = next((r for r in runs if r.key == "trigger" and r.run.n == n), None)
        if trigger is None:
            continue
        # The issue sets the p99 goal at N = 1000; beyond, the goal is to beat the one-by-one bound.
        p99_goal = (2 * interval + 1) * 1000 if n <= 1000 else bound_seconds(n) * 1000
        p99_text = (
            f"within two intervals + 1 s ({p99_goal:,.0f} ms), i.e. below the one-by-one bound"
            if n <= 1000
            else f"below the one-by-one bound ({p99_goal:,.0f} ms)"
        )
        out.append(
            f"Goals at N = {n:,}: zero errors: {_met(trigger.run.errors == 0)} ({trigger.run.errors}); "
            f"at most 2 % answered 429: {_met(trigger.throttled_pct <= 2)} "
            f"({_num(trigger.throttled_pct, 1)} %); p99 detection {p99_text}: "
            f"{_met(trigger.run.p99_ms <= p99_goal)} ({_num(trigger.run.p99_ms)} ms); requests per "
            f"edit well under 1: {_met(trigger.run.requests_per_edit < 0.5)} "
            f"({_num(trigger.run.requests_per_edit, 2)})."
        )
        out.append("")
    low = result.get("low_credit") or {}
    out += ["### Low credit: 10 edits end to end", ""]
    if "statuses" in low:
        ok = sum(1 for s in low["statuses"] if s == "succeeded")
        responses = low["emulator"].get("responses", {})
        created = low["emulator"]["created_count"]
        out += [
            "The emulator at `--rate-limit low-credit` (1 request/s and 6 per minute, creates included). "
            'Ten "workers" (threads, the sync hook, as tasks in worker processes) create one edit each '
            "at once, retrying each 429 after the reset its body names (`max_retries: 30`); then ten "
            "triggers wait in one event loop with the connection's budget set to the account's "
            "(`max_requests_per_minute: 6`).",
            "",
            f"{ok}/{low['edits']} edits succeeded; {created} predictions were created (none twice: "
            f"{_met(created == low['edits'])}); creates done after {low['creates_done_s']:.0f} s, all "
            f"edits after {low['wall_s']:.0f} s; the emulator answered "
            + ", ".join(f"{count}x {status}" for status, count in sorted(responses.items()))
            + ". The 429s are the creates' (each worker retries on its own: a process budget cannot "
            "span workers; see docs/rate-limits.md on pools). Goal: 10 edits all succeed, none started twice: "
            f"{_met(ok == low['edits'] and created == low['edits'])}.",
            "",
        ]
        if low.get("create_failures"):
            out += ["Create failures: " + "; ".join(low["create_failures"]), ""]
    else:
        out += [f"Did not complete: {low.get('error', 'no result')}", ""]
    out += ["### Sweep or single reads", ""]
    if "page_cpu_us" in costs:
        ratio = costs["page_cpu_us"] / costs["get_cpu_us"]
        out += [
            f"Measured through the hook against the unlimited emulator (60 of each, 100 predictions): "
            f"one list page of {costs['items_per_page']:.0f} predictions costs "
            f"{costs['page_cpu_us']:,.0f} µs of the client's CPU and {costs['page_wall_ms']:.1f} ms "
            f"wall; one single read {costs['get_cpu_us']:,.0f} µs and {costs['get_wall_ms']:.1f} ms. "
            f"A page costs as much CPU as {ratio:.1f} single reads and answers for up to 100 waits, "
            "and under the limit it costs one request of the budget like a single read. So the watcher "
            "sweeps whenever the waits it can answer for outnumber the pages its last sweep read "
            "(`list_min_waits`, default 2, at least): then a sweep saves requests, which are what the "
            "budget limits, and from about four waits a page also saves CPU. One wait alone reads "
            "alone (a page would cost the same request and more CPU). Sweeps are spaced so that they "
            "take at most half the budget (pages / 25 s at 3000/min, at least 0.25 s, at most 10 s "
            "apart): single reads (failed predictions, a full read with logs every 10 s of "
            "processing, waits missing from the window) keep the other half.",
            "",
        ]
    else:
        out += [f"Not measured: {costs.get('error', 'no result')}", ""]
    return out
