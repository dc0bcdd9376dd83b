"""``FluxKontextEditsPlugin``: the edits' images in Airflow's UI (Airflow >= 3.1).

Registered through ``get_provider_info()["plugins"]``, so installing the provider (with the ``ui``
extra, for Pillow) is enough. It mounts the app of :mod:`airflow_provider_kontext.plugins.app` on
the API server and adds three views to the UI:

- on a task instance, **Image edit**: the input and each output side by side, with the prompt,
  model, seed, inputs, predict time, status and the prediction's link (failed edits as such);
- on a DAG run, **Image edits**: a gallery of every edit of the run, filtered by task and status;
- in the navigation (Browse), **Image edits**: the newest edits of the DAGs the user may read.

The views' links are relative, so a deployment under a base path works. An Airflow whose plugin
interface lacks ``fastapi_apps`` or ``external_views`` (before 3.1) gets a plugin without them.
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

#: Where the app of :mod:`airflow_provider_kontext.plugins.app` is mounted on the API server.
URL_PREFIX = "/kontext"
_PREFIX = URL_PREFIX.strip("/")
_SUPPORTED = hasattr(AirflowPlugin, "fastapi_apps") and hasattr(AirflowPlugin, "external_views")

#: The UI's views: where they show, and the link (the UI fills in the ids, URL-encoded).
EXTERNAL_VIEWS: list[dict[str, Any]] = [
    {
        "name": "Image edit",
        "href": f"{_PREFIX}/edit?dag_id={{DAG_ID}}&run_id={{RUN_ID}}"
        "&task_id={TASK_ID}&map_index={MAP_INDEX}",
        "destination": "task_instance",
        "url_route": "kontext-edit",
    },
    {
        "name": "Image edits",
        "href": f"{_PREFIX}/gallery?dag_id={{DAG_ID}}&run_id={{RUN_ID}}",
        "destination": "dag_run",
        "url_route": "kontext-gallery",
    },
    {
        "name": "Image edits",
        "href": f"{_PREFIX}/recent",
        "destination": "nav",
        "category": "browse",
        "url_route": "kontext-recent",
    },
]


class _AppsOnFirstUse:
    """Return ``fastapi_apps``, built when first read.

    Only the API server reads it, while every Airflow process that loads plugins (scheduler,
    triggerer, workers) imports this module, and the app imports the API server's security
    machinery.
    """

    def __init__(self) -> None:
        self._apps: list[dict[str, Any]] | None = None

    def __get__(self, instance: Any, owner: Any) -> list[dict[str, Any]]:
        if self._apps is None:
            from airflow_provider_kontext.plugins.app import create_app

            self._apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "FLUX.1 Kontext edits"}]
        return self._apps


class FluxKontextEditsPlugin(AirflowPlugin):
    """The edits' views and the app serving them."""

    name = "kontext_edits"
    if _SUPPORTED:
        fastapi_apps = _AppsOnFirstUse()
        external_views = EXTERNAL_VIEWS
