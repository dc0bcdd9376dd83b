"""``python -m benchmarks`` (``make bench``): run every scenario against the emulator on 127.0.0.1
and write ``benchmarks/RESULTS.md`` (and the raw figures to ``benchmarks/results.json``).

Options: ``--only scale,slots,parse,policy,limits,creates,realairflow,accounts`` runs some scenarios
(the report then holds only those); ``--out PATH`` writes the report elsewhere; ``--airflow-sizes``,
``--airflow-slots``, ``--airflow-holds`` and ``--airflow-repeats`` size the real-Airflow section
(default: N = 100 at 16 and 32 slots, the operator's default hold, once).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import accounts, common, creates, limits, parse, policy, realairflow, report, scale, slots

SCENARIOS = ("scale", "policy", "slots", "parse", "limits", "creates", "realairflow", "accounts")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios to run")
    parser.add_argument("--out", default=str(common.BENCH_DIR / "RESULTS.md"), help="the report's path")
    parser.add_argument("--airflow-sizes", default="100", help="realairflow: edits per run (N), e.g. 100,300")
    parser.add_argument("--airflow-slots", default="16,32", help="realairflow: worker slots, comma-separated")
    parser.add_argument(
        "--airflow-holds",
        default="default",
        help="realairflow: min_defer_seconds values or Airflow-only controls, e.g. default,0,airflow-run",
    )
    parser.add_argument("--airflow-repeats", type=int, default=1, help="realairflow: runs of each size")
    parser.add_argument(
        "--airflow-bytecode",
        default="yes",
        help="realairflow: yes (packages compiled to .pyc, as pip leaves them), no (from source), or yes,no",
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")

    command = "make bench" if args.only == ",".join(SCENARIOS) else f"python -m benchmarks --only {args.only}"
    started = datetime.now(timezone.utc)
    clock = common.Stopwatch()
    facts = common.machine_facts()
    results: dict[str, Any] = {}
    scale_runs = slot_runs = policy_runs = None
    parse_result = None
    if "scale" in chosen:
        print("1. triggerer scale", flush=True)
        scale_runs = scale.run()
        results["scale"] = [r.to_json() for r in scale_runs]
    if "policy" in chosen:
        print("4. polling policy", flush=True)
        policy_runs = policy.run()
        results["policy"] = [{"prediction_seconds": s, **r.to_json()} for s, _p, r in policy_runs]
    if "slots" in chosen:
        print("2. worker-slot cost", flush=True)
        slot_runs = slots.run()
        results["slots"] = [r.to_json() for r in slot_runs]
        for row in slots.summary(slot_runs):
            print(f"  {row['variant']}, {row['prediction_seconds']:g} s: {row['operator_mean_s']} s/edit")
    if "parse" in chosen:
        print("3. DAG-parse overhead", flush=True)
        parse_result = parse.run(rounds=12)
        results["parse"] = parse_result
        print(f"  added {parse_result['added_median_ms']:.1f} ms")

    limits_result = None
    if "limits" in chosen:
        print("5. under Replicate's limits", flush=True)
        limits_result = limits.run()
        results["limits"] = {
            "runs": [r.to_json() for r in limits_result["runs"]],
            "low_credit": limits_result["low_credit"],
            "costs": limits_result["costs"],
        }

    creates_result = None
    if "creates" in chosen:
        print("6. creates at the create limit", flush=True)
        creates_result = creates.run()
        results["creates"] = creates_result

    airflow_result = None
    if "realairflow" in chosen:
        print("7. through a real Airflow", flush=True)
        airflow_result = realairflow.run(
            sizes=_ints(args.airflow_sizes),
            slots=_ints(args.airflow_slots),
            holds=tuple(hold.strip() for hold in args.airflow_holds.split(",") if hold.strip()),
            repeats=args.airflow_repeats,
            bytecode=tuple(
                flag.strip() == "yes" for flag in args.airflow_bytecode.split(",") if flag.strip()
            ),
        )
        results["realairflow"] = airflow_result

    accounts_result = None
    if "accounts" in chosen:
        print("8. several triggerers, one account", flush=True)
        accounts_result = accounts.run()
        results["accounts"] = {
            "shared": [r.to_json() for r in accounts_result["shared"]],
            "burst": accounts_result["burst"],
            "simulations": [s.to_json() for s in accounts_result["simulations"]],
            "sweeps": [s.to_json() for s in accounts_result["sweeps"]],
            "unlimited": [r.to_json() for r in accounts_result["unlimited"]],
            "load": accounts_result["load"],
        }

    text = report.render(
        command=command,
        facts=facts,
        started=started.strftime("%Y-%m-%d %H:%M UTC"),
        seconds=clock.seconds,
        revision=common.git_revision(),
        scale=scale_runs,
        slots=slot_runs,
        parse=parse_result,
        policy=policy_runs,
        limits=limits_result,
        creates=creates_result,
        accounts=accounts_result,
    )
    if airflow_result is not None:
        text = text.rstrip("\n") + "\n\n" + "\n".join(realairflow.section(airflow_result))
    out = Path(args.out)
    out.write_text(text)
    out.with_name("results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {out} in {clock.seconds / 60:.1f} minutes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
