"""Sum up a finished batch of edits.

What it leaves behind: one summary per image, the outputs in input order, the manifest beside the
saved outputs, and the message that names what failed and why.

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
