"""The smallest edit: one image, one prompt, the output URL in XCom.

Runs unchanged against Replicate (connection ``flux_kontext_default`` with a token) or against the
bundled emulator (``make demo`` sets the connection up for it).
"""

from __future__ import annotations

from pathlib import Path

from airflow.sdk import DAG

from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator

with DAG(dag_id="kontext_edit_minimal", schedule=None, catchup=False, tags=["kontext", "example"]):
    FluxKontextEditOperator(
        task_id="edit",
        prompt="Make the mug cobalt blue with a glossy glaze",
        input_image=str(Path(__file__).parent / "images" / "mug.png"),
        output_format="png",
    )
