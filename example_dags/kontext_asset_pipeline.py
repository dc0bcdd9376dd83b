"""Re-style every product shot in a folder each night, keep the results, write a manifest.

Nightly asset generation, with a contact sheet beside the manifest.

- ``list_inputs`` lists the images in ``params.input_dir``;
- ``edit`` is one mapped ``FluxKontextEditOperator`` task per image (shown in the UI by the image's
  file name): it defers while the model runs and downloads the output into the run's folder,
  ``params.output_dir/<run id>/``, as ``<image>-<prediction id>.png`` before Replicate deletes it
  (an hour); each run has its own folder, so two runs on one day never mix their files;
- ``write_manifest`` consumes the edits' XComs (durable paths and the ``prediction`` summaries:
  input image, prompt, model, prediction) and writes ``manifest.json`` and ``contact_sheet.html``
  next to the images. Only then is the ``EDITED_SHOTS`` asset updated (one event per run, its
  ``extra`` naming the manifest), so a DAG scheduled on it starts when the whole batch is there.

Scheduled every night at 03:00 UTC, and never by surprise: unpausing the DAG starts no run (no
``start_date``, no catchup: the first run is the next 03:00). Pressing "Trigger" in the UI, which
also unpauses a paused DAG, therefore starts exactly one run, billed once against Replicate. Runs
unchanged against
Replicate (connection ``flux_kontext_default`` with a token) or against the bundled emulator
(``make demo``).
"""

from __future__ import annotations

import html
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset, Param, task
from airflow.timetables.trigger import CronTriggerTimetable

from airflow_provider_kontext.edits.outputs import safe_stem
from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator

IMAGES = Path(__file__).parent / "images"
EDITED_SHOTS = Asset("kontext://example/edited-product-shots")


def run_folder(output_dir: str, run_id: str) -> str:
    """Return the folder of one run's edits and manifest: ``<output_dir>/<run id as a safe name>``."""
    return str(Path(output_dir) / safe_stem(run_id))


with DAG(
    dag_id="kontext_asset_pipeline",
    # Not "@daily" with a start_date: unpausing would run the latest past day at once, so a first
    # click on "Trigger" (which unpauses) started two runs and billed every edit twice. Without a
    # start_date, run_immediately decides the first run: a zero window means "the next 03:00" (False
    # would still run a 03:00 that passed less than 2.4 hours ago).
    schedule=CronTriggerTimetable("0 3 * * *", timezone="UTC", run_immediately=timedelta(0)),
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
        output_path="{{ run_folder(params.output_dir, run_id) }}",
        poll_interval=1.0,
        max_active_tis_per_dag=16,
        # The operator's default, spelled out: Airflow 3.1's .partial() does not read it.
        map_index_template="{{ task.input_label }}",
    ).expand(input_image=list_inputs())

    @task(outlets=[EDITED_SHOTS])
    def write_manifest(
        outputs: list[list[str]],
        params: dict[str, Any],
        run_id: Any = None,
        ti: Any = None,
        outlet_events: Any = None,
    ) -> str:
        """Write one row per edited image, then the asset event that says the batch is complete.

        A row holds the image's input, prompt and model, where the edit is kept and the prediction
        that made it.
        """
        summaries = ti.xcom_pull(task_ids="edit", key="prediction")
        rows = list(summaries) if isinstance(summaries, list | tuple) else [summaries]
        paths = [path for row in rows for path in row["outputs"]]
        if sorted(paths) != sorted(path for output in outputs for path in output):
            raise ValueError("the edits' return values and their prediction summaries disagree")
        folder = Path(run_folder(params["output_dir"], run_id))
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / "manifest.json"
        manifest.write_text(json.dumps(rows, indent=2, default=str))
        cells = "".join(
            f'<figure><img src="{html.escape(Path(path.removeprefix("file://")).name)}" width="256">'
            f"<figcaption><b>{html.escape(str(row.get('input_name') or row['id']))}</b><br>"
            f"{html.escape(str(row.get('prompt') or ''))}<br><small>{html.escape(str(row['id']))}</small>"
            "</figcaption></figure>"
            for row in rows
            for path in row["outputs"]
        )
        title = f"Kontext edits {html.escape(run_id)}"
        page = f"<!doctype html><title>{title}</title><body style='display:flex'>{cells}"
        (folder / "contact_sheet.html").write_text(page)
        outlet_events[EDITED_SHOTS].extra = {"manifest": str(manifest), "run_id": run_id, "edits": len(paths)}
        return str(manifest)

    write_manifest(edits.output)
