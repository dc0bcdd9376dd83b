"""Start an edit in one task, wait for it in another: ``FluxKontextPredictionSensor``.

For predictions the operator does not start: begun by a ``@task`` with the hook (as here), by another
DAG or by another system. ``start_edit`` uploads the image with Replicate's Files API, starts the
prediction and returns its id; ``wait_for_edit`` takes the id from XCom, waits (in the triggerer
when deferrable) and saves the output under ``params.output_dir`` before Replicate deletes it, ending
as the operator does: the saved paths as its return value and the ``prediction`` summary in XCom.

``start_edit`` has no retries: a retry would start, and pay for, a second edit. The sensor may
retry freely; it only reads.

Runs unchanged against Replicate (connection ``flux_kontext_default`` with a token) or against the
bundled emulator (``make demo`` sets the connection up for it).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from airflow.sdk import DAG, Param, task

from airflow_provider_kontext.sensors.kontext import FluxKontextPredictionSensor

IMAGE = Path(__file__).parent / "images" / "mug.png"

with DAG(
    dag_id="kontext_sensor",
    schedule=None,
    catchup=False,
    params={
        "output_dir": Param("/tmp/kontext-sensor", type="string", description="Where the edit is kept"),  # noqa: S108
        "prompt": Param("Make the mug cobalt blue with a glossy glaze", type="string"),
    },
    tags=["kontext", "example"],
):

    @task(retries=0)
    def start_edit(params: dict[str, str]) -> str:
        """Upload the image, start the prediction, return its id (the edit runs on)."""
        from airflow_provider_kontext.hooks.kontext import FluxKontextHook
        from airflow_provider_kontext.models import DEFAULT_MODEL, validate_input

        hook = FluxKontextHook()
        uploaded = hook.upload_file(IMAGE.read_bytes(), filename=IMAGE.name, content_type="image/png")
        model_input = validate_input(
            DEFAULT_MODEL,
            {"prompt": params["prompt"], "input_image": uploaded.urls.get, "output_format": "png"},
        )
        prediction = hook.create_prediction(DEFAULT_MODEL, model_input)
        if prediction.id is None:  # a proxy that answers at once, without a prediction to wait for
            raise RuntimeError("the server answered without a prediction id")
        return prediction.id

    wait_for_edit = FluxKontextPredictionSensor(
        task_id="wait_for_edit",
        prediction_id="{{ ti.xcom_pull(task_ids='start_edit') }}",
        output_path="{{ params.output_dir }}",
        timeout=timedelta(minutes=30),
        retries=2,
    )

    start_edit() >> wait_for_edit
