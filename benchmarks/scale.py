"""Scenario 1: triggerer scale. The real trigger and the three baselines, each in its own process
(:mod:`benchmarks.pollers`), against one emulator process, case by case, baselines beside it.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.common import (
    PYTHON,
    EmulatorProcess,
    child_env,
    count_requests,
    percentile,
)

#: (N triggers, poll interval s): the issue's cases.
CASES: tuple[tuple[int, float], ...] = ((100, 1.0), (1000, 1.0), (5000, 5.0))
#: The clients of each case: the trigger first, then the baselines (a), (b), (c).
CLIENTS = ("trigger", "aiohttp", "httpx", "replicate")
LABELS = {
    "trigger": "FluxKontextPredictionTrigger (adaptive, the default)",
    "trigger-fixed": "FluxKontextPredictionTrigger, poll_policy=fixed",
    "trigger-quiet": "FluxKontextPredictionTrigger, logging off (attribution only)",
    "hook": "FluxKontextHook.aget_prediction loop (no trigger, no logging)",
    "aiohttp": "(a) aiohttp ClientSession loop: the limit",
    "aiohttp-trigger": "(a) written as a trigger by hand, in the triggerer's harness (control)",
    "httpx": "(b) httpx.AsyncClient loop, httpx's own pool",
    "replicate": "(c) replicate 1.0 Prediction.async_wait",
}
#: Clients that are a pollers client run with other options (``run_pollers`` adds them).
VARIANT_OF = {"trigger-fixed": "trigger", "trigger-quiet": "trigger"}
PREDICTION_SECONDS = 3.0
START_SECONDS = 0.3


@dataclass
class PollRun:
    """One run of :mod:`benchmarks.pollers`, with the emulator's view of it."""

    label: str
    client: str
    n: int
    interval: float
    raw: dict[str, Any]
    gets: int
    emulator_cpu_s: float

    @property
    def succeeded(self) -> int:
        return int(self.raw.get("succeeded", 0))

    @property
    def errors(self) -> int:
        return sum(int(v) for v in self.raw.get("errors", {}).values())

    @property
    def error_kinds(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.raw.get("errors", {}).items()))

    @property
    def cpu_s(self) -> float:
        return float(self.raw.get("cpu_s", math.nan))

    @property
    def cpu_us_per_poll(self) -> float:
        return self.cpu_s / self.gets * 1e6 if self.gets else math.nan

    @property
    def cpu_ms_per_edit(self) -> float:
        return self.cpu_s / self.succeeded * 1e3 if self.succeeded else math.nan

    @property
    def requests_per_edit(self) -> float:
        return self.gets / self.succeeded if self.succeeded else math.nan

    @property
    def latencies(self) -> list[float]:
        return list(self.raw.get("latencies_ms", []))

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies, 50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies, 99)

    @property
    def rss_kb(self) -> float:
        return float(self.raw.get("rss_kb_per_poller", math.nan))

    @property
    def wall_s(self) -> float:
        return float(self.raw.get("wall_s", math.nan))

    @property
    def emulator_cpu_pct(self) -> float:
        return self.emulator_cpu_s / self.wall_s * 100 if self.wall_s else math.nan

    def to_json(self) -> dict[str, Any]:
        raw = {k: v for k, v in self.raw.items() if k != "latencies_ms"}
        return {
            "label": self.label,
            "client": self.client,
            "n": self.n,
            "interval": self.interval,
            "gets": self.gets,
            "emulator_cpu_s": self.emulator_cpu_s,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "cpu_us_per_poll": self.cpu_us_per_poll,
            "cpu_ms_per_edit": self.cpu_ms_per_edit,
            "requests_per_edit": self.requests_per_edit,
            **raw,
        }


def cap_seconds(n: int, interval: float, prediction_seconds: float, pickup: float | None = None) -> float:
    """How long a run may take before unfinished pollers count as errors: creation spread, pickup,
    the prediction, a few intervals, and slack for the slowest baselines.
    """
    pickup = interval if pickup is None else pickup
    return interval + pickup + START_SECONDS + prediction_seconds + 2 * interval + 8.0


