"""Creates predictions on the emulator, spread evenly over a time window, and prints
``<index> <prediction id>`` per line as each is created: the workers' part (create, then defer),
kept out of the process whose CPU is measured.

It also reads each prediction once, ``TOUCH_AFTER`` seconds after its creation (once processing has
started): the emulator runs its (Pillow) edit only when a prediction is read during processing, and
a prediction first read after its end waits for that edit, queued behind every other. Replicate
runs the model whether or not anyone polls; the touch makes the emulator do the same, so detection
latency measures the poller, not the emulator's edit queue. The touches are reported (``done
<failures> <touches>``) and not counted as the pollers' requests. A negative ``TOUCH_AFTER`` makes
none (under rate limits a touch would spend the pollers' budget). Each line also carries the
prediction's ``created_at``, which the operator hands its trigger.

Usage: ``python -m benchmarks.feeder BASE_URL N SPREAD_SECONDS TOUCH_AFTER [OUTPUT_FORMAT]`` (the
edits' ``output_format``; default the model's, webp: PNG makes the emulator's edits far cheaper)
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import aiohttp

from benchmarks.common import MODEL, PROMPT, TINY_PNG


async def feed(base_url: str, n: int, spread: float, touch_after: float, output_format: str = "") -> None:
    url = f"{base_url}/v1/models/{MODEL}/predictions"
    body: dict[str, Any] = {"input": {"prompt": PROMPT, "input_image": TINY_PNG, "aspect_ratio": "1:1"}}
    if output_format:
        body["input"]["output_format"] = output_format
    out = sys.stdout
    failures = 0
    touches = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        started = time.monotonic()

        async def touch(prediction_id: str) -> None:
            nonlocal touches
            await asyncio.sleep(touch_after)
            try:
                async with session.get(f"{base_url}/v1/predictions/{prediction_id}") as response:
                    await response.read()
                touches += 1
            except aiohttp.ClientError:
                touches += 1  # it may have reached the emulator: counted all the same

        async def create(index: int) -> None:
            nonlocal failures
            delay = started + spread * index / n - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            for _ in range(50):
                try:
                    async with session.post(url, json=body) as response:
                        if response.status == 201:
                            prediction = await response.json()
                            out.write(f"{index} {prediction['id']} {prediction.get('created_at', '-')}\n")
                            out.flush()
                            if touch_after >= 0:
                                await touch(prediction["id"])
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            failures += 1

        await asyncio.gather(*(create(i) for i in range(n)))
    out.write(f"done {failures} {touches}\n")
    out.flush()


def main() -> None:
    base_url, n, spread, touch_after = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    asyncio.run(feed(base_url, n, spread, touch_after, sys.argv[5] if len(sys.argv) > 5 else ""))


if __name__ == "__main__":
    main()
