"""Edit images with FLUX.1 Kontext [dev] through Replicate's predictions API, from Apache Airflow.

The public surface: the classes below (importable from here, each imported on first use, so
``get_provider_info`` and DAG parsing stay cheap), :mod:`airflow_provider_kontext.exceptions`,
the pydantic models in :mod:`airflow_provider_kontext.models`, and the emulator for tests in
:mod:`airflow_provider_kontext.testing`. Everything else is internal; its folders are layers:
``models`` < ``hooks`` < ``edits`` < ``triggers``/``links`` < ``operators``/``sensors`` < ``plugins``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Each public class and the module that defines it.
_PUBLIC = {
    "FluxKontextEditOperator": "airflow_provider_kontext.operators.kontext",
    "FluxKontextBatchEditOperator": "airflow_provider_kontext.operators.batch",
    "FluxKontextHook": "airflow_provider_kontext.hooks.kontext",
    "FluxKontextPredictionSensor": "airflow_provider_kontext.sensors.kontext",
    "FluxKontextPredictionTrigger": "airflow_provider_kontext.triggers.kontext",
    "FluxKontextPredictionLink": "airflow_provider_kontext.links.kontext",
}

__all__ = [
    "FluxKontextBatchEditOperator",
    "FluxKontextEditOperator",
    "FluxKontextHook",
    "FluxKontextPredictionLink",
    "FluxKontextPredictionSensor",
    "FluxKontextPredictionTrigger",
    "__version__",
]

if TYPE_CHECKING:
    from airflow_provider_kontext.hooks.kontext import FluxKontextHook
    from airflow_provider_kontext.links.kontext import FluxKontextPredictionLink
    from airflow_provider_kontext.operators.batch import FluxKontextBatchEditOperator
    from airflow_provider_kontext.operators.kontext import FluxKontextEditOperator
    from airflow_provider_kontext.sensors.kontext import FluxKontextPredictionSensor
    from airflow_provider_kontext.triggers.kontext import FluxKontextPredictionTrigger


def __getattr__(name: str) -> Any:
    """Import a public class on first use (this package itself must stay free of Airflow imports)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
