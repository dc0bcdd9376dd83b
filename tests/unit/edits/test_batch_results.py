"""Test what a finished batch leaves in XCom: compact rows in bounded parts, and their reading back.

Sizes only (no timing): a batch of 10,000 images leaves no XCom over 1 MB, and the rows read back
whole, in order, with the fields the header holds once.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from airflow_provider_kontext.edits.batch_items import BatchItem
from airflow_provider_kontext.edits.batch_results import (
    HEADER_KEY,
    PART_BYTES,
    ROWS_KEY,
    counts_of,
    image_summary,
    joined_rows,
    xcom_values,
)

MB = 1024 * 1024
MODEL = "black-forest-labs/flux-kontext-dev"


def summaries(count: int, prompts: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows as a large batch leaves them: long object-storage paths, saved outputs, some failures."""
    rows = []
    for n in range(count):
        name = f"product-shot-{n:06d}-front.png"
        item = BatchItem(
            n,
            f"s3://acme-shots/2026-12-06/{name}",
            prompts[n] if prompts else "Place the product on a white marble table, soft morning light",
            f"s3://acme-shots/2026-12-06/{name}",
            name,
            "f" * 64,
        )
        prediction = f"{n:08d}qzx4w2rmbtk9kr1ggq"
        if n % 97 == 0:
            entry = {"s": "failed", "id": prediction, "e": "CUDA out of memory " + "x" * 150}
        else:
            entry = {
                "s": "succeeded",
                "id": prediction,
                "o": [f"s3://acme-edits/scheduled__2026-12-06T00:00:00+00:00/{name[:-4]}-{prediction}.png"],
            }
        rows.append(image_summary(item, entry, MODEL))
    return rows


def test_ten_thousand_images_leave_no_xcom_over_one_megabyte_and_read_back_whole() -> None:
    rows = summaries(10_000)
    assert len(json.dumps(rows)) > 3 * MB  # what a single ``predictions`` XCom would hold
    values = xcom_values(rows, counts_of(rows), "s3://acme-edits/run/manifest.json")

    sizes = {key: len(json.dumps(value)) for key, value in values.items()}
    assert all(size <= PART_BYTES for size in sizes.values()), sizes
    assert max(sizes.values()) < MB
    header = values[HEADER_KEY]
    assert header["parts"] == [key for key in values if key != HEADER_KEY]
    assert header["parts"][:2] == [ROWS_KEY, f"{ROWS_KEY}_1"]
    assert header["model"] == MODEL
    assert header["prompt"].startswith("Place the product")
    assert header["images"] == 10_000
    assert header["counts"] == {"succeeded": 10_000 - 104, "failed": 104}
    assert all("model" not in row and "prompt" not in row for key in header["parts"] for row in values[key])
    assert joined_rows(header, values) == rows
    # The task's return value (one list of outputs per image) is one XCom: under 1 MB for 10,000
    # images handed on as Replicate's URLs (about 90 bytes each), or saved under a short output_path.
    url = "https://replicate.delivery/xezq/{:032d}/tmpq7b3x0c1.png"
    assert len(json.dumps([[url.format(n)] for n in range(10_000)])) < MB


def test_a_prompt_per_image_stays_in_each_row_and_a_small_batch_has_one_part() -> None:
    prompts = [f"style {n}" for n in range(5)]
    rows = summaries(5, prompts)
    values = xcom_values(rows, counts_of(rows), None)
    assert set(values) == {HEADER_KEY, ROWS_KEY}
    assert values[HEADER_KEY]["prompt"] is None
    assert [row["prompt"] for row in values[ROWS_KEY]] == prompts
    assert joined_rows(values[HEADER_KEY], values) == rows


@pytest.mark.parametrize("part_bytes", [1, 400, 2_000])
def test_parts_split_between_rows_never_inside_one(part_bytes: int) -> None:
    rows = summaries(12)
    values = xcom_values(rows, counts_of(rows), None, part_bytes=part_bytes)
    parts = [values[key] for key in values[HEADER_KEY]["parts"]]
    assert all(parts)  # every part holds at least one row
    assert sum(len(part) for part in parts) == 12
    for part in parts:
        assert len(part) == 1 or len(json.dumps(part)) <= part_bytes
    assert joined_rows(values[HEADER_KEY], values) == rows


def test_rows_without_a_header_are_read_as_one_list() -> None:
    old = [{"index": 0, "status": "succeeded", "prompt": "p", "model": MODEL, "outputs": []}]
    assert joined_rows(None, {ROWS_KEY: old}) == old
    assert joined_rows(None, {}) == []
    header = {"parts": [ROWS_KEY, f"{ROWS_KEY}_1"], "model": MODEL, "prompt": None}
    assert joined_rows(header, {ROWS_KEY: [{"index": 0}]}) == [{"model": MODEL, "index": 0}]
