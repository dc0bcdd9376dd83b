"""Test the batch trigger's wait (``BatchWatch``), the pacing of creates, and the size bounds.

The batch trigger's wait (``BatchWatch``) with a fake hook, the pacing of creates, and the size
bounds that let a batch of 10,000 fit: trigger kwargs, state store values, the event.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from unittest import mock

import pytest

from airflow_provider_kontext.edits.batch_ledger import CHUNK, SUCCEEDED, BatchLedger
from airflow_provider_kontext.exceptions import (
    FluxKontextAuthError,
    FluxKontextNotFoundError,
    FluxKontextServerError,
)
from airflow_provider_kontext.models import PredictionPage
from airflow_provider_kontext.operators.batch_steps import Pacer
from airflow_provider_kontext.triggers import batch as batch_module
from airflow_provider_kontext.triggers.batch import BatchWatch, FluxKontextBatchTrigger, sweep


def rid(number: int) -> str:
    """Return a Replicate-shaped id (26 base32 characters)."""
    return f"{number:08d}qorzdhgbfurvjtvhg6d"[:26].ljust(26, "x")


class FakeHook:
    """The account's list over a dict of statuses, 100 a page, newest first; counts requests."""

    def __init__(self, statuses: dict[str, str]) -> None:
        self.statuses = statuses
        self.pages = 0
        self.reads: list[str] = []
        self.fail_next: list[Exception] = []
        self.hidden: set[str] = set()

    async def alist_predictions(self, *, created_after: str | None = None, cursor: str | None = None) -> Any:
        if self.fail_next:
            raise self.fail_next.pop(0)
        self.pages += 1
        ids = [pid for pid in reversed(list(self.statuses)) if pid not in self.hidden]
        start = int(cursor or 0)
        chunk = ids[start : start + 100]
        more = start + 100 < len(ids)
        return PredictionPage(
            results=[
                {"id": pid, "status": self.statuses[pid], "output": ["https://x/o.png"]} for pid in chunk
            ],
            next=f"https://api/v1/predictions?cursor={start + 100}" if more else None,
        )

    async def aget_prediction(self, prediction_id: str) -> Any:
        self.reads.append(prediction_id)
        if prediction_id not in self.statuses:
            raise FluxKontextNotFoundError("gone", status=404)
        prediction = mock.Mock(is_terminal=self.statuses[prediction_id] in ("succeeded", "failed"))
        prediction.model_dump.return_value = {"id": prediction_id, "status": self.statuses[prediction_id]}
        return prediction


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_sweep_pages_until_every_wanted_id_is_seen() -> None:
    hook = FakeHook({rid(n): "succeeded" for n in range(350)})
    found = run(sweep(hook, {rid(349), rid(300)}, None))  # the newest: on the first page
    assert set(found) == {rid(349), rid(300)}
    assert hook.pages == 1
    found = run(sweep(hook, {rid(0)}, None))  # the oldest: the last of four pages
    assert set(found) == {rid(0)}
    assert hook.pages == 1 + 4


def test_watch_ends_when_all_are_terminal_and_counts_outcomes() -> None:
    statuses = {rid(n): "processing" for n in range(5)}
    hook = FakeHook(statuses)
    finals: dict[str, Any] = {}
    watch = BatchWatch(
        list(statuses), None, None, poll_interval=0, log=mock.Mock(), on_final=finals.__setitem__
    )

    async def finish_later() -> tuple[str, str | None]:
        task = asyncio.create_task(watch.run(hook))
        await asyncio.sleep(0.01)
        for n, pid in enumerate(statuses):
            statuses[pid] = "failed" if n == 0 else "succeeded"
        return await task

    assert run(finish_later()) == ("done", None)
    assert dict(watch.counts) == {"failed": 1, "succeeded": 4}
    assert set(finals) == set(statuses)


def test_watch_reads_on_their_own_what_the_list_does_not_show() -> None:
    hook = FakeHook({rid(1): "succeeded", rid(2): "succeeded"})
    hook.hidden = {rid(2)}
    watch = BatchWatch([rid(1), rid(2), rid(3)], None, None, poll_interval=0, log=mock.Mock())
    # rid(3) no longer exists: reported as lost, not waited for until the deadline.
    finals: dict[str, Any] = {}
    watch._on_final = finals.__setitem__
    assert run(watch.run(hook))[0] == "done"
    assert finals[rid(2)]["status"] == "succeeded"
    assert finals[rid(3)]["status"] == "lost"


def test_watch_times_out_at_its_deadline() -> None:
    hook = FakeHook({rid(1): "processing"})
    watch = BatchWatch([rid(1)], None, 0.0, poll_interval=0, log=mock.Mock())
    status, message = run(watch.run(hook))
    assert status == "timeout"
    assert "1 of 1" in str(message)


def test_watch_rides_out_transient_errors_but_not_a_refused_token() -> None:
    hook = FakeHook({rid(1): "succeeded"})
    hook.fail_next = [FluxKontextServerError("503", status=503)] * 3
    assert run(BatchWatch([rid(1)], None, None, poll_interval=0, log=mock.Mock()).run(hook))[0] == "done"
    hook.fail_next = [FluxKontextAuthError("401", status=401)]
    status, message = run(BatchWatch([rid(1)], None, None, poll_interval=0, log=mock.Mock()).run(hook))
    assert status == "error"
    assert "401" in str(message)


