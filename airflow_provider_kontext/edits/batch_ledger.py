"""Where a batch of edits records, image by image, what it has started and how each ended.

The record lives in Airflow's task state store (3.3+), which survives retries and killed workers, so
no image's edit is created twice and none is lost: an entry says ``creating`` before its create is
sent, then the prediction id (within a second of the create's return: until then the mark stands
for it), then the outcome. A retry (or the resume
after a deferral) reads it back and carries on where the last process stopped.

The record is compact so thousands of images fit: one store key per chunk of :data:`CHUNK` images
(each value well under the store's 64 KB ``max_value_storage_bytes`` policy), plus one header key
holding the batch's size and the window of its creates (where the account's list of predictions
has them). Without a task state store (Airflow < 3.3) the same record is kept in XCom: it survives
the deferral of one try, not a retry.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

#: Key prefix of the batch's entries in the task state store.
BATCH_KEY = "flux_kontext_batch"
#: Images per store key: a chunk of finished entries with saved paths stays under ~30 KB.
CHUNK = 100
#: Longest error text kept per image.
MAX_ERROR = 200

#: Entry states: the create is under way (or its answer was lost), the prediction exists and is not
#: known to be over, or how it ended.
CREATING = "creating"
CREATED = "created"
SUCCEEDED = "succeeded"
#: What :meth:`BatchLedger.update` expects of an entry still waiting on its prediction: a record
#: another thread made meanwhile (the kill's, the finish's) stands.
ONLY_CREATED = frozenset({CREATED})
#: A prediction canceled because the task was killed: nothing billed is kept, so a retry redoes it.
KILLED = "killed"
#: Terminal statuses of a prediction.
TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
#: Progress lines of a batch are logged at most this often (seconds).
PROGRESS_SECONDS = 10.0
#: Outcomes that a retry of the task does not redo unless ``retry_failed_predictions``; a retry
#: redoes any other (``aborted``, ``timeout``, ``lost``: nothing billed, or nothing usable kept).
FINAL_FAILURES = frozenset({"failed", "canceled", "rejected", "unusable"})


class XComStore:
    """The task state store's ``get``/``set``/``delete`` over this try's XComs (Airflow < 3.3).

    It survives a deferral of the try, not a retry.
    """

    def __init__(self, ti: Any) -> None:
        self._ti = ti

    def get(self, key: str, default: Any = None) -> Any:
        """Return the value stored under ``key``, else ``default``."""
        value = self._ti.xcom_pull(task_ids=self._ti.task_id, key=key, map_indexes=self._ti.map_index)
        return default if value is None else value

    def set(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``."""
        self._ti.xcom_push(key=key, value=value)

    def delete(self, key: str) -> None:
        """Empty what is stored under ``key``."""
        self._ti.xcom_push(key=key, value={})


