"""Scenario 4: polling policy. The real trigger with fixed intervals against the adaptive policy
(``poll_policy="adaptive"``: a short first wait, then the model's progress bar times the next poll),
on requests per edit, detection latency and CPU per edit, for a short and a longer model run.

All runs use the same triggerer-like pickup: predictions created over 1 s, each trigger started
within 1 s of its prediction, so only the policy differs between rows.
"""

from __future__ import annotations

import json
import time

from benchmarks.common import EmulatorProcess
from benchmarks.scale import START_SECONDS, PollRun, run_pollers

N = 200
PICKUP = 1.0
#: (prediction seconds, [(policy, interval)]): the operator's default interval is 2 s.
PLAN: tuple[tuple[float, tuple[tuple[str, float], ...]], ...] = (
    (
        3.0,
        (
            ("fixed", 0.5),
            ("fixed", 1.0),
            ("fixed", 2.0),
            ("fixed", 5.0),
            ("adaptive", 1.0),
            ("adaptive", 2.0),
            ("adaptive", 5.0),
        ),
    ),
    (10.0, (("fixed", 2.0), ("adaptive", 2.0))),
)


def run(n: int = N) -> list[tuple[float, str, PollRun]]:
    results: list[tuple[float, str, PollRun]] = []
    for seconds, variants in PLAN:
        with EmulatorProcess(prediction_seconds=seconds, start_seconds=START_SECONDS) as emulator:
            for policy, interval in variants:
                started = time.monotonic()
                result = run_pollers(
                    emulator,
                    "trigger",
                    n,
                    interval,
                    label=f"{policy}, poll_interval={interval:g} s",
                    # Each wait reads alone and unpaced (list watcher and request budget off), as
                    # one wait of an account does: the policy decides when those reads happen.
                    extra=[
                        "--trigger-kwargs",
                        json.dumps({"poll_policy": policy}),
                        "--conn-extra",
                        json.dumps({"list_min_waits": 0, "max_requests_per_minute": 0}),
                    ],
                    pickup=PICKUP,
                )
                print(
                    f"  {seconds:g} s predictions, {policy} {interval:g} s: "
                    f"{result.requests_per_edit:.2f} req/edit, p50 {result.p50_ms:.0f} / p99 "
                    f"{result.p99_ms:.0f} ms ({time.monotonic() - started:.0f} s)",
                    flush=True,
                )
                results.append((seconds, policy, result))
    return results
