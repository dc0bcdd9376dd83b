"""Edit, review, publish: a person approves or rejects each edit before it is published.

- ``edit`` is one mapped ``FluxKontextEditOperator`` per image in ``params.input_dir``, saved under
  ``params.output_dir/<run id>/`` (as in ``kontext_asset_pipeline``);
- ``review`` is one Human-in-the-loop request per edit (Airflow's ``HITLOperator``, standard provider,
  Airflow >= 3.1): "Approve" or "Reject", with links to the edit's before/after view and to the
  gallery of the whole run (the provider's plugin) in the request's text. Reviewers answer in
  Airflow's UI ("Required actions", or the task instance's page);
- ``publish`` copies only the approved edits to ``params.publish_dir/<run id>/`` and returns their
  paths; rejected edits stay where the run saved them.

Manual runs only (``schedule=None``): a review step waits for people, and nothing is billed by
surprise. Runs unchanged against Replicate or the bundled emulator.
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlparse

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import DAG, Param, task

from airflow_provider_kontext.edits.outputs import safe_stem
from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator

IMAGES = Path(__file__).parent / "images"
APPROVE, REJECT = "Approve", "Reject"


def plugin_link(route: str, **params: Any) -> str:
    """Return a link to the provider's plugin page ``route`` on this deployment's API server."""
    from airflow.configuration import conf

    base = urlparse(conf.get("api", "base_url", fallback="/") or "/").path.rstrip("/")
    return f"{base}/kontext/{route}?{urlencode(params)}"


def approved(summaries: list[dict[str, Any]], decisions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the summaries of the edits whose review chose "Approve" (paired by map index)."""
    if len(summaries) != len(decisions):
        raise ValueError(f"{len(summaries)} edits but {len(decisions)} reviews")
    return [
        s for s, d in zip(summaries, decisions, strict=True) if APPROVE in (d or {}).get("chosen_options", [])
    ]


with DAG(
    dag_id="kontext_review",
    schedule=None,
    catchup=False,
    params={
        "input_dir": Param(str(IMAGES), type="string", description="Folder of jpeg/png/gif/webp images"),
        "output_dir": Param("/tmp/kontext-review", type="string", description="Where edits are kept"),  # noqa: S108
        "publish_dir": Param("/tmp/kontext-published", type="string", description="Approved edits go here"),  # noqa: S108
        "prompt": Param("Place the product on a marble table in soft studio light", type="string"),
    },
    user_defined_macros={"safe_stem": safe_stem},
    tags=["kontext", "example", "review"],
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
        output_path="{{ params.output_dir }}/{{ safe_stem(run_id) }}",
        map_index_template="{{ task.input_label }}",
    ).expand(input_image=list_inputs())

    @task
    def review_requests(dag_run: Any = None, ti: Any = None) -> list[str]:
        """One review text per edit (in map index order), linking to its view and the run's gallery."""
        summaries = list(ti.xcom_pull(task_ids="edit", key="prediction"))
        gallery = plugin_link("gallery", dag_id=dag_run.dag_id, run_id=dag_run.run_id)
        bodies = []
        for index, summary in enumerate(summaries):
            view = plugin_link(
                "edit", dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id="edit", map_index=index
            )
            bodies.append(
                f"**{summary.get('input_name') or summary['id']}**: {summary.get('prompt') or ''}\n\n"
                f"[Before and after]({view}) · [All edits of this run]({gallery})\n\n"
                f"Prediction `{summary['id']}`, seed {summary.get('seed')}"
            )
        return bodies

    # The requests are written once every edit has ended (they read the edits' summaries).
    bodies = review_requests()
    edits >> bodies
    reviews = HITLOperator.partial(
        task_id="review",
        subject="Publish this edit?",
        options=[APPROVE, REJECT],
        response_timeout=timedelta(days=3),
    ).expand(body=bodies)

    @task
    def publish(
        decisions: list[dict[str, Any]], params: dict[str, Any], run_id: Any = None, ti: Any = None
    ) -> list[str]:
        """Copy the approved edits to ``publish_dir/<run id>/``; return where they are."""
        summaries = list(ti.xcom_pull(task_ids="edit", key="prediction"))
        folder = Path(params["publish_dir"]) / safe_stem(run_id)
        folder.mkdir(parents=True, exist_ok=True)
        published = []
        for summary in approved(summaries, list(decisions)):
            for output in summary["outputs"]:
                source = Path(str(output).removeprefix("file://"))
                shutil.copyfile(source, folder / source.name)
                published.append(str(folder / source.name))
        return published

    publish(reviews.output)
