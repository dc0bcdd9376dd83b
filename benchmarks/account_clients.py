"""The child programs of scenario 8 (:mod:`benchmarks.accounts`), each printing one JSON line.

``python -m benchmarks.account_clients other BASE_URL PER_MINUTE``: another program on the account,
sending ``GET /v1/account`` at a fixed pace until SIGTERM. ``python -m benchmarks.account_clients
burst BASE_URL N``: ``N`` predictions that have all ended, then ``N`` triggers opened at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import time
from typing import Any

from benchmarks.common import MODEL, PROMPT, TINY_PNG, percentile

#: The waits' poll interval, and the predictions' timing on the emulator (as in the shared runs).
INTERVAL = 1.0
START_SECONDS, PREDICTION_SECONDS, SPREAD = 0.6, 4.0, 0.5


async def _other(base: str, per_minute: float) -> dict[str, Any]:
    """Another program on the account: GET /v1/account at a fixed pace until SIGTERM, whatever it
    is answered.
    """
    import aiohttp

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    sent = throttled = 0
    gap = 60.0 / per_minute
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            nonlocal throttled
            async with session.get(f"{base}/v1/account") as response:
                await response.read()
                throttled += response.status == 429

        tasks = set()
        next_at = time.monotonic()
        while not stop.is_set():
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
            next_at += gap
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"sent": sent, "throttled": throttled, "per_minute": per_minute}


async def _burst(base: str, n: int) -> dict[str, Any]:
    """``n`` predictions that have all ended, then ``n`` triggers opened at once (as the operator
    defers: with ``created_at``; connection defaults): seconds from the opening to each event.
    """
    import aiohttp

    os.environ["AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT"] = json.dumps({"conn_type": "fluxkontext", "host": base})
    from airflow_provider_kontext.triggers.kontext import FluxKontextPredictionTrigger

    body = {
        "input": {"prompt": PROMPT, "input_image": TINY_PNG, "aspect_ratio": "1:1", "output_format": "png"}
    }
    async with aiohttp.ClientSession() as session:

        async def create() -> dict[str, Any]:
            async with session.post(f"{base}/v1/models/{MODEL}/predictions", json=body) as response:
                result: dict[str, Any] = await response.json()
                return result

        created = await asyncio.gather(*(create() for _ in range(n)))
        await asyncio.sleep((START_SECONDS + PREDICTION_SECONDS) * (1 + SPREAD) + 0.5)
        for prediction in created:  # read each once (the emulator edits on the first read), paced
            while True:
                async with session.get(f"{base}/v1/predictions/{prediction['id']}") as response:
                    await response.read()
                if response.status != 429:
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(0.025)
        await asyncio.sleep(3.0)  # the account's burst allowance fills up again
        async with session.get(f"{base}/_emulator/state") as response:
            before = await response.json()
    opened = time.monotonic()

    async def wait(prediction: dict[str, Any]) -> tuple[float, str]:
        trigger = FluxKontextPredictionTrigger(
            prediction_id=prediction["id"],
            poll_interval=INTERVAL,
            end_time=time.time() + 120,
            created_at=prediction["created_at"],
        )
        async for event in trigger.run():
            return time.monotonic() - opened, str(event.payload.get("status"))
        return math.nan, "no event"

    events = await asyncio.gather(*(wait(p) for p in created))
    async with aiohttp.ClientSession() as session, session.get(f"{base}/_emulator/state") as response:
        state = await response.json()
    seconds = [s for s, _ in events]
    return {
        "n": n,
        "succeeded": sum(1 for _, status in events if status == "succeeded"),
        "max_s": round(max(seconds), 3),
        "p50_s": round(percentile(seconds, 50), 3),
        "requests": state["request_count"] - before["request_count"],
        "throttled": state.get("responses", {}).get("429", 0) - before.get("responses", {}).get("429", 0),
    }


def main() -> None:
    what, base, number = sys.argv[1], sys.argv[2], float(sys.argv[3])
    result = asyncio.run(_other(base, number) if what == "other" else _burst(base, int(number)))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
