"""``benchmarks/RESULTS.md`` from the scenarios' results: every figure beside its baselines of the
same run, the goals checked, and the method of each scenario.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from benchmarks.common import BENCH_DIR
from benchmarks.scale import LABELS, PREDICTION_SECONDS, START_SECONDS, PollRun
from benchmarks.slots import SlotResult, summary

OK, MISSED = "met", "**missed**"


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(value: float, base: float) -> str:
    if math.isnan(value) or math.isnan(base) or base == 0:
        return "-"
    return f"{value / base:.2f}x"


def _goal(ok: bool) -> str:
    return OK if ok else MISSED


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# --- scenario 1 ------------------------------------------------------------------------------------


def scale_section(runs: list[PollRun]) -> list[str]:
    out = [
        "## 1. Triggerer scale",
        "",
        "The real `FluxKontextPredictionTrigger`, built from its serialized kwargs and driven through "
        "`run()` the way Airflow 3.3's `TriggerRunner.run_trigger` does it: all triggers in one "
        "`asyncio.run()` loop (the default asyncio loop, which is what the 3.3 triggerer uses, not "
        "uvloop), each in its own task with a greenback portal and the trigger's ids bound to the log "
        "context, and logging configured as in the triggerer's runner process (structlog JSON lines at "
        "INFO, unbuffered, into a pipe that another process drains). The connection comes from "
        "`AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT` (`BaseHook.aget_connection` works in a plain process: outside "
        "a task there is no supervisor, and the SDK falls back to the environment-variables backend). "
        f"Predictions take {START_SECONDS:g} s `starting` + {PREDICTION_SECONDS:g} s `processing` (28 "
        "tqdm progress lines). A separate feeder process creates them, spread over one interval; each "
        "poller starts after a pickup delay drawn from one interval (the same seeded draws for every "
        "client), so a prediction completes at a random point between polls. The feeder also reads "
        "each prediction once, 0.4 s after creating it: the emulator runs its Pillow edit only when a "
        "prediction is read during processing, and one first read after its end waits for that edit "
        "behind all others (at N = 5000 that queue, not the poller, set the latency); Replicate runs "
        "the model whether or not anyone polls. Those reads are not counted as the pollers'. Each "
        "client runs in its own process against the same emulator process; the emulator is reset "
        "between runs and counts the requests.",
        "",
        "- **CPU** is the polling process's user + system time from the first prediction handed over "
        "to the last event (the triggers' whole lives, trigger construction and logging included).",
        "- **HTTP req/edit** is `GET /v1/predictions/{id}` requests counted by the emulator per "
        "completed edit; **CPU µs/poll** divides the CPU by those requests.",
        "- **Detection** is from the emulator's `completed_at` to the poller seeing the terminal "
        "status. **RSS/trigger** is the growth of the process's peak RSS over the run, per trigger.",
        "- **Emulator CPU** is the emulator process's CPU over the run's wall time: far below 100 % "
        "means it was not the bottleneck (baseline (a)'s latencies, at most one interval, say the same).",
        "",
    ]
    cases: dict[tuple[int, float], list[PollRun]] = {}
    for run in runs:
        cases.setdefault((run.n, run.interval), []).append(run)
    for (n, interval), case in cases.items():
        limit = next((r for r in case if r.client == "aiohttp"), None)
        base_poll = limit.cpu_us_per_poll if limit else math.nan
        base_edit = limit.cpu_ms_per_edit if limit else math.nan
        out += [f"### N = {n} triggers, {interval:g} s poll interval", ""]
        rows = []
        for r in case:
            rows.append(
                [
                    r.label,
                    f"{r.succeeded}/{r.n}",
                    (f"{r.errors} ({r.error_kinds})" if r.errors else "0"),
                    _num(r.requests_per_edit, 2),
                    _num(r.cpu_us_per_poll),
                    _ratio(r.cpu_us_per_poll, base_poll),
                    _num(r.cpu_ms_per_edit, 2),
                    _ratio(r.cpu_ms_per_edit, base_edit),
                    f"{_num(r.p50_ms)} / {_num(r.p99_ms)}",
                    _num(r.rss_kb, 1),
                    f"{_num(r.emulator_cpu_pct)} %",
                ]
            )
        out += _table(
            [
                "client (one shared per process)",
                "edits done",
                "errors",
                "HTTP req/edit",
                "CPU µs/poll",
                "x (a)",
                "CPU ms/edit",
                "x (a)",
                "detection p50 / p99 ms",
                "RSS KB/trigger",
                "emulator CPU",
            ],
            rows,
        )
        trigger = next((r for r in case if r.client == "trigger"), None)
        if trigger is not None and limit is not None:
            p99_goal = interval * 1000 + 100
            out += [
                "",
                f"Goals for the trigger: zero errors: {_goal(trigger.errors == 0)} ({trigger.errors}); "
                f"CPU per poll within 2x of (a): {_goal(trigger.cpu_us_per_poll <= 2 * base_poll)} "
                f"({_ratio(trigger.cpu_us_per_poll, base_poll)}); CPU per completed edit at or below (a): "
                f"{_goal(trigger.cpu_ms_per_edit <= base_edit)} "
                f"({_ratio(trigger.cpu_ms_per_edit, base_edit)}); "
                f"p99 detection within {p99_goal:,.0f} ms: {_goal(trigger.p99_ms <= p99_goal)} "
                f"({_num(trigger.p99_ms)} ms); RSS under 50 KB per trigger: {_goal(trigger.rss_kb < 50)} "
                f"({_num(trigger.rss_kb, 1)} KB).",
            ]
            quiet = next((r for r in case if r.client == "trigger-quiet"), None)
            if quiet is not None:
                out += [
                    "",
                    "With logging off (an attribution row only: the triggerer logs at INFO) the trigger's "
                    f"CPU per edit is {_ratio(quiet.cpu_ms_per_edit, base_edit)} of (a)'s: the difference "
                    "to the default row is its four log records per edit (status `processing`, the "
                    "model's seed line, status `succeeded`, the final progress bar) going through "
                    "Airflow's structlog pipeline, which (a) does not have.",
                ]
            fixed = next((r for r in case if r.client == "trigger-fixed"), None)
            if fixed is not None:
                out += [
                    "",
                    f'The same trigger with `poll_policy="fixed"` polls as often as (a) and shows the cost '
                    f"of the provider's request path itself: {_ratio(fixed.cpu_us_per_poll, base_poll)} of "
                    "(a) per poll. The adaptive default makes fewer, later-timed polls, so its fixed cost "
                    "per trigger (construction, four log records, the greenback portal) is spread over "
                    "about two polls: a higher figure per poll, a lower one per edit.",
                ]
        out.append("")
    return out


# --- scenario 2 ------------------------------------------------------------------------------------


def slots_section(results: list[SlotResult]) -> list[str]:
    rows = summary(results)
    out = [
        "## 2. Worker-slot cost per edit",
        "",
        "The same batch of emulated edits, run by `airflow dags test` (a real `dag.test()`) in a "
        "fresh `AIRFLOW_HOME` with a migrated sqlite DB and the DAG file "
        "(`benchmarks/dags/kontext_bench_slots.py`) in its DAG folder, three ways: the deferrable "
        "operator (its trigger runs inline in `dag.test`, as the triggerer would run it), the operator "
        "waiting in the worker, and a `PythonOperator` calling `replicate.run` (which holds a "
        "`Prefer: wait` request open). The three variants of one model duration run at the same time.",
        "",
        "**Method.** The slot time per edit is the operator's own time in the worker: `execute`, plus "
        "`execute_complete` after the deferral, timed inside the DAG by a subclass (and the replicate "
        "call by a wrapper). What every task pays whatever its operator (the task runner's start, the "
        "DAG file's parse, the state updates) is left out; a deferrable task pays that twice (start and "
        "resume). As a cross-check, the last column gives the task runner's own segments per edit read "
        'from the `dag.test` log (from "running task" to the deferral or the end; the first edit of '
        "each DAG, which pays the process's imports, left out); in `dag.test` they run in one process, "
        "so they understate a real worker's per-task start.",
        "",
    ]
    table = []
    for row in rows:
        table.append(
            [
                row["variant"],
                f"{row['prediction_seconds']:g} s",
                str(row["edits"]),
                "yes" if row["ok"] else f"no: {row['error'][:120]}",
                _num(row["operator_mean_s"], 3),
                _num(row["operator_max_s"], 3),
                _num(row["segments_per_edit"], 0),
                _num(row["segment_median_s"], 3),
            ]
        )
    out += _table(
        [
            "variant",
            "model run",
            "edits",
            "succeeded",
            "slot s/edit (mean)",
            "slot s/edit (max)",
            "task runs/edit",
            "task-runner s/edit (dag.test, median)",
        ],
        table,
    )
    deferrable = [r for r in rows if r["dag_id"] == "kontext_bench_deferrable"]
    worst = max((r["operator_max_s"] or math.inf) for r in deferrable) if deferrable else math.inf
    ok = bool(deferrable) and all(r["ok"] for r in deferrable) and worst < 0.5
    out += [
        "",
        f"Goal: the deferrable operator holds a slot under 0.5 s per edit however long the model runs: "
        f"{_goal(ok)} (worst edit {_num(worst, 3)} s, for every model duration).",
        "",
    ]
    return out


# --- scenario 3 ------------------------------------------------------------------------------------


def parse_section(result: dict[str, Any]) -> list[str]:
    added = result["added_median_ms"]
    out = [
        "## 3. DAG-parse overhead",
        "",
        "Two DAG files that differ only in their operator: `FluxKontextEditOperator`, or a plain "
        "`airflow.sdk.BaseOperator` subclass taking the same arguments. Each import runs in a fresh "
        "interpreter that has already imported `airflow.sdk` (which every DAG file pays, about a second "
        f"here), alternating the two files and their order, {result['rounds']} times each; the time is "
        "the DAG file's own import (what the DAG processor pays on top for this file).",
        "",
    ]
    out += _table(
        ["DAG file", "import ms (median)", "runs"],
        [
            ["with `FluxKontextEditOperator`", _num(result["kontext_median_ms"], 1), str(result["rounds"])],
            [
                "with a plain `airflow.sdk` operator",
                _num(result["plain_median_ms"], 1),
                str(result["rounds"]),
            ],
            [
                "**added by the provider** (median of paired differences, IQR)",
                f"**{_num(added, 1)}** ({_num(result['added_q1_ms'], 1)}-{_num(result['added_q3_ms'], 1)})",
                str(result["rounds"]),
            ],
        ],
    )
    out += ["", f"Goal: under 20 ms added: {_goal(added < 20)} ({_num(added, 1)} ms).", ""]
    return out


# --- scenario 4 ------------------------------------------------------------------------------------


def policy_section(results: list[tuple[float, str, PollRun]]) -> list[str]:
    out = [
        "## 4. Polling policy",
        "",
        "The real trigger, 200 at a time, with each policy and interval: `fixed` polls at once and "
        "then every `poll_interval`; `adaptive` (the default) waits a moment (one interval, at most "
        "1 s) before its first poll, keeps `poll_interval` while nothing better is known (`starting`, or "
        "a model without a progress bar), and while the model's tqdm progress bar runs polls when the "
        "bar's rate says it ends (half a step later, at most 4 intervals ahead), then 0.2 s, 0.4 s, ... "
        "up to the interval if the estimate passed. Predictions are created over 1 s and each trigger "
        "starts within 1 s of its prediction, whatever the policy. So with a fixed interval longer than "
        "1 s the end falls in a narrow band of phases, not anywhere between two polls: fixed 2 s sees "
        "3.3 s predictions 0.7-1.7 s late but 10.3 s ones 0-2 s late. In general a fixed interval's "
        "latency is spread evenly over one interval (mean half an interval). The list watcher and the "
        "request budget are off here (`list_min_waits: 0`, `max_requests_per_minute: 0`): each wait "
        "reads its prediction alone, as a wait alone on its account does, and the policy decides "
        "when (section 1 and 5 show the default configuration).",
        "",
    ]
    rows = []
    for seconds, _policy, r in results:
        rows.append(
            [
                f"{START_SECONDS + seconds:g} s",
                r.label,
                f"{r.succeeded}/{r.n}",
                _num(r.requests_per_edit, 2),
                _num(r.p50_ms),
                _num(r.p99_ms),
                _num(r.cpu_ms_per_edit, 2),
            ]
        )
    out += _table(
        [
            "prediction",
            "policy",
            "edits done",
            "HTTP req/edit",
            "detection p50 ms",
            "detection p99 ms",
            "CPU ms/edit",
        ],
        rows,
    )
    out += ["", *choice_paragraph(results), ""]
    return out


def choice_paragraph(results: list[tuple[float, str, PollRun]]) -> list[str]:
    by_key = {(s, r.label): r for s, _p, r in results}
    adaptive = by_key.get((PREDICTION_SECONDS, "adaptive, poll_interval=2 s"))
    fixed_1 = by_key.get((PREDICTION_SECONDS, "fixed, poll_interval=1 s"))
    fixed_2 = by_key.get((PREDICTION_SECONDS, "fixed, poll_interval=2 s"))
    fixed_05 = by_key.get((PREDICTION_SECONDS, "fixed, poll_interval=0.5 s"))
    if not (adaptive and fixed_1 and fixed_2 and fixed_05):
        return []
    better_than_all = all(
        adaptive.requests_per_edit <= f.requests_per_edit + 0.05 and adaptive.p99_ms <= f.p99_ms
        for f in (fixed_2,)
    )
    return [
        "**Default: `adaptive`.** "
        f"At the operator's default `poll_interval` of 2 s it made {_num(adaptive.requests_per_edit, 2)} "
        f"requests per edit with p50/p99 detection {_num(adaptive.p50_ms)}/{_num(adaptive.p99_ms)} ms, "
        f"where a fixed 2 s interval made {_num(fixed_2.requests_per_edit, 2)} with "
        f"{_num(fixed_2.p50_ms)}/{_num(fixed_2.p99_ms)} ms"
        + (" (fewer or as few requests *and* lower latency)" if better_than_all else "")
        + f". No fixed interval gets near its latency: a fixed 0.5 s interval still has p50 "
        f"{_num(fixed_05.p50_ms)} ms and needs {_num(fixed_05.requests_per_edit, 2)} requests per edit. "
        "A fixed interval trades requests for latency along one curve (latency ~ half an interval, "
        "requests ~ run time / interval); polling when the progress bar says the edit ends is off that "
        "curve, because the model tells how long it still needs. It falls back to the fixed interval "
        "whenever there is no progress bar to read, so it is never worse than `fixed` by more than the "
        "short first wait; on models without a progress bar the two behave the same. The cap of 4 "
        "intervals bounds how long a failure mid-run can go unseen.",
    ]


# --- the whole report --------------------------------------------------------------------------------

#: The before/after record of the changes made in the provider (static: measured during development).
CHANGES = BENCH_DIR / "CHANGES.md"


def render(
    *,
    command: str,
    facts: dict[str, str],
    started: str,
    seconds: float,
    revision: str,
    scale: list[PollRun] | None,
    slots: list[SlotResult] | None,
    parse: dict[str, Any] | None,
    policy: list[tuple[float, str, PollRun]] | None,
    limits: dict[str, Any] | None = None,
    creates: dict[str, Any] | None = None,
    accounts: dict[str, Any] | None = None,
) -> str:
    out = [
        "# Benchmark results",
        "",
        f"Generated by `{command}` on {started}, in {seconds / 60:.1f} minutes, at commit {revision}. "
        "Every scenario runs against the project's emulator "
        "(`python -m airflow_provider_kontext.testing.emulator`) on 127.0.0.1 in its own process. "
        "Figures are from a 2-core machine shared with other work, so they are noisy: compare figures "
        "within one table (measured side by side in the same run), not across runs.",
        "",
        "## Machine",
        "",
        *[f"- {key}: {value}" for key, value in facts.items()],
        "",
    ]
    out += headline(scale, slots, parse, policy)
    if limits:
        from benchmarks import limits as limits_scenario

        out[-1:-1] = limits_scenario.headline(limits)
    if creates:
        from benchmarks import creates as creates_scenario

        out[-1:-1] = creates_scenario.headline(creates)
    if scale:
        out += scale_section(scale)
    if slots:
        out += slots_section(slots)
    if parse:
        out += parse_section(parse)
    if policy:
        out += policy_section(policy)
    if limits:
        from benchmarks import limits as limits_scenario

        out += limits_scenario.section(limits)
    if creates:
        from benchmarks import creates as creates_scenario

        out += creates_scenario.section(creates)
    if accounts:
        from benchmarks import accounts as accounts_scenario

        out += accounts_scenario.section(accounts)
    out += [CHANGES.read_text()]
    return "\n".join(out).rstrip() + "\n"


def headline(
    scale: list[PollRun] | None,
    slots: list[SlotResult] | None,
    parse: dict[str, Any] | None,
    policy: list[tuple[float, str, PollRun]] | None,
) -> list[str]:
    lines = ["## Headline", ""]
    for n, interval in ((1000, 1.0), (5000, 5.0), (100, 1.0)):
        case = [r for r in scale or [] if (r.n, r.interval) == (n, interval)]
        trigger = next((r for r in case if r.client == "trigger"), None)
        limit = next((r for r in case if r.client == "aiohttp"), None)
        if trigger is None or limit is None:
            continue
        others = [r for r in case if r.client in ("httpx", "replicate")]
        baseline_text = "; ".join(
            f"{LABELS[r.client].split(' ', 1)[0]} {r.succeeded}/{r.n} done, "
            f"{_ratio(r.cpu_ms_per_edit, limit.cpu_ms_per_edit)} CPU/edit"
            + (f", {r.errors} errors" if r.errors else "")
            for r in others
        )
        lines.append(
            f"- N = {n}, {interval:g} s: the trigger finished {trigger.succeeded}/{n} edits with "
            f"{trigger.errors} errors at {_ratio(trigger.cpu_ms_per_edit, limit.cpu_ms_per_edit)} "
            "of (a)'s CPU per edit and "
            f"{_ratio(trigger.cpu_us_per_poll, limit.cpu_us_per_poll)} per poll, "
            f"{_num(trigger.requests_per_edit, 1)} requests per edit against (a)'s "
            f"{_num(limit.requests_per_edit, 1)}, p99 detection {_num(trigger.p99_ms)} ms against "
            f"{_num(limit.p99_ms)} ms, {_num(trigger.rss_kb, 1)} KB per trigger. Baselines: {baseline_text}."
        )
    if slots:
        rows = summary(slots)
        for seconds in sorted({r["prediction_seconds"] for r in rows}):
            parts = [
                f"{r['variant']} {_num(r['operator_mean_s'], 2)} s"
                for r in rows
                if r["prediction_seconds"] == seconds
            ]
            lines.append(f"- Worker slot per edit, {seconds:g} s model run: " + "; ".join(parts) + ".")
    if parse:
        lines.append(
            f"- DAG-parse overhead of the provider: {_num(parse['added_median_ms'], 1)} ms per DAG file."
        )
    if policy:
        para = choice_paragraph(policy)
        if para:
            lines.append(
                "- Polling policy: " + para[0].split("**", 2)[2].strip().split(". No fixed")[0] + "."
            )
    lines.append("")
    return lines
