"""The real-Airflow section's baseline (:mod:`benchmarks.realairflow`): the same edits created and
awaited by one plain process with the provider's async hook, against the emulator at Replicate's
limits and realistic timing. ``python -m benchmarks.hookonly plain BASE_URL N CONCURRENCY`` is that
process (one JSON line).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import MODEL, PYTHON, TINY_PNG, child_env

#: The emulator's timing: flux-kontext-dev's on Replicate (its ``--realistic``).
START_SECONDS, PREDICTION_SECONDS, SPREAD = 0.6, 4.0, 0.5
#: Replicate's create limit, per second.
CREATES_PER_SECOND = 10.0


def bound_seconds(n: int) -> float:
    """The account's bound: N creates at 600/min, then one model run."""
    return n / CREATES_PER_SECOND + START_SECONDS + PREDICTION_SECONDS


def predictions_of(emu: Any) -> tuple[int, int]:
    """(predictions, prompts with more than one) of an in-process emulator."""
    prompts: dict[str, int] = {}
    for record in emu.predictions.values():
        prompts[record.prompt] = prompts.get(record.prompt, 0) + 1
    return sum(prompts.values()), sum(1 for count in prompts.values() if count > 1)


def plain(n: int, concurrency: int) -> dict[str, Any]:
    """Create and await ``n`` edits from one process with the async hook: ``concurrency`` creates at
    a time, every wait polling each second.
    """
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook

    async def main() -> dict[str, Any]:
        hook = FluxKontextHook()
        gate = asyncio.Semaphore(concurrency)
        ended: list[float] = []
        failed = 0

        async def edit(index: int) -> None:
            nonlocal failed
            async with gate:
                try:
                    prediction = await hook.acreate_prediction(
                        MODEL, {"prompt": f"plain edit {index}", "input_image": TINY_PNG}
                    )
                except Exception:
                    failed += 1
                    return
            while not prediction.is_terminal:
                await asyncio.sleep(1.0)
                prediction = await hook.aget_prediction(str(prediction.id))
            ended.append(time.monotonic())

        before = resource.getrusage(resource.RUSAGE_SELF)  # imports and start-up left out
        started = time.monotonic()
        try:
            await asyncio.gather(*(edit(i) for i in range(n)))
        finally:
            await hook.aclose()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "wall_s": (max(ended) - started) if ended else None,
            "succeeded": len(ended),
            "failed_creates": failed,
            "cpu_ms_per_edit": (usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime)
            / n
            * 1000,
        }

    return asyncio.run(main())


def run_plain(n: int, concurrency: int) -> dict[str, Any]:
    """:func:`plain` in its own process against a fresh emulator; its figures and the predictions made."""
    from airflow_provider_kontext.testing.emulator import FluxKontextEmulator

    with FluxKontextEmulator(
        prediction_seconds=PREDICTION_SECONDS,
        start_seconds=START_SECONDS,
        spread=SPREAD,
        output_scale=0.02,
        rate_limit="replicate",
    ) as emu:
        out = subprocess.run(
            [PYTHON, "-m", "benchmarks.hookonly", "plain", emu.base_url, str(n), str(concurrency)],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=n / CREATES_PER_SECOND + 300,
            check=False,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        result: dict[str, Any] = (
            json.loads(lines[-1]) if lines else {"error": f"exit {out.returncode}: {out.stderr[-800:]}"}
        )
        result.update(n=n, concurrency=concurrency, bound_s=bound_seconds(n))
        result["predictions"], result["duplicated_prompts"] = predictions_of(emu)
    return result


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "plain":
        os.environ["AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT"] = json.dumps(
            {"conn_type": "fluxkontext", "host": sys.argv[2]}
        )
        print(json.dumps(plain(int(sys.argv[3]), int(sys.argv[4]))), flush=True)
    else:
        sys.exit("usage: python -m benchmarks.hookonly plain BASE_URL N CONCURRENCY")