def run_pollers(
    emulator: EmulatorProcess,
    client: str,
    n: int,
    interval: float,
    *,
    label: str | None = None,
    extra: list[str] | None = None,
    pickup: float | None = None,
    cap: float | None = None,
    program: str | None = None,
) -> PollRun:
    """Run one poller process against a freshly reset emulator (``program``: the pollers' client,
    where ``client`` names a variant of it; ``cap``: seconds before unfinished pollers count as
    errors).
    """
    emulator.reset()
    if cap is None:
        cap = cap_seconds(n, interval, emulator.prediction_seconds, pickup)
    args = [
        PYTHON,
        "-m",
        "benchmarks.pollers",
        program or VARIANT_OF.get(client, client),
        str(n),
        str(interval),
        emulator.base_url,
    ]
    args += ["--cap", f"{cap:g}", *(extra or [])]
    if pickup is not None:
        args += ["--pickup", f"{pickup:g}", "--spread", f"{pickup:g}"]
    emulator_cpu = emulator.cpu_seconds()
    try:
        # A loop starved by thousands of failing pollers may not stop itself at the cap: kill it.
        out = subprocess.run(
            args, env=child_env(), capture_output=True, text=True, timeout=cap + 15, check=False
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        raw: dict[str, Any] = (
            json.loads(lines[-1])
            if lines
            else {
                "errors": {f"poller process failed (exit {out.returncode})": n},
                "stderr": out.stderr[-2000:],
            }
        )
    except subprocess.TimeoutExpired:
        raw = {"errors": {f"process killed {cap + 15:.0f} s after the start, none reported": n}}
    emulator_cpu = emulator.cpu_seconds() - emulator_cpu
    state = emulator.state()
    raw["emulator_responses"] = state.get("responses", {})
    gets, _ = count_requests(state)
    gets -= int(raw.get("feeder_touches", 0))  # the feeder's one read per prediction (see feeder.py)
    return PollRun(label or LABELS.get(client, client), client, n, interval, raw, gets, emulator_cpu)


def run(cases: tuple[tuple[int, float], ...] = CASES, repeat_limit: int = 1) -> list[PollRun]:
    """Every case with every client; with ``repeat_limit`` > 1 the trigger and baseline (a) run that
    many times at N >= 1000 (alternating) and the median run by CPU is kept.
    """
    runs: list[PollRun] = []
    with EmulatorProcess(prediction_seconds=PREDICTION_SECONDS, start_seconds=START_SECONDS) as emulator:
        for n, interval in cases:
            clients: list[str] = list(CLIENTS)
            if (n, interval) == (1000, 1.0):
                clients[1:1] = ["trigger-fixed", "trigger-quiet"]
            repeated: dict[str, list[PollRun]] = {}
            for round_ in range(repeat_limit if n >= 1000 else 1):
                for client in clients:
                    if round_ > 0 and client not in ("trigger", "aiohttp"):
                        continue
                    extra = {
                        "trigger-fixed": ["--trigger-kwargs", json.dumps({"poll_policy": "fixed"})],
                        "trigger-quiet": ["--log-level", "off"],
                    }.get(client, [])
                    started = time.monotonic()
                    result = run_pollers(emulator, client, n, interval, extra=extra)
                    print(
                        f"  N={n} {interval:g}s {client}: {result.succeeded}/{n} ok, "
                        f"{result.cpu_us_per_poll:.0f} us/poll, {result.cpu_ms_per_edit:.2f} ms/edit, "
                        f"p99 {result.p99_ms:.0f} ms ({time.monotonic() - started:.0f} s)",
                        flush=True,
                    )
                    repeated.setdefault(client, []).append(result)
            for client in clients:
                tries = sorted(repeated[client], key=lambda r: r.cpu_s)
                runs.append(tries[len(tries) // 2])
    return runs
