"""Sum up a finished batch of edits.

What it leaves behind: one summary per image, the outputs in input order, the manifest beside the
saved outputs, and the message that names what failed and why.

The summaries go to XCom compact and in bounded parts, so a batch of any size leaves no XCom row
near Airflow's comfort (a row is one database value, read whole by every consumer): each row drops
what is the same for every image (the model; the prompt when one prompt serves all), which the
``batch`` XCom holds once with the counts, the manifest's location and the keys of the parts; the
rows fill ``predictions``, then ``predictions_1``, ``predictions_2``, ... each at most
:data:`PART_BYTES` of JSON. A small batch has one part, ``predictions``, as it always had. The
parts are the rows in input order, split, never cut short: every image's summary stays in XCom
whether or not there is a manifest (without ``output_path`` XCom is the only record), and
:func:`joined_rows` puts them back together with the shared fields.

Used by :class:`~airflow_provider_kontext.operators.batch.FluxKontextBatchEditOperator`; the outputs
themselves are checked and saved by :mod:`airflow_provider_kontext.edits.outputs` as for a single edit.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_kontext.edits.batch_ledger import CREATED

if TYPE_CHECKING:
    from airflow_provider_kontext.edits.batch_items import BatchItem

#: The manifest's file name, written beside the outputs when ``output_path`` is set.
MANIFEST_NAME = "manifest.json"
#: How many failed images a failure message lists.
MAX_LISTED_FAILURES = 20
#: XCom key of the first part of the per-image rows; the next parts are ``predictions_1``, ...
ROWS_KEY = "predictions"
#: XCom key of what the rows share: ``images``, ``counts``, ``model``, ``prompt`` (one for all, else
#: ``None``), ``manifest`` and ``parts`` (the XCom keys holding the rows, in order).
HEADER_KEY = "batch"
#: Most bytes of JSON one part of the rows holds (XCom rows stay well under 1 MB).
PART_BYTES = 512 * 1024
#: Fields of a row that the header holds once when they are the same for every image.
SHARED = ("model", "prompt")


def image_summary(item: BatchItem, entry: dict[str, Any] | None, model: str) -> dict[str, Any]:
    """Return the ``predictions`` XCom's row for one image.

    What it was, its prediction, how it ended, and its outputs (kept compact: thousands of rows
    travel in one XCom).
    """
    entry = entry or {}
    status = entry.get("s")
    summary: dict[str, Any] = {
        "index": item.position,
        "input_image": item.where,
        "input_name": item.name,
        "prompt": item.prompt,
        "model": model,
        "prediction": entry.get("id"),
        "status": status if status not in (None, CREATED, "creating") else "missing",
        "outputs": list(entry.get("o") or []),
    }
    if entry.get("e"):
        summary["error"] = entry["e"]
    return summary


def part_key(number: int) -> str:
    """Return the XCom key of part ``number`` of the rows (``predictions``, ``predictions_1``, ...)."""
    return ROWS_KEY if number == 0 else f"{ROWS_KEY}_{number}"


def xcom_values(
    summaries: Sequence[dict[str, Any]],
    counts: dict[str, int],
    manifest: str | None,
    part_bytes: int = PART_BYTES,
) -> dict[str, Any]:
    """Return the XComs that record the batch, by key: the header and the rows in bounded parts.

    Each row drops the shared fields (:data:`SHARED`) that are equal for every image; the header
    holds them. A part closes before the row that would take it past ``part_bytes`` of JSON (a part
    holds at least one row).
    """
    shared = {
        name: summaries[0].get(name)
        for name in SHARED
        if summaries and all(row.get(name) == summaries[0].get(name) for row in summaries)
    }
    parts: list[list[dict[str, Any]]] = [[]]
    size = 2  # the brackets
    for summary in summaries:
        row = {key: value for key, value in summary.items() if key not in shared}
        length = len(json.dumps(row, default=str)) + 2  # with its ", "
        if parts[-1] and size + length > part_bytes:
            parts.append([])
            size = 2
        parts[-1].append(row)
        size += length
    header = {
        "images": len(summaries),
        "counts": counts,
        "model": shared.get("model"),
        "prompt": shared.get("prompt"),
        "manifest": manifest,
        "parts": [part_key(number) for number in range(len(parts))],
    }
    return {HEADER_KEY: header, **{part_key(n): part for n, part in enumerate(parts)}}


def joined_rows(header: Any, parts: dict[str, Any]) -> list[dict[str, Any]]:
    """Return every image's row, in order, from the XComs :func:`xcom_values` made.

    ``parts`` maps XCom keys to values (``predictions``, ``predictions_1``, ...); each row gets the
    header's shared fields back. Without a header (a batch recorded before the rows were split) the
    ``predictions`` list is taken as it is.
    """
    if not isinstance(header, dict) or not isinstance(header.get("parts"), list):
        first = parts.get(ROWS_KEY)
        return [row for row in first if isinstance(row, dict)] if isinstance(first, list) else []
    shared = {name: header[name] for name in SHARED if header.get(name) is not None}
    rows: list[dict[str, Any]] = []
    for key in header["parts"]:
        part = parts.get(key)
        if isinstance(part, list):
            rows.extend({**shared, **row} for row in part if isinstance(row, dict))
    return rows


def counts_of(summaries: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many images ended in each status."""
    return dict(Counter(str(row["status"]) for row in summaries))


def failure_message(failed: Sequence[dict[str, Any]], total: int) -> str:
    """Which images were not edited and why, the first :data:`MAX_LISTED_FAILURES` by name."""
    lines = [
        f"image {row['index']} ({row['input_name'] or row['input_image'] or 'unnamed'}): {row['status']}"
        + (f" (prediction {row['prediction']})" if row.get("prediction") else "")
        + (f": {row['error']}" if row.get("error") else "")
        for row in failed[:MAX_LISTED_FAILURES]
    ]
    more = f"\n... and {len(failed) - MAX_LISTED_FAILURES} more" if len(failed) > MAX_LISTED_FAILURES else ""
    return f"{len(failed)} of {total} images were not edited:\n" + "\n".join(lines) + more


def write_manifest(folder: Any, summaries: Sequence[dict[str, Any]], counts: dict[str, int]) -> str:
    """Write ``manifest.json`` (counts and one row per image) into ``folder``; return its path."""
    target = folder / MANIFEST_NAME
    partial = folder / f".{MANIFEST_NAME}.partial"
    document = {"counts": counts, "images": list(summaries)}
    with partial.open("w") as out:
        json.dump(document, out, indent=1, default=str)
    partial.rename(target)
    return str(target)


def retryable(failed: Sequence[dict[str, Any]], retry_failed_predictions: bool) -> bool:
    """Whether a retry of the task could mend some failed image."""
    from airflow_provider_kontext.edits.batch_ledger import FINAL_FAILURES

    return any(row["status"] not in FINAL_FAILURES or retry_failed_predictions for row in failed)
