"""Report a finished edit to OpenLineage.

The input image and the outputs as datasets, the prediction as a run facet.

Used by ``get_openlineage_facets_on_complete`` of the operator and the sensor, which the
OpenLineage provider (``apache-airflow-providers-openlineage``, the ``openlineage`` extra) calls
after a task succeeds. Without that provider nothing here is imported, and
:func:`edit_lineage` returns ``None``. Dataset names follow OpenLineage's naming: ``https://host``
with the URL's path, ``file://host`` with the file's path, ``s3://bucket`` with the key. Userinfo
and query strings are never part of a name (they may hold tokens or signatures); ``data:`` images
and bytes have no location, so they are no dataset.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

#: The key of :func:`run_facet` in an OpenLineage event's run facets.
RUN_FACET_KEY = "fluxKontextPrediction"


def dataset_identity(location: Any) -> tuple[str, str] | None:
    """Return ``(namespace, name)`` of an image at ``location``, or ``None``.

    ``location`` is a URL, path or ``ObjectStoragePath``; ``None`` when it has no location a dataset
    can name (``data:`` URIs, bytes, nothing).
    """
    if location is None or isinstance(location, bytes | bytearray | memoryview):
        return None
    text = str(location)
    if not text or text[:5].lower() == "data:" or "\x00" in text:
        return None
    if "://" not in text:
        return f"file://{socket.gethostname()}", str(Path(text).absolute())
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme == "file":
        return f"file://{host or socket.gethostname()}", parts.path
    if not host:
        return None
    if scheme in ("http", "https"):
        return f"{scheme}://{host}" + (f":{port}" if port else ""), parts.path or "/"
    # Object stores (s3, gs, abfs, ...): the bucket is the namespace, the key the name.
    return f"{scheme}://{host}", parts.path.lstrip("/")


def public_location(location: Any) -> str | None:
    """Return ``location`` as the dataset it names, or ``None``.

    That is ``namespace`` + name: no userinfo, query or fragment; safe to keep in trigger kwargs and
    logs, and read back by :func:`dataset_identity`.
    """
    identity = dataset_identity(location)
    if identity is None:
        return None
    namespace, name = identity
    return namespace + (name if name.startswith("/") else "/" + name)


@functools.cache
def _facet_class() -> Any:
    """Return the run facet's class, built on first use (it needs the OpenLineage client)."""
    from attrs import define
    from openlineage.client.facet_v2 import RunFacet

    @define
    class FluxKontextPredictionRunFacet(RunFacet):  # type: ignore[misc,unused-ignore]  # Any without the client
        """The prediction behind an edit: model, id, predict time and where to see it."""

        model: str | None
        predictionId: str | None
        predictTime: float | None
        status: str | None
        webUrl: str | None

    return FluxKontextPredictionRunFacet


def run_facet(summary: Mapping[str, Any]) -> Any:
    """Return the run facet for a finished edit's ``prediction`` summary (needs the OpenLineage client)."""
    return _facet_class()(
        model=summary.get("model"),
        predictionId=summary.get("id"),
        predictTime=summary.get("predict_time"),
        status=summary.get("status"),
        webUrl=summary.get("web_url"),
    )


def edit_lineage(input_image: Any, summary: Mapping[str, Any] | None) -> Any:
    """Return the ``OperatorLineage`` of a finished edit, or ``None``.

    ``None`` when there is none to report (the task did not complete an edit) or the OpenLineage
    provider is not installed.

    :param input_image: what the edit read (the operator's rendered ``input_image``, or the input
        image the sensor's prediction was started with).
    :param summary: the ``prediction`` summary the task pushed to XCom (outputs, model, id, times).
    """
    if summary is None:
        return None
    try:
        from airflow.providers.common.compat.openlineage.facet import Dataset
        from airflow.providers.openlineage.extractors import OperatorLineage
    except ImportError:
        return None

    def datasets(locations: list[Any]) -> list[Any]:
        found = [identity for location in locations if (identity := dataset_identity(location))]
        return [Dataset(namespace=namespace, name=name) for namespace, name in dict.fromkeys(found)]

    return OperatorLineage(
        inputs=datasets([input_image]),
        outputs=datasets(list(summary.get("outputs") or [])),
        run_facets={RUN_FACET_KEY: run_facet(summary)},
    )