class BatchLedger:
    """The batch's entries by image index, read from and written to a store chunk by chunk.

    An entry is a dict: ``s`` (state), ``fp`` (fingerprint of the request, short), ``c`` (Unix time
    its create was sent, on the worker's clock: where the search for a lost one starts), ``id``
    (prediction), ``t`` (Unix time the create returned), ``r`` (the try that created it), ``k``
    (``1``: a kill is canceling its prediction, stored before the cancel went out), ``o``
    (outputs), ``e`` (why it failed).
    """

    def __init__(self, store: Any, size: int, *, durable: bool) -> None:
        self._store = store
        self.size = size
        #: Whether the record survives a retry (a task state store), not only a deferral.
        self.durable = durable
        self._entries: list[dict[str, Any] | None] = [None] * size
        self._dirty: set[int] = set()
        self._lock = threading.Lock()  # creates and downloads record from several threads
        #: Held while chunks are written; changes made meanwhile go out together in the next write.
        self._write_lock = threading.Lock()
        self._changes = 0  # changes made (``put``), counted
        self._written = 0  # changes the store holds
        self.window: str | None = None
        #: The size of the batch the stored record is of (``None``: no record).
        self.recorded_size: int | None = None
        self._stray: list[dict[str, Any]] = []
        #: The series of tries (``reattach.Series`` as a dict) that finished the batch, if one did.
        self.finished: dict[str, Any] | None = None

    @classmethod
    def from_context(cls, context: Any, size: int) -> BatchLedger:
        """Return the ledger of this task instance: the task state store where there is one, else XCom."""
        store = context.get("task_state_store")
        if store is not None:
            return cls(store, size, durable=True)
        return cls(XComStore(context["ti"]), size, durable=False)

    def load(self) -> None:
        """Read the header and every chunk.

        When the record is of a batch of another size (the images listed differ from an earlier
        try's), its entries are kept aside, to be matched to the images by fingerprint
        (:meth:`claim`).
        """
        header = self._store.get(BATCH_KEY)
        if not isinstance(header, dict) or not isinstance(header.get("n"), int):
            return
        window = header.get("window")
        self.window = window if isinstance(window, str) else None
        finished = header.get("finished")
        self.finished = finished if isinstance(finished, dict) else None
        self.recorded_size = size = int(header["n"])
        for chunk in range((size + CHUNK - 1) // CHUNK):
            saved = self._store.get(f"{BATCH_KEY}/{chunk}")
            if not isinstance(saved, dict):
                continue
            for key, entry in saved.items():
                if not (key.isdigit() and int(key) < size and isinstance(entry, dict)):
                    continue
                if size == self.size:
                    self._entries[int(key)] = entry
                else:
                    self._stray.append(entry)

    def rewrite(self) -> None:
        """Store the whole record under this batch's size and positions (after :meth:`claim`)."""
        with self._lock:
            self._dirty.update(range(self._chunks()))
            self._changes += 1
        self.flush()
        self._store.set(BATCH_KEY, {"n": self.size, "window": self.window, "chunk": CHUNK})
        self.recorded_size = self.size

    def claim(self, index: int, fingerprint: str) -> dict[str, Any] | None:
        """Give image ``index`` an unclaimed earlier try's entry of the same request, if there is one.

        Such an entry was recorded under another position (the listed images changed between tries).
        """
        for position, entry in enumerate(self._stray):
            if entry.get("fp") == fingerprint:
                del self._stray[position]
                self.put(index, flush=False, **entry)
                return self._entries[index]
        return None

    def entry(self, index: int) -> dict[str, Any] | None:
        """Return image ``index``'s entry, ``None`` if it has none."""
        return self._entries[index]

    def entries(self) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """Iterate over ``(index, entry)`` of every image, in order."""
        return iter(enumerate(self._entries))

    def waiting(self) -> dict[str, int]:
        """Return the predictions recorded ``created`` (not known to be over): image index by id."""
        return {
            str(entry["id"]): index
            for index, entry in enumerate(self._entries)
            if entry and entry.get("s") == CREATED and entry.get("id")
        }

    def open_window(self, created_after: str) -> None:
        """Record where the batch's creates start in the account's list (once; retries keep it)."""
        if self.window is None or created_after < self.window:
            self.window = created_after
            self._store.set(BATCH_KEY, {"n": self.size, "window": self.window, "chunk": CHUNK})
            self.recorded_size = self.size

    def put(self, index: int, *, flush: bool = True, **entry: Any) -> int:
        """Replace an image's entry; stored before this returns unless ``flush=False`` (then :meth:`flush`).

        Threads that record at the same time share one write (group commit): each waits for a write
        that began after its change, and the store sees one write per chunk for all of them.

        :return: the change's number, for :meth:`flush`.
        """
        with self._lock:
            change = self._set(index, entry)
        if flush:
            self._write_through(change)
        return change

    def update(
        self, index: int, prediction_id: str, states: frozenset[str], *, flush: bool = True, **changes: Any
    ) -> bool:
        """Merge ``changes`` into an image's entry if it still records ``prediction_id`` in one of ``states``.

        A compare-and-set: ``on_kill``'s thread and the batch's finish record outcomes of the same
        predictions, and whichever comes second must not overwrite the other's record with an entry
        it read before. A change to ``None`` removes that field. Stored before this returns unless
        ``flush=False`` (then :meth:`flush`).

        :return: whether the entry was changed (``False``: it records another state or prediction).
        """
        with self._lock:
            current = self._entries[index]
            if not current or current.get("id") != prediction_id or current.get("s") not in states:
                return False
            change = self._set(index, {**current, **changes})
        if flush:
            self._write_through(change)
        return True

    def _set(self, index: int, entry: dict[str, Any]) -> int:
        """Replace an entry in memory and mark its chunk changed (the caller holds the lock).

        :return: the change's number.
        """
        if isinstance(entry.get("e"), str):
            entry["e"] = entry["e"][:MAX_ERROR]
        self._entries[index] = {key: value for key, value in entry.items() if value is not None} or None
        self._dirty.add(index // CHUNK)
        self._changes += 1
        return self._changes

    def drop(self, index: int) -> None:
        """Forget an image's entry (its create provably made nothing)."""
        self.put(index)

    def flush(self, change: int | None = None) -> None:
        """Write every chunk changed since the last write; with ``change``, only if the store lacks it.

        :param change: a number :meth:`put` returned: return at once when a write since has stored it.
        """
        if change is None:
            with self._lock:
                change = self._changes
        self._write_through(change)

    def _write_through(self, change: int) -> None:
        """Return once the store holds change number ``change``, writing the changed chunks if needed.

        :raises Exception: what the store raised; the chunks stay marked changed for the next write.
        """
        with self._write_lock:
            if self._written >= change:
                return  # a write that began after the change has stored it
            with self._lock:
                upto = self._changes
                chunks = sorted(self._dirty)
                values = [self._chunk_value(chunk) for chunk in chunks]
                self._dirty.clear()
            try:
                for chunk, value in zip(chunks, values, strict=True):
                    self._store.set(f"{BATCH_KEY}/{chunk}", value)
            except BaseException:
                with self._lock:
                    self._dirty.update(chunks)
                raise
            self._written = upto

    def _chunk_value(self, chunk: int) -> dict[str, Any]:
        start = chunk * CHUNK
        return {
            str(index): entry
            for index, entry in enumerate(self._entries[start : start + CHUNK], start)
            if entry is not None
        }

    def finish(self, series: dict[str, Any]) -> None:
        """Mark the record finished by this try's series (``reattach.Series`` as a dict), keeping it.

        Until Airflow records the try's success, a retry completes from the recorded outcomes
        instead of paying again; a try of a later series (a clear) starts afresh (:meth:`reset`).
        """
        self.flush()
        self._store.set(
            BATCH_KEY, {"n": self.size, "window": self.window, "chunk": CHUNK, "finished": series}
        )
        self.finished = series
        self.recorded_size = self.size

    def reset(self) -> None:
        """Forget every entry (in the store too): the task was cleared after the batch finished."""
        with self._lock:
            self._entries = [None] * self.size
        self._stray = []
        self.window = None
        self.finished = None
        self.rewrite()

    def largest_value_bytes(self) -> int:
        """Return the size of the largest chunk as stored (JSON), for checks and benchmarks."""
        return max((len(json.dumps(self._chunk_value(chunk))) for chunk in range(self._chunks())), default=0)

    def _chunks(self) -> int:
        return (self.size + CHUNK - 1) // CHUNK
