"""Nightly asset generation, batch form: every product shot in a folder re-styled by one task.

The same pipeline as ``kontext_asset_pipeline`` (which maps one task per image), for hundreds or
thousands of images:

- ``edit_all`` is one ``FluxKontextBatchEditOperator``: it lists ``params.input_dir`` at run time,
  sends the creates paced under the account's limit (600 a minute), waits for the whole batch in one
  deferral, and saves each output into the run's folder, ``params.output_dir/<run id>/``, as
  ``<image>-<prediction id>.png``, with ``manifest.json`` beside them. Its ``EDITED_SHOTS`` event
  (one per run, naming the manifest and the counts) tells consumers the batch is there.
- ``contact_sheet`` turns the task's ``predictions`` rows (one per image; a large batch splits
  them over ``predictions_1``, ... and keeps the model and the shared prompt once in ``batch``)
  into ``contact_sheet.html`` next to the images.

A retry of ``edit_all`` edits only the images not yet edited; ``fail_on_partial=False`` would let it
succeed with the images that worked (the others listed in the manifest).

Runs unchanged against Replicate (connection ``flux_kontext_default`` with a token) or against the
bundled emulator.
"""

from __future__ import annotations

import html
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Asset, Param, task

from airflow_provider_kontext.edits.outputs import safe_stem
from airflow_provider_kontext.operators.kontext import FluxKontextBatchEditOperator

IMAGES = Path(__file__).parent / "images"
EDITED_SHOTS = Asset("kontext://example/edited-product-shots")


def run_folder(output_dir: str, run_id: str) -> str:
    """Return the folder of one run's edits and manifest: ``<output_dir>/<run id as a safe name>``."""
    return str(Path(output_dir) / safe_stem(run_id))


with DAG(
    dag_id="kontext_asset_pipeline_batch",
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
    user_defined_macros={"run_folder": run_folder},
    tags=["kontext", "example"],
) as dag:
    edit_all = FluxKontextBatchEditOperator(
        task_id="edit_all",
        input_images="{{ params.input_dir }}",
        prompt="{{ params.prompt }}",
        aspect_ratio="1:1",
        output_format="png",
        output_path="{{ run_folder(params.output_dir, run_id) }}",
        poll_interval=1.0,
        outlets=[EDITED_SHOTS],
    )

    @task
    def contact_sheet(
        outputs: list[list[str]], params: dict[str, Any], run_id: Any = None, ti: Any = None
    ) -> str:
        """One figure per edited image, from the batch's ``predictions`` rows."""
        from airflow_provider_kontext.edits.batch_results import joined_rows

        header = ti.xcom_pull(task_ids="edit_all", key="batch")
        parts = {key: ti.xcom_pull(task_ids="edit_all", key=key) for key in header["parts"]}
        rows = joined_rows(header, parts)
        folder = Path(run_folder(params["output_dir"], run_id))
        cells = "".join(
            f'<figure><img src="{html.escape(Path(path.removeprefix("file://")).name)}" width="256">'
            f"<figcaption><b>{html.escape(str(row['input_name']))}</b><br>{html.escape(row['prompt'])}"
            f"<br><small>{html.escape(str(row['prediction']))}</small></figcaption></figure>"
            for row, paths in zip(rows, outputs, strict=True)
            for path in paths
        )
        title = f"Kontext edits {html.escape(run_id)}"
        page = f"<!doctype html><title>{title}</title><body style='display:flex'>{cells}"
        (folder / "contact_sheet.html").write_text(page)
        return str(folder / "contact_sheet.html")

    contact_sheet(edit_all.output)