def test_progress_is_logged_at_most_every_ten_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(batch_module.time, "monotonic", lambda: clock[0])
    log = mock.Mock()
    watch = BatchWatch([rid(1)], None, None, poll_interval=0, log=log)
    for _ in range(5):
        watch.report()
        clock[0] += 3
    assert log.call_count == 2  # at 1000 and at 1012
    watch.report(final=True)
    assert log.call_count == 3


def test_trigger_event_is_counts_only_and_kwargs_of_ten_thousand_stay_small(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = [rid(n) for n in range(10_000)]
    trigger = FluxKontextBatchTrigger(
        ",".join(ids), "2026-12-06T00:00:00+00:00", 2e9, hook_params={"timeout": 5}
    )
    path, kwargs = trigger.serialize()
    assert path == "airflow_provider_kontext.triggers.batch.FluxKontextBatchTrigger"
    size = len(json.dumps(kwargs))
    assert size < 300_000  # the trigger row, even encrypted (x4/3), stays far under 1 MB
    assert rid(5) not in repr(trigger)

    hook = FakeHook(dict.fromkeys(ids, "succeeded"))
    hook.aclose = mock.AsyncMock()
    monkeypatch.setattr("airflow_provider_kontext.hooks.kontext.FluxKontextHook", lambda *a, **k: hook)

    async def events() -> list[Any]:
        return [event async for event in trigger.run()]

    (event,) = run(events())
    assert event.payload == {"status": "done", "counts": {"succeeded": 10_000}, "pending": 0, "message": None}
    assert hook.pages == 100  # 100 predictions a request


def test_ledger_chunks_of_ten_thousand_finished_images_stay_under_the_store_limit() -> None:
    store: dict[str, Any] = {}
    fake = mock.Mock(get=lambda key, default=None: store.get(key, default))
    fake.set.side_effect = lambda key, value: store.__setitem__(key, json.loads(json.dumps(value)))
    ledger = BatchLedger(fake, 10_000, durable=True)
    ledger.open_window("2026-12-06T00:00:00+00:00")
    path = "s3://bucket/edits/2026-12-06/product_shot_{:05d}-{}.png"
    for n in range(10_000):
        ledger.put(
            n,
            flush=False,
            s=SUCCEEDED,
            fp="0123456789abcdef",
            k="fedcba9876543210",
            id=rid(n),
            t=1.7e9,
            o=[path.format(n, rid(n))],
        )
    ledger.flush()
    assert len(store) == 1 + 10_000 // CHUNK
    largest = max(len(json.dumps(value)) for value in store.values())
    assert largest == ledger.largest_value_bytes()
    assert largest < 65_535  # Airflow's default [state_store] max_value_storage_bytes

    again = BatchLedger(fake, 10_000, durable=True)
    again.load()
    assert again.entry(9_999)["id"] == rid(9_999)  # type: ignore[index]
    assert BatchLedger(fake, 9_999, durable=True).window is None  # another batch's record is ignored


def test_pacer_spaces_creates_at_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr("airflow_provider_kontext.operators.batch_steps.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("airflow_provider_kontext.operators.batch_steps.time.sleep", sleep)
    pacer = Pacer(600)
    starts = []
    for _ in range(5):
        pacer.wait()
        starts.append(clock[0])
    assert starts == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    clock[0] += 10  # an idle spell earns no burst beyond the next slot
    pacer.wait()
    pacer.wait()
    assert clock[0] - 10.4 == pytest.approx(0.1)


def test_trigger_holds_an_early_event_until_min_defer_seconds_after_the_deferral(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Check that a batch that ends at once still resumes no sooner than ``min_defer_seconds``.

    Against Airflow's scheduler race: a batch that ends at once still resumes no sooner than
    ``min_defer_seconds`` after it deferred; the hold never exceeds it (a clock that jumped).
    """
    import time as time_module

    from airflow_provider_kontext.triggers import kontext as single

    now = time_module.time()
    trigger = FluxKontextBatchTrigger(rid(1), None, 2e9, deferred_at=now - 4, min_defer_seconds=30)
    _, kwargs = trigger.serialize()
    assert (kwargs["deferred_at"], kwargs["min_defer_seconds"]) == (now - 4, 30.0)
    hook = FakeHook({rid(1): "succeeded"})
    hook.aclose = mock.AsyncMock()
    monkeypatch.setattr("airflow_provider_kontext.hooks.kontext.FluxKontextHook", lambda *a, **k: hook)
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    monkeypatch.setattr(single.asyncio, "sleep", sleep)

    async def events() -> list[Any]:
        return [event async for event in trigger.run()]

    (event,) = run(events())
    assert event.payload["status"] == "done"
    assert len(sleeps) == 1
    assert 24 < sleeps[0] <= 26
    sleeps.clear()
    run(single.settle_event(now + 3600, 30, mock.Mock()))  # deferred "in the future"
    assert sleeps == [30]
    sleeps.clear()
    run(single.settle_event(now - 60, 30, mock.Mock()))
    assert sleeps == []
