"""Test the shared watcher (``triggers/watcher.py``): the real trigger against the emulator.

The shared watcher (``triggers/watcher.py``): the real trigger against the emulator on 127.0.0.1,
many waits answered from the list, one wait polling alone, a prediction missing from the list's
window, paging past 100, a triggerer restart, and two triggerers watching one account.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import requests
from PIL import Image

from airflow_provider_kontext.testing import FluxKontextEmulator
from airflow_provider_kontext.triggers import watcher as watcher_module
from airflow_provider_kontext.triggers.kontext import FluxKontextPredictionTrigger

DEV = "/v1/models/black-forest-labs/flux-kontext-dev/predictions"


def png_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


BODY = {"input": {"prompt": "x", "input_image": png_uri()}}


@pytest.fixture
def emu(monkeypatch: pytest.MonkeyPatch) -> Iterator[FluxKontextEmulator]:
    with FluxKontextEmulator(prediction_seconds=0.6, start_seconds=0.1, output_scale=0.02) as emulator:
        conn = {"conn_type": "fluxkontext", "host": emulator.base_url}
        monkeypatch.setenv("AIRFLOW_CONN_FLUX_KONTEXT_DEFAULT", json.dumps(conn))
        monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
        yield emulator


def create(emu: FluxKontextEmulator, count: int) -> list[dict[str, Any]]:
    with requests.Session() as http:
        http.trust_env = False
        answers = [http.post(emu.base_url + DEV, json=BODY, timeout=30) for _ in range(count)]
    assert all(answer.status_code == 201 for answer in answers)
    return [answer.json() for answer in answers]


def trigger(prediction: dict[str, Any], **kwargs: Any) -> FluxKontextPredictionTrigger:
    """As the operator defers, serialized and rebuilt as the triggerer does."""
    made = FluxKontextPredictionTrigger(prediction_id=prediction["id"], poll_interval=0.5, **kwargs)
    _classpath, serialized = made.serialize()
    return FluxKontextPredictionTrigger(**json.loads(json.dumps(serialized)))


async def wait_all(triggers: list[FluxKontextPredictionTrigger]) -> list[dict[str, Any]]:
    async def first(one: FluxKontextPredictionTrigger) -> dict[str, Any]:
        async for event in one.run():
            payload: dict[str, Any] = event.payload
            return payload
        raise AssertionError("no event")

    return list(await asyncio.wait_for(asyncio.gather(*(first(t) for t in triggers)), timeout=120))


def counts(emu: FluxKontextEmulator) -> tuple[int, int]:
    """(list requests, single reads) the emulator saw."""
    lists = sum(1 for r in emu.requests if r.method == "GET" and r.path.split("?")[0] == "/v1/predictions")
    singles = sum(1 for r in emu.requests if r.method == "GET" and r.path.startswith("/v1/predictions/"))
    return lists, singles


def no_watchers_left() -> bool:
    return all(not watchers for watchers in watcher_module.PredictionWatcher._watchers.values())


async def test_many_waits_are_answered_from_the_list(emu: FluxKontextEmulator) -> None:
    predictions = create(emu, 40)
    events = await wait_all([trigger(p, created_at=p["created_at"]) for p in predictions])
    assert [e["status"] for e in events] == ["succeeded"] * 40
    assert {e["prediction_id"] for e in events} == {p["id"] for p in predictions}
    assert all(e["output"] for e in events)
    lists, singles = counts(emu)
    assert lists >= 1
    assert lists + singles < 40  # fewer requests than waits: one look each would already be 40
    assert no_watchers_left()


async def test_one_wait_polls_alone(emu: FluxKontextEmulator) -> None:
    (prediction,) = create(emu, 1)
    (event,) = await wait_all([trigger(prediction)])
    assert event["status"] == "succeeded"
    lists, singles = counts(emu)
    assert lists == 0
    assert singles >= 1
    assert no_watchers_left()


async def test_waits_without_created_at_are_found_in_the_newest_page(emu: FluxKontextEmulator) -> None:
    """Triggers deferred without ``created_at`` (older operators) still share the list."""
    predictions = create(emu, 20)
    events = await wait_all([trigger(p) for p in predictions])
    assert [e["status"] for e in events] == ["succeeded"] * 20
    lists, singles = counts(emu)
    assert lists >= 1
    assert lists + singles < 20


async def test_a_prediction_missing_from_the_window_is_read_alone(emu: FluxKontextEmulator) -> None:
    """Check that a trigger whose window misses its prediction reads alone and ends like the others.

    One trigger claims a ``created_at`` later than the truth, so the window, which starts at the
    oldest claimed ``created_at`` (less a margin), does not reach its prediction: it reads alone and
    ends like the others.
    """
    predictions = create(emu, 1)
    await asyncio.sleep(watcher_module.WINDOW_MARGIN_MICROS / 1e6 + 1)
    predictions += create(emu, 9)
    later = (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()
    triggers = [trigger(p, created_at=p["created_at"]) for p in predictions[1:]]
    triggers.append(trigger(predictions[0], created_at=later))
    events = await wait_all(triggers)
    assert [e["status"] for e in events] == ["succeeded"] * 10
    singles_of_missing = [
        r for r in emu.requests if r.method == "GET" and r.path == f"/v1/predictions/{predictions[0]['id']}"
    ]
    assert singles_of_missing


async def test_paging_past_one_page(emu: FluxKontextEmulator) -> None:
    predictions = create(emu, 130)
    events = await wait_all([trigger(p, created_at=p["created_at"]) for p in predictions])
    assert [e["status"] for e in events] == ["succeeded"] * 130
    lists, singles = counts(emu)
    # The 30 oldest are on the second page: read there (no read of their own for each).
    assert lists >= 2
    assert singles < 30


async def test_a_failed_prediction_is_read_in_full_for_its_error(emu: FluxKontextEmulator) -> None:
    """Check that a failure listed without logs gets its error and log tail from a read of its own.

    The list shows it ``failed`` but without logs: the event's error and log tail come from a
    read of its own.
    """
    emu.faults.fail_predictions(1, error="the model ran out of memory")
    predictions = create(emu, 6)
    events = await wait_all([trigger(p, created_at=p["created_at"]) for p in predictions])
    by_id = {e["prediction_id"]: e for e in events}
    failed = by_id[predictions[0]["id"]]
    assert failed["status"] == "failed"
    assert "out of memory" in failed["error"]
    assert all(by_id[p["id"]]["status"] == "succeeded" for p in predictions[1:])
    assert any(r.path == f"/v1/predictions/{predictions[0]['id']}" for r in emu.requests)


async def test_a_restart_picks_the_waits_up_again(emu: FluxKontextEmulator) -> None:
    """The triggerer stops mid-wait (its triggers canceled); a new one runs them from their kwargs."""
    predictions = create(emu, 12)
    triggers = [trigger(p, created_at=p["created_at"]) for p in predictions]
    running = [asyncio.ensure_future(wait_all([t])) for t in triggers]
    await asyncio.sleep(0.3)
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    assert no_watchers_left()

    def new_triggerer() -> list[dict[str, Any]]:
        return asyncio.run(wait_all([trigger(p, created_at=p["created_at"]) for p in predictions]))

    events = await asyncio.to_thread(new_triggerer)
    assert [e["status"] for e in events] == ["succeeded"] * 12


async def test_two_triggerers_watching_one_account(emu: FluxKontextEmulator) -> None:
    """Two event loops (two triggerers) with waits of the same account each sweep for their own."""
    predictions = create(emu, 24)
    results: dict[int, list[dict[str, Any]]] = {}

    def triggerer(index: int, share: list[dict[str, Any]]) -> None:
        results[index] = asyncio.run(wait_all([trigger(p, created_at=p["created_at"]) for p in share]))

    threads = [threading.Thread(target=triggerer, args=(i, predictions[i::2])) for i in range(2)]
    for thread in threads:
        thread.start()
    await asyncio.to_thread(lambda: [thread.join(120) for thread in threads])
    events = results[0] + results[1]
    assert sorted(e["prediction_id"] for e in events) == sorted(p["id"] for p in predictions)
    assert all(e["status"] == "succeeded" for e in events)


# --- the hook's list method ------------------------------------------------------------------------


async def test_alist_predictions_pages_newest_first_from_created_after(emu: FluxKontextEmulator) -> None:
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook

    predictions = create(emu, 105)
    async with FluxKontextHook() as hook:
        first = await hook.alist_predictions(created_after=predictions[0]["created_at"])
        assert len(first.results) == 100
        assert first.results[0]["id"] == predictions[-1]["id"]  # newest first
        assert "logs" not in first.results[0]
        assert first.next_cursor
        second = await hook.alist_predictions(
            created_after=predictions[0]["created_at"], cursor=first.next_cursor
        )
        assert [item["id"] for item in second.results] == [p["id"] for p in reversed(predictions[:5])]
        assert second.next_cursor is None
        later = await hook.alist_predictions(created_after=predictions[100]["created_at"])
        assert len(later.results) == 5


def test_a_query_in_the_path_joins_the_base_urls_own() -> None:
    from airflow_provider_kontext.hooks.connection import ClientSettings

    settings = ClientSettings("c", "https://proxy.example/replicate?key=abc")
    assert settings.url("/v1/predictions?cursor=x") == (
        "https://proxy.example/replicate/v1/predictions?key=abc&cursor=x"
    )
    assert settings.url("/v1/predictions") == "https://proxy.example/replicate/v1/predictions?key=abc"
