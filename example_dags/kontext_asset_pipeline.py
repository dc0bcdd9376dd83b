"""Nightly asset generation: re-style every product shot in a folder, keep the results, write a
manifest and a contact sheet.

- ``list_inputs`` lists the images in ``params.input_dir``;
- ``edit`` is one mapped ``FluxKontextEditOperator`` task per image: it defers while the model runs
  and downloads the output into ``params.output_dir/<day of the run>/`` before Replicate deletes it (an hour);
- ``write_manifest`` consumes the edits' XComs (durable paths and the ``prediction`` summaries) and
  writes ``manifest.json`` and ``contact_sheet.html`` next to the images.

Runs unchanged against Replicate (connection ``flux_kontext_default`` with a token) or against the
bundled emulator (``make demo``).
"""

from __future__ import annotations

import html
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Asset, Param, task

from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator

IMAGES = Path(__file__).parent / "images"
EDITED_SHOTS = Asset("kontext://example/edited-product-shots")

with DAG(
    dag_id="kontext_asset_pipeline",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
    params={
        "input_dir": Param(str(IMAGES), type="string", description="Folder of jpeg/png/gif/webp images"),
        "output_dir": Param("/tmp/kontext-edits", type="string", description="Where edits are kept"),  # noqa: S108
        "prompt": Param("Place the product on a marble table in soft studio light", type="string"),
    },
    tags=["kontext", "example"],
) as dag:

    @task
    def list_inputs(params: dict[str, Any]) -> list[str]:
        folder = Path(params["input_dir"])
        images = sorted(
            str(p) for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".gif", ".webp"}
        )
        if not images:
            raise ValueError(f"no images in {folder}")
        return images

    edits = FluxKontextEditOperator.partial(
        task_id="edit",
        prompt="{{ params.prompt }}",
        aspect_ratio="1:1",
        output_format="png",
        # run_after, not ds: a manually triggered Airflow 3 run has no logical date.
        output_path="{{ params.output_dir }}/{{ dag_run.run_after.strftime('%Y-%m-%d') }}",
        outlets=[EDITED_SHOTS],
        poll_interval=1.0,
        max_active_tis_per_dag=16,
    ).expand(input_image=list_inputs())

    @task
    def write_manifest(
        outputs: list[list[str]], params: dict[str, Any], dag_run: Any = None, ti: Any = None
    ) -> str:
        """One row per edited image: where it is kept and the prediction that made it."""
        summaries = ti.xcom_pull(task_ids="edit", key="prediction")
        rows = list(summaries) if isinstance(summaries, list | tuple) else [summaries]
        paths = [path for row in rows for path in row["outputs"]]
        if sorted(paths) != sorted(path for output in outputs for path in output):
            raise ValueError("the edits' return values and their prediction summaries disagree")
        day = dag_run.run_after.strftime("%Y-%m-%d")
        folder = Path(params["output_dir"]) / day
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.json").write_text(json.dumps(rows, indent=2, default=str))
        cells = "".join(
            f'<figure><img src="{html.escape(Path(path.removeprefix("file://")).name)}" width="256">'
            f"<figcaption>{html.escape(str(row['id']))}</figcaption></figure>"
            for row in rows
            for path in row["outputs"]
        )
        page = f"<!doctype html><title>Kontext edits {day}</title><body style='display:flex'>{cells}"
        (folder / "contact_sheet.html").write_text(page)
        return str(folder / "manifest.json")

    write_manifest(edits.output)
