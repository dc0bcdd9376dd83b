"""The batch ledger's writes: concurrent records share one write, and a failed write is not lost."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from airflow_provider_kontext.edits.batch_ledger import BATCH_KEY, BatchLedger


class SlowStore:
    """A task state store whose first write blocks until released; it counts the writes."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.writes: list[dict[str, Any]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_next = False

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any, **_: Any) -> None:
        if not self.writes:
            self.entered.set()
            assert self.release.wait(30)
        if self.fail_next:
            self.fail_next = False
            raise OSError("the api-server is away")
        self.writes.append(dict(value))
        self.data[key] = value


def test_records_made_during_a_write_go_out_together_in_the_next() -> None:
    store = SlowStore()
    ledger = BatchLedger(store, 10, durable=True)
    first = threading.Thread(target=ledger.put, args=(0,), kwargs={"s": "creating"})
    first.start()
    assert store.entered.wait(30)  # the first record's write is under way
    others = [threading.Thread(target=ledger.put, args=(i,), kwargs={"s": "creating"}) for i in (1, 2, 3)]
    for thread in others:
        thread.start()
    # Their records are made (and they wait for a write) before the first write ends.
    deadline = time.monotonic() + 30
    while ledger._changes < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    store.release.set()
    for thread in [first, *others]:
        thread.join(30)
    assert len(store.writes) == 2  # one for the first, one for the three that came meanwhile
    assert set(store.data[f"{BATCH_KEY}/0"]) == {"0", "1", "2", "3"}


def test_a_put_returns_only_once_its_record_is_stored() -> None:
    store = SlowStore()
    store.release.set()
    ledger = BatchLedger(store, 3, durable=True)
    ledger.put(2, s="creating")
    assert store.data[f"{BATCH_KEY}/0"] == {"2": {"s": "creating"}}
    ledger.put(1, flush=False, s="created", id="p1")
    assert "1" not in store.data[f"{BATCH_KEY}/0"]  # held for the next write
    ledger.flush()
    assert store.data[f"{BATCH_KEY}/0"]["1"] == {"s": "created", "id": "p1"}
    writes = len(store.writes)
    ledger.flush()
    assert len(store.writes) == writes  # nothing changed: nothing written


def test_a_failed_write_leaves_the_records_for_the_next() -> None:
    store = SlowStore()
    store.release.set()
    ledger = BatchLedger(store, 3, durable=True)
    store.fail_next = True
    with pytest.raises(OSError, match="away"):
        ledger.put(0, s="creating")
    ledger.flush()
    assert store.data[f"{BATCH_KEY}/0"] == {"0": {"s": "creating"}}


def test_flushing_a_change_a_later_write_stored_writes_nothing() -> None:
    store = SlowStore()
    store.release.set()
    ledger = BatchLedger(store, 3, durable=True)
    mine = ledger.put(0, flush=False, s="creating")
    theirs = ledger.put(1, flush=False, s="creating")
    ledger.flush(theirs)  # stores both
    writes = len(store.writes)
    ledger.flush(mine)
    assert len(store.writes) == writes
    later = ledger.put(2, flush=False, s="creating")
    ledger.flush(mine)  # already stored: the later change waits for its own flush
    assert "2" not in store.data[f"{BATCH_KEY}/0"]
    ledger.flush(later)
    assert set(store.data[f"{BATCH_KEY}/0"]) == {"0", "1", "2"}


def test_an_update_changes_only_an_entry_still_as_expected() -> None:
    store = SlowStore()
    store.release.set()
    ledger = BatchLedger(store, 3, durable=True)
    ledger.put(0, s="created", id="p0", e="an older error")
    ledger.put(1, s="killed", id="p1")

    assert ledger.update(0, "p0", frozenset({"created"}), s="failed", e=None)
    assert ledger.entry(0) == {"s": "failed", "id": "p0"}  # merged; a change to None removes the field
    assert store.data[f"{BATCH_KEY}/0"]["0"] == {"s": "failed", "id": "p0"}  # stored before it returned
    assert not ledger.update(1, "p1", frozenset({"created"}), s="failed")  # another state
    assert not ledger.update(0, "p9", frozenset({"failed"}), s="succeeded")  # another prediction
    assert not ledger.update(2, "p2", frozenset({"created"}), s="failed")  # no entry
    assert ledger.entry(1) == {"s": "killed", "id": "p1"}
    assert ledger.entry(2) is None
